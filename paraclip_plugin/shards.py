"""The four-field shard layout, and writing shards so that nothing half-written is ever seen.

One sample in a ParaCLIP shard is one WebDataset key with these members:

    <key>.jpg|png|jpeg|webp   the image (open_clip's own extensions)
    <key>.txt                 the original caption            (T)
    <key>.para1.txt           the first paraphrase of T       (T')
    <key>.para2.txt           the paraphrase of T'            (T'')
    <key>.json                optional metadata

Stock open_clip reads such a shard as an ordinary image + ``txt`` shard and ignores the rest.
Shard writers (the paraphrase generator, the demo, the embedding script) all go through
``atomic_tar_writer`` and ``update_sizes_json`` so a crash or ``kill -9`` never leaves a partial
shard under its final name and ``sizes.json`` stays correct when several jobs write at once.
"""
import contextlib
import fcntl
import json
import os
import tempfile

IMAGE_EXTENSIONS = ("jpg", "png", "jpeg", "webp")
CAPTION = "txt"
PARA1 = "para1.txt"
PARA2 = "para2.txt"
METADATA = "json"
TEXT_FIELDS = (CAPTION, PARA1, PARA2)

SIZES_FILE = "sizes.json"


def partial_path(path):
    """Where a shard lives while it is being written; never matched by a ``*.tar`` glob."""
    return f"{path}.partial"


@contextlib.contextmanager
def atomic_file(path, mode="wb"):
    """Open ``path + ".partial"``; fsync and rename it to ``path`` on success, remove it on any error."""
    tmp = partial_path(path)
    stream = open(tmp, mode)
    try:
        yield stream
        stream.flush()
        os.fsync(stream.fileno())
        stream.close()
        os.replace(tmp, path)
    except BaseException:
        stream.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_tar_writer(path, **tar_writer_kwargs):
    """A ``webdataset.TarWriter`` whose file appears under ``path`` only once it is complete."""
    # imported here: webdataset imports torch, which the paraphrase generator's path must not
    import webdataset as wds

    with atomic_file(path) as stream, wds.TarWriter(stream, **tar_writer_kwargs) as sink:
        yield sink


def atomic_write_text(path, text):
    """Write a small text file by write-to-temp + rename; a unique temp name, so concurrent writers are safe."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def read_sizes_json(folder):
    path = os.path.join(folder, SIZES_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


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
