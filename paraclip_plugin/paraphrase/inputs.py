"""Which input files a job owns, and reading captions-only inputs.

Inputs are given as open_clip does: brace patterns (``/data/{00000..09999}.tar``), globs, several
joined with ``::``. The sorted list is dealt round-robin to ``num_jobs`` jobs, so each job gets
an equal share whatever the numbering; SLURM array variables give the defaults.
"""
import glob
import json
import os

import braceexpand

from .shard_io import InputError

CAPTION_FILE_EXTENSIONS = (".txt", ".jsonl")


def expand_inputs(spec):
    paths = []
    for pattern in spec.split("::"):
        for expanded in braceexpand.braceexpand(pattern):
            matches = sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]
            paths.extend(matches)
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise InputError(f"{missing[0]}: input file not found ({len(missing)} of {len(paths)} inputs missing)")
    if not paths:
        raise InputError(f"{spec}: no input files match")
    # Same basename twice would make two jobs write one output shard.
    names = [os.path.basename(p) for p in paths]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise InputError(f"{dup}: two inputs share this file name; output shards are named after inputs")
    return sorted(dict.fromkeys(paths))


def slurm_job_defaults(environ=os.environ):
    """(num_jobs, job_index) from a contiguous SLURM array (ids may start anywhere, e.g. --array=1-8).

    A resubmission of some tasks (``--array=5,17``) is not contiguous: its count and minimum say
    nothing about the original split, so it is refused; pass --num-jobs/--job-index explicitly.
    """
    if "SLURM_ARRAY_TASK_ID" not in environ:
        return 1, 0
    count = int(environ.get("SLURM_ARRAY_TASK_COUNT", 1))
    low = int(environ.get("SLURM_ARRAY_TASK_MIN", 0))
    high = int(environ.get("SLURM_ARRAY_TASK_MAX", low + count - 1))
    if high - low + 1 != count:
        raise ValueError(f"SLURM array {low}..{high} has {count} tasks, not contiguous (a resubmission of some "
                         "tasks?): pass --num-jobs and --job-index explicitly")
    return count, int(environ["SLURM_ARRAY_TASK_ID"]) - low


def split_for_job(paths, num_jobs, job_index):
    if not 0 <= job_index < num_jobs:
        raise ValueError(f"--job-index {job_index} is outside 0..{num_jobs - 1}")
    return paths[job_index::num_jobs]


def is_caption_file(path):
    return path.endswith(CAPTION_FILE_EXTENSIONS)


def read_caption_file(path, caption_field="caption"):
    """Records ``{"__key__": line number, "caption": str, "record": dict}`` from .txt or .jsonl."""
    records = []
    with open(path, encoding="utf-8") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as e:
            raise InputError(f"{path}: not UTF-8 text ({e})") from e
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if path.endswith(".txt"):
            records.append({"__key__": number, "caption": line.strip(), "record": {"line": number}})
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{number}: invalid JSON ({e.msg})") from e
        if not isinstance(record, dict) or not isinstance(record.get(caption_field), str):
            raise InputError(f"{path}:{number}: no string field {caption_field!r} (set --caption-field)")
        records.append({"__key__": number, "caption": record[caption_field].strip(), "record": record})
    return records
