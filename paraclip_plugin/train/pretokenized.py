"""Pre-tokenized text: the token ids of caption, para1 and para2, stored once in the shards.

Tokenizing three texts per sample costs a data worker more than reading the sample. When
``paraclip-embed-images`` has stored them (the default; ``--no-tokens`` leaves them out; the tokenizer is
``--model``'s), each sample has:

    <key>.tokens.npy    int32 [3, n]: caption, para1, para2 as the tokenizer gives them, cut after
                        the last non-pad position of the three (n <= context length)
    <key>.json          gains "paraclip_tokens": {"tokenizer", "class", "context_length", "pad_id",
                        "fingerprint"}

The loader uses the stored ids only when the fingerprint equals the training tokenizer's (ids of
fixed probe texts at its context length: another vocabulary, another context or another
tokenizer class differs); otherwise it tokenizes the texts as usual. Either way a sample leaves
the loader as [3, context] ids; the model cuts each batch to its longest sequence on the device
(``trimming.py``), because the batching stage after these per-sample stages is open_clip's.
"""

import hashlib

import numpy as np
import torch

from paraclip_plugin.data.layout import TEXT_FIELDS
from paraclip_plugin.train.embeddings import BadSample, json_record

TOKENS_FIELD = "tokens.npy"
METADATA_KEY = "paraclip_tokens"

# probe texts for the fingerprint: plain words, punctuation, numbers, non-ASCII, a long run
PROBES = ["a photo of a cat.", "Two DOGS, 3 birds & one über-café!", "東京の夜景", "word " * 100]


def text_problem(field, data):
    """Why training skips a caption/paraphrase (not UTF-8, empty or white space only), or None."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return f"{field} is not UTF-8"
    return None if text.strip() else f"{field} is empty"


def texts_problem(sample):
    """The first reason training would skip the sample's three texts (a missing one, ``text_problem``), or None."""
    for field in TEXT_FIELDS:
        problem = f"missing {field}" if field not in sample else text_problem(field, sample[field])
        if problem:
            return problem
    return None


def tokenizer_vocab_size(tokenizer):
    """How many token ids the tokenizer has (open_clip's SimpleTokenizer, or the HF tokenizer it wraps), or None."""
    size = getattr(tokenizer, "vocab_size", None)
    if size is None and hasattr(tokenizer, "tokenizer"):
        try:
            size = len(tokenizer.tokenizer)
        except TypeError:
            return None
    return size


def tokenizer_pad_id(tokenizer):
    """The id the tokenizer pads with (the last position of an empty text)."""
    return int(tokenizer([""])[0, -1])


def tokenizer_fingerprint(tokenizer):
    ids = tokenizer(PROBES)
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    digest.update(str(tuple(ids.shape)).encode())
    digest.update(ids.numpy().astype(np.int64).tobytes())
    return digest.hexdigest()


def tokens_record(tokenizer_name, tokenizer):
    return {
        "tokenizer": tokenizer_name,
        "class": type(tokenizer).__name__,
        "context_length": int(tokenizer([""]).shape[1]),
        "pad_id": tokenizer_pad_id(tokenizer),
        "fingerprint": tokenizer_fingerprint(tokenizer),
    }


def stored_tokens(tokenizer, texts, pad_id):
    """The three texts' ids, cut after the last position any of them uses (int32 [3, n])."""
    ids = tokenizer(list(texts))
    used = (ids != pad_id).any(dim=0).nonzero()
    length = int(used.max()) + 1 if len(used) else 1
    return ids[:, :length].numpy().astype(np.int32)


class TokenizerMismatch(ValueError):
    pass


class TextTokens:
    """Decode stage: ``sample["texts"]`` = [3, context] ids of caption, para1, para2.

    From ``tokens.npy`` when its record matches this tokenizer, else by tokenizing the texts; with
    ``stored_only`` (compact shards, which hold no texts) a mismatch stops training instead. Stored ids
    that are not [3, n] integers with 1 <= n <= context and every id in the vocabulary raise ``BadSample``
    (skipped and counted: ``decode.SkipBadSamples``).
    """

    def __init__(self, tokenizer, stored_only=False):
        self.tokenizer = tokenizer
        self.stored_only = stored_only
        self.fingerprint = tokenizer_fingerprint(tokenizer)
        self.pad_id = tokenizer_pad_id(tokenizer)
        self.context_length = int(tokenizer([""]).shape[1])
        self.vocab_size = tokenizer_vocab_size(tokenizer)
        self.stored_used = self.tokenized = 0

    def matches(self, sample):
        record = json_record(sample, METADATA_KEY)
        return TOKENS_FIELD in sample and record is not None and record.get("fingerprint") == self.fingerprint

    def ids_problem(self, ids):
        """(why stored ids can't be used, which check: "dtype", "shape" or "ids"), or None when they can."""
        if not isinstance(ids, np.ndarray) or ids.dtype.kind not in "iu":
            return f"not integer ids ({getattr(ids, 'dtype', type(ids).__name__)})", "dtype"
        if ids.ndim != 2 or ids.shape[0] != len(TEXT_FIELDS) or not 1 <= ids.shape[1] <= self.context_length:
            return (
                f"shape {ids.shape}, expected ({len(TEXT_FIELDS)}, n) with 1 <= n <= the context "
                f"length {self.context_length}"
            ), "shape"
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or (self.vocab_size is not None and high >= self.vocab_size):
            return f"ids from {low} to {high}, outside the tokenizer's vocabulary [0, {self.vocab_size})", "ids"
        return None

    def stored(self, sample):
        ids = sample[TOKENS_FIELD]
        problem = self.ids_problem(ids)
        if problem is not None:
            raise BadSample(f"{TOKENS_FIELD} has {problem[0]}", f"{TOKENS_FIELD} bad {problem[1]}")
        texts = np.full((len(TEXT_FIELDS), self.context_length), self.pad_id, dtype=np.int64)
        texts[:, : ids.shape[1]] = ids
        return torch.from_numpy(texts)

    def __call__(self, sample):
        if self.matches(sample):
            sample["texts"] = self.stored(sample)
            self.stored_used += 1
        elif self.stored_only:
            record = json_record(sample, METADATA_KEY) or {}
            raise TokenizerMismatch(
                f"shard {sample.get('__url__', '?')}: sample '{sample.get('__key__')}' holds token ids of "
                f"tokenizer '{record.get('tokenizer')}' (context {record.get('context_length')}), not of this "
                f"run's tokenizer, and a compact shard has no texts to tokenize again: re-run "
                f"paraclip-embed-images --compact with this run's --model, or train on the four-field shards"
            )
        else:
            sample["texts"] = self.tokenizer([sample[field] for field in TEXT_FIELDS])
            self.tokenized += 1
        return sample
