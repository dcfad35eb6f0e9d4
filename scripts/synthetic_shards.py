"""LAION-like four-field shards for the benchmarks: 256 px JPEGs of ~15 KiB, captions and
paraphrases of 8-16 words, or of a text-length setting (``longest``: each text's length in CLIP tokens,
SOT and EOT included, drawn uniformly from ``text_length_range(longest)``; every word of WORDS is one
token). Used by bench_loader.py and bench_e2e.py (scripts/ is on their path)."""

import contextlib
import io
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image, ImageFilter

from paraclip_plugin.data.layout import update_sizes_json
from paraclip_plugin.data.tars import atomic_tar_writer

WORDS = (
    "a the of on in with near under beside dog cat man woman child car street tree house field beach "
    "red blue green white black small large old young sitting standing running holding looking "
    "photo picture view close up two three group people table window water sky"
).split()


def jpeg_bytes(rng, size=256):
    """A smooth random image: JPEG-compresses to ~15 KiB like a typical 256 px web photo."""
    noise = np.asarray(rng.integers(0, 256, (size // 8, size // 8, 3)), dtype=np.uint8)
    image = Image.fromarray(noise).resize((size, size), Image.BICUBIC).filter(ImageFilter.GaussianBlur(1))
    detail = np.asarray(rng.integers(-12, 12, (size, size, 3)))
    image = Image.fromarray(np.clip(np.asarray(image, dtype=np.int64) + detail, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


# a text-length setting's texts: tokens (SOT and EOT included) uniform from half the longest to the longest
TEXT_LENGTHS = (
    "uniform from half the longest (rounded up) to the longest, SOT and EOT included (in the shards, each "
    "shard's first caption is the longest; in a step's batch, its first)"
)


def text_length_range(longest):
    return -(-longest // 2), longest


def caption(rng, longest=None, at_longest=False):
    """8-16 words; with ``longest``, a text of ``text_length_range(longest)`` tokens (its words + SOT + EOT),
    or of ``longest`` tokens exactly (``at_longest``)."""
    low, high = (10, 18) if longest is None else text_length_range(longest)
    tokens = high if at_longest and longest is not None else rng.integers(low, high + 1)
    return " ".join(rng.choice(WORDS) for _ in range(tokens - 2))


def shard_name(shard, longest=None):
    """``00003.tar``; with a text-length setting, ``t40-00003.tar`` (every setting's shards in one folder)."""
    return f"{shard:05d}.tar" if longest is None else f"t{longest}-{shard:05d}.tar"


def write_shard(folder, shard, count, seed=0, longest=(None,)):
    """Shard ``count`` samples in ``folder``, one shard per text-length setting in ``longest`` (None: 8-16
    words), the same JPEGs in each; returns ({name: count}, total JPEG bytes)."""
    rng = np.random.default_rng([seed, shard])
    texts = np.random.default_rng([seed, shard, 1])
    jpeg_total = 0
    names = [shard_name(shard, length) for length in longest]
    with contextlib.ExitStack() as stack:
        sinks = [stack.enter_context(atomic_tar_writer(os.path.join(folder, name))) for name in names]
        for i in range(count):
            jpg = jpeg_bytes(rng)
            jpeg_total += len(jpg)
            for sink, length in zip(sinks, longest):
                # each shard's first caption is the setting's longest text, so every shard reaches it
                sink.write(
                    {
                        "__key__": f"{shard:05d}{i:05d}",
                        "jpg": jpg,
                        "txt": caption(texts, length, i == 0),
                        "para1.txt": caption(texts, length),
                        "para2.txt": caption(texts, length),
                    }
                )
    return {name: count for name in names}, jpeg_total


def write_shards(folder, samples, per_shard, seed=0, processes=1, longest=(None,)):
    """``samples`` samples in shards of ``per_shard`` (+ sizes.json), written by ``processes`` processes;
    with text-length settings (``longest``, e.g. (40, 24, 77)), a set of shards per setting, ``t<L>-*.tar``.
    Returns (brace pattern, mean JPEG bytes); with settings, the pattern holds ``{longest}`` for L."""
    os.makedirs(folder, exist_ok=True)
    jobs = [
        (folder, shard, min(per_shard, samples - shard * per_shard), seed, tuple(longest))
        for shard in range(-(-samples // per_shard))
    ]
    if processes > 1:
        with ProcessPoolExecutor(processes) as pool:
            done = list(pool.map(write_shard, *zip(*jobs)))
    else:
        done = [write_shard(*job) for job in jobs]
    update_sizes_json(folder, {name: count for sizes, _ in done for name, count in sizes.items()})
    shards = "{" + f"00000..{len(done) - 1:05d}" + "}.tar"
    pattern = os.path.join(folder, shards if tuple(longest) == (None,) else "t{longest}-" + shards)
    return pattern, sum(j for _, j in done) / samples
