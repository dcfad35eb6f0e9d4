"""Zero-shot ImageNet and COCO retrieval: real clip_benchmark code on fixtures in its loaders' layouts."""

import json
import os

import pytest
import torch

from conftest import TINY_CONFIG, TINY_MODEL
from eval_fixtures import StandIn, coco_preprocess, imagenet_preprocess, write_coco, write_imagenet
from paraclip_plugin.eval.benchmark import (
    TIE_RULE,
    check_coco_root,
    classification_scores,
    evaluate_coco,
    evaluate_imagenet,
    topk_hits,
)
from paraclip_plugin.eval.cli import main
from paraclip_plugin.eval.common import InputError


def _imagenet_classnames():
    import clip_benchmark.datasets.builder as builder

    with open(os.path.join(os.path.dirname(builder.__file__), "en_classnames.json")) as f:
        return json.load(f)["imagenet1k"]


def _one_template(tmp_path, template="{c}"):
    path = tmp_path / "templates.json"
    path.write_text(json.dumps({"imagenet1k": [template]}))
    return str(path)


@pytest.fixture(scope="module")
def imagenet_with_known_errors(tmp_path_factory):
    """1000 classes; the image of every class in ``wrong`` shows class ``decoy`` instead."""
    decoy, wrong = 500, {0, 7, 999}
    root = tmp_path_factory.mktemp("imagenet")
    write_imagenet(root, shows={c: decoy for c in wrong})
    return root, _imagenet_classnames(), wrong


def test_imagenet_ties_share_the_hit_on_the_real_tied_classifier(imagenet_with_known_errors, tmp_path):
    root, names, wrong = imagenet_with_known_errors
    # Text of class c -> one-hot at the first class of that name; image -> one-hot at the class it shows.
    # clip_benchmark's names repeat ("missile" 657/744, "sunglasses" 836/837), so those columns are
    # identical: the images of 657 and 836 tie with 744 and 837 (a 2-way tie on top: half a hit at top-1,
    # a hit at top-5), and the images of 744 and 837 score 0 against every class (a 1000-way tie: 1/1000
    # of a hit at top-1, 5/1000 at top-5). A wrong image shows the decoy: one class above its own, which
    # ties with the 998 others at 0 (no hit at top-1, 4/999 at top-5).
    features = {}
    for i, name in enumerate(names):
        features.setdefault(name, [float(j == i) for j in range(1000)])
    assert [i for i, n in enumerate(names) if names.count(n) > 1] == [657, 744, 836, 837]
    model = StandIn(features, imagenet_preprocess)
    result = evaluate_imagenet(
        model, model.preprocess, model.tokenizer, str(root), batch_size=250, templates=_one_template(tmp_path)
    )
    assert result["num_images"] == 1000 and result["num_classes"] == 1000 and result["num_templates"] == 1
    right = 1000 - len(wrong) - 4
    assert result["acc1"] == pytest.approx((right + 2 * 0.5 + 2 * 0.001) / 1000)
    assert result["acc5"] == pytest.approx((right + 2 * 1 + 2 * 0.005 + len(wrong) * 4 / 999) / 1000)
    assert result["mean_per_class_recall"] == pytest.approx(result["acc1"])  # one image per class
    assert result["ties_wrong"]["acc1"] == pytest.approx(right / 1000)
    assert result["ties_wrong"]["acc5"] == pytest.approx((right + 2) / 1000)
    assert result["tied_top1_images"] == 4 and result["tie_rule"] == TIE_RULE
    assert result["precision"] == {"device": "cpu", "weights": None, "autocast": None}


def test_tie_rule_by_hand():
    logits = torch.tensor(
        [
            [5.0, 5.0, 1.0, 0.0, 0.0, 0.0, 0.0],  # true 0 tied with 1
            [1.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # true 1 alone on top
            [2.0, 2.0, 2.0, 2.0, 2.0, 0.0, 1.0],  # true 6: five classes above it
            [2.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0],
        ]
    )  # true 6: four above, two tied with it
    target = torch.tensor([0, 1, 6, 6])
    # the expected hit when the tied classes come in a random order
    assert topk_hits(logits, target, 1).tolist() == [0.5, 1, 0, 0]
    assert topk_hits(logits, target, 2).tolist() == [1, 1, 0, 0]
    assert topk_hits(logits, target, 5).tolist() == pytest.approx([1, 1, 0, 1 / 3])  # 4 above, 1 of 3 slots left
    assert topk_hits(logits, target, 6).tolist() == pytest.approx([1, 1, 1, 2 / 3])
    assert topk_hits(logits, target, 7).tolist() == [1, 1, 1, 1]
    # the same over every order of the tied classes, counted: row 3 at top-5 is a hit in 1 of 3 positions
    scores = classification_scores(logits, target)
    assert scores["acc1"] == (0.5 + 1) / 4 and scores["tied_top1_images"] == 3
    assert scores["mean_per_class_recall"] == pytest.approx((0.5 + 1 + 0) / 3)  # classes 0, 1, 6 have images
    assert scores["ties_wrong"] == pytest.approx({"acc1": 0.25, "acc5": 0.5, "mean_per_class_recall": 1 / 3})


# COCO: 8 images, two captions each. A "good" caption points at its image (cosine 1), a "bad" one
# away from it (cosine -1, every other image 0), so its image ranks last of 8 and misses R@5.
GOOD, BAD = 1.0, -1.0
CAPTION_SIGNS = [(GOOD, GOOD)] * 6 + [(BAD, BAD), (GOOD, BAD)]


def _coco_stand_in():
    captions, features = [], {}
    for image, signs in enumerate(CAPTION_SIGNS):
        texts = [f"image {image} caption {k}" for k in range(2)]
        captions.append(texts)
        for text, sign in zip(texts, signs):
            features[text] = [sign * (j == image) for j in range(8)]
    return captions, StandIn(features, coco_preprocess(8))


@pytest.mark.parametrize(
    "split, folder, annotations",
    [
        ("karpathy-test", "val2014", "coco_test_karpathy.json"),
        ("val2017", "val2017", os.path.join("annotations", "captions_val2017.json")),
    ],
)
def test_coco_recall_at_5_both_directions_on_either_split(tmp_path, split, folder, annotations):
    captions, model = _coco_stand_in()
    write_coco(tmp_path, captions, split)
    result = evaluate_coco(model, model.preprocess, model.tokenizer, str(tmp_path), batch_size=3, split=split)
    # Text->image: 13 of 16 captions have a good vector. Image->text: images 0-5 and 7 have one.
    assert result["image_retrieval_recall@5"] == pytest.approx(13 / 16)
    assert result["text_retrieval_recall@5"] == pytest.approx(7 / 8)
    assert result["num_images"] == 8 and result["num_captions"] == 16
    assert result["split"] == split and result["images"] == str(tmp_path / folder)
    assert result["annotations"] == str(tmp_path / annotations)
    assert sorted(os.listdir(tmp_path)) == sorted({folder, annotations.split(os.sep)[0]})  # nothing renamed or linked
    expected = "5000 / 25010" if split == "karpathy-test" else "5000 / 25014"
    assert result["warnings"] == [f"{tmp_path / annotations}: 8 images / 16 captions; COCO {split} has {expected}"]


def test_coco_split_reads_its_own_folder(tmp_path, capsys):
    captions, _ = _coco_stand_in()
    write_coco(tmp_path, captions, "karpathy-test")
    code = main(["coco-retrieval", "--model", TINY_MODEL, "--root", str(tmp_path), "--coco-split", "val2017"])
    assert code == 2 and f"{tmp_path / 'val2017'}: COCO image folder not found" in capsys.readouterr().err


def test_coco_with_the_tiny_model_through_the_cli(tmp_path, capsys):
    captions, _ = _coco_stand_in()
    write_coco(tmp_path, captions)
    assert (
        main(["coco-retrieval", "--model", TINY_MODEL, "--model-config", str(TINY_CONFIG), "--root", str(tmp_path)])
        == 0
    )
    result = json.loads(capsys.readouterr().out)  # pycocotools' chatter must not reach stdout
    for direction in ("image", "text"):
        r1, r5 = (result[f"{direction}_retrieval_recall@{k}"] for k in (1, 5))
        assert 0.0 <= r1 <= r5 <= 1.0
    assert "image_retrieval_recall@10" not in result  # only 8 images: k=10 is left out, not a crash


def test_imagenet_layout_errors_name_the_path(tmp_path, capsys):
    (tmp_path / "val" / "n00000000").mkdir(parents=True)
    code = main(["zeroshot-imagenet", "--model", TINY_MODEL, "--root", str(tmp_path)])
    assert code == 2 and str(tmp_path / "meta.bin") in capsys.readouterr().err
    (tmp_path / "meta.bin").write_bytes(b"x")
    code = main(["zeroshot-imagenet", "--model", TINY_MODEL, "--root", str(tmp_path)])
    assert code == 2 and "1 class folders, expected 1000" in capsys.readouterr().err


def test_coco_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="val2014: COCO image folder not found"):
        check_coco_root(str(tmp_path))
    captions, _ = _coco_stand_in()
    annotations = write_coco(tmp_path, captions)
    os.remove(tmp_path / "val2014" / "COCO_val2014_000000000003.jpg")
    with pytest.raises(InputError, match="COCO_val2014_000000000003.jpg: image file not found"):
        check_coco_root(str(tmp_path))
    with open(annotations, "w") as f:
        json.dump({"images": []}, f)
    with pytest.raises(InputError, match="coco_test_karpathy.json: expected COCO captions format"):
        check_coco_root(str(tmp_path))


def test_an_imagenet_class_folder_without_an_image_is_refused_before_the_model_loads(tmp_path, capsys):
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    write_imagenet(tmp_path)
    val = tmp_path / "val"
    os.remove(val / "n00000003" / "ILSVRC2012_val_00000004.JPEG")
    os.rename(val / "n00000005" / "ILSVRC2012_val_00000006.JPEG", val / "n00000005" / "notes.txt")
    os.mkdir(val / "n00000007" / "sub")  # torchvision walks sub-folders: this class keeps its image
    os.rename(val / "n00000007" / "ILSVRC2012_val_00000008.JPEG", val / "n00000007" / "sub" / "a.JPEG")
    code = main(["zeroshot-imagenet", "--model", "no-such-model", "--root", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "no-such-model" not in err, err
    assert f"{val / 'n00000003'}, {val / 'n00000005'}: no image file torchvision's ImageFolder reads" in err
    # the same two classes torchvision's ImageFolder would stop at, after the model had loaded
    with pytest.raises(FileNotFoundError, match="for the classes n00000003, n00000005. Supported"):
        make_dataset(str(val), {w: i for i, w in enumerate(sorted(os.listdir(val)))}, IMG_EXTENSIONS)
