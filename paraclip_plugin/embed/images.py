"""Add cached image embeddings (and token ids) to existing four-field ParaCLIP shards.

    paraclip-embed-images --shards '/data/para/{00000..00999}.tar' \\
        --model ViT-B-32 --pretrained openai [--output /data/para-emb/] [--batch-size 512]

Per sample it adds ``<key>.img_emb.npy`` (float16 encode_image(preprocess_val(image), normalize=True)
of the frozen image tower) and, unless ``--no-tokens``, ``<key>.tokens.npy`` (the ids of caption,
para1 and para2 from ``--model``'s tokenizer), and records both sources in ``<key>.json``
(``paraclip_image_embedding``: model, pretrained tag, sha256 of the image weights, also as
training's 16-bit ``--precision`` choices convert them, sha256 of the image tower's architecture, the
image transform (open_clip's preprocess config) and ``--precision``;
``paraclip_tokens``: tokenizer and its fingerprint); see paraclip_plugin/train/embeddings.py and
pretokenized.py. All other members are copied unchanged. A sample that training would skip for its
texts (one missing, empty, white space only or not UTF-8) gets no token ids (a warning names it) and
is left out of ``--compact`` shards, so both kinds of shard train on the same samples.

Shards are rewritten in place (or written to ``--output``) one at a time, atomically: a shard is
either the old file or the complete new one. A rerun skips shards already embedded with the same
image weights, architecture, transform and precision (and tokenizer), so a killed job resumes at the shard
it was working on; a shard embedded with other settings is embedded again (the log says which differ). Runs on the
GPU when there is one; ``--decode-device cuda`` also decodes the JPEGs there (nvJPEG, device_decode.py), and
``--writers`` processes write the shards. Train on the result with ``--paraclip-loss --image-embeddings``.
"""

import argparse
import collections
import concurrent.futures
import functools
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
from torchvision import transforms

from paraclip_plugin.train.compact import COMPACT_FIELD, pack
from .device_decode import DeviceDecoder, tensor_steps
from paraclip_plugin.train.embeddings import (
    EMBEDDING_FIELD,
    METADATA_KEY as EMBEDDING_KEY,
    embedding_record,
    encode_embedding,
    precision_fingerprints,
    preprocess_config,
    visual_architecture,
    visual_fingerprint,
)
from paraclip_plugin.clitools import EMBED_IMAGES, NON_NEGATIVE_INT, POSITIVE_INT, check_job_split, print_error
from paraclip_plugin.data.inputs import expand_inputs, split_for_job
from paraclip_plugin.data.errors import InputError
from paraclip_plugin.data.tars import count_tar_samples, read_tar_samples
from paraclip_plugin.train.model import freeze_visual
from paraclip_plugin.train.pretokenized import (
    METADATA_KEY as TOKENS_KEY,
    TEXT_FIELDS,
    TOKENS_FIELD,
    stored_tokens,
    texts_problem,
    tokenizer_pad_id,
    tokens_record,
)
from paraclip_plugin.data.atomic import OutputBusy
from paraclip_plugin.data.layout import IMAGE_EXTENSIONS, METADATA, read_sizes_json, update_sizes_json
from paraclip_plugin.data.tars import atomic_tar_writer


def _precision(text):
    """``--precision``'s value; ``amp``, this tool's older name for bf16 autocast, is ``amp_bf16`` (open_clip_train's
    ``amp`` is float16 autocast)."""
    if text == "amp":
        print(
            "paraclip-embed-images: warning: --precision amp is deprecated; use --precision amp_bf16 "
            "(the same bf16 autocast; open_clip_train's --precision amp is float16)",
            file=sys.stderr,
        )
        return "amp_bf16"
    return text


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog=EMBED_IMAGES, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--shards", required=True, help="four-field shards: brace patterns and globs, several joined with '::'"
    )
    p.add_argument("--output", default=None, help="folder for the new shards (+ sizes.json); default: rewrite in place")
    p.add_argument("--model", required=True, help="open_clip model name, as given to training's --model")
    p.add_argument(
        "--pretrained", default=None, help="pretrained tag or checkpoint file, as given to training's --pretrained"
    )
    p.add_argument("--model-config", action="append", default=[], help="register an open_clip model config first")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=256)
    p.add_argument("--workers", type=NON_NEGATIVE_INT, default=4, help="image decoding processes")
    p.add_argument(
        "--writers",
        type=NON_NEGATIVE_INT,
        default=None,
        help="processes writing the finished shards (tar members, fsync) while this one feeds the "
        "image tower; default: a quarter of --workers (half with --decode-device cuda), at least 1 "
        "(0 with --workers 0: all in this process)",
    )
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument(
        "--precision",
        type=_precision,
        choices=("fp32", "amp_bf16"),
        default="fp32",
        help="amp_bf16: bf16 autocast on --device, CUDA or CPU (faster on a GPU; on the CPU often slower); "
        "features differ from fp32 by bf16 rounding. Recorded with the embeddings: a rerun with "
        "the other precision embeds the shards again",
    )
    p.add_argument(
        "--transfer",
        choices=("uint8", "float32"),
        default="uint8",
        help="uint8 (default): the data workers stop before the image transform's to-tensor and "
        "Normalize steps, which run on --device, bit for bit the same; 4x fewer bytes per image "
        "between processes and to the GPU. float32: the whole transform in the workers",
    )
    p.add_argument(
        "--decode-device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cpu (default): the data workers decode and resize the images (PIL). cuda: the workers "
        "read and tokenize, this process decodes the JPEGs in batches with nvJPEG and resizes "
        "them on the GPU beside the image tower (values within a level or so of the CPU path's: "
        "paraclip_plugin/embed/device_decode.py); images it can't take (not JPEG, CMYK, "
        "truncated, ...) are decoded on the CPU as without it, or skipped, and counted",
    )
    p.add_argument(
        "--tokens",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also store the token ids of the three texts (default on)",
    )
    p.add_argument(
        "--compact",
        action="store_true",
        help="write compact training shards to --output (paraclip_plugin/train/compact.py): per sample only "
        "the embedding and token ids (one .pcl member) and the json records, no image bytes and no "
        "texts; ~8x less to store and read with --image-embeddings. Keep the four-field shards.",
    )
    p.add_argument("--num-jobs", type=POSITIVE_INT, default=1, help="split the shards over this many jobs")
    p.add_argument("--job-index", type=NON_NEGATIVE_INT, default=0)
    args = p.parse_args(argv)
    check_job_split(p, args.num_jobs, args.job_index)
    return args


def decode_image(data, preprocess):
    with Image.open(io.BytesIO(data)) as image:
        return preprocess(image.convert("RGB"))


def split_preprocess(preprocess):
    """(the image transform up to uint8 [3, H, W] tensors, its Normalize step) of an open_clip image
    transform that ends in to-tensor and Normalize, or None where it doesn't or where the split would
    change a value (checked on a probe image). ``finish_preprocess(uint8 batch, that Normalize)`` then
    makes the transform's output on any device: torchvision's to_tensor of an 8-bit image is
    ``uint8.float() / 255``, so the split is exact."""
    steps = getattr(preprocess, "transforms", None)
    if (
        not steps
        or len(steps) < 2
        or not isinstance(steps[-2], transforms.ToTensor)
        or not isinstance(steps[-1], transforms.Normalize)
    ):
        return None
    to_uint8, normalize = transforms.Compose([*steps[:-2], transforms.PILToTensor()]), steps[-1]
    probe = Image.fromarray(np.random.default_rng(0).integers(0, 256, (61, 47, 3), dtype=np.uint8))
    try:
        small = to_uint8(probe)
        if small.dtype != torch.uint8 or not torch.equal(
            finish_preprocess(small[None], normalize)[0], preprocess(probe)
        ):
            return None
    except Exception:
        return None
    return to_uint8, normalize


def finish_preprocess(images, normalize):
    """float32 model input of uint8 [N, C, H, W] images (split_preprocess), on their device.

    On the CPU this is the transform's own arithmetic (``float() / 255``, then ``normalize``), in place.
    On other devices each channel's 256 possible values go through that arithmetic here, on the CPU, and
    the images index that table on their device: the arithmetic there differs in the last bit (CUDA
    divides by a Python number through its reciprocal, which gives values 1 ulp off the CPU transform's). On the CPU the table's gather is 3x slower than the
    arithmetic."""
    if images.device.type == "cpu":
        return transforms.functional.normalize(images.float().div_(255), normalize.mean, normalize.std, inplace=True)
    table, offsets = value_table(normalize, images.shape[-3], images.device)
    return table[images.int() + offsets]


@functools.lru_cache(maxsize=8)
def value_table(normalize, channels, device):
    """``finish_preprocess``'s table of each channel's 256 values, and each channel's offset into it: made
    once per job (transform, channels and device stay), not per batch (a copy to the device each time)."""
    values = torch.arange(256, dtype=torch.float32).div(255)
    table = normalize(values.expand(channels, 1, 256).contiguous()).reshape(-1).to(device)
    return table, torch.arange(0, 256 * channels, 256, dtype=torch.int32, device=device).view(channels, 1, 1)


def sample_metadata(sample):
    """The sample's ``.json`` as a dict ({} without one); ValueError when it is not a JSON object."""
    if METADATA not in sample:
        return {}
    meta = json.loads(sample[METADATA])
    if not isinstance(meta, dict):
        raise ValueError(f"a JSON {type(meta).__name__}, not an object")
    return meta


def short(value, limit=40):
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def record_difference(old, new, label):
    """What differs between a stored record and this run's, as short phrases ([] when they are equal)."""
    if not isinstance(old, dict):
        return [f"no {label} record"]
    return [
        f"{label} {key} {short(old.get(key))} (now {short(new.get(key))})"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]


def image_bytes(sample):
    return next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)


# samples read to find one with an embedding (a shard's first images can be undecodable, so have none)
DONE_PROBE = 64


class ShardImages(torch.utils.data.IterableDataset):
    """What the data workers do, one item per shard: read it, add the token ids, decode and preprocess
    its images. The workers live for the whole job (a new pool per shard cost more than the shard)."""

    def __init__(self, jobs, embedder):
        self.jobs, self.embedder = jobs, embedder

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        jobs = self.jobs if info is None else self.jobs[info.id :: info.num_workers]
        for src, dst in jobs:
            try:
                yield (src, dst, *self.embedder.prepare(src))
            except InputError as e:  # a shard that can't be read: the main process stops on it, naming it
                yield src, dst, e, None, None


class ImageTower:
    """The frozen image tower the embeddings come from: ``encode`` (a float32 model-input batch on ``device`` ->
    float16 unit vectors on the CPU), the image transform it takes (``preprocess``) and the record every
    embedding carries (``record``: what training checks it against). ``ShardEmbedder`` takes any object with
    these four (the benchmarks give it one that returns random vectors)."""

    def __init__(self, visual, preprocess, record, device, precision="fp32"):
        self.visual, self.preprocess, self.record, self.device = visual, preprocess, record, device
        self.precision = precision

    @classmethod
    def load(cls, args):
        """``--model``/``--pretrained``'s tower on ``--device``, frozen as training freezes it (model.py; ResNet
        towers get FrozenBatchNorm2d), so the fingerprint and the architecture recorded are those training
        compares."""
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, _, preprocess = open_clip.create_model_and_transforms(
            args.model, pretrained=args.pretrained, device=device
        )
        visual = freeze_visual(model).visual
        # also what these weights hash to in training's 16-bit weight precisions (--precision pure_bf16, ...)
        record = embedding_record(
            args.model,
            args.pretrained,
            visual_fingerprint(visual),
            precision_fingerprints(args.model, args.pretrained),
            architecture=visual_architecture(visual),
            preprocess=preprocess_config(visual),
            precision=args.precision,
        )
        logging.info(f"image tower of {args.model} / {args.pretrained}: sha256 {record['visual_sha256']}, on {device}")
        return cls(visual, preprocess, record, device, args.precision)

    @torch.no_grad()
    def encode(self, batch):
        """float16 [n, dim] on the CPU: encode_image(batch, normalize=True), bf16 autocast with precision amp_bf16."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "amp_bf16"):
            features = self.visual(batch)
        return torch.nn.functional.normalize(features.float(), dim=-1).half().cpu()

    def __getstate__(self):
        """What a data worker or writer gets where they are spawned (Python 3.14's default start method on Linux
        is forkserver): everything but the tower's weights, which only the main process runs."""
        return {k: v for k, v in self.__dict__.items() if k != "visual"}


class ShardEmbedder:
    """Adds ``tower``'s embeddings (``ImageTower.load(args)`` when not given) and the token ids to shards."""

    def __init__(self, args, tower=None):
        self.args = args
        self.tower = tower if tower is not None else ImageTower.load(args)
        self.device, self.preprocess, self.record = self.tower.device, self.tower.preprocess, self.tower.record
        # the workers' part of the transform, and what the image tower's device does before the tower
        split = split_preprocess(self.preprocess) if args.transfer == "uint8" else None
        self.worker_preprocess, self.normalize = split or (self.preprocess, None)
        if args.transfer == "uint8" and split is None:
            logging.warning(
                f"the image transform of {args.model} does not end in to-tensor and Normalize: "
                f"images cross to {self.device} as float32 (as with --transfer float32)"
            )
        self.spent = {"waiting": 0.0, "encoding": 0.0, "writing": 0.0, "decoding": 0.0}  # seconds, by run()
        self.device_decoder = self.make_device_decoder() if args.decode_device == "cuda" else None
        self.tokenizer = open_clip.get_tokenizer(args.model) if args.tokens else None
        if self.tokenizer is not None:
            self.tokens_record = tokens_record(args.model, self.tokenizer)
            self.pad_id = tokenizer_pad_id(self.tokenizer)

    def make_device_decoder(self):
        """The ``--decode-device`` decoder, checked on a probe JPEG against the CPU path (ValueError where
        the transform's first steps don't run on tensors alike, or where decode_jpeg refuses a baseline
        JPEG on the device)."""
        if self.normalize is None:
            raise ValueError(
                f"--decode-device {self.args.decode_device} hands the image tower uint8 images: the "
                f"image transform of {self.args.model} must end in to-tensor and Normalize, with "
                f"--transfer uint8"
            )
        decoder = DeviceDecoder(
            tensor_steps(self.preprocess),
            self.device,
            functools.partial(decode_image, preprocess=self.worker_preprocess),
        )
        probe = io.BytesIO()  # a smooth picture (noise would magnify nvJPEG's chroma upsampling differences)
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 9, 3), dtype=np.uint8)).resize(
            (183, 141), Image.BICUBIC
        ).save(probe, "JPEG", quality=90)
        try:
            _, images, _ = decoder([(0, probe.getvalue())])
            expected = decode_image(probe.getvalue(), self.worker_preprocess)
            if images.shape[1:] != expected.shape:
                error = f"gives images of shape {tuple(images.shape[1:])}, the CPU path {tuple(expected.shape)}"
            else:
                levels = (images[0].cpu().int() - expected.int()).abs().float().mean().item()
                error = f"differs from the CPU path by {levels:.1f} levels on average" if levels > 3 else None
        except Exception as e:
            error = f"fails on tensors ({e})"
        refused = [why for why in decoder.counts if why.startswith("on the CPU")]
        if refused:
            error = refused[0].replace("on the CPU: ", "")
        if error:
            raise ValueError(
                f"--decode-device {self.args.decode_device}: the image transform of {self.args.model} "
                f"on {self.device}: {error}"
            )
        decoder.counts.clear()
        return decoder

    def shard_difference(self, path):
        """None when ``path`` was written by a run with the same image weights, architecture, transform and
        precision (and tokenizer); else why not: "" where it holds no embedding (or does not exist), else
        what differs. Shards are replaced whole, so one sample with an embedding (and, with token ids, with
        texts training uses) speaks for the shard."""
        if not os.path.exists(path):
            return ""
        first = None
        for n, sample in enumerate(read_tar_samples(path)):
            if n == DONE_PROBE:  # decided from the first samples
                break
            if self.args.compact:  # a compact shard holds only samples with an embedding and token ids
                return self.sample_difference(sample) if COMPACT_FIELD in sample else ""
            if EMBEDDING_FIELD not in sample:
                continue
            if texts_problem(sample) is None:
                return self.sample_difference(sample)
            first = first or sample  # embedded without token ids: its texts are not used
        return self.sample_difference(first, tokens=False) if first else ""

    def sample_difference(self, sample, tokens=True):
        try:
            meta = sample_metadata(sample)
        except ValueError as e:
            return f"sample '{sample['__key__']}': its .json is not readable ({e})"
        differences = record_difference(meta.get(EMBEDDING_KEY), self.record, "embedding")
        if tokens and self.tokenizer is not None:
            if not self.args.compact and TOKENS_FIELD not in sample:
                differences.append("no token ids")
            differences += record_difference(meta.get(TOKENS_KEY), self.tokens_record, "tokens")
        return "; ".join(differences) or None

    def add_tokens(self, sample, meta):
        """Add the token ids of the three texts; returns why training would skip them instead (then no ids)."""
        problem = texts_problem(sample)
        if self.tokenizer is not None and problem is None:
            texts = [sample[f].decode("utf-8") for f in TEXT_FIELDS]
            buf = io.BytesIO()
            np.save(buf, stored_tokens(self.tokenizer, texts, self.pad_id))
            sample[TOKENS_FIELD] = buf.getvalue()
            meta[TOKENS_KEY] = self.tokens_record
        return problem

    def prepare_samples(self, src):
        """(samples of ``src`` with token ids added and old embeddings dropped, [(index, image bytes)])."""
        samples, with_image = list(read_tar_samples(src)), []
        for i, sample in enumerate(samples):
            data = image_bytes(sample)
            if data is None:
                continue
            sample.pop(EMBEDDING_FIELD, None)  # never keep an embedding of other weights
            try:
                meta = sample_metadata(sample)
            except ValueError as e:  # a bad sample loses its embedding, not the shard
                logging.warning(
                    f"{src}: sample '{sample['__key__']}' copied without an embedding: its .json is not readable ({e})"
                )
                continue
            if self.tokenizer is not None:  # no token ids of other texts or another tokenizer stay
                sample.pop(TOKENS_FIELD, None)
                meta.pop(TOKENS_KEY, None)
            problem = self.add_tokens(sample, meta)
            if problem:
                logging.warning(
                    f"{src}: sample '{sample['__key__']}': {problem}, so training skips it: no token "
                    f"ids{', not in the compact shard' if self.args.compact else ''}"
                )
            meta.pop(EMBEDDING_KEY, None)
            sample[METADATA] = json.dumps(meta).encode()
            with_image.append((i, data))
        return samples, with_image

    def decode_images(self, items, src="?", samples=None):
        """(indices whose image decoded, those images preprocessed as one batch or None) of [(index, bytes)];
        a warning names the sample (its key, with ``samples``) whose image can't be decoded. With
        ``--decode-device`` cuda on that device, ``--batch-size`` at a time, else here."""
        if self.device_decoder is not None:
            return self.decode_on_device(list(items), src, samples)
        rows, images = [], []
        for i, data in items:
            try:
                images.append(decode_image(data, self.worker_preprocess))
                rows.append(i)
            except Exception as e:  # a broken image loses its embedding, not the shard
                name = f"sample '{samples[i]['__key__']}'" if samples else f"image {i}"
                logging.warning(f"{src}: {name}: image not decodable: {e}")
        return rows, torch.stack(images) if images else None

    def decode_on_device(self, items, src, samples):
        rows, images = [], []
        for start in range(0, len(items), self.args.batch_size):
            done, batch, failed = self.device_decoder(items[start : start + self.args.batch_size])
            for i, e in failed.items():
                name = f"sample '{samples[i]['__key__']}'" if samples else f"image {i}"
                logging.warning(f"{src}: {name}: image not decodable: {e}")
            rows += done
            images += [batch] if batch is not None else []
        return rows, torch.cat(images) if images else None

    def prepare(self, src):
        """The CPU part of a shard: (prepared samples, indices of those whose image decoded, the images);
        with ``--decode-device`` cuda (not decoded here): (prepared samples, indices of those with an
        image, None)."""
        samples, with_image = self.prepare_samples(src)
        if self.device_decoder is not None:
            return samples, [i for i, _ in with_image], None
        return (samples, *self.decode_images(with_image, src, samples))

    def encode(self, images):
        """float16 numpy [n, dim]: the tower's embeddings of ``images``, ``--batch-size`` at a time."""
        out = []
        for batch in images.split(self.args.batch_size):
            batch = batch.to(self.device, non_blocking=True)
            if self.normalize is not None:  # uint8 from the workers
                batch = finish_preprocess(batch, self.normalize)
            out.append(self.tower.encode(batch))
        return torch.cat(out).numpy()

    def write(self, src, dst, samples, rows, features):
        """Add the embeddings to the prepared samples; write ``dst`` atomically. Returns (samples, embedded)."""
        if self.args.compact:
            samples = self.compact(src, samples, rows, features)
            rows = range(len(samples))
            features = ()
        for i, feature in zip(rows, features):
            samples[i][EMBEDDING_FIELD] = encode_embedding(feature)
            meta = json.loads(samples[i][METADATA])
            meta[EMBEDDING_KEY] = self.record
            samples[i][METADATA] = json.dumps(meta).encode()
        # an integer mtime (the source shard's): the writer's default, the current time as a float, gives every
        # member an extra pax header, which readers then parse (measurably slower loading)
        with atomic_tar_writer(dst, mtime=int(os.path.getmtime(src))) as sink:
            for sample in samples:
                sink.write({k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")})
        return len(samples), len(rows)

    def compact(self, src, samples, rows, features):
        """The compact samples (``compact.py``) of those with an embedding and token ids."""
        out = []
        for i, feature in zip(rows, features):
            sample = samples[i]
            if TOKENS_FIELD not in sample:  # texts training skips: warned by prepare_samples
                continue
            meta = json.loads(sample[METADATA])
            meta[EMBEDDING_KEY] = self.record
            out.append(
                {
                    "__key__": sample["__key__"],
                    METADATA: json.dumps(meta).encode(),
                    COMPACT_FIELD: pack(feature, np.load(io.BytesIO(sample[TOKENS_FIELD]))),
                }
            )
        return out

    def loader(self, jobs):
        """(src, dst, prepared samples, indices of those whose image decoded, the images) per shard, made
        by ``--workers`` processes that live for the whole job."""
        return torch.utils.data.DataLoader(
            ShardImages(jobs, self),
            batch_size=None,
            num_workers=min(self.args.workers, len(jobs)),
            pin_memory=self.device.type == "cuda",
            # one shard in flight per worker: bounds memory (a 1,024-image shard is 0.15 GB as uint8, 0.6 GB
            # in float32)
            prefetch_factor=1 if self.args.workers and jobs else None,
        )

    def writers(self):
        """How many processes write the shards (0: this one)."""
        if self.args.writers is not None:
            return self.args.writers
        if not self.args.workers:
            return 0
        # decoding and resizing cost a worker about 3x what writing costs a writer; with --decode-device cuda
        # the workers only read and tokenize, about what writing costs
        return max(1, self.args.workers // (2 if self.args.decode_device == "cuda" else 4))

    def writer_pool(self):
        """The ``--writers`` processes (each holds this embedder, less the image tower), or None."""
        if not self.writers():
            return None
        pool = concurrent.futures.ProcessPoolExecutor(self.writers(), initializer=start_writer, initargs=(self,))
        pool.submit(int)  # starts the processes now, before the data workers and the pin-memory thread
        return pool

    def run(self, jobs):
        """Every (src, dst) shard: the CPU part in ``--workers`` processes that live for the whole job,
        the image tower here, the writing in ``--writers`` processes (one shard after another in order,
        at most two per writer in flight); yields (dst, samples, embedded, seconds) per shard written.
        ``self.spent`` adds up this process's seconds: waiting for the workers, decoding (``--decode-device``;
        what it queues on a GPU ends inside the next part's time), in the image tower, handing shards to the
        writers and waiting for them."""
        pool, pending = self.writer_pool(), collections.deque()
        limit = 2 * self.writers()
        try:
            start = time.time()
            for src, dst, samples, rows, images in self.loader(jobs):
                if isinstance(samples, InputError):
                    raise samples
                received = time.time()
                if self.device_decoder is not None:  # the workers sent the indices of the samples with an image
                    rows, images = self.decode_images([(i, image_bytes(samples[i])) for i in rows], src, samples)
                decoded = time.time()
                features = self.encode(images) if images is not None else []  # to numpy: waits for the GPU
                encoded = time.time()
                self.spent["waiting"] += received - start
                self.spent["decoding"] += decoded - received
                self.spent["encoding"] += encoded - decoded
                write = (
                    pool.submit(write_shard, src, dst, samples, rows, features)
                    if pool
                    else done_future(self.write, src, dst, samples, rows, features)
                )
                pending.append((dst, write, start))
                self.spent["writing"] += time.time() - encoded
                while pending and (len(pending) > limit or pending[0][1].done()):
                    yield self.written(*pending.popleft())
                start = time.time()
            while pending:
                yield self.written(*pending.popleft())
        finally:
            if pool:
                pool.shutdown(wait=True, cancel_futures=True)

    def written(self, dst, write, start):
        """(dst, samples, embedded, seconds since its shard's turn began) once ``write`` is done."""
        waited = time.time()
        count, embedded = write.result()
        self.spent["writing"] += time.time() - waited
        return dst, count, embedded, time.time() - start


WRITER = None  # in a --writers process: its ShardEmbedder


def start_writer(embedder):
    global WRITER
    WRITER = embedder


def write_shard(src, dst, samples, rows, features):
    return WRITER.write(src, dst, samples, rows, features)


def done_future(fn, *args):
    """``fn(*args)`` run now, as a finished future."""
    future = concurrent.futures.Future()
    try:
        future.set_result(fn(*args))
    except Exception as e:
        future.set_exception(e)
    return future


def embed_shards(args, embedder, shards):
    """Embed every shard not done yet; the last log line says where this process's time went."""
    jobs, started = [], time.time()
    for src in shards:
        dst = os.path.join(args.output, os.path.basename(src)) if args.output else src
        difference = embedder.shard_difference(dst)
        if difference is None:
            logging.info(f"{dst}: already embedded with these weights, skipped")
            # a job killed between the shard's rename and its sizes.json update left it uncounted
            if args.output and os.path.basename(dst) not in read_sizes_json(args.output):
                update_sizes_json(args.output, {os.path.basename(dst): count_tar_samples(dst)})
        else:
            if difference:
                logging.info(f"{dst}: embedded before with other settings ({difference}): embedding it again")
            jobs.append((src, dst))
    total, looping = 0, time.time()
    for dst, count, embedded, seconds in embedder.run(jobs):
        if args.output:
            update_sizes_json(args.output, {os.path.basename(dst): count})
        total += embedded
        logging.info(
            f"{dst}: {embedded}/{count} samples embedded in {seconds:.1f}s "
            f"({total / max(time.time() - started, 1e-9):.0f} images/s so far)"
        )
    if jobs:  # where this process's time went: which part bounds the job
        logging.info(
            f"done: {total} images in {time.time() - started:.2f}s ({time.time() - looping:.2f}s after "
            f"start-up); waiting for the data workers {embedder.spent['waiting']:.2f}s, image tower "
            f"{embedder.spent['encoding']:.2f}s, writing shards {embedder.spent['writing']:.2f}s"
            + decoded_on_device(embedder)
        )


def decoded_on_device(embedder):
    """The done line's part on ``--decode-device``: its seconds, and where each image was decoded."""
    decoder = embedder.device_decoder
    if decoder is None:
        return ""
    counts = ", ".join(f"{n} {why}" for why, n in sorted(decoder.counts.items(), key=lambda kv: -kv[1]))
    return f"; decoding on {decoder.device} {embedder.spent['decoding']:.2f}s ({counts or 'no images'})"


def decode_device_problem(args):
    """Why ``--decode-device`` can't be used with these flags on this machine, or None."""
    if args.decode_device == "cpu":
        return None
    if not torch.cuda.is_available():
        return (
            f"--decode-device cuda: torch {torch.__version__} finds no CUDA device"
            f"{' (built without CUDA)' if torch.version.cuda is None else ''}; use --decode-device cpu"
        )
    if args.device and torch.device(args.device).type != "cuda":
        return f"--decode-device cuda decodes beside the image tower: it needs a CUDA --device, not {args.device}"
    if args.transfer != "uint8":
        return "--decode-device cuda hands the image tower uint8 images: it can't go with --transfer float32"
    return None


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for path in args.model_config:
        open_clip.add_model_config(path)
    problem = decode_device_problem(args)
    if problem:
        print_error(EMBED_IMAGES, problem)
        return 2
    try:
        shards = split_for_job(expand_inputs(args.shards), args.num_jobs, args.job_index)
    except InputError as e:
        print_error(EMBED_IMAGES, e)
        return 2
    if args.compact and (not args.output or not args.tokens):
        print_error(
            EMBED_IMAGES,
            "--compact writes shards without images and texts: it needs --output DIR "
            "(the four-field shards stay the source) and the token ids (drop --no-tokens)",
        )
        return 2
    if args.output:
        os.makedirs(args.output, exist_ok=True)
    try:
        embedder = ShardEmbedder(args)
    except ValueError as e:  # make_device_decoder's probe
        print_error(EMBED_IMAGES, e)
        return 2
    try:
        embed_shards(args, embedder, shards)
    except (InputError, OutputBusy) as e:
        print_error(EMBED_IMAGES, e)
        return 2
    return 0


def console_main():
    sys.exit(main())


if __name__ == "__main__":
    console_main()
