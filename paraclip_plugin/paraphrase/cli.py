"""Turn image-caption WebDataset shards into ParaCLIP four-field shards with two-step LLM paraphrases.

    OPENAI_API_KEY=... paraclip-make-shards \\
        --input '/data/laion/{00000..09999}.tar' --output /data/para/ \\
        --backend openai --model gpt-4o-mini [--concurrency 256]
    VLLM_KEY=... paraclip-make-shards ... --base-url http://host:8000/v1 [--api-key-env VLLM_KEY]
    paraclip-make-shards ... --backend vllm --model /models/llama-7b-paraphraser [--chat-template FILE]

Keys come from the environment only, never
from flags: OPENAI_API_KEY is sent to https://api.openai.com only; another --base-url gets the variable
named by --api-key-env, or no key. What the client would add from the environment (OPENAI_ORG_ID,
OPENAI_PROJECT_ID, OPENAI_CUSTOM_HEADERS) goes to api.openai.com only, and redirects are not followed.
Keys never appear in logs, shards, the cache or the stats.

Failures: a server that refuses requests systematically (most of a batch, or the job's first 8)
stops the job with its own message and a non-zero exit, writing nothing for that input; a rerun
redoes it. One refused caption, a content filter or a token-limit cut-off drops that sample by
reason. An input whose every kept sample is dropped is not written (never an empty output): the job
goes on with the others and ends non-zero naming it (3 such inputs in a row stop the job). 429/5xx/
timeouts are retried by the openai client; a Retry-After beyond its 120 s cap is waited out up to
--max-wait, then the job stops. Bad input (a caption that is not UTF-8, a sample key twice, a .json
that is not an object) stops the job naming the file and sample, before that input's first request.
A second run given an output another run is writing stops before paying for it. Every stop keeps
the cache and writes the stats (status "failed", the error): rerun to resume. --backend openai-batch
handles the Batch API's own outcomes (README, "OpenAI Batch API"): a refused line drops its sample for good, a line
failing in every round drops it for this run, a token_limit_exceeded batch is submitted again, a lost create reply
is found by the batch's metadata, a vanished batch's requests are sent again, a cancelled batch stops the job
(--batch-resubmit-cancelled), status outages are waited out up to --max-wait.
"""

import argparse
import hashlib
import os
import signal
import sys
import time

import logging

from ..clitools import (
    FRACTION,
    MAKE_SHARDS,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    OPEN_FRACTION,
    POSITIVE,
    POSITIVE_INT,
    check_job_split,
    fail,
    number,
)
from ..extras import require_extra
from .backends import GenerationError, RequestsWritten, make_backend
from .backends.limits import DEFAULT_MAX_ENQUEUED_TOKENS, MAX_BYTES_PER_FILE, MAX_REQUESTS_PER_FILE
from .cache import CompletionCache
from ..data.inputs import expand_inputs, output_name, slurm_job_defaults, split_for_job
from .pipeline import GenerationOptions, JobIncomplete, ParaphraseGenerator
from .prompts import PromptSet, load_prompts
from ..data.errors import InputError
from ..data.atomic import OutputBusy


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog=MAKE_SHARDS, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    io = p.add_argument_group("input / output")
    io.add_argument(
        "--input",
        required=True,
        help="input shards (img2dataset .tar; .tar.gz/.tgz/.tar.bz2/.tar.xz read too) or caption files "
        "(.txt one per line, .jsonl): brace patterns and globs, several joined with '::'",
    )
    io.add_argument(
        "--output",
        required=True,
        help="output folder: one shard (or .jsonl) per input, same base name (compressed tars are written "
        "as uncompressed .tar, caption files as .jsonl; two inputs with one output name are refused), "
        "+ sizes.json",
    )
    io.add_argument("--caption-field", default="caption", help="caption field of .jsonl inputs")
    io.add_argument(
        "--cache",
        default=None,
        help="sqlite cache of completions (default OUTPUT/cache.sqlite); '{job_index}' is replaced, "
        "for one file per job on file systems without POSIX locks",
    )
    io.add_argument(
        "--stats",
        default=None,
        help="stats JSON of this run, written also when it stops (status, error) (default "
        "OUTPUT/stats/<time>-job<I>of<N>.json, never replacing one: -2, -3... added; a path given "
        "here is replaced)",
    )
    io.add_argument(
        "--export-sft",
        default=None,
        metavar="FILE",
        help="also write the (prompt, paraphrase) pairs of every sample this job has written (also in "
        "an earlier, stopped run) as chat-format JSONL for instruction tuning; '{job_index}' is "
        "replaced, for one file per job",
    )
    io.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")

    gen = p.add_argument_group("generation")
    gen.add_argument(
        "--backend",
        choices=("openai", "openai-batch", "vllm"),
        default="openai",
        help="openai: the API or any OpenAI-compatible server (vllm serve); openai-batch: the OpenAI "
        "Batch API (half price, within 24 h); vllm: the offline engine",
    )
    gen.add_argument("--model", required=True, help="API model name, or vLLM model path")
    gen.add_argument(
        "--prompts",
        default=None,
        help='JSON file {"step1": "...{text}...", "step2": "...{text}...", "version": optional} '
        "replacing the paper's prompts",
    )
    gen.add_argument("--temperature", type=NON_NEGATIVE, default=1.0, help="paper: 1.0")
    gen.add_argument("--top-p", type=OPEN_FRACTION, default=0.1, help="paper: 0.1")
    gen.add_argument(
        "--max-tokens",
        type=POSITIVE_INT,
        default=512,
        help="token limit per output (sent as --token-param); part of the cache key, like "
        "--temperature, --top-p and --seed: changing one makes new requests",
    )
    gen.add_argument("--min-words", type=POSITIVE_INT, default=2, help="keep captions of at least this many words")
    gen.add_argument("--max-words", type=POSITIVE_INT, default=15, help="keep captions of at most this many words")
    gen.add_argument(
        "--max-attempts", type=POSITIVE_INT, default=3, help="attempts per step before a rejected sample is dropped"
    )
    gen.add_argument(
        "--max-length-ratio",
        type=POSITIVE,
        default=3.0,
        help="reject outputs longer than this times the input (+20 characters)",
    )
    gen.add_argument(
        "--max-refused-fraction",
        type=FRACTION,
        default=0.5,
        help="stop the job when the server refuses (400/422) more than this fraction of a batch of "
        ">= 4 requests (or the job's first 8): a systematic refusal, not one bad caption",
    )

    api = p.add_argument_group("openai backend")
    api.add_argument(
        "--base-url",
        default=None,
        help="any OpenAI-compatible server, e.g. http://host:8000/v1 (vllm serve); default OPENAI_BASE_URL, "
        "else https://api.openai.com/v1",
    )
    api.add_argument(
        "--api-key-env",
        default=None,
        metavar="NAME",
        help="environment variable holding the key for --base-url (which must then be given); without "
        "it OPENAI_API_KEY is sent to https://api.openai.com only and other hosts get no key",
    )
    api.add_argument(
        "--token-param",
        choices=("auto", "max_tokens", "max_completion_tokens"),
        default="auto",
        help="name of the token-limit field: auto sends max_completion_tokens to api.openai.com and "
        "max_tokens elsewhere, and switches once if the server rejects the name",
    )
    api.add_argument("--concurrency", type=POSITIVE_INT, default=64, help="requests in flight")
    api.add_argument("--timeout", type=POSITIVE, default=60.0, help="seconds per request attempt")
    api.add_argument(
        "--max-retries",
        type=NON_NEGATIVE_INT,
        default=8,
        help="client retries of 429/5xx/timeouts (honours Retry-After up to 120 s)",
    )
    api.add_argument(
        "--max-wait",
        type=NON_NEGATIVE,
        default=900.0,
        help="seconds to wait out a rate limit whose Retry-After exceeds the client's 120 s, per "
        "stretch of rate limiting (openai-batch: an outage of the batch status, or a full "
        "enqueued-token queue); beyond it the job stops (rerun to resume)",
    )
    api.add_argument(
        "--malformed-retries", type=NON_NEGATIVE_INT, default=5, help="retries of unparseable 200 responses"
    )
    api.add_argument(
        "--price-per-1k-prompt", type=NON_NEGATIVE, default=0.0, help="USD per 1k prompt tokens, for the cost estimate"
    )
    api.add_argument("--price-per-1k-completion", type=NON_NEGATIVE, default=0.0, help="USD per 1k completion tokens")

    bt = p.add_argument_group(
        "openai-batch backend (also takes --base-url, --api-key-env, --token-param, "
        "--timeout, --max-retries, --max-wait)"
    )
    bt.add_argument("--batch-poll-interval", type=POSITIVE, default=60.0, help="seconds between status checks")
    bt.add_argument(
        "--batch-max-requests",
        type=number(int, 1, MAX_REQUESTS_PER_FILE),
        default=MAX_REQUESTS_PER_FILE,
        help="requests per batch file (at most the API's 50,000)",
    )
    bt.add_argument(
        "--batch-max-bytes",
        type=number(int, 1, MAX_BYTES_PER_FILE),
        default=MAX_BYTES_PER_FILE,
        help="bytes per batch file (at most the API's 200 MB)",
    )
    bt.add_argument(
        "--batch-max-enqueued-tokens",
        type=POSITIVE_INT,
        default=DEFAULT_MAX_ENQUEUED_TOKENS,
        help="input tokens this job keeps enqueued at once (estimated as UTF-8 bytes / 3 + 8 per request): "
        "set it under your organization's batch queue limit for the model (default 1,800,000, under "
        "tier 1's 2M for gpt-4o-mini); further files wait for batches to end, and a batch failed with "
        "token_limit_exceeded is submitted again in the same run",
    )
    bt.add_argument(
        "--batch-rounds",
        type=POSITIVE_INT,
        default=3,
        help="rounds of batches for expired or failed requests; a request failing in every round is "
        "dropped as request_failed (a rerun asks again)",
    )
    bt.add_argument(
        "--batch-resubmit-cancelled",
        action="store_true",
        help="submit the unanswered requests of a batch someone cancelled (without it the job stops naming the batch)",
    )
    bt.add_argument(
        "--batch-discount", type=NON_NEGATIVE, default=0.5, help="price factor of batch requests, for the cost estimate"
    )
    bt.add_argument(
        "--write-batch-requests",
        default=None,
        metavar="DIR",
        help="offline (vllm run-batch): write the request files of the next step to DIR and stop (exit 3) "
        "instead of submitting them; nothing is sent to a server",
    )
    bt.add_argument(
        "--read-batch-results",
        default=None,
        metavar="FILE",
        help="offline: read `vllm run-batch` output files (several joined with '::') into the cache; "
        "requests still without a result are written to --write-batch-requests",
    )

    vl = p.add_argument_group("vllm backend")
    vl.add_argument("--tensor-parallel-size", type=POSITIVE_INT, default=1)
    vl.add_argument(
        "--seed", type=int, default=0, help="base of the per-request seeds (each derived from the request's cache key)"
    )
    vl.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="Jinja chat template for models whose tokenizer has none (LLaMA-1-style paraphrasers)",
    )
    vl.add_argument(
        "--max-model-len",
        type=POSITIVE_INT,
        default=None,
        help="vLLM's context length (default: the model's); prompts longer than it are dropped by reason",
    )
    vl.add_argument(
        "--gpu-memory-utilization",
        type=OPEN_FRACTION,
        default=None,
        help="share of GPU memory vLLM may take (its default 0.9)",
    )

    jobs = p.add_argument_group(
        "splitting (defaults from a contiguous SLURM array: SLURM_ARRAY_TASK_COUNT / "
        "SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN; pass both when resubmitting some tasks)"
    )
    jobs.add_argument("--num-jobs", type=POSITIVE_INT, default=None)
    jobs.add_argument("--job-index", type=NON_NEGATIVE_INT, default=None)
    args = p.parse_args(argv)
    if args.min_words > args.max_words:
        p.error(f"--min-words {args.min_words} is above --max-words {args.max_words}: no caption would be kept")
    if args.num_jobs is None or args.job_index is None:
        try:
            num_jobs, job_index = slurm_job_defaults()
        except ValueError as e:
            p.error(str(e))
        args.num_jobs = num_jobs if args.num_jobs is None else args.num_jobs
        args.job_index = job_index if args.job_index is None else args.job_index
    check_job_split(p, args.num_jobs, args.job_index)
    return args


def job_name(args):
    """What a batch's metadata says of its job: the output folder as a hash (no local path leaves the host)."""
    folder = hashlib.sha256(os.path.abspath(args.output).encode()).hexdigest()[:16]
    return f"output {folder} job {args.job_index} of {args.num_jobs}"


def build_backend(args, cache_path, environ=os.environ):
    sampling = dict(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens)
    if args.backend == "vllm":
        template = None
        if args.chat_template:
            try:
                with open(args.chat_template, encoding="utf-8") as f:
                    template = f.read()
            except OSError as e:
                raise ValueError(f"--chat-template {args.chat_template}: {e.strerror}") from None
        engine = {
            k: v
            for k, v in (("max_model_len", args.max_model_len), ("gpu_memory_utilization", args.gpu_memory_utilization))
            if v is not None
        }
        return make_backend(
            "vllm",
            model=args.model,
            tensor_parallel_size=args.tensor_parallel_size,
            seed=args.seed,
            chat_template=template,
            **sampling,
            **engine,
        )
    # imported here: the openai extra is checked (require_extra) before anything imports it
    from .backends.openai_backend import api_key_for, resolve_base_url

    offline = args.backend == "openai-batch" and (args.write_batch_requests or args.read_batch_results)
    if offline:  # vllm run-batch: nothing is sent, no key is read
        base_url, api_key = args.base_url or "http://localhost/v1", "EMPTY"
    else:
        base_url, source = resolve_base_url(args.base_url, environ)
        api_key = api_key_for(base_url, args.api_key_env, environ, source)
    if args.backend == "openai-batch":
        return make_backend(
            "openai-batch",
            model=args.model,
            api_key=api_key,
            state_path=cache_path,
            base_url=base_url,
            token_param=args.token_param,
            poll_interval=args.batch_poll_interval,
            max_rounds=args.batch_rounds,
            max_requests=args.batch_max_requests,
            max_bytes=args.batch_max_bytes,
            max_enqueued_tokens=args.batch_max_enqueued_tokens,
            max_wait=args.max_wait,
            resubmit_cancelled=args.batch_resubmit_cancelled,
            timeout=args.timeout,
            max_retries=args.max_retries,
            write_requests=args.write_batch_requests,
            read_results=args.read_batch_results.split("::") if args.read_batch_results else (),
            job_name=job_name(args),
            **sampling,
        )
    return make_backend(
        "openai",
        model=args.model,
        api_key=api_key,
        base_url=base_url,
        concurrency=args.concurrency,
        timeout=args.timeout,
        max_retries=args.max_retries,
        malformed_retries=args.malformed_retries,
        token_param=args.token_param,
        max_wait=args.max_wait,
        **sampling,
    )


EXIT_REQUESTS_WRITTEN = 3  # --write-batch-requests: the files are written, the job waits for their results


class Terminated(BaseException):
    """SIGTERM (``scancel``, a SLURM time limit), raised in the main thread so the run writes its stats."""


def _raise_terminated(signum, frame):
    signal.signal(signum, signal.SIG_IGN)  # a second one must not cut the stats write short
    raise Terminated(f"stopped by {signal.Signals(signum).name}")


def main(argv=None):
    args = parse_args(argv)
    # before any input is read or any request sent
    require_extra(MAKE_SHARDS, f"--backend {args.backend}", "vllm" if args.backend == "vllm" else "openai")
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s {MAKE_SHARDS}: %(message)s")
    logging.getLogger("paraclip_plugin").setLevel(logging.INFO)  # our progress lines; the client's stay quiet
    try:
        inputs = split_for_job(expand_inputs(args.input, output_name), args.num_jobs, args.job_index)
        prompts = load_prompts(args.prompts) if args.prompts else PromptSet()
    except (InputError, ValueError) as e:
        fail(MAKE_SHARDS, e)
    cache_path = (args.cache or os.path.join(args.output, "cache.sqlite")).replace("{job_index}", str(args.job_index))
    stats_path = args.stats or os.path.join(
        args.output, "stats", time.strftime("%Y%m%dT%H%M%S") + f"-job{args.job_index}of{args.num_jobs}.json"
    )
    options = GenerationOptions(
        min_words=args.min_words,
        max_words=args.max_words,
        max_attempts=args.max_attempts,
        max_length_ratio=args.max_length_ratio,
        caption_field=args.caption_field,
        price_per_1k_prompt=args.price_per_1k_prompt,
        price_per_1k_completion=args.price_per_1k_completion,
        progress=not args.no_progress,
        max_refused_fraction=args.max_refused_fraction,
        price_factor=args.batch_discount if args.backend == "openai-batch" else 1.0,
    )
    os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
    try:
        backend = build_backend(args, cache_path)
    except (ValueError, ImportError) as e:
        fail(MAKE_SHARDS, e)
    generator = ParaphraseGenerator(backend, args.model, prompts, CompletionCache(cache_path), options, args.backend)
    export_sft = args.export_sft.replace("{job_index}", str(args.job_index)) if args.export_sft else None
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        # openai-batch: few large batches for the whole job first, then shards from the cache
        stats = generator.run(
            inputs,
            args.output,
            stats_path,
            export_sft,
            job=(args.num_jobs, args.job_index),
            prefill=args.backend == "openai-batch",
            replace_stats=args.stats is not None,
        )
    except RequestsWritten as e:
        print(f"{MAKE_SHARDS}: stopped: {e}", file=sys.stderr)
        sys.exit(EXIT_REQUESTS_WRITTEN)
    except Terminated as e:
        fail(
            MAKE_SHARDS,
            f"{e}" + (f"; stats of the run so far: {generator.stats_file}" if generator.stats_file else ""),
            128 + signal.SIGTERM,
        )
    except JobIncomplete as e:
        print_summary(e.stats, generator.stats_file)
        fail(MAKE_SHARDS, e)
    except (InputError, GenerationError, OutputBusy) as e:
        fail(
            MAKE_SHARDS,
            f"{e}" + (f" (stats of the run so far: {generator.stats_file})" if generator.stats_file else ""),
        )
    finally:
        backend.close()
    print_summary(stats, generator.stats_file)


def print_summary(stats, stats_file):
    print(
        f"{stats['samples_out']}/{stats['samples_in']} samples written, {stats['requests']} requests, "
        f"{stats['cache_hits']} cache hits, dropped {stats['dropped']}; stats: {stats_file}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
