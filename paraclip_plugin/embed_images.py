"""Add cached image embeddings (and token ids) to existing four-field ParaCLIP shards.

    paraclip-embed-images --shards '/data/para/{00000..00999}.tar' \\
        --model ViT-B-32 --pretrained openai [--output /data/para-emb/] [--batch-size 512]

Per sample it adds ``<key>.img_emb.npy`` (float16 encode_image(preprocess_val(image), normalize=True)
of the frozen image tower) and, unless ``--no-tokens``, ``<key>.tokens.npy`` (the ids of caption,
para1 and para2 from ``--model``'s tokenizer), and records both sources in ``<key>.json``
(``paraclip_image_embedding``: model, pretrained tag, sha256 of the image weights, also as
training's 16-bit ``--precision`` choices convert them;
``paraclip_tokens``: tokenizer and its fingerprint); see paraclip_plugin/embeddings.py and
pretokenized.py. All other members are copied unchanged. (``python scripts/embed_images.py`` is the
same program.)

Shards are rewritten in place (or written to ``--output``) one at a time, atomically: a shard is
either the old file or the complete new one. A rerun skips shards already embedded with the same
image weights (and tokenizer), so a killed job resumes at the shard it was working on. Runs on the
GPU when there is one. Train on the result with ``--paraclip-loss --image-embeddings``.
"""
import argparse
import io
import json
import logging
import os
import sys
import time

import numpy as np
import open_clip
import torch
from PIL import Image

from paraclip_plugin.embeddings import (EMBEDDING_FIELD, METADATA_KEY as EMBEDDING_KEY, embedding_record,
                                        encode_embedding, precision_fingerprints, visual_fingerprint)
from paraclip_plugin.paraphrase.inputs import expand_inputs, split_for_job
from paraclip_plugin.paraphrase.shard_io import InputError, read_tar_samples
from paraclip_plugin.pretokenized import (METADATA_KEY as TOKENS_KEY, TEXT_FIELDS, TOKENS_FIELD, stored_tokens,
                                          tokenizer_pad_id, tokens_record)
from paraclip_plugin.shards import IMAGE_EXTENSIONS, METADATA, atomic_tar_writer, update_sizes_json


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="paraclip-embed-images", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="four-field shards: brace patterns and globs, several joined with '::'")
    p.add_argument("--output", default=None, help="folder for the new shards (+ sizes.json); default: rewrite in place")
    p.add_argument("--model", required=True, help="open_clip model name, as given to training's --model")
    p.add_argument("--pretrained", default=None, help="pretrained tag or checkpoint file, as given to training's --pretrained")
    p.add_argument("--model-config", action="append", default=[], help="register an open_clip model config first")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=4, help="image decoding processes")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--precision", choices=("fp32", "amp"), default="fp32",
                   help="amp: bf16 autocast on CUDA (faster; features differ from fp32 by bf16 rounding)")
    p.add_argument("--tokens", action=argparse.BooleanOptionalAction, default=True,
                   help="also store the token ids of the three texts (default on)")
    p.add_argument("--num-jobs", type=int, default=1, help="split the shards over this many jobs")
    p.add_argument("--job-index", type=int, default=0)
    return p.parse_args(argv)


class ImageBytes(torch.utils.data.Dataset):
    """Decode + preprocess one sample's image in a worker; None where it can't be decoded."""

    def __init__(self, images, preprocess):
        self.images, self.preprocess = images, preprocess

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        try:
            with Image.open(io.BytesIO(self.images[index])) as image:
                return index, self.preprocess(image.convert("RGB"))
        except Exception as e:  # a broken image loses its embedding, not the shard
            logging.warning(f"image {index} not decodable: {e}")
            return index, None


def collate(items):
    kept = [(i, x) for i, x in items if x is not None]
    indices = [i for i, _ in kept]
    return indices, torch.stack([x for _, x in kept]) if kept else None


class ShardEmbedder:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, _, self.preprocess = open_clip.create_model_and_transforms(
            args.model, pretrained=args.pretrained, device=self.device)
        self.visual = model.visual.eval().requires_grad_(False)
        # also what these weights hash to in training's 16-bit weight precisions (--precision pure_bf16, ...)
        self.record = embedding_record(args.model, args.pretrained, visual_fingerprint(self.visual),
                                       precision_fingerprints(args.model, args.pretrained))
        self.tokenizer = open_clip.get_tokenizer(args.model) if args.tokens else None
        if self.tokenizer is not None:
            self.tokens_record = tokens_record(args.model, self.tokenizer)
            self.pad_id = tokenizer_pad_id(self.tokenizer)
        logging.info(f"image tower of {args.model} / {args.pretrained}: sha256 {self.record['visual_sha256']}, "
                     f"on {self.device}")

    def is_done(self, path):
        """True when ``path`` was written by a run with the same image weights (and tokenizer)."""
        if not os.path.exists(path):
            return False
        for sample in read_tar_samples(path):
            if not any(ext in sample for ext in IMAGE_EXTENSIONS):
                continue
            meta = json.loads(sample[METADATA]) if METADATA in sample else {}
            # shards are replaced whole, so the first sample with an image speaks for the shard
            done = EMBEDDING_FIELD in sample and meta.get(EMBEDDING_KEY) == self.record
            if self.tokenizer is not None:
                done = done and TOKENS_FIELD in sample and meta.get(TOKENS_KEY) == self.tokens_record
            return done
        return False

    @torch.no_grad()
    def embed(self, images):
        """float16 [n, dim] per image (rows of undecodable images are None)."""
        loader = torch.utils.data.DataLoader(
            ImageBytes(images, self.preprocess), batch_size=self.args.batch_size, num_workers=self.args.workers,
            collate_fn=collate, pin_memory=self.device.type == "cuda")
        features = [None] * len(images)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.precision == "amp")
        for indices, batch in loader:
            if batch is None:
                continue
            with autocast:
                out = self.visual(batch.to(self.device, non_blocking=True))
            out = torch.nn.functional.normalize(out.float(), dim=-1).half().cpu().numpy()
            for i, row in zip(indices, out):
                features[i] = row
        return features

    def process(self, src, dst):
        samples = list(read_tar_samples(src))
        with_image = [s for s in samples if any(ext in s for ext in IMAGE_EXTENSIONS)]
        images = [next(s[ext] for ext in IMAGE_EXTENSIONS if ext in s) for s in with_image]
        features = self.embed(images)
        embedded = 0
        for sample, feature in zip(with_image, features):
            meta = json.loads(sample[METADATA]) if METADATA in sample else {}
            meta.pop(EMBEDDING_KEY, None)
            sample.pop(EMBEDDING_FIELD, None)  # never keep an embedding of other weights
            if feature is not None:
                sample[EMBEDDING_FIELD] = encode_embedding(feature)
                meta[EMBEDDING_KEY] = self.record
                embedded += 1
            if self.tokenizer is not None and all(f in sample for f in TEXT_FIELDS):
                texts = [sample[f].decode("utf-8") for f in TEXT_FIELDS]
                buf = io.BytesIO()
                np.save(buf, stored_tokens(self.tokenizer, texts, self.pad_id))
                sample[TOKENS_FIELD] = buf.getvalue()
                meta[TOKENS_KEY] = self.tokens_record
            sample[METADATA] = json.dumps(meta).encode()
        # an integer mtime (the source shard's): webdataset's default float time.time() makes every
        # member carry an extra pax header, which readers then parse (measurably slower loading)
        with atomic_tar_writer(dst, mtime=int(os.path.getmtime(src))) as sink:
            for sample in samples:
                sink.write({k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")})
        return len(samples), embedded


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for path in args.model_config:
        open_clip.add_model_config(path)
    try:
        shards = split_for_job(expand_inputs(args.shards), args.num_jobs, args.job_index)
    except InputError as e:
        print(f"embed_images: error: {e}", file=sys.stderr)
        return 2
    if args.output:
        os.makedirs(args.output, exist_ok=True)
    embedder = ShardEmbedder(args)
    for src in shards:
        dst = os.path.join(args.output, os.path.basename(src)) if args.output else src
        if embedder.is_done(dst):
            logging.info(f"{dst}: already embedded with these weights, skipped")
            continue
        start = time.time()
        count, embedded = embedder.process(src, dst)
        if args.output:
            update_sizes_json(args.output, {os.path.basename(dst): count})
        logging.info(f"{dst}: {embedded}/{count} samples embedded in {time.time() - start:.1f}s "
                     f"({embedded / max(time.time() - start, 1e-9):.0f} images/s)")
    return 0


def console_main():
    sys.exit(main())


if __name__ == "__main__":
    console_main()
