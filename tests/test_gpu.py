"""The fast path on the training device: CUDA with bf16/fp16 autocast and torch.compile.

Marked ``gpu`` and left out of a plain ``pytest`` run (setup.cfg). ``scripts/gpu_check.sh`` runs them
on a CUDA GPU; ``scripts/gpu_check.sh --cpu-smoke`` (part of ``make test``) runs the same tests on the
CPU with ``PARACLIP_TEST_DEVICE=cpu``, so they are known to work before device time is spent on them.
Measured differences are recorded as junit properties (``record_property``), which gpu_check.sh
copies into its result file.
"""

import os
import re

import open_clip
import pytest
import torch

from conftest import (
    TINY_CONFIG,
    TINY_MODEL,
    final_state,
    logged_losses,
    read_log,
    torchrun,
    train_args,
    save_init_checkpoint,
    write_shards,
)
from paraclip_plugin.train.attention import causal_attention
from paraclip_plugin.train.model import enable_paraphrase_forward, freeze_visual
from paraclip_plugin.train.trimming import TextTrimming
from test_train import TERMS, split

pytestmark = pytest.mark.gpu

# bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.002). Trimmed and full-context runs
# may pick other GEMM kernels (other shapes), which round differently: allow a few bf16 ulps on
# unit-norm features, and a relative gradient difference of that order.
FEATURE_ATOL = 1.5e-2
GRAD_RTOL = 2e-2


@pytest.fixture(scope="module")
def device():
    name = os.environ.get("PARACLIP_TEST_DEVICE", "cuda")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.fail("no CUDA device: these tests are for the GPU (PARACLIP_TEST_DEVICE=cpu runs them on the CPU)")
    return torch.device(name)


@pytest.fixture(scope="module")
def model_name(device):
    """ViT-B-32 (random init) on the GPU; the tiny config on the CPU smoke run."""
    open_clip.add_model_config(str(TINY_CONFIG))
    return "ViT-B-32" if device.type == "cuda" else TINY_MODEL


def random_texts(batch, context, generator, lo=12, hi=24):
    """[batch, 3, context] ids: SOT, random words, EOT (the highest id, as CLIP's tokenizer gives)."""
    texts = torch.zeros(batch, 3, context, dtype=torch.long)
    lengths = torch.randint(lo, hi + 1, (batch, 3), generator=generator)
    for i in range(batch):
        for f in range(3):
            n = int(lengths[i, f])
            texts[i, f, 0] = 49406
            texts[i, f, 1 : n - 1] = torch.randint(1, 49000, (n - 2,), generator=generator)
            texts[i, f, n - 1] = 49407
    return texts


def text_grads(model, features, weights):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and n != "logit_scale"]
    grads = torch.autograd.grad((features.float() * weights).sum(), [p for _, p in named])
    return {n: g for (n, _), g in zip(named, grads)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_trimmed_text_features_and_gradients_match_stock_under_autocast(device, model_name, dtype, record_property):
    torch.manual_seed(0)
    model = open_clip.create_model(model_name, device=device)
    freeze_visual(model)
    trimming, why_not = TextTrimming.for_model(model)
    assert trimming is not None, why_not
    generator = torch.Generator().manual_seed(0)
    text = random_texts(64, model.context_length, generator).reshape(-1, model.context_length).to(device)
    weights = torch.randn(text.shape[0], model.text_projection.shape[-1], generator=generator).to(device)
    with torch.autocast(device.type, dtype=dtype):
        stock = model.encode_text(text, normalize=True)
        trimmed = trimming.encode_text(model, text)
    assert trimming.length(text) <= 24 < model.context_length  # really cut
    assert stock.dtype == trimmed.dtype
    feature_diff = (stock.float() - trimmed.float()).abs().max().item()
    with torch.autocast(device.type, dtype=dtype):
        stock_grads = text_grads(model, model.encode_text(text, normalize=True), weights)
        trimmed_grads = text_grads(model, trimming.encode_text(model, text), weights)
    assert stock_grads.keys() == trimmed_grads.keys()
    rel = {
        k: ((stock_grads[k] - trimmed_grads[k]).norm() / stock_grads[k].norm().clamp_min(1e-12)).item()
        for k in stock_grads
        if stock_grads[k].norm() > 0
    }
    worst = max(rel, key=rel.get)
    record_property(f"{str(dtype)[6:]}_feature_max_abs_diff", feature_diff)
    record_property(f"{str(dtype)[6:]}_grad_max_rel_diff", rel[worst])
    record_property(f"{str(dtype)[6:]}_grad_worst_param", worst)
    assert feature_diff <= FEATURE_ATOL
    assert rel[worst] <= GRAD_RTOL, worst
    # positional embedding rows past the cut get no gradient on the trimmed path, and none on the
    # stock path either (causal mask, EOT pooling): the cut is exact, not approximate
    length = trimming.length(text)
    assert trimmed_grads["positional_embedding"][length:].abs().max() == 0
    assert stock_grads["positional_embedding"][length:].abs().max() == 0


def test_causal_attention_runs_flash_attention_and_matches_the_mask_under_bf16(device, model_name, record_property):
    """--causal-attention: the text tower runs with only FlashAttention allowed (on CUDA the masked path
    cannot: FlashAttention takes no mask), and its trimmed features and gradients match the mask's."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = open_clip.create_model(model_name, device=device)
    freeze_visual(model)
    trimming = TextTrimming.for_model(model)[0]
    generator = torch.Generator().manual_seed(2)
    text = random_texts(64, model.context_length, generator).reshape(-1, model.context_length).to(device)
    weights = torch.randn(text.shape[0], model.text_projection.shape[-1], generator=generator).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        masked = trimming.encode_text(model, text)
        masked_grads = text_grads(model, trimming.encode_text(model, text), weights)
        if device.type == "cuda":
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), pytest.raises(RuntimeError, match="No available kernel"):
                trimming.encode_text(model, text)
    assert causal_attention(model)[0] == len(model.transformer.resblocks)
    with torch.autocast(device.type, dtype=torch.bfloat16), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        hinted = trimming.encode_text(model, text)
        hinted_grads = text_grads(model, trimming.encode_text(model, text), weights)
    feature_diff = (hinted.float() - masked.float()).abs().max().item()
    rel = {
        k: ((hinted_grads[k] - masked_grads[k]).norm() / masked_grads[k].norm().clamp_min(1e-12)).item()
        for k in masked_grads
        if masked_grads[k].norm() > 0
    }
    worst = max(rel, key=rel.get)
    record_property("causal_feature_max_abs_diff", feature_diff)
    record_property("causal_grad_max_rel_diff", rel[worst])
    record_property("causal_grad_worst_param", worst)
    assert feature_diff <= FEATURE_ATOL
    assert rel[worst] <= GRAD_RTOL, worst


def test_embed_images_finishes_uint8_images_on_the_device_bit_for_bit(device, model_name):
    """embed_images --transfer uint8: to-tensor and Normalize on the device give the CPU transform's values."""
    import numpy as np
    from PIL import Image
    from paraclip_plugin.embed.images import finish_preprocess, split_preprocess

    _, _, preprocess = open_clip.create_model_and_transforms(model_name)
    to_uint8, normalize = split_preprocess(preprocess)
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((256, 256), (300, 211), (97, 400))
    ]
    expected = torch.stack([preprocess(image) for image in images])
    on_device = finish_preprocess(torch.stack([to_uint8(image) for image in images]).to(device), normalize)
    assert on_device.device.type == device.type
    assert torch.equal(on_device.cpu(), expected)


def test_blocked_loss_matches_clip_loss_under_bf16_and_keeps_less_memory(device, record_property):
    """--paraclip-loss-block-size on the device: BlockedClipLoss's loss and gradients are ClipLoss's within bf16
    rounding, and on CUDA its peak (torch.cuda.max_memory_allocated, loss forward and backward) is a fraction
    of ClipLoss's, whose 16,384 x 16,384 logits it does not keep."""
    from open_clip.loss import ClipLoss
    from paraclip_plugin.train.loss import BlockedClipLoss

    cuda = device.type == "cuda"
    n, dim, block = (16384, 512, 2048) if cuda else (256, 32, 32)
    generator = torch.Generator().manual_seed(3)
    inputs = [
        torch.nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=-1).to(device).requires_grad_()
        for _ in range(2)
    ] + [torch.tensor(14.0, device=device, requires_grad=True)]
    results = {}
    for name, loss_fn in (("clip", ClipLoss()), ("blocked", BlockedClipLoss(block))):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn(*inputs)
        grads = torch.autograd.grad(loss, inputs)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else None
        results[name] = (loss.detach(), grads, peak)
    (loss, grads, peak), (blocked, blocked_grads, blocked_peak) = results["clip"], results["blocked"]
    rel = max(((g - h).float().norm() / g.float().norm()).item() for g, h in zip(grads, blocked_grads))
    record_property("blocked_loss_abs_diff", abs(loss - blocked).item())
    record_property("blocked_grad_max_rel_diff", rel)
    assert abs(loss - blocked).item() <= 1e-3 * loss.abs().item()
    assert rel <= GRAD_RTOL
    if cuda:
        record_property("clip_loss_peak_gib", peak)
        record_property("blocked_loss_peak_gib", blocked_peak)
        assert blocked_peak < peak / 4


def test_embed_images_decodes_odd_jpegs_on_the_device_as_the_cpu_path_does(device, model_name, record_property):
    """embed_images --decode-device: truncated, CMYK, greyscale, progressive, PNG-in-jpg (test_device_decode's
    odd images) through DeviceDecoder on the device (nvJPEG on CUDA): each decoded or skipped as the CPU path
    does, every one counted, no crash. nvJPEG's IDCT and chroma upsampling and the float resize differ from
    PIL by a few levels: the mean difference stays under 1.5 levels per image, and the image tower's
    embeddings of both under a cosine of 0.99 nowhere."""
    import functools
    from test_device_decode import UNDECODABLE, odd_images
    from paraclip_plugin.embed.device_decode import DeviceDecoder, tensor_steps
    from paraclip_plugin.embed.images import decode_image, finish_preprocess, split_preprocess

    model, _, preprocess = open_clip.create_model_and_transforms(model_name, device=device)
    to_uint8, normalize = split_preprocess(preprocess)
    cpu = functools.partial(decode_image, preprocess=to_uint8)
    decoder = DeviceDecoder(tensor_steps(preprocess), device, cpu)
    images = odd_images()
    kinds = list(images)
    rows, batch, failed = decoder(list(enumerate(images.values())))
    record_property("decode_counts", "; ".join(f"{why}: {n}" for why, n in sorted(decoder.counts.items())))
    assert {kinds[i] for i in failed} == UNDECODABLE
    assert [kinds[i] for i in rows] == [k for k in kinds if k not in UNDECODABLE]
    assert sum(decoder.counts.values()) == len(images) and decoder.counts[f"on {device.type}"] >= 1
    assert batch.device.type == device.type and batch.dtype == torch.uint8
    expected = torch.stack([cpu(images[kinds[i]]) for i in rows])
    means = [(b.int() - e.int()).abs().float().mean().item() for b, e in zip(batch.cpu(), expected)]
    with torch.no_grad():
        on_device = model.encode_image(finish_preprocess(batch, normalize), normalize=True)
        on_cpu_path = model.encode_image(finish_preprocess(expected.to(device), normalize), normalize=True)
    cosine = torch.nn.functional.cosine_similarity(on_device.float(), on_cpu_path.float()).min().item()
    record_property("decode_worst_mean_level_diff", max(means))
    record_property("decode_min_embedding_cosine", cosine)
    assert max(means) <= 1.5, dict(zip([kinds[i] for i in rows], means))
    assert cosine >= 0.99


@pytest.mark.parametrize("precision", ["amp_bf16", "amp"])
def test_frozen_image_tower_gets_no_gradient_and_stays_bit_identical(device, model_name, precision):
    """Three optimizer steps as open_clip_train takes them (autocast; GradScaler for fp16 'amp')."""
    from paraclip_plugin.train.loss import DEFAULT_TERMS, ParaCLIPLoss, parse_terms

    torch.manual_seed(0)
    model = enable_paraphrase_forward(
        freeze_visual(open_clip.create_model(model_name, device=device, output_dict=True))
    )
    model.train()
    visual_before = {k: v.clone() for k, v in model.visual.state_dict().items()}
    text_before = model.token_embedding.weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scaler = torch.amp.GradScaler(device.type) if precision == "amp" else None
    dtype = torch.float16 if precision == "amp" else torch.bfloat16
    loss_fn = ParaCLIPLoss(parse_terms(DEFAULT_TERMS))
    generator = torch.Generator().manual_seed(1)
    size = model.visual.image_size
    size = size if isinstance(size, tuple) else (size, size)
    for _ in range(3):
        images = torch.randn(16, 3, *size, generator=generator).to(device)
        texts = random_texts(16, model.context_length, generator).to(device)
        with torch.autocast(device.type, dtype=dtype):
            loss = loss_fn(**model(images, texts))
        optimizer.zero_grad()
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        assert all(p.grad is None for p in model.visual.parameters())
    assert not model.visual.training and model.training
    for k, v in model.visual.state_dict().items():
        assert torch.equal(v, visual_before[k]), k
    assert not torch.equal(model.token_embedding.weight, text_before)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    return dict(
        data=write_shards(root / "shards", num_shards=2, per_shard=32),
        init=save_init_checkpoint(root / "init.pt"),
        logs=root / "logs",
    )


@pytest.mark.parametrize(
    "compiled,causal",
    [(False, False), (True, False), (True, True)],
    ids=["eager", "torchcompile", "torchcompile+causal"],
)
def test_open_clip_train_paraclip_steps_in_amp_bf16(device, world, patched_install, compiled, causal, record_property):
    """open_clip_train.main --paraclip-loss --precision amp_bf16 on one device, eager (with the loss in blocks:
    --paraclip-loss-block-size), --torchcompile and --torchcompile --causal-attention (TORCH_LOGS=recompiles,graph_breaks
    shows through the plugin, which open_clip_train would silence: the trimmed forward's deliberate graph break is
    logged and the recompiles are counted)."""
    name = f"amp_bf16_{'compiled' if compiled else 'eager'}{'_causal' if causal else ''}"
    args = train_args(
        world["data"],
        world["logs"],
        name,
        world["init"],
        "--paraclip-loss",
        "--precision",
        "amp_bf16",
        "--device",
        device.type,
        batch_size=16,
    )
    if not compiled:
        args += ["--paraclip-loss-block-size", "5"]
    if compiled:
        args += ["--torchcompile"]
    if causal:
        args += ["--causal-attention"]
    proc = torchrun(
        ["open_clip_train.main", *args], nproc=1, env_extra={"TORCH_LOGS": "recompiles,graph_breaks"}, timeout=600
    )
    log = read_log(world["logs"], name)
    steps = logged_losses(log)
    assert len(steps) == 4  # 64 samples / 16
    assert all(torch.isfinite(torch.tensor(step[t])).item() for step in steps for t in ("Loss", *TERMS))
    assert f"Running with a single process. Device {device.type}" in log
    assert ("ParaCLIP: text attention runs as causal SDPA" in log) == causal
    assert ("each in blocks of 5 rows" in log) == (not compiled)
    state, init = final_state(world["logs"], name), torch.load(world["init"])
    (visual, text), (init_visual, init_text) = split(state), split(init)
    assert all(torch.equal(visual[k], init_visual[k]) for k in init_visual)
    assert not torch.equal(text["token_embedding.weight"], init_text["token_embedding.weight"])
    if compiled:
        output = proc.stdout + proc.stderr
        recompiles = len(re.findall(r"Recompiling function", output))
        record_property("recompiles", recompiles)
        assert "TORCH_LOGS=recompiles,graph_breaks re-applied" in log
        assert "Graph break" in output  # torch's own log line: the user's TORCH_LOGS reached Dynamo
        # cut lengths are multiples of 8 (at most 10 for a 77-token context) and Dynamo makes the length
        # dynamic after its first change: well below its per-frame recompile_limit (8)
        assert recompiles < torch._dynamo.config.recompile_limit
        assert "recompile_limit reached" not in output and "cache_size_limit reached" not in output
