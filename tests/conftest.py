"""Shared fixtures: real four-field WebDataset shards and the tiny open_clip model config."""

import importlib
import io
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from paraclip_plugin.data.layout import update_sizes_json
from paraclip_plugin.data.tars import atomic_tar_writer

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "paraclip_plugin" / "model_configs" / "paraclip-tiny.json"
TINY_MODEL = "paraclip-tiny"
PYTHON = sys.executable
BIN = Path(sys.executable).parent

WORDS = "red blue green small large circle square triangle left right above below near far bright dark".split()


def png_bytes(rng, size=32):
    color = tuple(rng.randrange(256) for _ in range(3))
    image = Image.new("RGB", (size, size), color)
    x, y = rng.randrange(size // 2), rng.randrange(size // 2)
    image.paste(tuple(255 - c for c in color), (x, y, x + size // 3, y + size // 3))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_shards(folder, num_shards=2, per_shard=16, seed=0, paraphrases=True, drop=None):
    """Four-field shards ``folder/{00000..}.tar`` + sizes.json; ``drop`` maps sample index -> field to omit."""
    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    sizes, index = {}, 0
    for s in range(num_shards):
        path = os.path.join(folder, f"{s:05d}.tar")
        with atomic_tar_writer(path) as sink:
            for _ in range(per_shard):
                words = rng.sample(WORDS, 5)
                sample = {"__key__": f"{index:08d}", "png": png_bytes(rng), "txt": " ".join(words)}
                if paraphrases:
                    sample["para1.txt"] = " ".join(reversed(words))
                    sample["para2.txt"] = " ".join(words[1:] + words[:1])
                if drop and index in drop:
                    sample.pop(drop[index])
                sink.write(sample)
                index += 1
        sizes[os.path.basename(path)] = per_shard
    update_sizes_json(folder, sizes)
    return os.path.join(folder, "{" + f"{0:05d}..{num_shards - 1:05d}" + "}.tar")


def script_module(name):
    """scripts/<name>.py as a module (scripts/ is not a package; its scripts import each other by name)."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "scripts"))


if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n N` (make test): the workers share the machine's cores, so each computes in-process with its share
    # (subprocesses keep their own settings: torchrun sets OMP_NUM_THREADS=1 per rank)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


def embed_tool_args(shards, pretrained, *extra, workers=0, batch_size=8):
    """paraclip-embed-images' flags for the tiny model over ``shards``, as argv strings (``batch_size`` None: the
    tool's default)."""
    args = ["--shards", shards, "--model", TINY_MODEL, "--model-config", TINY_CONFIG, "--pretrained", pretrained]
    args += ["--workers", workers] + ([] if batch_size is None else ["--batch-size", batch_size])
    return [str(a) for a in [*args, *extra]]


def pytest_collection_modifyitems(items):
    """Tests marked ``long`` (minutes each) first, the rest in their order: with ``pytest -n 2`` (make test)
    they start at once instead of running alone at the end while the other worker idles."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


@pytest.fixture
def shards(tmp_path):
    return write_shards(tmp_path / "shards")


# ---------------------------------------------------------------- running open_clip_train for real


def site_open_clip_train():
    from paraclip_plugin import patching

    return patching.installed_root()


@pytest.fixture(scope="session")
def patched_install():
    """The installed open_clip_train with the hooks applied (as `paraclip-patch apply` leaves it)."""
    from paraclip_plugin import patching

    root = site_open_clip_train()
    if shutil.which("patch") is None and (root / "open_clip_train" / "plugins.py").exists():
        return root  # patched without GNU patch (scripts/gpu_check.sh on a machine that lacks it)
    patching.apply(root, patching.patch_series(patching.installed_version()))
    return root


@pytest.fixture(scope="session")
def pristine_root(tmp_path_factory, patched_install):
    """A folder holding an unmodified open_clip_train 3.3.0, for PYTHONPATH: the installed one, reverted."""
    from paraclip_plugin import patching

    root = tmp_path_factory.mktemp("pristine")
    shutil.copytree(
        patched_install / "open_clip_train", root / "open_clip_train", ignore=shutil.ignore_patterns("__pycache__")
    )
    patching.revert(root, patching.patch_series(patching.installed_version()))
    assert not (root / "open_clip_train" / "plugins.py").exists()
    return root


def save_init_checkpoint(path, seed=0):
    """A random-init tiny model saved as a bare state dict, to start every compared run from."""
    import open_clip

    open_clip.add_model_config(str(TINY_CONFIG))
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_MODEL)
    torch.save(model.state_dict(), path)
    return path


def train_args(data, logs, name, init, *extra, batch_size=8, samples=None):
    args = [
        "--train-data",
        str(data),
        "--dataset-type",
        "webdataset",
        "--model",
        TINY_MODEL,
        "--model-config",
        str(TINY_CONFIG),
        "--pretrained",
        str(init),
        "--batch-size",
        str(batch_size),
        "--lr",
        "1e-3",
        "--wd",
        "0.001",
        "--warmup",
        "1",
        "--epochs",
        "1",
        "--workers",
        "1",
        "--device",
        "cpu",
        "--seed",
        "0",
        "--precision",
        "fp32",
        "--logs-dir",
        str(logs),
        "--name",
        name,
        "--log-every-n-steps",
        "1",
    ]
    if samples:
        args += ["--train-num-samples", str(samples)]
    return args + list(extra)


def run(cmd, env_extra=None, timeout=300, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(env_extra or {})
    # the plugin under test is this checkout's, whatever is installed (env_extra's PYTHONPATH goes first)
    env["PYTHONPATH"] = os.pathsep.join(p for p in ((env_extra or {}).get("PYTHONPATH"), str(REPO)) if p)
    proc = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def torchrun(module_args, nproc=2, **kw):
    return run([BIN / "torchrun", "--nproc_per_node", nproc, "--master_port", free_port(), "-m", *module_args], **kw)


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_log(logs, name):
    return (Path(logs) / name / "out.log").read_text()


LOSS_RE = re.compile(r"(\w+): ([-+0-9.e]+) \(")


def logged_losses(log):
    """Per logged step, {'Loss': ..., 'Image_para2_loss': ...} parsed from open_clip's 'Train Epoch' lines."""
    steps = []
    for line in log.splitlines():
        if "Train Epoch" in line:
            tail = line.split("Logit Scale:")[1]
            steps.append({k: float(v) for k, v in LOSS_RE.findall(tail)})
    return steps


def final_state(logs, name, epoch=1):
    ckpt = torch.load(Path(logs) / name / "checkpoints" / f"epoch_{epoch}.pt", map_location="cpu", weights_only=False)
    return {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}


def stock_open_clip_loads(checkpoint):
    """Load ``checkpoint`` with stock open_clip in a process that never imports the plugin; its class name."""
    code = (
        "import sys, open_clip, torch\n"
        f"open_clip.add_model_config({str(TINY_CONFIG)!r})\n"
        f"m, _, _ = open_clip.create_model_and_transforms({TINY_MODEL!r}, pretrained=sys.argv[1])\n"
        "sd = torch.load(sys.argv[1], weights_only=False)['state_dict']\n"
        "assert torch.equal(m.text_projection, sd['module.text_projection'])\n"
        "assert not any(n.startswith('paraclip') for n in sys.modules), 'plugin imported'\n"
        "print('loaded', type(m).__name__)\n"
    )
    out = run([PYTHON, "-c", code, checkpoint])
    return out.stdout.split("loaded ", 1)[1].strip()
