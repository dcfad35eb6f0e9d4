#!/usr/bin/env python
"""Turn image-caption WebDataset shards into ParaCLIP four-field shards with two-step LLM paraphrases.

    OPENAI_API_KEY=... python scripts/make_shards.py \\
        --input '/data/laion/{00000..09999}.tar' --output /data/para/ \\
        --backend openai --model gpt-4o-mini [--base-url http://host:8000/v1] [--concurrency 256]
    python scripts/make_shards.py ... --backend vllm --model /models/llama-7b-paraphraser

The API key is read from the environment variable OPENAI_API_KEY only (not a flag, so it never
appears in shell history, process lists, logs, shards, the cache or the stats).
"""
import argparse
import os
import sys
import time

from paraclip_plugin.extras import require_extra
from paraclip_plugin.paraphrase.backends import GenerationError, make_backend
from paraclip_plugin.paraphrase.cache import CompletionCache
from paraclip_plugin.paraphrase.inputs import expand_inputs, slurm_job_defaults, split_for_job
from paraclip_plugin.paraphrase.pipeline import GenerationOptions, ParaphraseGenerator
from paraclip_plugin.paraphrase.prompts import PromptSet, load_prompts
from paraclip_plugin.paraphrase.shard_io import InputError


def parse_args(argv=None):
    num_jobs, job_index = slurm_job_defaults()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("input / output")
    io.add_argument("--input", required=True,
                    help="input shards (img2dataset .tar) or caption files (.txt one per line, .jsonl): "
                         "brace patterns and globs, several joined with '::'")
    io.add_argument("--output", required=True, help="output folder: one shard (or .jsonl) per input, same base name, + sizes.json")
    io.add_argument("--caption-field", default="caption", help="caption field of .jsonl inputs")
    io.add_argument("--cache", default=None,
                    help="sqlite cache of completions (default OUTPUT/cache.sqlite); '{job_index}' is replaced, "
                         "for one file per job on file systems without POSIX locks")
    io.add_argument("--stats", default=None, help="stats JSON of this run (default OUTPUT/stats/<time>-job<I>of<N>.json)")
    io.add_argument("--export-sft", default=None, metavar="FILE",
                    help="also write this run's (prompt, paraphrase) pairs as chat-format JSONL for instruction tuning")
    io.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")

    gen = p.add_argument_group("generation")
    gen.add_argument("--backend", choices=("openai", "vllm"), default="openai")
    gen.add_argument("--model", required=True, help="API model name, or vLLM model path")
    gen.add_argument("--prompts", default=None,
                     help='JSON file {"step1": "...{text}...", "step2": "...{text}...", "version": optional} '
                          "replacing the paper's prompts")
    gen.add_argument("--temperature", type=float, default=1.0, help="paper: 1.0")
    gen.add_argument("--top-p", type=float, default=0.1, help="paper: 0.1")
    gen.add_argument("--max-tokens", type=int, default=512)
    gen.add_argument("--min-words", type=int, default=2, help="keep captions of at least this many words")
    gen.add_argument("--max-words", type=int, default=15, help="keep captions of at most this many words")
    gen.add_argument("--max-attempts", type=int, default=3, help="attempts per step before a rejected sample is dropped")
    gen.add_argument("--max-length-ratio", type=float, default=3.0,
                     help="reject outputs longer than this times the input (+20 characters)")

    api = p.add_argument_group("openai backend")
    api.add_argument("--base-url", default=None, help="any OpenAI-compatible server, e.g. http://host:8000/v1 (vllm serve)")
    api.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    api.add_argument("--timeout", type=float, default=60.0, help="seconds per request attempt")
    api.add_argument("--max-retries", type=int, default=8, help="client retries of 429/5xx/timeouts (honours Retry-After)")
    api.add_argument("--malformed-retries", type=int, default=5, help="retries of unparseable 200 responses")
    api.add_argument("--price-per-1k-prompt", type=float, default=0.0, help="USD per 1k prompt tokens, for the cost estimate")
    api.add_argument("--price-per-1k-completion", type=float, default=0.0, help="USD per 1k completion tokens")

    vl = p.add_argument_group("vllm backend")
    vl.add_argument("--tensor-parallel-size", type=int, default=1)
    vl.add_argument("--seed", type=int, default=0)

    jobs = p.add_argument_group("splitting (defaults from SLURM_ARRAY_TASK_COUNT / SLURM_ARRAY_TASK_ID)")
    jobs.add_argument("--num-jobs", type=int, default=num_jobs)
    jobs.add_argument("--job-index", type=int, default=job_index)
    return p.parse_args(argv)


def build_backend(args):
    sampling = dict(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens)
    if args.backend == "vllm":
        return make_backend("vllm", model=args.model, tensor_parallel_size=args.tensor_parallel_size,
                            seed=args.seed, **sampling)
    api_key = os.environ.get("OPENAI_API_KEY")
    if not api_key:
        if args.base_url is None:
            sys.exit("error: set OPENAI_API_KEY in the environment (keys are never taken from flags)")
        api_key = "EMPTY"  # local OpenAI-compatible servers (vllm serve) accept any key
    return make_backend("openai", model=args.model, api_key=api_key, base_url=args.base_url,
                        concurrency=args.concurrency, timeout=args.timeout, max_retries=args.max_retries,
                        malformed_retries=args.malformed_retries, **sampling)


def main(argv=None):
    args = parse_args(argv)
    # before any input is read or any request sent
    require_extra("make_shards.py", f"--backend {args.backend}", args.backend)
    try:
        inputs = split_for_job(expand_inputs(args.input), args.num_jobs, args.job_index)
        prompts = load_prompts(args.prompts) if args.prompts else PromptSet()
    except (InputError, ValueError) as e:
        sys.exit(f"error: {e}")
    cache_path = (args.cache or os.path.join(args.output, "cache.sqlite")).replace("{job_index}", str(args.job_index))
    stats_path = args.stats or os.path.join(
        args.output, "stats", time.strftime("%Y%m%dT%H%M%S") + f"-job{args.job_index}of{args.num_jobs}.json")
    options = GenerationOptions(min_words=args.min_words, max_words=args.max_words, max_attempts=args.max_attempts,
                                max_length_ratio=args.max_length_ratio, caption_field=args.caption_field,
                                price_per_1k_prompt=args.price_per_1k_prompt,
                                price_per_1k_completion=args.price_per_1k_completion, progress=not args.no_progress)
    backend = build_backend(args)
    generator = ParaphraseGenerator(backend, args.model, prompts, CompletionCache(cache_path), options, args.backend)
    try:
        stats = generator.run(inputs, args.output, stats_path, args.export_sft, job=(args.num_jobs, args.job_index))
    except (InputError, GenerationError) as e:
        sys.exit(f"error: {e}")
    finally:
        backend.close()
    print(f"{stats['samples_out']}/{stats['samples_in']} samples written, {stats['requests']} requests, "
          f"{stats['cache_hits']} cache hits, dropped {stats['dropped']}; stats: {stats_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
