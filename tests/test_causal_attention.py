"""--causal-attention: the text tower's attention runs as causal SDPA (no mask), with the same features,
gradients and training as the additive mask, and only where the mask really is causal."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import (
    final_state,
    logged_losses,
    read_log,
    save_init_checkpoint,
    stock_open_clip_loads,
    torchrun,
    train_args,
    write_shards,
)
from paraclip_plugin.train.attention import CausalHint, causal_attention, is_causal_mask
from paraclip_plugin.train.model import enable_paraphrase_forward
from paraclip_plugin.train.trimming import TextTrimming
from test_fast_trimming import OtherTextTower, random_tokens, text_params, tiny
from test_train import TERMS


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Every scaled_dot_product_attention call nn.MultiheadAttention makes: (mask given, is_causal)."""
    calls, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        calls.append((attn_mask is not None, is_causal))
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


def features_and_grads(model, text, weights, trimmed):
    model.zero_grad()
    if trimmed:
        features = TextTrimming.for_model(model)[0].encode_text(model, text)
    else:
        features = model.encode_text(text, normalize=True)
    (features * weights).sum().backward()
    return features.detach(), {n: p.grad.clone() for n, p in text_params(model).items()}


@pytest.mark.parametrize("trimmed", [False, True], ids=["full-context", "trimmed"])
@pytest.mark.parametrize("force_custom_text,tower", [(False, "CLIP"), (True, "CustomTextCLIP")])
def test_causal_sdpa_gives_the_masks_features_and_gradients(force_custom_text, tower, trimmed, sdpa_calls):
    model = tiny(4, force_custom_text)
    assert type(model).__name__ == tower
    rng = torch.Generator().manual_seed(4)
    text = random_tokens(rng, 12, max_len=20)
    weights = torch.randn(12, 64, generator=rng)
    masked = features_and_grads(model, text, weights, trimmed)
    assert sdpa_calls and all(mask and not causal for mask, causal in sdpa_calls)

    blocks, why_not = causal_attention(model)
    assert blocks == 2 and why_not is None  # the tiny text tower's 2 layers
    sdpa_calls.clear()
    hinted = features_and_grads(model, text, weights, trimmed)
    # every text attention call went to SDPA as causal, without a mask
    assert sdpa_calls == [(False, True)] * 2

    torch.testing.assert_close(hinted[0], masked[0], atol=1e-6, rtol=1e-5)
    for name in masked[1]:
        torch.testing.assert_close(hinted[1][name], masked[1][name], atol=1e-7, rtol=1e-5, msg=name)


def test_with_grad_checkpointing_and_16_bit_weights(sdpa_calls):
    """--grad-checkpointing re-runs the blocks (the hint holds there too); --precision pure_bf16/fp16 casts
    the causal mask buffer, which is still recognised as causal."""
    rng = torch.Generator().manual_seed(10)
    text, weights = random_tokens(rng, 6, max_len=14), torch.randn(6, 64, generator=rng)
    model = tiny(10)
    model.set_grad_checkpointing()
    masked = features_and_grads(model, text, weights, trimmed=True)
    causal_attention(model)
    sdpa_calls.clear()
    hinted = features_and_grads(model, text, weights, trimmed=True)
    assert sdpa_calls and all(call == (False, True) for call in sdpa_calls)
    torch.testing.assert_close(hinted[0], masked[0], atol=1e-6, rtol=1e-5)
    for name in masked[1]:
        torch.testing.assert_close(hinted[1][name], masked[1][name], atol=1e-7, rtol=1e-5, msg=name)
    for dtype in (torch.bfloat16, torch.float16):
        assert causal_attention(tiny(10).to(dtype))[0] == 2


def test_evaluation_under_inference_mode_is_unchanged():
    """open_clip_train's zero-shot evaluation: eval mode, inference_mode (MultiheadAttention's fast path)."""
    model = tiny(9).eval()
    text = random_tokens(torch.Generator().manual_seed(9), 8)
    with torch.inference_mode():
        masked = model.encode_text(text, normalize=True)
        causal_attention(model)
        hinted = model.encode_text(text, normalize=True)
    torch.testing.assert_close(hinted, masked, atol=1e-6, rtol=1e-5)


def test_only_the_text_towers_attention_changes_and_state_dict_keys_stay(sdpa_calls):
    model = enable_paraphrase_forward(tiny(5))
    keys = list(model.state_dict())
    causal_attention(model)
    assert all(isinstance(block.attn, CausalHint) for block in model.transformer.resblocks)
    assert not any(isinstance(m, CausalHint) for m in model.visual.modules())
    assert list(model.state_dict()) == keys
    causal_attention(model)  # a second call changes nothing more
    assert all(type(block.attn).__mro__.count(CausalHint) == 1 for block in model.transformer.resblocks)
    # image attention keeps its own call (no mask, not causal)
    model.encode_image(torch.randn(2, 3, 32, 32))
    assert sdpa_calls and all(call == (False, False) for call in sdpa_calls)


def test_the_hint_is_not_given_for_other_masks(sdpa_calls):
    """A 3-D (per-sample) mask, or one passed positionally, is not declared causal."""
    model = tiny(6)
    causal_attention(model)
    attn = model.transformer.resblocks[0].attn
    x = torch.randn(2, 5, 64)
    open_mask = torch.zeros(5, 5)
    assert not torch.allclose(
        attn(x, x, x, need_weights=False, attn_mask=open_mask)[0],
        nn.MultiheadAttention.forward(attn, x, x, x, need_weights=False, attn_mask=open_mask)[0],
    )
    sdpa_calls.clear()
    per_sample = torch.zeros(2 * 2, 5, 5)  # [batch x heads, L, L]
    torch.testing.assert_close(
        attn(x, x, x, need_weights=False, attn_mask=per_sample)[0],
        nn.MultiheadAttention.forward(attn, x, x, x, need_weights=False, attn_mask=per_sample)[0],
    )
    torch.testing.assert_close(
        attn(x, x, x, None, False, open_mask)[0],
        nn.MultiheadAttention.forward(attn, x, x, x, None, False, open_mask)[0],
    )
    assert not any(causal for _, causal in sdpa_calls)


@pytest.mark.parametrize(
    "change,reason",
    [
        (dict(no_causal_mask=True), "bidirectional"),
        (dict(embed_cls=True, pool_type="last", force_custom_text=True), "CLS token"),
        (dict(block_type="custom"), "is Attention, not nn.MultiheadAttention"),
        (dict(other_tower=True), "is not open_clip's TextTransformer"),
        (dict(other_mask=True), "not the causal mask"),
    ],
)
def test_no_hint_where_the_mask_is_not_causal_attention(change, reason, sdpa_calls):
    change = dict(change)
    other_tower, other_mask = change.pop("other_tower", False), change.pop("other_mask", False)
    model = tiny(7, change.pop("force_custom_text", other_tower), **change)
    if other_tower:
        model.text = OtherTextTower()
    if other_mask:
        model.attn_mask[0, 1] = 0.0  # position 0 sees position 1
    before = [type(m) for m in model.modules()]
    blocks, why_not = causal_attention(model)
    assert blocks == 0 and reason in why_not
    assert [type(m) for m in model.modules()] == before
    model.encode_text(random_tokens(torch.Generator().manual_seed(7), 2))
    assert not any(causal for _, causal in sdpa_calls)


def test_is_causal_mask():
    causal = torch.full((6, 6), float("-inf")).triu_(1)
    assert is_causal_mask(causal) and is_causal_mask(causal.bfloat16()) and is_causal_mask(causal[:3, :3])
    assert not is_causal_mask(torch.zeros(6, 6)) and not is_causal_mask(causal[:3]) and not is_causal_mask(causal[None])
    assert not is_causal_mask(torch.full((6, 6), -1e4).triu_(1))


def test_dynamo_traces_the_hint_without_new_graph_breaks():
    """torch.compile sees the same graphs and breaks (the trimming's one deliberate break) with the hint."""
    text = random_tokens(torch.Generator().manual_seed(8), 6, max_len=12)

    def explain(model):
        trimming = TextTrimming.for_model(model)[0]
        torch._dynamo.reset()
        return torch._dynamo.explain(trimming.encode_text)(model, text)

    masked = explain(tiny(8))
    hinted_model = tiny(8)
    causal_attention(hinted_model)
    hinted = explain(hinted_model)
    assert hinted.graph_break_count == masked.graph_break_count
    assert hinted.graph_count == masked.graph_count


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("causal")
    return dict(
        data=write_shards(root / "shards", num_shards=2, per_shard=16, seed=3),
        init=save_init_checkpoint(root / "init.pt", seed=3),
        logs=root / "logs",
    )


def test_open_clip_train_with_causal_attention_trains_as_with_the_mask(world, patched_install):
    """Two ranks, one step, float32: the same losses and text weights; the checkpoint loads in stock open_clip.

    Each rank's batch is its whole shard (the InfoNCE loss does not depend on the order within a batch)
    and the crop scale is pinned to 1 (no random crop), so the two runs see the same data. Adam's eps
    is 1 (far above every gradient), so its first step is linear in the gradient: with the default 1e-8,
    the ~0 gradients of attention biases become steps of +-lr whose sign is rounding noise."""
    states = {}
    for name, extra in (("mask", ()), ("causal", ("--causal-attention",))):
        args = train_args(
            world["data"],
            world["logs"],
            name,
            world["init"],
            "--paraclip-loss",
            "--aug-cfg",
            "scale=(1.0,1.0)",
            "--eps",
            "1",
            *extra,
            batch_size=16,
            samples=32,
        )
        args[args.index("--workers") + 1] = "0"
        torchrun(["open_clip_train.main", *args])
        log = read_log(world["logs"], name)
        assert ("causal SDPA (is_causal hint) in 2 blocks" in log) == bool(extra)
        states[name] = (logged_losses(log), final_state(world["logs"], name))
    (mask_steps, mask_state), (causal_steps, causal_state) = states["mask"], states["causal"]
    assert len(causal_steps) == len(mask_steps) == 1  # 32 samples / (16 x 2 ranks)
    for a, b in zip(mask_steps, causal_steps):
        for term in ("Loss", *TERMS):
            assert b[term] == pytest.approx(a[term], rel=1e-5, abs=1e-6), term
    assert mask_state.keys() == causal_state.keys()
    init = torch.load(world["init"])
    update = {
        name: torch.cat([(state[k] - init[k]).flatten() for k in sorted(init) if not k.startswith("visual.")])
        for name, state in (("mask", mask_state), ("causal", causal_state))
    }
    assert update["mask"].norm() > 1e-3  # the step really moved the text tower
    assert (update["causal"] - update["mask"]).norm() <= 1e-4 * update["mask"].norm()
    assert all(torch.equal(causal_state[k], init[k]) for k in init if k.startswith("visual."))
    stock_open_clip_loads(world["logs"] / "causal" / "checkpoints" / "epoch_1.pt")
