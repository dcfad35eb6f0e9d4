"""Zero-shot ImageNet-1k top-1 and COCO image/text retrieval R@5 through clip_benchmark.

The ImageNet dataset comes from ``clip_benchmark.datasets.builder.build_dataset``, the zero-shot
classifier and logits from ``clip_benchmark.metrics.zeroshot_classification``, retrieval recalls from
``clip_benchmark.metrics.zeroshot_retrieval``: the calls clip_benchmark's own CLI makes. What this module
adds is a check of the local layout first (clip_benchmark downloads (wget) whatever it does not find,
and this command must never do that), a choice of COCO split, and one stated rule for tied logits.

Layouts read (verified against clip_benchmark 1.6.2 / torchvision):

``imagenet/`` (torchvision ``ImageNet``, split ``val``)
    ``meta.bin`` (torchvision writes it from ``ILSVRC2012_devkit_t12.tar.gz`` on first use, so either
    file will do) and ``val/<wnid>/<image>`` with all 1000 wnid folders, each holding at least one image
    torchvision reads (``IMG_EXTENSIONS``). Labels are the sorted wnid order, matched against
    clip_benchmark's 1000 OpenAI class names, so a partial folder would silently shift every label:
    it is refused.
``coco/`` (torchvision ``CocoCaptions``, the dataset clip_benchmark's ``mscoco_captions`` builds), by split:
    ``karpathy-test``: ``val2014/`` and ``coco_test_karpathy.json``, clip_benchmark's default 5k
    Karpathy test split (5,000 images, 25,010 captions). ``val2017``: ``val2017/`` and
    ``annotations/captions_val2017.json`` as COCO's own zips unpack (5,000 images, 25,014 captions).
    clip_benchmark's builder hard-codes ``val2014/``, so the dataset is built here with the same
    ``CocoCaptions(root=<image folder>, annFile=..., transform=...)`` call on the split's own folder.

Text retrieval ("T Rtrv." in Table 1) is image-to-text: clip_benchmark's ``text_retrieval_recall@5``;
image retrieval is text-to-image: ``image_retrieval_recall@5``.

ImageNet ties: clip_benchmark's ``accuracy`` takes ``torch.topk``, whose order among equal logits is
unspecified, and its class names repeat ("missile" 657/744, "sunglasses" 836/837), so those classes
get identical classifier columns and tied logits, many more under float16 autocast. Here tied classes
share the hit (``TIE_RULE``): each image counts its expected top-k hit under a random order of the
classes tied with its true class. The number does not depend on class order or on the backend's topk,
and it is what clip_benchmark scores on the repeated names (topk credits one class of each such pair,
whichever it picks: half the pair's images, as here); counting every tie as wrong would put acc1 up
to 0.2 points below it (100 of the 50,000 images) on those pairs alone, the size of the paper's
differences in that column. The ties-as-wrong scores are reported beside (``ties_wrong``).
"""

import contextlib
import os
import sys

import torch

from .common import InputError, load_json, precision, warn

IMAGENET_CLASSES = 1000
TIE_RULE = (
    "tied classes share the hit: an image whose true class has a classes above it and ties with t-1 "
    "others counts min(1, max(0, (k - a) / t)) at top-k, its expected hit under a random order of the ties"
)
# split -> (image folder, default annotation file, images, captions), relative to the COCO root.
COCO_SPLITS = {
    "karpathy-test": ("val2014", "coco_test_karpathy.json", 5000, 25010),
    "val2017": ("val2017", os.path.join("annotations", "captions_val2017.json"), 5000, 25014),
}
COCO_DEFAULT_SPLIT = "karpathy-test"


def _clip_benchmark():
    try:
        from clip_benchmark.datasets import builder
        from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval
    except ImportError as e:
        raise InputError(f"clip_benchmark is not installed ({e}); pip install 'clip_benchmark>=1.6' requests") from None
    return builder, zeroshot_classification, zeroshot_retrieval


def check_imagenet_root(root, templates=None):
    """Raise ``InputError`` naming the missing piece unless ``root`` has the layout above."""
    if not os.path.isdir(root):
        raise InputError(f"{root}: ImageNet folder not found")
    meta, devkit = os.path.join(root, "meta.bin"), os.path.join(root, "ILSVRC2012_devkit_t12.tar.gz")
    if not (os.path.isfile(meta) or os.path.isfile(devkit)):
        raise InputError(f"{meta}: not found (nor {devkit}, from which torchvision writes it)")
    val = os.path.join(root, "val")
    if not os.path.isdir(val):
        raise InputError(f"{val}: ImageNet validation folder not found (one sub-folder per wnid)")
    classes = sorted(d for d in os.listdir(val) if os.path.isdir(os.path.join(val, d)))
    if len(classes) != IMAGENET_CLASSES:
        raise InputError(
            f"{val}: {len(classes)} class folders, expected {IMAGENET_CLASSES} "
            "(labels are positions in the sorted wnid list)"
        )
    # imported here: torchvision's import probes optional packages, which the eval extra's check must come before
    from torchvision.datasets.folder import IMG_EXTENSIONS

    empty = [os.path.join(val, d) for d in classes if not _has_image(os.path.join(val, d))]
    if empty:
        raise InputError(
            f"{', '.join(empty[:3])}{f' and {len(empty) - 3} more' if len(empty) > 3 else ''}: "
            f"no image file torchvision's ImageFolder reads ({' '.join(IMG_EXTENSIONS)})"
        )
    if templates is not None:
        _read_templates(templates)
    return {"root": os.path.abspath(root), "num_classes": len(classes)}


def _has_image(folder):
    """Whether torchvision's ``ImageFolder`` finds a sample in ``folder`` (its walk, its extension test)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    return any(
        has_file_allowed_extension(name, IMG_EXTENSIONS)
        for _, _, names in os.walk(folder, followlinks=True)
        for name in names
    )


def _read_templates(path):
    data = load_json(path, "templates JSON")
    templates = data.get("imagenet1k") if isinstance(data, dict) else None
    if not (isinstance(templates, list) and templates and all(isinstance(t, str) and "{c}" in t for t in templates)):
        raise InputError(f'{path}: expected {{"imagenet1k": ["a photo of a {{c}}.", ...]}}')
    return templates


def check_coco_root(root, annotation_file=None, split=COCO_DEFAULT_SPLIT):
    """Raise ``InputError`` naming the missing piece unless ``root`` has ``split``'s layout (above);
    returns the paths and counts."""
    if split not in COCO_SPLITS:
        raise InputError(f"unknown COCO split '{split}' (choose from {', '.join(COCO_SPLITS)})")
    folder, default_annotations, _, _ = COCO_SPLITS[split]
    images = os.path.join(root, folder)
    if not os.path.isdir(images):
        raise InputError(f"{images}: COCO image folder not found (split {split} reads images from <root>/{folder})")
    annotations = annotation_file or os.path.join(root, default_annotations)
    data = load_json(annotations, "COCO captions")
    if not (
        isinstance(data, dict) and isinstance(data.get("images"), list) and isinstance(data.get("annotations"), list)
    ):
        raise InputError(f"{annotations}: expected COCO captions format with 'images' and 'annotations' lists")
    if not data["images"] or not data["annotations"]:
        raise InputError(f"{annotations}: no images or no captions")
    for image in data["images"]:
        path = os.path.join(images, str(image.get("file_name")))
        if not os.path.isfile(path):
            raise InputError(f"{path}: image file not found (listed in {annotations})")
    return {
        "root": os.path.abspath(root),
        "split": split,
        "images": os.path.abspath(images),
        "annotations": os.path.abspath(annotations),
        "num_images": len(data["images"]),
        "num_captions": len(data["annotations"]),
    }


def _loader(builder, dataset, name, batch_size):
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=builder.get_dataset_collate_fn(name)
    )


def _amp(device):
    # clip_benchmark's CLI runs with autocast on by default; on the CPU that would mean bfloat16.
    return str(device).startswith("cuda")


def _precision(model, device):
    """``precision`` of the clip_benchmark calls below: autocast (CUDA's default, float16) on CUDA only."""
    return precision(
        model, device, str(torch.get_autocast_dtype("cuda")).removeprefix("torch.") if _amp(device) else None
    )


def topk_hits(logits, target, k):
    """Per image, its top-``k`` hit under ``TIE_RULE`` (a float in [0, 1]): with ``a`` classes above the
    true class and ``t`` classes (the true one included) at its logit, ``min(1, max(0, (k - a) / t))``."""
    true = logits.gather(1, target.view(-1, 1))
    above = (logits > true).sum(dim=1)
    tied = (logits == true).sum(dim=1)
    return ((k - above) / tied).clamp(0, 1)


def topk_hits_ties_wrong(logits, target, k):
    """Per image, True when fewer than ``k`` classes other than the true one have a logit >= its own."""
    true = logits.gather(1, target.view(-1, 1))
    return (logits >= true).sum(dim=1) - 1 < k


def classification_scores(logits, target):
    """acc1, acc5 and mean per-class recall (over the classes that have images) under ``TIE_RULE``, the
    same counting every tie as wrong, and how many images have a top logit shared by several classes."""
    k5 = min(5, logits.shape[1])
    count = torch.bincount(target, minlength=logits.shape[1]).float()

    def per_class_recall(hits):
        return (
            (torch.zeros(logits.shape[1]).index_add_(0, target, hits.float())[count > 0] / count[count > 0])
            .mean()
            .item()
        )

    top1, top1_strict = topk_hits(logits, target, 1), topk_hits_ties_wrong(logits, target, 1)
    return {
        "acc1": top1.mean().item(),
        "acc5": topk_hits(logits, target, k5).mean().item(),
        "mean_per_class_recall": per_class_recall(top1),
        "tie_rule": TIE_RULE,
        "ties_wrong": {
            "acc1": top1_strict.float().mean().item(),
            "acc5": topk_hits_ties_wrong(logits, target, k5).float().mean().item(),
            "mean_per_class_recall": per_class_recall(top1_strict),
        },
        "tied_top1_images": int(((logits == logits.max(dim=1, keepdim=True).values).sum(dim=1) > 1).sum()),
    }


def evaluate_imagenet(model, preprocess, tokenizer, root, device="cpu", batch_size=64, templates=None):
    """clip_benchmark's zero-shot ``imagenet1k`` on ``root``; ``templates`` is an optional JSON file
    ``{"imagenet1k": [...]}`` replacing clip_benchmark's 80 OpenAI prompts (passed as its
    ``custom_template_file``).

    The classifier and the logits come from clip_benchmark (``zero_shot_classifier``,
    ``run_classification``, the two halves of its ``evaluate``); the scores from ``classification_scores``
    with ``TIE_RULE``. Why not ``evaluate`` itself: its ``accuracy`` breaks ties by ``torch.topk``'s
    unspecified order, and calls ``float()`` on a one-element array, which NumPy >= 2.4 refuses.
    """
    inputs = check_imagenet_root(root, templates)
    builder, zeroshot_classification, _ = _clip_benchmark()
    model.eval()
    dataset = builder.build_dataset(
        "imagenet1k",
        root=root,
        transform=preprocess,
        split="test",
        download=False,
        task="zeroshot_classification",
        custom_template_file=templates,
    )
    classifier = zeroshot_classification.zero_shot_classifier(
        model, tokenizer, dataset.classes, dataset.templates, device, amp=_amp(device)
    )
    logits, target = zeroshot_classification.run_classification(
        model, classifier, _loader(builder, dataset, "imagenet1k", batch_size), device, amp=_amp(device)
    )
    return {
        "task": "zeroshot_imagenet",
        **inputs,
        "num_images": len(dataset),
        "num_templates": len(dataset.templates),
        "templates": os.path.abspath(templates) if templates else None,
        **classification_scores(logits, target),
        "precision": _precision(model, device),
    }


def evaluate_coco(
    model, preprocess, tokenizer, root, device="cpu", batch_size=64, annotation_file=None, split=COCO_DEFAULT_SPLIT
):
    """COCO retrieval on ``split`` (``COCO_SPLITS``) of ``root``: recall@1/5/10 both ways, straight from
    clip_benchmark's ``zeroshot_retrieval.evaluate``; a warning when the counts are not the split's."""
    from torchvision.datasets import CocoCaptions

    inputs = check_coco_root(root, annotation_file, split)
    builder, _, zeroshot_retrieval = _clip_benchmark()
    model.eval()
    # pycocotools prints "loading annotations..." to stdout, where the CLI writes its JSON.
    with contextlib.redirect_stdout(sys.stderr):
        dataset = CocoCaptions(root=inputs["images"], annFile=inputs["annotations"], transform=preprocess)
    # torch.topk needs k <= the number of images (tiny test sets); COCO's 5k images allow all three.
    recall_ks = [k for k in (1, 5, 10) if k <= inputs["num_images"]]
    metrics = zeroshot_retrieval.evaluate(
        model,
        _loader(builder, dataset, "mscoco_captions", batch_size),
        tokenizer,
        device=device,
        amp=_amp(device),
        recall_k_list=recall_ks,
    )
    result = {
        "task": "coco_retrieval",
        **inputs,
        **{k: float(v) for k, v in metrics.items()},
        "precision": _precision(model, device),
    }
    _, _, images, captions = COCO_SPLITS[split]
    if (inputs["num_images"], inputs["num_captions"]) != (images, captions):
        warn(
            result,
            f"{inputs['annotations']}: {inputs['num_images']} images / {inputs['num_captions']} captions; "
            f"COCO {split} has {images} / {captions}",
        )
    return result
