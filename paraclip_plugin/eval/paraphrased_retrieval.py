"""Paraphrased retrieval (Cheng et al. 2024): do a query and its paraphrase retrieve the same images?

Input is a pairs file (JSON lines, one object per line with ``query``, ``paraphrase`` and the gold
``image`` file name relative to an image folder; other keys are ignored, blank lines skipped).

Two galleries, recorded in the result as ``gallery`` with its size ``num_images``:

``folder`` (``--gallery DIR``, the paper's protocol)
    every image file directly in ``DIR`` (a file whose extension PIL reads; hidden files and
    sub-folders are not candidates) is a candidate, in sorted file-name order; the pairs' images must
    be among them. With COCO 2017's ``val2017/`` this is the paper's 5,000-image gallery.
``pairs`` (``--images DIR``)
    only the distinct images the pairs file names. Smaller than the paper's gallery: fewer
    distractors can enter a top-k, so AO/JS and recall differ from the paper's protocol.

Images are embedded once, texts in batches; the result holds AO@k and JS@k between the query's and
the paraphrase's rankings (metrics.py) and recall@1/5/10 of the gold image for both kinds of query.
All scores are fractions in [0, 1].
"""

import json
import os
import sys
from dataclasses import dataclass

import torch
from PIL import Image
from tqdm import tqdm

from ..clitools import EVAL as PROG
from ..data.textfiles import NotUTF8, lines_of, read_utf8
from .metrics import average_overlap_from_scores, jaccard_at_k_from_scores, recall_at_k

PAIR_KEYS = ("query", "paraphrase", "image")
RECALL_KS = (1, 5, 10)
PAPER_GALLERY_SIZE = 5000  # COCO 2017 val, the paper's gallery
PAPER_PAIRS = 4155  # Cheng et al.'s query/paraphrase pairs on COCO val2017, the paper's AO/JS set


class InputError(ValueError):
    """Bad user input (files, lines, names): reported as one message, never as a traceback."""


def read_text(path, what):
    """A user's UTF-8 text file, whole and with its line ends as they are; a file that cannot be read or
    is not UTF-8 is an ``InputError`` naming it (and the line of the first bad byte)."""
    try:
        return read_utf8(path)
    except OSError as e:
        raise InputError(f"{path}: cannot read {what}: {e.strerror}") from None
    except NotUTF8 as e:
        raise InputError(
            f"{path}:{e.line}: not UTF-8 ({e.reason} at byte {e.offset}); the {what} must be UTF-8"
        ) from None


def text_lines(path, what):
    """The lines of ``read_text``'s file as ``for line in open(path)`` gives them (split at \\n, \\r\\n and \\r
    only, unlike ``str.splitlines``), without their line ends."""
    return [line.rstrip("\n") for line in lines_of(read_text(path, what))]


def load_json(path, what):
    """``json.load`` of a user file; a missing, non-UTF-8 or malformed file is an ``InputError`` naming it."""
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None


@dataclass(frozen=True)
class RetrievalPair:
    query: str
    paraphrase: str
    image: str
    line: int  # 1-based line in the pairs file, kept for error messages


def read_pairs(path):
    """Parse and validate a pairs file; every error names ``path`` and the 1-based line number."""
    pairs = []
    for number, line in enumerate(text_lines(path, "pairs file"), start=1):
        if line.strip():
            pairs.append(_parse_pair(line, path, number))
    if not pairs:
        raise InputError(f"{path}: no pairs (the file is empty)")
    return pairs


def _parse_pair(line, path, number):
    where = f"{path}:{number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object with keys {', '.join(PAIR_KEYS)}")
    for key in PAIR_KEYS:
        if key not in record:
            raise InputError(f"{where}: missing key '{key}'")
        if not isinstance(record[key], str) or not record[key].strip():
            raise InputError(f"{where}: '{key}' must be a non-empty string")
    return RetrievalPair(record["query"], record["paraphrase"], record["image"], number)


def warn(result, message):
    """Print ``message`` as a warning and keep it in ``result["warnings"]``, so the JSON says it too."""
    print(f"{PROG}: warning: {message}", file=sys.stderr)
    result.setdefault("warnings", []).append(message)


def folder_images(folder):
    """Sorted names of the image files directly in ``folder`` (extensions PIL opens, e.g. not .pdf; no hidden files)."""
    if not os.path.isdir(folder):
        raise InputError(f"{folder}: gallery folder not found")
    readable = {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    with os.scandir(folder) as entries:
        names = sorted(
            e.name
            for e in entries
            if not e.name.startswith(".") and e.is_file() and os.path.splitext(e.name)[1].lower() in readable
        )
    if not names:
        raise InputError(f"{folder}: no image files in the gallery folder")
    return names


def build_gallery(pairs, images_dir, pairs_path="pairs", whole_folder=False):
    """Sorted gallery image names and, per pair, the gallery index of its gold image.

    The gallery is every image file in ``images_dir`` with ``whole_folder``, else the distinct images
    of ``pairs``. Raises ``InputError`` naming the missing file and the first line that references it.
    """
    first_reference = {}
    for pair in pairs:
        first_reference.setdefault(pair.image, pair.line)
    present = set(folder_images(images_dir)) if whole_folder else None
    for name, line in first_reference.items():
        if (name not in present) if whole_folder else not os.path.isfile(os.path.join(images_dir, name)):
            where = " in the gallery folder" if whole_folder else ""
            raise InputError(
                f"{os.path.join(images_dir, name)}: image file not found{where} (referenced by {pairs_path}:{line})"
            )
    names = sorted(present) if whole_folder else sorted(first_reference)
    index = {name: i for i, name in enumerate(names)}
    gold = torch.tensor([index[pair.image] for pair in pairs])
    return names, gold


def _load_image(path):
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as e:
        raise InputError(f"{path}: cannot read image ({e})") from None


def _batches(items, batch_size):
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


@torch.no_grad()
def embed_images(model, preprocess, paths, device="cpu", batch_size=64, progress=False, load=None):
    """L2-normalised image embeddings ``[len(paths), embed_dim]`` on the CPU.

    ``load`` turns one item of ``paths`` into an RGB PIL image (default: open the file); tasks whose
    items are not whole files (ARO's bounding-box crops) pass their own.
    """
    load = load or _load_image
    features = []
    for batch in tqdm(list(_batches(paths, batch_size)), desc="images", disable=not progress, leave=False):
        pixels = torch.stack([preprocess(load(p)) for p in batch]).to(device)
        features.append(model.encode_image(pixels, normalize=True).float().cpu())
    return torch.cat(features)


@torch.no_grad()
def embed_texts(model, tokenizer, texts, device="cpu", batch_size=256, progress=False):
    """L2-normalised text embeddings ``[len(texts), embed_dim]`` on the CPU."""
    features = []
    for batch in tqdm(list(_batches(texts, batch_size)), desc="texts", disable=not progress, leave=False):
        tokens = tokenizer(list(batch)).to(device)
        features.append(model.encode_text(tokens, normalize=True).float().cpu())
    return torch.cat(features)


def distinct(items):
    """``(unique, rows)``: the sorted distinct items, and per item its row in ``unique``.

    Tasks embed ``unique`` once and index the features with ``rows``, so a caption or crop that
    several samples share costs one forward pass.
    """
    unique = sorted(set(items))
    position = {item: i for i, item in enumerate(unique)}
    return unique, torch.tensor([position[item] for item in items], dtype=torch.long)


def summarize(query_scores, paraphrase_scores, gold, k=10, gallery="pairs"):
    """The result dict from two ``[pairs, images]`` similarity matrices and the gold image index per pair;
    ``gallery`` says which gallery the columns are ("folder" or "pairs")."""
    result = {
        "task": "paraphrased_retrieval",
        "num_pairs": int(query_scores.shape[0]),
        "gallery": gallery,
        "num_images": int(query_scores.shape[1]),  # the gallery size
        "k": k,
        f"AO@{k}": average_overlap_from_scores(query_scores, paraphrase_scores, k).mean().item(),
        f"JS@{k}": jaccard_at_k_from_scores(query_scores, paraphrase_scores, k).mean().item(),
    }
    for kind, scores in (("original", query_scores), ("paraphrased", paraphrase_scores)):
        result[kind] = {f"recall@{r}": recall_at_k(scores, gold, r).mean().item() for r in RECALL_KS}
    return result


def evaluate_paraphrased_retrieval(
    model,
    preprocess,
    tokenizer,
    pairs,
    images_dir,
    k=10,
    device="cpu",
    batch_size=64,
    pairs_path="pairs",
    progress=False,
    whole_folder=False,
):
    """Score a loaded open_clip model on ``pairs`` (from ``read_pairs``); returns ``summarize``'s dict.
    ``whole_folder``: every image in ``images_dir`` is a candidate (``build_gallery``)."""
    names, gold = build_gallery(pairs, images_dir, pairs_path, whole_folder)
    model.eval()
    image_features = embed_images(
        model, preprocess, [os.path.join(images_dir, n) for n in names], device, batch_size, progress
    )
    query_features = embed_texts(model, tokenizer, [p.query for p in pairs], device, progress=progress)
    paraphrase_features = embed_texts(model, tokenizer, [p.paraphrase for p in pairs], device, progress=progress)
    result = summarize(
        query_features @ image_features.T,
        paraphrase_features @ image_features.T,
        gold,
        k,
        "folder" if whole_folder else "pairs",
    )
    result.update(gallery_dir=os.path.abspath(images_dir), precision=precision(model, device))
    if not whole_folder:
        warn(
            result,
            f"gallery = the {len(names)} images the pairs name, not a whole folder; the paper ranks "
            f"all {PAPER_GALLERY_SIZE} COCO val2017 images (--gallery DIR)",
        )
    elif len(names) != PAPER_GALLERY_SIZE:
        warn(
            result, f"gallery {images_dir} has {len(names)} images; the paper's (COCO val2017) has {PAPER_GALLERY_SIZE}"
        )
    if len(pairs) != PAPER_PAIRS:
        warn(result, f"{pairs_path} holds {len(pairs)} pairs; the paper's set (Cheng et al.) has {PAPER_PAIRS}")
    return result


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def precision(model, device, autocast=None):
    """What the numbers were computed in: the device, the weights' dtype and the autocast dtype (None:
    no autocast), plus, on CUDA, whether TF32 was allowed. Exact score ties, which some tasks count as
    wrong, are far more frequent in float16 than in float32."""
    weight = next(iter(model.parameters()), None)
    record = {
        "device": str(device),
        "weights": str(weight.dtype).removeprefix("torch.") if weight is not None else None,
        "autocast": autocast,
    }
    if str(device).startswith("cuda"):
        record.update(tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)
    return record


def load_model(model_name, pretrained=None, model_config=None, device="cpu"):
    """``(model, preprocess_val, tokenizer)`` through stock open_clip; user errors become ``InputError``.

    ``model_config`` is a model config JSON file (or folder of them) registered with open_clip first,
    so ``model_name`` may be its file stem. ``pretrained`` is an open_clip tag or a checkpoint file
    (open_clip_train's ``epoch_N.pt`` loads as is); ``None`` means random initialisation.
    """
    import open_clip  # deferred: importing open_clip costs seconds and is only needed here

    if model_config is not None:
        if not os.path.exists(model_config):
            raise InputError(f"{model_config}: model config not found")
        open_clip.add_model_config(model_config)
    if model_name not in open_clip.list_models() and ":" not in model_name:
        raise InputError(f"unknown model '{model_name}' (pass its config JSON with --model-config)")
    if (
        pretrained
        and not os.path.isfile(pretrained)
        and pretrained not in open_clip.list_pretrained_tags_by_model(model_name)
    ):
        raise InputError(f"{pretrained}: checkpoint file not found (and not an open_clip tag for {model_name})")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
    except (RuntimeError, OSError, KeyError, EOFError) as e:
        # A file that exists but is not a checkpoint of this architecture (wrong model, truncated file).
        raise InputError(f"{pretrained}: cannot load checkpoint into {model_name}: {e}") from None
    return model, preprocess, open_clip.get_tokenizer(model_name)


def evaluate_checkpoint(
    model_name,
    pretrained,
    pairs_path,
    images_dir,
    k=10,
    model_config=None,
    device=None,
    batch_size=64,
    progress=False,
    whole_folder=False,
):
    """Load a model and evaluate it on a pairs file: the one call the demo and the CLI make."""
    device = device or default_device()
    pairs = read_pairs(pairs_path)
    build_gallery(pairs, images_dir, pairs_path, whole_folder)  # fail on a missing image before loading the model
    model, preprocess, tokenizer = load_model(model_name, pretrained, model_config, device)
    result = evaluate_paraphrased_retrieval(
        model, preprocess, tokenizer, pairs, images_dir, k, device, batch_size, pairs_path, progress, whole_folder
    )
    result.update(model=model_name, pretrained=pretrained)
    return result
