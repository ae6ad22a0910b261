"""data/ has no import cycle: the reader and the writer share format.py and handles.py, not each other."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _data_imports(name: str) -> set[str]:
    """The regionbert.data modules a data/ module imports (relative imports resolved), at any depth."""
    tree = ast.parse((ROOT / "data" / f"{name}.py").read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out |= {node.module} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("regionbert.data."):
            out.add(node.module.split(".")[2])
    return out


def test_data_reader_and_writer_do_not_import_each_other():
    """The spec's constants live in format.py and handle management in handles.py, so the reader and the
    writer depend on those, not on each other (nor on index.py, which uses both)."""
    reader, writer = _data_imports("reader"), _data_imports("writer")
    assert "writer" not in reader and "index" not in reader, reader
    assert "reader" not in writer and "index" not in writer, writer
    assert {"format", "handles"} <= reader and {"format", "handles"} <= writer
    for low in ("format", "handles", "indexfile", "lock"):
        assert not _data_imports(low) & {"reader", "writer", "index"}, low
