"""Per-sample WebDataset stages for four-field ParaCLIP shards.

They replace only the decode part of open_clip's WebDataset pipeline (through the
``wds_decode_stages`` hook): shard listing, resampling, node/worker splitting, shuffling, epochs and
``sizes.json`` stay open_clip's own. Output per sample: ``(image, texts)`` with ``texts`` the
tokenized caption, para1 and para2 as one [3, context] tensor, so open_clip's training loop moves
and batches it like its usual ``(image, text)`` pair. With ``--image-embeddings`` the image is the
stored embedding (``embeddings.py``) and image bytes are never decoded; with stored token ids
(``pretokenized.py``) the texts are not tokenized again.
"""
import collections
import logging
import os
import tarfile

import webdataset as wds
from open_clip_train.data import log_and_continue

from paraclip_plugin.embeddings import EMBEDDING_FIELD, CachedImageEmbedding, MissingEmbeddings
from paraclip_plugin.pretokenized import TextTokens
from paraclip_plugin.shards import CAPTION, IMAGE_EXTENSIONS, PARA1, PARA2

REQUIRED_TEXTS = (CAPTION, PARA1, PARA2)


def local_path(url):
    """The file behind a shard URL, or None for piped/remote shards."""
    if url.startswith("file:"):
        return url[len("file:"):]
    if "://" in url or url.startswith("pipe:"):
        return None
    return url


def shard_has_member(url, suffixes):
    """True or False for a local shard (by its member names alone), None when that can't be read."""
    path = local_path(url)
    if path is None or not os.path.isfile(path):
        return None
    try:
        with tarfile.open(path) as tar:
            return any(name.endswith(suffixes) for name in tar.getnames())
    except (tarfile.TarError, OSError):
        return None  # a corrupt tar is reported by the tar reader itself


class NotAParaCLIPShard(ValueError):
    pass


class SkipIncomplete:
    """Keep samples with an image and all three texts; skip and count the rest.

    Samples arrive shuffled across shards, so a shard can't be judged from the samples seen so far.
    When a sample lacks a paraphrase field, its shard's member names are read once (per worker) to
    tell "some samples lack paraphrases" (skip and count) from "this is not a ParaCLIP shard"
    (stop with an error that names the shard).
    """

    def __init__(self, log_first=10, log_every=1000, image_fields=IMAGE_EXTENSIONS):
        self.log_first, self.log_every = log_first, log_every
        # an image file, or with --image-embeddings the stored embedding instead
        self.image_fields = tuple(image_fields)
        self.skipped_samples = 0
        self.missing = collections.Counter()
        self.checked_shards = {}

    def missing_fields(self, sample):
        missing = [field for field in REQUIRED_TEXTS if field not in sample]
        if not any(field in sample for field in self.image_fields):
            missing.append("|".join(self.image_fields) if self.image_fields != IMAGE_EXTENSIONS
                           else "image (" + "|".join(IMAGE_EXTENSIONS) + ")")
        return missing

    def require_in_shard(self, url, suffixes, error):
        """Read the shard's member names once (per worker); raise ``error`` if no member ends with ``suffixes``."""
        if (url, suffixes) not in self.checked_shards:
            self.checked_shards[url, suffixes] = shard_has_member(url, suffixes)
            if self.checked_shards[url, suffixes] is False:
                raise error

    def __call__(self, samples):
        for sample in samples:
            missing = self.missing_fields(sample)
            if not missing:
                yield sample
                continue
            url = sample.get("__url__", "?")
            if PARA1 in missing or PARA2 in missing:
                self.require_in_shard(url, (f".{PARA1}", f".{PARA2}"), NotAParaCLIPShard(
                    f"shard {url} has no '{PARA1}' or '{PARA2}' member in any sample: it is not a ParaCLIP "
                    f"four-field shard (make one with scripts/make_shards.py), or drop --paraclip-loss"))
            if EMBEDDING_FIELD in self.image_fields and EMBEDDING_FIELD in missing:
                self.require_in_shard(url, (f".{EMBEDDING_FIELD}",), MissingEmbeddings(
                    f"shard {url} has no '{EMBEDDING_FIELD}' member in any sample: add image embeddings "
                    f"with scripts/embed_images.py, or drop --image-embeddings"))
            self.skipped_samples += 1
            self.missing.update(missing)
            if self.skipped_samples <= self.log_first or self.skipped_samples % self.log_every == 0:
                logging.warning(
                    f"ParaCLIP: skipped sample '{sample.get('__key__')}' of {url}: missing {', '.join(missing)} "
                    f"({self.skipped_samples} skipped so far in this data worker; "
                    f"missing fields: {dict(self.missing)})")


def paraclip_decode_stages(preprocess_img, tokenizer, embedding_sha256=None, embedding_label="", precision="fp32"):
    """Per-sample stages -> ``(image, texts)``; with ``embedding_sha256`` (``--image-embeddings``)
    ``image`` is the stored embedding checked against that fingerprint, and no image is decoded."""
    if embedding_sha256 is None:
        return [
            SkipIncomplete(),
            wds.decode("pilrgb", handler=log_and_continue),
            wds.map(TextTokens(tokenizer)),
            wds.rename(image=";".join(IMAGE_EXTENSIONS)),
            wds.map_dict(image=preprocess_img),
            wds.to_tuple("image", "texts"),
        ]
    return [
        SkipIncomplete(image_fields=(EMBEDDING_FIELD,)),
        wds.map(drop_images),
        # no image handler: text, json and npy members only
        wds.decode(handler=log_and_continue),
        wds.map(CachedImageEmbedding(embedding_sha256, embedding_label, precision)),
        wds.map(TextTokens(tokenizer)),
        wds.to_tuple("image", "texts"),
    ]


def drop_images(sample):
    """With cached embeddings the image bytes are never decoded; drop them before decoding."""
    for ext in IMAGE_EXTENSIONS:
        sample.pop(ext, None)
    return sample
