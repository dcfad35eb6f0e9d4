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
import contextlib
import logging
import os
import tarfile

import torch
import webdataset as wds
from open_clip_train.data import expand_urls, get_dataset_size

from paraclip_plugin.train.compact import COMPACT_FIELD, MixedShards, RequireCompact, UnpackCompact, mixed_shards_error  # noqa: F401
from paraclip_plugin.train.embeddings import EMBEDDING_FIELD, BadSample, CachedImageEmbedding, MissingEmbeddings
from paraclip_plugin.train.pretokenized import TextTokens, text_problem, texts_problem  # noqa: F401 (text_problem: re-exported)
from paraclip_plugin.data.layout import IMAGE_EXTENSIONS, PARA1, PARA2, SIZES_FILE, TEXT_FIELDS, read_sizes_json


def local_path(url):
    """The file behind a shard URL, or None for piped/remote shards."""
    if url.startswith("file:"):
        return url[len("file:") :]
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


class NoUsableSamples(ValueError):
    pass


class SkippedSamples:
    """One data worker's count of the samples it left out, by reason, logged as they happen.

    Every stage that drops a sample goes through ``skip``, so one line says how many were dropped
    and why (the first ``log_first``, then every ``log_every``-th). ``keep`` counts the samples that
    get through. A worker that has skipped at least ``min_skipped`` samples, kept none, and reads a shard
    a second time stops with an error naming its shards: open_clip repeats a worker's shards until the
    epoch's batches are made, so shards that can't be checked before they are read (``pipe:``, s3, https)
    and hold no usable sample would otherwise be read forever. (Without resampling a shard comes round
    again only after the worker's whole list; one bad shard among good ones is skipped and counted, as
    before. ``min_skipped`` covers tiny shards, whose copies open_clip's shuffle buffer mixes.)
    """

    def __init__(self, log_first=10, log_every=1000, min_skipped=1000):
        self.log_first, self.log_every, self.min_skipped = log_first, log_every, min_skipped
        self.count = self.kept = 0
        self.reasons = collections.Counter()
        self.first_key = {}  # shard url -> the first key skipped from it, while nothing was kept

    def skip(self, sample, reason, kind=None):
        self.count += 1
        self.reasons[kind or reason] += 1
        url, key = sample.get("__url__", "?"), sample.get("__key__")
        if self.count <= self.log_first or self.count % self.log_every == 0:
            logging.warning(
                f"ParaCLIP: skipped sample '{key}' of {url}: {reason} "
                f"({self.count} skipped so far in this data worker; by reason: {dict(self.reasons)})"
            )
        if self.kept == 0:
            if url not in self.first_key:
                self.first_key[url] = key
            elif self.first_key[url] == key and self.count >= self.min_skipped:  # a shard read again
                shards = list(self.first_key)
                raise NoUsableSamples(
                    f"ParaCLIP: this data worker has read shard {url} again (open_clip repeats a worker's shards "
                    f"until the epoch is made) without one usable sample among {self.count} (by reason: "
                    f"{dict(self.reasons)}), from {', '.join(shards[:5])}{', ...' if len(shards) > 5 else ''}: "
                    f"these are not the shards the "
                    f"flags ask for (--paraclip-loss: four-field shards from paraclip-make-shards; "
                    f"--image-embeddings: shards from paraclip-embed-images)"
                )

    def keep(self, samples):
        """The last stage: count what gets through."""
        for sample in samples:
            if not self.kept:
                self.first_key.clear()
            self.kept += 1
            yield sample


class SkipIncomplete:
    """Keep samples with an image and all three texts; skip and count the rest.

    Samples arrive shuffled across shards, so a shard can't be judged from the samples seen so far.
    When a sample lacks a paraphrase field, its shard's member names are read once (per worker) to
    tell "some samples lack paraphrases" (skip and count) from "this is not a ParaCLIP shard"
    (stop with an error that names the shard).
    """

    def __init__(self, skipped, image_fields=IMAGE_EXTENSIONS, first_shard=None):
        self.skipped = skipped
        # an image file, or with --image-embeddings the stored embedding instead
        self.image_fields = tuple(image_fields)
        self.first_shard = first_shard
        self.checked_shards = {}

    def missing_fields(self, sample):
        missing = [field for field in TEXT_FIELDS if field not in sample]
        if not any(field in sample for field in self.image_fields):
            missing.append(
                "|".join(self.image_fields)
                if self.image_fields != IMAGE_EXTENSIONS
                else "image (" + "|".join(IMAGE_EXTENSIONS) + ")"
            )
        return missing

    def compact_shard_error(self, url):
        if EMBEDDING_FIELD not in self.image_fields:
            return MixedShards(
                f"shard {url} is a compact shard ('.{COMPACT_FIELD}' members, no images or texts): "
                f"train on compact shards with --image-embeddings"
            )
        return mixed_shards_error(url, f"compact ('.{COMPACT_FIELD}' members)", self.first_shard, "four-field")

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
            if COMPACT_FIELD in sample:
                raise self.compact_shard_error(url)
            if PARA1 in missing or PARA2 in missing:
                self.require_in_shard(
                    url,
                    (f".{PARA1}", f".{PARA2}"),
                    NotAParaCLIPShard(
                        f"shard {url} has no '{PARA1}' or '{PARA2}' member in any sample: it is not a ParaCLIP "
                        f"four-field shard (make one with paraclip-make-shards), or drop --paraclip-loss"
                    ),
                )
            if EMBEDDING_FIELD in self.image_fields and EMBEDDING_FIELD in missing:
                self.require_in_shard(
                    url,
                    (f".{EMBEDDING_FIELD}",),
                    MissingEmbeddings(
                        f"shard {url} has no '{EMBEDDING_FIELD}' member in any sample: add image embeddings "
                        f"with paraclip-embed-images, or drop --image-embeddings"
                    ),
                )
            self.skipped.skip(sample, f"missing {', '.join(missing)}", "missing " + "+".join(missing))


class SkipBadText:
    """Skip samples whose caption or paraphrase is not UTF-8, or is empty or only white space."""

    def __init__(self, skipped):
        self.skipped = skipped

    def __call__(self, samples):
        for sample in samples:
            problem = texts_problem(sample)  # the same test paraclip-embed-images applies
            if problem is None:
                yield sample
            else:
                self.skipped.skip(sample, problem)


class SkipBadSamples:
    """A per-sample stage (``fn(sample) -> sample``); a sample it finds unusable (``BadSample``: a json that is
    not an object, token ids of the wrong shape or out of the vocabulary) is skipped and counted."""

    def __init__(self, skipped, fn):
        self.skipped, self.fn = skipped, fn

    def __call__(self, samples):
        for sample in samples:
            try:
                sample = self.fn(sample)
            except BadSample as e:
                self.skipped.skip(sample, str(e), e.kind)
                continue
            yield sample


class DecodeOrSkip:
    """webdataset's decoder (``wds.decode``) per sample; a sample it can't decode (a truncated JPEG, a
    broken .npy) is skipped and counted under its own key, where ``wds.decode``'s handler sees only the error."""

    def __init__(self, skipped, *handlers):
        self.skipped = skipped
        self.decoder = wds.autodecode.Decoder(
            [wds.autodecode.imagehandler(h) if isinstance(h, str) else h for h in handlers]
        )

    def __call__(self, samples):
        for sample in samples:
            try:
                decoded = self.decoder(sample)
            except Exception as e:
                self.skipped.skip(sample, f"not decodable ({type(e).__name__}: {e})", "not decodable")
                continue
            yield decoded


class SkipBadEmbedding:
    """Skip samples whose stored image embedding is not a finite vector of the image tower's output size."""

    def __init__(self, skipped, dim=None):
        self.skipped, self.dim = skipped, dim

    def __call__(self, samples):
        for sample in samples:
            embedding = sample["image"]
            if embedding.ndim != 1 or (self.dim is not None and embedding.shape[0] != self.dim):
                self.skipped.skip(
                    sample,
                    f"{EMBEDDING_FIELD} has shape {tuple(embedding.shape)}, the image tower gives ({self.dim},)",
                    f"{EMBEDDING_FIELD} wrong size",
                )
            elif not torch.isfinite(embedding).all():
                self.skipped.skip(sample, f"{EMBEDDING_FIELD} is not finite (NaN or inf)")
            else:
                yield sample


def paraclip_decode_stages(preprocess_img, tokenizer, embeddings=None, first_shard=None):
    """Per-sample stages -> ``(image, texts)``; with ``embeddings`` (an ``EmbeddingExpectation``:
    ``--image-embeddings``) ``image`` is the stored embedding, checked against it (``CachedImageEmbedding``,
    ``SkipBadEmbedding``), and no image is decoded. Incomplete, undecodable and otherwise bad samples are
    skipped and counted (``SkippedSamples``). ``first_shard`` names the first shard of --train-data in the
    error for a compact shard among them."""
    skipped = SkippedSamples()
    if embeddings is None:
        return [
            SkipIncomplete(skipped, first_shard=first_shard),
            SkipBadText(skipped),
            DecodeOrSkip(skipped, "pilrgb"),
            SkipBadSamples(skipped, TextTokens(tokenizer)),
            wds.rename(image=";".join(IMAGE_EXTENSIONS)),
            wds.map_dict(image=preprocess_img),
            skipped.keep,
            wds.to_tuple("image", "texts"),
        ]
    return [
        SkipIncomplete(skipped, image_fields=(EMBEDDING_FIELD,), first_shard=first_shard),
        SkipBadText(skipped),
        wds.map(drop_images),
        # no image handler: text, json and npy members only
        DecodeOrSkip(skipped),
        SkipBadSamples(skipped, CachedImageEmbedding(embeddings)),
        SkipBadEmbedding(skipped, embeddings.dim),
        SkipBadSamples(skipped, TextTokens(tokenizer)),
        skipped.keep,
        wds.to_tuple("image", "texts"),
    ]


def compact_decode_stages(tokenizer, embeddings, first_shard=None):
    """``--image-embeddings`` on compact shards (``compact.py``): one ``.pcl`` member (embedding and
    token ids) and the json records per sample, checked against ``embeddings`` as in
    ``paraclip_decode_stages``. Their texts were checked when the shard was made (``paraclip-embed-images``
    leaves out samples training would skip)."""
    skipped = SkippedSamples()
    return [
        RequireCompact(skipped, shard_has_member, first_shard),
        DecodeOrSkip(skipped),  # the json; .pcl stays bytes
        UnpackCompact(skipped),
        SkipBadSamples(skipped, CachedImageEmbedding(embeddings)),
        SkipBadEmbedding(skipped, embeddings.dim),
        SkipBadSamples(skipped, TextTokens(tokenizer, stored_only=True)),
        skipped.keep,
        wds.to_tuple("image", "texts"),
    ]


def first_sample_fields(shards, samples=8):
    """The fields (member suffixes) of the first ``samples`` samples of the first shard of ``shards`` (a
    --train-data or --val-data value), read and grouped by webdataset's own opener and tar reader
    (lower-cased suffixes, ``__meta__`` skipped), so local, ``pipe:`` and remote shards alike; only those
    samples are read. None when the shard can't be read."""
    urls, _ = expand_urls(shards)
    if not urls:
        return None
    try:
        stream = wds.gopen(urls[0])
    except Exception:
        return None
    fields = set()
    try:
        files = ({**f, "__url__": urls[0]} for f in wds.tariterators.tar_file_iterator(stream))
        for _, sample in zip(range(samples), wds.tariterators.group_by_keys(files)):
            fields.update(key for key in sample if not key.startswith("__"))
    except Exception:
        return None
    finally:
        with contextlib.suppress(Exception):  # a pipe closed early exits by SIGPIPE
            stream.close()
    return fields or None


def is_compact(fields):
    """True when ``first_sample_fields`` found a compact sample (local or remote)."""
    return fields is not None and COMPACT_FIELD in fields


def own_folder_sizes(shards):
    """({shard url: sample count} from the sizes.json in each local shard's own folder, every shard url)."""
    urls, _ = expand_urls(shards)
    sizes, folders = {}, {}
    for url in urls:
        path = local_path(url)
        if path is None:
            continue
        folder, name = os.path.split(path)
        if folder not in folders:
            folders[folder] = read_sizes_json(folder)
        if name in folders[folder]:
            sizes[url] = int(folders[folder][name])
    return sizes, urls


class CheckShardSizes:
    """Count each shard's samples as they arrive; where the count disagrees with the shard's sizes.json
    entry (more samples than listed, or fewer once the worker has read all its shards), say so once."""

    def __init__(self, expected):
        self.expected = expected
        self.reported = set()

    def __call__(self, samples):
        seen = collections.Counter()
        finished = False
        try:
            for sample in samples:
                seen[sample.get("__url__")] += 1
                yield sample
            finished = True
        finally:
            for url, count in seen.items():
                listed = self.expected.get(url)
                if listed is None or url in self.reported or not (count > listed or finished and count != listed):
                    continue
                self.reported.add(url)
                logging.warning(
                    f"ParaCLIP: shard {url} has {count if finished else f'more than {listed}'} samples, but its "
                    f"{SIZES_FILE} says {listed}: {SIZES_FILE} is stale, so open_clip plans the epoch for another "
                    f"number of samples; rewrite {SIZES_FILE} or pass --train-num-samples"
                )


def shard_size_stages(args, is_train):
    """With the epoch planned from sizes.json (no --train-num-samples): warn now when open_clip's total
    (it reads the sizes.json of the first shard's folder for every shard) differs from the shards' own
    folders' sizes.json, and count samples per shard while reading (without --dataset-resampled)."""
    if not is_train or args.train_num_samples is not None:
        return []
    expected, urls = own_folder_sizes(args.train_data)
    try:
        open_clip_total, _ = get_dataset_size(args.train_data)
    except (KeyError, ValueError, OSError):
        open_clip_total = None
    if open_clip_total is not None and len(expected) == len(urls) and sum(expected.values()) != open_clip_total:
        logging.warning(
            f"ParaCLIP: open_clip plans each epoch for {open_clip_total} samples (it reads the {SIZES_FILE} of the "
            f"first shard's folder for every shard of --train-data), but the {SIZES_FILE} files of the shards' own "
            f"folders add up to {sum(expected.values())}: pass --train-num-samples {sum(expected.values())}"
        )
    return [] if args.dataset_resampled else [CheckShardSizes(expected)]


def drop_images(sample):
    """With cached embeddings the image bytes are never decoded; drop them before decoding."""
    for ext in IMAGE_EXTENSIONS:
        sample.pop(ext, None)
    return sample
