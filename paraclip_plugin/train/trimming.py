"""Exact sequence trimming for open_clip's causal, EOT-pooled text towers.

A CLIP text tower with a causal attention mask computes position i from positions 0..i only, and
pools the features at one position per row (the EOT token). Cutting the tokens after the last
pooled position of a batch therefore changes no feature, only the work: captions of 12-24 tokens
run at ~24 positions instead of 77.

open_clip 3.3.0's ``CLIP.encode_text`` adds the whole ``positional_embedding`` and passes the whole
``attn_mask`` (``TextTransformer.forward`` slices the positional embedding but not the causal mask),
so shorter tokens alone would not broadcast. Instead of copying ``encode_text``, the model's own
forward is run through ``torch.func.functional_call`` with those two tensors replaced by their
first L rows (views of the real parameter, so gradients reach it). The clean upstream fix is to
slice both by the input's sequence length inside open_clip.

Where cutting is not exact (no causal mask, CLS/first/last/mean pooling, an appended CLS token,
HF or other towers) ``TextTrimming.for_model`` returns None with the reason, and the stock path runs.
"""

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from open_clip import CLIP, CustomTextCLIP
from open_clip.transformer import TextTransformer

# pooling rules under which the pooled position is a function of the tokens alone
EOT_POOLING = ("argmax", "eos")


@dataclasses.dataclass(frozen=True)
class TextTrimming:
    """How to run one model's text tower on tokens cut to the batch's longest real sequence."""

    prefix: str  # "" for CLIP's built-in tower, "text." for CustomTextCLIP's TextTransformer
    pool_type: str  # "argmax" (highest token id, CLIP's EOT) or "eos"
    eos_id: Optional[int]
    context_length: int
    multiple: int = 8  # round lengths up so torch.compile sees at most context/8 shapes

    @staticmethod
    def tower_of(model):
        """(prefix, tower) for the supported towers, else (None, reason)."""
        if isinstance(model, CLIP):
            return "", model
        if isinstance(model, CustomTextCLIP):
            if isinstance(model.text, TextTransformer):
                return "text.", model.text
            return None, f"text tower {type(model.text).__name__} is not open_clip's TextTransformer"
        return None, f"model {type(model).__name__} is neither open_clip CLIP nor CustomTextCLIP"

    @classmethod
    def for_model(cls, model, multiple=8):
        """(TextTrimming, None) where trimming is exact for ``model``, else (None, why not)."""
        prefix, tower = cls.tower_of(model)
        if prefix is None:
            return None, tower
        pool_type = tower.text_pool_type if prefix == "" else tower.pool_type
        eos_id = tower.text_eos_id if prefix == "" else tower.eos_id
        if tower.attn_mask is None:
            return None, "the text tower is bidirectional (no causal mask): every token sees the padding"
        if getattr(tower, "cls_emb", None) is not None:
            return None, "the text tower appends a CLS token after the padding and pools there"
        if pool_type not in EOT_POOLING:
            return None, f"text pooling '{pool_type}' is not at the EOT token"
        if pool_type == "eos" and eos_id is None:
            return None, "'eos' pooling without an eos id"
        return cls(prefix, pool_type, eos_id, model.context_length, multiple), None

    def pooled_positions(self, text):
        """Per row, the position the tower pools at (the same rule as open_clip's text_global_pool)."""
        if self.pool_type == "argmax":
            return text.argmax(dim=-1)
        return (text == self.eos_id).int().argmax(dim=-1)

    # a deliberate graph break under torch.compile: the length becomes a host int, and with lengths
    # rounded to `multiple` the compiled text tower sees a bounded number of shapes
    @torch.compiler.disable
    def length(self, text):
        """Tokens to keep: through the last pooled position, rounded up to ``multiple``."""
        # one device->host sync per batch; the shape has to be known on the host anyway
        longest = int(self.pooled_positions(text).max()) + 1
        rounded = -(-longest // self.multiple) * self.multiple
        return min(rounded, self.context_length, text.shape[1])

    def encode_text(self, model, text):
        """``model.encode_text(text, normalize=True)``, computed on the first ``length(text)`` tokens.

        ``text`` may be narrower than the context (pre-tokenized batches); it must not be wider.
        """
        if text.shape[1] > self.context_length:
            raise ValueError(f"text of {text.shape[1]} tokens for a context of {self.context_length}")
        length = self.length(text)
        tower = model.text if self.prefix else model
        cut = {
            f"{self.prefix}positional_embedding": tower.positional_embedding[:length],
            f"{self.prefix}attn_mask": tower.attn_mask[:length, :length],
        }
        # the model's own forward with image=None: open_clip's encode_text(normalize=True), unchanged
        out = torch.func.functional_call(model, cut, args=(None, text[:, :length]))
        return out["text_features"] if isinstance(out, dict) else out[1]


def pad_to_context(text, context_length, pad_id=0):
    """Tokens narrower than the context, padded back to it for the stock (untrimmed) path."""
    if text.shape[1] >= context_length:
        return text
    return F.pad(text, (0, context_length - text.shape[1]), value=pad_id)
