"""A persistent sqlite cache of every completion paid for, keyed by what produced it.

Key: (model, prompt version, step, input text, attempt). ``attempt`` numbers the retries of a
rejected output, so a rerun replays the same sequence of outputs and writes the same shard.
An entry is committed as soon as its response arrives, before the pipeline uses it, so a crash or
``kill -9`` never pays for a request twice. WAL mode lets concurrent jobs share one file (on a
local or POSIX-locking file system; on NFS give each job its own file, see ``{job_index}``).
Only model outputs and token counts are stored: never credentials or request headers.
"""
import os
import sqlite3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS completions (
    model TEXT NOT NULL,
    prompt_version TEXT NOT NULL,
    step INTEGER NOT NULL,
    input TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    output TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (model, prompt_version, step, input, attempt)
)
"""


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

    def get_many(self, model, prompt_version, step, attempt, inputs):
        """``{input: output}`` for the inputs already cached."""
        found = {}
        inputs = list(inputs)
        for start in range(0, len(inputs), 500):  # stay under sqlite's bound-parameter limit
            chunk = inputs[start:start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self.db.execute(
                f"SELECT input, output FROM completions WHERE model=? AND prompt_version=? "
                f"AND step=? AND attempt=? AND input IN ({marks})",
                (model, prompt_version, step, attempt, *chunk),
            )
            found.update(rows)
        return found

    def put(self, model, prompt_version, step, attempt, input_text, output, prompt_tokens=0, completion_tokens=0):
        self.db.execute(
            "INSERT OR REPLACE INTO completions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (model, prompt_version, step, input_text, attempt, output, prompt_tokens, completion_tokens),
        )

    def __len__(self):
        return self.db.execute("SELECT COUNT(*) FROM completions").fetchone()[0]

    def close(self):
        self.db.close()
