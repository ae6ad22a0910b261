"""The README's first command, small: the whole pipeline on generated sample data in a subprocess."""

import json
import subprocess

from PIL import Image


def test_quickstart_runs_the_whole_pipeline(tmp_path):
    out = tmp_path / "qs"
    r = subprocess.run(["regionbert-quickstart", "--out", str(out), "--images", "24", "--steps", "20",
                        "--workers", "1"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "RANDOM weights" in r.stdout  # honest about the offline detector
    summary = json.loads((out / "summary.json").read_text())
    assert summary["records"] == 24 and summary["failed"] == 0 and summary["content_hash"].startswith("xxh3_128:")
    assert set(summary["eval"]) >= {"itm_acc", "mlm_acc", "t2i_r1", "i2t_r10"}
    assert (out / "run" / "curves.png").stat().st_size > 10_000  # the training curves, drawn
    with Image.open(out / "example_regions.png") as im:
        assert im.size[0] >= 640 and im.getextrema() != ((0, 0), (0, 0), (0, 0))
    assert (out / "run" / "checkpoint.pt").exists() and (out / "run" / "log.jsonl").exists()
    again = subprocess.run(["regionbert-quickstart", "--out", str(out)], capture_output=True, text=True)
    assert again.returncode == 2 and "earlier run" in again.stderr  # never overwrites a finished run
