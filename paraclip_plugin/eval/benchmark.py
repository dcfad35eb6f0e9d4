"""Zero-shot ImageNet-1k top-1 and COCO image/text retrieval R@5 through clip_benchmark.

Nothing here scores anything itself: datasets come from ``clip_benchmark.datasets.builder.build_dataset``,
the zero-shot classifier and logits from ``clip_benchmark.metrics.zeroshot_classification`` (top-1 from
scikit-learn, see ``evaluate_imagenet``), retrieval recalls from ``clip_benchmark.metrics.zeroshot_retrieval``:
the calls clip_benchmark's own CLI makes, so results match ``clip_benchmark eval``. What this module adds is a check of the local layout first,
because clip_benchmark downloads (wget) whatever it does not find, and this command must never do that.

Layouts clip_benchmark reads (verified against clip_benchmark 1.6.2 / torchvision):

``imagenet/`` (torchvision ``ImageNet``, split ``val``)
    ``meta.bin`` (torchvision writes it from ``ILSVRC2012_devkit_t12.tar.gz`` on first use, so either
    file will do) and ``val/<wnid>/<image>`` with all 1000 wnid folders. Labels are the sorted wnid
    order, matched against clip_benchmark's 1000 OpenAI class names, so a partial folder would
    silently shift every label: it is refused.
``coco/`` (torchvision ``CocoCaptions``, clip_benchmark ``mscoco_captions``, split ``test``)
    ``val2014/<file_name>`` (clip_benchmark fixes this folder name for the val/test splits) and the
    annotation file ``coco_test_karpathy.json`` (COCO captions format: ``images`` with ``id`` and
    ``file_name``, ``annotations`` with ``image_id`` and ``caption``): the 5k Karpathy test split that
    clip_benchmark uses by default. ``annotation_file`` may name another file in that format (e.g.
    COCO 2017's ``captions_val2017.json`` with its images placed in ``val2014/``).

Text retrieval ("T Rtrv." in Table 1) is image-to-text: clip_benchmark's ``text_retrieval_recall@5``;
image retrieval is text-to-image: ``image_retrieval_recall@5``.
"""
import contextlib
import json
import os
import sys

import torch

from .paraphrased_retrieval import InputError, load_json

IMAGENET_CLASSES = 1000
COCO_IMAGE_FOLDER = "val2014"  # what clip_benchmark's mscoco_captions reads for split val/test
COCO_DEFAULT_ANNOTATIONS = "coco_test_karpathy.json"


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
    classes = [d for d in os.listdir(val) if os.path.isdir(os.path.join(val, d))]
    if len(classes) != IMAGENET_CLASSES:
        raise InputError(f"{val}: {len(classes)} class folders, expected {IMAGENET_CLASSES} "
                         "(labels are positions in the sorted wnid list)")
    if templates is not None:
        _read_templates(templates)
    return {"root": os.path.abspath(root), "num_classes": len(classes)}


def _read_templates(path):
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot read templates JSON ({e})") from None
    templates = data.get("imagenet1k") if isinstance(data, dict) else None
    if not (isinstance(templates, list) and templates and all(isinstance(t, str) and "{c}" in t for t in templates)):
        raise InputError(f"{path}: expected {{\"imagenet1k\": [\"a photo of a {{c}}.\", ...]}}")
    return templates


def check_coco_root(root, annotation_file=None):
    images = os.path.join(root, COCO_IMAGE_FOLDER)
    if not os.path.isdir(images):
        raise InputError(f"{images}: COCO image folder not found (clip_benchmark reads images from "
                         f"<root>/{COCO_IMAGE_FOLDER} for the test split)")
    annotations = annotation_file or os.path.join(root, COCO_DEFAULT_ANNOTATIONS)
    data = load_json(annotations, "COCO captions")
    if not (isinstance(data, dict) and isinstance(data.get("images"), list) and isinstance(data.get("annotations"), list)):
        raise InputError(f"{annotations}: expected COCO captions format with 'images' and 'annotations' lists")
    if not data["images"] or not data["annotations"]:
        raise InputError(f"{annotations}: no images or no captions")
    for image in data["images"]:
        path = os.path.join(images, str(image.get("file_name")))
        if not os.path.isfile(path):
            raise InputError(f"{path}: image file not found (listed in {annotations})")
    return {"root": os.path.abspath(root), "annotations": os.path.abspath(annotations),
            "num_images": len(data["images"]), "num_captions": len(data["annotations"])}


def _loader(builder, dataset, name, batch_size):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0,
                                       collate_fn=builder.get_dataset_collate_fn(name))


def _amp(device):
    # clip_benchmark's CLI runs with autocast on by default; on the CPU that would mean bfloat16.
    return str(device).startswith("cuda")


def evaluate_imagenet(model, preprocess, tokenizer, root, device="cpu", batch_size=64, templates=None):
    """clip_benchmark's zero-shot ``imagenet1k`` on ``root``; ``templates`` is an optional JSON file
    ``{"imagenet1k": [...]}`` replacing clip_benchmark's 80 OpenAI prompts (passed as its
    ``custom_template_file``).

    The classifier and the logits come from clip_benchmark (``zero_shot_classifier``,
    ``run_classification``, the two halves of its ``evaluate``); the scores from scikit-learn, which
    clip_benchmark itself uses for balanced accuracy. Why not ``evaluate`` itself: its ``accuracy``
    calls ``float()`` on a one-element array, which NumPy >= 2.4 refuses (TypeError).
    """
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, top_k_accuracy_score

    inputs = check_imagenet_root(root, templates)
    builder, zeroshot_classification, _ = _clip_benchmark()
    model.eval()
    dataset = builder.build_dataset("imagenet1k", root=root, transform=preprocess, split="test", download=False,
                                    task="zeroshot_classification", custom_template_file=templates)
    classifier = zeroshot_classification.zero_shot_classifier(
        model, tokenizer, dataset.classes, dataset.templates, device, amp=_amp(device))
    logits, target = zeroshot_classification.run_classification(
        model, classifier, _loader(builder, dataset, "imagenet1k", batch_size), device, amp=_amp(device))
    labels = list(range(len(dataset.classes)))
    return {"task": "zeroshot_imagenet", **inputs, "num_images": len(dataset),
            "num_templates": len(dataset.templates), "templates": os.path.abspath(templates) if templates else None,
            "acc1": float(accuracy_score(target, logits.argmax(dim=1))),
            "acc5": float(top_k_accuracy_score(target, logits, k=5, labels=labels)),
            "mean_per_class_recall": float(balanced_accuracy_score(target, logits.argmax(dim=1)))}


def evaluate_coco(model, preprocess, tokenizer, root, device="cpu", batch_size=64, annotation_file=None):
    """clip_benchmark's ``mscoco_captions`` retrieval (split test) on ``root``: recall@1/5/10 both ways,
    straight from ``zeroshot_retrieval.evaluate``."""
    inputs = check_coco_root(root, annotation_file)
    builder, _, zeroshot_retrieval = _clip_benchmark()
    model.eval()
    # pycocotools prints "loading annotations..." to stdout, where the CLI writes its JSON.
    with contextlib.redirect_stdout(sys.stderr):
        dataset = builder.build_dataset("mscoco_captions", root=root, transform=preprocess, split="test",
                                        annotation_file=inputs["annotations"], download=False, task="zeroshot_retrieval")
    # torch.topk needs k <= the number of images (tiny test sets); COCO's 5k images allow all three.
    recall_ks = [k for k in (1, 5, 10) if k <= inputs["num_images"]]
    metrics = zeroshot_retrieval.evaluate(
        model, _loader(builder, dataset, "mscoco_captions", batch_size), tokenizer, device=device,
        amp=_amp(device), recall_k_list=recall_ks)
    return {"task": "coco_retrieval", **inputs, **{k: float(v) for k, v in metrics.items()}}
