"""``paraclip-eval``'s flag names: one meaning each, older spellings kept with a deprecation warning."""

import json
import shutil

import pytest
from conftest import TINY_CONFIG, TINY_MODEL

from paraclip_plugin.eval.cli import build_parser, main
from paraclip_plugin.eval.common import InputError, load_model

# (subcommand and its required flags, deprecated flag, its new name, the value, the namespace attribute)
RENAMED = [
    (["sts", "--model", "M", "--root", "R"], "--output", "--json", "r.json", "json"),
    (["vg-relation", "--model", "M", "--annotations", "A", "--images", "I"], "--output", "--json", "r.json", "json"),
    (["zeroshot-imagenet", "--model", "M", "--root", "R"], "--output", "--json", "r.json", "json"),
    (["coco-retrieval", "--model", "M", "--root", "R"], "--output", "--json", "r.json", "json"),
    (["paraphrased-retrieval", "--model", "M", "--pairs", "P"], "--images", "--pairs-gallery", "D", "pairs_gallery"),
    (["sts", "--model", "M"], "--folder", "--root", "D", "root"),
]


@pytest.mark.parametrize("base, old, new, value, dest", RENAMED)
def test_a_deprecated_flag_means_what_its_new_name_means_and_says_so(capsys, base, old, new, value, dest):
    with_new = build_parser().parse_args(base + [new, value])
    assert capsys.readouterr().err == ""
    with_old = build_parser().parse_args(base + [old, value])
    assert vars(with_old) == vars(with_new) and getattr(with_old, dest) == value
    err = capsys.readouterr().err
    assert f"paraclip-eval {base[0]}: warning: {old} is deprecated; use {new}" in err


@pytest.mark.parametrize("base, old, new, value, dest", RENAMED)
def test_a_flag_and_its_deprecated_spelling_together_are_a_usage_error(capsys, base, old, new, value, dest):
    with pytest.raises(SystemExit) as stopped:
        build_parser().parse_args(base + [new, value, old, value])
    assert stopped.value.code == 2
    assert f"argument {old}: not allowed with argument {new}" in capsys.readouterr().err


def test_help_names_the_new_flags_only(capsys):
    for command, new, old in [
        ("sts", "--root", "--folder"),
        ("sts", "--json", "--output"),
        ("paraphrased-retrieval", "--pairs-gallery", "--images"),
    ]:
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        text = capsys.readouterr().out
        assert new in text and f"{old} " not in text and f"{old}\n" not in text, (command, old)


def test_a_missing_required_flag_is_named_by_its_new_name(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sts", "--model", "M"])
    assert "one of the arguments --root is required" in capsys.readouterr().err


def test_table1_output_stays_a_folder_and_json_is_a_file():
    args = build_parser().parse_args(["table1", "--output", "out"])
    assert args.output == "out" and not hasattr(args, "json")


def test_model_config_repeats_as_in_training(tmp_path):
    other = tmp_path / "paraclip-other.json"
    shutil.copy(TINY_CONFIG, other)
    args = build_parser().parse_args(
        [
            "sts",
            "--model",
            "paraclip-other",
            "--root",
            "R",
            "--model-config",
            str(TINY_CONFIG),
            "--model-config",
            str(other),
        ]
    )
    assert args.model_config == [str(TINY_CONFIG), str(other)]
    model, _, tokenizer = load_model("paraclip-other", model_config=args.model_config)
    assert model.encode_text(tokenizer(["a red square"])).shape[0] == 1
    with pytest.raises(InputError, match="no-such.json: model config not found"):
        load_model(TINY_MODEL, model_config=[str(TINY_CONFIG), str(tmp_path / "no-such.json")])


def test_the_deprecated_spellings_run_end_to_end(tmp_path, capsys):
    """paraphrased-retrieval with --images and --output: the pairs' gallery, the file written, two warnings."""
    from test_paraphrased_retrieval import _write_world

    pairs, images = _write_world(tmp_path)
    output = tmp_path / "result.json"
    argv = ["paraphrased-retrieval", "--model", TINY_MODEL, "--model-config", str(TINY_CONFIG), "--pairs", str(pairs)]
    assert main(argv + ["--images", str(images), "--output", str(output)]) == 0
    captured = capsys.readouterr()
    assert json.loads(output.read_text()) == json.loads(captured.out)
    assert json.loads(captured.out)["gallery"] == "pairs"
    assert "--images is deprecated; use --pairs-gallery" in captured.err
    assert "--output is deprecated; use --json" in captured.err
