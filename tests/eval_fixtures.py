"""Tiny synthetic benchmarks in each task's real on-disk format, and a stand-in model that reads them.

Each writer returns what a test needs to know the right answer without running the code under test.
``python tests/eval_fixtures.py DIR`` writes a whole ``--data-root`` for trying ``paraclip-eval table1``.
"""

import json
import os
import sys

import torch
import torch.nn.functional as F
from PIL import Image, ImageStat

RED, BLUE, GREY = (230, 20, 20), (20, 20, 230), (128, 128, 128)


class StandIn(torch.nn.Module):
    """A CLIP-shaped model whose features are chosen by the test.

    Texts: ``text_features[text]`` (so ``tokenizer`` turns a string into its row number). Images: the
    ``preprocess`` below reads the features off the pixels, so what an image "means" is its content.
    """

    def __init__(self, text_features, preprocess):
        super().__init__()
        self.texts = {text: i for i, text in enumerate(text_features)}
        self.table = torch.tensor([list(v) for v in text_features.values()], dtype=torch.float)
        self.preprocess = preprocess

    def tokenizer(self, texts):
        return torch.tensor([self.texts[t] for t in texts])

    def encode_text(self, tokens, normalize=False):
        features = self.table[tokens]
        return F.normalize(features, dim=-1) if normalize else features

    def encode_image(self, pixels, normalize=False):
        return F.normalize(pixels, dim=-1) if normalize else pixels


def mean_colour(image):
    """Stand-in preprocess for ARO: the crop's mean RGB, so what the crop shows is its feature."""
    return torch.tensor(ImageStat.Stat(image).mean, dtype=torch.float)


def _save(image, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path)


# ------------------------------------------------------------------------------------------ ARO


def aro_scene(path):
    """32x32 blue image with a red 8x8 square at (16, 16): the whole image is blue on average, the
    square's box red, so only a correct crop sees red."""
    image = Image.new("RGB", (32, 32), BLUE)
    image.paste(RED, (16, 16, 24, 24))
    _save(image, path)


RED_BOX = {"bbox_x": 16, "bbox_y": 16, "bbox_w": 8, "bbox_h": 8}


def write_aro(folder, task, cases):
    """ARO's layout: ``folder/<annotation json>`` + ``folder/images/scene.jpg``-style files.

    ``cases``: (group, true caption, false caption) with captions starting "red" or "blue"; every case
    crops the red square of ``scene.png``. Returns the annotation path.
    """
    aro_scene(os.path.join(folder, "images", "scene.png"))
    records = []
    for i, (group, true_caption, false_caption) in enumerate(cases):
        record = {
            "image_id": str(i),
            "image_path": "scene.png",
            **RED_BOX,
            "true_caption": true_caption,
            "false_caption": false_caption,
        }
        if task == "vg-relation":
            record["relation_name"] = group
        else:
            record["attributes"] = group.split("_")
        records.append(record)
    name = "visual_genome_relation.json" if task == "vg-relation" else "visual_genome_attribution.json"
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def colour_caption_features(captions):
    """Text features for ARO captions: "red ..." points along red, "blue ..." along blue."""
    return {c: (1.0, 0.0, 0.0) if c.startswith("red") else (0.0, 0.0, 1.0) for c in captions}


# ------------------------------------------------------------------------------------------ STS


def write_sts(path, rows, extra_column=True):
    """One STS task file: header + (sentence1, sentence2, score) rows, tab-separated, quotes literal."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    header = ["split", "sentence1", "sentence2", "score"] if extra_column else ["sentence1", "sentence2", "score"]
    lines = ["\t".join(header)]
    for first, second, score in rows:
        lines.append("\t".join((["test"] if extra_column else []) + [first, second, str(score)]))
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_senteval_sts(folder, name, rows):
    """SentEval's STS12-16 test folder ``folder/STS1x-en-test/``: per subset ``STS.input.<subset>.txt``
    (sentence1<TAB>sentence2) and ``STS.gs.<subset>.txt`` (score, or an empty line for an unscored pair).
    ``rows`` (sentence1, sentence2, score or "") are dealt round-robin over SentEval's subsets."""
    from paraclip_plugin.eval.sts import SENTEVAL_SUBSETS

    test_folder, subsets = SENTEVAL_SUBSETS[name]
    path = _mkdir(os.path.join(folder, test_folder))
    for i, subset in enumerate(subsets):
        mine = rows[i :: len(subsets)]
        with open(os.path.join(path, f"STS.input.{subset}.txt"), "w", encoding="utf-8") as f:
            f.write("".join(f"{a}\t{b}\n" for a, b, _ in mine))
        with open(os.path.join(path, f"STS.gs.{subset}.txt"), "w", encoding="utf-8") as f:
            f.write("".join(f"{score}\n" for _, _, score in mine))
    return path


def write_stsb_csv(path, rows, sources=True):
    """STS-B's ``sts-test.csv``: no header, tab-separated genre, file, year, id, score, sentence1,
    sentence2 and (``sources``) the two source columns some lines of the release carry."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, (first, second, score) in enumerate(rows):
            fields = ["main-captions", "MSRvid", "2012test", f"{i:04d}", f"{float(score):.3f}", first, second]
            f.write("\t".join(fields + (["none", "none"] if sources and i % 2 else [])) + "\n")
    return path


SICK_TEST_HEADER = ("pair_ID", "sentence_A", "sentence_B", "relatedness_score", "entailment_judgment")
SICK_FULL_HEADER = (
    "pair_ID",
    "sentence_A",
    "sentence_B",
    "entailment_label",
    "relatedness_score",
    "entailment_AB",
    "entailment_BA",
    "sentence_A_original",
    "sentence_B_original",
    "sentence_A_dataset",
    "sentence_B_dataset",
    "SemEval_set",
)


def write_sick(path, rows, sets=None):
    """SICK: ``SICK_test_annotated.txt`` (SentEval's file) or, with ``sets`` (TRAIN/TRIAL/TEST per row),
    the full release's ``SICK.txt`` with its 12 columns, relatedness in the fifth."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lines = ["\t".join(SICK_FULL_HEADER if sets else SICK_TEST_HEADER)]
    for i, (first, second, score) in enumerate(rows):
        if sets:
            lines.append(
                "\t".join(
                    [
                        str(i + 1),
                        first,
                        second,
                        "NEUTRAL",
                        str(score),
                        "A_neutral_B",
                        "B_neutral_A",
                        first,
                        second,
                        "FLICKR",
                        "FLICKR",
                        sets[i],
                    ]
                )
            )
        else:
            lines.append("\t".join([str(i + 1), first, second, str(score), "NEUTRAL"]))
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def write_senteval_downstream(folder, rows_per_task):
    """SentEval's ``data/downstream``: ``STS/STS1x-en-test/``, ``STS/STSBenchmark/sts-test.csv``,
    ``SICK/SICK_test_annotated.txt``; ``rows_per_task[task]`` as in the writers above."""
    for name, rows in rows_per_task.items():
        if name == "stsb":
            write_stsb_csv(os.path.join(folder, "STS", "STSBenchmark", "sts-test.csv"), rows)
        elif name == "sickr":
            write_sick(os.path.join(folder, "SICK", "SICK_test_annotated.txt"), rows)
        else:
            write_senteval_sts(os.path.join(folder, "STS"), name, rows)
    return folder


# ------------------------------------------------------------------------------------------ ImageNet


def class_colour(index):
    # Red and green encode the class in steps of 8, so JPEG's small colour error cannot move it.
    return (8 * (index % 32), 8 * (index // 32), 100)


def colour_class(image):
    red, green, _ = image.getpixel((0, 0))
    return round(red / 8) + 32 * round(green / 8)


def write_imagenet(root, shows=None):
    """torchvision ``ImageNet`` val layout: ``meta.bin`` + ``val/<wnid>/*.JPEG`` for 1000 wnids.

    Fake wnids ``n%08d`` sort in class order; class c's one image shows ``class_colour(c)``, or
    ``class_colour(shows[c])`` for the classes ``shows`` names. Returns the number of images.
    """
    shows = shows or {}
    wnids = [f"n{i:08d}" for i in range(1000)]
    torch.save(({w: (f"class {i}",) for i, w in enumerate(wnids)}, wnids), os.path.join(_mkdir(root), "meta.bin"))
    for i, wnid in enumerate(wnids):
        _save(
            Image.new("RGB", (16, 16), class_colour(shows.get(i, i))),
            os.path.join(root, "val", wnid, f"ILSVRC2012_val_{i + 1:08d}.JPEG"),
        )
    return len(wnids)


def imagenet_preprocess(image):
    return F.one_hot(torch.tensor(colour_class(image)), 1000).float()


def _mkdir(path):
    os.makedirs(path, exist_ok=True)
    return path


# ------------------------------------------------------------------------------------------ COCO


def write_coco(root, captions_per_image, split="karpathy-test"):
    """A COCO split's layout: ``val2014/`` + ``coco_test_karpathy.json`` (clip_benchmark's
    ``mscoco_captions`` test files), or ``val2017/`` + ``annotations/captions_val2017.json`` (COCO's zips).

    ``captions_per_image[i]`` lists image i's captions. Image i shows grey level ``20 * i + 10``.
    """
    karpathy = split == "karpathy-test"
    images, annotations = [], []
    for i, captions in enumerate(captions_per_image):
        file_name = f"COCO_val2014_{i + 1:012d}.jpg" if karpathy else f"{i + 1:012d}.jpg"
        _save(
            Image.new("RGB", (16, 16), (20 * i + 10,) * 3),
            os.path.join(root, "val2014" if karpathy else "val2017", file_name),
        )
        images.append({"id": i + 1, "file_name": file_name, "height": 16, "width": 16})
        for caption in captions:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "caption": caption})
    path = (
        os.path.join(root, "coco_test_karpathy.json")
        if karpathy
        else os.path.join(_mkdir(os.path.join(root, "annotations")), "captions_val2017.json")
    )
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations}, f)
    return path


def coco_preprocess(num_images):
    def preprocess(image):
        return F.one_hot(torch.tensor(round((image.getpixel((0, 0))[0] - 10) / 20)), num_images).float()

    return preprocess


# ------------------------------------------------------------------------------------------ everything

STS_NAMES = ("sts12", "sts13", "sts14", "sts15", "sts16", "stsb", "sickr")
WORDS = ("red", "blue", "green", "square", "circle", "small", "large", "dog", "cat", "tree")


def write_data_root(root):
    """A complete ``--data-root`` with a few samples per task, for the tiny real model: the paraphrased
    retrieval gallery has 4 images no pair names, STS is in SentEval's layout, COCO has both splits."""
    pr = os.path.join(root, "paraphrased_retrieval")
    lines = []
    for i, word in enumerate(WORDS):
        _save(Image.new("RGB", (32, 32), (25 * i, 255 - 25 * i, 90)), os.path.join(pr, "val2017", f"{i}.png"))
        if i < 6:
            lines.append(
                json.dumps({"query": f"a {word} thing", "paraphrase": f"something {word}", "image": f"{i}.png"})
            )
    with open(os.path.join(pr, "pairs.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    aro = os.path.join(root, "aro")
    write_aro(
        aro,
        "vg-relation",
        [
            ("on", "red cup on table", "blue table on cup"),
            ("behind", "red dog behind tree", "blue tree behind dog"),
            ("near", "red car near house", "blue house near car"),
        ],
    )
    write_aro(
        aro,
        "vg-attribution",
        [("red_blue", f"red cube and blue ball {i}", f"blue cube and red ball {i}") for i in range(25)]
        + [("small_large", "red small dog", "blue large dog")],
    )
    write_senteval_downstream(
        os.path.join(root, "sts"),
        {
            name: [
                (f"a {a} {b}", f"the {b} {a}", (3 * n + 7 * i) % 6) for i, (a, b) in enumerate(zip(WORDS, WORDS[1:]))
            ]
            for n, name in enumerate(STS_NAMES)
        },
    )
    write_imagenet(os.path.join(root, "imagenet"))
    for split, count in (("karpathy-test", 8), ("val2017", 9)):
        write_coco(os.path.join(root, "coco"), [[f"a {w} picture", f"{w} again"] for w in WORDS[:count]], split)
    templates = os.path.join(root, "imagenet_templates.json")
    with open(templates, "w") as f:
        json.dump({"imagenet1k": ["a photo of a {c}."]}, f)  # one prompt, not 80: keeps CPU runs short
    return templates


if __name__ == "__main__":
    print(write_data_root(sys.argv[1]))
