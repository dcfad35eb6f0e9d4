"""Which input files a job owns, and reading captions-only inputs (.txt, .jsonl).

Inputs are given as open_clip does: brace patterns (``/data/{00000..09999}.tar``), globs, several
joined with ``::``. The sorted list is dealt round-robin to ``num_jobs`` jobs, so each job gets
an equal share whatever the numbering; SLURM array variables give the defaults.
"""

import glob
import json
import os
import re

import braceexpand

from .errors import InputError
from .textfiles import NotUTF8, lines_of, read_utf8

CAPTION_FILE_EXTENSIONS = (".txt", ".jsonl")
_COMPRESSED_TAR = re.compile(r"[.](tar[.](gz|bz2|xz)|tgz)$", re.IGNORECASE)


def expand_inputs(spec, output_name=os.path.basename):
    """The sorted input paths of ``spec``, each once; refused when one is missing or two would have outputs
    of one name (``output_name`` of an input: its output file's name)."""
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
    paths = sorted(dict.fromkeys(paths))
    check_output_names(paths, output_name)
    return paths


def check_output_names(paths, output_name=os.path.basename):
    """Refuse two inputs whose outputs would have one name (one would be skipped, or two jobs write one file)."""
    owner = {}
    for path in paths:
        first = owner.setdefault(output_name(path), path)
        if first != path:
            raise InputError(
                f"{first} and {path}: both inputs would be written to the output {output_name(path)!r} "
                "(outputs are named after inputs); rename one, or run them into different --output folders"
            )


def output_name(input_path):
    """The paraphrase job's output name of an input: its base name, with caption files written as .jsonl and
    compressed tars (.tar.gz, .tgz, .tar.bz2, .tar.xz) written uncompressed as .tar."""
    name = os.path.basename(input_path)
    if is_caption_file(input_path):
        return os.path.splitext(name)[0] + ".jsonl"
    match = _COMPRESSED_TAR.search(name)
    return name[: match.start()] + ".tar" if match else name


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
        raise ValueError(
            f"SLURM array {low}..{high} has {count} tasks, not contiguous (a resubmission of some "
            "tasks?): pass --num-jobs and --job-index explicitly"
        )
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
    for number, line in enumerate(_text_lines(path), start=1):
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


def _text_lines(path):
    """The lines of a UTF-8 text file, as a text-mode ``open`` reads them; not UTF-8: an error naming the
    file, the line and the byte offset."""
    try:
        return lines_of(read_utf8(path))
    except NotUTF8 as e:
        raise InputError(
            f"{path}:{e.line}: not UTF-8 text: byte {e.byte:#04x} at offset {e.offset} of the file ({e.reason})"
        ) from None
