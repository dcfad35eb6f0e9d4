#!/usr/bin/env python
"""paraclip-embed-images' image rate against the stock open_clip loader's JPEG rate, same images, one run.

    python scripts/bench_embed.py [--samples 4096] [--workers 2] [--rounds 5]            # CPU
    python scripts/bench_embed.py --device cuda --workers 15 --samples 16384             # a GPU: + embed-device-decode

It writes LAION-like four-field shards (256 px JPEGs of ~15 KiB, quality 80) and times, in interleaved
rounds, each over the same shards with the same image transform (``--model``'s preprocess_val) and the
same number of data workers:

    stock             open_clip_train's own ``get_wds_dataset`` (the training loader: shard and sample
                      shuffling, WebLoader workers decoding with PIL, the transform, one caption tokenized)
                      with batches of ``--per-shard`` images
    embed             paraclip-embed-images (``ShardEmbedder.run``): workers read a shard, tokenize its three
                      texts, decode and transform its images up to uint8; the main process finishes the
                      transform (to-tensor + Normalize) and writes the shard with the embeddings
    embed-float32     the same with --transfer float32 (the whole transform in the workers)
    embed-device-decode  --decode-device cuda: the workers read and tokenize, the main process decodes the
                      JPEGs in batches with nvJPEG and resizes them on the GPU (by default with --device
                      cuda only; named in --cases on the CPU it runs the same code with decode_jpeg on the
                      CPU, which checks the case, not nvJPEG's speed)

Each tool hands over one ``--per-shard`` unit at a time (a batch, a shard), so both pipeline alike.
Start-up (workers starting, shuffle buffers filling, the first unit) is reported apart: the time to the
first unit. Steady state is the images after the first unit over the time after it; whole is every image
over the whole pass up to the last unit (shutting down workers is left out). Model creation is outside
both. On the CPU the image tower is not run (on 2 cores it would be the bound, and on a GPU it is not):
the embed cases get random unit vectors of the tower's width, everything else the tool does (Normalize
included) runs. With --device cuda the tower runs (bf16 autocast, as bench_e2e.py's embed case). The
summary is the median of the rounds with their range, and each case's ratio to stock (the ratio of
medians, and the range of the per-round ratios).
"""

import argparse
import os
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import open_clip
import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_loader import RandomTower, loader_args as stock_loader_args  # noqa: E402
from synthetic_shards import write_shards  # noqa: E402

from paraclip_plugin.data.inputs import expand_inputs  # noqa: E402
from paraclip_plugin.embed.images import ImageTower, ShardEmbedder, parse_args  # noqa: E402


class Timer:
    """Times a pass that delivers units of images: start-up (to the first unit), steady state, whole."""

    def __init__(self):
        self.start, self.first, self.count, self.first_count = time.perf_counter(), None, 0, 0

    def add(self, images):
        self.count, self.last = self.count + images, time.perf_counter()
        if self.first is None:
            self.first, self.first_count = self.last, images

    def result(self):
        """Up to the last unit (worker shutdown after it is left out)."""
        end = self.last
        return {
            "startup_s": self.first - self.start,
            "whole": self.count / (end - self.start),
            "steady": (self.count - self.first_count) / max(end - self.first, 1e-9),
            "images": self.count,
        }


def loader_args(data, args):
    """What open_clip_train.main's args hold for get_wds_dataset: bench_loader.py's, with batches of a shard."""
    return stock_loader_args(
        data, None, SimpleNamespace(batch_size=args.per_shard, workers=args.workers, model=args.model)
    )


def time_stock(pattern, args, preprocess, tokenizer):
    from open_clip_train.data import get_wds_dataset

    timer = Timer()
    data = get_wds_dataset(loader_args(pattern, args), preprocess, is_train=True, tokenizer=tokenizer)
    batches = iter(data.dataloader)
    while timer.count < args.samples:
        images, _ = next(batches)
        timer.add(images.shape[0])
    del batches
    return timer.result()


def time_embed(embedder, jobs):
    timer = Timer()
    for _, _, embedded, _ in embedder.run(jobs):
        timer.add(embedded)
    return timer.result()


def make_embedder(args, pattern, extra):
    argv = [
        "--shards",
        pattern,
        "--model",
        args.model,
        "--device",
        args.device,
        "--workers",
        str(args.workers),
        "--batch-size",
        str(args.batch_size),
        "--no-tokens" if args.no_tokens else "--tokens",
        *extra,
    ]
    if args.device == "cuda":
        argv += ["--precision", "amp_bf16"]
    tool_args = parse_args(argv)
    tower = ImageTower.load(tool_args)
    if args.device == "cpu":  # the tool's work around the tower (uint8 images finished by Normalize), not the tower
        tower = RandomTower(tower.preprocess, tower.record, tower.visual.output_dim, tower.device, seed=0)
    return ShardEmbedder(tool_args, tower)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32", help="whose image transform and tower (random init)")
    p.add_argument(
        "--model-config", action="append", default=[], help="register an open_clip model config first; may be repeated"
    )
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--per-shard", type=int, default=256, help="samples per shard, and the stock loader's batch")
    p.add_argument("--workers", type=int, default=2, help="data workers of every case")
    p.add_argument("--batch-size", type=int, default=256, help="the embed tool's --batch-size (image tower)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; median and range reported")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--no-tokens", action="store_true", help="embed cases with --no-tokens (decode work only)")
    p.add_argument(
        "--cases",
        default=None,
        help="comma-separated, from stock, embed, embed-float32, "
        "embed-device-decode (default: all; the last with --device cuda only)",
    )
    p.add_argument("--folder", default=None, help="where to write the shards (default: a temporary folder)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_embed.py: --device cuda, but torch finds no CUDA device")
    torch.set_num_threads(1 if args.device == "cpu" else torch.get_num_threads())
    for config in args.model_config:
        open_clip.add_model_config(config)

    folder = args.folder or tempfile.mkdtemp(prefix="bench_embed_")
    pattern, mean_jpeg = write_shards(os.path.join(folder, "plain"), args.samples, args.per_shard)
    jobs = [(src, os.path.join(folder, "out", os.path.basename(src))) for src in expand_inputs(pattern)]
    os.makedirs(os.path.join(folder, "out"), exist_ok=True)
    _, _, preprocess = open_clip.create_model_and_transforms(args.model)
    tokenizer = open_clip.get_tokenizer(args.model)
    variants = {
        "embed": [],
        "embed-float32": ["--transfer", "float32"],
        "embed-device-decode": ["--decode-device", "cuda"],
    }
    names = (
        args.cases.split(",")
        if args.cases
        else ["stock", "embed", "embed-float32"] + (["embed-device-decode"] if args.device == "cuda" else [])
    )
    unknown = set(names) - {"stock", *variants}
    if unknown:
        raise SystemExit(f"bench_embed.py: unknown --cases {', '.join(sorted(unknown))}")
    embedders = {name: make_embedder(args, pattern, variants[name]) for name in names if name != "stock"}
    print(
        f"shards: {args.samples} samples ({args.per_shard}/shard, 256 px JPEG quality 80, mean "
        f"{mean_jpeg / 1024:.1f} KiB) in {folder}; {args.model}'s preprocess_val; {args.workers} data worker(s); "
        f"{os.cpu_count()} CPU cores visible; device {args.device}"
        f"{'' if args.device == 'cpu' else ' (' + torch.cuda.get_device_name() + ')'}; image tower "
        f"{'not run (random unit vectors)' if args.device == 'cpu' else 'run, bf16 autocast'}; embed cases "
        f"{'without' if args.no_tokens else 'with'} token ids"
    )
    results = {name: [] for name in names}
    for round_ in range(args.rounds):
        for name in names:
            r = (
                time_stock(pattern, args, preprocess, tokenizer)
                if name == "stock"
                else time_embed(embedders[name], jobs)
            )
            results[name].append(r)
            print(
                f"  round {round_ + 1}, {name}: steady {r['steady']:,.0f} images/s, whole {r['whole']:,.0f} "
                f"images/s, start-up {r['startup_s']:.2f}s ({r['images']} images)",
                flush=True,
            )
    print()
    summary(results, args)


def summary(results, args):
    def med_range(values, fmt):
        return f"{fmt.format(np.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"

    base = results.get("stock")
    print("| case | steady images/s | x stock (steady) | whole-pass images/s | x stock (whole) | start-up s |")
    print("|---|---|---|---|---|---|")
    for name, rounds in results.items():
        cells = [name]
        for key in ("steady", "whole"):
            values = [r[key] for r in rounds]
            cells.append(med_range(values, "{:,.0f}"))
            if base:
                ratios = [r[key] / b[key] for r, b in zip(rounds, base)]
                cells.append(
                    f"{np.median(values) / np.median([b[key] for b in base]):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
                )
            else:
                cells.append("n/a")
        cells.append(med_range([r["startup_s"] for r in rounds], "{:.2f}"))
        print("| " + " | ".join(cells) + " |")
    print(
        f"(median of {args.rounds} interleaved rounds, range in brackets; ratio: of the medians, range: of the "
        f"rounds' ratios)"
    )


if __name__ == "__main__":
    main()
