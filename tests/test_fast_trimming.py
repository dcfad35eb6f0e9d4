"""Exact sequence trimming: the same features and gradients as stock encode_text, on each supported
tower type, and the stock path wherever trimming would not be exact."""

import json

import open_clip
import pytest
import torch
import torch.nn as nn

from conftest import TINY_CONFIG, TINY_MODEL
from paraclip_plugin.train.model import enable_paraphrase_forward
from paraclip_plugin.train.trimming import TextTrimming

TINY = json.loads(TINY_CONFIG.read_text())
CONTEXT = TINY["text_cfg"]["context_length"]


def tiny(seed=0, force_custom_text=False, **text_cfg):
    open_clip.add_model_config(str(TINY_CONFIG))
    torch.manual_seed(seed)
    kwargs = {"text_cfg": {**TINY["text_cfg"], **text_cfg}} if text_cfg else {}
    return open_clip.create_model(TINY_MODEL, force_custom_text=force_custom_text, output_dict=True, **kwargs)


def random_tokens(rng, rows, max_len=CONTEXT):
    """Tokenizer-shaped rows: SOT, random words, EOT (the highest id), zero padding; random lengths."""
    text = torch.zeros(rows, CONTEXT, dtype=torch.long)
    for row in range(rows):
        length = int(torch.randint(2, max_len + 1, (), generator=rng))
        text[row, 0] = 49406
        text[row, 1 : length - 1] = torch.randint(1, 49000, (length - 2,), generator=rng)
        text[row, length - 1] = 49407
    return text


def text_params(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad and not n.startswith(("visual.", "logit_"))}


@pytest.mark.parametrize("force_custom_text,tower", [(False, "CLIP"), (True, "CustomTextCLIP")])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_trimmed_features_and_gradients_equal_stock(force_custom_text, tower, seed):
    model = tiny(seed, force_custom_text)
    assert type(model).__name__ == tower
    trimming, why_not = TextTrimming.for_model(model)
    assert trimming is not None, why_not
    rng = torch.Generator().manual_seed(seed)
    text = random_tokens(rng, 12, max_len=int(torch.randint(3, CONTEXT - 8, (), generator=rng)))
    assert trimming.length(text) < CONTEXT  # something really is cut
    assert trimming.length(text) % 8 == 0 and trimming.length(text) > int(text.argmax(-1).max())

    stock = model.encode_text(text, normalize=True)
    weights = torch.randn(stock.shape, generator=rng)
    (stock * weights).sum().backward()
    stock_grads = {n: p.grad.clone() for n, p in text_params(model).items()}
    model.zero_grad()
    trimmed = trimming.encode_text(model, text)
    (trimmed * weights).sum().backward()

    torch.testing.assert_close(trimmed, stock, atol=1e-5, rtol=1e-4)
    for name, param in text_params(model).items():
        torch.testing.assert_close(param.grad, stock_grads[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("force_custom_text", [False, True])
def test_fused_forward_trimmed_equals_untrimmed_and_takes_narrow_tokens(force_custom_text):
    rng = torch.Generator().manual_seed(5)
    image = torch.randn(4, 3, 32, 32, generator=rng)
    text = random_tokens(rng, 12, max_len=14).reshape(4, 3, CONTEXT)
    fast = enable_paraphrase_forward(tiny(3, force_custom_text))
    slow = enable_paraphrase_forward(tiny(3, force_custom_text), trim=False)
    assert fast.paraclip_trimming is not None and slow.paraclip_trimming is None
    out_fast, out_slow = fast(image, text), slow(image, text)
    for key in ("image_features", "text_features", "para1_features", "para2_features", "logit_scale"):
        torch.testing.assert_close(out_fast[key], out_slow[key], atol=1e-5, rtol=1e-4, msg=key)
    # pre-tokenized batches may be narrower than the context: both paths accept them unchanged
    narrow = text[:, :, :16]
    for model in (fast, slow):
        torch.testing.assert_close(
            model(image, narrow)["para2_features"], out_slow["para2_features"], atol=1e-5, rtol=1e-4
        )


class OtherTextTower(nn.Module):
    """Stands in for an HF/timm text tower: anything that is not open_clip's TextTransformer."""

    def __init__(self, dim=64):
        super().__init__()
        self.embedding = nn.EmbeddingBag(49408, dim)

    def forward(self, text):
        return self.embedding(text)


@pytest.mark.parametrize(
    "change,reason",
    [
        (dict(no_causal_mask=True), "bidirectional"),
        (dict(pool_type="first", force_custom_text=True), "pooling 'first'"),
        (dict(pool_type="last"), "pooling 'last'"),
        (dict(embed_cls=True, pool_type="last", force_custom_text=True), "CLS token"),
        (dict(other_tower=True), "is not open_clip's TextTransformer"),
    ],
)
def test_fallback_is_the_stock_path_where_trimming_is_not_exact(change, reason):
    change = dict(change)
    other_tower = change.pop("other_tower", False)
    force_custom_text = change.pop("force_custom_text", other_tower)
    model = tiny(7, force_custom_text, **change)
    if other_tower:
        model.text = OtherTextTower()
    trimming, why_not = TextTrimming.for_model(model)
    assert trimming is None and reason in why_not
    enable_paraphrase_forward(model)
    assert model.paraclip_trimming is None
    rng = torch.Generator().manual_seed(7)
    batch = random_tokens(rng, 6, max_len=10).reshape(2, 3, CONTEXT)  # [batch, field, context]
    out = model(None, batch)
    for field, key in enumerate(("text_features", "para1_features", "para2_features")):
        torch.testing.assert_close(out[key], model.encode_text(batch[:, field], normalize=True))
