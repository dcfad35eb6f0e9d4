"""The repository's sbatch recipes, submitted to a real SLURM cluster (`make test-slurm`).

scripts/slurm_cluster.sh brings up slurmctld + slurmd (+ munged) on this host and sets SLURM_CONF;
these tests submit scripts/slurm/*.sbatch with `sbatch` from a folder outside the repository, as a
user with an activated environment does, and drive them with scontrol/scancel. What they change
from the recipes is in ``CPU_NODE`` below and nowhere else. Outside that harness they fail (they
are deselected from `make test` by the `slurm` marker).
"""

import json
import os
import re
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import (
    BIN,
    REPO,
    TINY_CONFIG,
    TINY_MODEL,
    free_port,
    logged_losses,
    read_log,
    save_init_checkpoint,
    stock_open_clip_loads,
    write_shards,
)
from test_paraphrase_support import read_tar, write_input_shards
from paraclip_plugin.testing.local_server import LocalChatServer

pytestmark = pytest.mark.slurm

TRAIN_RECIPE = REPO / "scripts" / "slurm" / "paraclip_vit_b32.sbatch"
SHARDS_RECIPE = REPO / "scripts" / "slurm" / "make_shards_vllm.sbatch"

# Everything the tests change from the recipes: what a 2-CPU node without GPUs forces (sbatch options
# given on its command line override the recipe's #SBATCH lines), and the tiny model and stand-in
# LLM server in place of ViT-B-32 and vLLM. Data and output folders are set per test, as every user sets them.
# Besides: sbatch runs with this venv's bin/ first on PATH (an activated environment), and a requeued job is
# made eligible at once (release_requeued) instead of after SLURM's 120 s.
CPU_NODE = {
    TRAIN_RECIPE: {
        "sbatch": ["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1"],
        "env": {
            "MODEL": TINY_MODEL,
            "MODEL_CONFIG": str(TINY_CONFIG),
            "BATCH": "4",
            "PRECISION": "fp32",
            "WORKERS": "1",
        },  # PRETRAINED: a random-init tiny checkpoint (per test)
    },
    SHARDS_RECIPE: {
        "sbatch": ["--gres=none", "--cpus-per-task=1", "--mem=1G"],
        "env": {"BACKEND": "openai", "MODEL": "local-paraphraser"},  # BASE_URL: the stand-in server (per test)
    },
}
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


@pytest.fixture(scope="session")
def cluster(patched_install):
    """The cluster scripts/slurm_cluster.sh started (and the hooks applied to the installed open_clip_train, as
    the training recipe checks); an error (never a skip) without one."""
    if not os.environ.get("SLURM_CONF") or shutil.which("sbatch") is None:
        pytest.fail("no SLURM cluster: run these tests with `make test-slurm` (scripts/slurm_cluster.sh)")
    state = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    assert state.returncode == 0 and state.stdout.split() == ["idle"], state


def submit(recipe, folder, *sbatch_args, env=None, wait=False):
    """``sbatch [CPU_NODE options] ARGS recipe`` from ``folder`` with the environment of an activated venv plus
    CPU_NODE's and ``env``'s variables; the job id (or, with ``wait``, the finished sbatch process)."""
    folder.mkdir(parents=True, exist_ok=True)
    environ = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "SBATCH_", "OMP_", "PYTHONPATH")) or k == "SLURM_CONF"
    }
    environ.update(
        {
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "VIRTUAL_ENV": str(BIN.parent),
            **CPU_NODE[recipe]["env"],
            **(env or {}),
        }
    )
    cmd = [
        "sbatch",
        "--parsable",
        *(["--wait"] if wait else []),
        *CPU_NODE[recipe]["sbatch"],
        *sbatch_args,
        str(recipe),
    ]
    done = subprocess.run(cmd, cwd=folder, env=environ, capture_output=True, text=True, timeout=600)
    if wait:
        return done
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip().split(";")[0])


def scontrol(*args):
    done = subprocess.run(["scontrol", *map(str, args)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"scontrol {args}: {done.stderr}"
    return done.stdout


def job_records(job):
    """One dict per job (per array task) of `scontrol show job -o`."""
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in scontrol("show", "job", "-o", job).splitlines() if line]


def wait_for(job, until, timeout=300, watch=None):
    """Poll the job's records until ``until(records)``; ``watch()`` runs at every poll. The records."""
    deadline = time.time() + timeout
    while True:
        records = job_records(job)
        if watch:
            watch()
        if until(records):
            return records
        assert time.time() < deadline, f"job {job} after {timeout} s: {records}"
        time.sleep(0.2)


def finished(records):
    return all(r["JobState"] in TERMINAL for r in records)


def wait_done(job, **kw):
    return wait_for(job, finished, **kw)


def release_requeued(job):
    """SLURM holds a requeued job for 120 s (EligibleTime); make it eligible now, as an admin may."""
    wait_for(job, lambda records: all(r["JobState"] == "PENDING" for r in records), timeout=60)
    scontrol("update", f"JobId={job}", "StartTime=now")


class RankEnvirons:
    """The environment of each running rank of a training job, read from /proc while the job runs."""

    def __init__(self, job):
        self.job, self.seen = str(job), {}

    def __call__(self):
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if b"open_clip_train.main" not in cmdline or not os.path.basename(cmdline[0]).startswith(b"python"):
                    continue  # not a rank (srun's own command line names the module too)
                environ = dict(
                    e.split("=", 1) for e in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in e
                )
            except OSError:
                continue  # gone meanwhile
            if environ.get("SLURM_JOB_ID") == self.job:
                self.seen[environ["SLURM_PROCID"]] = environ


# ---------------------------------------------------------------- training


def train_env(tmp_path, **extra):
    init = tmp_path / "init.pt"
    if not init.exists():
        save_init_checkpoint(init)
    return {"LOGS": str(tmp_path / "logs"), "PRETRAINED": str(init), **extra}


def checkpoint_state(path):
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return ckpt, {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}


RECORD = re.compile(
    r"^(?:(\d+): )?(?:\d{4}-\d\d-\d\d,\d\d:\d\d:\d\d \| (?:\w+) \| |(?:DEBUG|INFO|WARNING|ERROR|CRITICAL):[\w.]*:)(.*)$"
)


def repeated_log_records(text):
    """(rank, message) of log records printed more than once by one rank, in any format: open_clip's
    ('date | INFO | message') or Python's default handler's ('INFO:root:message')."""
    records = Counter(m.group(1, 2) for m in map(RECORD.match, text.splitlines()) if m)
    assert len(records) > 20, text[-3000:]  # the log holds the run's records at all
    return sorted(k for k, n in records.items() if n > 1)


def attempts(text):
    """The log of each attempt of a job (its --open-mode=append log): each starts with the traced srun line."""
    return re.split(r"^(?=\+ srun )", text, flags=re.M)[1:]


def started_epochs(text):
    return [int(e) for e in re.findall(r"^0: .*\| Start epoch (\d+)$", text, flags=re.M)]


def resumed_epoch(text):
    found = re.findall(r"^0: .*\| => resuming checkpoint '(.*)' \(epoch (\d+)\)$", text, flags=re.M)
    assert len(found) == 1, text[-3000:]
    path, epoch = found[0]
    assert path.endswith("/epoch_latest.pt")
    return int(epoch)


def test_two_ranks_train_the_paraclip_loss_and_save_checkpoints_stock_open_clip_loads(cluster, tmp_path):
    data = write_shards(tmp_path / "data", num_shards=2, per_shard=16)
    env = train_env(tmp_path, TRAIN_DATA=data, EPOCHS="2")
    submit_dir = tmp_path / "elsewhere"
    job = submit(TRAIN_RECIPE, submit_dir, env=env)
    ranks = RankEnvirons(job)
    [record] = wait_done(job, watch=ranks)
    log = (submit_dir / f"paraclip-vit-b32_{job}.out").read_text()
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]

    for rank in (0, 1):  # SLURM's ranks reach open_clip_train
        assert (
            f"{rank}: " in log
            and f"Running in distributed mode with multiple processes. Device: cpu."
            f"Process (global: {rank}, local {rank}), total 2."
            in log
        ), log[-4000:]
    # each rank's torch threads are the CPUs of its task; one port per job (none fixed)
    assert sorted(ranks.seen) == ["0", "1"]
    for environ in ranks.seen.values():
        assert environ["OMP_NUM_THREADS"] == environ["SLURM_CPUS_PER_TASK"] == "1"
        assert environ["MASTER_PORT"] == str(20000 + job % 40000)

    # the default run name is the job name (stable across resubmissions), not the job id
    run = tmp_path / "logs" / "paraclip-vit-b32"
    params = dict(line.split(": ", 1) for line in (run / "params.txt").read_text().splitlines() if ": " in line)
    assert params["local_loss"] == params["gather_with_grad"] == params["paraclip_loss"] == "True"
    assert params["report_to"] == "tensorboard" and list((run / "tensorboard").rglob("events.out.tfevents.*"))
    steps = logged_losses(read_log(tmp_path / "logs", "paraclip-vit-b32"))
    assert steps and all({"Image_para2_loss", "Caption_para1_loss", "Para1_para2_loss"} <= set(s) for s in steps)
    assert all(torch.isfinite(torch.tensor(s["Loss"])) for s in steps)

    assert {p.name for p in (run / "checkpoints").iterdir()} == {"epoch_1.pt", "epoch_2.pt", "epoch_latest.pt"}
    ckpt, final = checkpoint_state(run / "checkpoints" / "epoch_2.pt")
    assert ckpt["epoch"] == 2
    init = torch.load(env["PRETRAINED"], map_location="cpu")
    assert all(torch.equal(final[k], v) for k, v in init.items() if k.startswith("visual."))  # frozen: bit-identical
    assert not torch.equal(final["text_projection"], init["text_projection"])  # the text tower trained
    assert stock_open_clip_loads(run / "checkpoints" / "epoch_2.pt") == "CLIP"

    # every log record once per rank (no second copy through Python's default root handler)
    assert repeated_log_records(log) == []
    assert "INFO:root:" not in log and "WARNING:root:" not in log


def run_until_first_latest_checkpoint(tmp_path, env, submit_dir):
    """Submit a 3-epoch run; the job id once epoch_latest.pt exists (the job still running), whatever the run's
    name (the tests check the name on their own)."""
    job = submit(TRAIN_RECIPE, submit_dir, env=env)
    [record] = wait_for(
        job, lambda records: any((tmp_path / "logs").glob("*/checkpoints/epoch_latest.pt")) or finished(records)
    )
    assert record["JobState"] == "RUNNING", f"job {job} ended before its first checkpoint: {record}"
    return job


def test_requeued_job_resumes_from_epoch_latest_and_keeps_both_attempts_in_its_log(cluster, tmp_path):
    data = write_shards(tmp_path / "data", num_shards=4, per_shard=32)
    env = train_env(tmp_path, TRAIN_DATA=data, EPOCHS="3")
    submit_dir = tmp_path / "submit"
    job = run_until_first_latest_checkpoint(tmp_path, env, submit_dir)
    scontrol("requeue", job)
    release_requeued(job)
    [record] = wait_done(job)
    log = (submit_dir / f"paraclip-vit-b32_{job}.out").read_text()
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-4000:]

    first, second = attempts(log)  # both attempts' output, in one log
    assert "DUE TO JOB REQUEUE" in first and started_epochs(first)[0] == 0
    resumed = resumed_epoch(second)
    assert resumed >= 1 and started_epochs(second) == list(range(resumed, 3))  # only the remaining epochs
    run = tmp_path / "logs" / "paraclip-vit-b32" / "checkpoints"
    ckpt, final = checkpoint_state(run / "epoch_3.pt")
    init = torch.load(env["PRETRAINED"], map_location="cpu")
    assert ckpt["epoch"] == 3 and all(torch.equal(final[k], v) for k, v in init.items() if k.startswith("visual."))


def test_resubmitted_job_continues_the_same_run(cluster, tmp_path):
    data = write_shards(tmp_path / "data", num_shards=4, per_shard=32)
    env = train_env(tmp_path, TRAIN_DATA=data, EPOCHS="3")
    submit_dir = tmp_path / "submit"
    first = run_until_first_latest_checkpoint(tmp_path, env, submit_dir)
    subprocess.run(["scancel", str(first)], check=True, timeout=60)  # a time limit, scancel, a lost node
    assert wait_done(first)[0]["JobState"] == "CANCELLED"

    port = free_port()  # the user's MASTER_PORT wins over the job id's
    second = submit(TRAIN_RECIPE, submit_dir, env={**env, "MASTER_PORT": str(port)})
    ranks = RankEnvirons(second)
    [record] = wait_done(second, watch=ranks)
    log = (submit_dir / f"paraclip-vit-b32_{second}.out").read_text()
    assert second != first and (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]
    resumed = resumed_epoch(log)
    assert resumed >= 1 and started_epochs(log) == list(range(resumed, 3))
    assert {e["MASTER_PORT"] for e in ranks.seen.values()} == {str(port)}
    assert (tmp_path / "logs" / "paraclip-vit-b32" / "checkpoints" / "epoch_3.pt").exists()


# ---------------------------------------------------------------- paraphrase generation (array)


@pytest.fixture
def llm():
    with LocalChatServer(latency=0.002) as server:
        yield server


def shards_env(llm, tmp_path, pattern, out, **extra):
    return {"INPUT": pattern, "OUTPUT": str(out), "BASE_URL": llm.base_url, **extra}


def files(folder):
    """{relative path: (bytes, mtime_ns)} of every file under ``folder``."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def stats_of(out):
    return [json.loads(p.read_text()) for p in sorted((out / "stats").glob("*.json"))]


def test_array_splits_skips_finished_work_and_rebuilds_a_deleted_shard_from_the_cache(cluster, llm, tmp_path):
    pattern = write_input_shards(tmp_path / "in", num_shards=6, per_shard=8)
    out, submit_dir = tmp_path / "out", tmp_path / "submit"
    env = shards_env(llm, tmp_path, pattern, out)
    done = submit(SHARDS_RECIPE, submit_dir, "--array=0-2", env=env, wait=True)  # no NUM_JOBS: 3 from SLURM
    assert done.returncode == 0, done.stderr
    job = int(done.stdout.strip())
    logs = sorted(submit_dir.glob(f"paraclip-shards-{job}_*.out"))
    assert [p.name for p in logs] == [f"paraclip-shards-{job}_{i}.out" for i in range(3)]
    names = [f"{i:05d}.tar" for i in range(6)]
    assert json.loads((out / "sizes.json").read_text()).keys() == set(names)  # every input, not 3 of 32 slices
    assert sorted(p.name for p in (out / "cache").iterdir()) == [f"cache-{i}.sqlite" for i in range(3)]
    stats = stats_of(out)
    assert sorted((s["num_jobs"], s["job_index"], s["shards_written"]) for s in stats) == [(3, i, 2) for i in range(3)]
    assert sum(s["requests"] for s in stats) == llm.requests > 0
    before, requests = files(out), llm.requests

    again = submit(SHARDS_RECIPE, tmp_path / "submit2", "--array=0-2", env=env, wait=True)
    assert again.returncode == 0, again.stderr
    after = files(out)
    new = set(after) - set(before)
    assert {k: after[k] for k in before} == before  # nothing rewritten (bytes and mtimes)...
    assert len(new) == 3 and all(n.startswith("stats/") for n in new)  # ...only this run's stats
    assert llm.requests == requests and all(s["requests"] == 0 for s in stats_of(out) if s not in stats)

    (out / "00004.tar").unlink()  # slice 1 of 3 holds inputs 1 and 4
    one = submit(SHARDS_RECIPE, tmp_path / "submit3", "--array=1", env={**env, "NUM_JOBS": "3"}, wait=True)
    assert one.returncode == 0, one.stderr
    assert (out / "00004.tar").read_bytes() == before["00004.tar"][0]  # byte for byte, from the cache
    assert llm.requests == requests


def test_array_refuses_a_num_jobs_that_does_not_fit_it(cluster, llm, tmp_path):
    pattern = write_input_shards(tmp_path / "in", num_shards=4, per_shard=4)
    out, submit_dir = tmp_path / "out", tmp_path / "submit"
    done = submit(
        SHARDS_RECIPE, submit_dir, "--array=0-2", env=shards_env(llm, tmp_path, pattern, out, NUM_JOBS="2"), wait=True
    )
    assert done.returncode != 0
    job = int(done.stdout.strip())
    for i in range(3):
        text = (submit_dir / f"paraclip-shards-{job}_{i}.out").read_text()
        assert text.splitlines() == [
            "error: NUM_JOBS=2 does not fit this array (task ids 0..2): task I takes slice I "
            "of NUM_JOBS; leave NUM_JOBS unset for a whole --array=0-(N-1), or give the first "
            "submission's N"
        ]
    assert llm.requests == 0 and not out.exists()


def test_array_recipe_default_backend_without_vllm_names_the_extra_and_writes_nothing(cluster, llm, tmp_path):
    pattern = write_input_shards(tmp_path / "in", num_shards=2, per_shard=4)
    out, submit_dir = tmp_path / "out", tmp_path / "submit"
    env = shards_env(llm, tmp_path, pattern, out, BACKEND="vllm")  # the recipe's default; vllm is not installed here
    done = submit(SHARDS_RECIPE, submit_dir, "--array=0-0", env=env, wait=True)
    assert done.returncode != 0
    text = (submit_dir / f"paraclip-shards-{int(done.stdout.strip())}_0.out").read_text()
    errors = [line for line in text.splitlines() if line.startswith("paraclip-make-shards: error:")]
    assert (
        len(errors) == 1
        and "needs the 'vllm' extra" in errors[0]
        and "pip install 'paraclip-plugin[vllm]'" in errors[0]
    )
    assert llm.requests == 0 and not list(out.rglob("*.tar")) and not (out / "sizes.json").exists()


def test_array_task_requeued_mid_run_ends_identical_to_an_uninterrupted_run(cluster, llm, tmp_path):
    pattern = write_input_shards(tmp_path / "in", num_shards=8, per_shard=8)
    reference = tmp_path / "reference"
    done = submit(
        SHARDS_RECIPE,
        tmp_path / "submit-ref",
        "--array=0-1",
        env=shards_env(llm, tmp_path, pattern, reference),
        wait=True,
    )
    assert done.returncode == 0, done.stderr

    llm.latency = 0.4  # a task takes seconds, so the requeue lands mid-run
    out, submit_dir = tmp_path / "out", tmp_path / "submit"
    job = submit(SHARDS_RECIPE, submit_dir, "--array=0-1", env=shards_env(llm, tmp_path, pattern, out))
    wait_for(job, lambda records: (out / "00000.tar").exists() or finished(records), timeout=120)
    scontrol("requeue", f"{job}_0")
    assert not (out / "00006.tar").exists()  # task 0 had inputs 0, 2, 4, 6 left to do
    release_requeued(f"{job}_0")
    llm.latency = 0.002
    records = wait_done(job)
    assert all((r["JobState"], r["ExitCode"]) == ("COMPLETED", "0:0") for r in records), records
    assert {r["ArrayTaskId"]: r["Restarts"] for r in records} == {"0": "1", "1": "0"}

    tars = sorted(p.name for p in reference.glob("*.tar"))
    assert len(tars) == 8 and sorted(p.name for p in out.glob("*.tar")) == tars
    assert all(read_tar(out / n) == read_tar(reference / n) for n in tars)
    assert json.loads((out / "sizes.json").read_text()) == json.loads((reference / "sizes.json").read_text())
    assert not list(out.rglob("*.partial"))
    log = (submit_dir / f"paraclip-shards-{job}_0.out").read_text()  # both attempts in the log
    assert "error: stopped by SIGTERM" in log and "samples written" in log, log
