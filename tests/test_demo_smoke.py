"""The whole demo at a tiny size: world -> stock baseline -> torchrun ParaCLIP -> evaluation -> report."""
import json

from conftest import PYTHON, run


def test_demo_end_to_end_tiny(tmp_path, patched_install):
    out = tmp_path / "demo"
    proc = run([PYTHON, "-m", "paraclip_plugin.demo", "--output", out, "--num-train", 64, "--num-shards", 4,
                "--num-eval", 12, "--baseline-epochs", 1, "--paraclip-epochs", 1, "--batch-size", 8])
    for number in range(1, 6):
        assert f"[{number}/5]" in proc.stdout
    assert "AO@10" in proc.stdout and "JS@10" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    for side in ("before", "after"):
        assert results[side]["num_pairs"] == 12
        assert 0.0 <= results[side]["AO@10"] <= 1.0 and 0.0 <= results[side]["JS@10"] <= 1.0
    assert results["before"]["pretrained"] != results["after"]["pretrained"]
    curves = results["loss_curves"]
    assert len(curves["baseline CLIP"]) == 4 and len(curves["ParaCLIP fine-tuning"]) == 4  # 64 / (16 global)
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
