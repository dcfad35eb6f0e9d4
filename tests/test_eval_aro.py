"""VG-Relation / VG-Attribution: crop, strict true-beats-false accuracy, ARO's macro accuracy, input errors."""

import json

import pytest
import torch

from conftest import TINY_CONFIG, TINY_MODEL
from eval_fixtures import StandIn, colour_caption_features, mean_colour, write_aro
from paraclip_plugin.eval.aro import case_scores, evaluate_aro, read_cases
from paraclip_plugin.eval.cli import main
from paraclip_plugin.eval.common import InputError, load_model

# (relation, true caption, false caption, correct by construction). Every crop shows the red square;
# a red caption matches it. "near" is in ARO's symmetric list, so it counts for accuracy, not macro.
RELATION_CASES = [
    ("on", "red cup on table", "blue table on cup", True),
    ("on", "red hat on head", "blue head on hat", True),
    ("on", "blue book on desk", "red desk on book", False),
    ("behind", "blue dog behind tree", "red tree behind dog", False),
    ("behind", "red tie case", "red tie case", False),  # equal scores: ARO's argmax picks the false one
    ("near", "red car near house", "blue house near car", True),
    ("near", "red boat near dock", "blue dock near boat", True),
]


def _stand_in(cases):
    return StandIn(colour_caption_features([c[1] for c in cases] + [c[2] for c in cases]), mean_colour)


def test_relation_accuracy_and_macro_follow_aro(tmp_path):
    path = write_aro(tmp_path, "vg-relation", [c[:3] for c in RELATION_CASES])
    cases = read_cases("vg-relation", path, tmp_path / "images")
    model = _stand_in(RELATION_CASES)
    result = evaluate_aro(model, model.preprocess, model.tokenizer, "vg-relation", cases)
    assert result["num_cases"] == 7 and result["num_crops"] == 1
    assert result["accuracy"] == pytest.approx(4 / 7)
    assert result["per_group"]["on"] == {"accuracy": pytest.approx(2 / 3), "count": 3}
    assert result["per_group"]["behind"]["accuracy"] == 0.0
    # Macro over the non-symmetric relations "on" and "behind" only.
    assert result["macro_accuracy"] == pytest.approx((2 / 3 + 0.0) / 2)
    assert result["macro_groups"] == 2
    assert result["macro_accuracy_all_groups"] == pytest.approx((2 / 3 + 0.0 + 1.0) / 3)


def test_whole_image_would_flip_the_answer(tmp_path):
    """The scene is blue on average and red inside the box: only ARO's crop gives the red answer."""
    path = write_aro(tmp_path, "vg-relation", [c[:3] for c in RELATION_CASES[:2]])
    cases = read_cases("vg-relation", path, tmp_path / "images")
    model = _stand_in(RELATION_CASES[:2])
    scores = case_scores(model, model.preprocess, model.tokenizer, cases)
    assert (scores[:, 1] > scores[:, 0]).all()
    uncropped = [c.__class__(c.image, (0, 0, 32, 32), c.true_caption, c.false_caption, c.group) for c in cases]
    scores = case_scores(model, model.preprocess, model.tokenizer, uncropped)
    assert (scores[:, 1] < scores[:, 0]).all()


def test_attribution_macro_keeps_pairs_with_25_cases(tmp_path):
    cases = [("red_blue", f"red cube {i}", f"blue cube {i}") for i in range(20)]
    cases += [("red_blue", f"blue ball {i}", f"red ball {i}") for i in range(5)]  # 20/25 right
    cases += [("small_large", "blue small dog", "red large dog")] * 3  # 0/3, dropped
    path = write_aro(tmp_path, "vg-attribution", cases)
    parsed = read_cases("vg-attribution", path, tmp_path / "images")
    model = StandIn(colour_caption_features([c[1] for c in cases] + [c[2] for c in cases]), mean_colour)
    result = evaluate_aro(model, model.preprocess, model.tokenizer, "vg-attribution", parsed)
    assert result["accuracy"] == pytest.approx(20 / 28)
    assert result["macro_accuracy"] == pytest.approx(20 / 25) and result["macro_groups"] == 1
    assert result["per_group"]["small_large"] == {"accuracy": 0.0, "count": 3}


def test_cli_with_the_tiny_open_clip_model_matches_a_direct_computation(tmp_path, capsys):
    path = write_aro(tmp_path, "vg-relation", [c[:3] for c in RELATION_CASES[:4]])
    # Random init differs per load: save this model's weights so the CLI scores the same model.
    model, preprocess, tokenizer = load_model(TINY_MODEL, model_config=str(TINY_CONFIG))
    model.eval()
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    assert (
        main(
            [
                "vg-relation",
                "--model",
                TINY_MODEL,
                "--model-config",
                str(TINY_CONFIG),
                "--pretrained",
                str(tmp_path / "tiny.pt"),
                "--annotations",
                str(path),
                "--images",
                str(tmp_path / "images"),
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    # Independently: crop by hand, embed with open_clip directly, compare cosines.
    from PIL import Image

    with torch.no_grad():
        crop = Image.open(tmp_path / "images" / "scene.png").convert("RGB").crop((16, 16, 24, 24))
        image = model.encode_image(preprocess(crop)[None], normalize=True)[0]
        hits = []
        for _, true, false, _ in RELATION_CASES[:4]:
            text = model.encode_text(tokenizer([true, false]), normalize=True)
            hits.append(bool(text[0] @ image > text[1] @ image))
    assert result["accuracy"] == pytest.approx(sum(hits) / 4)
    assert result["model"] == TINY_MODEL


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda records: [], "no test cases"),
        (
            lambda records: [{k: v for k, v in records[0].items() if k != "true_caption"}],
            "case 0: missing key 'true_caption'",
        ),
        (
            lambda records: [{k: v for k, v in records[0].items() if k != "relation_name"}],
            "missing key 'relation_name'",
        ),
        (lambda records: [dict(records[0], image_path="gone.jpg")], "gone.jpg: image file not found"),
        (lambda records: {"not": "a list"}, "expected a JSON list"),
    ],
)
def test_bad_annotations_exit_2_naming_the_file(tmp_path, capsys, damage, message):
    path = write_aro(tmp_path, "vg-relation", [c[:3] for c in RELATION_CASES[:1]])
    path_text = str(path)
    with open(path) as f:
        records = json.load(f)
    with open(path, "w") as f:
        json.dump(damage(records), f)
    code = main(
        [
            "vg-relation",
            "--model",
            TINY_MODEL,
            "--model-config",
            str(TINY_CONFIG),
            "--annotations",
            path_text,
            "--images",
            str(tmp_path / "images"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err and ("gone.jpg" in message or path_text in err)


def test_missing_annotation_file_names_it(tmp_path):
    with pytest.raises(InputError, match="visual_genome_attribution.json: cannot read"):
        read_cases("vg-attribution", str(tmp_path / "visual_genome_attribution.json"), str(tmp_path))
