"""The sbatch recipe's open_clip flags parse with the patched parser and give the paper's settings."""
import re
import shlex

from conftest import REPO

SBATCH = REPO / "scripts" / "slurm" / "paraclip_vit_b32.sbatch"


def recipe_flags(data):
    """The recipe's open_clip flags with DATA a folder holding the 1,000 shard files it names (configure
    checks that local shards exist)."""
    for i in range(1000):
        (data / f"{i:05d}.tar").touch()
    text = SBATCH.read_text().replace("\\\n", " ")
    line = next(l for l in text.splitlines() if l.startswith("srun ") and "-m open_clip_train.main" in l)
    argv = shlex.split(line.split("-m open_clip_train.main", 1)[1])
    env = {"DATA": str(data), "LOGS": "./logs", "SLURM_JOB_ID": "1"}
    return [re.sub(r"\$\{?(\w+)\}?", lambda m: env[m.group(1)], a) for a in argv]


def test_sbatch_flags_parse_to_the_paper_recipe(patched_install, tmp_path):
    from open_clip_train.params import parse_args  # the installed, patched parser
    args = parse_args(recipe_flags(tmp_path))
    assert args.paraclip_loss and args.frozen_visual
    assert args.paraclip_terms == [("image", "para2"), ("caption", "para1"), ("para1", "para2")]
    assert (args.model, args.pretrained) == ("ViT-B-32", "openai")
    assert args.lr == 5e-7 and args.wd == 0.001 and args.epochs == 1 and args.lr_scheduler == "cosine"
    tasks = int(re.search(r"--ntasks-per-node=(\d+)", SBATCH.read_text()).group(1))
    nodes = int(re.search(r"--nodes=(\d+)", SBATCH.read_text()).group(1))
    assert args.batch_size * tasks * nodes == 3072
    assert args.train_data == f"{tmp_path}/{{00000..00999}}.tar" and args.dataset_type == "webdataset"


def test_logs_dir_alias_reaches_the_same_setting(patched_install):
    from open_clip_train.params import parse_args
    assert parse_args(["--logs-dir", "/x", "--model", "RN50"]).logs == "/x"


def test_sbatch_is_requeue_safe(patched_install, tmp_path):
    from open_clip_train.params import parse_args
    args = parse_args(recipe_flags(tmp_path))
    assert "#SBATCH --requeue" in SBATCH.read_text()
    # every attempt: the same run name, continuing from the newest epoch_latest.pt
    assert args.resume == "latest" and args.save_most_recent and args.name == "paraclip-vit-b32-1"
