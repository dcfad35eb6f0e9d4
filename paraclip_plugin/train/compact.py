"""Compact training shards: only what ``--image-embeddings`` reads, two members per sample.

``paraclip-embed-images --compact --output DIR`` writes, per sample:

    <key>.pcl     b"PCL1", uint16 embedding size d, uint16 token columns n, float16[d] image embedding,
                  int32[3, n] token ids of caption, para1, para2 (all little-endian)
    <key>.json    the sample's metadata with the records training checks: the image weights the
                  embedding was made with (embeddings.py) and the tokenizer of the ids (pretokenized.py)

No image bytes and no texts: ~8x less to store and read than the four-field shard, and a loader
that parses 2 tar members and no ``.npy`` header per sample. The checks stay: other image weights,
another tokenizer (the texts are not there to tokenize again) and missing members are refused with
an error naming the shard. Keep the four-field shards: they are the source of truth, and the only
input from which other models' embeddings can be made.
"""

import struct

import numpy as np

from paraclip_plugin.train.embeddings import EMBEDDING_FIELD, MissingEmbeddings
from paraclip_plugin.train.pretokenized import TOKENS_FIELD

COMPACT_FIELD = "pcl"
MAGIC = b"PCL1"
HEADER = struct.Struct("<4sHH")


def pack(embedding, tokens):
    """One sample's ``.pcl`` member from its float16 embedding [d] and int32 token ids [3, n]."""
    embedding = np.asarray(embedding, dtype="<f2").reshape(-1)
    tokens = np.asarray(tokens, dtype="<i4")
    if tokens.ndim != 2 or tokens.shape[0] != 3:
        raise ValueError(f"token ids of shape {tokens.shape}, expected (3, n)")
    return HEADER.pack(MAGIC, embedding.shape[0], tokens.shape[1]) + embedding.tobytes() + tokens.tobytes()


def unpack(data):
    """(float16 [d], int32 [3, n]) from a ``.pcl`` member; ValueError when it is not one."""
    if len(data) < HEADER.size:
        raise ValueError(f"{len(data)} bytes, shorter than the header")
    magic, dim, columns = HEADER.unpack_from(data)
    if magic != MAGIC or len(data) != HEADER.size + 2 * dim + 12 * columns:
        raise ValueError(f"not a {MAGIC.decode()} member ({len(data)} bytes for d={dim}, n={columns})")
    embedding = np.frombuffer(data, dtype="<f2", count=dim, offset=HEADER.size).copy()  # writable, for torch
    tokens = np.frombuffer(data, dtype="<i4", count=3 * columns, offset=HEADER.size + 2 * dim).reshape(3, columns)
    return embedding, tokens


class MixedShards(MissingEmbeddings):
    pass


def mixed_shards_error(url, kind, first_shard, first_kind):
    """The error for a shard of another kind than the first shard of --train-data."""
    first = f"the first shard of --train-data ({first_shard})" if first_shard else "the first shard of --train-data"
    return MixedShards(
        f"shard {url} is a {kind} shard, but {first} is a {first_kind} one: compact and four-field shards can't be "
        f"mixed in one run (the kind is decided from the first shard); train on shards of one kind (with "
        f"--image-embeddings, compact ones from paraclip-embed-images --compact, four-field ones otherwise)"
    )


class RequireCompact:
    """Keep samples with a ``.pcl`` member and metadata; skip and count the rest, unless the shard has
    none at all (then it is not a compact shard: stop with an error naming it)."""

    def __init__(self, skipped, shard_has_member, first_shard=None):
        self.skipped, self.shard_has_member, self.first_shard = skipped, shard_has_member, first_shard
        self.checked = {}

    def __call__(self, samples):
        for sample in samples:
            if COMPACT_FIELD in sample and "json" in sample:
                yield sample
                continue
            url = sample.get("__url__", "?")
            if url not in self.checked:
                self.checked[url] = self.shard_has_member(url, (f".{COMPACT_FIELD}",))
            if self.checked[url] is False:
                raise mixed_shards_error(
                    url, f"four-field (no '.{COMPACT_FIELD}' member in any sample)", self.first_shard, "compact"
                )
            self.skipped.skip(sample, f"missing {COMPACT_FIELD} or json", f"missing {COMPACT_FIELD}/json")


class UnpackCompact:
    """``.pcl`` -> the fields the cached-embedding stages read (``img_emb.npy`` and ``tokens.npy``)."""

    def __init__(self, skipped):
        self.skipped = skipped

    def __call__(self, samples):
        for sample in samples:
            try:
                sample[EMBEDDING_FIELD], sample[TOKENS_FIELD] = unpack(sample.pop(COMPACT_FIELD))
            except ValueError as e:
                self.skipped.skip(sample, f"{COMPACT_FIELD}: {e}", f"{COMPACT_FIELD} not readable")
                continue
            yield sample
