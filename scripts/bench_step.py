#!/usr/bin/env python
"""One training step of ParaCLIP, naive vs the plugin's, on one GPU: samples/s, peak memory, TFLOP/s.

    python scripts/bench_step.py                       # CUDA: ViT-B-32, batches 1024 and 3072, bf16 autocast
    python scripts/bench_step.py --compile             # + torch.compile of the plugin's model
    python scripts/bench_step.py --steps-only naive,plugin-emb,plugin-emb+compile --json step.json
    python scripts/bench_step.py --steps-only naive@1024,plugin-emb+causal+compile@1024,plugin-emb@3072
    python scripts/bench_step.py --cpu-smoke           # CPU, tiny model, small batches: checks the script runs

Steps compared, same batch sizes, random init, tensors already on the device, AdamW on the text tower, the
ParaCLIP loss (3 InfoNCE terms), each case at every text-length setting (--text-lengths): the longest text
in CLIP tokens, SOT and EOT included; each text's length drawn uniformly from half the longest (rounded up)
to the longest, so a batch's longest text is the setting (24: 12-24 tokens, 40: 20-40, 77: 39-77, the
whole context). The naive step runs the full context whatever the lengths; the plugin's step cuts each
batch to its longest text.

    naive       locked image tower (no_grad) on images + three encode_text calls at full context
    plugin-img  the plugin's model (open_clip_train --paraclip-loss): frozen image tower on images +
                one fused text forward cut to the longest sequence
    plugin-emb  the same with cached image embeddings (--image-embeddings): no image tower at all
    NAME+causal   that step with --causal-attention (the text attention as causal SDPA, FlashAttention)
    NAME+compile  that step with the plugin's model under torch.compile (compilation in the warm-up);
                  both as NAME+causal+compile

TFLOP/s counts the step's FLOPs with torch.utils.flop_counter (matmuls/attention as torch dispatches
them) and divides by the measured step time; the peak is the card's dense bf16 tensor-core peak.
"""

import argparse
import json
import time

import open_clip
import torch
from torch.utils.flop_counter import FlopCounterMode

from paraclip_plugin.clitools import add_renamed
from paraclip_plugin.train.attention import causal_attention
from paraclip_plugin.train.loss import ParaCLIPLoss, parse_terms, DEFAULT_TERMS
from paraclip_plugin.train.model import enable_paraphrase_forward, freeze_visual
from paraclip_plugin.train.trimming import TextTrimming
from paraclip_plugin.data.atomic import atomic_write_text
from synthetic_shards import TEXT_LENGTHS, text_length_range

# dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets
BF16_PEAK_TFLOPS = {
    "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200": 989.4,
    "A100": 312.0,
    "L40S": 362.0,
    "A10": 125.0,
}
TINY_CONFIG = "paraclip_plugin/model_configs/paraclip-tiny-77.json"  # the tiny model with CLIP's 77-token context


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--batch-sizes", default="1024,3072")
    p.add_argument("--steps", type=int, default=20, help="timed steps per case")
    add_renamed(
        p,
        "--skip-steps",
        "--warmup",
        dest="warmup",
        type=int,
        default=5,
        help="untimed steps before the timed ones, per case (compilation happens here), as in bench_e2e.py",
    )
    p.add_argument(
        "--text-lengths",
        default="40,24,77",
        metavar="LONGEST,...",
        help="text-length settings, each the longest text in tokens (SOT/EOT included; each text's "
        f"length {TEXT_LENGTHS}); every case runs at each, in this order, the first is the headline "
        "and the one profiled (default: %(default)s)",
    )
    p.add_argument("--compile", action="store_true", help="add plugin-img+compile and plugin-emb+compile")
    p.add_argument("--peak-tflops", type=float, default=None, help="the card's bf16 peak (default: by device name)")
    p.add_argument(
        "--steps-only",
        default="naive,plugin-img,plugin-emb",
        help="cases, comma-separated: naive, plugin-img, plugin-emb, each plugin one also as NAME+compile, "
        "NAME+causal and NAME+causal+compile; each at every --batch-sizes, or NAME@BATCH at that "
        "one only",
    )
    p.add_argument(
        "--profile",
        default="1024",
        metavar="BATCHES",
        help="batch sizes whose cases are also profiled (3 steps under torch.profiler: kernel time by "
        "kind, top kernels, GPU busy share), comma-separated; '' for none (default: %(default)s)",
    )
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="CPU, paraclip-tiny-77 (77-token context), batches 16,32, 2 steps, float32: checks the script, "
        "measures nothing useful",
    )
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.model, args.batch_sizes, args.steps, args.warmup = "paraclip-tiny-77", "16,32", 2, 1
        args.profile = "16"
        open_clip.add_model_config(TINY_CONFIG)
    if args.compile:
        args.steps_only += ",plugin-img+compile,plugin-emb+compile"
    args.profile_batches = {int(b) for b in args.profile.split(",") if b.strip()}
    args.lengths = [int(n) for n in args.text_lengths.split(",")]
    args.plan = plan(args.steps_only, args.batch_sizes)
    return args


def make_model(args, device, plugin, causal=False):
    torch.manual_seed(0)
    model = open_clip.create_model(args.model, output_dict=True, device=device)
    freeze_visual(model)
    if plugin:
        enable_paraphrase_forward(model)
    if causal:
        blocks, why_not = causal_attention(model)
        if not blocks:
            raise SystemExit(f"bench_step.py: +causal does not apply to {args.model}: {why_not}")
    model.train()
    return model


def make_batch(args, model, batch, device, longest):
    lo, hi = text_length_range(longest)
    context = model.context_length
    if longest > context:
        raise SystemExit(f"bench_step.py: --text-lengths {longest} is longer than {args.model}'s context ({context})")
    generator = torch.Generator().manual_seed(longest)
    texts = torch.zeros(batch, 3, context, dtype=torch.long)
    lengths = torch.randint(lo, hi + 1, (batch, 3), generator=generator)
    lengths[0, 0] = hi  # the batch's longest text is the setting
    for i in range(batch):
        for f in range(3):
            n = int(lengths[i, f])
            texts[i, f, 0] = 49406
            texts[i, f, 1 : n - 1] = torch.randint(1, 49000, (n - 2,), generator=generator)
            texts[i, f, n - 1] = 49407
    size = model.visual.image_size
    size = size if isinstance(size, tuple) else (size, size)
    images = torch.randn(batch, 3, *size, generator=generator)
    with torch.no_grad():
        embeddings = model.encode_image(images[:1].to(device), normalize=True)  # shape only
    embeddings = torch.nn.functional.normalize(
        torch.randn(batch, embeddings.shape[-1], generator=generator), dim=-1
    ).half()
    return images.to(device), texts.to(device), embeddings.to(device)


def naive_step(model, loss_fn, images, texts, embeddings):
    with torch.no_grad():
        image_features = model.encode_image(images, normalize=True)
    caption, para1, para2 = (model.encode_text(texts[:, f], normalize=True) for f in range(3))
    return loss_fn(image_features, caption, para1, para2, model.logit_scale.exp())


def plugin_step(model, loss_fn, images, texts, embeddings, use_embeddings):
    out = model(embeddings if use_embeddings else images, texts)
    return loss_fn(**out)


def parse_case(name):
    """'plugin-emb+causal+compile' -> ('plugin-emb', ['causal', 'compile']); an unknown case stops the run."""
    kind, *modifiers = name.split("+")
    if (
        kind not in ("naive", "plugin-img", "plugin-emb")
        or modifiers not in ([], ["compile"], ["causal"], ["causal", "compile"])
        or (modifiers and kind == "naive")
    ):
        raise SystemExit(f"bench_step.py: unknown case '{name}' in --steps-only")
    return kind, modifiers


def plan(steps_only, batch_sizes):
    """(case, batch) in the order they run: batch by batch (--batch-sizes), each batch's cases in
    --steps-only's order; NAME@BATCH runs NAME at that batch only. Checked before anything runs."""
    batches = [int(b) for b in batch_sizes.split(",")]
    pairs = []
    for token in steps_only.split(","):
        name, at, only = token.partition("@")
        parse_case(name)
        if at and (not only.isdigit() or int(only) not in batches):
            raise SystemExit(
                f"bench_step.py: --steps-only '{token}': the batch after @ must be one of --batch-sizes {batch_sizes}"
            )
        pairs += [(name, b) for b in batches if (not at or b == int(only)) and (name, b) not in pairs]
    return sorted(pairs, key=lambda pair: batches.index(pair[1]))  # stable: each batch keeps the cases' order


class Case:
    def __init__(self, name, args, device, autocast):
        self.name, self.args, self.device, self.autocast = name, args, device, autocast
        self.kind, modifiers = parse_case(name)
        compiled = "compile" in modifiers
        self.model = make_model(args, device, plugin=self.kind != "naive", causal="causal" in modifiers)
        self.callable_model = torch.compile(self.model) if compiled else self.model
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
        self.loss_fn = ParaCLIPLoss(parse_terms(DEFAULT_TERMS))

    def step(self, batch):
        with self.autocast():
            if self.kind == "naive":
                loss = naive_step(self.model, self.loss_fn, *batch)
            else:
                loss = plugin_step(self.callable_model, self.loss_fn, *batch, use_embeddings=self.kind == "plugin-emb")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss

    def flops(self, batch):
        """FLOPs of one step, counted on the eager model (the compiled one does the same math)."""
        counter = FlopCounterMode(display=False)
        saved = self.callable_model
        self.callable_model = self.model
        with counter:
            self.step(batch)
        self.callable_model = saved
        return counter.get_total_flops()


# kernel (CUDA) or op (CPU) names -> what the time went to; the first match wins
KINDS = (
    ("attention", ("flash", "fmha", "attention", "attn")),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "aten::mm", "aten::addmm", "aten::bmm")),
    ("optimizer", ("adam", "multi_tensor_apply", "_foreach")),
)


def kind_of(name):
    low = name.lower()
    return next((kind for kind, marks in KINDS if any(m in low for m in marks)), "other")


def profile_case(case, batch, steps=3, top=8):
    """Where one step's time goes: ``steps`` steps under torch.profiler. On CUDA the kernels' own time,
    by kind (matmul, attention, optimizer, other: elementwise, norms, reductions, copies) and the top
    kernels, and the GPU's busy share of the profiled wall time (the profiler's own CPU overhead
    included, so a lower bound where the step is launch-bound). On CPU, the ops' self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = case.device.type == "cuda"
    sync(case.device)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            case.step(batch)
        sync(case.device)
    wall = time.perf_counter() - start
    if cuda:
        events = [
            (e.key, e.self_device_time_total)
            for e in prof.key_averages()
            if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0
        ]
    else:
        events = [(e.key, e.self_cpu_time_total) for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(us for _, us in events) or 1.0
    by_kind = {kind: 0.0 for kind in ("matmul", "attention", "optimizer", "other")}
    for name, us in events:
        by_kind[kind_of(name)] += us
    return {
        "steps": steps,
        "time": "kernel" if cuda else "op self CPU",
        "busy_pct": round(100 * total / 1e6 / wall, 1) if cuda else None,
        "by_kind_pct": {k: round(100 * us / total, 1) for k, us in by_kind.items()},
        "top": [
            {"name": name[:100], "ms_per_step": round(us / 1e3 / steps, 3), "pct": round(100 * us / total, 1)}
            for name, us in sorted(events, key=lambda e: -e[1])[:top]
        ],
    }


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def text_tokens(case, texts, longest):
    """The text-length setting and what reached the text tower: the batch's shortest and longest text
    (tokens through EOT) and the tokens per text the tower ran (the full context for the naive step, the
    cut for the plugin's)."""
    flat = texts.reshape(-1, texts.shape[-1])
    ends = flat.argmax(dim=-1) + 1  # EOT is the highest token id
    trimming = TextTrimming.for_model(case.model)[0]
    ran = flat.shape[-1] if case.kind == "naive" or trimming is None else trimming.length(flat)
    return {
        "longest": longest,
        "range": list(text_length_range(longest)),
        "batch_shortest": int(ends.min()),
        "batch_longest": int(ends.max()),
        "tower_ran": int(ran),
    }


def run_case(case, batch_size, longest, args, profile):
    device = case.device
    batch = make_batch(args, case.model, batch_size, device, longest)
    tokens = text_tokens(case, batch[1], longest)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        for _ in range(args.warmup):
            case.step(batch)
        sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            case.step(batch)
        sync(device)
        seconds = (time.perf_counter() - start) / args.steps
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        flops = case.flops(batch)
        profiled = profile_case(case, batch) if profile else None
    except torch.cuda.OutOfMemoryError:
        case.optimizer.zero_grad(set_to_none=True)
        return dict(oom=True, text_tokens=tokens)
    result = dict(
        oom=False, samples_per_s=batch_size / seconds, peak_gib=peak, tflops=flops / seconds / 1e12, text_tokens=tokens
    )
    if profiled:
        result["profile"] = profiled
    return result


def device_peak(args, device):
    if args.peak_tflops:
        return args.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def main():
    args = parse_args()
    device = torch.device("cpu" if args.cpu_smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
        where = torch.cuda.get_device_name()
    else:
        if not args.cpu_smoke:
            raise SystemExit("bench_step.py needs a CUDA GPU (or --cpu-smoke to check the script on CPU)")
        autocast = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
        where = "CPU (smoke run: not a measurement of the targets)"
    peak = device_peak(args, device)
    print(
        f"device: {where}; model {args.model}, random init; longest texts {args.text_lengths} tokens "
        f"({TEXT_LENGTHS}); bf16 peak {peak or 'unknown'} TFLOP/s",
        flush=True,
    )
    results = {}
    for name, batch_size in args.plan:
        case = Case(name, args, device, autocast)  # one model per case and batch: compiled once, every length
        for longest in args.lengths:
            profile = batch_size in args.profile_batches and longest == args.lengths[0]
            r = results[name, batch_size, longest] = run_case(case, batch_size, longest, args, profile)
            print(
                f"{name} at batch {batch_size}, longest text {longest}: "
                f"{ {k: v for k, v in r.items() if k != 'profile'} }",
                flush=True,
            )
            if "profile" in r:
                print(f"  profile: {json.dumps(r['profile'])}", flush=True)
            if args.json:  # after every case: a run stopped at its time limit keeps what it measured
                atomic_write_text(
                    args.json,
                    json.dumps(
                        {
                            "device": where,
                            "torch": torch.__version__,
                            "model": args.model,
                            "bf16_peak_tflops": peak,
                            "text_lengths": args.lengths,
                            "text_length_distribution": TEXT_LENGTHS,
                            "steps": args.steps,
                            "warmup": args.warmup,
                            "cases": [dict(step=n, batch=b, longest=t, **r) for (n, b, t), r in results.items()],
                        },
                        indent=1,
                    )
                    + "\n",
                )
        del case
    print("| step | batch | longest text | samples/s | peak memory (GiB) | TFLOP/s | % of bf16 peak | x naive |")
    print("|---|---|---|---|---|---|---|---|")
    for (name, batch_size, longest), r in results.items():
        if r["oom"]:
            print(f"| {name} | {batch_size} | {longest} | out of memory | | | | |")
            continue
        naive = results.get(("naive", batch_size, longest), {})
        ratio = f"{r['samples_per_s'] / naive['samples_per_s']:.2f}" if naive and not naive["oom"] else "n/a"
        share = f"{100 * r['tflops'] / peak:.1f}" if peak else "n/a"
        memory = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        print(
            f"| {name} | {batch_size} | {longest} | {r['samples_per_s']:,.0f} | {memory} | {r['tflops']:.3g} "
            f"| {share} | {ratio} |"
        )


if __name__ == "__main__":
    main()
