"""``paraclip-eval paraphrased-retrieval`` end to end with the random-init tiny model, and its input errors."""

import json
import subprocess

import pytest
import torch
from PIL import Image

from conftest import BIN, TINY_CONFIG, TINY_MODEL
from eval_fixtures import StandIn, mean_colour
from paraclip_plugin.eval.cli import main
from paraclip_plugin.eval.metrics import average_overlap, jaccard_at_k
from paraclip_plugin.eval.common import InputError, load_model
from paraclip_plugin.eval.paraphrased_retrieval import build_gallery, evaluate_paraphrased_retrieval, read_pairs

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
SHAPES = ("square", "bar")


def _write_world(folder, repeat_query=False):
    """Eight coloured-shape images and one pair per image; ``repeat_query`` makes each paraphrase == its query."""
    images = folder / "images"
    images.mkdir(parents=True)
    lines = []
    for colour, rgb in COLOURS.items():
        for shape in SHAPES:
            name = f"{colour}_{shape}.png"
            image = Image.new("RGB", (32, 32), (255, 255, 255))
            box = (8, 8, 24, 24) if shape == "square" else (2, 12, 30, 20)
            image.paste(rgb, box)
            image.save(images / name)
            query = f"a {colour} {shape}"
            paraphrase = query if repeat_query else f"a {shape} coloured {colour}"
            lines.append(json.dumps({"query": query, "paraphrase": paraphrase, "image": name}))
    (images / "unreferenced.png").write_bytes((images / name).read_bytes())  # not in the gallery
    pairs = folder / "pairs.jsonl"
    pairs.write_text("\n".join(lines) + "\n")
    return pairs, images


def _cli(pairs, images, *extra):
    return [
        "paraphrased-retrieval",
        "--model",
        TINY_MODEL,
        "--model-config",
        str(TINY_CONFIG),
        "--pairs",
        str(pairs),
        "--pairs-gallery",
        str(images),
        *extra,
    ]


def test_cli_writes_scores_in_range(tmp_path, capsys):
    pairs, images = _write_world(tmp_path)
    output = tmp_path / "out" / "result.json"
    assert main(_cli(pairs, images, "--k", "5", "--json", str(output))) == 0
    result = json.loads(output.read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert result["num_pairs"] == 8 and result["num_images"] == 8 and result["k"] == 5
    assert 0.0 <= result["AO@5"] <= 1.0 and 0.0 <= result["JS@5"] <= 1.0
    for kind in ("original", "paraphrased"):
        recalls = [result[kind][f"recall@{r}"] for r in (1, 5, 10)]
        assert all(0.0 <= r <= 1.0 for r in recalls)
        assert recalls == sorted(recalls)
        assert recalls[-1] == 1.0  # 8 images, so the gold one is always in the top 10


def test_paraphrase_equal_to_query_gives_perfect_overlap(tmp_path, capsys):
    pairs, images = _write_world(tmp_path, repeat_query=True)
    assert main(_cli(pairs, images)) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["AO@10"] == 1.0 and result["JS@10"] == 1.0
    assert result["original"] == result["paraphrased"]


def test_checkpoint_from_training_loads_and_scores_like_the_model_in_memory(tmp_path, capsys):
    pairs, images = _write_world(tmp_path)
    model, preprocess, tokenizer = load_model(TINY_MODEL, model_config=str(TINY_CONFIG))
    # open_clip_train's checkpoint layout under DDP: weights under "state_dict", keys prefixed "module.".
    checkpoint = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, checkpoint)
    expected = evaluate_paraphrased_retrieval(model, preprocess, tokenizer, read_pairs(pairs), str(images))
    assert main(_cli(pairs, images, "--pretrained", str(checkpoint))) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("AO@10", "JS@10", "original", "paraphrased"):
        assert result[key] == pytest.approx(expected[key])


def _rewrite_line(pairs, number, text):
    lines = pairs.read_text().splitlines()
    lines[number - 1] = text
    pairs.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda p, i: _rewrite_line(p, 3, '{"query": "a red square", "paraphrase": '), "pairs.jsonl:3: malformed JSON"),
        (
            lambda p, i: _rewrite_line(p, 2, '{"query": "a", "image": "red_bar.png"}'),
            "pairs.jsonl:2: missing key 'paraphrase'",
        ),
        (lambda p, i: _rewrite_line(p, 4, '["a", "b", "c"]'), "pairs.jsonl:4: expected a JSON object"),
        (
            lambda p, i: _rewrite_line(p, 1, '{"query": "", "paraphrase": "x", "image": "red_bar.png"}'),
            "pairs.jsonl:1: 'query' must be a non-empty string",
        ),
        (lambda p, i: (i / "green_bar.png").unlink(), "green_bar.png: image file not found (referenced by"),
        (lambda p, i: p.write_text("\n\n"), "pairs.jsonl: no pairs"),
        (lambda p, i: p.unlink(), "pairs.jsonl: cannot read pairs file"),
        (lambda p, i: (i / "blue_bar.png").write_bytes(b"not a png"), "blue_bar.png: cannot read image"),
    ],
)
def test_bad_input_is_one_line_naming_the_file_and_line(tmp_path, capsys, damage, message):
    pairs, images = _write_world(tmp_path)
    damage(pairs, images)
    assert main(_cli(pairs, images)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.startswith("paraclip-eval: error: ") and err.count("\n") == 1


def test_gallery_holds_each_referenced_image_once_and_errors_name_its_first_reference(tmp_path):
    pairs, images = _write_world(tmp_path)
    with pairs.open("a") as f:  # line 9 names red_square.png again, which line 1 names first
        f.write(json.dumps({"query": "a red block", "paraphrase": "a crimson block", "image": "red_square.png"}) + "\n")
    names, gold = build_gallery(read_pairs(pairs), str(images))
    assert len(names) == 8 and "unreferenced.png" not in names
    assert gold[0] == gold[8] == names.index("red_square.png")
    (images / "red_square.png").unlink()
    with pytest.raises(InputError, match=r"red_square\.png: image file not found \(referenced by .*pairs\.jsonl:1\)"):
        build_gallery(read_pairs(pairs), str(images), str(pairs))


@pytest.mark.parametrize(
    "extra,message",
    [
        (("--pretrained", "no/such/epoch_3.pt"), "no/such/epoch_3.pt: checkpoint file not found"),
        (("--model", "no-such-model"), "unknown model 'no-such-model'"),
    ],
)
def test_bad_model_arguments(tmp_path, capsys, extra, message):
    pairs, images = _write_world(tmp_path)
    assert main(_cli(pairs, images) + list(extra)) == 2
    assert message in capsys.readouterr().err


def test_console_script_exit_code_without_traceback(tmp_path):
    pairs, images = _write_world(tmp_path)
    _rewrite_line(pairs, 5, "not json")
    done = subprocess.run([str(BIN / "paraclip-eval"), *_cli(pairs, images)], capture_output=True, text=True)
    assert done.returncode == 2
    assert f"{pairs}:5: malformed JSON" in done.stderr and "Traceback" not in done.stderr


# ------------------------------------------------------------------ --gallery: the whole folder is the gallery


def _colour_world(folder, num_pairs=6, num_distractors=20, seed=0):
    """Uniform-colour PNGs (a stand-in model reads an image's feature off its colour): one per pair,
    plus ``num_distractors`` no pair names, plus files that are not gallery images. Returns the pairs
    file, the folder and the StandIn's text features."""
    rng = torch.Generator().manual_seed(seed)
    images = folder / "val2017"
    (images / "sub").mkdir(parents=True)
    colours = torch.randperm(200, generator=rng)[: num_pairs + num_distractors]
    for n, c in enumerate(colours.tolist()):
        name = f"{n:012d}.png" if n < num_pairs else f"{n:012d}_distractor.png"
        Image.new("RGB", (8, 8), (30 + c, 255 - c, (7 * c) % 256)).save(images / name)
    (images / "notes.txt").write_text("not an image")
    (images / ".hidden.png").write_bytes((images / "000000000000.png").read_bytes())
    (images / "sub" / "nested.png").write_bytes((images / "000000000000.png").read_bytes())
    features, lines = {}, []
    for n in range(num_pairs):
        query = torch.randn(3, generator=rng)
        features[f"query {n}"] = query.tolist()
        features[f"paraphrase {n}"] = (query + 0.8 * torch.randn(3, generator=rng)).tolist()
        lines.append(json.dumps({"query": f"query {n}", "paraphrase": f"paraphrase {n}", "image": f"{n:012d}.png"}))
    pairs = folder / "pairs.jsonl"
    pairs.write_text("\n".join(lines) + "\n")
    return pairs, images, features


def _direct_ao_js(features, images, names, k):
    """AO@k / JS@k computed here: per-image colour features, a full sort, the per-list metric functions."""
    vectors = torch.nn.functional.normalize(torch.stack([mean_colour(Image.open(images / n)) for n in names]), dim=-1)
    ao, js = [], []
    for n in range(len(features) // 2):
        rankings = []
        for text in (f"query {n}", f"paraphrase {n}"):
            scores = (vectors @ torch.nn.functional.normalize(torch.tensor(features[text]), dim=0)).tolist()
            rankings.append(sorted(range(len(names)), key=lambda i: -scores[i]))
        ao.append(average_overlap(*rankings, k))
        js.append(jaccard_at_k(*rankings, k))
    return sum(ao) / len(ao), sum(js) / len(js)


def test_distractors_change_ao_js_exactly_as_a_direct_computation_over_the_bigger_gallery(tmp_path):
    pairs_path, images, features = _colour_world(tmp_path)
    model = StandIn(features, mean_colour)
    pairs = read_pairs(pairs_path)
    small = evaluate_paraphrased_retrieval(model, mean_colour, model.tokenizer, pairs, str(images))
    big = evaluate_paraphrased_retrieval(model, mean_colour, model.tokenizer, pairs, str(images), whole_folder=True)
    assert (small["gallery"], small["num_images"]) == ("pairs", 6)
    # 26 PNGs; notes.txt, the hidden file and the sub-folder's image are not candidates.
    assert (big["gallery"], big["num_images"]) == ("folder", 26)
    names = sorted(p.name for p in images.glob("*.png") if not p.name.startswith("."))
    assert len(names) == 26
    expected_big = _direct_ao_js(features, images, names, 10)
    expected_small = _direct_ao_js(features, images, [n for n in names if "distractor" not in n], 10)
    assert (big["AO@10"], big["JS@10"]) == pytest.approx(expected_big)
    assert (small["AO@10"], small["JS@10"]) == pytest.approx(expected_small)
    assert abs(big["AO@10"] - small["AO@10"]) > 0.05 and abs(big["JS@10"] - small["JS@10"]) > 0.05
    assert big["precision"] == {"device": "cpu", "weights": None, "autocast": None}  # StandIn has no weights
    assert "whole folder" in small["warnings"][0] and "has 26 images" in big["warnings"][0]
    assert all(
        f"holds {small['num_pairs']} pairs; the paper's set (Cheng et al.) has 4155" in r["warnings"][1]
        for r in (small, big)
    )


def test_gallery_flag_through_the_cli(tmp_path, capsys):
    pairs, images, _ = _colour_world(tmp_path)
    assert (
        main(
            [
                "paraphrased-retrieval",
                "--model",
                TINY_MODEL,
                "--model-config",
                str(TINY_CONFIG),
                "--pairs",
                str(pairs),
                "--gallery",
                str(images),
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["gallery"] == "folder" and result["num_images"] == 26 and result["gallery_dir"] == str(images)
    assert result["precision"] == {"device": "cpu", "weights": "float32", "autocast": None}
    assert "warning: gallery" in captured.err and "has 26 images; the paper's (COCO val2017) has 5000" in captured.err
    (images / "000000000003.png").rename(images / "sub" / "000000000003.png")
    assert main(["paraphrased-retrieval", "--model", TINY_MODEL, "--pairs", str(pairs), "--gallery", str(images)]) == 2
    assert (
        f"{images / '000000000003.png'}: image file not found in the gallery folder (referenced by {pairs}:4)"
        in capsys.readouterr().err
    )
