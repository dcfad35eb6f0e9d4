"""The four-field shard layout and its ``sizes.json``.

One sample in a ParaCLIP shard is one WebDataset key with these members:

    <key>.jpg|png|jpeg|webp   the image (open_clip's own extensions)
    <key>.txt                 the original caption            (T)
    <key>.para1.txt           the first paraphrase of T       (T')
    <key>.para2.txt           the paraphrase of T'            (T'')
    <key>.json                optional metadata

Stock open_clip reads such a shard as an ordinary image + ``txt`` shard and ignores the rest.
Shard writers (the paraphrase generator, the demo, the embedding tool) write through
``tars.atomic_tar_writer`` (or ``atomic.atomic_file``) and ``update_sizes_json``, so a crash or ``kill -9``
never leaves a partial shard under its final name and ``sizes.json`` stays correct when several jobs write
at once.
"""

import fcntl
import json
import os

from .atomic import atomic_write_text
from .errors import InputError

IMAGE_EXTENSIONS = ("jpg", "png", "jpeg", "webp")
CAPTION = "txt"
PARA1 = "para1.txt"
PARA2 = "para2.txt"
METADATA = "json"
TEXT_FIELDS = (CAPTION, PARA1, PARA2)

SIZES_FILE = "sizes.json"


def read_sizes_json(folder):
    path = os.path.join(folder, SIZES_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        try:
            sizes = json.load(f)
        except ValueError as e:
            raise InputError(
                f"{path}: not valid JSON ({e}); delete it and rerun the job that wrote the shards "
                f"(paraclip-make-shards and paraclip-embed-images rebuild it from them)"
            ) from None
    if not isinstance(sizes, dict):
        raise InputError(f"{path}: expected {{shard file name: sample count}}, found {type(sizes).__name__}")
    return sizes


def update_sizes_json(folder, shard_sizes):
    """Merge ``{shard file name: sample count}`` into ``folder/sizes.json`` (open_clip's size file).

    Several jobs may finish shards in the same folder at once, so the read-merge-write runs under an
    exclusive ``flock`` on a lock file next to it, and the new file replaces the old atomically.
    """
    path = os.path.join(folder, SIZES_FILE)
    with open(os.path.join(folder, f".{SIZES_FILE}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            sizes = read_sizes_json(folder)
            sizes.update({os.path.basename(k): int(v) for k, v in shard_sizes.items()})
            atomic_write_text(path, json.dumps(dict(sorted(sizes.items())), indent=1) + "\n")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return sizes
