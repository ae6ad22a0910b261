"""extract/ as a home for detector families (docs/extract.md): each family in its own module(s), the generic
modules (the interface, the shared box policies, image decoding) import no family, families import no
other family, nothing in extract/ imports in a cycle, and every family provides the whole interface and
reads weights without running code in them. Imports are read from the source (ast), lazy ones included."""

import ast
import dataclasses
import pathlib
import pickle

import pytest
import torch

from regionbert.extract import families
from regionbert.extract.detector import Family

EXTRACT = pathlib.Path(__file__).resolve().parents[1] / "extract"
# modules every family may import; they import no family themselves
GENERIC = {"detector", "policies", "images"}
# the layer above the families: it may import them, they may not import it
UPPER = {"families", "pipeline", "cli", "detector_cli", "finetune"}


def _extract_imports(source: str) -> set[str]:
    """Names of the extract/ modules a module's source imports (relative or regionbert.extract.X), at any
    depth of the file (an import inside a function counts: it closes a cycle all the same)."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y / from . import x, y
                out |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif node.level == 0 and node.module and node.module.startswith("regionbert.extract"):
                rest = node.module.split(".")[2:]
                out |= {rest[0]} if rest else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[2] for a in node.names if a.name.startswith("regionbert.extract.")}
    return out


def _defines_family(source: str) -> bool:
    """A family module assigns FAMILY = Family(...) at module level."""
    return any(isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "FAMILY" for t in n.targets)
               for n in ast.parse(source).body)


def _sources() -> dict[str, str]:
    return {p.stem: p.read_text() for p in sorted(EXTRACT.glob("*.py")) if p.stem != "__init__"}


def _closure(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for m in graph.get(todo.pop(), ()):
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


def layout_problems(sources: dict[str, str]) -> list[str]:
    """Every breach of the layout rules in a set of extract/ module sources (name -> text)."""
    graph = {name: _extract_imports(text) & set(sources) for name, text in sources.items()}
    family_modules = sorted(n for n, t in sources.items() if _defines_family(t))
    problems = []
    for name in sorted(graph):
        if name in _closure(graph, name):
            problems.append(f"{name} imports itself through a cycle")
    for name in sorted(GENERIC & set(graph)):
        bad = _closure(graph, name) - GENERIC
        if bad:
            problems.append(f"generic module {name} imports {sorted(bad)} (family or upper-layer code)")
    owned = {}
    for fam in family_modules:
        reach = _closure(graph, fam)
        if reach & UPPER:
            problems.append(f"family {fam} imports {sorted(reach & UPPER)}, the layer above the families")
        for other in family_modules:
            if other != fam and other in reach:
                problems.append(f"family {fam} imports family {other}")
        for helper in (reach | {fam}) - GENERIC - UPPER:
            owned.setdefault(helper, set()).add(fam)
    for helper, owners in sorted(owned.items()):
        if len(owners) > 1:
            problems.append(f"{helper} is imported by the families {sorted(owners)}: shared code belongs in a "
                            f"generic module ({', '.join(sorted(GENERIC))})")
    return problems


def test_the_layout_rules_hold_for_extract():
    sources = _sources()
    assert {"detector", "families", "torchvision_rcnn", "butd", "butd_weights", "policies"} <= set(sources)
    assert layout_problems(sources) == []


def test_detector_py_is_generic():
    imports = _extract_imports((EXTRACT / "detector.py").read_text())
    assert imports <= GENERIC - {"detector"}, f"detector.py imports {imports}"
    assert not _defines_family((EXTRACT / "detector.py").read_text())


def test_the_family_modules_are_the_ones_in_the_table():
    in_files = sorted(n for n, t in _sources().items() if _defines_family(t))
    in_table = sorted(f.build.__module__.rsplit(".", 1)[-1] for f in families.FAMILIES)
    assert in_files == in_table == ["butd", "torchvision_rcnn", "vinvl"]


@pytest.mark.parametrize("sources, expected", [
    ({"a": "from .b import x\nFAMILY = Family()", "b": "FAMILY = Family()"}, "family a imports family b"),
    ({"a": "def f():\n    from regionbert.extract import b\nFAMILY = 1", "b": "FAMILY = 2"},
     "family a imports family b"),
    ({"detector": "from .families import x", "families": "from . import detector"}, "imports itself through a cycle"),
    ({"detector": "import regionbert.extract.a", "a": "FAMILY = 1"}, "generic module detector imports ['a']"),
    ({"a": "from .h import x\nFAMILY = 1", "b": "from .h import y\nFAMILY = 2", "h": ""},
     "h is imported by the families"),
    ({"a": "from .pipeline import run\nFAMILY = 1", "pipeline": ""}, "the layer above the families"),
])
def test_the_checker_catches_each_kind_of_breach(sources, expected):
    problems = layout_problems(sources)
    assert any(expected in p for p in problems), problems


def test_every_family_provides_the_interface():
    names = []
    for fam in families.FAMILIES:
        assert isinstance(fam, Family)
        for f in dataclasses.fields(Family):
            value = getattr(fam, f.name)
            assert value is not None and (value != () and value != "" and value != {}), (fam.name, f.name)
            if f.name in ("build", "load_weights", "image_input", "layout", "box_policy", "region_extractor"):
                assert callable(value), (fam.name, f.name)
        assert set(fam.default_sizes) <= set(fam.detectors)
        assert fam.box_policy("given").name == "given"  # every family takes the caller's boxes
        names += fam.detectors
    assert len(names) == len(set(names)), f"a detector name in two families: {names}"
    assert families.DETECTORS == names


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling calls mkdir(marker): the proof that code ran
        import os

        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("fam", families.FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_every_family_refuses_weights_that_would_run_code(tmp_path, fam, writer):
    marker = tmp_path / "ran"
    path = tmp_path / "weights.bin"
    payload = {"model": {"w": _RunsCode(marker)}}
    if writer == "pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path)
    with pytest.raises(ValueError, match="weights.bin"):
        fam.load_weights(str(path))
    assert not marker.exists()
