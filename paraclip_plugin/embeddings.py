"""Cached image embeddings: the frozen image tower's features, stored once in the shards.

With a frozen image tower, every epoch recomputes the same image features from the same pixels
(up to augmentation). ``scripts/embed_images.py`` computes them once and adds to each sample:

    <key>.img_emb.npy   float16 [embed_dim]: encode_image(preprocess_val(image), normalize=True)
    <key>.json          gains "paraclip_image_embedding": {"model", "pretrained", "visual_sha256"}

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

    float32 so the same weights hash the same on any device; weights converted to bf16/fp16
    (``--precision pure_bf16``) are other weights and hash differently, on purpose.
    """
    digest = hashlib.sha256()
    for name, tensor in visual.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def embedding_record(model_name, pretrained, visual_sha256):
    return {"model": model_name, "pretrained": pretrained, "visual_sha256": visual_sha256}


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

    ``expected_sha256`` is the training model's ``visual_fingerprint``; a sample made with other
    image weights (another model, another pretrained tag, a fine-tuned tower) stops training.
    """

    def __init__(self, expected_sha256, expected_label=""):
        self.expected_sha256 = expected_sha256
        self.expected_label = expected_label

    def __call__(self, sample):
        url = sample.get("__url__", "?")
        record = (sample.get("json") or {}).get(METADATA_KEY)
        if record is None:
            raise MissingEmbeddings(
                f"shard {url}: sample '{sample.get('__key__')}' has {EMBEDDING_FIELD} but no "
                f"'{METADATA_KEY}' record in its json; re-run scripts/embed_images.py on it")
        if record.get("visual_sha256") != self.expected_sha256:
            raise EmbeddingMismatch(
                f"shard {url} holds image embeddings of model '{record.get('model')}' pretrained "
                f"'{record.get('pretrained')}' (visual weights sha256 {str(record.get('visual_sha256'))[:12]}), "
                f"but this run's image tower {self.expected_label}has sha256 {self.expected_sha256[:12]}: "
                f"re-embed with scripts/embed_images.py for this model, or drop --image-embeddings")
        sample["image"] = torch.from_numpy(np.ascontiguousarray(sample[EMBEDDING_FIELD]))
        return sample
