"""The whole demo at a tiny size: world -> stock baseline -> torchrun ParaCLIP -> evaluation -> report."""
import json
import sys

import pytest

from conftest import PYTHON, run
from paraclip_plugin.demo.__main__ import main


def test_demo_end_to_end_tiny(tmp_path, patched_install):
    out = tmp_path / "demo"
    proc = run([PYTHON, "-m", "paraclip_plugin.demo", "--output", out, "--num-train", 64, "--num-shards", 4,
                "--num-eval", 12, "--baseline-epochs", 1, "--paraclip-epochs", 1, "--batch-size", 8,
                "--runs", 2, "--seed", 7])
    for number in range(1, 5):
        assert f"[{number}/5] run 1/2" in proc.stdout and f"[{number}/5] run 2/2" in proc.stdout
    assert "[5/5]" in proc.stdout and "mean over 2 runs (seeds 7, 8)" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert [r["seed"] for r in results["runs"]] == [7, 8]
    for r in results["runs"]:
        for side in ("before", "after"):
            assert r[side]["num_pairs"] == 12
            assert 0.0 <= r[side]["AO@10"] <= 1.0 and 0.0 <= r[side]["JS@10"] <= 1.0
        assert r["before"]["pretrained"] != r["after"]["pretrained"]
        assert f"seed-{r['seed']}" in r["after"]["pretrained"]
    # each seed builds its own world: different held-out scenes
    assert (out / "seed-7" / "world" / "eval" / "pairs.jsonl").read_text() != \
        (out / "seed-8" / "world" / "eval" / "pairs.jsonl").read_text()
    curves = results["loss_curves"]
    for seed in (7, 8):  # 64 samples / (8 per process x 2) = 4 steps, one loss per step
        assert len(curves[f"baseline CLIP (seed {seed})"]) == 4 and len(curves[f"ParaCLIP fine-tuning (seed {seed})"]) == 4
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_matplotlib_is_reported_before_any_work(tmp_path, monkeypatch, capsys):
    # None in sys.modules makes `import matplotlib` raise ImportError, as on a plain `pip install`
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit, match=r"pip install -e '\.\[plot\]'"):
        main(["--output", str(tmp_path / "demo")])
    assert not (tmp_path / "demo").exists()
    assert "[1/5]" not in capsys.readouterr().out


def test_runs_must_be_positive(tmp_path):
    with pytest.raises(SystemExit, match="--runs must be at least 1"):
        main(["--output", str(tmp_path / "demo"), "--runs", "0"])
