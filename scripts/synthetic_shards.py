"""LAION-like four-field shards for the benchmarks: 256 px JPEGs of ~15 KiB, captions and
paraphrases of 8-16 words. Used by bench_loader.py and bench_e2e.py (scripts/ is on their path)."""
import io
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image, ImageFilter

from paraclip_plugin.shards import atomic_tar_writer, update_sizes_json

WORDS = ("a the of on in with near under beside dog cat man woman child car street tree house field beach "
         "red blue green white black small large old young sitting standing running holding looking "
         "photo picture view close up two three group people table window water sky").split()


def jpeg_bytes(rng, size=256):
    """A smooth random image: JPEG-compresses to ~15 KiB like a typical 256 px web photo."""
    noise = np.asarray(rng.integers(0, 256, (size // 8, size // 8, 3)), dtype=np.uint8)
    image = Image.fromarray(noise).resize((size, size), Image.BICUBIC).filter(ImageFilter.GaussianBlur(1))
    detail = np.asarray(rng.integers(-12, 12, (size, size, 3)))
    image = Image.fromarray(np.clip(np.asarray(image, dtype=np.int64) + detail, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def caption(rng):
    return " ".join(rng.choice(WORDS) for _ in range(rng.integers(8, 17)))


def write_shard(folder, shard, count, seed=0):
    """Shard ``folder/<shard>.tar`` with ``count`` samples; returns (name, count, total JPEG bytes)."""
    rng = np.random.default_rng([seed, shard])
    name, jpeg_total = f"{shard:05d}.tar", 0
    with atomic_tar_writer(os.path.join(folder, name)) as sink:
        for i in range(count):
            jpg = jpeg_bytes(rng)
            jpeg_total += len(jpg)
            sink.write({"__key__": f"{shard:05d}{i:05d}", "jpg": jpg, "txt": caption(rng),
                        "para1.txt": caption(rng), "para2.txt": caption(rng)})
    return name, count, jpeg_total


def write_shards(folder, samples, per_shard, seed=0, processes=1):
    """``samples`` samples in shards of ``per_shard`` (+ sizes.json), written by ``processes`` processes.
    Returns (brace pattern, mean JPEG bytes)."""
    os.makedirs(folder, exist_ok=True)
    jobs = [(folder, shard, min(per_shard, samples - shard * per_shard), seed)
            for shard in range(-(-samples // per_shard))]
    if processes > 1:
        with ProcessPoolExecutor(processes) as pool:
            done = list(pool.map(write_shard, *zip(*jobs)))
    else:
        done = [write_shard(*job) for job in jobs]
    update_sizes_json(folder, {name: count for name, count, _ in done})
    pattern = os.path.join(folder, "{" + f"00000..{len(done) - 1:05d}" + "}.tar")
    return pattern, sum(j for _, _, j in done) / samples
