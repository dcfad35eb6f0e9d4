#!/usr/bin/env python
"""End to end from shards on local disk: real ``torchrun -m open_clip_train.main`` runs on one GPU.

    python scripts/bench_e2e.py --folder /tmp/e2e --json e2e.json          # CUDA: ViT-B-32, 51,200 samples
    python scripts/bench_e2e.py --cpu-smoke --folder /tmp/e2e-smoke        # CPU, tiny model: checks the script
    python scripts/bench_e2e.py --shards-only --folder /tmp/e2e            # step 1 alone (CPU), for a later run

1. Writes LAION-like four-field shards (256 px JPEGs of ~15 KiB, texts of 8-16 words) in parallel.
2. Times, in this order, each a fresh open_clip_train process with the same model, batch and workers:
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
   the defaults skip one round and time four. The accum case times its optimizer steps after the first.
   open_clip's 'Data (t)' share of that time is reported as data_wait_pct. It is not all loader time:
   open_clip starts the next step's data timer before its log line, whose loss.item() waits for the GPU
   to finish the step, so with a line per step Data (t) also holds the GPU's backlog. A high share with
   the GPU busy (GPU util) means the step is the bound; with the GPU idle, the loader. Where
   ``nvidia-smi`` exists, GPU utilisation and memory in use are sampled every 0.2 s during each run
   (memory: what the process holds, allocator cache included, so an upper bound of the peak tensor
   memory).
Ratios against ``stock`` are measured in the same call, on the same machine.
"""
import argparse
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

from synthetic_shards import write_shards

from paraclip_plugin.shards import atomic_write_text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(REPO, "paraclip_plugin", "model_configs", "paraclip-tiny.json")
STEP_RE = re.compile(r"^(\S+) \|.*Train Epoch: \d+ \[.*Data \(t\): ([0-9.]+) Batch \(t\): ([0-9.]+), "
                     r"([0-9.e+]+)/s, ([0-9.e+]+)/s/gpu")
DONE_RE = re.compile(r"done: \d+ images in [0-9.]+s \(([0-9.]+)s after start-up\); waiting for the data workers "
                     r"([0-9.]+)s, image tower ([0-9.]+)s, writing shards ([0-9.]+)s")
CASES = ("stock", "paraclip", "embed", "embed-device-decode", "embed-float32", "cached", "cached+causal", "cached+compile", "cached+causal+compile",
         "compact", "accum")
# the cached cases' flags beside --paraclip-loss --image-embeddings
CACHED = {"cached": (), "cached+causal": ("--causal-attention",), "cached+compile": ("--torchcompile",),
          "cached+causal+compile": ("--causal-attention", "--torchcompile")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", required=True, help="work folder on local disk (shards, logs)")
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--samples", type=int, default=51200, help="samples written (50k+ so shards are not re-read "
                                                              "within a run)")
    p.add_argument("--per-shard", type=int, default=1024)
    p.add_argument("--embed-samples", type=int, default=None,
                   help="samples (whole shards) that embed/compact embed and the cached runs read, resampled "
                        "like the others (default: all --samples; fewer saves device time, not loader work)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=75, help="optimizer steps per training run")
    p.add_argument("--skip-steps", type=int, default=15, help="first steps left out (warm-up: worker start, "
                                                                "the first burst of batches)")
    p.add_argument("--workers", type=int, default=15, help="data workers per run (and processes writing shards)")
    p.add_argument("--precision", default="amp_bf16")
    p.add_argument("--accum-batch", type=int, default=32768, help="samples per optimizer step of the accum case")
    p.add_argument("--accum-micro-batch", type=int, default=4096)
    p.add_argument("--accum-steps", type=int, default=3, help="optimizer steps of the accum case (the first "
                                                                 "is left out of its samples/s)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    p.add_argument("--run-timeout", type=float, default=240, help="seconds before one run is stopped")
    p.add_argument("--json", default=None, help="write the results here (after every case)")
    p.add_argument("--shards-only", action="store_true",
                   help="write the shards and stop (gpu_check.sh does this on the CPU while its tests run); a "
                        "later run with the same --folder, --samples and --per-shard uses them")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="CPU, paraclip-tiny, 512 samples, batch 32, 2 workers, fp32: checks the script only")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.model, args.samples, args.per_shard, args.batch_size = "paraclip-tiny", 512, 128, 32
        args.steps, args.skip_steps, args.workers, args.precision = 6, 2, 2, "fp32"
        args.accum_batch, args.accum_micro_batch, args.accum_steps = 64, 32, 3
        # Inductor on 2 CPU cores: minutes, not a check
        args.cases = ",".join(c for c in args.cases.split(",") if not c.endswith("+compile") and c != "embed-device-decode")
    return args


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
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout.split("\n")[0]
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
        return {"gpu_util_mean_pct": round(statistics.mean(s[1] for s in window), 1),
                "gpu_memory_max_gib": round(max(s[2] for s in self.samples) / 1024, 2)}


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


def train(args, name, data, *flags, batch_size=None, steps=None, skip_steps=None):
    batch_size = batch_size or args.batch_size
    steps = steps or args.steps
    skip_steps = args.skip_steps if skip_steps is None else skip_steps
    accum = int(flags[flags.index("--accum-freq") + 1]) if "--accum-freq" in flags else 1
    logs = os.path.join(args.folder, "logs")
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", "1",
           "--master_port", str(29500 + CASES.index(name)), "-m", "open_clip_train.main",
           "--train-data", data, "--dataset-type", "webdataset", "--dataset-resampled",
           "--train-num-samples", str(steps * batch_size * accum), "--model", args.model,
           "--batch-size", str(batch_size), "--workers", str(args.workers), "--precision", args.precision,
           "--lr", "1e-5", "--wd", "0.001", "--warmup", "2", "--epochs", "1", "--seed", "0",
           "--device", "cpu" if args.cpu_smoke else "cuda", "--save-frequency", "0",
           "--logs-dir", logs, "--name", name, "--log-every-n-steps", "1", "--pretrained", args.init, *flags]
    if args.cpu_smoke:
        cmd += ["--model-config", TINY_CONFIG]
    shutil.rmtree(os.path.join(logs, name), ignore_errors=True)
    with GpuSampler() as gpu:
        code, seconds = run(cmd, os.path.join(args.folder, f"{name}.log"), args.run_timeout,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    out_log = os.path.join(logs, name, "out.log")
    rates = step_rates(open(out_log).read()) if os.path.exists(out_log) else []
    timed = rates[skip_steps:] if len(rates) > skip_steps else []
    result = {"exit": code, "seconds": round(seconds, 1), "steps_logged": len(rates), "batch": batch_size * accum,
              "flags": " ".join(flags)}
    if timed:
        result["samples_per_s"] = round(len(timed) / sum(1 / r[1] for r in timed), 1)
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
    cmd = [sys.executable, os.path.join(REPO, "scripts", "embed_images.py"), "--shards", plain,
           "--output", embedded, "--model", args.model, "--pretrained", args.init, "--batch-size", "512" if not args.cpu_smoke else "64",
           "--workers", str(args.workers), "--precision", "amp" if not args.cpu_smoke else "fp32"]
    if args.cpu_smoke:
        cmd += ["--model-config", TINY_CONFIG]
    log = os.path.join(args.folder, f"{name}.log")
    with GpuSampler() as gpu:
        code, seconds = run(cmd + list(extra), log, args.run_timeout)
    result = {"exit": code, "seconds": round(seconds, 1), "images": args.embed_samples,
              "images_per_s": round(args.embed_samples / seconds, 1), **gpu.summary()}
    # embed_images.py's last line: where its main process spent the job (what bounds it)
    done = DONE_RE.search(open(log).read()) if os.path.exists(log) else None
    if done:
        looping, waiting, encoding, writing = map(float, done.groups())
        result.update(after_startup_s=looping, waiting_s=waiting, encoding_s=encoding, writing_s=writing,
                      data_wait_pct=round(100 * waiting / looping, 1) if looping else None)
    return result


def plain_shards(args):
    """The four-field shards every case starts from: (brace pattern, {seconds, mean_jpeg_kib}). Written
    here, or those an earlier run (--shards-only) wrote in the same --folder with the same settings: its
    record is written after the last shard, and removed before shards are written over."""
    folder = os.path.join(args.folder, "plain")
    record, settings = os.path.join(folder, "written.json"), {"samples": args.samples, "per_shard": args.per_shard}
    try:
        with open(record) as f:
            written = json.load(f)
        if {key: written.get(key) for key in settings} == settings:
            print(f"shards: {args.samples} samples, written by an earlier run in {written['result']['seconds']}s",
                  flush=True)
            return written["pattern"], dict(written["result"], reused=True)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if os.path.exists(record):
        os.remove(record)
    start = time.time()
    pattern, mean_jpeg = write_shards(folder, args.samples, args.per_shard, processes=args.workers)
    result = {"seconds": round(time.time() - start, 1), "mean_jpeg_kib": round(mean_jpeg / 1024, 1)}
    atomic_write_text(record, json.dumps(dict(settings, pattern=pattern, result=result)) + "\n")
    print(f"shards: {args.samples} samples, mean JPEG {mean_jpeg / 1024:.1f} KiB, in {time.time() - start:.0f}s",
          flush=True)
    return pattern, result


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.folder, exist_ok=True)
    cases = args.cases.split(",")
    unknown = set(cases) - set(CASES)
    if unknown:
        raise SystemExit(f"bench_e2e.py: unknown --cases {', '.join(sorted(unknown))}")
    if args.shards_only:
        device = "n/a (shards only)"
    elif not args.cpu_smoke:
        import torch
        if not torch.cuda.is_available():
            raise SystemExit("bench_e2e.py needs a CUDA GPU (or --cpu-smoke to check the script on CPU)")
        device = torch.cuda.get_device_name()
    else:
        device = "CPU (smoke run: not a measurement of the targets)"
    results = {"device": device, "model": args.model, "samples": args.samples, "batch": args.batch_size,
               "workers": args.workers, "precision": args.precision, "steps": args.steps,
               "skip_steps": args.skip_steps, "cpu_cores": os.cpu_count(), "cases": {}}

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
    # the shards embedded for the cached cases: the first --embed-samples' worth
    shards = -(-min(args.embed_samples or args.samples, args.samples) // args.per_shard)
    args.embed_samples = results["embed_samples"] = min(shards * args.per_shard, args.samples)
    to_embed = os.path.join(os.path.dirname(plain), "{" + f"00000..{shards - 1:05d}" + "}.tar")
    embedded = os.path.join(args.folder, "embedded")
    emb_pattern = os.path.join(embedded, os.path.basename(to_embed))
    for name in cases:
        if name == "stock":
            r = train(args, name, plain, "--lock-image")
        elif name == "paraclip":
            r = train(args, name, plain, "--paraclip-loss")
        elif name == "embed":
            r = embed(args, name, to_embed, embedded)
        elif name == "embed-device-decode":
            r = embed(args, name, to_embed, os.path.join(args.folder, "embedded-device-decode"), "--decode-device", "cuda")
        elif name == "embed-float32":
            r = embed(args, name, to_embed, os.path.join(args.folder, "embedded-float32"), "--transfer", "float32")
        elif name in CACHED:
            r = train(args, name, emb_pattern, "--paraclip-loss", "--image-embeddings", *CACHED[name])
        elif name == "compact":
            compact = os.path.join(args.folder, "compact")
            made = embed(args, "embed-compact", to_embed, compact, "--compact")
            r = train(args, name, os.path.join(compact, os.path.basename(to_embed)), "--paraclip-loss", "--image-embeddings")
            r["embed"] = made
        else:  # accum
            accum = args.accum_batch // args.accum_micro_batch
            r = train(args, name, emb_pattern, "--paraclip-loss", "--image-embeddings", "--accum-freq", str(accum),
                      batch_size=args.accum_micro_batch, steps=args.accum_steps, skip_steps=1)
            r["optimizer_steps"] = r.pop("steps_logged")
        results["cases"][name] = r
        print(f"{name}: {r}", flush=True)
        save()
    failed = [name for name, r in results["cases"].items() if r["exit"] != 0]
    if failed:
        print(f"bench_e2e.py: failed: {', '.join(failed)} (logs in {args.folder})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
