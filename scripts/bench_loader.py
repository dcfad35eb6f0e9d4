#!/usr/bin/env python
"""Data loading on CPU: stock open_clip vs the plugin's loaders, on the same shards, in one run.

    python scripts/bench_loader.py [--samples 1024] [--workers 1] [--seconds 10]

It writes LAION-like four-field shards (256 px JPEGs of ~15 KiB, captions and paraphrases of 8-16
words), adds img_emb.npy + tokens.npy to a copy with paraclip-embed-images (and a compact copy, --compact), then times
open_clip_train's own ``get_wds_dataset`` (the real training loader: shard shuffling, sample
shuffle buffer, WebLoader worker processes) four ways:

    stock          no plugin flags: JPEG decode + train transform + one caption tokenized
    plugin-jpeg    --paraclip-loss: JPEG decode + train transform + three texts tokenized
    plugin-cached  --paraclip-loss --image-embeddings on the embedded copy: stored embeddings and
                   token ids, no image decoding, no tokenizing
    plugin-compact the same on compact shards (paraclip-embed-images --compact): one packed member per sample

samples/s are counted after the first batch (worker start-up) for ``--seconds`` each, in
``--rounds`` interleaved rounds (median reported), with
``--workers`` data workers (default 1: a per-worker rate). The image tower is not timed here: the
embeddings are random unit vectors of the model's width, recorded with the hash of the model's
real (random-init) image weights, which is all the loader reads and checks.
"""

import argparse
import os
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import open_clip
import torch

from paraclip_plugin.train import hooks
from paraclip_plugin.train.state import ParaCLIPRun
from paraclip_plugin.train.embeddings import (
    embedding_record,
    preprocess_config,
    visual_architecture,
    visual_fingerprint,
)
from paraclip_plugin.data.inputs import expand_inputs
from paraclip_plugin.embed import images as embed_tool
from synthetic_shards import write_shards


class RandomTower:
    """An image tower for ``ShardEmbedder`` (``preprocess``, ``record``, ``device``, ``encode``) whose ``encode``
    returns random unit vectors of ``width``: the benchmarks time what surrounds the tower."""

    def __init__(self, preprocess, record, width, device="cpu", seed=1):
        self.preprocess, self.record, self.width, self.device = preprocess, record, width, torch.device(device)
        self.rng = np.random.default_rng(seed)

    @classmethod
    def of(cls, model, model_name, pretrained, preprocess, precision="fp32"):
        """Random vectors of ``model``'s width, recorded with the hash of ``model``'s real (random-init) image
        weights: all that the loaders read and check."""
        record = embedding_record(
            model_name,
            pretrained,
            visual_fingerprint(model.visual),
            architecture=visual_architecture(model.visual),
            preprocess=preprocess_config(model.visual),
            precision=precision,
        )
        return cls(preprocess, record, model.visual.output_dim)

    def encode(self, batch):
        x = self.rng.standard_normal((len(batch), self.width))
        return torch.from_numpy((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16))


def embed_shards(src_pattern, dst_folder, model_name, model, preprocess, compact=False):
    """paraclip-embed-images over ``src_pattern`` into ``dst_folder`` (all in this process), its image tower a
    ``RandomTower``; returns the pattern of the new shards."""
    argv = ["--shards", src_pattern, "--model", model_name, "--output", dst_folder, "--workers", "0"]
    args = embed_tool.parse_args(argv + (["--compact"] if compact else []))
    os.makedirs(dst_folder, exist_ok=True)
    embedder = embed_tool.ShardEmbedder(args, RandomTower.of(model, model_name, args.pretrained, preprocess))
    embed_tool.embed_shards(args, embedder, expand_inputs(src_pattern))
    return os.path.join(dst_folder, os.path.basename(src_pattern))


def loader_args(data, samples, args, **plugin):
    """What open_clip_train.main's args hold for get_wds_dataset and the hooks: the plugin's flags at
    their defaults (from its own parser), then ``plugin``'s."""
    parser = argparse.ArgumentParser()
    hooks.add_arguments(parser)
    largs = SimpleNamespace(
        **{
            **vars(parser.parse_args([])),
            "frozen_visual": False,
            "train_data": data,
            "val_data": None,
            "train_num_samples": 10**9,
            "dataset_resampled": True,
            "train_data_upsampling_factors": None,
            "batch_size": args.batch_size,
            "workers": args.workers,
            "seed": 0,
            "world_size": 1,
            "rank": 0,
            "model": args.model,
            "pretrained": None,
            "precision": "amp",
            **plugin,
        }
    )
    largs.paraclip = ParaCLIPRun(*hooks.loss_terms(largs))  # the state hooks.configure puts on open_clip's args
    return largs


def time_loader(name, largs, model, preprocess, tokenizer, seconds):
    from open_clip_train.data import get_wds_dataset

    hooks.wrap_model(model, largs)  # what open_clip_train.main does before building the data
    data = get_wds_dataset(largs, preprocess, is_train=True, tokenizer=tokenizer)
    batches = iter(data.dataloader)
    images, texts = next(batches)  # worker start-up, shard opening: not counted
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        images, texts = next(batches)
        count += images.shape[0]
    rate = count / (time.perf_counter() - start)
    del batches
    return rate, tuple(images.shape[1:]), tuple(texts.shape[1:])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32", help="preprocessing, tokenizer and embedding width of this model")
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--per-shard", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seconds", type=float, default=8.0, help="timed seconds per loader and round")
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds over the loaders (interleaved, so load from other processes hits all); "
        "the median round is reported",
    )
    p.add_argument("--folder", default=None, help="where to write the shards (default: a temporary folder)")
    args = p.parse_args()
    torch.set_num_threads(1)

    folder = args.folder or tempfile.mkdtemp(prefix="bench_loader_")
    start = time.time()
    plain, mean_jpeg = write_shards(os.path.join(folder, "plain"), args.samples, args.per_shard)
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(args.model)
    tokenizer = open_clip.get_tokenizer(args.model)
    cached = embed_shards(plain, os.path.join(folder, "embedded"), args.model, model, preprocess_val)
    compact = embed_shards(plain, os.path.join(folder, "compact"), args.model, model, preprocess_val, compact=True)
    print(
        f"shards: {args.samples} samples in {folder} ({args.per_shard}/shard, mean JPEG {mean_jpeg / 1024:.1f} KiB, "
        f"256 px), written in {time.time() - start:.0f}s; {os.cpu_count()} CPU cores visible; "
        f"{args.workers} data worker(s), batch {args.batch_size}, {args.seconds:g}s per loader"
    )

    cases = [
        ("stock open_clip (JPEG + one caption)", plain, {}),
        ("plugin, JPEG + three texts (--paraclip-loss)", plain, dict(paraclip_loss=True, frozen_visual=True)),
        (
            "plugin, cached embeddings + token ids (--image-embeddings)",
            cached,
            dict(paraclip_loss=True, frozen_visual=True, image_embeddings=True),
        ),
        (
            "plugin, compact shards (paraclip-embed-images --compact, --image-embeddings)",
            compact,
            dict(paraclip_loss=True, frozen_visual=True, image_embeddings=True),
        ),
    ]
    rounds = {name: [] for name, _, _ in cases}
    for round_ in range(args.rounds):
        for name, data, plugin in cases:
            largs = loader_args(data, args.samples, args)
            vars(largs).update(plugin)
            rate, image_shape, text_shape = time_loader(name, largs, model, preprocess_train, tokenizer, args.seconds)
            rounds[name].append(rate)
            print(
                f"  round {round_ + 1}, {name}: {rate:,.0f} samples/s  (per sample: image {image_shape}, "
                f"text {text_shape})"
            )
    rates = [float(np.median(rounds[name])) for name, _, _ in cases]
    print()
    print(
        f"| loader | samples/s ({args.workers} worker{'s' if args.workers > 1 else ''}, median of "
        f"{args.rounds} rounds) | x stock |"
    )
    print("|---|---|---|")
    for (name, _, _), rate in zip(cases, rates):
        print(f"| {name} | {rate:,.0f} | {rate / rates[0]:.2f} |")


if __name__ == "__main__":
    main()
