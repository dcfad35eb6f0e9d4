"""The causal hint: open_clip's text attention as causal SDPA instead of an additive mask.

open_clip 3.3.0's text tower hands its causal mask to ``nn.MultiheadAttention`` as a float mask
(``-inf`` above the diagonal). With an arbitrary mask, ``scaled_dot_product_attention`` cannot use
its FlashAttention kernel and reads the mask from memory in another kernel. Told that the mask *is*
the causal mask (torch's ``is_causal`` hint), ``nn.MultiheadAttention`` drops it and calls SDPA with
``is_causal=True``. The attention computed is the same; on a GPU the kernel, and so the rounding, is
not, which is why this is a flag (``--causal-attention``) and not part of the exact trimming.

The hint is given only where it is true: the ``nn.MultiheadAttention`` of every block of an open_clip
text tower (``CLIP`` or ``CustomTextCLIP`` with ``TextTransformer``) whose ``attn_mask`` is exactly the
causal mask and that adds no CLS token, and only for a 2-D mask given by keyword, as open_clip's
``ResidualAttentionBlock`` passes it (whole, or cut to the batch's length by trimming). Elsewhere
``causal_attention`` changes nothing and says why. The clean fix is upstream: ``is_causal=True``
in ``ResidualAttentionBlock.attention`` for a causal text tower.
"""

import logging

import torch
import torch.nn as nn

from paraclip_plugin.train.model import extend_instance
from paraclip_plugin.train.trimming import TextTrimming


class CausalHint(nn.Module):
    """Put in front of ``nn.MultiheadAttention``: a 2-D ``attn_mask`` keyword is the causal mask."""

    def forward(self, *args, **kwargs):
        mask = kwargs.get("attn_mask")
        if mask is not None and mask.dim() == 2 and len(args) <= 3:  # query, key, value; the rest by keyword
            kwargs.setdefault("is_causal", True)
        return super().forward(*args, **kwargs)


def is_causal_mask(mask):
    """True for exactly open_clip's causal mask: 0 on and below the diagonal, -inf above."""
    if mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        return False
    return torch.equal(mask, torch.full(mask.shape, float("-inf"), dtype=mask.dtype, device=mask.device).triu_(1))


def causal_attention(model):
    """Give the text tower's attention the causal hint where it is true: (blocks, None) or (0, why not)."""
    prefix, tower = TextTrimming.tower_of(model)
    if prefix is None:
        return 0, tower
    if tower.attn_mask is None:
        return 0, "the text tower is bidirectional (no causal mask)"
    if getattr(tower, "cls_emb", None) is not None:
        return 0, "the text tower appends a CLS token, whose mask is not causal"
    if not is_causal_mask(tower.attn_mask):
        return 0, "the text tower's attn_mask is not the causal mask"
    blocks = tower.transformer.resblocks
    kinds = {
        type(getattr(block, "attn", None)).__name__
        for block in blocks
        if not isinstance(getattr(block, "attn", None), nn.MultiheadAttention)
    }
    if kinds:
        return 0, f"the text tower's attention is {', '.join(sorted(kinds))}, not nn.MultiheadAttention"
    for block in blocks:
        extend_instance(block.attn, CausalHint)
    return len(blocks), None


def enable_causal_attention(model):
    """``causal_attention(model)``, logged: the blocks changed, or why none was."""
    blocks, why_not = causal_attention(model)
    if blocks:
        logging.info(f"ParaCLIP: text attention runs as causal SDPA (is_causal hint) in {blocks} blocks.")
    else:
        logging.warning(f"ParaCLIP: --causal-attention has no effect: {why_not}; the text tower keeps its mask.")
    return model
