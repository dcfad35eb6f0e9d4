#!/usr/bin/env python
"""End to end from shards on local disk: real ``torchrun -m open_clip_train.main`` runs on one GPU.

    python scripts/bench_e2e.py --folder /tmp/e2e --json e2e.json          # CUDA: ViT-B-32, 51,200 samples
    python scripts/bench_e2e.py --folder /tmp/e2e --cases stock@40,cached+causal+compile --text-lengths 40,77
    python scripts/bench_e2e.py --cpu-smoke --folder /tmp/e2e-smoke        # CPU, tiny model: checks the script
    python scripts/bench_e2e.py --shards-only --folder /tmp/e2e            # step 1 alone (CPU), for a later run

1. Writes LAION-like four-field shards (256 px JPEGs of ~15 KiB) in parallel, one set per text-length
   setting (--text-lengths: the longest text in CLIP tokens, SOT and EOT included; each text's length
   uniform from half the longest, rounded up, to the longest; the same JPEGs in every set). The tokens
   each setting's first shard really holds are counted with open_clip's tokenizer and recorded.
2. Times, in --cases order, each a fresh open_clip_train process with the same model, batch and workers
   (NAME runs at every --text-lengths setting, in that order, NAME@L at setting L only; the embedding
   passes embed, embed-float32 and compact's run once, over every setting's shards):
     stock        open_clip's own LiT fine-tuning: --lock-image, JPEG + one caption
     paraclip     --paraclip-loss from JPEGs (image tower frozen, three texts)
     embed        scripts/embed_images.py on the GPU (adds img_emb.npy + tokens.npy; images/s)
     embed-device-decode  the same with --decode-device cuda (JPEGs decoded by nvJPEG in batches)
     embed-float32  the same with --transfer float32 (the whole image transform in the data workers:
                  4x the bytes per image to pin and copy; the baseline of embed's uint8 default)
     cached       --paraclip-loss --image-embeddings (no image decoding, no image tower)
     cached+causal   the same with --causal-attention (text attention as causal SDPA: FlashAttention)
     cached+compile  the same with --torchcompile
     cached+causal+compile  with both
     compact      embed_images.py --compact (timed like embed), then --paraclip-loss --image-embeddings
                  on those compact shards (one packed member per sample)
     accum        --paraclip-loss --image-embeddings, --batch-size x --accum-freq = --accum-batch
                  (one optimizer step of e.g. 32,768 samples on one GPU)
   samples/s come from open_clip's own 'Train Epoch' log lines (one per step: batch / step time, data
   waits included): the steps after --skip-steps warm-up steps together, i.e. their samples over the
   sum of their step times (the harmonic mean of the per-step rates). Data workers deliver batches in
   bursts (each worker one whole batch), so the window should span several rounds of --workers steps:
   the defaults skip one round and time three windows of 10 steps. The accum case times its optimizer
   steps after the first, one window each. samples/s is the windows' median; their range is reported.
   open_clip's 'Data (t)' share of that time is reported as data_wait_pct. It is not all loader time:
   open_clip starts the next step's data timer before its log line, whose loss.item() waits for the GPU
   to finish the step, so with a line per step Data (t) also holds the GPU's backlog. A high share with
   the GPU busy (GPU util) means the step is the bound; with the GPU idle, the loader. Where
   ``nvidia-smi`` exists, GPU utilisation and memory in use are sampled every 0.2 s during each run
   (memory: what the process holds, allocator cache included, so an upper bound of the peak tensor
   memory). Every training run runs under scripts/peak_memory.py, whose torch.cuda.max_memory_allocated
   at the end of the run is peak_allocated_gib.
Ratios against ``stock`` are measured in the same call, on the same machine.
"""

import argparse
import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime

from synthetic_shards import TEXT_LENGTHS, shard_name, text_length_range, write_shards

from paraclip_plugin.data.atomic import atomic_write_text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(REPO, "paraclip_plugin", "model_configs", "paraclip-tiny-77.json")  # 77-token context
PEAK_RE = re.compile(r"^peak_memory: max_memory_allocated ([0-9.]+) GiB, max_memory_reserved ([0-9.]+) GiB", re.M)
STEP_RE = re.compile(
    r"^(\S+) \|.*Train Epoch: \d+ \[.*Data \(t\): ([0-9.]+) Batch \(t\): ([0-9.]+), "
    r"([0-9.e+]+)/s, ([0-9.e+]+)/s/gpu"
)
DONE_RE = re.compile(
    r"done: \d+ images in [0-9.]+s \(([0-9.]+)s after start-up\); waiting for the data workers "
    r"([0-9.]+)s, image tower ([0-9.]+)s, writing shards ([0-9.]+)s"
)
CASES = (
    "stock",
    "paraclip",
    "embed",
    "embed-device-decode",
    "embed-float32",
    "cached",
    "cached+causal",
    "cached+compile",
    "cached+causal+compile",
    "compact",
    "accum",
)
# the cached cases' flags beside --paraclip-loss --image-embeddings
CACHED = {
    "cached": (),
    "cached+causal": ("--causal-attention",),
    "cached+compile": ("--torchcompile",),
    "cached+causal+compile": ("--causal-attention", "--torchcompile"),
}
EMBEDS = ("embed", "embed-device-decode", "embed-float32")  # run once, over every setting's shards
PORTS = itertools.count(29500)  # a master port per training run


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", required=True, help="work folder on local disk (shards, logs)")
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument(
        "--samples", type=int, default=51200, help="samples written (50k+ so shards are not re-read within a run)"
    )
    p.add_argument("--per-shard", type=int, default=1024)
    p.add_argument(
        "--embed-samples",
        type=int,
        default=None,
        help="samples (whole shards) that embed/compact embed and the cached runs read, resampled "
        "like the others (default: all --samples; fewer saves device time, not loader work)",
    )
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=45, help="optimizer steps per training run")
    p.add_argument(
        "--skip-steps",
        type=int,
        default=15,
        help="first steps left out (warm-up: worker start, the first burst of batches)",
    )
    p.add_argument(
        "--windows",
        type=int,
        default=3,
        help="the timed steps in this many consecutive windows; samples/s is their median, their range is reported",
    )
    p.add_argument(
        "--text-lengths",
        default="40,24,77",
        metavar="LONGEST,...",
        help=f"text-length settings: the longest text in tokens (SOT/EOT included), each text's length "
        f"{TEXT_LENGTHS}; the first is the headline (default: %(default)s)",
    )
    p.add_argument("--workers", type=int, default=15, help="data workers per run (and processes writing shards)")
    p.add_argument("--precision", default="amp_bf16")
    p.add_argument("--accum-batch", type=int, default=32768, help="samples per optimizer step of the accum case")
    p.add_argument(
        "--accum-micro-batch",
        type=int,
        default=2048,
        help="--batch-size of the accum case (--accum-freq = --accum-batch / this). Its text tower's "
        "activations are kept for backward: ~19 KiB per token and layer in bf16 for ViT-B-32 (50 GiB "
        "at 3 x 3,072 texts of <= 24 tokens, H200), so 3 x 4,096 texts of 40 tokens need ~110 GiB and "
        "3 x 2,048 ~55 GiB (default: %(default)s)",
    )
    p.add_argument(
        "--accum-steps",
        type=int,
        default=4,
        help="optimizer steps of the accum case (the first is left out of its samples/s)",
    )
    p.add_argument(
        "--accum-block-size",
        type=int,
        default=4096,
        help="--paraclip-loss-block-size of the accum case (0: open_clip's ClipLoss, all logits at once)",
    )
    p.add_argument(
        "--cases",
        default=",".join(CASES),
        help=f"comma-separated, from {', '.join(CASES)}; NAME@LONGEST runs NAME at that text-length setting only",
    )
    p.add_argument("--run-timeout", type=float, default=240, help="seconds before one run is stopped")
    p.add_argument("--json", default=None, help="write the results here (after every case)")
    p.add_argument(
        "--shards-only",
        action="store_true",
        help="write the shards and stop (gpu_check.sh does this on the CPU while its tests run); a "
        "later run with the same --folder, --samples and --per-shard uses them",
    )
    p.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="CPU, paraclip-tiny-77 (77-token context), 512 samples, batch 32, 2 workers, fp32, loss blocks "
        "of 16: checks the script only",
    )
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.model, args.samples, args.per_shard, args.batch_size = "paraclip-tiny-77", 512, 128, 32
        args.steps, args.skip_steps, args.workers, args.precision = 8, 2, 2, "fp32"
        args.accum_batch, args.accum_micro_batch, args.accum_steps, args.accum_block_size = 64, 32, 4, 16
        # Inductor on 2 CPU cores: minutes, not a check
        args.cases = ",".join(c for c in args.cases.split(",") if "+compile" not in c and c != "embed-device-decode")
    args.lengths = [int(n) for n in args.text_lengths.split(",")]
    args.plan = plan(args.cases, args.lengths)
    return args


def plan(cases, lengths):
    """(case, longest) in the order they run: --cases' order, a bare NAME at every setting in --text-lengths'
    order, NAME@L at L only; the embedding passes once (longest None). Checked before anything runs."""
    pairs = []
    for token in cases.split(","):
        name, at, only = token.partition("@")
        if name not in CASES:
            raise SystemExit(f"bench_e2e.py: unknown case '{name}' in --cases; cases are {', '.join(CASES)}")
        if at and (not only.isdigit() or int(only) not in lengths):
            raise SystemExit(
                f"bench_e2e.py: --cases '{token}': the setting after @ must be one of --text-lengths "
                f"{','.join(map(str, lengths))}"
            )
        wanted = [None] if name in EMBEDS else [int(only)] if at else lengths
        pairs += [(name, length) for length in wanted if (name, length) not in pairs]
    return pairs


def case_key(name, longest):
    """The result's key: 'stock@40'; an embedding pass, over every setting, by its name alone."""
    return name if longest is None else f"{name}@{longest}"


class GpuSampler:
    """nvidia-smi every 0.2 s in a thread: utilisation (%) and memory in use (MiB)."""

    def __init__(self):
        self.samples, self.stop, self.thread = [], threading.Event(), None

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self.thread = threading.Thread(target=self.run, daemon=True)
            self.thread.start()
        return self

    def run(self):
        while not self.stop.is_set():
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
            ).stdout.split("\n")[0]
            try:
                util, memory = (float(x) for x in out.split(","))
                self.samples.append((time.time(), util, memory))
            except ValueError:
                pass
            self.stop.wait(0.2)

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread:
            self.thread.join()

    def summary(self, start=None, end=None):
        window = [s for s in self.samples if (start is None or s[0] >= start) and (end is None or s[0] <= end)]
        if not window:
            return {}
        return {
            "gpu_util_mean_pct": round(statistics.mean(s[1] for s in window), 1),
            "gpu_memory_max_gib": round(max(s[2] for s in self.samples) / 1024, 2),
        }


def run(cmd, log_path, timeout, env=None):
    """Run ``cmd``, output to ``log_path``; returns (exit code, seconds). Stops it at ``timeout``."""
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            code = "timeout"
    return code, time.time() - start


def step_rates(log_text):
    """Per logged step: (time, samples/s, seconds waiting for data, step seconds) from open_clip's
    'Train Epoch' lines (logged every step, open_clip's meters hold that step alone)."""
    rates = []
    for line in log_text.splitlines():
        m = STEP_RE.match(line)
        if m:
            when = datetime.strptime(m.group(1), "%Y-%m-%d,%H:%M:%S").timestamp()
            rates.append((when, float(m.group(4)), float(m.group(2)), float(m.group(3))))
    return rates


def windows(timed, count):
    """The timed steps in ``count`` consecutive windows (as even as can be), each window's samples/s."""
    count = max(1, min(count, len(timed)))
    bounds = [round(i * len(timed) / count) for i in range(count + 1)]
    return [round(len(w) / sum(1 / r[1] for r in w), 1) for w in (timed[a:b] for a, b in zip(bounds, bounds[1:]))]


def train(args, name, data, *flags, batch_size=None, steps=None, skip_steps=None):
    batch_size = batch_size or args.batch_size
    steps = steps or args.steps
    skip_steps = args.skip_steps if skip_steps is None else skip_steps
    accum = int(flags[flags.index("--accum-freq") + 1]) if "--accum-freq" in flags else 1
    logs = os.path.join(args.folder, "logs")
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "torchrun"),
        "--nproc_per_node",
        "1",
        "--master_port",
        str(next(PORTS)),
        os.path.join(REPO, "scripts", "peak_memory.py"),
        "open_clip_train.main",
        "--train-data",
        data,
        "--dataset-type",
        "webdataset",
        "--dataset-resampled",
        "--train-num-samples",
        str(steps * batch_size * accum),
        "--model",
        args.model,
        "--batch-size",
        str(batch_size),
        "--workers",
        str(args.workers),
        "--precision",
        args.precision,
        "--lr",
        "1e-5",
        "--wd",
        "0.001",
        "--warmup",
        "2",
        "--epochs",
        "1",
        "--seed",
        "0",
        "--device",
        "cpu" if args.cpu_smoke else "cuda",
        "--save-frequency",
        "0",
        "--logs-dir",
        logs,
        "--name",
        name,
        "--log-every-n-steps",
        "1",
        "--pretrained",
        args.init,
        *flags,
    ]
    if args.cpu_smoke:
        cmd += ["--model-config", TINY_CONFIG]
    shutil.rmtree(os.path.join(logs, name), ignore_errors=True)
    log = os.path.join(args.folder, f"{name}.log")
    with GpuSampler() as gpu:
        code, seconds = run(cmd, log, args.run_timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))
    out_log = os.path.join(logs, name, "out.log")
    rates = step_rates(open(out_log).read()) if os.path.exists(out_log) else []
    timed = rates[skip_steps:] if len(rates) > skip_steps else []
    result = {
        "exit": code,
        "seconds": round(seconds, 1),
        "steps_logged": len(rates),
        "batch": batch_size * accum,
        "flags": " ".join(flags),
    }
    peak = PEAK_RE.search(open(log, errors="replace").read()) if os.path.exists(log) else None
    if peak:
        result["peak_allocated_gib"], result["peak_reserved_gib"] = float(peak.group(1)), float(peak.group(2))
    if timed:
        rates = windows(timed, args.windows)
        result["samples_per_s"] = statistics.median(rates)
        result["windows_samples_per_s"] = rates
        result["range_samples_per_s"] = [min(rates), max(rates)]
        result["overall_samples_per_s"] = round(len(timed) / sum(1 / r[1] for r in timed), 1)
        result["timed_steps"] = len(timed)
        # open_clip's Data (t) share of the timed steps' time: the loader, and the GPU's backlog (docstring)
        result["data_wait_pct"] = round(100 * sum(r[2] for r in timed) / sum(r[3] for r in timed), 1)
        result.update(gpu.summary(timed[0][0], timed[-1][0] + 1))
    else:
        result.update(gpu.summary())
    return result


def save_init(args):
    import open_clip
    import torch

    if args.cpu_smoke:
        open_clip.add_model_config(TINY_CONFIG)
    torch.manual_seed(0)
    torch.save(open_clip.create_model(args.model).state_dict(), args.init)


def embed(args, name, plain, embedded, *extra):
    """embed_images.py over the shards ``plain`` names, written to ``embedded``; images/s over the whole run."""
    cmd = [
        sys.executable,
        os.path.join(REPO, "scripts", "embed_images.py"),
        "--shards",
        plain,
        "--output",
        embedded,
        "--model",
        args.model,
        "--pretrained",
        args.init,
        "--batch-size",
        "512" if not args.cpu_smoke else "64",
        "--workers",
        str(args.workers),
        "--precision",
        "amp" if not args.cpu_smoke else "fp32",
    ]
    if args.cpu_smoke:
        cmd += ["--model-config", TINY_CONFIG]
    log = os.path.join(args.folder, f"{name}.log")
    with GpuSampler() as gpu:
        code, seconds = run(cmd + list(extra), log, args.run_timeout)
    result = {
        "exit": code,
        "seconds": round(seconds, 1),
        "images": args.embed_samples,
        "images_per_s": round(args.embed_samples / seconds, 1),
        **gpu.summary(),
    }
    # embed_images.py's last line: where its main process spent the job (what bounds it)
    done = DONE_RE.search(open(log).read()) if os.path.exists(log) else None
    if done:
        looping, waiting, encoding, writing = map(float, done.groups())
        result.update(
            after_startup_s=looping,
            waiting_s=waiting,
            encoding_s=encoding,
            writing_s=writing,
            data_wait_pct=round(100 * waiting / looping, 1) if looping else None,
        )
    return result


def measured_text_tokens(folder, lengths, per_shard):
    """Per setting: the shortest and longest text (CLIP tokens through EOT) in its first shard, counted with
    open_clip's tokenizer (what training reads)."""
    from open_clip.tokenizer import tokenize
    from paraclip_plugin.data.tars import read_tar_samples

    measured = {}
    for longest in lengths:
        texts = [
            sample[field].decode()
            for sample in read_tar_samples(os.path.join(folder, shard_name(0, longest)))
            for field in ("txt", "para1.txt", "para2.txt")
        ]
        counts = (tokenize(texts) != 0).sum(dim=1)
        measured[str(longest)] = {"shortest": int(counts.min()), "longest": int(counts.max()), "texts": len(texts)}
    return measured


def plain_shards(args):
    """The four-field shards every case starts from, a set per text-length setting: (brace pattern with
    '{longest}', {seconds, mean_jpeg_kib, text_tokens}). Written here, or those an earlier run
    (--shards-only) wrote in the same --folder with the same settings: its record is written after the last
    shard, and removed before shards are written over."""
    folder = os.path.join(args.folder, "plain")
    record = os.path.join(folder, "written.json")
    settings = {"samples": args.samples, "per_shard": args.per_shard, "text_lengths": sorted(args.lengths)}
    try:
        with open(record) as f:
            written = json.load(f)
        if {key: written.get(key) for key in settings} == settings:
            print(
                f"shards: {args.samples} samples, written by an earlier run in {written['result']['seconds']}s",
                flush=True,
            )
            return written["pattern"], dict(written["result"], reused=True)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if os.path.exists(record):
        os.remove(record)
    start = time.time()
    pattern, mean_jpeg = write_shards(
        folder, args.samples, args.per_shard, processes=args.workers, longest=sorted(args.lengths)
    )
    result = {
        "seconds": round(time.time() - start, 1),
        "mean_jpeg_kib": round(mean_jpeg / 1024, 1),
        "text_tokens": measured_text_tokens(folder, sorted(args.lengths), args.per_shard),
    }
    atomic_write_text(record, json.dumps(dict(settings, pattern=pattern, result=result)) + "\n")
    print(
        f"shards: {args.samples} samples per text-length setting ({', '.join(map(str, sorted(args.lengths)))}), "
        f"mean JPEG {mean_jpeg / 1024:.1f} KiB, in {time.time() - start:.0f}s",
        flush=True,
    )
    return pattern, result


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.folder, exist_ok=True)
    if args.shards_only:
        device = "n/a (shards only)"
    elif not args.cpu_smoke:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("bench_e2e.py needs a CUDA GPU (or --cpu-smoke to check the script on CPU)")
        device = torch.cuda.get_device_name()
    else:
        device = "CPU (smoke run: not a measurement of the targets)"
    results = {
        "device": device,
        "model": args.model,
        "samples": args.samples,
        "batch": args.batch_size,
        "workers": args.workers,
        "precision": args.precision,
        "steps": args.steps,
        "skip_steps": args.skip_steps,
        "windows": args.windows,
        "text_lengths": args.lengths,
        "text_length_distribution": TEXT_LENGTHS,
        "cpu_cores": os.cpu_count(),
        "cases": {},
    }

    def save():
        if args.json:
            atomic_write_text(args.json, json.dumps(results, indent=1) + "\n")

    plain, results["shards"] = plain_shards(args)
    if args.shards_only:
        return 0
    # one random-init checkpoint for every run: embed_images.py and training must see the same image weights
    args.init = os.path.join(args.folder, "init.pt")
    save_init(args)
    save()
    # the shards embedded for the cached cases: the first --embed-samples' worth of every setting
    shards = -(-min(args.embed_samples or args.samples, args.samples) // args.per_shard)
    results["embed_samples"] = min(shards * args.per_shard, args.samples)
    args.embed_samples = results["embed_samples"] * len(args.lengths)  # images per embedding pass
    first = "{" + f"00000..{shards - 1:05d}" + "}.tar"
    plain_folder = os.path.dirname(plain)
    to_embed = "::".join(os.path.join(plain_folder, f"t{longest}-{first}") for longest in args.lengths)
    made = {}

    def embedded(kind):
        """The folder of the embedded shards (kind 'embed' or 'compact'), made on first use."""
        folder = os.path.join(args.folder, "embedded" if kind == "embed" else kind)
        if kind not in made:
            made[kind] = embed(
                args,
                "embed" if kind == "embed" else "embed-compact",
                to_embed,
                folder,
                *(("--compact",) if kind == "compact" else ()),
            )
            if kind == "embed":
                results["cases"]["embed"] = made[kind]
                print(f"embed: {made[kind]}", flush=True)
                save()
        return folder

    for name, longest in args.plan:
        key = case_key(name, longest)
        run_name = key.replace("@", "-t")
        data = plain.replace("{longest}", str(longest))
        if name == "stock":
            r = train(args, run_name, data, "--lock-image")
        elif name == "paraclip":
            r = train(args, run_name, data, "--paraclip-loss")
        elif name == "embed":
            if "embed" in made:
                continue
            embedded("embed")
            continue
        elif name == "embed-device-decode":
            r = embed(
                args, name, to_embed, os.path.join(args.folder, "embedded-device-decode"), "--decode-device", "cuda"
            )
        elif name == "embed-float32":
            r = embed(args, name, to_embed, os.path.join(args.folder, "embedded-float32"), "--transfer", "float32")
        elif name in CACHED:
            r = train(
                args,
                run_name,
                os.path.join(embedded("embed"), f"t{longest}-{first}"),
                "--paraclip-loss",
                "--image-embeddings",
                *CACHED[name],
            )
        elif name == "compact":
            fresh = "compact" not in made
            r = train(
                args,
                run_name,
                os.path.join(embedded("compact"), f"t{longest}-{first}"),
                "--paraclip-loss",
                "--image-embeddings",
            )
            if fresh:
                r["embed"] = made["compact"]
        else:  # accum
            accum = args.accum_batch // args.accum_micro_batch
            blocks = ("--paraclip-loss-block-size", str(args.accum_block_size)) if args.accum_block_size else ()
            r = train(
                args,
                run_name,
                os.path.join(embedded("embed"), f"t{longest}-{first}"),
                "--paraclip-loss",
                "--image-embeddings",
                "--accum-freq",
                str(accum),
                *blocks,
                batch_size=args.accum_micro_batch,
                steps=args.accum_steps,
                skip_steps=1,
            )
            r["optimizer_steps"] = r.pop("steps_logged")
        if longest is not None:
            r["longest"], r["text_tokens"] = longest, list(text_length_range(longest))
        results["cases"][key] = r
        print(f"{key}: {r}", flush=True)
        save()
    failed = [name for name, r in results["cases"].items() if r["exit"] != 0]
    if failed:
        print(f"bench_e2e.py: failed: {', '.join(failed)} (logs in {args.folder})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
