"""The sbatch recipes' defaults are the paper's settings and parse with the programs' own parsers.

The recipes run here under bash without a cluster: `srun` and `scontrol` are small scripts on PATH
that record the command line srun was given. The recipes under a real SLURM cluster are
tests/test_slurm_jobs.py (`make test-slurm`).
"""

import json
import os
import re
import subprocess

from conftest import BIN, REPO

SBATCH = REPO / "scripts" / "slurm" / "paraclip_vit_b32.sbatch"
SHARDS_SBATCH = REPO / "scripts" / "slurm" / "make_shards_vllm.sbatch"
SRUN = """#!/bin/sh
exec "$PYTHON_FOR_STUB" -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >> "$SRUN_LOG"
"""


def recipe_command(tmp_path, recipe=SBATCH, **env):
    """srun's command line and the variables the recipe exports (from its -x trace), run with ``env``."""
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    (stubs / "srun").write_text(SRUN)
    (stubs / "scontrol").write_text("#!/bin/sh\necho node001\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    log = tmp_path / "srun.jsonl"
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMP_", "MASTER_"))}
    environ.update(
        PATH=f"{stubs}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}",
        SRUN_LOG=str(log),
        PYTHON_FOR_STUB=str(BIN / "python"),
        SLURM_JOB_ID="4321",
        SLURM_JOB_NAME="paraclip-vit-b32",
        SLURM_JOB_NODELIST="node001",
        SLURM_CPUS_PER_TASK="12",
        **env,
    )
    done = subprocess.run(["bash", "-x", str(recipe)], env=environ, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    [argv] = [json.loads(line) for line in log.read_text().splitlines()]
    exported = dict(re.findall(r"^\+ export (\w+)=(\S*)$", done.stderr, flags=re.M))
    return argv, exported


def open_clip_args(argv, data):
    """open_clip_train's flags from srun's command line, with the default --train-data replaced by ``data``
    (a folder holding the 1,000 shard files it names: configure checks that local shards exist)."""
    for i in range(1000):
        (data / f"{i:05d}.tar").touch()
    args = argv[argv.index("open_clip_train.main") + 1 :]
    args[args.index("--train-data") + 1] = f"{data}/{{00000..00999}}.tar"
    return args


def test_sbatch_defaults_parse_to_the_paper_recipe(patched_install, tmp_path):
    from open_clip_train.params import parse_args  # the installed, patched parser

    argv, exported = recipe_command(tmp_path)
    assert argv[argv.index("--train-data") + 1] == "/data/para/{00000..00999}.tar"
    args = parse_args(open_clip_args(argv, tmp_path))
    assert args.paraclip_loss and args.frozen_visual
    assert args.paraclip_terms == [("image", "para2"), ("caption", "para1"), ("para1", "para2")]
    assert (args.model, args.pretrained) == ("ViT-B-32", "openai")
    assert args.lr == 5e-7 and args.wd == 0.001 and args.epochs == 1 and args.lr_scheduler == "cosine"
    assert args.precision == "amp" and args.workers == 8 and args.local_loss and args.gather_with_grad
    tasks = int(re.search(r"^#SBATCH --ntasks-per-node=(\d+)$", SBATCH.read_text(), flags=re.M).group(1))
    nodes = int(re.search(r"^#SBATCH --nodes=(\d+)$", SBATCH.read_text(), flags=re.M).group(1))
    assert args.batch_size * tasks * nodes == 3072
    assert args.dataset_type == "webdataset"
    # torch threads: the task's CPUs; the rendezvous port: from the job id (two jobs on a node differ)
    assert exported["OMP_NUM_THREADS"] == "12" and exported["MASTER_PORT"] == str(20000 + 4321 % 40000)


def test_settings_come_from_the_environment(patched_install, tmp_path):
    from open_clip_train.params import parse_args

    config = REPO / "paraclip_plugin" / "model_configs" / "paraclip-tiny.json"
    argv, exported = recipe_command(
        tmp_path,
        MODEL="paraclip-tiny",
        MODEL_CONFIG=str(config),
        PRETRAINED="/x.pt",
        BATCH="4",
        LR="1e-3",
        EPOCHS="3",
        PRECISION="fp32",
        WORKERS="1",
        LOGS="/l",
        RUN_NAME="mine",
        MASTER_PORT="23456",
        EXTRA_ARGS="--seed 7",
    )
    args = parse_args(open_clip_args(argv, tmp_path))
    assert (args.model, args.model_config, args.pretrained) == ("paraclip-tiny", [str(config)], "/x.pt")
    assert (args.batch_size, args.lr, args.epochs, args.precision, args.workers) == (4, 1e-3, 3, "fp32", 1)
    assert (args.logs, args.name, args.seed) == ("/l", "mine", 7)
    assert exported["MASTER_PORT"] == "23456"


def test_logs_dir_alias_reaches_the_same_setting(patched_install):
    from open_clip_train.params import parse_args

    assert parse_args(["--logs-dir", "/x", "--model", "RN50"]).logs == "/x"


def test_sbatch_is_requeue_and_resubmission_safe(patched_install, tmp_path):
    from open_clip_train.params import parse_args

    args = parse_args(open_clip_args(recipe_command(tmp_path)[0], tmp_path))
    assert "#SBATCH --requeue" in SBATCH.read_text() and "#SBATCH --open-mode=append" in SBATCH.read_text()
    # every attempt and every resubmission: the same run name (the job name, not the job id), continuing
    # from the newest epoch_latest.pt
    assert args.resume == "latest" and args.save_most_recent and args.name == "paraclip-vit-b32"


def shards_args(tmp_path, **env):
    """paraclip-make-shards' parsed arguments as the array recipe runs it as task ``SLURM_ARRAY_TASK_ID``."""
    from paraclip_plugin.paraphrase.cli import parse_args

    env = {"OUTPUT": str(tmp_path / "out"), **env}
    argv, _ = recipe_command(tmp_path, SHARDS_SBATCH, **env)
    assert argv[0] == "paraclip-make-shards"  # the installed console script: any submission folder works
    slurm = {k: v for k, v in env.items() if k.startswith("SLURM_")}
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("SLURM_")}
    os.environ.update(slurm)  # what srun's task sees
    try:
        return parse_args(argv[1:])
    finally:
        for k in slurm:
            del os.environ[k]
        os.environ.update(saved)


def array(low, high, task, count=None):
    return {
        "SLURM_ARRAY_TASK_MIN": str(low),
        "SLURM_ARRAY_TASK_MAX": str(high),
        "SLURM_ARRAY_TASK_ID": str(task),
        "SLURM_ARRAY_TASK_COUNT": str(count or high - low + 1),
    }


def test_array_recipe_takes_the_split_from_slurm(tmp_path):
    text = SHARDS_SBATCH.read_text()
    # Slurm opens --output before the script runs: no folder the script would have to create first
    (output,) = re.findall(r"^#SBATCH --output=(\S+)", text, re.M)
    assert "/" not in output and "#SBATCH --open-mode=append" in text and "#SBATCH --requeue" in text
    args = shards_args(tmp_path, **array(0, 2, 1))  # sbatch --array=0-2, no NUM_JOBS
    assert (args.num_jobs, args.job_index, args.backend, args.temperature, args.top_p) == (3, 1, "vllm", 1.0, 0.1)
    assert args.cache == str(tmp_path / "out" / "cache" / "cache-{job_index}.sqlite")


def test_array_recipe_resubmits_some_tasks_with_num_jobs(tmp_path):
    from paraclip_plugin.data.inputs import split_for_job

    # NUM_JOBS=32 sbatch --array=5,17: a resubmission of two tasks of 32
    args = shards_args(tmp_path, NUM_JOBS="32", **array(5, 17, 17, count=2))
    assert (args.num_jobs, args.job_index) == (32, 17)
    paths = [f"{i:05d}.tar" for i in range(100)]
    assert split_for_job(paths, args.num_jobs, args.job_index) == ["00017.tar", "00049.tar", "00081.tar"]


def test_array_recipe_openai_backend_from_the_environment(tmp_path):
    args = shards_args(
        tmp_path, BACKEND="openai", BASE_URL="http://127.0.0.1:9/v1", API_KEY_ENV="MY_KEY", MODEL="m", **array(0, 0, 0)
    )
    assert (args.backend, args.base_url, args.api_key_env, args.model) == (
        "openai",
        "http://127.0.0.1:9/v1",
        "MY_KEY",
        "m",
    )


def test_array_recipe_refuses_a_num_jobs_the_array_does_not_fit(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
        PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", OUTPUT=str(tmp_path / "out"), NUM_JOBS="2", **array(0, 2, 0)
    )
    done = subprocess.run(["bash", str(SHARDS_SBATCH)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith("error: NUM_JOBS=2 does not fit this array (task ids 0..2)")
    assert not (tmp_path / "out").exists()
