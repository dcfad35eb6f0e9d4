"""Input shards -> filter -> dedupe -> step 1 -> step 2 -> clean / retry / drop -> output shards.

One output per input, with the input's base name (``output_name``), written to ``<name>.partial`` and
renamed when complete: a rerun skips every output that exists, and ``kill -9`` never leaves half a shard
under a final name. The ``.partial``'s lock is taken before the shard's first request, so a second run on
the same output stops before paying. Work is done a shard at a time: step 1 for the shard's unique captions (one backend
batch), then step 2 on step 1's outputs, each with up to ``max_attempts`` rounds for rejected
outputs. Every completion goes to the cache as it arrives, so a rerun after a crash pays for
nothing twice and, replaying the same outputs, writes the same shards.
"""

import collections
import contextlib
import dataclasses
import json
import logging
import os
import time

from tqdm import tqdm

from . import cleaning
from .backends.base import FINAL_FINISH_REASONS, PROMPT_TOO_LONG, REQUEST_FAILED, GenerationError
from .cache import CompletionCache, request_key
from ..data.inputs import check_output_names, is_caption_file, output_name, read_caption_file
from .prompts import PromptSet
from ..data.atomic import atomic_create_text, atomic_file, lock_or_busy, atomic_write_text
from ..data.layout import CAPTION, IMAGE_EXTENSIONS, METADATA, PARA1, PARA2, read_sizes_json, update_sizes_json
from ..data.errors import InputError
from ..data.tars import TarSampleWriter, count_tar_samples, read_tar_samples

log = logging.getLogger(__name__)


# Drops that say more about the service (or its settings) than about one caption: an input whose
# every sample ends this way is never written as an empty output.
_SERVICE_DROPS = {
    f"step{step}_{reason}"
    for step in (1, 2)
    for reason in (cleaning.REQUEST_REJECTED, REQUEST_FAILED, *FINAL_FINISH_REASONS)
}


@dataclasses.dataclass
class GenerationOptions:
    min_words: int = 2  # the official release keeps captions of 2..15 words
    max_words: int = 15
    max_attempts: int = 3  # rounds per step before a rejected sample is dropped
    max_length_ratio: float = 3.0
    price_per_1k_prompt: float = 0.0
    price_per_1k_completion: float = 0.0
    caption_field: str = "caption"
    progress: bool = True
    max_refused_fraction: float = 0.5  # more refused requests in one batch (of >= 4) stop the job
    price_factor: float = 1.0  # 0.5 for the Batch API's discount


class RefusalGuard:
    """Tells a per-sample refusal from a service that refuses the job's requests systematically.

    A 400/422 on one caption (a content filter) drops that sample; a 400 on every request (a
    parameter the model rejects, no chat template, a wrong model name) must stop the job with the
    server's own message instead of dropping every sample into empty shards. Stops when the first
    ``probe`` requests of the job were all refused, or when more than ``max_fraction`` of a batch of
    at least ``min_batch`` requests was.
    """

    def __init__(self, max_fraction=0.5, probe=8, min_batch=4):
        self.max_fraction, self.probe, self.min_batch = max_fraction, probe, min_batch
        self.answered = 0  # of the job's first ``probe`` requests, as they arrive
        self.refused = []  # their refusal messages

    def observe(self, step, completion):
        """Each answer as it arrives: stop at once (in-flight requests are cancelled) when the job's
        first ``probe`` answers were all refusals."""
        if self.answered >= self.probe:
            return
        self.answered += 1
        if completion.error == cleaning.REQUEST_REJECTED:
            self.refused.append(completion.message)
        if len(self.refused) == self.answered == self.probe:
            self._stop(step, f"the job's first {self.probe}", self.refused)

    def check(self, step, requests, messages):
        """A finished batch of ``requests`` with these refusal ``messages``."""
        if requests >= self.min_batch and len(messages) > self.max_fraction * requests:
            self._stop(step, str(requests), messages)

    @staticmethod
    def _stop(step, requests, messages):
        raise GenerationError(
            f"the server refused {len(messages)} of {requests} step-{step} requests, systematically "
            f"(first refusal: {messages[0]}); stopping: nothing is written for this input and a rerun redoes it"
        )


MAX_FAILED_IN_A_ROW = 3  # inputs that could not be written, one after another, before the job stops


class ShardNotWritten(GenerationError):
    """Every kept sample of one input was dropped: nothing is written for it (never an empty output)."""


class JobIncomplete(GenerationError):
    """The run wrote what it could, but some inputs could not be written (``stats["failed_inputs"]``)."""

    def __init__(self, message, stats):
        super().__init__(message)
        self.stats = stats


@contextlib.contextmanager
def _prefill_lock(output_dir, job):
    """Held while a job prefills through the Batch API: a second run of the same job on this output (an
    array task submitted twice) stops before it submits anything. The shards' own locks come later."""
    path = os.path.join(output_dir, f".prefill-job{job[1]}of{job[0]}.lock")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
    lock_or_busy(
        fd,
        f"{output_dir}: another run of job {job[1]} of {job[0]} is submitting batches for this output "
        f"now ({path} is locked); two jobs were given the same inputs and output",
    )
    try:
        yield
    finally:
        os.close(fd)


class _WrittenMeanwhile(Exception):
    """Another run finished the output while this one waited for its lock."""


def _read_shard_items(in_path):
    """``(items, Counter of dropped samples by reason)`` of an input shard; a caption that is not UTF-8 or a
    ``.json`` member that is not a JSON object is an error naming the file and the sample."""
    items, dropped = [], collections.Counter()
    for sample in read_tar_samples(in_path):
        images = [ext for ext in IMAGE_EXTENSIONS if ext in sample]
        if CAPTION not in sample or not images:
            dropped["no_caption" if CAPTION not in sample else "no_image"] += 1
            continue
        where = f"{in_path}: sample {sample['__key__']!r}"
        try:
            caption = sample[CAPTION].decode("utf-8").strip()
            meta = json.loads(sample[METADATA]) if METADATA in sample else {}
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{where}: unreadable txt/json member ({e})") from e
        if not isinstance(meta, dict):
            raise InputError(
                f"{where}: its {METADATA} member is {type(meta).__name__}, not a JSON object "
                "(the output adds fields to it)"
            )
        items.append({"caption": caption, "sample": sample, "images": images, "meta": meta})
    return items, dropped


class ParaphraseGenerator:
    def __init__(self, backend, model, prompts=None, cache=None, options=None, backend_name="openai"):
        self.backend = backend
        self.model = model
        self.prompts = prompts or PromptSet()
        self.cache = cache if cache is not None else CompletionCache(":memory:")
        self.options = options or GenerationOptions()
        self.backend_name = backend_name
        # Every setting that changes an output: part of the cache key and of each sample's json.
        self.settings = dict(getattr(backend, "output_settings", None) or {"backend": backend_name})
        self.refusals = RefusalGuard(self.options.max_refused_fraction)
        self.counts = collections.Counter()  # samples, requests, tokens
        self.dropped = collections.Counter()  # samples dropped, by reason
        self.retried = collections.Counter()  # rejected outputs that got another attempt, by reason
        self.failed = {}  # input -> why it could not be written (this run)
        self.stats_file = None  # where run() wrote its stats

    # --- the two steps ------------------------------------------------------------------------

    def _run_step(self, step, sources):
        """``({source: paraphrase}, {source: reason})`` for unique ``sources`` of one step."""
        opts, accepted, reasons = self.options, {}, {}
        key = (self.model, self.prompts.version, self.settings, step)
        pending = list(dict.fromkeys(sources))
        for attempt in range(opts.max_attempts):
            if not pending:
                break
            raw = self.cache.get_many(*key[:3], step, attempt, pending)
            self.counts["cache_hits"] += len(raw)
            misses = [s for s in pending if s not in raw]
            if misses:
                refused = {}  # source -> its refusal

                def on_result(index, completion, misses=misses, raw=raw, refused=refused, attempt=attempt):
                    source = misses[index]
                    if completion.error == REQUEST_FAILED:  # never answered: nothing paid, nothing cached
                        reasons[source] = completion.error
                        return
                    self.counts["requests"] += 1  # answered (refused ones too): a stopped run counts what it paid
                    self.refusals.observe(step, completion)
                    self.counts["prompt_tokens"] += completion.prompt_tokens
                    self.counts["completion_tokens"] += completion.completion_tokens
                    if completion.error in (cleaning.REQUEST_REJECTED, PROMPT_TOO_LONG):  # not cached: a rerun asks
                        if completion.error == cleaning.REQUEST_REJECTED:  # again (with another --max-model-len)
                            refused[source] = completion
                        reasons[source] = completion.error
                        return
                    # Cached before use: a crash after this line never pays for this request again.
                    self.cache.put(*key[:3], step, attempt, source, completion)
                    raw[source] = completion

                keys = [request_key(*key[:3], step, attempt, s) for s in misses]
                self.backend.generate([self.prompts.render(step, s) for s in misses], on_result, keys=keys, step=step)
                self.refusals.check(step, len(misses), [c.message for c in refused.values()])
                if getattr(self.backend, "final_refusals", False):
                    # One refused caption, not a systematic refusal (checked above): kept as refused, so no later
                    # call (the shards' pass, a rerun) asks again and meets it as a batch of refusals.
                    for source, completion in refused.items():
                        self.cache.put(*key[:3], step, attempt, source, completion)
            retry = []
            for source in pending:
                if source not in raw:  # the service refused the request itself: no retry helps
                    continue
                if raw[source].error:  # content_filter / length / refusal: the same input fails alike
                    reasons[source] = raw[source].error
                    continue
                output = cleaning.clean(raw[source].text)
                reason = cleaning.reject_reason(
                    output, source, opts.max_length_ratio, step1_output=source if step == 2 else None
                )
                if reason is None:
                    accepted[source] = output
                else:
                    reasons[source] = reason
                    retry.append(source)
            if attempt + 1 < opts.max_attempts:
                self.retried.update(reasons[s] for s in retry)
            pending = retry
        return accepted, {s: reasons[s] for s in dict.fromkeys(sources) if s not in accepted}

    def paraphrase(self, captions):
        """``{caption: (para1, para2) or reason}`` for a list of captions, each requested once."""
        unique = list(dict.fromkeys(captions))
        self.counts["duplicate_captions"] += len(captions) - len(unique)
        step1, dropped1 = self._run_step(1, unique)
        step2, dropped2 = self._run_step(2, list(step1.values()))
        result = {}
        for caption in unique:
            if caption in dropped1:
                result[caption] = f"step1_{dropped1[caption]}"
            elif step1[caption] in dropped2:
                result[caption] = f"step2_{dropped2[step1[caption]]}"
            else:
                result[caption] = (step1[caption], step2[step1[caption]])
        return result

    def _keep_caption(self, caption):
        words = len(caption.split())
        if words < self.options.min_words:
            return "filtered_too_short"
        if words > self.options.max_words:
            return "filtered_too_long"
        return None

    def _metadata(self):
        return {
            "paraphrase_model": self.model,
            "paraphrase_prompt_version": self.prompts.version,
            "paraphrase_backend": self.backend_name,
            "paraphrase_settings": self.settings,
        }

    # --- one input -> one output ---------------------------------------------------------------

    def _paraphrased(self, items):
        """``[(item, para1, para2)]`` for kept items; the rest are counted by reason."""
        results = self.paraphrase([item["caption"] for item in items])
        out = []
        for item in items:
            result = results[item["caption"]]
            if isinstance(result, str):
                self.dropped[result] += 1
            else:
                out.append((item, *result))
        drops = {r for r in results.values() if isinstance(r, str)}
        if items and not out and drops <= _SERVICE_DROPS:
            hint = (
                " (prompt_too_long: raise vLLM's --max-model-len, or shorten --prompts)"
                if any(d.endswith(PROMPT_TOO_LONG) for d in drops)
                else ""
            )
            raise ShardNotWritten(
                f"every kept sample was refused or cut off by the service ({', '.join(sorted(drops))}){hint}; "
                "nothing is written for this input and a rerun redoes it"
            )
        if items and not out:  # never an empty output that a rerun would take for done
            raise ShardNotWritten(
                f"every kept sample was dropped ({', '.join(sorted(drops))}): the model's answers were not "
                f"usable paraphrases after {self.options.max_attempts} attempts each (a wrong chat template, "
                f"a model answering outside the message content, or prompts it does not follow?); nothing is "
                f"written for this input. Its answers are cached: rerunning with the same --model and --prompts "
                f"gives them again"
            )
        return out

    def _load(self, in_path):
        """``(kept items, Counter of dropped samples by reason, samples read)`` of one input. The whole input is
        read and checked first: bad input stops the job here, naming the file and sample, before any request."""
        if is_caption_file(in_path):
            items, dropped = read_caption_file(in_path, self.options.caption_field), collections.Counter()
        else:
            items, dropped = _read_shard_items(in_path)
        read = len(items) + sum(dropped.values())
        kept = []
        for item in items:
            reason = self._keep_caption(item["caption"])
            if reason:
                dropped[reason] += 1
            else:
                kept.append(item)
        return kept, dropped, read

    def _write_output(self, in_path, out_path):
        """One input -> its output; returns the samples written. The output's lock (its ``.partial``) is taken
        before the input is read or anything requested: a second run given the same output stops here
        (``OutputBusy``) without paying, and one whose output another run finished between its exists-check and
        taking the lock raises ``_WrittenMeanwhile``."""
        with atomic_file(out_path) as stream:
            if os.path.exists(out_path):
                raise _WrittenMeanwhile(out_path)
            kept, dropped, read = self._load(in_path)
            self.counts["samples_in"] += read
            self.dropped.update(dropped)
            written = self._paraphrased(kept)
            (self._write_records if is_caption_file(in_path) else self._write_samples)(stream, written)
        if not is_caption_file(in_path):
            update_sizes_json(os.path.dirname(out_path), {out_path: len(written)})
        return len(written)

    def _write_samples(self, stream, written):
        """A four-field tar shard: the input's samples (image bytes unchanged) with both paraphrases."""
        sink = TarSampleWriter(stream)
        for item, para1, para2 in written:
            sample = item["sample"]
            out = {
                "__key__": sample["__key__"],
                "__mtime__": sample["__mtime__"],
                CAPTION: sample[CAPTION],
                PARA1: para1,
                PARA2: para2,
                METADATA: json.dumps({**item["meta"], **self._metadata()}, ensure_ascii=False),
            }
            out.update({ext: sample[ext] for ext in item["images"]})
            sink.write(out)
        sink.close()

    def _write_records(self, stream, written):
        """JSONL: each caption file record with its caption and both paraphrases."""
        for item, para1, para2 in written:
            record = {
                **item["record"],
                "caption": item["caption"],
                "paraphrase_1": para1,
                "paraphrase_2": para2,
                **self._metadata(),
            }
            stream.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))

    # --- a run ---------------------------------------------------------------------------------

    def prefill(self, inputs, output_dir):
        """Both steps for every kept caption of ``inputs`` not yet written, in one backend call per step
        and attempt (the Batch API's way: few large batches); ``run`` then writes shards from the cache. Every
        input is read and checked as ``run`` does (the same samples kept, the same errors) before anything is sent."""
        captions = []
        for in_path in inputs:
            if not os.path.exists(os.path.join(output_dir, output_name(in_path))):
                kept, _, _ = self._load(in_path)
                captions.extend(item["caption"] for item in kept)
        if captions:
            self.paraphrase(captions)
        # What run() counts again from the cache is not counted twice; requests and tokens stay.
        for name in ("cache_hits", "duplicate_captions"):
            self.counts[name] = 0
        self.retried.clear()

    def run(self, inputs, output_dir, stats_path=None, export_sft=None, job=(1, 0), prefill=False, replace_stats=True):
        """Write the output of every input not yet written; ``prefill`` first (the Batch API backend).

        Inputs whose every kept sample was dropped are not written (never an empty output); the others are, and
        the run then raises ``JobIncomplete`` naming them, unless ``MAX_FAILED_IN_A_ROW`` fail one after another
        (a systematic fault: a wrong chat template, too low --max-tokens), which stops it at once. The stats go to
        ``stats_path`` however the run ends (``status``, ``error``, ``failed_inputs``); ``replace_stats=False``
        never replaces an existing file there (``<stem>-2.json`` ... instead). ``self.stats_file``: where they went."""
        start = time.time()
        self.failed = {}
        try:
            check_output_names(inputs, output_name)
            os.makedirs(output_dir, exist_ok=True)
            if prefill:
                with _prefill_lock(output_dir, job):
                    self.prefill(inputs, output_dir)
            self._write_outputs(inputs, output_dir)
        except BaseException as e:  # Ctrl-C too: what was paid for is recorded
            self._save_stats(stats_path, self.stats(time.time() - start, job, error=e), replace_stats)
            raise
        stats = self.stats(time.time() - start, job)
        self._save_stats(stats_path, stats, replace_stats)
        if export_sft:
            self.export_sft(
                export_sft, [os.path.join(output_dir, output_name(p)) for p in inputs if p not in self.failed]
            )
        if self.failed:
            raise JobIncomplete(
                f"{len(self.failed)} of {len(inputs)} inputs could not be written (the others are): "
                + "; ".join(f"{p}: {reason}" for p, reason in self.failed.items()),
                stats,
            )
        return stats

    def _write_outputs(self, inputs, output_dir):
        bar = tqdm(total=len(inputs), unit="shard", desc="shards", disable=not self.options.progress)
        samples_bar = tqdm(unit="sample", desc="samples", disable=not self.options.progress)
        in_a_row = 0  # inputs that could not be written, one after another
        for in_path in inputs:
            before = self.counts["samples_in"]
            try:
                self._write_input(in_path, output_dir)
            except ShardNotWritten as e:
                self.failed[in_path] = str(e)
                log.warning("%s: not written: %s", in_path, e)
                in_a_row += 1
                if in_a_row >= MAX_FAILED_IN_A_ROW:
                    raise GenerationError(
                        f"{in_a_row} inputs in a row could not be written, a systematic fault: stopping "
                        f"(last: {in_path}: {e})"
                    ) from None
            else:  # written now, or found done (a rerun): either way the fault is not systematic
                in_a_row = 0
            samples_bar.update(self.counts["samples_in"] - before)
            samples_bar.set_postfix(requests=self.counts["requests"], cache_hits=self.counts["cache_hits"])
            bar.update(1)
        samples_bar.close()
        bar.close()

    def _write_input(self, in_path, output_dir):
        """Write one input's output unless done."""
        out_path = os.path.join(output_dir, output_name(in_path))
        if os.path.abspath(out_path) == os.path.abspath(in_path):
            raise InputError(f"{in_path}: output would overwrite the input; choose another --output")
        if not os.path.exists(out_path):
            try:
                self.counts["samples_out"] += self._write_output(in_path, out_path)
                self.counts["shards_written"] += 1
                return
            except _WrittenMeanwhile:
                pass  # another run (same output folder) finished it just before we took its lock
            except ShardNotWritten:
                raise
            except GenerationError as e:
                raise GenerationError(f"{in_path}: {e}") from None
        self.counts["shards_skipped"] += 1
        self._repair_sizes(out_path)

    def _save_stats(self, path, stats, replace):
        if not path:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        text = json.dumps(stats, indent=1) + "\n"
        if replace:
            atomic_write_text(path, text)
            self.stats_file = path
        else:
            self.stats_file = atomic_create_text(path, text)

    def _repair_sizes(self, out_path):
        """A job killed between a shard's rename and its sizes.json update left it uncounted."""
        if out_path.endswith(".tar") and os.path.basename(out_path) not in read_sizes_json(os.path.dirname(out_path)):
            update_sizes_json(os.path.dirname(out_path), {out_path: count_tar_samples(out_path)})

    def stats(self, wall_seconds, job=(1, 0), error=None):
        """The run's counts; ``status``: complete, incomplete (``failed_inputs`` not written) or failed (stopped
        by ``error``: what was paid for until then is counted all the same)."""
        o = self.options
        cost = self._cost(self.counts["prompt_tokens"], self.counts["completion_tokens"])
        batches = self._batch_stats()
        if batches is not None:  # what the batches read in this run hold, each paid line once
            cost = sum(step["estimated_cost_usd"] for step in batches.values())
        return {
            "status": "failed" if error is not None else "incomplete" if self.failed else "complete",
            "error": None if error is None else f"{type(error).__name__}: {error}".splitlines()[0],
            "failed_inputs": dict(self.failed),
            "model": self.model,
            "backend": self.backend_name,
            "prompt_version": self.prompts.version,
            "num_jobs": job[0],
            "job_index": job[1],
            "shards_written": self.counts["shards_written"],
            "shards_skipped": self.counts["shards_skipped"],
            "samples_in": self.counts["samples_in"],
            "samples_out": self.counts["samples_out"],
            "dropped": dict(sorted(self.dropped.items())),
            "retried": dict(sorted(self.retried.items())),
            "duplicate_captions": self.counts["duplicate_captions"],
            "requests": self.counts["requests"],
            "cache_hits": self.counts["cache_hits"],
            "prompt_tokens": self.counts["prompt_tokens"],
            "completion_tokens": self.counts["completion_tokens"],
            "settings": self.settings,
            "rate_limit_wait_seconds": round(sum(getattr(self.backend, "rate_limit_waits", ())), 3),
            **({"batches": batches} if batches is not None else {}),
            "estimated_cost_usd": round(cost, 6),
            "price_factor": o.price_factor,
            "wall_seconds": round(wall_seconds, 3),
            "samples_per_second": round(self.counts["samples_in"] / wall_seconds, 2) if wall_seconds else None,
        }

    def _cost(self, prompt_tokens, completion_tokens):
        o = self.options
        return (
            (prompt_tokens * o.price_per_1k_prompt + completion_tokens * o.price_per_1k_completion)
            / 1000
            * o.price_factor
        )

    def _batch_stats(self):
        """Per step, what a batch backend submitted and read in this run (None for other backends): requests
        submitted, answered, refused and failed by reason, batches created / adopted / resubmitted / vanished, and
        the estimated cost of the answered lines."""
        steps = getattr(self.backend, "step_stats", None)
        if steps is None:
            return None
        out = {}
        for name, counts in sorted(steps.items()):
            out[name] = {k: dict(sorted(v.items())) if isinstance(v, dict) else v for k, v in counts.items()}
            out[name]["estimated_cost_usd"] = round(self._cost(counts["prompt_tokens"], counts["completion_tokens"]), 6)
        return out

    def export_sft(self, path, outputs):
        """The (prompt, paraphrase) pairs of every written sample of ``outputs`` (this run's and those an
        earlier run of the job wrote) as chat-format JSONL, each pair once: the paper's instruction-tuning data."""
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        pairs = {}
        for out_path in outputs:
            if out_path.endswith(".jsonl"):
                with open(out_path, encoding="utf-8") as f:
                    texts = [(r["caption"], r["paraphrase_1"], r["paraphrase_2"]) for r in map(json.loads, f) if r]
            else:
                texts = [
                    tuple(s[field].decode("utf-8").strip() for field in (CAPTION, PARA1, PARA2))
                    for s in read_tar_samples(out_path)
                ]
            for caption, para1, para2 in texts:
                pairs[self.prompts.render(1, caption), para1] = None
                pairs[self.prompts.render(2, para1), para2] = None
        with atomic_file(path, "w") as f:
            for prompt, output in pairs:
                f.write(
                    json.dumps(
                        {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]},
                        ensure_ascii=False,
                    )
                    + "\n"
                )
