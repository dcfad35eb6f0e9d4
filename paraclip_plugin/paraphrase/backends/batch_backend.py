"""The ``openai-batch`` backend: the OpenAI Batch API, at half the price of the same requests sent one by one.

It fills the same cache as the ``openai`` backend (the outputs are the same model's, so the cache
key's settings are the same), and the pipeline then writes shards from the cache. For each call
(one step and attempt of the whole job when the pipeline prefills, see ``ParaphraseGenerator.prefill``):

1. request lines ``{"custom_id", "method", "url", "body"}`` with ``custom_id`` = the request's cache-key
   hash, split at the API's limits (50,000 requests / 200 MB per file);
2. upload each file, create its batch (``completion_window`` 24h) and **record the batch id and its
   requests' ``custom_id`` in the sqlite file before waiting**: after a crash or ``kill -9`` the rerun
   first reads the recorded batches that hold any of its requests (waiting for them where they still
   run), and submits only what they did not answer, instead of paying again;
3. poll with a progress line until the batch ends; read its output and error files: answers go
   to the pipeline (and so to the cache) as the ``openai`` backend's do; a request the API refused
   (400/422) is ``request_rejected``; expired or failed requests stay misses and are submitted
   again in the next round (``max_rounds``), after which the job stops (a rerun resumes).
   A batch can hold answers that this call did not ask for (a stopped run's batch found through a
   shared caption, a rerun on fewer inputs, another job of an array sharing the cache): those are
   kept in the sqlite file (``batch_results``) and handed out when a later call asks for them, so
   no answer that was paid for is asked again.

The same request JSONL runs offline with ``vllm run-batch`` (vLLM's OpenAI batch runner).
"""
import dataclasses
import hashlib
import json
import logging
import sqlite3
import time

import openai
from openai.types.chat import ChatCompletion

from ..cleaning import REQUEST_REJECTED
from .base import Completion, GenerationError
from .openai_backend import (MalformedResponse, api_error_message, make_client, read_completion, redact_url,
                             resolve_token_param)

log = logging.getLogger(__name__)

MAX_REQUESTS_PER_FILE = 50_000
MAX_BYTES_PER_FILE = 200 * 1000 * 1000
TERMINAL = ("completed", "failed", "expired", "cancelled")

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
"""


class OpenAIBatchBackend:
    def __init__(self, model, api_key, state_path, base_url=None, temperature=1.0, top_p=0.1, max_tokens=512,
                 token_param="auto", poll_interval=60.0, max_rounds=3, max_requests=MAX_REQUESTS_PER_FILE,
                 max_bytes=MAX_BYTES_PER_FILE, timeout=60.0, max_retries=8):
        base_url = base_url or "https://api.openai.com/v1"
        token_param = resolve_token_param(token_param, base_url)
        self.model = model
        self.body = {"model": model, "temperature": temperature, "top_p": top_p, token_param: max_tokens}
        # The same outputs as the openai backend's: the same cache entries.
        self.output_settings = dict(backend="openai", temperature=temperature, top_p=top_p, max_tokens=max_tokens)
        self.poll_interval, self.max_rounds = poll_interval, max_rounds
        self.max_requests, self.max_bytes = max_requests, max_bytes
        self.client = make_client(api_key, base_url, timeout=timeout, max_retries=max_retries)
        self.endpoint = redact_url(base_url).rstrip("/")
        self.db = sqlite3.connect(state_path, timeout=120.0, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(_SCHEMA)
        self.requests = 0
        self.batches_created = 0
        self._sleep = time.sleep

    # --- one call: rounds of batches until every request is answered or refused -----------------

    def generate(self, prompts, on_result=None, keys=None):
        try:
            return self._generate(prompts, on_result, keys)
        except openai.OpenAIError as e:  # what the client gave up on: one line, never the request's headers
            raise GenerationError(api_error_message(f"the Batch API at {self.endpoint}", e)) from None

    def _generate(self, prompts, on_result, keys):
        if keys is None:
            raise ValueError("the openai-batch backend needs a cache key per request (custom_id)")
        index = {key: i for i, key in enumerate(keys)}
        pending = list(range(len(prompts)))
        results = [None] * len(prompts)
        def deliver(i, completion):
            if results[i] is None:
                results[i] = completion
                if on_result is not None:
                    on_result(i, completion)

        def read(batch_id):
            others = []  # answers to requests of another call: kept for it
            for custom_id, completion in self._results(self._wait(batch_id)):
                i = index.get(custom_id)
                if i is not None:
                    deliver(i, completion)
                elif completion.error != REQUEST_REJECTED:  # a refused request is asked again, as in the cache
                    others.append((custom_id, json.dumps(dataclasses.asdict(completion))))
            with self.db:  # one transaction: the kept answers and the batch's state, or neither
                self.db.execute("BEGIN")
                self.db.executemany("INSERT OR IGNORE INTO batch_results VALUES (?, ?)", others)
                self.db.execute("UPDATE batches SET state='read' WHERE batch_id=?", (batch_id,))

        # answers paid for in batches that earlier calls read, and batches a stopped run never read
        for custom_id, completion in self._kept_results(keys):
            deliver(index[custom_id], completion)
        pending = [i for i in pending if results[i] is None]
        for batch_id in self._unread_batches([keys[i] for i in pending]):
            log.info("batch %s: resuming (recorded before a previous run stopped)", batch_id)
            read(batch_id)
        pending = [i for i in pending if results[i] is None]
        for _ in range(self.max_rounds):
            if not pending:
                break
            lines = [json.dumps({"custom_id": keys[i], "method": "POST", "url": "/v1/chat/completions",
                                 "body": {**self.body, "messages": [{"role": "user", "content": prompts[i]}]}},
                                separators=(",", ":")) + "\n" for i in pending]
            batch_ids = [self._submitted(chunk) for chunk in self._files(lines)]  # all recorded before any wait
            for batch_id in batch_ids:
                read(batch_id)
            pending = [i for i in pending if results[i] is None]
        if pending:
            raise GenerationError(f"{len(pending)} of {len(prompts)} batch requests expired or failed in "
                                  f"{self.max_rounds} rounds of batches; rerun to submit them again")
        return results

    def _files(self, lines):
        """Request files within the API's limits (requests and bytes per file)."""
        chunk, size = [], 0
        for line in lines:
            if chunk and (len(chunk) >= self.max_requests or size + len(line.encode()) > self.max_bytes):
                yield "".join(chunk).encode()
                chunk, size = [], 0
            chunk.append(line)
            size += len(line.encode())
        if chunk:
            yield "".join(chunk).encode()

    def _select_in(self, query, custom_ids):
        """Rows of ``query`` (its ``{}`` an ``IN`` list) over ``custom_ids``, 500 at a time (sqlite's
        limit on bound parameters)."""
        for start in range(0, len(custom_ids), 500):
            chunk = custom_ids[start:start + 500]
            yield from self.db.execute(query.format(",".join("?" * len(chunk))), chunk)

    def _unread_batches(self, custom_ids):
        """Recorded batches, not read yet, that hold any of ``custom_ids``, oldest first."""
        found = set(self._select_in(
            "SELECT DISTINCT b.created, b.batch_id FROM batch_requests r JOIN batches b ON b.batch_id = r.batch_id "
            "WHERE b.state = 'submitted' AND r.custom_id IN ({})", custom_ids))
        return [batch_id for _, batch_id in sorted(found)]

    def _kept_results(self, custom_ids):
        """``(custom_id, Completion)`` kept from batches read for other calls (``read``)."""
        for custom_id, completion in self._select_in(
                "SELECT custom_id, completion FROM batch_results WHERE custom_id IN ({})", custom_ids):
            yield custom_id, Completion(**json.loads(completion))

    def _submitted(self, data):
        """The batch for this request file: one recorded and not yet read (a rerun), or a new one."""
        file_hash = hashlib.sha256(data).hexdigest()
        row = self.db.execute("SELECT batch_id FROM batches WHERE file_hash=? AND state='submitted'",
                              (file_hash,)).fetchone()
        if row:
            log.info("batch %s: resuming (recorded before a previous run stopped)", row[0])
            return row[0]
        upload = self.client.files.create(file=(f"paraclip-{file_hash[:12]}.jsonl", data), purpose="batch")
        batch = self.client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                           completion_window="24h")
        # Recorded before any waiting: from here on a crash resumes this batch instead of paying again.
        custom_ids = [json.loads(line)["custom_id"] for line in data.splitlines()]
        with self.db:  # one transaction: the batch and its requests, or neither
            self.db.execute("BEGIN")
            self.db.execute("INSERT INTO batches VALUES (?, ?, ?, 'submitted', ?)",
                            (batch.id, file_hash, len(custom_ids), time.time()))
            self.db.executemany("INSERT INTO batch_requests VALUES (?, ?)", [(batch.id, c) for c in custom_ids])
        self.requests += len(custom_ids)
        self.batches_created += 1
        log.info("batch %s: %d requests submitted", batch.id, len(custom_ids))
        return batch.id

    def _wait(self, batch_id):
        start = time.time()
        while True:
            batch = self.client.batches.retrieve(batch_id)
            counts = batch.request_counts
            log.info("batch %s: %s, %s/%s done, %s failed, %.0f s", batch_id, batch.status,
                     getattr(counts, "completed", "?"), getattr(counts, "total", "?"), getattr(counts, "failed", "?"),
                     time.time() - start)
            if batch.status in TERMINAL:
                break
            self._sleep(self.poll_interval)
        if batch.status == "failed" and not batch.output_file_id:
            errors = getattr(getattr(batch, "errors", None), "data", None) or []
            message = "; ".join(getattr(e, "message", str(e)) for e in errors[:3]) or "no reason given"
            self.db.execute("UPDATE batches SET state='read' WHERE batch_id=?", (batch_id,))
            raise GenerationError(f"batch {batch_id} failed: {message}")
        return batch

    def _results(self, batch):
        """``(custom_id, Completion)`` for every answered or refused request of a finished batch."""
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            for line in self.client.files.content(file_id).text.splitlines():
                record = json.loads(line)
                response = record.get("response") or {}
                status, body = response.get("status_code"), response.get("body")
                if status == 200 and isinstance(body, dict):
                    try:
                        yield record["custom_id"], read_completion(ChatCompletion.construct(**body))
                    except MalformedResponse:
                        continue  # stays a miss: the next round asks again
                elif status in (400, 422):
                    message = body.get("error", body).get("message") if isinstance(body, dict) else str(body)
                    yield record["custom_id"], Completion(None, error=REQUEST_REJECTED, message=f"HTTP {status}: {message}")
                # expired, cancelled, 429/5xx inside the batch: stays a miss for the next round

    def close(self):
        self.client.close()
        self.db.close()

