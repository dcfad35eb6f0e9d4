"""The whole demo at a tiny size: world -> stock baseline -> torchrun ParaCLIP -> evaluation -> report."""

import json
import re
import sys

import pytest

from conftest import PYTHON, run
from paraclip_plugin.demo.__main__ import main


@pytest.mark.long
def test_demo_end_to_end_tiny(tmp_path, patched_install):
    out = tmp_path / "demo"
    proc = run(
        [
            PYTHON,
            "-m",
            "paraclip_plugin.demo",
            "--output",
            out,
            "--num-train",
            64,
            "--num-shards",
            4,
            "--num-eval",
            12,
            "--baseline-epochs",
            1,
            "--paraclip-epochs",
            1,
            "--batch-size",
            8,
            "--runs",
            2,
            "--seed",
            7,
            "--ablation",
            "image:para2",
        ]
    )
    for number in range(1, 5):
        assert f"[{number}/5] run 1/2" in proc.stdout and f"[{number}/5] run 2/2" in proc.stdout
    assert "[5/5]" in proc.stdout and "mean over 2 runs (seeds 7, 8)" in proc.stdout
    # one summary line per run as it ends, then the table
    assert len(re.findall(r"recall@10 paraphrased \d\.\d\d -> \d\.\d\d", proc.stdout)) == 2
    results = json.loads((out / "results.json").read_text())
    assert results["names"] == ["baseline CLIP", "after ParaCLIP", "image:para2 only"]
    assert [r["seed"] for r in results["runs"]] == [7, 8]
    for r in results["runs"]:
        checkpoints = [r["results"][name]["pretrained"] for name in results["names"]]
        assert len(set(checkpoints)) == 3 and all(f"seed-{r['seed']}" in c for c in checkpoints)
        for result in r["results"].values():
            assert result["num_pairs"] == 12
            assert 0.0 <= result["AO@10"] <= 1.0 and 0.0 <= result["JS@10"] <= 1.0
    # the ablation really trained with the one term: its log names only L(image,para2)
    log = next((out / "seed-7" / "logs").glob("ablation-*/out.log")).read_text()
    assert "ParaCLIP loss: 1*L(image,para2)" in log and "L(caption,para1)" not in log
    # each seed builds its own world: different held-out scenes
    assert (out / "seed-7" / "world" / "eval" / "pairs.jsonl").read_text() != (
        out / "seed-8" / "world" / "eval" / "pairs.jsonl"
    ).read_text()
    curves = results["loss_curves"]
    for seed in (7, 8):  # 64 samples / (8 per process x 2) = 4 steps, one loss per step
        for name in ("baseline CLIP", "ParaCLIP fine-tuning", "ParaCLIP, image:para2 only"):
            assert len(curves[f"{name} (seed {seed})"]) == 4
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_matplotlib_is_reported_before_any_work(tmp_path, monkeypatch, capsys):
    # None in sys.modules makes `import matplotlib` raise ImportError, as on a plain `pip install`
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit) as exit_:
        main(["--output", str(tmp_path / "demo")])
    assert exit_.value.code == 2
    assert not (tmp_path / "demo").exists()
    out = capsys.readouterr()
    assert "[1/5]" not in out.out and "needs the 'plot' extra" in out.err and "[plot]" in out.err


def test_runs_must_be_positive(tmp_path):
    with pytest.raises(SystemExit, match="--runs must be at least 1"):
        main(["--output", str(tmp_path / "demo"), "--runs", "0"])


def test_bad_ablation_terms_are_refused_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match="--ablation: unknown field 'img'"):
        main(["--output", str(tmp_path / "demo"), "--ablation", "img:para2"])
    assert not (tmp_path / "demo").exists()
