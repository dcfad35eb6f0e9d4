#!/usr/bin/env python
"""Requests/s of the whole generation pipeline against the local OpenAI-compatible server.

Starts ``paraclip_plugin.testing.local_server`` in its own process with a fixed latency, then:

1. in-flight scaling, one process: ``--concurrency`` 1 (what the official release does: one request
   at a time), 64 and 256, each over fresh input shards of unique captions and a fresh cache, so
   every sample costs two real requests. The pipeline is the full one (tar reading, filtering,
   cache writes, cleaning, tar writing, sizes.json). Reported as requests/s and as a ratio to serial.
2. process scaling: ``scripts/make_shards.py`` launched as P processes with ``--num-jobs P
   --job-index i`` over the same shards (what a SLURM array does), aggregate requests/s per P.
   One Python process tops out at a few hundred requests/s (the openai client spends several ms
   of CPU per request); more processes use more cores, until the server or the cores saturate.

    python scripts/bench_generation.py --latency 0.2 --levels 1 64 256 --processes 1 2 4
"""

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import time

from paraclip_plugin.clitools import add_renamed
from paraclip_plugin.paraphrase.backends.openai_backend import OpenAIBackend
from paraclip_plugin.paraphrase.cache import CompletionCache
from paraclip_plugin.data.inputs import expand_inputs
from paraclip_plugin.paraphrase.pipeline import GenerationOptions, ParaphraseGenerator
from paraclip_plugin.data.atomic import atomic_write_text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = (
    "red blue green small large dog cat bird car tree house river mountain beach city night old new "
    "wooden bright dark painting photo street boat sunset forest winter summer garden bridge"
).split()
# The pipeline copies image bytes without decoding them, so a stub JPEG header is enough here.
JPEG = bytes.fromhex("ffd8ffe000104a46494600010100000100010000ffd9")


def write_shards(folder, num_shards, per_shard, tag):
    """img2dataset-like shards whose captions are all unique (so nothing is deduplicated away)."""
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(tag)
    for s in range(num_shards):
        with tarfile.open(os.path.join(folder, f"{s:05d}.tar"), "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:05d}"
                caption = " ".join(rng.sample(WORDS, 6)) + f" {tag}x{key}"
                for ext, data in (("jpg", JPEG), ("txt", caption.encode()), ("json", b'{"key": "%s"}' % key.encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return os.path.join(folder, "{" + f"00000..{num_shards - 1:05d}" + "}.tar")


def start_server(latency):
    proc = subprocess.Popen(
        [sys.executable, "-m", "paraclip_plugin.testing.local_server", "--latency", str(latency)],
        stdout=subprocess.PIPE,
        text=True,
    )
    return proc, proc.stdout.readline().strip()


def in_flight_scaling(base_url, levels, work, shards_per_level):
    rates = {}
    for concurrency in levels:
        # Enough work for several "rounds" of in-flight requests; serial gets a short run.
        samples = max(8, concurrency * 8) if concurrency > 1 else 10
        per_shard = max(1, samples // shards_per_level)
        pattern = write_shards(os.path.join(work, f"in-c{concurrency}"), shards_per_level, per_shard, f"c{concurrency}")
        backend = OpenAIBackend("bench", api_key="bench", base_url=base_url, concurrency=concurrency, timeout=60)
        cache = CompletionCache(os.path.join(work, f"cache-c{concurrency}.sqlite"))
        generator = ParaphraseGenerator(backend, "bench", cache=cache, options=GenerationOptions(progress=False))
        stats = generator.run(expand_inputs(pattern), os.path.join(work, f"out-c{concurrency}"))
        backend.close()
        rates[concurrency] = stats["requests"] / stats["wall_seconds"]
        print(
            f"  concurrency {concurrency:4d}: {stats['requests']:6d} requests, {stats['samples_out']:5d} samples "
            f"in {stats['wall_seconds']:6.2f}s -> {rates[concurrency]:7.1f} requests/s",
            flush=True,
        )
    return rates


def process_scaling(base_url, process_counts, concurrency, samples_per_process, work):
    rates = {}
    for procs in process_counts:
        pattern = write_shards(os.path.join(work, f"in-p{procs}"), 2 * procs, samples_per_process // 2, f"p{procs}")
        out = os.path.join(work, f"out-p{procs}")
        env = {**os.environ, "OPENAI_API_KEY": "bench"}
        start = time.time()
        jobs = [
            subprocess.Popen(
                [
                    sys.executable,
                    os.path.join(REPO, "scripts", "make_shards.py"),
                    "--input",
                    pattern,
                    "--output",
                    out,
                    "--model",
                    "bench",
                    "--base-url",
                    base_url,
                    "--no-progress",
                    "--concurrency",
                    str(concurrency),
                    "--num-jobs",
                    str(procs),
                    "--job-index",
                    str(i),
                    "--cache",
                    os.path.join(out, "cache-{job_index}.sqlite"),
                    "--stats",
                    os.path.join(out, f"stats-{i}.json"),
                ],
                env=env,
                stderr=subprocess.DEVNULL,
            )
            for i in range(procs)
        ]
        for job in jobs:
            if job.wait() != 0:
                raise SystemExit(f"make_shards.py job failed with {job.returncode}")
        wall = time.time() - start
        requests = sum(json.load(open(os.path.join(out, f"stats-{i}.json")))["requests"] for i in range(procs))
        # Includes each process's start-up (imports), as a real job would pay it.
        rates[procs] = requests / wall
        print(
            f"  {procs} process(es) x concurrency {concurrency}: {requests:6d} requests in {wall:6.2f}s "
            f"-> {rates[procs]:7.1f} requests/s",
            flush=True,
        )
    return rates


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency", type=float, default=0.2, help="server seconds per reply")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 64, 256], help="requests in flight")
    add_renamed(
        parser,
        "--num-shards",
        "--shards",
        dest="shards",
        type=int,
        default=2,
        help="input shards per concurrency level",
    )
    parser.add_argument("--processes", type=int, nargs="*", default=[1, 2, 4], help="process counts (empty: skip)")
    parser.add_argument("--process-concurrency", type=int, default=64)
    parser.add_argument("--samples-per-process", type=int, default=800)
    parser.add_argument("--json", default=None, help="also write the numbers here")
    return parser.parse_args(argv)


def main():
    args = parse_args()
    server, base_url = start_server(args.latency)
    try:
        with tempfile.TemporaryDirectory() as work:
            print(f"server latency {args.latency}s, {os.cpu_count()} CPU cores visible")
            print("in-flight scaling (one process, full pipeline):")
            rates = in_flight_scaling(base_url, args.levels, work, args.shards)
            serial = rates[min(rates)]
            print("ratio vs serial: " + ", ".join(f"{c}: {r / serial:.1f}x" for c, r in rates.items()))
            proc_rates = {}
            if args.processes:
                print("process scaling (make_shards.py --num-jobs P, one process per job):")
                proc_rates = process_scaling(
                    base_url, args.processes, args.process_concurrency, args.samples_per_process, work
                )
                one = proc_rates[min(proc_rates)]
                print("ratio vs 1 process: " + ", ".join(f"{p}: {r / one:.2f}x" for p, r in proc_rates.items()))
            if args.json:
                atomic_write_text(
                    args.json,
                    json.dumps(
                        {
                            "latency": args.latency,
                            "requests_per_s": rates,
                            "ratio_vs_serial": {c: r / serial for c, r in rates.items()},
                            "processes_requests_per_s": proc_rates,
                        },
                        indent=1,
                    )
                    + "\n",
                )
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
