"""Shared fixtures: real four-field WebDataset shards and the tiny open_clip model config."""
import io
import os
import random
import sys
from pathlib import Path

import pytest
from PIL import Image

from paraclip_plugin.shards import atomic_tar_writer, update_sizes_json

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


@pytest.fixture
def shards(tmp_path):
    return write_shards(tmp_path / "shards")
