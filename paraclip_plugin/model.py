"""Changes to an open_clip model for ParaCLIP, made in place.

Both changes extend the class of one module instance instead of wrapping it in a new module, so
``state_dict()`` keys stay exactly those of stock open_clip and checkpoints load without the plugin.
"""
import functools

import torch
import torch.nn as nn


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
    """

    def forward(self, image=None, text=None, *args, **kwargs):
        if text is None or text.ndim == 2:
            return super().forward(image, text, *args, **kwargs)
        batch, fields, context = text.shape
        # field-major order, so each field's features are one contiguous block (all_gather needs that)
        out = super().forward(image, text.transpose(0, 1).reshape(fields * batch, context), *args, **kwargs)
        if not isinstance(out, dict):
            raise TypeError("ParaCLIP needs the model's output_dict=True (as open_clip_train creates it)")
        out["text_features"], out["para1_features"], out["para2_features"] = out["text_features"].split(batch)
        return out


def enable_paraphrase_forward(model):
    return extend_instance(model, ParaphraseForward)
