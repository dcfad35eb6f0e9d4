#!/usr/bin/env python
"""embed_images.py's data side on CPU: --transfer uint8 (the default) vs float32, same shards, one run.

    python scripts/bench_embed.py [--samples 2048] [--workers 1] [--rounds 3]

It writes LAION-like four-field shards (256 px JPEGs of ~15 KiB) and times ``ShardEmbedder.loader``,
the DataLoader that embed_images.py's main process reads: its workers read each shard, tokenize the
texts and decode and preprocess the images, and hand the shard's image batch over shared memory.
With uint8 the workers stop before to-tensor and Normalize (done beside the image tower: on the GPU),
so each image costs them less and crosses to the main process (and, on a GPU, is pinned and copied)
in a quarter of the bytes. The image tower is not run: on a GPU it is not the bound (the GPU check's
embed rows show the GPU a few percent busy). Reports images/s per transfer (median of interleaved rounds, after the first shard)
and the ratio to float32.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from synthetic_shards import write_shards  # noqa: E402

from paraclip_plugin.paraphrase.inputs import expand_inputs  # noqa: E402
from paraclip_plugin.train.embed_images import ShardEmbedder, parse_args  # noqa: E402


def time_loader(embedder, jobs):
    """(images/s after the first shard, bytes per image handed over) of one pass over ``jobs``."""
    count, nbytes, start = 0, 0, None
    for _, _, _, rows, images in embedder.loader(jobs):
        if start is None:  # worker start-up and the first shard: not counted
            start = time.perf_counter()
            continue
        count += len(rows)
        nbytes += images.numel() * images.element_size()
    seconds = time.perf_counter() - start
    return count / seconds, nbytes / max(count, 1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32", help="whose image transform (random init; no weights needed)")
    p.add_argument("--model-config", default=None, help="register an open_clip model config first")
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--per-shard", type=int, default=256)
    p.add_argument("--workers", type=int, default=1, help="data workers (default 1: a per-worker rate)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    p.add_argument("--folder", default=None, help="where to write the shards (default: a temporary folder)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.model_config:
        import open_clip
        open_clip.add_model_config(args.model_config)

    folder = args.folder or tempfile.mkdtemp(prefix="bench_embed_")
    pattern, mean_jpeg = write_shards(os.path.join(folder, "plain"), args.samples, args.per_shard)
    jobs = [(src, None) for src in expand_inputs(pattern)]
    embedders = {transfer: ShardEmbedder(parse_args(["--shards", pattern, "--model", args.model, "--device", "cpu",
                                                     "--workers", str(args.workers), "--transfer", transfer]))
                 for transfer in ("float32", "uint8")}
    print(f"shards: {args.samples} samples ({args.per_shard}/shard, mean JPEG {mean_jpeg / 1024:.1f} KiB) in {folder}; "
          f"{args.workers} data worker(s); {os.cpu_count()} CPU cores visible")
    rates = {transfer: [] for transfer in embedders}
    for round_ in range(args.rounds):
        for transfer, embedder in embedders.items():
            rate, per_image = time_loader(embedder, jobs)
            rates[transfer].append(rate)
            print(f"  round {round_ + 1}, --transfer {transfer}: {rate:,.0f} images/s, {per_image / 1024:,.0f} KiB "
                  f"per image handed over")
    median = {transfer: float(np.median(r)) for transfer, r in rates.items()}
    print()
    print(f"| --transfer | images/s ({args.workers} worker{'s' if args.workers > 1 else ''}, median of {args.rounds} "
          f"rounds) | x float32 |")
    print("|---|---|---|")
    for transfer, rate in median.items():
        print(f"| {transfer} | {rate:,.0f} | {rate / median['float32']:.2f} |")


if __name__ == "__main__":
    main()
