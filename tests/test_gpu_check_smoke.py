"""scripts/gpu_check.sh --cpu-smoke: every stage of the GPU check, tiny, on the CPU, so the script is
known to work before device time is spent on it; the parts of it that a stopped or partial device call
relies on (pytest_parallel.py, bench_step.py's plan, bench_e2e.py's shards, gpu_report.py collect); and
docs/benchmarks.md's GPU section is the newest filed result per GPU kind."""

import json
import os
import re
import signal
import subprocess
import tarfile
import time
import xml.etree.ElementTree as ET

import open_clip
import pytest
import torch
import test_gpu
from conftest import PYTHON, REPO, TINY_CONFIG, TINY_MODEL, script_module


def gpu_report_module():
    return script_module("gpu_report")


@pytest.mark.long
def test_gpu_check_cpu_smoke_runs_every_stage(tmp_path, patched_install):
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=PYTHON, TMPDIR=str(tmp_path))
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--cpu-smoke"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "out")) == ["gpu_check.json", "gpu_check.md", "logs.tar.gz"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith("gpu_check.")]  # the scratch folder is removed
    with tarfile.open(tmp_path / "out" / "logs.tar.gz") as logs:
        names = logs.getnames()
    assert {
        "logs/tests.log",
        "logs/shards.log",
        "logs/step.log",
        "logs/e2e.log",
        "logs/e2e/stock-t40.log",
        "logs/e2e/cached+causal-t77.log",
        "logs/e2e/accum-t40.log",
    } <= set(names)
    assert not [n for n in names if n.startswith("logs/tests-")]  # the parallel processes' logs: in tests.log
    result = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert result["kind"] == "cpu-smoke"
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    changed = bool(subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout)
    assert result["commit"] == head.strip() + ("+changes" if changed else ""), result["commit"]
    assert result["commit_source"] == "git HEAD of the checkout"
    assert (
        f"commit {result['commit'][:10]}{'+changes' if changed else ''};"
        in (tmp_path / "out" / "gpu_check.md").read_text()
    )
    # the shards are written beside the tests (either may end first), before anything is timed
    stages = [(s["stage"], s["rc"]) for s in result["stages"]]
    assert sorted(stages[:2]) == [("shards", 0), ("tests", 0)] and stages[2:] == [("step", 0), ("e2e", 0)]
    assert result["e2e"]["shards"]["reused"] is True and result["e2e"]["shards"]["seconds"] > 0
    tests = result["tests"]
    assert (tests["passed"], tests["failed"], tests["skipped"]) == (11, 0, 0)
    # pytest_parallel.py ran the open_clip_train tests in processes of their own: one junit xml, collection order
    assert [c["name"] for c in tests["cases"]] == [
        *(f"test_trimmed_text_features_and_gradients_match_stock_under_autocast[dtype{i}]" for i in (0, 1)),
        "test_causal_attention_runs_flash_attention_and_matches_the_mask_under_bf16",
        "test_embed_images_finishes_uint8_images_on_the_device_bit_for_bit",
        "test_blocked_loss_matches_clip_loss_under_bf16_and_keeps_less_memory",
        "test_embed_images_decodes_odd_jpegs_on_the_device_as_the_cpu_path_does",
        *(f"test_frozen_image_tower_gets_no_gradient_and_stays_bit_identical[{p}]" for p in ("amp_bf16", "amp")),
        *(
            f"test_open_clip_train_paraclip_steps_in_amp_bf16[{c}]"
            for c in ("eager", "torchcompile", "torchcompile+causal")
        ),
    ]
    # the measured differences reach the result file, as the tests bounded them
    measured = {c["name"]: c["properties"] for c in tests["cases"]}
    open_clip.add_model_config(str(TINY_CONFIG))
    parameters = dict(open_clip.create_model(TINY_MODEL).named_parameters())
    for prefix, case in (
        ("bfloat16", "test_trimmed_text_features_and_gradients_match_stock_under_autocast[dtype0]"),
        ("float16", "test_trimmed_text_features_and_gradients_match_stock_under_autocast[dtype1]"),
        ("causal", "test_causal_attention_runs_flash_attention_and_matches_the_mask_under_bf16"),
    ):
        props = measured[case]
        assert 0 <= float(props[f"{prefix}_feature_max_abs_diff"]) <= test_gpu.FEATURE_ATOL, (case, props)
        assert 0 <= float(props[f"{prefix}_grad_max_rel_diff"]) <= test_gpu.GRAD_RTOL, (case, props)
        assert props[f"{prefix}_grad_worst_param"] in parameters, (case, props)
    assert measured["test_open_clip_train_paraclip_steps_in_amp_bf16[torchcompile]"]["recompiles"].isdigit()
    decoded = measured["test_embed_images_decodes_odd_jpegs_on_the_device_as_the_cpu_path_does"]
    assert float(decoded["decode_min_embedding_cosine"]) >= 0.99 and "not decodable: 2" in decoded["decode_counts"]
    blocked = measured["test_blocked_loss_matches_clip_loss_under_bf16_and_keeps_less_memory"]
    assert 0 <= float(blocked["blocked_grad_max_rel_diff"]) <= test_gpu.GRAD_RTOL
    # every case at every text-length setting (the headline 40 first); plugin-emb@16: that case at batch 16 only
    steps = result["step"]["cases"]
    assert [(c["step"], c["batch"], c["longest"]) for c in steps] == [
        (name, batch, longest)
        for batch, names in (
            (16, ("naive", "plugin-img+causal", "plugin-emb+causal", "plugin-emb")),
            (32, ("naive", "plugin-img+causal")),
        )
        for name in names
        for longest in (40, 24, 77)
    ]
    assert result["step"]["text_length_distribution"].startswith("uniform from half the longest")
    for c in steps:  # the setting reaches the text tower: the batch's longest text is the setting, the cut follows it
        tokens = c["text_tokens"]
        assert (tokens["batch_longest"], tokens["range"]) == (c["longest"], [-(-c["longest"] // 2), c["longest"]]), c
        assert c["longest"] // 2 <= tokens["batch_shortest"] < tokens["batch_longest"]
        assert tokens["tower_ran"] == (77 if c["step"] == "naive" else c["longest"]), c
    profiled = [c for c in steps if "profile" in c]  # --cpu-smoke profiles batch 16 at the headline setting
    assert {(c["step"], c["batch"], c["longest"]) for c in profiled} == {
        (s, 16, 40) for s in ("naive", "plugin-img+causal", "plugin-emb+causal", "plugin-emb")
    }
    assert all(abs(sum(c["profile"]["by_kind_pct"].values()) - 100) < 0.5 and c["profile"]["top"] for c in profiled)
    cases = result["e2e"]["cases"]
    # the device's default cases (without +compile), then the others once
    assert list(cases) == [
        "stock@40",
        "paraclip@40",
        "embed",
        "cached+causal@40",
        "accum@40",
        "cached+causal@24",
        "cached+causal@77",
        "embed-float32",
        "cached@40",
        "compact@40",
    ]
    assert all(c["exit"] == 0 for c in cases.values())
    # the shards hold the settings' texts: counted with open_clip's tokenizer, the longest is the setting
    for longest, held in result["e2e"]["shards"]["text_tokens"].items():
        assert held["longest"] == int(longest) and -(-int(longest) // 2) <= held["shortest"] < int(longest)
    for name in (
        "stock@40",
        "paraclip@40",
        "cached+causal@40",
        "cached+causal@24",
        "cached+causal@77",
        "cached@40",
        "compact@40",
    ):
        case = cases[name]
        assert case["samples_per_s"] > 0 and case["steps_logged"] == result["e2e"]["steps"]
        assert case["longest"] == int(name.split("@")[1]) and 0 <= case["data_wait_pct"] < 100
        low, high = case["range_samples_per_s"]  # 3 windows: their median and range
        assert len(case["windows_samples_per_s"]) == 3 and low <= case["samples_per_s"] <= high
    assert cases["accum@40"]["optimizer_steps"] == 4 and cases["accum@40"]["batch"] == 64
    assert cases["accum@40"]["timed_steps"] == 3 and len(cases["accum@40"]["windows_samples_per_s"]) == 3
    assert "--paraclip-loss-block-size 16" in cases["accum@40"]["flags"]
    for embed in (cases["embed"], cases["embed-float32"]):  # embed_images.py's own account of its main process's time
        assert embed["images_per_s"] > 0 and 0 < embed["after_startup_s"] <= embed["seconds"]
        assert embed["waiting_s"] + embed["encoding_s"] + embed["writing_s"] <= embed["after_startup_s"] + 0.02
    targets = {t["target"]: t for t in result["targets"]}
    for longest in (40, 24, 77):
        assert f"step from images vs naive, batch 1,024, longest text {longest}" in targets
        assert f"end to end, cached vs stock, longest text {longest}" in targets
    assert targets["end to end, cached vs stock, longest text 40"]["value"] > 0
    assert targets["end to end, cached vs stock, longest text 24"]["note"] == "not measured"  # no stock@24 here
    assert targets["64 per optimizer step, longest text 40: peak torch.cuda.max_memory_allocated"]["met"] is None  # CPU
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "CPU smoke run: checks the scripts, measures nothing" in md and "Where a step's time goes" in md
    assert "**When the cache pays** (longest text 40;" in md and "| one epoch (the paper's recipe) | 1 |" in md
    assert (
        "**cached+causal**: `--paraclip-loss --image-embeddings`: cached embeddings (the embedding pass not counted"
        in md
    )
    assert "| cached+causal@77 | 77 |" in md and "**Targets** (the headline: longest text 40):" in md


def test_benchmarks_page_gpu_section_is_the_newest_filed_result_per_gpu_kind():
    gpu_report = gpu_report_module()
    page = (REPO / "docs" / "benchmarks.md").read_text()
    section = page.split(gpu_report.BEGIN, 1)[1].split(gpu_report.END, 1)[0]
    assert section == "\n" + gpu_report.readme_section()


def test_the_section_shows_only_the_newest_call_of_each_gpu_kind(tmp_path, monkeypatch):
    gpu_report = gpu_report_module()
    for gpu, date in [
        ("NVIDIA H200", "2026-01-01 10:00 UTC"),
        ("NVIDIA H100", "2026-01-02 10:00 UTC"),
        ("NVIDIA H200", "2026-01-03 09:00 UTC"),
        ("NVIDIA H200", "2026-01-02 11:00 UTC"),
    ]:
        (tmp_path / f"{gpu[-4:]}-{date[:10]}.json").write_text(json.dumps({"date": date, "environment": {"gpu": gpu}}))
    monkeypatch.setattr(gpu_report, "BENCHMARKS", str(tmp_path))
    monkeypatch.setattr(gpu_report, "render", lambda result, source: f"{result['date']} {os.path.basename(source)}\n")
    assert (
        gpu_report.readme_section()
        == "2026-01-03 09:00 UTC H200-2026-01-03.json\n\n2026-01-02 10:00 UTC H100-2026-01-02.json\n"
    )


def test_a_call_stopped_at_its_limit_is_collected_here_with_the_devices_facts(tmp_path, capsys):
    """$OUT/work as a device call killed in its e2e stage leaves it: collect names the device from
    started.json, keeps what was measured, and checks the cached target on the fastest cached run."""
    work = tmp_path / "work"
    work.mkdir()
    started = {
        "kind": "gpu",
        "date": "2026-11-27 01:02 UTC",
        "commit": "0123456789",
        "environment": {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "cpu_cores": 16},
    }
    (work / "started.json").write_text(json.dumps(started))
    (work / "stages.jsonl").write_text(
        '{"stage": "tests", "rc": 124, "seconds": 170, "budget": 170}\n'
        '{"stage": "e2e", "rc": 124, "seconds": 240, "budget": 240}\n'
        '{"stage": "e2e2", "rc": 0, "sec'
    )  # cut short by the call's end
    (work / "step.json").write_text('{"device": "NVIDIA H100 80GB HBM3", "cases": [{"st')  # killed while saving
    (work / "logs").mkdir()  # the tests stage stopped before pytest wrote tests.xml: its -v log is what is left
    (work / "logs" / "tests.log").write_text(
        "tests/test_gpu.py::test_trimmed_text_features_and_gradients_match_stock_under_autocast[dtype0] PASSED [ 11%]\n"
        "tests/test_gpu.py::test_causal_attention_runs_flash_attention_and_matches_the_mask_under_bf16 FAILED [ 22%]\n"
        "tests/test_gpu.py::test_open_clip_train_paraclip_steps_in_amp_bf16[eager] PASSED [ 33%]\n"
        "FAILED tests/test_gpu.py::test_causal_attention_runs_flash_attention_and_matches_the_mask_under_bf16 - boom\n"
    )
    run = dict(
        exit=0,
        steps_logged=45,
        batch=1024,
        data_wait_pct=1.0,
        gpu_util_mean_pct=90.0,
        gpu_memory_max_gib=18.0,
        longest=40,
        range_samples_per_s=[2900.0, 3100.0],
    )
    (work / "e2e.json").write_text(
        json.dumps(
            {
                "device": "NVIDIA H100 80GB HBM3",
                "model": "ViT-B-32",
                "samples": 51200,
                "batch": 1024,
                "workers": 15,
                "precision": "amp_bf16",
                "steps": 45,
                "skip_steps": 15,
                "windows": 3,
                "text_lengths": [40, 24, 77],
                "text_length_distribution": "uniform",
                "cases": {
                    "stock@40": dict(run, samples_per_s=3000.0),
                    "cached@40": dict(run, samples_per_s=9000.0),
                    "embed": {
                        "exit": 0,
                        "seconds": 40.0,
                        "images": 12288,
                        "after_startup_s": 20.0,
                        "images_per_s": 307.2,
                    },
                    "cached+causal+compile@40": dict(run, samples_per_s=15000.0),
                    "accum@40": dict(run, batch=32768, exit="timeout", optimizer_steps=1, peak_allocated_gib=60.0),
                },
            }
        )
    )
    rc = gpu_report_module().main(["collect", "--work", str(work), "--out", str(tmp_path / "out")])
    assert rc == 1  # a stage stopped at its budget is not a pass
    err = capsys.readouterr().err
    assert f"{work / 'stages.jsonl'}:3: not readable as JSON: left out" in err
    assert f"{work / 'step.json'}: not readable as JSON" in err
    result = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert [s["stage"] for s in result["stages"]] == ["tests", "e2e"] and result["step"] is None
    assert {k: result[k] for k in started} == started  # not this machine's facts
    targets = {t["target"]: t for t in result["targets"]}
    assert targets["end to end, cached embeddings: samples/s, longest text 40"]["value"] == 15000.0
    cached = targets["end to end, cached vs stock, longest text 40"]
    assert cached["value"] == 5.0 and cached["met"] and "cached+causal+compile@40" in cached["note"]
    # one epoch from the measured rates: embedding 12,288 images in 20 s after start-up (614.4/s), cached 15,000/s
    epoch = targets["one epoch, the embedding pass included, vs stock, longest text 40"]
    assert epoch["value"] == round((1 / 3000) / (1 / 614.4 + 1 / 15000), 2) and epoch["met"] is False
    # the 32,768 step stopped at its run timeout: a miss, though its peak was measured under 75 GiB
    accum = targets["32,768 per optimizer step, longest text 40: peak torch.cuda.max_memory_allocated"]
    assert (accum["value"], accum["met"]) == (60.0, False) and accum["note"].startswith("exit timeout")
    for lost in (
        "step from images vs naive, batch 1,024, longest text 40",
        "end to end, ParaCLIP from JPEGs vs stock, longest text 40",
        "end to end, cached vs stock, longest text 77",
    ):
        assert (targets[lost]["met"], targets[lost]["note"]) == (None, "not measured")  # a row, not a gap
    tests = result["tests"]
    assert (tests["passed"], tests["failed"], tests["stopped"]) == (2, 1, True)
    assert [c["outcome"] for c in tests["cases"]] == ["passed", "failed", "passed"]
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "2 passed, 1 failed (the stage was stopped before pytest ended" in md
    assert "| test_open_clip_train_paraclip_steps_in_amp_bf16[eager] | passed | n/a |" in md
    assert "**NVIDIA H100 80GB HBM3**" in md and "| cached+causal+compile@40 | 40 | 15,000 | 2,900-3,100 | 5.00 |" in md
    assert "the cached path overtakes stock from" in md


SAMPLE_TESTS = """
import os, signal, time
import pytest
import torch
def test_passes(record_property):
    record_property("measured", "0.5")
def test_slow_alone():
    open(os.environ["PID_FILE"], "w").write(str(os.getpid())) if "PID_FILE" in os.environ else None
    time.sleep(float(os.environ.get("SLOW_SECONDS", "0")))
@pytest.mark.parametrize("words", ["a b", "c"])
def test_fails(words):
    assert words != "a b", "boom"
class TestA:
    def test_same(self):
        pass
class TestB:
    def test_same(self):
        if "KILL_ALONE" in os.environ:
            os.kill(os.getpid(), signal.SIGKILL)
"""


def parallel_cmd(tmp_path, name, *alone, tests="test_sample.py", options=()):
    """scripts/pytest_parallel.py on tmp_path/<tests> (SAMPLE_TESTS by default); results in tmp_path/name/."""
    if tests == "test_sample.py":
        (tmp_path / tests).write_text(SAMPLE_TESTS)
    return [
        PYTHON,
        str(REPO / "scripts" / "pytest_parallel.py"),
        str(tmp_path / tests),
        *(x for text in alone for x in ("--alone", text)),
        "--junitxml",
        str(tmp_path / name / "tests.xml"),
        "--logs",
        str(tmp_path / name / "logs"),
        "--",
        "-p",
        "no:cacheprovider",
        "-o",
        "junit_family=xunit1",
        *options,
    ]


def parallel_env(tmp_path, **extra):
    return dict(os.environ, PYTHONPATH=str(REPO), TMPDIR=str(tmp_path), **extra)


def pytest_parallel(tmp_path, name, *alone, env=None, timeout=300, wrap=(), options=()):
    return subprocess.run(
        [*wrap, *parallel_cmd(tmp_path, name, *alone, options=options)],
        capture_output=True,
        text=True,
        env=parallel_env(tmp_path, **(env or {})),
        cwd=tmp_path,
        timeout=timeout,
    )


def outcomes(result):
    return [(c["name"], c["outcome"]) for c in result["cases"]]


def test_pytest_parallel_runs_alone_tests_apart_and_merges_their_results(tmp_path):
    """A real run to the end: the --alone tests in processes of their own, all in one junit xml in
    collection order (ids with spaces, one name in two classes), the measured properties kept, every
    process's -v output printed, the first failing exit status."""
    proc = pytest_parallel(tmp_path, "run", "slow", "TestB")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "6 tests in 3 processes at once; exit 1, 0, 0" in proc.stdout
    assert "test_sample.py::test_slow_alone PASSED" in proc.stdout and "test_fails[a b] FAILED" in proc.stdout
    assert sorted(os.listdir(tmp_path / "run")) == ["logs", "tests.xml"] and os.listdir(tmp_path / "run" / "logs") == []
    assert [p for p in os.listdir(tmp_path) if p.startswith("pytest_parallel.")] == []  # the --basetemp folders
    result = gpu_report_module().read_tests(str(tmp_path / "run" / "tests.xml"))
    assert outcomes(result) == [
        ("test_passes", "passed"),
        ("test_slow_alone", "passed"),
        ("test_fails[a b]", "failed"),
        ("test_fails[c]", "passed"),
        ("test_same", "passed"),
        ("test_same", "passed"),
    ]
    assert result["cases"][0]["properties"] == {"measured": "0.5"} and (result["passed"], result["failed"]) == (5, 1)
    root = ET.parse(tmp_path / "run" / "tests.xml").getroot()
    assert [c.get("classname") for c in root.iter("testcase")][-2:] == ["test_sample.TestA", "test_sample.TestB"]


def test_pytest_parallel_reports_a_killed_process_and_a_failed_collection_as_errors(tmp_path):
    """A process killed by a signal (no xml) is an error for each of its tests, never a pass; a
    collection that fails is one error; both exit 1."""
    killed = pytest_parallel(tmp_path, "killed", "TestB", env={"KILL_ALONE": "1"}, options=("-k", "not test_fails"))
    assert killed.returncode == 1 and "exit 0, -9" in killed.stdout, killed.stdout + killed.stderr
    result = gpu_report_module().read_tests(str(tmp_path / "killed" / "tests.xml"))
    assert outcomes(result) == [
        ("test_passes", "passed"),
        ("test_slow_alone", "passed"),
        ("test_same", "passed"),
        ("test_same", "error"),
    ]
    case = ET.parse(tmp_path / "killed" / "tests.xml").getroot().findall(".//testcase")[-1]
    assert case.find("error").get("message") == "its pytest process ended with -9 and wrote no result (signal 9)"

    (tmp_path / "test_broken.py").write_text("import no_such_module_here\n")
    broken = subprocess.run(
        parallel_cmd(tmp_path, "broken", tests="test_broken.py"),
        capture_output=True,
        text=True,
        env=parallel_env(tmp_path),
        cwd=tmp_path,
        timeout=120,
    )
    assert broken.returncode == 1 and "collecting" in broken.stdout and "no_such_module_here" in broken.stdout
    result = gpu_report_module().read_tests(str(tmp_path / "broken" / "tests.xml"))
    assert (result["passed"], result["failed"]) == (0, 1) and result["cases"][0]["name"] == "collection"


def test_pytest_parallel_stopped_at_its_budget_stops_its_processes_and_keeps_what_finished(tmp_path):
    """Stopped as gpu_check.sh's stage stops it (timeout: SIGTERM to the group), and by a SIGTERM to it
    alone: its pytest processes end too, and gpu_report reads what finished from the parts: the
    finished process's junit xml (its measured properties too), the others' -v logs."""
    stopped = pytest_parallel(tmp_path, "work", "slow", env={"SLOW_SECONDS": "120"}, wrap=("timeout", "-k", "5", "30"))
    assert stopped.returncode == 124, stopped.stdout + stopped.stderr
    work = tmp_path / "work"
    assert sorted(os.listdir(work)) == ["logs", "tests-1.xml"] and sorted(os.listdir(work / "logs")) == [
        "tests-1.log",
        "tests-2.log",
    ]
    tests = gpu_report_module().read_stopped_tests(str(work))
    assert (tests["passed"], tests["failed"], tests["stopped"]) == (4, 1, True)
    assert tests["cases"][0]["properties"] == {"measured": "0.5"}
    assert "test_slow_alone" not in [c["name"] for c in tests["cases"]]

    pid_file = tmp_path / "slow.pid"
    proc = subprocess.Popen(
        parallel_cmd(tmp_path, "alone", "slow"),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        env=parallel_env(tmp_path, SLOW_SECONDS="120", PID_FILE=str(pid_file)),
    )
    deadline = time.time() + 60
    while not pid_file.exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    pid = int(pid_file.read_text())
    for _ in range(50):  # the slow test's process: stopped with its parent
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"pytest process {pid} outlived pytest_parallel.py")


def test_bench_step_plan_runs_cases_at_one_batch_when_named_so():
    plan = script_module("bench_step").plan
    assert plan("naive@1024,plugin-emb+causal+compile@1024,plugin-emb@3072", "1024,3072") == [
        ("naive", 1024),
        ("plugin-emb+causal+compile", 1024),
        ("plugin-emb", 3072),
    ]
    assert plan("naive,plugin-emb@3072,plugin-img", "1024,3072") == [
        ("naive", 1024),
        ("plugin-img", 1024),
        ("naive", 3072),
        ("plugin-emb", 3072),
        ("plugin-img", 3072),
    ]
    assert plan("naive@1024,naive", "1024,3072") == [("naive", 1024), ("naive", 3072)]  # each pair once
    for bad, says in (
        ("naive@2048", "--steps-only 'naive@2048': the batch after @ must be one of --batch-sizes"),
        ("naive@", "--steps-only 'naive@'"),
        ("plugin-emb+fast@1024", "unknown case 'plugin-emb+fast'"),
    ):
        with pytest.raises(SystemExit, match=re.escape(says)):
            plan(bad, "1024,3072")


def test_bench_e2e_uses_shards_an_earlier_run_wrote_only_with_the_same_settings(tmp_path):
    bench_e2e = script_module("bench_e2e")
    args = bench_e2e.parse_args(
        ["--folder", str(tmp_path), "--samples", "8", "--per-shard", "4", "--workers", "1", "--text-lengths", "40,24"]
    )
    pattern, first = bench_e2e.plain_shards(args)
    assert "reused" not in first and pattern.endswith("t{longest}-{00000..00001}.tar")
    assert first["text_tokens"]["24"]["longest"] == 24 and first["text_tokens"]["40"]["longest"] == 40
    assert bench_e2e.plain_shards(args) == (pattern, dict(first, reused=True))
    args.samples = 12  # other settings: written again, the record of the old ones gone first
    (tmp_path / "plain" / "t40-00000.tar").write_bytes(b"")  # as a stopped writer could leave a shard
    pattern, again = bench_e2e.plain_shards(args)
    assert "reused" not in again and pattern.endswith("t{longest}-{00000..00002}.tar")
    assert os.path.getsize(tmp_path / "plain" / "t40-00000.tar") > 0
    assert json.loads((tmp_path / "plain" / "written.json").read_text())["samples"] == 12
    args.lengths = [40, 24, 77]  # another setting: written again
    assert "reused" not in bench_e2e.plain_shards(args)[1] and (tmp_path / "plain" / "t77-00002.tar").exists()


def test_bench_e2e_plan_runs_cases_at_their_text_lengths_and_embeds_once():
    plan = script_module("bench_e2e").plan
    assert plan("stock@40,embed,cached+causal,accum@40,embed,stock", [40, 24]) == [
        ("stock", 40),
        ("embed", None),
        ("cached+causal", 40),
        ("cached+causal", 24),
        ("accum", 40),
        ("stock", 24),
    ]
    for bad, says in (
        ("stock@32", "--cases 'stock@32': the setting after @ must be one of --text-lengths 40,24"),
        ("fast", "unknown case 'fast'"),
    ):
        with pytest.raises(SystemExit, match=re.escape(says)):
            plan(bad, [40, 24])


def test_bench_step_batches_hold_each_text_length_setting():
    """The setting reaches the text tower: the batch's texts span the setting's range, its longest text is the
    setting, the plugin's tower runs that many tokens and the naive step the full context."""
    import argparse

    bench_step = script_module("bench_step")
    open_clip.add_model_config(str(REPO / "paraclip_plugin" / "model_configs" / "paraclip-tiny-77.json"))
    model = open_clip.create_model("paraclip-tiny-77")
    args = argparse.Namespace(model="paraclip-tiny-77")
    for longest in (24, 40, 77):
        _, texts, _ = bench_step.make_batch(args, model, 64, torch.device("cpu"), longest)
        for kind, ran in (("naive", 77), ("plugin-emb", longest)):
            tokens = bench_step.text_tokens(argparse.Namespace(kind=kind, model=model), texts, longest)
            assert tokens == {
                "longest": longest,
                "range": [-(-longest // 2), longest],
                "batch_longest": longest,
                "batch_shortest": tokens["batch_shortest"],
                "tower_ran": ran,
            }
            assert -(-longest // 2) <= tokens["batch_shortest"] < longest
    with pytest.raises(SystemExit, match="--text-lengths 78 is longer than paraclip-tiny-77's context"):
        bench_step.make_batch(args, model, 4, torch.device("cpu"), 78)
