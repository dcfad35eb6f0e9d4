"""The ParaCLIP loss: a weighted sum of symmetric InfoNCE terms between pairs of fields.

Each term is open_clip's ``ClipLoss`` (its feature gathering honours ``--local-loss`` and
``--gather-with-grad``) applied to two of the four fields with the model's learned logit scale.
The paper's loss is L(image, para2) + L(caption, para1) + L(para1, para2); other rows of its
Table 2 ablation are other ``terms``.

With ``block_size`` each term is ``BlockedClipLoss``: the same loss and gradients, computed in row blocks
so that no N x N logits matrix is kept for backward (``--paraclip-loss-block-size``).
"""

import torch
import torch.nn as nn
from open_clip.loss import ClipLoss, gather_features

# field name -> key of that field's features in the model output (see model.ParaphraseForward)
FEATURE_KEYS = {
    "image": "image_features",
    "caption": "text_features",
    "para1": "para1_features",
    "para2": "para2_features",
}
DEFAULT_TERMS = "image:para2,caption:para1,para1:para2"


def parse_terms(spec):
    """``"image:para2,caption:para1"`` -> ``[("image", "para2"), ("caption", "para1")]``."""
    terms = []
    for item in spec.split(","):
        pair = tuple(field.strip() for field in item.split(":"))
        if len(pair) != 2:
            raise ValueError(f"term '{item}' is not of the form FIELD:FIELD")
        unknown = [field for field in pair if field not in FEATURE_KEYS]
        if unknown:
            raise ValueError(f"unknown field '{unknown[0]}' in term '{item}'; fields are {', '.join(FEATURE_KEYS)}")
        if pair[0] == pair[1]:
            raise ValueError(f"term '{item}' pairs a field with itself")
        terms.append(pair)
    if len(set(terms)) != len(terms):
        raise ValueError(f"'{spec}' repeats a term")
    return terms


def format_terms(terms):
    """``[("image", "para2"), ("caption", "para1")]`` -> ``"image:para2,caption:para1"`` (for messages)."""
    return ",".join(f"{a}:{b}" for a, b in terms)


def parse_weights(spec, num_terms):
    if spec is None:
        return [1.0] * num_terms
    weights = [float(w) for w in spec.split(",")]
    if len(weights) != num_terms:
        raise ValueError(f"{len(weights)} weights given for {num_terms} terms")
    return weights


class BlockedCrossEntropy(torch.autograd.Function):
    """``mean_i cross_entropy(scale * x_i @ y.T + bias, offset + i)``, computed ``block`` rows at a time.

    Forward keeps each row's logsumexp, not its logits; backward recomputes one block of logits at a time.
    Memory beyond the inputs: O(block x len(y)) while it runs, O(len(x)) kept. As in open_clip's ClipLoss,
    the scale multiplies ``x`` before the matmul and the cross entropy is taken in float32 (autocast's
    choice for it); backward runs under the autocast state forward ran under.
    """

    @staticmethod
    def forward(ctx, x, y, scale, bias, offset, block):
        device = x.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        targets = torch.arange(x.shape[0], device=x.device)[:, None] + offset
        lse = torch.empty(x.shape[0], device=x.device, dtype=_accumulate(x))
        target = torch.empty_like(lse)
        for start in range(0, x.shape[0], block):
            logits = _block_logits(x[start : start + block], y, scale, bias)
            lse[start : start + block] = torch.logsumexp(logits, dim=1)
            target[start : start + block] = logits.gather(1, targets[start : start + block])[:, 0]
        ctx.save_for_backward(x, y, scale, bias, lse)
        ctx.offset, ctx.block = offset, block
        return (lse - target).mean()

    @staticmethod
    def backward(ctx, grad):
        x, y, scale, bias, lse = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            return _blocked_grads(
                x, y, scale, bias, lse, grad / x.shape[0], ctx.offset, ctx.block, ctx.needs_input_grad[1]
            )


def _accumulate(x):
    """The dtype logits are reduced and gradients summed in: float32, or float64 for float64 features."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _block_logits(x, y, scale, bias):
    logits = ((scale * x) @ y.T).to(_accumulate(x))
    return logits if bias is None else logits + bias


def _blocked_grads(x, y, scale, bias, lse, weight, offset, block, y_needs_grad=True):
    """Gradients of BlockedCrossEntropy's mean: d/dlogits = weight * (softmax - one_hot), a block at a time
    (y's is skipped where y needs none: gathered features without --gather-with-grad)."""
    accumulate = _accumulate(x)
    grad_x = torch.empty_like(x)
    grad_y = torch.zeros(y.shape, dtype=accumulate, device=y.device)
    grad_scale = torch.zeros((), dtype=accumulate, device=x.device)
    grad_bias = torch.zeros((), dtype=accumulate, device=x.device)
    for start in range(0, x.shape[0], block):
        part = x[start : start + block]
        scaled = scale * part
        d_logits = torch.exp(_block_logits(part, y, scale, bias) - lse[start : start + block, None])  # softmax
        rows = torch.arange(d_logits.shape[0], device=x.device)
        d_logits[rows, rows + offset + start] -= 1
        d_logits *= weight
        grad_bias += d_logits.sum()
        d_logits = d_logits.to(scaled.dtype)  # the matmuls in the features' dtype, as autograd of ClipLoss does
        d_scaled = d_logits @ y  # d loss / d (scale * x)
        grad_x[start : start + block] = (scale * d_scaled).to(x.dtype)
        grad_scale += (d_scaled.to(accumulate) * part.to(accumulate)).sum()
        if y_needs_grad:
            grad_y += (d_logits.T @ scaled).to(accumulate)
    return (
        grad_x,
        grad_y.to(y.dtype) if y_needs_grad else None,
        grad_scale.to(scale.dtype).reshape(scale.shape),
        None if bias is None else grad_bias.to(bias.dtype).reshape(bias.shape),
        None,
        None,
    )


def blocked_cross_entropy(x, y, scale, bias=None, offset=0, block=4096):
    """BlockedCrossEntropy: the rows of x against all of y, row i's target being y[offset + i]."""
    if offset + x.shape[0] > y.shape[0]:
        raise ValueError(f"targets {offset}..{offset + x.shape[0] - 1} beyond the {y.shape[0]} rows of y")
    return BlockedCrossEntropy.apply(x, y, scale, bias, offset, block)


class BlockedClipLoss(ClipLoss):
    """open_clip's ClipLoss (--local-loss, --gather-with-grad, logit_bias included) without its N x N logits:
    each direction is a BlockedCrossEntropy over ``block_size`` rows at a time. The same loss and gradients."""

    def __init__(self, block_size, **clip_loss_kwargs):
        super().__init__(**clip_loss_kwargs)
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, not {block_size}")
        self.block_size = block_size

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        images, texts, offset = image_features, text_features, 0
        all_images, all_texts = images, texts
        if self.world_size > 1:
            all_images, all_texts = gather_features(
                images,
                texts,
                local_loss=self.local_loss,
                gather_with_grad=self.gather_with_grad,
                rank=self.rank,
                world_size=self.world_size,
                use_horovod=self.use_horovod,
            )
            if self.local_loss:  # this rank's rows against everyone's columns (ClipLoss's labels)
                offset = images.shape[0] * self.rank
            else:
                images, texts = all_images, all_texts
        total_loss = (
            blocked_cross_entropy(images, all_texts, logit_scale, logit_bias, offset, self.block_size)
            + blocked_cross_entropy(texts, all_images, logit_scale, logit_bias, offset, self.block_size)
        ) / 2
        return {"contrastive_loss": total_loss} if output_dict else total_loss


class ParaCLIPLoss(nn.Module):
    def __init__(self, terms, weights=None, block_size=0, **clip_loss_kwargs):
        super().__init__()
        self.terms = list(terms)
        self.weights = list(weights) if weights is not None else [1.0] * len(self.terms)
        assert len(self.weights) == len(self.terms)
        self.block_size = block_size
        self.clip_loss = BlockedClipLoss(block_size, **clip_loss_kwargs) if block_size else ClipLoss(**clip_loss_kwargs)

    def forward(
        self,
        image_features,
        text_features,
        para1_features,
        para2_features,
        logit_scale,
        logit_bias=None,
        output_dict=False,
    ):
        features = dict(image=image_features, caption=text_features, para1=para1_features, para2=para2_features)
        losses = {
            f"{a}_{b}_loss": weight * self.clip_loss(features[a], features[b], logit_scale, logit_bias)
            for (a, b), weight in zip(self.terms, self.weights)
        }
        return losses if output_dict else sum(losses.values())
