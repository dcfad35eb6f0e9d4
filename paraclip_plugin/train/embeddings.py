"""Cached image embeddings: the frozen image tower's features, stored once in the shards.

With a frozen image tower, every epoch recomputes the same image features from the same pixels
(up to augmentation). ``paraclip-embed-images`` computes them once and adds to each sample:

    <key>.img_emb.npy   float16 [embed_dim]: encode_image(preprocess_val(image), normalize=True)
    <key>.json          gains "paraclip_image_embedding": {"model", "pretrained", "visual_sha256",
                        "visual_sha256_by_precision", "visual_architecture", "preprocess", "precision"}

The record is per sample (not a side file per folder) so shards stay self-describing when they
are copied, merged or listed from other places. ``--image-embeddings`` in training reads the
embeddings instead of the image, checks every sample's record against the training model's image
weights, its image tower's architecture (``visual_architecture``) and image transform (``preprocess``),
and refuses others with an error naming the shard. Records made before those two fields existed are
read; a log line says what can't be checked.

The trade-off: the embedding is of one fixed view of the image (open_clip's validation transform:
resize + center crop), so training sees no image augmentation. ParaCLIP's recipe trains with the
image tower frozen and open_clip's default train transform for ViT-B-32 is only a random resized
crop with scale (0.9, 1.0); the loss of that crop jitter is the price of skipping decoding and the
visual forward.
"""

import hashlib
import io
import json
from dataclasses import dataclass

import numpy as np
import torch

EMBEDDING_FIELD = "img_emb.npy"
METADATA_KEY = "paraclip_image_embedding"


def visual_fingerprint(visual):
    """sha256 of the image tower's weights (state_dict in key order, as float32 bytes on the CPU).

    float32 so the same weights hash the same on any device. Weights that open_clip converted to
    bf16/fp16 (``--precision bf16|pure_bf16|fp16|pure_fp16``) hash as the rounded values they hold:
    ``precision_fingerprints`` gives what the same weights hash to under each of those precisions.
    """
    digest = hashlib.sha256()
    for name, tensor in visual.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


# open_clip_train precisions that store the weights themselves in a 16-bit type (the others keep
# float32 weights and only compute in lower precision under autocast)
LOW_PRECISION_WEIGHTS = ("bf16", "pure_bf16", "fp16", "pure_fp16")


def precision_fingerprints(model_name, pretrained):
    """{precision: visual_fingerprint} of the image tower as ``open_clip.create_model`` builds it in
    each of ``LOW_PRECISION_WEIGHTS`` (open_clip's own conversion and loading, on the CPU)."""
    import open_clip

    fingerprints = {}
    for precision in LOW_PRECISION_WEIGHTS:
        model = open_clip.create_model(model_name, pretrained=pretrained, precision=precision, device="cpu")
        fingerprints[precision] = visual_fingerprint(model.visual)
        del model
    return fingerprints


# patch dropout's module names: open_clip's own towers (``patch_dropout``) and timm's (``trunk.patch_drop``)
PATCH_DROPOUT = {"patch_dropout", "patch_drop"}


def visual_architecture(visual):
    """sha256 of the image tower's module structure: every submodule's name and class, so the same weights
    in another architecture (GELU vs QuickGELU: ``--force-quick-gelu``, ``ViT-B-32`` vs ``ViT-B-32-quickgelu``)
    hash differently. Settings (``extra_repr``) are left out: torch versions print them differently, and
    those that change an output's shape change the weights' fingerprint anyway. The tower's own class is left out (the frozen
    tower's is a subclass of it, ``model.py``), and so is patch dropout (train-time only, and a frozen
    tower runs in eval mode: ``--force-patch-dropout``). open_clip's ``LayerNormFp32`` counts as ``LayerNorm``: ``--precision bf16|fp16``
    build it to compute the same LayerNorm in float32 (a precision, not an architecture)."""
    lines = [
        f"{name}: {type(module).__name__.removesuffix('Fp32')}"
        for name, module in visual.named_modules()
        if name and not PATCH_DROPOUT & set(name.split("."))
    ]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def preprocess_config(visual):
    """The image transform open_clip set on the tower (``preprocess_cfg``: size, mean, std, interpolation,
    resize mode, ...) as its JSON form (tuples become lists), or None where the tower has none."""
    config = getattr(visual, "preprocess_cfg", None)
    return json.loads(json.dumps(config)) if config is not None else None


def embedding_record(
    model_name, pretrained, visual_sha256, by_precision=None, architecture=None, preprocess=None, precision=None
):
    record = {"model": model_name, "pretrained": pretrained, "visual_sha256": visual_sha256}
    if by_precision:
        record["visual_sha256_by_precision"] = dict(by_precision)
    for key, value in (("visual_architecture", architecture), ("preprocess", preprocess), ("precision", precision)):
        if value is not None:
            record[key] = value
    return record


def expected_fingerprint(record, precision):
    """The fingerprint in ``record`` that a training run in ``precision`` must match (None: not recorded)."""
    if precision in LOW_PRECISION_WEIGHTS:
        return (record.get("visual_sha256_by_precision") or {}).get(precision)
    return record.get("visual_sha256")


def encode_embedding(features):
    """One sample's features -> the bytes of its ``img_emb.npy`` member (float16)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(features, dtype=np.float16))
    return buf.getvalue()


class EmbeddingMismatch(ValueError):
    pass


class MissingEmbeddings(ValueError):
    pass


class BadSample(ValueError):
    """One sample's member is well-formed but unusable: the sample is skipped and counted under ``kind``
    (``decode.SkipBadSamples``), not a reason to stop training."""

    def __init__(self, message, kind=None):
        super().__init__(message)
        self.kind = kind


def json_record(sample, key):
    """The ``key`` object in the sample's decoded ``.json`` (None where there is none); BadSample where the
    json or the record is not a JSON object."""
    meta = sample.get("json")
    if meta is None:
        return None
    if not isinstance(meta, dict):
        raise BadSample(f"its json is a {type(meta).__name__}, not an object", "json not an object")
    record = meta.get(key)
    if record is not None and not isinstance(record, dict):
        raise BadSample(f"its json's '{key}' is a {type(record).__name__}, not an object", f"{key} not an object")
    return record


# preprocess_cfg key -> the open_clip_train flag that sets it
PREPROCESS_FLAGS = {
    "size": "--force-image-size",
    "mean": "--image-mean",
    "std": "--image-std",
    "interpolation": "--image-interpolation",
    "resize_mode": "--image-resize-mode",
}


@dataclass(frozen=True)
class EmbeddingExpectation:
    """What the cached image embeddings a run reads must match: its image tower's weights in its precision,
    architecture and image transform, and its output size. ``None`` for ``dim``, ``architecture`` or
    ``preprocess``: not checked. ``label`` names the run's tower in errors (``"('ViT-B-32', pretrained
    'openai') "``)."""

    visual_sha256: str  # visual_fingerprint of the run's image tower, in the run's precision
    label: str = ""
    dim: int | None = None
    precision: str = "fp32"  # the run's --precision: which of the record's fingerprints applies
    architecture: str | None = None  # visual_architecture
    preprocess: dict | None = None  # preprocess_config

    @classmethod
    def of_tower(cls, visual, label="", precision="fp32"):
        """The expectation for the image tower ``visual`` as it is now (its weights fingerprinted here)."""
        return cls(
            visual_sha256=visual_fingerprint(visual),
            label=label,
            dim=getattr(visual, "output_dim", None),
            precision=precision,
            architecture=visual_architecture(visual),
            preprocess=preprocess_config(visual),
        )


class CachedImageEmbedding:
    """Decode stage: ``sample["image"]`` = the stored embedding, after checking who made it.

    ``expected`` (an ``EmbeddingExpectation``) holds the training model's ``visual_fingerprint``, taken in
    the training precision; a sample made with other image weights (another model, another pretrained tag,
    a fine-tuned tower), another tower architecture or another image transform stops training, and so
    does a record that lacks one of them.
    """

    def __init__(self, expected):
        self.expected = expected

    def __call__(self, sample):
        url = sample.get("__url__", "?")
        record = json_record(sample, METADATA_KEY)
        if record is None:
            raise MissingEmbeddings(
                f"shard {url}: sample '{sample.get('__key__')}' has {EMBEDDING_FIELD} but no "
                f"'{METADATA_KEY}' record in its json; re-run paraclip-embed-images on it"
            )
        self.check_weights(url, record)
        self.check_architecture(url, record)
        self.check_preprocess(url, record)
        sample["image"] = torch.from_numpy(np.ascontiguousarray(sample[EMBEDDING_FIELD]))
        return sample

    def made_by(self, record):
        return f"model '{record.get('model')}' pretrained '{record.get('pretrained')}'"

    def check_weights(self, url, record):
        stored = expected_fingerprint(record, self.expected.precision)
        if stored is None:
            raise EmbeddingMismatch(
                f"shard {url}: its image embeddings record no fingerprint of the image weights in "
                f"--precision {self.expected.precision} (made by an older paraclip-embed-images): re-run "
                f"paraclip-embed-images on it, or train with --precision amp_bf16, amp or fp32"
            )
        if stored != self.expected.visual_sha256:
            raise EmbeddingMismatch(
                f"shard {url} holds image embeddings of {self.made_by(record)} (visual weights sha256 "
                f"{str(stored)[:12]} in --precision {self.expected.precision}), but this run's image tower "
                f"{self.expected.label}has sha256 {self.expected.visual_sha256[:12]}: re-embed with "
                f"paraclip-embed-images for this model, or drop --image-embeddings"
            )

    def require(self, url, record, field, what):
        """The record's ``field``; a record without it can't be checked against this run: an error."""
        if field not in record:
            raise EmbeddingMismatch(
                f"shard {url}: its image embeddings record no {what}, so they can't be checked against this "
                f"run's: re-run paraclip-embed-images on it"
            )
        return record[field]

    def check_architecture(self, url, record):
        if self.expected.architecture is None:
            return
        stored = self.require(url, record, "visual_architecture", "image tower architecture")
        if stored != self.expected.architecture:
            raise EmbeddingMismatch(
                f"shard {url} holds image embeddings of {self.made_by(record)} with image tower architecture "
                f"sha256 {str(stored)[:12]}, but this run's image tower {self.expected.label}has the same weights "
                f"in architecture sha256 {self.expected.architecture[:12]} (another activation such as QuickGELU "
                f"vs GELU: --force-quick-gelu or a '-quickgelu' model name, or other layer settings): train with "
                f"the model the embeddings were made with, or re-embed with paraclip-embed-images for this one"
            )

    def check_preprocess(self, url, record):
        if self.expected.preprocess is None:
            return
        stored = self.require(url, record, "preprocess", "image transform")
        if stored == self.expected.preprocess:  # every sample: the quick way
            return
        for key in sorted(set(stored) & set(self.expected.preprocess)):  # a key only one side has: unknown
            if stored.get(key) != self.expected.preprocess.get(key):
                flag = PREPROCESS_FLAGS.get(key, f"the image transform's '{key}'")
                raise EmbeddingMismatch(
                    f"shard {url} holds image embeddings made with image transform {key} "
                    f"{stored.get(key)!r}, but this run's {flag} gives {self.expected.preprocess.get(key)!r}: "
                    f"train with the transform the embeddings were made with (drop or change {flag}), or "
                    f"train from the images (without --image-embeddings)"
                )
