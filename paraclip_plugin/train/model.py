"""Changes to an open_clip model for ParaCLIP, made in place.

Both changes extend the class of one module instance instead of wrapping it in a new module, so
``state_dict()`` keys stay exactly those of stock open_clip and checkpoints load without the plugin.
"""

import functools
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from paraclip_plugin.train.trimming import TextTrimming, pad_to_context


@functools.cache
def _extended_class(mixin, cls):
    return type(f"{mixin.__name__}{cls.__name__}", (mixin, cls), {"__module__": cls.__module__})


def extend_instance(module, mixin):
    """Make ``module`` an instance of a subclass of its class with ``mixin`` in front of it."""
    if not isinstance(module, mixin):
        module.__class__ = _extended_class(mixin, type(module))
    return module


class FrozenTower(nn.Module):
    """A tower that always runs in eval mode and without autograd.

    Eval mode: no dropout, patch dropout or batch-norm statistic updates, whatever ``model.train()``
    says. No autograd: no activations are kept for a backward pass that would not reach it.
    """

    def train(self, mode=True):
        return super().train(False)

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return super().forward(*args, **kwargs)


def freeze_visual(model):
    """Freeze the image tower: no gradients, not in the optimizer, eval mode, no autograd."""
    # open_clip's own LiT lock sets requires_grad=False (main.py builds the optimizer only from
    # parameters that require grad) and freezes batch-norm statistics.
    model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=True)
    extend_instance(model.visual, FrozenTower)
    model.visual.eval()
    return model


class ParaphraseForward(nn.Module):
    """``forward(image, text)`` that also takes ``text`` of shape [batch, 3, context].

    The three rows (caption, para1, para2) go through the text tower as one batch of 3 x batch
    sequences; the output dict gains ``para1_features`` and ``para2_features`` beside open_clip's
    ``image_features`` / ``text_features`` (the caption), which is what ``ParaCLIPLoss`` takes and
    what open_clip's ``--accum-freq`` feature cache concatenates key by key. 2-D ``text`` and
    image-only calls (zero-shot evaluation) are the stock forward.

    Where it is exact (``trimming.TextTrimming``), the fused batch is cut to its longest sequence.
    ``image`` of shape [batch, embed_dim] is taken as cached image embeddings (``--image-embeddings``):
    the image tower does not run at all.
    """

    # set by enable_paraphrase_forward; a plain attribute, so state_dict keys stay stock
    paraclip_trimming = None

    def forward(self, image=None, text=None, *args, **kwargs):
        if text is None or text.ndim == 2:
            return super().forward(image, text, *args, **kwargs)
        batch, fields, context = text.shape
        cached_image_features = image is not None and image.ndim == 2
        # the stock forward without text: image features (unless cached), logit_scale, logit_bias
        out = super().forward(None if cached_image_features else image, None, *args, **kwargs)
        if not isinstance(out, dict):
            raise TypeError("ParaCLIP needs the model's output_dict=True (as open_clip_train creates it)")
        # field-major order, so each field's features are one contiguous block (all_gather needs that)
        fused = text.transpose(0, 1).reshape(fields * batch, context)
        if self.paraclip_trimming is not None:
            text_features = self.paraclip_trimming.encode_text(self, fused)
        else:
            text_features = self.encode_text(pad_to_context(fused, self.context_length), normalize=True)
        out["text_features"], out["para1_features"], out["para2_features"] = text_features.split(batch)
        if cached_image_features:
            # stored in float16; normalized in float32 as encode_image(normalize=True) would be, then in
            # the text features' dtype (bf16 under --precision pure_bf16), which the loss multiplies them with
            out["image_features"] = F.normalize(image.float(), dim=-1).to(text_features.dtype)
        return out


def enable_paraphrase_forward(model, trim=True):
    """The fused three-text forward, cut to each batch's longest sequence where that is exact."""
    extend_instance(model, ParaphraseForward)
    trimming, why_not = TextTrimming.for_model(model) if trim else (None, "--no-text-trimming")
    model.paraclip_trimming = trimming
    if trimming is not None:
        logging.info(f"ParaCLIP: text batches cut to their longest sequence (multiple of {trimming.multiple}).")
    else:
        logging.info(f"ParaCLIP: text batches run at full context, not trimmed: {why_not}.")
    return model
