"""Shared helpers for the paraphrase-generation tests: img2dataset-style input shards and a server.

(Named test_paraphrase_* so it sits with the tests it serves; it defines no tests itself.)
"""

import io
import json
import random
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from paraclip_plugin.testing.local_server import LocalChatServer

REPO = Path(__file__).resolve().parents[1]
MAKE_SHARDS = REPO / "scripts" / "make_shards.py"
PYTHON = sys.executable
WORDS = (
    "red blue green small large dog cat bird car tree house river mountain beach city night "
    "old new wooden bright dark painting photo of a with"
).split()


def jpeg_bytes(rng, size=16):
    image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    image.save(buf, format="JPEG")
    return buf.getvalue()


def make_captions(rng, n, short_every=7, long_every=11, duplicate_every=5):
    """Captions with every kind the pipeline must handle: too short, too long, duplicated."""
    captions = []
    for i in range(n):
        if i % short_every == 3:
            captions.append(rng.choice(WORDS))
        elif i % long_every == 4:
            captions.append(" ".join(rng.choice(WORDS) for _ in range(20)))
        elif i % duplicate_every == 2 and captions:
            captions.append(captions[-1])
        else:
            captions.append(" ".join(rng.sample(WORDS, rng.randint(3, 9))))
    return captions


def write_input_shards(folder, num_shards=3, per_shard=12, seed=0, with_json=True):
    """img2dataset layout: ``<key>.jpg``, ``<key>.txt``, ``<key>.json`` per sample. Returns the pattern."""
    rng = random.Random(seed)
    folder = Path(folder)
    index = 0
    for s in range(num_shards):
        samples = []
        for caption in make_captions(rng, per_shard):
            key = f"{s:05d}{index:04d}"
            members = {"jpg": jpeg_bytes(rng), "txt": caption.encode()}
            if with_json:
                members["json"] = json.dumps({"key": key, "url": f"http://x/{index}.jpg"}).encode()
            samples.append((key, members))
            index += 1
        write_samples(folder / f"{s:05d}.tar", samples)
    return str(folder / ("{" + f"00000..{num_shards - 1:05d}" + "}.tar"))


def write_samples(path, samples):
    """A tar of ``[(key, {ext: bytes})]``, members in that order (a key given twice is written twice). Returns it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def read_tar(path):
    """``[(member name, bytes)]`` in tar order: what "byte-identical content" compares."""
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def samples_of(path):
    samples = {}
    for name, data in read_tar(path):
        key, ext = name.split(".", 1)
        samples.setdefault(key, {})[ext] = data
    return samples


@pytest.fixture
def server():
    with LocalChatServer(latency=0.002) as srv:
        yield srv
