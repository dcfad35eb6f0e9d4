"""A persistent sqlite cache of every completion paid for, keyed by everything that produced it.

Key: (model, prompt version, settings, step, input text, attempt). ``settings`` is the canonical
JSON of every setting that changes an output (backend, temperature, top_p, max tokens, vLLM's
seed): rerunning with other sampling makes new requests instead of replaying old outputs.
``attempt`` numbers the retries of a rejected output, so a rerun replays the same sequence of
outputs and writes the same shard. An entry is committed as soon as its response arrives, before
the pipeline uses it, so a crash or ``kill -9`` never pays for a request twice. Answers that end a
sample for good (finish_reason ``content_filter`` / ``length``) are cached too, without text; a
request the service refused is not (a rerun asks again). WAL mode lets concurrent jobs share one
file (on a local or POSIX-locking file system; on NFS give each job its own file, ``{job_index}``).
Only model outputs and token counts are stored: never credentials or request headers.
"""

import hashlib
import json
import os
import sqlite3

from .backends.base import Completion
from .cleaning import REQUEST_REJECTED

# v2: the key gained ``settings``; entries of the first schema (table ``completions``) lack it, so
# they are left unread (which sampling made them is unknown).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS completions_v2 (
    model TEXT NOT NULL,
    prompt_version TEXT NOT NULL,
    settings TEXT NOT NULL,
    step INTEGER NOT NULL,
    input TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    output TEXT,
    finish_reason TEXT,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (model, prompt_version, settings, step, input, attempt)
)
"""


def settings_key(settings):
    """Canonical JSON of the output-changing settings: equal settings, equal key."""
    return json.dumps(settings, sort_keys=True, separators=(",", ":"))


def request_key(model, prompt_version, settings, step, attempt, input_text):
    """A hex digest of the cache key: names one request (vLLM's seed, a Batch API ``custom_id``)."""
    key = "\0".join((model, prompt_version, settings_key(settings), str(step), str(attempt), input_text))
    return hashlib.sha256(key.encode()).hexdigest()


def seed_of(key):
    """A 31-bit seed from a ``request_key``: a function of the cache key alone, not of batch composition."""
    return int(key[:8], 16) & 0x7FFFFFFF


def request_seed(model, prompt_version, settings, step, attempt, input_text):
    return seed_of(request_key(model, prompt_version, settings, step, attempt, input_text))


class CompletionCache:
    def __init__(self, path, timeout=120.0):
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        self.path = path
        # Autocommit (isolation_level=None): every put is its own short transaction.
        self.db = sqlite3.connect(path, timeout=timeout, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL survives a killed process (not a power cut) without an fsync per row.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(_SCHEMA)

    def get_many(self, model, prompt_version, settings, step, attempt, inputs):
        """``{input: Completion}`` for the inputs already cached."""
        found = {}
        inputs = list(inputs)
        for start in range(0, len(inputs), 500):  # stay under sqlite's bound-parameter limit
            chunk = inputs[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self.db.execute(
                f"SELECT input, output, finish_reason, prompt_tokens, completion_tokens FROM completions_v2 "
                f"WHERE model=? AND prompt_version=? AND settings=? AND step=? AND attempt=? AND input IN ({marks})",
                (model, prompt_version, settings_key(settings), step, attempt, *chunk),
            )
            for text, output, finish_reason, prompt_tokens, completion_tokens in rows:
                found[text] = Completion.from_service(output, finish_reason, prompt_tokens, completion_tokens)
        return found

    def put(self, model, prompt_version, settings, step, attempt, input_text, completion):
        refused = completion.error == REQUEST_REJECTED
        output = completion.message if refused else completion.text
        finish_reason = REQUEST_REJECTED if refused else completion.finish_reason
        self.db.execute(
            "INSERT OR REPLACE INTO completions_v2 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                model,
                prompt_version,
                settings_key(settings),
                step,
                input_text,
                attempt,
                output,
                finish_reason,
                completion.prompt_tokens,
                completion.completion_tokens,
            ),
        )

    def __len__(self):
        return self.db.execute("SELECT COUNT(*) FROM completions_v2").fetchone()[0]

    def close(self):
        self.db.close()
