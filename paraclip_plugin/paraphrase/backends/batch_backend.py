"""The ``openai-batch`` backend: the OpenAI Batch API, at half the price of the same requests sent one by one.

It fills the same cache as the ``openai`` backend (the outputs are the same model's, so the cache
key's settings are the same), and the pipeline then writes shards from the cache. For each call
(one step and attempt of the whole job when the pipeline prefills, see ``ParaphraseGenerator.prefill``):

1. request lines ``{"custom_id", "method", "url", "body"}`` with ``custom_id`` = the request's cache-key
   hash, split into files within the API's limits (50,000 requests / 200 MB per file) and within
   ``max_enqueued_tokens`` (the organization's batch queue limit; estimated as UTF-8 bytes / 3 + 8 per request);
2. files are submitted while the enqueued estimate stays under ``max_enqueued_tokens``; the next waits for
   one in flight to end. Each batch carries ``metadata`` naming its request file (sha256): before creating
   one, the backend looks for a batch with that metadata (``batches.list``, back to this state file's
   creation) and adopts it; the create itself is sent without the client's blind retries, and after a lost
   reply (connection error, timeout, 408/409/429/5xx) the list is checked before trying again. So a kill
   between the create and the local record, or a reply lost on the way, never pays twice;
3. the batch id and its requests' ``custom_id`` are recorded in the sqlite file before waiting: a
   rerun first reads the recorded batches that hold any of its requests (waiting for those still running);
4. polling survives outages: a ``retrieve`` that fails after the client's retries is tried again, backing
   off, for up to ``max_wait`` seconds of outage, after which the job stops (everything recorded, a rerun resumes);
5. per request, as the ``openai`` backend: answers go to the pipeline (and the cache); a request the API
   refused (400/422 line in the error file) is ``request_rejected`` with the service's words, final
   (``final_refusals``: the pipeline caches it once its systematic-refusal check has passed); expired or
   failed requests (5xx lines, ``batch_expired``) go into the next round (``max_rounds``), after which they
   are dropped as ``request_failed`` by their last reason (not cached: a rerun asks again);
6. per batch: ``failed`` with ``token_limit_exceeded`` waits for the batches in flight (or backs off, up to
   ``max_wait``) and is submitted again; another ``failed`` stops naming the batch's errors; ``cancelled``
   (someone stopped it) keeps its partial answers and stops, naming the batch and ``--batch-resubmit-cancelled``;
   a batch the server no longer knows (404 on ``retrieve`` or on its files: another key or project, another
   ``--base-url``, a deleted file) is marked vanished with a warning, and its unanswered requests go back to pending.

A batch can hold answers that this call did not ask for (a stopped run's batch found through a shared
caption, a rerun on fewer inputs, another job of an array sharing the cache): those are kept in the
sqlite file (``batch_results``) and handed out when a later call asks for them.

Offline (``write_requests`` / ``read_results``): the same request files are written to a folder instead of
submitted, for ``vllm run-batch -i FILE -o RESULTS``; results files in its output shape are read back into
``batch_results`` and handed out as a batch's are. Nothing is sent to a server then.
"""

import collections
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import sqlite3
import time

import openai
from openai.types.chat import ChatCompletion

from ..cleaning import REQUEST_REJECTED
from .base import REQUEST_FAILED, Completion, GenerationError, RequestsWritten
from .limits import DEFAULT_MAX_ENQUEUED_TOKENS, MAX_BYTES_PER_FILE, MAX_REQUESTS_PER_FILE
from .openai_backend import (
    MalformedResponse,
    api_error_message,
    make_client,
    read_completion,
    redact_url,
    resolve_token_param,
)

log = logging.getLogger(__name__)

TERMINAL = ("completed", "failed", "expired", "cancelled")
ADOPTABLE = ("validating", "in_progress", "finalizing", "completed")
METADATA_FILE = "paraclip_request_file"  # sha256 of the request file: the same file is the same requests
METADATA_JOB = "paraclip_job"
CLOCK_SLACK = 600.0  # seconds of clock difference between this host and the server, when listing batches

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY,
    file_hash TEXT NOT NULL,
    requests INTEGER NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS batch_requests (
    batch_id TEXT NOT NULL,
    custom_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS batch_requests_by_custom_id ON batch_requests (custom_id);
CREATE TABLE IF NOT EXISTS batch_results (
    custom_id TEXT PRIMARY KEY,
    completion TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS batch_state (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


def _new_step_stats():
    return {
        "requests_submitted": 0,
        "answered": 0,
        "refused": collections.Counter(),
        "failed": collections.Counter(),
        "retried_next_round": collections.Counter(),
        "batches_created": 0,
        "batches_adopted": 0,
        "batches_resubmitted": 0,
        "batches_vanished": 0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
    }


def estimate_tokens(line):
    """An upper estimate of one request line's input tokens, from its message text."""
    body = json.loads(line)["body"]
    text = "".join(m.get("content") or "" for m in body.get("messages", []))
    return len(text.encode()) // 3 + 8


def _ambiguous(error):
    """A create whose outcome is unknown: the server may have created the batch before the reply was lost."""
    if isinstance(error, openai.APIConnectionError):  # timeouts too
        return True
    status = getattr(error, "status_code", None)
    return isinstance(status, int) and (status in (408, 409, 429) or status >= 500)


def _error_of(body):
    return (
        body.get("error")
        if isinstance(body, dict) and isinstance(body.get("error"), dict)
        else (body if isinstance(body, dict) else {})
    )


def _reason(error, status):
    """A short name for a line's outcome: OpenAI's error code (vLLM's is the status number), else its type."""
    code = error.get("code")
    return (
        code if isinstance(code, str) and code else error.get("type") or (f"http_{status}" if status else "no_response")
    )


class _Call:
    """One ``generate`` call: its requests by ``custom_id`` and what has been delivered."""

    def __init__(self, keys, on_result):
        self.keys, self.on_result = keys, on_result
        self.index = {key: i for i, key in enumerate(keys)}
        self.results = [None] * len(keys)
        self.batches = []  # ids of the batches this call submitted or resumed
        self.stopped = False  # the pipeline stopped the job from ``on_result`` (a systematic refusal)

    def deliver(self, custom_id, completion):
        """False if ``custom_id`` is not this call's."""
        i = self.index.get(custom_id)
        if i is None:
            return False
        if self.results[i] is None:
            self.results[i] = completion
            if self.on_result is not None:
                try:
                    self.on_result(i, completion)
                except BaseException:
                    self.stopped = True
                    raise
        return True

    def pending(self):
        return [i for i, r in enumerate(self.results) if r is None]


class OpenAIBatchBackend:
    final_refusals = True  # a refused line is the API's last word on that request

    def __init__(
        self,
        model,
        api_key,
        state_path,
        base_url=None,
        temperature=1.0,
        top_p=0.1,
        max_tokens=512,
        token_param="auto",
        poll_interval=60.0,
        max_rounds=3,
        max_requests=MAX_REQUESTS_PER_FILE,
        max_bytes=MAX_BYTES_PER_FILE,
        max_enqueued_tokens=DEFAULT_MAX_ENQUEUED_TOKENS,
        max_wait=900.0,
        resubmit_cancelled=False,
        timeout=60.0,
        max_retries=8,
        write_requests=None,
        read_results=(),
        job_name="",
    ):
        if not 1 <= max_requests <= MAX_REQUESTS_PER_FILE:
            raise ValueError(
                f"--batch-max-requests {max_requests}: the Batch API takes 1 to {MAX_REQUESTS_PER_FILE:,} "
                "requests per file"
            )
        if not 1 <= max_bytes <= MAX_BYTES_PER_FILE:
            raise ValueError(
                f"--batch-max-bytes {max_bytes}: the Batch API takes files of up to {MAX_BYTES_PER_FILE:,} bytes"
            )
        base_url = base_url or "https://api.openai.com/v1"
        token_param = resolve_token_param(token_param, base_url)
        self.model = model
        self.body = {"model": model, "temperature": temperature, "top_p": top_p, token_param: max_tokens}
        # The same outputs as the openai backend's: the same cache entries.
        self.output_settings = dict(backend="openai", temperature=temperature, top_p=top_p, max_tokens=max_tokens)
        self.poll_interval, self.max_rounds, self.max_wait = poll_interval, max_rounds, max_wait
        self.max_requests, self.max_bytes, self.max_enqueued_tokens = max_requests, max_bytes, max_enqueued_tokens
        self.resubmit_cancelled, self.max_retries, self.job_name = resubmit_cancelled, max_retries, job_name[:512]
        self.write_requests, self.offline = write_requests, bool(write_requests or read_results)
        self.client = make_client(api_key, base_url, timeout=timeout, max_retries=max_retries)
        self.endpoint = redact_url(base_url).rstrip("/")
        self.db = sqlite3.connect(state_path, timeout=120.0, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(_SCHEMA)
        self.db.execute("INSERT OR IGNORE INTO batch_state VALUES ('created', ?)", (str(time.time()),))
        self.epoch = float(self.db.execute("SELECT value FROM batch_state WHERE name='created'").fetchone()[0])
        self.requests = 0
        self.batches_created = 0
        self.step_stats = collections.defaultdict(_new_step_stats)  # "step1", "step2": what the stats file reports
        self._remote = None  # file hash -> [Batch] carrying our metadata, listed once per run
        self._failed = {}  # custom_id -> reason: failed in every round of this run (a rerun asks again)
        self._last_failure = {}  # custom_id -> the reason of its last failed line
        self._outage_since = None
        self._sleep = time.sleep
        for path in read_results:
            self._load_results_file(path)

    # --- one call: rounds of batches until every request is answered, refused or failed ---------------

    def generate(self, prompts, on_result=None, keys=None, step=None):
        if keys is None:
            raise ValueError("the openai-batch backend needs a cache key per request (custom_id)")
        call = _Call(keys, on_result)
        try:
            return self._generate(prompts, call, step)
        except openai.OpenAIError as e:  # what the client gave up on: one line, never the request's headers
            raise GenerationError(api_error_message(f"the Batch API at {self.endpoint}", e)) from None
        finally:
            if call.stopped:
                self._void_refusals(call.batches)

    def _void_refusals(self, batch_ids):
        """The job stopped on a systematic refusal: this call's batches not read to the end are read again by the
        rerun, their answers kept and their refusals (made under what the rerun has fixed) asked again."""
        for batch_id in batch_ids:
            self.db.execute(
                "UPDATE batches SET state='submitted-refusals-void' WHERE batch_id=? AND state LIKE 'submitted%'",
                (batch_id,),
            )

    def _generate(self, prompts, call, step):
        keys, stats = call.keys, self.step_stats[f"step{step}" if step else "requests"]
        # answers paid for in batches that earlier calls read, requests failed for good in this run,
        # then batches a stopped run never read
        for custom_id, completion in self._kept_results(keys):
            call.deliver(custom_id, completion)
        for i in call.pending():
            if keys[i] in self._failed:
                call.deliver(keys[i], Completion(None, error=REQUEST_FAILED, message=self._failed[keys[i]]))
        for batch_id in self._unread_batches([keys[i] for i in call.pending()]):
            log.info("batch %s: resuming (recorded before a previous run stopped)", batch_id)
            call.batches.append(batch_id)
            self._finish(batch_id, self._wait_any([batch_id])[1], call, stats)
        self._check_cancelled([keys[i] for i in call.pending()])
        for _ in range(self.max_rounds):
            pending = call.pending()
            if not pending:
                break
            lines = (
                json.dumps(
                    {
                        "custom_id": keys[i],
                        "method": "POST",
                        "url": "/v1/chat/completions",
                        "body": {**self.body, "messages": [{"role": "user", "content": prompts[i]}]},
                    },
                    separators=(",", ":"),
                )
                + "\n"
                for i in pending
            )
            self._run_files(self._files(lines), call, stats, step)  # files made as they are submitted
        pending = call.pending()
        if pending:
            reasons = collections.Counter()
            for i in pending:
                reason = self._failed[keys[i]] = self._last_failure.get(keys[i], "not_answered")
                reasons[reason] += 1
                stats["failed"][reason] += 1
            log.warning(
                "%d of %d requests failed in every one of %d rounds of batches (%s): their samples are "
                "dropped as request_failed; a rerun asks again",
                len(pending),
                len(keys),
                self.max_rounds,
                ", ".join(f"{r} {n}" for r, n in reasons.most_common()),
            )
            for i in pending:
                call.deliver(keys[i], Completion(None, error=REQUEST_FAILED, message=self._failed[keys[i]]))
        return call.results

    def _files(self, lines):
        """``(request file bytes, estimated tokens)`` within the caps: requests, bytes and enqueued tokens per file."""
        chunk, size, tokens = [], 0, 0
        for line in lines:
            line_size, line_tokens = len(line.encode()), estimate_tokens(line)
            if chunk and (
                len(chunk) >= self.max_requests
                or size + line_size > self.max_bytes
                or tokens + line_tokens > self.max_enqueued_tokens
            ):
                yield "".join(chunk).encode(), tokens
                chunk, size, tokens = [], 0, 0
            chunk.append(line)
            size += line_size
            tokens += line_tokens
        if chunk:
            yield "".join(chunk).encode(), tokens

    def _run_files(self, files, call, stats, step):
        """Submit ``files`` while the enqueued estimate stays within budget; read each batch as it ends; a file
        whose batch failed on the token limit is submitted again once there is room."""
        if self.offline:
            return self._write_files(list(files), step)
        queue, flight, enqueued, backed_off = collections.deque(), {}, 0, 0.0
        full = False  # the organization's queue refused a batch: submit nothing more until one of ours ends

        def ready():  # the next file, if any (made from the request lines only now)
            if not queue:
                queue.extend(itertools.islice(files, 1))
            return bool(queue)

        while ready() or flight:
            while ready() and not (flight and (full or enqueued + queue[0][1] > self.max_enqueued_tokens)):
                data, tokens = queue.popleft()
                batch_id = self._submitted(data, stats)
                call.batches.append(batch_id)
                flight[batch_id] = (data, tokens)
                enqueued += tokens
            batch_id, batch = self._wait_any(list(flight))
            data, tokens = flight.pop(batch_id)
            enqueued -= tokens
            if self._finish(batch_id, batch, call, stats) != "token_limit":
                full = False
                continue
            stats["batches_resubmitted"] += 1
            queue.appendleft((data, tokens))
            full = True
            if not flight:  # none of ours ahead of it: other batches of the organization fill the queue
                delay = min(max(self.poll_interval, 1.0) * 2 ** min(stats["batches_resubmitted"], 10), 600.0)
                if backed_off + delay > self.max_wait:
                    raise GenerationError(
                        f"batch {batch_id} failed on the organization's enqueued-token limit with nothing of this job "
                        f"in flight: waiting {delay:.0f} s more would exceed --max-wait {self.max_wait:.0f} s; other "
                        f"batches fill the queue, or one request file is above the limit (lower "
                        f"--batch-max-enqueued-tokens): rerun later"
                    )
                log.warning(
                    "batch %s: the enqueued-token limit is reached by other batches; waiting %.0f s before "
                    "submitting it again",
                    batch_id,
                    delay,
                )
                backed_off += delay
                self._sleep(delay)

    # --- the local record -------------------------------------------------------------------------

    def _select_in(self, query, custom_ids):
        """Rows of ``query`` (its ``{}`` an ``IN`` list) over ``custom_ids``, 500 at a time (sqlite's
        limit on bound parameters)."""
        for start in range(0, len(custom_ids), 500):
            chunk = custom_ids[start : start + 500]
            yield from self.db.execute(query.format(",".join("?" * len(chunk))), chunk)

    def _batches_holding(self, custom_ids, state):
        """Recorded batches in ``state`` (a LIKE pattern) that hold any of ``custom_ids``, oldest first."""
        found = set(
            self._select_in(
                "SELECT DISTINCT b.created, b.batch_id FROM batch_requests r JOIN batches b ON b.batch_id = r.batch_id "
                f"WHERE b.state LIKE '{state}' AND r.custom_id IN ({{}})",
                custom_ids,
            )
        )
        return [batch_id for _, batch_id in sorted(found)]

    def _unread_batches(self, custom_ids):
        """Recorded batches, not read yet, that hold any of ``custom_ids``, oldest first."""
        return self._batches_holding(custom_ids, "submitted%")

    def _check_cancelled(self, custom_ids):
        """Requests of a batch someone cancelled are submitted again only when asked to."""
        cancelled = self._batches_holding(custom_ids, "cancelled")
        if cancelled and not self.resubmit_cancelled:
            raise GenerationError(self._cancelled_message(cancelled[0]))
        for batch_id in cancelled:
            log.warning(
                "batch %s was cancelled: its unanswered requests are submitted again (--batch-resubmit-cancelled)",
                batch_id,
            )
            self._set_state(batch_id, "cancelled-resubmitted")

    @staticmethod
    def _cancelled_message(batch_id):
        return (
            f"batch {batch_id} was cancelled (stopped on purpose, not by this job): its answered requests are "
            f"kept; the others are not submitted again unless you rerun with --batch-resubmit-cancelled"
        )

    def _kept_results(self, custom_ids):
        """``(custom_id, Completion)`` kept from batches read for other calls, and from ``--read-batch-results``."""
        for custom_id, completion in self._select_in(
            "SELECT custom_id, completion FROM batch_results WHERE custom_id IN ({})", custom_ids
        ):
            yield custom_id, Completion(**json.loads(completion))

    def _set_state(self, batch_id, state):
        self.db.execute("UPDATE batches SET state=? WHERE batch_id=?", (state, batch_id))

    def _record(self, batch_id, file_hash, data):
        custom_ids = [json.loads(line)["custom_id"] for line in data.splitlines()]
        with self.db:  # one transaction: the batch and its requests, or neither
            self.db.execute("BEGIN")
            self.db.execute(
                "INSERT INTO batches VALUES (?, ?, ?, 'submitted', ?)",
                (batch_id, file_hash, len(custom_ids), time.time()),
            )
            self.db.executemany("INSERT INTO batch_requests VALUES (?, ?)", [(batch_id, c) for c in custom_ids])
        return len(custom_ids)

    def _known(self, batch_id):
        return self.db.execute("SELECT 1 FROM batches WHERE batch_id=?", (batch_id,)).fetchone() is not None

    # --- submitting: paid at most once ----------------------------------------------------------------

    def _submitted(self, data, stats):
        """The batch for this request file: one recorded and not yet read, one the server holds with its
        metadata (created by a run that stopped before recording it), or a new one."""
        file_hash = hashlib.sha256(data).hexdigest()
        row = self.db.execute(
            "SELECT batch_id FROM batches WHERE file_hash=? AND state LIKE 'submitted%'", (file_hash,)
        ).fetchone()
        if row:
            log.info("batch %s: resuming (recorded before a previous run stopped)", row[0])
            return row[0]
        if self._remote is None:
            self._remote = self._list_ours(self.epoch - CLOCK_SLACK)
        batch = self._adoptable(self._remote, file_hash)
        adopted = batch is not None
        if not adopted:
            upload = self.client.files.create(file=(f"paraclip-{file_hash[:12]}.jsonl", data), purpose="batch")
            batch, adopted = self._create(upload.id, file_hash, data.count(b"\n"))
        # Recorded before any waiting: from here on a crash resumes this batch instead of paying again.
        requests = self._record(batch.id, file_hash, data)
        if adopted:
            stats["batches_adopted"] += 1
            log.warning(
                "batch %s: adopted (the server holds it with this request file's metadata; a run created it "
                "but stopped, or lost the reply, before recording it)",
                batch.id,
            )
        else:
            stats["batches_created"] += 1
            stats["requests_submitted"] += requests
            self.requests += requests
            self.batches_created += 1
            log.info("batch %s: %d requests submitted", batch.id, requests)
        return batch.id

    def _list_ours(self, since):
        """``{file hash: [Batch]}`` of the server's batches carrying our metadata, created after ``since``
        (the list is newest first)."""
        found = collections.defaultdict(list)
        for batch in self.client.batches.list(limit=100):
            if batch.created_at < since:
                break
            file_hash = (batch.metadata or {}).get(METADATA_FILE)
            if file_hash:
                found[file_hash].append(batch)
        return found

    def _adoptable(self, listed, file_hash):
        for batch in listed.get(file_hash, ()):
            if batch.status in ADOPTABLE and not self._known(batch.id):
                return batch
        return None

    def _create(self, upload_id, file_hash, requests):
        """``(batch, adopted)``: the create without the client's blind retries; after a lost reply the server's
        list is checked for the batch before trying again."""
        client = self.client.with_options(max_retries=0)
        metadata = {METADATA_FILE: file_hash, METADATA_JOB: self.job_name, "paraclip_requests": str(requests)}
        for attempt in range(self.max_retries + 1):
            started = time.time()
            try:
                return client.batches.create(
                    input_file_id=upload_id, endpoint="/v1/chat/completions", completion_window="24h", metadata=metadata
                ), False
            except openai.APIError as e:
                if not _ambiguous(e) or attempt == self.max_retries:
                    raise
                delay = min(0.5 * 2**attempt, 30.0)
                log.warning(
                    "creating the batch of request file %s: %s: %s; checking in %.1f s whether the server "
                    "created it before trying again",
                    file_hash[:12],
                    type(e).__name__,
                    str(e)[:200],
                    delay,
                )
                self._sleep(delay)
                batch = self._adoptable(self._list_ours(started - CLOCK_SLACK), file_hash)
                if batch is not None:
                    return batch, True
        raise AssertionError("unreachable")

    # --- waiting: outages survived up to max_wait ---------------------------------------------------

    def _retrieve(self, batch_id):
        """The batch; ``None`` during an outage (until ``max_wait`` of it); "vanished" on a 404."""
        try:
            batch = self.client.batches.retrieve(batch_id)
        except openai.NotFoundError:
            return "vanished"
        except openai.APIError as e:
            if not _ambiguous(e):  # an outage: waiting can cure it
                raise
            now = time.monotonic()
            self._outage_since = self._outage_since or now
            if now - self._outage_since > self.max_wait:
                raise GenerationError(
                    f"the Batch API at {self.endpoint} has failed to report batch {batch_id} for "
                    f"{now - self._outage_since:.0f} s, above --max-wait {self.max_wait:.0f} s (last: "
                    f"{type(e).__name__}: {str(e)[:200]}); every batch is recorded: rerun to resume"
                ) from None
            log.warning(
                "batch %s: status unavailable (%s), %.0f s into an outage; trying again",
                batch_id,
                type(e).__name__,
                now - self._outage_since,
            )
            return None
        self._outage_since = None
        return batch

    def _wait_any(self, batch_ids):
        """``(batch_id, Batch or "vanished")`` of the first of ``batch_ids`` to end."""
        start, outages = time.time(), 0
        while True:
            for batch_id in batch_ids:
                batch = self._retrieve(batch_id)
                if batch is None:
                    continue
                if batch == "vanished":
                    return batch_id, batch
                counts = batch.request_counts
                log.info(
                    "batch %s: %s, %s/%s done, %s failed, %.0f s",
                    batch_id,
                    batch.status,
                    getattr(counts, "completed", "?"),
                    getattr(counts, "total", "?"),
                    getattr(counts, "failed", "?"),
                    time.time() - start,
                )
                if batch.status in TERMINAL:
                    return batch_id, batch
            outages = outages + 1 if self._outage_since else 0
            self._sleep(min(self.poll_interval * 2 ** min(outages, 10), max(self.poll_interval, 300.0)))

    # --- reading a finished batch -------------------------------------------------------------------

    def _vanished(self, batch_id, why, stats):
        log.warning(
            "batch %s: %s at %s (a batch of another key or project, another --base-url, or a deleted "
            "file): marked vanished; its unanswered requests go back to pending and are submitted again",
            batch_id,
            why,
            self.endpoint,
        )
        stats["batches_vanished"] += 1
        self._set_state(batch_id, "vanished")

    def _finish(self, batch_id, batch, call, stats):
        """Read an ended batch into ``call`` (and ``batch_results``); "token_limit" if it must be submitted again."""
        if batch == "vanished":
            return self._vanished(batch_id, "batches.retrieve answered 404 Not Found", stats)
        if batch.status == "failed" and not batch.output_file_id:
            errors = getattr(getattr(batch, "errors", None), "data", None) or []
            self._set_state(batch_id, "failed")
            if any(getattr(e, "code", None) == "token_limit_exceeded" for e in errors):
                log.warning(
                    "batch %s failed: token_limit_exceeded (the organization's enqueued-token limit); it is "
                    "submitted again once batches in flight end",
                    batch_id,
                )
                return "token_limit"
            message = "; ".join(f"{getattr(e, 'code', None)}: {getattr(e, 'message', e)}" for e in errors[:3])
            raise GenerationError(f"batch {batch_id} failed: {message or 'no reason given'}")
        others = []  # answers to requests of another call: kept for it
        void = self.db.execute("SELECT state FROM batches WHERE batch_id=?", (batch_id,)).fetchone() == (
            "submitted-refusals-void",
        )
        try:
            for custom_id, completion in self._results(batch, stats):
                if void and completion.error == REQUEST_REJECTED:
                    stats["retried_next_round"]["refusal_before_a_systematic_stop"] += 1
                    continue
                if not call.deliver(custom_id, completion):
                    others.append((custom_id, json.dumps(dataclasses.asdict(completion))))
        except openai.NotFoundError as e:
            self._keep(others)
            return self._vanished(batch_id, f"its file answered 404 Not Found ({str(e)[:120]})", stats)
        self._keep(others)
        if batch.status == "cancelled":
            self._set_state(batch_id, "cancelled")
            if not self.resubmit_cancelled:
                raise GenerationError(self._cancelled_message(batch_id))
            log.warning(
                "batch %s was cancelled: its unanswered requests go into the next round (--batch-resubmit-cancelled)",
                batch_id,
            )
            self._set_state(batch_id, "cancelled-resubmitted")
        else:
            self._set_state(batch_id, "read")
        return None

    def _keep(self, others):
        with self.db:  # one transaction
            self.db.execute("BEGIN")
            self.db.executemany("INSERT OR IGNORE INTO batch_results VALUES (?, ?)", others)

    def _results(self, batch, stats):
        """``(custom_id, Completion)`` for every answered or refused request of an ended batch; a failed line
        is noted (``_last_failure``) and stays a miss for the next round."""
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id:
                for line in self.client.files.content(file_id).text.splitlines():
                    outcome = self._outcome(json.loads(line), stats)
                    if outcome is not None:
                        yield outcome

    def _outcome(self, record, stats):
        custom_id = record["custom_id"]
        response = record.get("response") or {}
        status, body = response.get("status_code"), response.get("body")
        # OpenAI puts a refusal's error in the body; vLLM's run-batch in the line's "error" (an object or a string)
        error = (
            _error_of(body)
            or _error_of(record.get("error"))
            or ({"message": record["error"]} if isinstance(record.get("error"), str) else {})
        )
        if status == 200 and isinstance(body, dict):
            try:
                completion = read_completion(ChatCompletion.construct(**body))
            except MalformedResponse:
                reason = "malformed_response"
            else:
                stats["answered"] += 1
                stats["prompt_tokens"] += completion.prompt_tokens
                stats["completion_tokens"] += completion.completion_tokens
                return custom_id, completion
        elif status in (400, 422):
            reason = _reason(error, status)
            stats["refused"][reason] += 1
            message = error.get("message") or str(body)
            return custom_id, Completion(None, error=REQUEST_REJECTED, message=f"HTTP {status}: {message}")
        else:  # expired, cancelled, 429/5xx inside the batch
            reason = _reason(error, status)
        self._last_failure[custom_id] = reason
        stats["retried_next_round"][reason] += 1
        return None

    # --- offline: vllm run-batch ------------------------------------------------------------------

    def _write_files(self, files, step):
        if not self.write_requests:
            raise GenerationError(
                f"--read-batch-results: {sum(d.count(10) for d, _ in files)} "
                f"step-{step} requests have no result in the files given; pass --write-batch-requests "
                f"DIR to write them"
            )
        os.makedirs(self.write_requests, exist_ok=True)
        paths = []
        for data, _ in files:
            path = os.path.join(self.write_requests, f"step{step or 0}-{hashlib.sha256(data).hexdigest()[:16]}.jsonl")
            with open(path + ".partial", "wb") as f:
                f.write(data)
            os.replace(path + ".partial", path)
            paths.append(path)
        raise RequestsWritten(
            f"wrote {len(paths)} request file(s) of step {step} ({sum(d.count(10) for d, _ in files)} requests) to "
            f"{self.write_requests}: run `vllm run-batch -i FILE -o FILE.results.jsonl --model {self.model}` on "
            f"each, then rerun this command adding --read-batch-results with the results files ('::' between them)"
        )

    def _load_results_file(self, path):
        """A ``vllm run-batch`` (or Batch API) output file into ``batch_results``; a line that is not a result
        is an error naming the file and line."""
        stats, kept = _new_step_stats(), []
        try:
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        outcome = self._outcome(json.loads(line), stats)
                    except (ValueError, KeyError, TypeError, AttributeError) as e:
                        raise ValueError(
                            f"--read-batch-results {path}: line {number} is not a batch result "
                            f"({type(e).__name__}: {e})"
                        ) from None
                    if outcome is not None:
                        kept.append((outcome[0], json.dumps(dataclasses.asdict(outcome[1]))))
        except OSError as e:
            raise ValueError(f"--read-batch-results {path}: {e.strerror}") from None
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT OR REPLACE INTO batch_results VALUES (?, ?)", kept)
        log.info(
            "%s: %d results read (%d answered, %d refused)",
            path,
            len(kept),
            stats["answered"],
            sum(stats["refused"].values()),
        )

    def close(self):
        self.client.close()
        self.db.close()
