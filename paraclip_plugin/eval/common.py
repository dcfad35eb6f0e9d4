"""What every evaluation task shares: the error type, reading the user's files, loading one open_clip
model, embedding images and texts in batches, and the record of the precision the numbers were computed in."""

import json
import os
import sys

import torch
from PIL import Image
from tqdm import tqdm

from ..clitools import EVAL as PROG  # noqa: F401 (the eval tasks' messages name it)
from ..data.textfiles import NotUTF8, lines_of, read_utf8


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


def warn(result, message):
    """Print ``message`` as a warning and keep it in ``result["warnings"]``, so the JSON says it too."""
    print(f"{PROG}: warning: {message}", file=sys.stderr)
    result.setdefault("warnings", []).append(message)


def load_image(path):
    """The image file at ``path`` as an RGB PIL image; an unreadable file is an ``InputError`` naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as e:
        raise InputError(f"{path}: cannot read image ({e})") from None


def _batches(items, batch_size):
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


@torch.no_grad()
def embed_images(model, preprocess, paths, device="cpu", batch_size=64, progress=False, load=load_image):
    """L2-normalised image embeddings ``[len(paths), embed_dim]`` on the CPU.

    ``load`` turns one item of ``paths`` into an RGB PIL image (default: open the file); tasks whose
    items are not whole files (ARO's bounding-box crops) pass their own.
    """
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


def model_configs(model_config):
    """``--model-config``'s value as a list of paths: None, one path, or a list of them (the flag repeats)."""
    if model_config is None:
        return []
    return [model_config] if isinstance(model_config, (str, os.PathLike)) else list(model_config)


def load_model(model_name, pretrained=None, model_config=None, device="cpu"):
    """``(model, preprocess_val, tokenizer)`` through stock open_clip; user errors become ``InputError``.

    ``model_config`` is a model config JSON file (or folder of them), or a list of them, registered with
    open_clip first, so ``model_name`` may be a file stem. ``pretrained`` is an open_clip tag or a
    checkpoint file (open_clip_train's ``epoch_N.pt`` loads as is); ``None`` means random initialisation.
    """
    import open_clip  # deferred: importing open_clip costs seconds and is only needed here

    for config in model_configs(model_config):
        if not os.path.exists(config):
            raise InputError(f"{config}: model config not found")
        open_clip.add_model_config(config)
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
