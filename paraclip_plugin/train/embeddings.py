"""Cached image embeddings: the frozen image tower's features, stored once in the shards.

With a frozen image tower, every epoch recomputes the same image features from the same pixels
(up to augmentation). ``scripts/embed_images.py`` computes them once and adds to each sample:

    <key>.img_emb.npy   float16 [embed_dim]: encode_image(preprocess_val(image), normalize=True)
    <key>.json          gains "paraclip_image_embedding": {"model", "pretrained", "visual_sha256",
                        "visual_sha256_by_precision"}

The record is per sample (not a side file per folder) so shards stay self-describing when they
are copied, merged or listed from other places. ``--image-embeddings`` in training reads the
embeddings instead of the image, checks every sample's record against the training model's image
weights, and refuses others with an error naming the shard.

The trade-off: the embedding is of one fixed view of the image (open_clip's validation transform:
resize + center crop), so training sees no image augmentation. ParaCLIP's recipe trains with the
image tower frozen and open_clip's default train transform for ViT-B-32 is only a random resized
crop with scale (0.9, 1.0); the loss of that crop jitter is the price of skipping decoding and the
visual forward.
"""
import hashlib
import io

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


def embedding_record(model_name, pretrained, visual_sha256, by_precision=None):
    record = {"model": model_name, "pretrained": pretrained, "visual_sha256": visual_sha256}
    if by_precision:
        record["visual_sha256_by_precision"] = dict(by_precision)
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


class CachedImageEmbedding:
    """Decode stage: ``sample["image"]`` = the stored embedding, after checking who made it.

    ``expected_sha256`` is the training model's ``visual_fingerprint``, taken in the training
    ``precision``; a sample made with other image weights (another model, another pretrained tag, a
    fine-tuned tower) stops training.
    """

    def __init__(self, expected_sha256, expected_label="", precision="fp32"):
        self.expected_sha256 = expected_sha256
        self.expected_label = expected_label
        self.precision = precision

    def __call__(self, sample):
        url = sample.get("__url__", "?")
        record = (sample.get("json") or {}).get(METADATA_KEY)
        if record is None:
            raise MissingEmbeddings(
                f"shard {url}: sample '{sample.get('__key__')}' has {EMBEDDING_FIELD} but no "
                f"'{METADATA_KEY}' record in its json; re-run scripts/embed_images.py on it")
        stored = expected_fingerprint(record, self.precision)
        if stored is None:
            raise EmbeddingMismatch(
                f"shard {url}: its image embeddings record no fingerprint of the image weights in "
                f"--precision {self.precision} (made by an older scripts/embed_images.py): re-run "
                f"scripts/embed_images.py on it, or train with --precision amp_bf16, amp or fp32")
        if stored != self.expected_sha256:
            raise EmbeddingMismatch(
                f"shard {url} holds image embeddings of model '{record.get('model')}' pretrained "
                f"'{record.get('pretrained')}' (visual weights sha256 {str(stored)[:12]} in --precision "
                f"{self.precision}), but this run's image tower {self.expected_label}has sha256 "
                f"{self.expected_sha256[:12]}: re-embed with scripts/embed_images.py for this model, "
                f"or drop --image-embeddings")
        sample["image"] = torch.from_numpy(np.ascontiguousarray(sample[EMBEDDING_FIELD]))
        return sample
