"""scripts/bench_loader.py and bench_embed.py run (tiny sizes): every loader they compare still builds and yields batches."""

import re

from conftest import PYTHON, REPO, TINY_CONFIG, TINY_MODEL, run


def test_bench_loader_times_all_four_loaders(tmp_path, patched_install):
    proc = run(
        [
            PYTHON,
            REPO / "scripts" / "bench_loader.py",
            "--samples",
            "128",
            "--per-shard",
            "64",
            "--batch-size",
            "16",
            "--seconds",
            "0.5",
            "--rounds",
            "1",
            "--folder",
            tmp_path,
        ],
        timeout=600,
    )
    rows = re.findall(r"^\| (stock|plugin)[^|]*\| ([0-9,]+) \| ([0-9.]+) \|$", proc.stdout, re.M)
    assert len(rows) == 4, proc.stdout[-3000:]
    assert all(int(rate.replace(",", "")) > 0 for _, rate, _ in rows)
    assert "image (512,), text (3, 77)" in proc.stdout  # the cached and compact loaders yield embeddings


def test_bench_embed_times_the_tool_against_the_stock_loader(tmp_path, patched_install):
    """Every case (embed-device-decode with decode_jpeg on the CPU) times all images of every round."""
    proc = run(
        [
            PYTHON,
            REPO / "scripts" / "bench_embed.py",
            "--model",
            TINY_MODEL,
            "--model-config",
            TINY_CONFIG,
            "--samples",
            "48",
            "--per-shard",
            "16",
            "--workers",
            "1",
            "--rounds",
            "2",
            "--folder",
            tmp_path,
            "--cases",
            "stock,embed,embed-float32,embed-device-decode",
        ],
        timeout=600,
    )
    number = r"([0-9,.]+) \(([0-9,.]+)-([0-9,.]+)\)"
    rows = {
        m[0]: [float(v.replace(",", "")) for v in m[1:]]
        for m in re.findall(
            rf"^\| (stock|embed|embed-float32|embed-device-decode) \| {number} \| {number} \| {number} \| {number} \| {number} \|$",
            proc.stdout,
            re.M,
        )
    }
    assert set(rows) == {"stock", "embed", "embed-float32", "embed-device-decode"}, proc.stdout
    for name, (steady, lo, hi, ratio, rlo, rhi, whole, *_, startup, slo, shi) in rows.items():
        assert 0 < lo <= steady <= hi and 0 < whole and 0 < slo <= startup <= shi, (name, proc.stdout)
        assert rlo <= ratio <= rhi or name == "stock"
    assert rows["stock"][3:6] == [1.0, 1.0, 1.0]
    # every round of every case went through all 48 images
    assert len(re.findall(r"round [12], \S+: .*\(48 images\)$", proc.stdout, re.M)) == 8, proc.stdout
