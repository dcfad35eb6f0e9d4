"""Semantic textual similarity with CLIP's text tower: STS12-16, STS-B and SICK-R.

Each task is one tab-separated file with a header row naming at least ``sentence1``, ``sentence2`` and
``score`` (the gold similarity; other columns are ignored, so exports that carry e.g. a ``split``
column drop in). Quotes are literal text, not CSV quoting: STS sentences contain unbalanced quotes.
Rows with an empty score are skipped and counted, as SentEval skips unscored STS pairs.

The model's score for a pair is the cosine of its two L2-normalised text embeddings. Following SimCSE
(Gao et al. 2021), which the paper follows, each task gets one Spearman correlation over all its pairs
(the "all" aggregation: for STS12-16 every subset of the year is in the one file, not averaged per
subset); the macro average is the mean over the tasks. Correlations are in [-1, 1].
"""
import csv
import math
import os
from dataclasses import dataclass

import torch
from scipy.stats import spearmanr

from .paraphrased_retrieval import InputError, distinct, embed_texts

# Task name -> file name under the STS folder, in the order the paper lists them.
STS_FILES = {
    "sts12": "sts12.tsv", "sts13": "sts13.tsv", "sts14": "sts14.tsv", "sts15": "sts15.tsv",
    "sts16": "sts16.tsv", "stsb": "stsb.tsv", "sickr": "sickr.tsv",
}
COLUMNS = ("sentence1", "sentence2", "score")


@dataclass(frozen=True)
class StsTask:
    name: str
    path: str
    first: list     # sentence1 per pair
    second: list    # sentence2 per pair
    gold: list      # gold score per pair
    skipped: int    # rows without a gold score


def read_task(name, path):
    """Parse and validate one STS file; every error names ``path`` (and the line where there is one)."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = reader.fieldnames or []
            missing = [c for c in COLUMNS if c not in header]
            if missing:
                raise InputError(f"{path}: missing column(s) {', '.join(missing)} in the header "
                                 f"(found: {', '.join(header) or 'nothing'}; the file must be tab-separated)")
            first, second, gold, skipped = [], [], [], 0
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if any(row.get(c) is None for c in COLUMNS):
                    raise InputError(f"{where}: fewer fields than the header's {len(header)}")
                score = row["score"].strip()
                if not score:
                    skipped += 1
                    continue
                try:
                    value = float(score)
                except ValueError:
                    raise InputError(f"{where}: score '{score}' is not a number") from None
                if not math.isfinite(value):
                    raise InputError(f"{where}: score '{score}' is not finite")
                first.append(row["sentence1"])
                second.append(row["sentence2"])
                gold.append(value)
    except OSError as e:
        raise InputError(f"{path}: cannot read STS file: {e.strerror}") from None
    if len(gold) < 2:
        raise InputError(f"{path}: {len(gold)} scored pair(s); Spearman needs at least 2")
    if len(set(gold)) == 1:
        raise InputError(f"{path}: every gold score is {gold[0]}; Spearman is undefined")
    return StsTask(name, path, first, second, gold, skipped)


def read_tasks(folder, names=None):
    """The named tasks (default: all seven) from ``folder``'s ``STS_FILES``."""
    names = list(names or STS_FILES)
    unknown = [n for n in names if n not in STS_FILES]
    if unknown:
        raise InputError(f"unknown STS task(s) {', '.join(unknown)} (known: {', '.join(STS_FILES)})")
    return [read_task(name, os.path.join(folder, STS_FILES[name])) for name in names]


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
            "skipped_unscored": task.skipped,
            "path": os.path.abspath(task.path),
        }
    return {
        "task": "sts",
        "aggregation": "all",
        "macro_spearman": sum(t["spearman"] for t in per_task.values()) / len(per_task),
        "tasks": per_task,
    }
