"""WebDataset tar shards, read and written with the stdlib ``tarfile`` in webdataset's layout.

Everything that writes shards (the paraphrase generator, the embedding tool, the demo, the tests) uses
``atomic_tar_writer``; reading is ``read_tar_samples``. Neither imports webdataset, which imports torch
(the generator runs on machines and in jobs that need neither); webdataset reads what they write.
"""

import contextlib
import io
import re
import tarfile
import time
import zlib

from .atomic import atomic_file
from .errors import InputError

# webdataset's own key/extension split: everything up to the first dot of the file name is the key.
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def read_tar_samples(path):
    """Yield ``{"__key__": key, ext: bytes, ...}`` per sample, grouping consecutive members by key.

    A key met again after other keys, or one member twice in a sample, is an error naming the file and
    the key: webdataset would read such a shard (or one written from it) wrongly or not at all."""
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise InputError(f"{path}: cannot read as a tar shard ({e})") from e
    with tar:
        sample, seen = None, set()
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
                    if key in seen:
                        raise InputError(
                            f"{path}: sample key {key!r} occurs twice, apart (member {member.name!r}); "
                            "each key must be one run of consecutive members"
                        )
                    seen.add(key)
                    sample = {"__key__": key, "__mtime__": int(member.mtime)}
                elif ext in sample:
                    raise InputError(f"{path}: sample {key!r} has two {ext!r} members ({member.name!r} twice)")
                sample[ext] = tar.extractfile(member).read()
            ended = _ends_with_end_of_archive(tar)
        except (tarfile.TarError, EOFError, zlib.error) as e:
            raise InputError(f"{path}: truncated or corrupt tar shard ({type(e).__name__}: {e})") from e
        if not ended:
            # tarfile takes a header cut short for the end of the archive: the samples after it would be lost
            raise InputError(
                f"{path}: truncated tar shard: no end-of-archive block after its last member (byte {tar.offset})"
            )
        if sample is not None:
            yield sample


def _ends_with_end_of_archive(tar):
    """True when the archive goes on with a zero block where its members end (a tar's end marker)."""
    tar.fileobj.seek(tar.offset)
    return tar.fileobj.read(tarfile.BLOCKSIZE) == tarfile.NUL * tarfile.BLOCKSIZE


class TarSampleWriter:
    """Writes samples as webdataset's ``TarWriter`` does: ``<key>.<ext>`` members, fields sorted, read-only,
    owner ``bigdata``. A member's mtime is its sample's ``__mtime__`` (a shard read with ``read_tar_samples``
    keeps its members' times), else ``mtime``, else (None) the current time as webdataset writes it: a float,
    which gives every member an extra pax header, as in shards webdataset writes. Pass an integer ``mtime`` (or
    ``__mtime__``) for byte-identical reruns and no extra headers."""

    def __init__(self, fileobj, mtime=None):
        self.tar = tarfile.open(fileobj=fileobj, mode="w|")
        self.mtime = mtime
        self.count = 0

    def write(self, sample):
        key = sample["__key__"]
        mtime = sample.get("__mtime__", time.time() if self.mtime is None else self.mtime)
        for ext in sorted(k for k in sample if not k.startswith("__")):
            data = sample[ext]
            if isinstance(data, str):
                data = data.encode("utf-8")
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise TypeError(f"sample {key!r}: member {ext!r} is {type(data).__name__}, not bytes or str")
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), mtime, 0o444
            info.uname = info.gname = "bigdata"
            self.tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self):
        self.tar.close()


@contextlib.contextmanager
def atomic_tar_writer(path, mtime=None):
    """A ``TarSampleWriter`` (members' default ``mtime``) whose file appears under ``path`` only once it is
    complete (``atomic_file``: locked while written, renamed when done, removed on an error)."""
    with atomic_file(path) as stream:
        sink = TarSampleWriter(stream, mtime)
        yield sink
        sink.close()


def count_tar_samples(path):
    return sum(1 for _ in read_tar_samples(path))
