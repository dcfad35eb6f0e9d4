"""scripts/bench_loader.py and bench_embed.py run (tiny sizes): every loader they compare still builds and yields batches."""
import re

from conftest import PYTHON, REPO, TINY_CONFIG, TINY_MODEL, run


def test_bench_loader_times_all_four_loaders(tmp_path, patched_install):
    proc = run([PYTHON, REPO / "scripts" / "bench_loader.py", "--samples", "128", "--per-shard", "64",
                "--batch-size", "16", "--seconds", "0.5", "--rounds", "1", "--folder", tmp_path], timeout=600)
    rows = re.findall(r"^\| (stock|plugin)[^|]*\| ([0-9,]+) \| ([0-9.]+) \|$", proc.stdout, re.M)
    assert len(rows) == 4, proc.stdout[-3000:]
    assert all(int(rate.replace(",", "")) > 0 for _, rate, _ in rows)
    assert "image (512,), text (3, 77)" in proc.stdout  # the cached and compact loaders yield embeddings


def test_bench_embed_times_both_transfers(tmp_path):
    proc = run([PYTHON, REPO / "scripts" / "bench_embed.py", "--model", TINY_MODEL, "--model-config", TINY_CONFIG,
                "--samples", "48", "--per-shard", "16", "--rounds", "1", "--folder", tmp_path], timeout=600)
    rows = dict(re.findall(r"^\| (float32|uint8) \| ([0-9,]+) \| [0-9.]+ \|$", proc.stdout, re.M))
    assert set(rows) == {"float32", "uint8"} and all(int(r.replace(",", "")) > 0 for r in rows.values()), proc.stdout
    # the tiny model's 32 px images: 3 x 32 x 32 values, 4 bytes each in float32, 1 in uint8
    handed = dict(re.findall(r"--transfer (float32|uint8): [0-9,]+ images/s, ([0-9,.]+) KiB", proc.stdout))
    assert handed == {"float32": "12", "uint8": "3"}, proc.stdout
