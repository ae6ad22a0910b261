"""The package layout: stage folders import as regionbert.*, and the trainer never needs the detector."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
FORBIDDEN = ("regionbert.extract", "torchvision.models.detection")


def _imports(path: pathlib.Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    pkg = "regionbert.train" + "".join("." + p for p in path.relative_to(ROOT / "train").parent.parts)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # resolve relative imports against the file's package
                base = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                mod = f"{base}.{node.module}" if node.module else base
                yield mod
                yield from (f"{mod}.{a.name}" for a in node.names)
            else:
                yield node.module
                yield from (f"{node.module}.{a.name}" for a in node.names)


def test_train_never_imports_the_detector_or_extract():
    files = sorted((ROOT / "train").rglob("*.py"))
    assert files, "train/ has no Python files"
    bad = [(str(f.relative_to(ROOT)), m) for f in files for m in _imports(f)
           if any(m == x or m.startswith(x + ".") for x in FORBIDDEN)]
    assert not bad, f"train/ must not import the detector or extract/: {bad}"


def test_import_checker_catches_a_forbidden_import(tmp_path, monkeypatch):
    fake = ROOT / "train" / "_probe_forbidden.py"
    fake.write_text("from ..extract import something\nimport torchvision.models.detection as d\n")
    try:
        found = [m for m in _imports(fake) if any(m.startswith(x) for x in FORBIDDEN)]
    finally:
        fake.unlink()
    assert "regionbert.extract" in found and "torchvision.models.detection" in found


def test_importing_train_loads_no_detector():
    code = ("import sys, regionbert.train, regionbert.data; "
            "bad = [m for m in sys.modules if m.startswith(('regionbert.extract', 'torchvision.models.detection'))]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stdout + r.stderr


def test_stage_packages_import_as_regionbert_only():
    code = ("import importlib.util as u, regionbert.data, regionbert.extract, regionbert.train; "
            "print([m for m in ('data', 'train', 'extract', 'tests') if u.find_spec(m)])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"generic top-level modules are importable: {r.stdout}"
