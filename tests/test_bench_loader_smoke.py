"""scripts/bench_loader.py runs (tiny sizes): every loader it compares still builds and yields batches."""
import re

from conftest import PYTHON, REPO, run


def test_bench_loader_times_all_four_loaders(tmp_path, patched_install):
    proc = run([PYTHON, REPO / "scripts" / "bench_loader.py", "--samples", "128", "--per-shard", "64",
                "--batch-size", "16", "--seconds", "0.5", "--rounds", "1", "--folder", tmp_path], timeout=600)
    rows = re.findall(r"^\| (stock|plugin)[^|]*\| ([0-9,]+) \| ([0-9.]+) \|$", proc.stdout, re.M)
    assert len(rows) == 4, proc.stdout[-3000:]
    assert all(int(rate.replace(",", "")) > 0 for _, rate, _ in rows)
    assert "image (512,), text (3, 77)" in proc.stdout  # the cached and compact loaders yield embeddings
