"""A command that needs an optional extra says so first: one line naming the extra, exit 2, no work done.

The packages are made missing by tests/block_imports/sitecustomize.py, which makes their import fail
exactly as an uninstalled package's does (vLLM is really not installed on CPU machines).
"""

import pytest

from conftest import BIN, PYTHON, REPO, run

BLOCKER = REPO / "tests" / "block_imports"


def run_without(modules, cmd):
    return run(
        cmd,
        env_extra={"PYTHONPATH": str(BLOCKER), "PARACLIP_BLOCK_IMPORTS": ",".join(modules)},
        check=False,
        timeout=120,
    )


def assert_asks_for(proc, prog, extra, module):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{prog}: error: ")
    assert f"No module named '{module}'" in lines[0]
    assert lines[0].endswith(f"pip install 'paraclip-plugin[{extra}]'")


def test_blocker_makes_a_module_missing():
    proc = run_without(["sklearn"], [PYTHON, "-c", "import sklearn"])
    assert proc.returncode == 1 and "ModuleNotFoundError: No module named 'sklearn'" in proc.stderr


@pytest.mark.parametrize("module", ["sklearn", "clip_benchmark"])
def test_table1_without_eval_extra_fails_before_any_task(tmp_path, module):
    # valid inputs everywhere else: without the check, table1 would run four tasks and then die
    from eval_fixtures import write_data_root

    write_data_root(tmp_path / "data")
    out = tmp_path / "out"
    proc = run_without(
        [module],
        [BIN / "paraclip-eval", "table1", "--model", "RN50", "--data-root", tmp_path / "data", "--output", out],
    )
    assert_asks_for(proc, "paraclip-eval", "eval", module)
    assert "table1's zeroshot-imagenet and coco-retrieval" in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("task", ["zeroshot-imagenet", "coco-retrieval"])
def test_clip_benchmark_tasks_without_eval_extra(tmp_path, task):
    proc = run_without(["sklearn"], [BIN / "paraclip-eval", task, "--model", "RN50", "--root", tmp_path])
    assert_asks_for(proc, "paraclip-eval", "eval", "sklearn")


def test_table1_tasks_without_clip_benchmark_need_no_extra(tmp_path):
    # only the tasks that use clip_benchmark ask for it: here the missing data root is the first error
    proc = run_without(
        ["sklearn", "clip_benchmark"],
        [BIN / "paraclip-eval", "table1", "--model", "RN50", "--data-root", tmp_path / "none", "--tasks", "sts"],
    )
    assert proc.returncode == 2 and "extra" not in proc.stderr and str(tmp_path / "none") in proc.stderr


def test_make_shards_without_openai(tmp_path):
    (tmp_path / "captions.txt").write_text("a red circle\n")
    proc = run_without(
        ["openai"],
        [
            PYTHON,
            REPO / "scripts" / "make_shards.py",
            "--input",
            tmp_path / "captions.txt",
            "--output",
            tmp_path / "out",
            "--model",
            "gpt-4o-mini",
        ],
    )
    assert_asks_for(proc, "paraclip-make-shards", "openai", "openai")
    assert not (tmp_path / "out").exists()


def test_make_shards_vllm_backend_without_vllm(tmp_path):
    (tmp_path / "captions.txt").write_text("a red circle\n")
    proc = run_without(
        ["vllm"],
        [
            PYTHON,
            REPO / "scripts" / "make_shards.py",
            "--input",
            tmp_path / "captions.txt",
            "--output",
            tmp_path / "out",
            "--model",
            "/models/x",
            "--backend",
            "vllm",
        ],
    )
    assert_asks_for(proc, "paraclip-make-shards", "vllm", "vllm")
    assert not (tmp_path / "out").exists()


def test_demo_without_matplotlib(tmp_path):
    proc = run_without(["matplotlib"], [PYTHON, "-m", "paraclip_plugin.demo", "--output", tmp_path / "demo"])
    assert_asks_for(proc, "paraclip_plugin.demo", "plot", "matplotlib")
    assert not (tmp_path / "demo").exists()
