"""Semantic textual similarity with CLIP's text tower: STS12-16, STS-B and SICK-R, test sets only.

Each task is read from whichever of these layouts ``ROOT`` (``--root``) holds (exactly one per task; two is an
error, so a score never depends on which copy was picked):

SentEval's download layout (``ROOT`` = SentEval's ``data/downstream``, or its ``STS`` folder plus ``SICK``)
    ``[STS/]STS12-en-test/`` ... ``[STS/]STS16-en-test/``: per subset of the year (SentEval's subset lists;
    STS13 without SMT) ``STS.input.<subset>.txt`` (two tab-separated sentences per line) and
    ``STS.gs.<subset>.txt`` (the gold score on the same line; an empty line = an unscored pair, skipped
    as SentEval skips it). ``[STS/]STSBenchmark/sts-test.csv``: tab-separated, no header, genre,
    file, year, id, score, sentence1, sentence2 (further columns ignored). ``SICK/SICK_test_annotated.txt``
    (or the full release's ``SICK/SICK.txt``): tab-separated with a header naming ``sentence_A``,
    ``sentence_B`` and ``relatedness_score``; with a ``SemEval_set`` column only its TEST rows count.
One TSV per task (``sts12.tsv`` ... ``sts16.tsv``, ``stsb.tsv``, ``sickr.tsv``)
    a header naming ``sentence1``, ``sentence2`` and ``score`` (other columns ignored); with a ``split``
    column only its ``test`` rows count. Rows with an empty score are skipped. For STS12-16 all
    subsets of the year are in the one file.

Lines and fields are read as SentEval reads them: quotes are literal text (STS sentences contain
unbalanced quotes) and each sentence's whitespace is collapsed (SentEval splits on whitespace and
SimCSE joins the words with single spaces). Each task's scored pair count is printed, with a warning
(also kept in the result) when it differs from SentEval's test size (``SENTEVAL_TEST_SIZES``).

The model's score for a pair is the cosine of its two L2-normalised text embeddings. Following SimCSE
(Gao et al. 2021), which the paper follows, each task gets one Spearman correlation over all its pairs
(the "all" aggregation: STS12-16's subsets are pooled, not averaged); the macro average is the mean
over the tasks. Correlations are in [-1, 1].
"""

import csv
import io
import math
import os
import sys
from dataclasses import dataclass

import torch
from scipy.stats import spearmanr

from .common import PROG, InputError, distinct, embed_texts, precision, read_text, text_lines

TASKS = ("sts12", "sts13", "sts14", "sts15", "sts16", "stsb", "sickr")
# SentEval's senteval/sts.py: the test folder and subsets of each year (STS13 without SMT, as in SentEval).
SENTEVAL_SUBSETS = {
    "sts12": ("STS12-en-test", ("MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews")),
    "sts13": ("STS13-en-test", ("FNWN", "headlines", "OnWN")),
    "sts14": ("STS14-en-test", ("deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news")),
    "sts15": ("STS15-en-test", ("answers-forums", "answers-students", "belief", "headlines", "images")),
    "sts16": ("STS16-en-test", ("answer-answer", "headlines", "plagiarism", "postediting", "question-question")),
}
# Scored test pairs SentEval evaluates per task.
SENTEVAL_TEST_SIZES = {
    "sts12": 3108,
    "sts13": 1500,
    "sts14": 3750,
    "sts15": 3000,
    "sts16": 1186,
    "stsb": 1379,
    "sickr": 4927,
}
TSV_COLUMNS = ("sentence1", "sentence2", "score")
SICK_COLUMNS = ("sentence_A", "sentence_B", "relatedness_score")
STSB_FIELDS = 7  # genre, file, year, id, score, sentence1, sentence2


@dataclass(frozen=True)
class StsTask:
    name: str
    path: str  # the file, or SentEval's folder for STS12-16
    layout: str  # "senteval-sts", "stsb-csv", "sick", "tsv"
    first: list  # sentence1 per pair
    second: list  # sentence2 per pair
    gold: list  # gold score per pair
    skipped: int  # pairs without a gold score
    other_splits: int = 0  # rows of a non-test split left out

    def warning(self):
        expected = SENTEVAL_TEST_SIZES[self.name]
        if len(self.gold) != expected:
            return f"{self.name}: {len(self.gold)} scored pairs in {self.path}; SentEval's test set has {expected}"
        return None


def _sentence(text):
    return " ".join(text.split())


def _score(text, where):
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"{where}: score '{text}' is not a number") from None
    if not math.isfinite(value):
        raise InputError(f"{where}: score '{text}' is not finite")
    return value


def _lines(path, what):
    """The file's lines as SentEval splits STS12-16's (``str.splitlines``, which also splits at
    U+2028, U+0085, \\x0c, \\x1c-\\x1e)."""
    return read_text(path, what).splitlines()


class _Pairs:
    """Collects scored pairs; ``add`` skips (and counts) unscored ones."""

    def __init__(self):
        self.first, self.second, self.gold, self.skipped, self.other_splits = [], [], [], 0, 0

    def add(self, first, second, score, where):
        if not score.strip():
            self.skipped += 1
            return
        self.gold.append(_score(score.strip(), where))
        self.first.append(_sentence(first))
        self.second.append(_sentence(second))

    def task(self, name, path, layout):
        if len(self.gold) < 2:
            raise InputError(f"{path}: {len(self.gold)} scored pair(s) (test split); Spearman needs at least 2")
        if len(set(self.gold)) == 1:
            raise InputError(f"{path}: every gold score is {self.gold[0]}; Spearman is undefined")
        return StsTask(name, path, layout, self.first, self.second, self.gold, self.skipped, self.other_splits)


def read_senteval_sts(name, folder):
    """STS12-16 in SentEval's layout: every subset's ``STS.input``/``STS.gs`` pair of files, pooled."""
    pairs = _Pairs()
    for subset in SENTEVAL_SUBSETS[name][1]:
        inputs = os.path.join(folder, f"STS.input.{subset}.txt")
        scores = os.path.join(folder, f"STS.gs.{subset}.txt")
        sentences, gold = _lines(inputs, "STS input file"), _lines(scores, "STS gold file")
        if len(sentences) != len(gold):
            raise InputError(
                f"{scores}: {len(gold)} lines but {inputs} has {len(sentences)} "
                "(one gold line per pair; empty = unscored)"
            )
        for number, (line, score) in enumerate(zip(sentences, gold), start=1):
            fields = line.split("\t")
            if len(fields) < 2:
                raise InputError(f"{inputs}:{number}: expected two tab-separated sentences")
            pairs.add(fields[0], fields[1], score, f"{scores}:{number}")
    return pairs.task(name, folder, "senteval-sts")


def read_stsb_csv(name, path):
    """STS-B's ``sts-test.csv`` as SentEval reads it (``for line in f``: lines end at newlines only):
    score, sentence1, sentence2 in fields 5-7."""
    pairs = _Pairs()
    for number, line in enumerate(text_lines(path, "STS-B file"), start=1):
        if not line.strip():
            continue
        fields = line.strip().split("\t")
        if len(fields) < STSB_FIELDS:
            raise InputError(
                f"{path}:{number}: {len(fields)} tab-separated fields, expected at least {STSB_FIELDS} "
                "(genre, file, year, id, score, sentence1, sentence2)"
            )
        if not fields[4].strip():
            raise InputError(f"{path}:{number}: empty score (every STS-B pair is scored)")
        pairs.add(fields[5], fields[6], fields[4], f"{path}:{number}")
    return pairs.task(name, path, "stsb-csv")


def _read_table(name, path, columns, layout, split_column, test_value):
    """A tab-separated file with a header: ``columns`` are (sentence, sentence, score); rows whose
    ``split_column`` (when the header has it) is not ``test_value`` are left out and counted."""
    pairs = _Pairs()
    reader = csv.DictReader(
        io.StringIO(read_text(path, "STS file"), newline=""), delimiter="\t", quoting=csv.QUOTE_NONE
    )
    header = reader.fieldnames or []
    missing = [c for c in columns if c not in header]
    if missing:
        raise InputError(
            f"{path}: missing column(s) {', '.join(missing)} in the header "
            f"(found: {', '.join(header) or 'nothing'}; the file must be tab-separated)"
        )
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if any(row.get(c) is None for c in columns):
            raise InputError(f"{where}: fewer fields than the header's {len(header)}")
        if split_column in header and (row[split_column] or "").strip().lower() != test_value:
            pairs.other_splits += 1
            continue
        pairs.add(row[columns[0]], row[columns[1]], row[columns[2]], where)
    if split_column in header and not pairs.gold and not pairs.skipped:
        raise InputError(f"{path}: no rows with {split_column} '{test_value}' (only the test split is scored)")
    return pairs.task(name, path, layout)


def read_task(name, path):
    """One task from ``path``: SentEval's STS12-16 folder, STS-B's csv, a SICK file or a TSV (module doc)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return read_senteval_sts(name, path)
    if path.endswith(".csv"):
        return read_stsb_csv(name, path)
    if os.path.basename(path).startswith("SICK"):
        return _read_table(name, path, SICK_COLUMNS, "sick", "SemEval_set", "test")
    return _read_table(name, path, TSV_COLUMNS, "tsv", "split", "test")


def candidates(folder, name):
    """Where ``name`` may be under ``folder``, in SentEval's layout (with or without its ``STS/``) or as TSV."""
    if name in SENTEVAL_SUBSETS:
        native = [SENTEVAL_SUBSETS[name][0]]
    elif name == "stsb":
        native = [os.path.join("STSBenchmark", "sts-test.csv")]
    else:
        return [
            os.path.join(folder, "SICK", "SICK_test_annotated.txt"),
            os.path.join(folder, "SICK", "SICK.txt"),
            os.path.join(folder, "sickr.tsv"),
        ]
    return (
        [os.path.join(folder, p) for p in native]
        + [os.path.join(folder, "STS", p) for p in native]
        + [os.path.join(folder, f"{name}.tsv")]
    )


def locate(folder, name):
    found = [p for p in candidates(folder, name) if os.path.exists(p)]
    if not found:
        raise InputError(f"{name}: no test file under {folder} (looked for {', '.join(candidates(folder, name))})")
    if len(found) > 1:
        raise InputError(f"{name}: found {' and '.join(found)}; keep one, so the score cannot depend on which is read")
    return found[0]


def read_tasks(folder, names=None, stream=None):
    """The named tasks (default: all seven) from ``folder``; prints each task's pair count (and a
    warning when it is not SentEval's test size) to ``stream``."""
    folder, names = os.fspath(folder), list(names or TASKS)
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise InputError(f"unknown STS task(s) {', '.join(unknown)} (known: {', '.join(TASKS)})")
    if not os.path.isdir(folder):
        raise InputError(f"{folder}: STS folder not found")
    tasks = [read_task(name, locate(folder, name)) for name in names]
    stream = stream or sys.stderr
    for task in tasks:
        left_out = f", {task.other_splits} rows of other splits left out" if task.other_splits else ""
        print(
            f"{PROG}: {task.name}: {len(task.gold)} scored test pairs ({task.skipped} unscored skipped{left_out}) "
            f"from {task.path}",
            file=stream,
        )
        if task.warning():
            print(f"{PROG}: warning: {task.warning()}", file=stream)
    return tasks


def pair_cosines(model, tokenizer, task, device="cpu", progress=False):
    """Cosine of each pair's two normalised text embeddings; each distinct sentence embedded once."""
    sentences, rows = distinct(task.first + task.second)
    features = embed_texts(model, tokenizer, sentences, device, progress=progress)[rows]
    first, second = features.split(len(task.gold))
    return (first * second).sum(-1)


@torch.no_grad()
def evaluate_sts(model, tokenizer, tasks, device="cpu", progress=False):
    model.eval()
    per_task = {}
    for task in tasks:
        cosines = pair_cosines(model, tokenizer, task, device, progress)
        per_task[task.name] = {
            "spearman": float(spearmanr(cosines.numpy(), task.gold).statistic),
            "num_pairs": len(task.gold),
            "senteval_test_pairs": SENTEVAL_TEST_SIZES[task.name],
            "skipped_unscored": task.skipped,
            "other_splits_left_out": task.other_splits,
            "layout": task.layout,
            "path": os.path.abspath(task.path),
        }
    result = {
        "task": "sts",
        "aggregation": "all",
        "macro_spearman": sum(t["spearman"] for t in per_task.values()) / len(per_task),
        "tasks": per_task,
        "precision": precision(model, device),
    }
    warnings = [task.warning() for task in tasks if task.warning()]
    return {**result, "warnings": warnings} if warnings else result
