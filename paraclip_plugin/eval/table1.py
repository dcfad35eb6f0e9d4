"""The paper's Table 1 in one run: every task on one loaded model, one JSON, one Markdown table.

Expected layout under ``--data-root`` (each task reads only its own folder; see the task modules)::

    paraphrased_retrieval/pairs.jsonl        {"query", "paraphrase", "image"} per line (Cheng et al. 2024)
    paraphrased_retrieval/val2017/           gallery: every image in it is a candidate (the paper: COCO
                                             2017 val, 5,000 images; a symlink to it will do)
      or paraphrased_retrieval/images/       only the images the pairs name (fewer distractors than the
                                             paper's; used, with a warning, when val2017/ is absent)
    aro/visual_genome_relation.json          ARO's VG-Relation release
    aro/visual_genome_attribution.json       ARO's VG-Attribution release
    aro/images/                              ARO's image folder (vgr_vga_images.zip)
    sts/STS/STS12-en-test/ ... STS16-en-test/, sts/STS/STSBenchmark/sts-test.csv, sts/SICK/SICK_test_annotated.txt
                                             SentEval's data/downstream as its download script leaves it
                                             (or, per task, sts/<task>.tsv: sentence1, sentence2, score header;
                                             see ``paraclip-eval sts --help``); test sets only
    imagenet/meta.bin (or ILSVRC2012_devkit_t12.tar.gz), imagenet/val/<wnid>/*.JPEG
    coco/val2014/*.jpg, coco/coco_test_karpathy.json     --coco-split karpathy-test (default)
    coco/val2017/*.jpg, coco/annotations/captions_val2017.json   --coco-split val2017

Every selected task's inputs are checked before the model is loaded, so a missing file fails in
seconds, naming the file. The model is loaded once; each task embeds each distinct image (crop) and
text once. All numbers in the JSON are fractions (accuracy, recall, AO/JS in [0, 1], Spearman in
[-1, 1]); the Markdown table shows them x100 like the paper.

What can move a number is recorded in both outputs: the paraphrased-retrieval gallery and its size,
each STS task's scored test pairs, the COCO split, ImageNet's tie rule (tied classes share the hit)
and each task's precision (device, weights dtype, autocast: clip_benchmark's tasks
use float16 autocast on CUDA, the others float32). Counts that differ from the paper's benchmarks
(gallery 5,000; SentEval's STS test sizes; COCO 5,000 images) are printed as warnings and listed in
the JSON (``warnings`` per task) and under the table.

Each finished task's result is kept in ``<output>/tasks/<task>.json`` with what it was computed from: model,
checkpoint sha256, each model config's sha256 (of the file, or of every file in a config folder), data root, COCO
split, templates, device, batch size, package versions, and the task's own input files, each by its resolved
path (links followed) and a sha256 of its contents (pairs, annotation, STS and template files, ImageNet's
devkit or meta.bin) or, for image folders, of every file's relative name, size and mtime_ns (a listing, no
image is read). A rerun whose task inputs are all the same takes the result from there instead of computing
it again, so a run stopped in its last task loses only that task; a task whose files changed is computed
again. An image rewritten in place with the same size and mtime is not noticed.
"""

import hashlib
import json
import os
import sys
import time
from importlib import metadata

from paraclip_plugin.data.atomic import atomic_write_text

from .aro import ANNOTATION_FILES, evaluate_aro, read_cases
from .benchmark import COCO_DEFAULT_SPLIT, check_coco_root, check_imagenet_root, evaluate_coco, evaluate_imagenet
from .common import InputError, load_json, load_model, model_configs
from .paraphrased_retrieval import build_gallery, evaluate_paraphrased_retrieval, read_pairs
from .sts import evaluate_sts, read_tasks

TASKS = ("paraphrased-retrieval", "vg-relation", "vg-attribution", "sts", "zeroshot-imagenet", "coco-retrieval")

# Table 1 columns: (header, task, path to the number in that task's result).
COLUMNS = (
    ("AO@10", "paraphrased-retrieval", ("AO@10",)),
    ("JS@10", "paraphrased-retrieval", ("JS@10",)),
    ("VG-R Acc", "vg-relation", ("macro_accuracy",)),
    ("VG-A Acc", "vg-attribution", ("macro_accuracy",)),
    ("STS Avg.", "sts", ("macro_spearman",)),
    ("Clsf. Acc", "zeroshot-imagenet", ("acc1",)),
    ("T Rtrv. R@5", "coco-retrieval", ("text_retrieval_recall@5",)),
    ("I Rtrv. R@5", "coco-retrieval", ("image_retrieval_recall@5",)),
)
# The paper's Table 1 rows for OpenAI's CLIP ViT-B/32, in COLUMNS order, x100 as printed.
PAPER_ROWS = (
    ("OpenAI's CLIP (400M), paper", (67.2, 57.7, 59.7, 63.2, 65.1, 63.4, 75.0, 54.8)),
    ("+ ParaCLIP, paper", (72.2, 63.3, 60.7, 64.3, 72.2, 63.5, 77.0, 58.8)),
)


def task_paths(data_root):
    """Every input path of every task under ``data_root`` (the layout in the module docstring)."""
    aro, retrieval = os.path.join(data_root, "aro"), os.path.join(data_root, "paraphrased_retrieval")
    gallery = os.path.join(retrieval, "val2017")
    return {
        "paraphrased-retrieval": {
            "pairs": os.path.join(retrieval, "pairs.jsonl"),
            **({"gallery": gallery} if os.path.isdir(gallery) else {"images": os.path.join(retrieval, "images")}),
        },
        "vg-relation": {
            "annotations": os.path.join(aro, ANNOTATION_FILES["vg-relation"]),
            "images": os.path.join(aro, "images"),
        },
        "vg-attribution": {
            "annotations": os.path.join(aro, ANNOTATION_FILES["vg-attribution"]),
            "images": os.path.join(aro, "images"),
        },
        "sts": {"folder": os.path.join(data_root, "sts")},
        "zeroshot-imagenet": {"root": os.path.join(data_root, "imagenet")},
        "coco-retrieval": {"root": os.path.join(data_root, "coco")},
    }


def _gallery(paths):
    """(folder, whole_folder) of the paraphrased-retrieval paths: ``gallery`` when the layout has one."""
    return (paths["gallery"], True) if "gallery" in paths else (paths["images"], False)


def prepare(task, paths, imagenet_templates=None, coco_split=COCO_DEFAULT_SPLIT):
    """Read and validate one task's inputs (no model needed); returns what ``run_task`` consumes."""
    if task == "paraphrased-retrieval":
        pairs = read_pairs(paths["pairs"])
        folder, whole_folder = _gallery(paths)
        build_gallery(pairs, folder, paths["pairs"], whole_folder)
        return pairs
    if task in ("vg-relation", "vg-attribution"):
        return read_cases(task, paths["annotations"], paths["images"])
    if task == "sts":
        return read_tasks(paths["folder"])
    if task == "zeroshot-imagenet":
        return check_imagenet_root(paths["root"], imagenet_templates)
    return check_coco_root(paths["root"], split=coco_split)


def run_task(
    task,
    paths,
    prepared,
    model,
    preprocess,
    tokenizer,
    device,
    batch_size,
    progress,
    imagenet_templates=None,
    coco_split=COCO_DEFAULT_SPLIT,
):
    if task == "paraphrased-retrieval":
        folder, whole_folder = _gallery(paths)
        return evaluate_paraphrased_retrieval(
            model,
            preprocess,
            tokenizer,
            prepared,
            folder,
            10,
            device,
            batch_size,
            paths["pairs"],
            progress,
            whole_folder,
        )
    if task in ("vg-relation", "vg-attribution"):
        return evaluate_aro(model, preprocess, tokenizer, task, prepared, device, batch_size, progress)
    if task == "sts":
        return evaluate_sts(model, tokenizer, prepared, device, progress)
    if task == "zeroshot-imagenet":
        return evaluate_imagenet(model, preprocess, tokenizer, paths["root"], device, batch_size, imagenet_templates)
    return evaluate_coco(model, preprocess, tokenizer, paths["root"], device, batch_size, split=coco_split)


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder, depth):
    """Sorted (relative name, ``os.stat_result`` or None for a broken link) of every file under ``folder`` down
    to ``depth`` levels (1: its own files), as the task reads it: one ``scandir`` per folder, links followed,
    each folder once. A folder that can't be listed is an ``InputError`` naming it."""
    top = os.stat(folder)
    found, seen, pending = [], {(top.st_dev, top.st_ino)}, [("", 1)]
    while pending:
        relative, level = pending.pop()
        try:
            with os.scandir(os.path.join(folder, relative)) as entries:
                entries = list(entries)
        except OSError as e:
            raise InputError(f"{os.path.join(folder, relative)}: can't be listed ({e.strerror})") from None
        for entry in entries:
            name = os.path.join(relative, entry.name)
            try:
                stat = entry.stat()
            except OSError:
                found.append((name, None))
                continue
            if not entry.is_dir():
                found.append((name, stat))
            elif level < depth and (stat.st_dev, stat.st_ino) not in seen:
                seen.add((stat.st_dev, stat.st_ino))
                pending.append((name, level + 1))
    return sorted(found, key=lambda item: item[0])


def fingerprint(path, contents=True, depth=64):
    """``{"path", "sha256"}``: ``path`` resolved (links followed) and a sha256 of what is there: a file's
    bytes; for a folder, each file's relative name with its bytes' sha256 (``contents``) or, for image
    folders of any size, its size and mtime_ns only (one ``stat`` per file, no image read)."""
    real = os.path.realpath(path)
    if not os.path.isdir(real):
        return {"path": real, "sha256": sha256_of(real)}
    digest = hashlib.sha256()
    for name, stat in _files(real, depth):
        state = (
            None
            if stat is None
            else sha256_of(os.path.join(real, name))
            if contents
            else [stat.st_size, stat.st_mtime_ns]
        )
        digest.update((json.dumps([name, state]) + "\n").encode())
    return {"path": real, "sha256": digest.hexdigest()}


def task_fingerprint(task, paths, prepared, imagenet_templates=None):
    """What ``task`` reads, each input ``fingerprint``ed: text and annotation files by content, image folders
    by listing. Part of a kept result's key, so changed data is computed again."""
    if task == "paraphrased-retrieval":
        return {"pairs": fingerprint(paths["pairs"]), "gallery": fingerprint(_gallery(paths)[0], False, depth=1)}
    if task in ("vg-relation", "vg-attribution"):
        return {"annotations": fingerprint(paths["annotations"]), "images": fingerprint(paths["images"], False)}
    if task == "sts":  # the files read, not the whole folder (SentEval's data/downstream holds other tasks)
        return {t.name: fingerprint(t.path) for t in prepared}
    if task == "zeroshot-imagenet":
        root = paths["root"]
        # with the devkit, torchvision writes meta.bin from it on the first run: the devkit is what stays the same
        devkit = os.path.join(root, "ILSVRC2012_devkit_t12.tar.gz")
        return {
            "meta": fingerprint(devkit if os.path.isfile(devkit) else os.path.join(root, "meta.bin")),
            "val": fingerprint(os.path.join(root, "val"), False),  # ImageFolder walks the class folders down
            "templates": fingerprint(imagenet_templates) if imagenet_templates else None,
        }
    return {"annotations": fingerprint(prepared["annotations"]), "images": fingerprint(prepared["images"], False)}


def _version(package):
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def run_table1(
    model_name,
    pretrained,
    data_root,
    tasks=TASKS,
    model_config=None,
    device="cpu",
    batch_size=64,
    progress=False,
    imagenet_templates=None,
    coco_split=COCO_DEFAULT_SPLIT,
    keep_tasks=None,
):
    """The whole Table 1 result dict: ``inputs`` (exact model, hashes, paths, versions), ``results``
    per task (each with its counts and paths) and ``table1`` (the row's numbers, None where not run).
    With ``keep_tasks`` (a folder), each finished task is kept there and reused by a rerun on the same inputs."""
    if not os.path.isdir(data_root):
        raise InputError(f"{data_root}: data root not found")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise InputError(f"unknown or no task(s) {', '.join(unknown)} (choose from {', '.join(TASKS)})")
    paths = task_paths(data_root)
    prepared = {
        task: prepare(task, paths[task], imagenet_templates, coco_split) for task in tasks
    }  # fail before loading
    pretrained_file = pretrained if pretrained and os.path.isfile(pretrained) else None
    configs = model_configs(model_config)
    # (random init: nothing kept is reused, so nothing to compare)
    fingerprints = (
        {task: task_fingerprint(task, paths[task], prepared[task], imagenet_templates) for task in tasks}
        if pretrained
        else {}
    )
    inputs = {
        "model": model_name,
        "pretrained": pretrained,
        "pretrained_sha256": sha256_of(pretrained_file) if pretrained_file else None,
        "model_config": [os.path.abspath(c) for c in configs] or None,
        # of a config folder: every file in it (open_clip registers each JSON there)
        "model_config_sha256": [fingerprint(c)["sha256"] if os.path.exists(c) else None for c in configs] or None,
        "data_root": os.path.abspath(data_root),
        "tasks": list(tasks),
        "imagenet_templates": os.path.abspath(imagenet_templates) if imagenet_templates else None,
        "coco_split": coco_split,
        "device": str(device),
        "batch_size": batch_size,
        "versions": {p: _version(p) for p in ("paraclip-plugin", "open_clip_torch", "clip_benchmark", "torch")},
    }
    # what a kept task result must have been computed from to be reused: the run's inputs and the task's files
    shared = {k: v for k, v in inputs.items() if k != "tasks"}
    results, seconds, model = {}, {}, None
    for task in tasks:
        computed_from = {**shared, "input_files": fingerprints.get(task)}
        # random init (no --pretrained): nothing names the weights, so nothing kept is reused
        kept = _kept_task(keep_tasks, task, computed_from) if pretrained else None
        if kept is not None:
            results[task], seconds[task] = kept["result"], kept["seconds"]
            print(
                f"table1: {task}: the result kept in {keep_tasks} from an earlier run on the same inputs",
                file=sys.stderr,
            )
            continue
        if model is None:
            model, preprocess, tokenizer = load_model(model_name, pretrained, model_config, device)
        start = time.perf_counter()
        results[task] = run_task(
            task,
            paths[task],
            prepared[task],
            model,
            preprocess,
            tokenizer,
            device,
            batch_size,
            progress,
            imagenet_templates,
            coco_split,
        )
        results[task]["inputs"] = {k: os.path.abspath(v) for k, v in paths[task].items()}
        seconds[task] = round(time.perf_counter() - start, 3)
        if keep_tasks:
            os.makedirs(keep_tasks, exist_ok=True)
            atomic_write_text(
                os.path.join(keep_tasks, f"{task}.json"),
                json.dumps(
                    {"computed_from": computed_from, "result": results[task], "seconds": seconds[task]}, indent=1
                )
                + "\n",
            )
    return {"inputs": inputs, "table1": table1_row(results), "results": results, "seconds": seconds}


def _kept_task(folder, task, computed_from):
    """A task's kept result, when it was computed from exactly ``computed_from``; else None."""
    path = os.path.join(folder, f"{task}.json") if folder else None
    if not path or not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            kept = json.load(f)
    except ValueError:
        return None  # cut short: computed again
    return kept if isinstance(kept, dict) and kept.get("computed_from") == computed_from else None


def _dig(result, keys):
    for key in keys:
        result = result.get(key) if isinstance(result, dict) else None
    return result


def table1_row(results):
    return {header: _dig(results.get(task), keys) for header, task, keys in COLUMNS}


def markdown_table(result):
    """Table 1's layout: header rows, the paper's OpenAI-CLIP rows for reference, then this run."""
    inputs = result["inputs"]
    name = inputs["model"] + (
        f" ({os.path.basename(inputs['pretrained'])})" if inputs["pretrained"] else " (random init)"
    )
    lines = [
        "| Model | Paraphrased Rtrv. AO@10 | Paraphrased Rtrv. JS@10 | VG-R Acc | VG-A Acc | STS Avg. "
        "| Clsf. Acc | T Rtrv. R@5 | I Rtrv. R@5 |",
        "|---" + "|---:" * len(COLUMNS) + "|",
    ]
    for label, numbers in PAPER_ROWS:
        lines.append(f"| {label} | " + " | ".join(f"{n:.1f}" for n in numbers) + " |")
    row = result["table1"]
    cells = ["–" if row[h] is None else f"{100 * row[h]:.1f}" for h, _, _ in COLUMNS]
    lines.append(f"| **{name}, this run** | " + " | ".join(cells) + " |")
    sha = inputs["pretrained_sha256"]
    lines += [
        "",
        f"Checkpoint sha256: `{sha}`" if sha else "Checkpoint: none (random initialisation or open_clip tag)",
        f"Data root: `{inputs['data_root']}`; tasks: {', '.join(inputs['tasks'])}.",
        'Numbers x100. VG-R/VG-A: ARO\'s macro accuracy; STS: macro average of Spearman ("all"); '
        "'–': task not run or undefined.",
    ]
    lines += protocol_lines(result["results"])
    return "\n".join(lines) + "\n"


def _precision_text(record):
    text = f"{record['device']}, {record['weights'] or 'no'} weights"
    return text + (f", {record['autocast']} autocast" if record["autocast"] else ", no autocast")


def protocol_lines(results):
    """What each number was computed on: gallery, pairs, split, tie rule, precision, and every warning."""
    lines = []
    retrieval = results.get("paraphrased-retrieval")
    if retrieval:
        lines.append(
            f"Paraphrased retrieval: {retrieval['num_pairs']} pairs, gallery of {retrieval['num_images']} "
            + (
                "images (every image in the folder)."
                if retrieval["gallery"] == "folder"
                else "images (only those the pairs name; the paper ranks all 5,000 of COCO val2017)."
            )
        )
    sts = results.get("sts")
    if sts:
        lines.append("STS pairs: " + ", ".join(f"{name} {t['num_pairs']}" for name, t in sts["tasks"].items()) + ".")
    coco = results.get("coco-retrieval")
    if coco:
        lines.append(f"COCO split: {coco['split']} ({coco['num_images']} images, {coco['num_captions']} captions).")
    imagenet = results.get("zeroshot-imagenet")
    if imagenet:
        lines.append(f"ImageNet: {imagenet['tie_rule']} ({imagenet['tied_top1_images']} images with a tied top logit).")
    precisions = {}
    for task, result in results.items():
        precisions.setdefault(_precision_text(result["precision"]), []).append(task)
    lines.append("Precision: " + "; ".join(f"{text} ({', '.join(tasks)})" for text, tasks in precisions.items()) + ".")
    lines += [
        f"Warning ({task}): {message}" for task, result in results.items() for message in result.get("warnings", [])
    ]
    return [""] + [f"- {line}" for line in lines]


def _flatten(value, prefix=""):
    if isinstance(value, dict):
        out = {}
        for key, inner in value.items():
            out.update(_flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def compare(a, b):
    """Lines describing how result dict ``b`` differs from ``a``: numbers with b - a, other values
    side by side, keys present in one only. Timings are left out: they differ on every run."""
    flat_a = {k: v for k, v in _flatten(a).items() if not k.startswith("seconds.")}
    flat_b = {k: v for k, v in _flatten(b).items() if not k.startswith("seconds.")}
    lines = []
    # The Table 1 row first: it is what a reader of the comparison wants; inputs and details after.
    for key in sorted(set(flat_a) | set(flat_b), key=lambda k: (not k.startswith("table1."), k)):
        if key not in flat_b:
            lines.append(f"{key}: only in A ({flat_a[key]!r})")
        elif key not in flat_a:
            lines.append(f"{key}: only in B ({flat_b[key]!r})")
        elif flat_a[key] != flat_b[key]:
            va, vb = flat_a[key], flat_b[key]
            if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and not isinstance(va, bool):
                lines.append(f"{key}: {va:.6g} -> {vb:.6g} ({vb - va:+.6g})")
            else:
                lines.append(f"{key}: {va!r} -> {vb!r}")
    return lines


def read_result(path):
    result = load_json(path, "result JSON")
    if not (isinstance(result, dict) and "table1" in result and "inputs" in result):
        raise InputError(f"{path}: not a table1 result (no 'table1'/'inputs' keys)")
    return result
