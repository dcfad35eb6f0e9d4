"""Torch-free reading and atomic writing of WebDataset tar shards, with the stdlib ``tarfile``.

``paraclip_plugin.shards`` holds the canonical layout but imports ``webdataset`` (and so torch) at
the top; the generator must not pay for that. The constants below mirror it.
TODO(shards.py): fold this module's writer and ``update_sizes_json`` into shards.py once the
webdataset import there is made lazy, and import the constants from there.
"""
import contextlib
import fcntl
import io
import json
import os
import re
import tarfile
import tempfile

# Mirrors paraclip_plugin/shards.py: one place to change if the layout changes.
IMAGE_EXTENSIONS = ("jpg", "png", "jpeg", "webp")
CAPTION = "txt"
PARA1 = "para1.txt"
PARA2 = "para2.txt"
METADATA = "json"
SIZES_FILE = "sizes.json"

# webdataset's own key/extension split: everything up to the first dot of the file name is the key.
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


class InputError(ValueError):
    """Bad input data; the message names the file (and line or member) at fault."""


def partial_path(path):
    """Where a shard lives while it is being written; never matched by a ``*.tar`` glob."""
    return f"{path}.partial"


def read_tar_samples(path):
    """Yield ``{"__key__": key, ext: bytes, ...}`` per sample, grouping consecutive members by key."""
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise InputError(f"{path}: cannot read as a tar shard ({e})") from e
    with tar:
        sample = None
        try:
            for member in tar:
                if not member.isfile():
                    continue
                match = _KEY_EXT.match(member.name)
                if match is None:
                    raise InputError(f"{path}: member {member.name!r} has no '<key>.<ext>' name")
                key, ext = match.group(1), match.group(2).lower()
                if sample is None or sample["__key__"] != key:
                    if sample is not None:
                        yield sample
                    sample = {"__key__": key, "__mtime__": int(member.mtime)}
                sample[ext] = tar.extractfile(member).read()
        except tarfile.TarError as e:
            raise InputError(f"{path}: truncated or corrupt tar shard ({e})") from e
        if sample is not None:
            yield sample


class TarSampleWriter:
    """Writes samples as webdataset's ``TarWriter`` lays them out: ``<key>.<ext>``, fields sorted."""

    def __init__(self, fileobj):
        self.tar = tarfile.open(fileobj=fileobj, mode="w|")
        self.count = 0

    def write(self, sample):
        key = sample["__key__"]
        # The input member's mtime, not "now", so a rerun writes byte-identical shards.
        mtime = sample.get("__mtime__", 0)
        for ext in sorted(k for k in sample if not k.startswith("__")):
            data = sample[ext]
            if isinstance(data, str):
                data = data.encode("utf-8")
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), mtime, 0o444
            info.uname = info.gname = "bigdata"
            self.tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self):
        self.tar.close()


@contextlib.contextmanager
def atomic_file(path, mode="wb"):
    """Open ``path + ".partial"``; fsync and rename to ``path`` on success, remove on any error."""
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
def atomic_tar_writer(path):
    """A ``TarSampleWriter`` whose file appears under ``path`` only once it is complete."""
    with atomic_file(path) as stream:
        sink = TarSampleWriter(stream)
        yield sink
        sink.close()


def count_tar_samples(path):
    return sum(1 for _ in read_tar_samples(path))


def atomic_write_text(path, text):
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
    """Merge ``{shard name: samples}`` into ``folder/sizes.json`` under an exclusive flock.

    TODO(shards.py): same contract as ``paraclip_plugin.shards.update_sizes_json``; call that one
    once importing shards.py no longer imports webdataset/torch.
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
