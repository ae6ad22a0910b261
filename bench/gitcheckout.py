"""The package folders of one commit of this repository, importable as regionbert: the "before" side of the
benchmarks that measure two versions side by side (bench_loader.py, bench_scale.py)."""

from __future__ import annotations

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def checkout(commit: str, into: str) -> str:
    """The package folders of a commit of this repository, importable as regionbert (for PYTHONPATH)."""
    src = os.path.join(into, "src")
    os.makedirs(src)
    archive = subprocess.run(["git", "-C", ROOT, "archive", commit, "data", "extract", "train"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", src], input=archive, check=True)
    pkg = os.path.join(into, "pkg", "regionbert")
    os.makedirs(pkg)
    open(os.path.join(pkg, "__init__.py"), "w").close()
    for name in ("data", "extract", "train"):
        os.symlink(os.path.join(src, name), os.path.join(pkg, name))
    return os.path.join(into, "pkg")
