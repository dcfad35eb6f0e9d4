"""scripts/gpu_check.sh --cpu-smoke: every stage of the GPU check, tiny, on the CPU, so the script is
known to work before device time is spent on it; and the README's GPU section is its filed result."""
import json
import os
import subprocess
import sys

from conftest import PYTHON, REPO


def test_gpu_check_cpu_smoke_runs_every_stage(tmp_path, patched_install):
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=PYTHON, TMPDIR=str(tmp_path))
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--cpu-smoke"], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "out")) == ["gpu_check.json", "gpu_check.md", "logs.tar.gz"]
    result = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert result["kind"] == "cpu-smoke"
    assert [(s["stage"], s["rc"]) for s in result["stages"]] == [("tests", 0), ("step", 0), ("e2e", 0)]
    tests = result["tests"]
    assert (tests["passed"], tests["failed"], tests["skipped"]) == (8, 0, 0)
    trimmed = [c for c in tests["cases"] if c["name"].startswith("test_trimmed")]
    assert all(float(c["properties"]["bfloat16_feature_max_abs_diff" if "dtype0" in c["name"] else
                                     "float16_feature_max_abs_diff"]) >= 0 for c in trimmed)
    assert {(c["step"], c["batch"]) for c in result["step"]["cases"]} == {
        (s, b) for s in ("naive", "plugin-img", "plugin-emb", "plugin-emb+causal") for b in (16, 32)}
    profiled = [c for c in result["step"]["cases"] if "profile" in c]  # --cpu-smoke profiles batch 16
    assert {(c["step"], c["batch"]) for c in profiled} == {
        (s, 16) for s in ("naive", "plugin-img", "plugin-emb", "plugin-emb+causal")}
    assert all(abs(sum(c["profile"]["by_kind_pct"].values()) - 100) < 0.5 and c["profile"]["top"] for c in profiled)
    cases = result["e2e"]["cases"]
    assert list(cases) == ["stock", "paraclip", "embed", "cached", "cached+causal", "compact", "accum"]
    assert all(c["exit"] == 0 for c in cases.values())
    for name in ("stock", "paraclip", "cached", "cached+causal", "compact"):
        assert cases[name]["samples_per_s"] > 0 and cases[name]["steps_logged"] == result["e2e"]["steps"]
        assert 0 <= cases[name]["data_wait_pct"] < 100
    assert cases["accum"]["optimizer_steps"] == 2 and cases["accum"]["batch"] == 64
    assert {t["target"] for t in result["targets"]} >= {"end to end, cached vs stock",
                                                         "one optimizer step of 32,768 via --accum-freq"}
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "CPU smoke run: checks the scripts, measures nothing" in md and "| `--paraclip-loss`, JPEG |" in md
    assert "Where a step's time goes" in md


def test_readme_gpu_section_is_the_newest_filed_result():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import gpu_report
    finally:
        sys.path.remove(str(REPO / "scripts"))
    readme = (REPO / "README.md").read_text()
    section = readme.split(gpu_report.BEGIN, 1)[1].split(gpu_report.END, 1)[0]
    assert section == "\n" + gpu_report.readme_section()
