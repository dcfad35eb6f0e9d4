"""VG-Relation and VG-Attribution (ARO, Yuksekgonul et al. 2023): does the true caption beat its swap?

Input is the ARO release as its own code reads it: a JSON list (``visual_genome_relation.json`` or
``visual_genome_attribution.json``) of test cases with ``image_path`` (relative to the image folder),
the box ``bbox_x``, ``bbox_y``, ``bbox_w``, ``bbox_h``, ``true_caption``, ``false_caption`` and the group
key: ``relation_name`` for VG-R, ``attributes`` (two strings) for VG-A. Like ARO, each image is cropped
to its box before preprocessing, so the scene outside the relation does not vote.

A case is correct when the true caption's cosine with the crop is strictly higher: ARO takes the argmax
over ``[false, true]``, which picks the false caption on a tie. Reported: ``accuracy`` over all cases and
ARO's ``macro_accuracy``, the mean of per-group accuracies over the groups ARO keeps (VG-R: relations
not in its symmetric list; VG-A: attribute pairs with at least 25 cases). The paper's Table 1 VG-R and
VG-A columns are these macro accuracies. Every distinct crop and caption is embedded once.
"""

import os
from dataclasses import dataclass

import torch

from .common import InputError, distinct, embed_images, embed_texts, load_image, load_json, precision

BOX_KEYS = ("bbox_x", "bbox_y", "bbox_w", "bbox_h")
CASE_KEYS = ("image_path", *BOX_KEYS, "true_caption", "false_caption")
ANNOTATION_FILES = {"vg-relation": "visual_genome_relation.json", "vg-attribution": "visual_genome_attribution.json"}

# ARO's "Replicate ARO" notebook drops these relations before averaging: swapping the two objects of a
# symmetric (or near-symmetric) relation does not make the caption false, so the test is ill-posed.
ARO_SYMMETRIC_RELATIONS = frozenset(
    """
adjusting|attached to|between|bigger than|biting|boarding|brushing|chewing|cleaning|climbing|close to|
coming from|coming out of|contain|crossing|dragging|draped over|drinking|drinking from|driving|
driving down|driving on|eating from|eating in|enclosing|exiting|facing|filled with|floating in|
floating on|flying|flying above|flying in|flying over|flying through|full of|going down|going into|
going through|grazing in|growing in|growing on|guiding|hanging from|hanging in|hanging off|
hanging over|higher than|holding onto|hugging|in between|jumping off|jumping on|jumping over|kept in|
larger than|leading|leaning over|leaving|licking|longer than|looking in|looking into|looking out|
looking over|looking through|lying next to|lying on top of|making|mixed with|mounted on|moving|
on the back of|on the edge of|on the front of|on the other side of|opening|painted on|parked at|
parked beside|parked by|parked in|parked in front of|parked near|parked next to|perched on|petting|
piled on|playing|playing in|playing on|playing with|pouring|reaching for|reading|reflected on|
riding on|running in|running on|running through|seen through|sitting behind|sitting beside|sitting by|
sitting in front of|sitting near|sitting next to|sitting under|skiing down|skiing on|sleeping in|
sleeping on|smiling at|sniffing|splashing|sprinkled on|stacked on|standing against|standing around|
standing behind|standing beside|standing in front of|standing near|standing next to|staring at|
stuck in|surrounding|swimming in|swinging|talking to|topped with|touching|traveling down|traveling on|
tying|typing on|underneath|wading in|waiting for|walking across|walking by|walking down|
walking next to|walking through|working in|working on|worn on|wrapped around|wrapped in|by|of|near|
next to|with|beside|on the side of|around""".replace("\n", "").split("|")
)
# ARO's VG_Attribution.evaluate_scores skips attribute pairs rarer than this.
ARO_MIN_ATTRIBUTE_CASES = 25


@dataclass(frozen=True)
class AroCase:
    image: str  # path of the whole image
    box: tuple  # PIL crop box (left, upper, right, lower)
    true_caption: str
    false_caption: str
    group: str  # relation name, or "attr1_attr2" as ARO names attribute pairs


def _group_of(task, record, where):
    if task == "vg-relation":
        if not isinstance(record.get("relation_name"), str):
            raise InputError(f"{where}: missing key 'relation_name' (a string)")
        return record["relation_name"]
    attributes = record.get("attributes")
    if not (isinstance(attributes, list) and len(attributes) == 2 and all(isinstance(a, str) for a in attributes)):
        raise InputError(f"{where}: missing key 'attributes' (a list of two strings)")
    return f"{attributes[0]}_{attributes[1]}"


def read_cases(task, annotation_path, images_dir):
    """Parse and validate an ARO annotation file; every error names the file and the case index."""
    records = load_json(annotation_path, f"{task} annotations")
    if not isinstance(records, list):
        raise InputError(f"{annotation_path}: expected a JSON list of test cases")
    if not records:
        raise InputError(f"{annotation_path}: no test cases (the list is empty)")
    cases = []
    for index, record in enumerate(records):
        where = f"{annotation_path}: case {index}"
        if not isinstance(record, dict):
            raise InputError(f"{where}: expected a JSON object")
        for key in CASE_KEYS:
            if key not in record:
                raise InputError(f"{where}: missing key '{key}'")
        if not all(isinstance(record[k], (int, float)) for k in BOX_KEYS):
            raise InputError(f"{where}: {', '.join(BOX_KEYS)} must be numbers")
        if record["bbox_w"] <= 0 or record["bbox_h"] <= 0:
            raise InputError(f"{where}: empty bounding box")
        image = os.path.join(images_dir, record["image_path"])
        if not os.path.isfile(image):
            raise InputError(f"{image}: image file not found (referenced by {where})")
        x, y, w, h = (record[k] for k in BOX_KEYS)
        cases.append(
            AroCase(
                image,
                (x, y, x + w, y + h),
                str(record["true_caption"]),
                str(record["false_caption"]),
                _group_of(task, record, where),
            )
        )
    return cases


def _load_crop(key):
    path, box = key
    return load_image(path).crop(box)


@torch.no_grad()
def case_scores(model, preprocess, tokenizer, cases, device="cpu", batch_size=64, progress=False):
    """``[cases, 2]`` cosines of each crop with its (false, true) captions, ARO's column order."""
    crops, crop_rows = distinct([(c.image, c.box) for c in cases])
    captions, caption_rows = distinct([c.false_caption for c in cases] + [c.true_caption for c in cases])
    image_features = embed_images(model, preprocess, crops, device, batch_size, progress, load=_load_crop)
    text_features = embed_texts(model, tokenizer, captions, device, progress=progress)
    per_case_image = image_features[crop_rows]
    false_text, true_text = text_features[caption_rows].split(len(cases))
    return torch.stack([(per_case_image * false_text).sum(-1), (per_case_image * true_text).sum(-1)], dim=1)


def summarize(task, cases, scores):
    """Accuracy, ARO's macro accuracy and per-group accuracies from ``case_scores``' matrix."""
    correct = scores[:, 1] > scores[:, 0]  # a tie counts as wrong, as ARO's argmax does
    groups = {}
    for case, hit in zip(cases, correct.tolist()):
        groups.setdefault(case.group, []).append(hit)
    per_group = {name: {"accuracy": sum(hits) / len(hits), "count": len(hits)} for name, hits in sorted(groups.items())}
    if task == "vg-relation":
        kept = [g for g in per_group if g not in ARO_SYMMETRIC_RELATIONS]
    else:
        kept = [g for g, v in per_group.items() if v["count"] >= ARO_MIN_ATTRIBUTE_CASES]
    return {
        "task": task,
        "num_cases": len(cases),
        "num_crops": len({(c.image, c.box) for c in cases}),
        "accuracy": correct.float().mean().item(),
        # None, not 0, when no group qualifies (tiny subsets): an average over nothing is undefined.
        "macro_accuracy": sum(per_group[g]["accuracy"] for g in kept) / len(kept) if kept else None,
        "macro_groups": len(kept),
        "macro_accuracy_all_groups": sum(v["accuracy"] for v in per_group.values()) / len(per_group),
        "per_group": per_group,
    }


def evaluate_aro(model, preprocess, tokenizer, task, cases, device="cpu", batch_size=64, progress=False):
    model.eval()
    result = summarize(task, cases, case_scores(model, preprocess, tokenizer, cases, device, batch_size, progress))
    return {**result, "precision": precision(model, device)}
