"""The state the plugin's hooks share: one ParaCLIPRun per parsed args (args.paraclip), made by configure."""

import argparse
import dataclasses
import pickle

import open_clip
import pytest
import torch

from conftest import TINY_MODEL, train_args, write_shards
from paraclip_plugin.train import hooks
from paraclip_plugin.train.embeddings import EmbeddingExpectation
from paraclip_plugin.train.state import ParaCLIPRun


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("state")
    write_shards(folder / "s", num_shards=1, per_shard=4)
    return folder


def parse(shards, *flags):
    from open_clip_train.params import parse_args  # the installed, patched parser: add_arguments, configure

    args = parse_args(
        [str(a) for a in train_args(shards / "s" / "00000.tar", shards / "logs", "state", "none", *flags)]
    )
    args.rank, args.world_size = 0, 1  # what open_clip_train.main sets before create_loss
    return args


def tiny_tower_model(seed):
    torch.manual_seed(seed)
    return open_clip.create_model(TINY_MODEL)


def test_configure_parses_the_terms_once_into_the_run(shards, patched_install):
    args = parse(
        shards, "--paraclip-loss", "--paraclip-terms", "image:caption,para1:para2", "--paraclip-weights", "2,0.5"
    )
    assert isinstance(args.paraclip, ParaCLIPRun)
    assert args.paraclip.terms == [("image", "caption"), ("para1", "para2")] and args.paraclip.weights == [2.0, 0.5]
    assert args.paraclip_weights == "2,0.5"  # the flag as given; the parsed weights live in the run
    loss = hooks.create_loss(args)
    assert loss.terms == [("image", "caption"), ("para1", "para2")] and loss.weights == [2.0, 0.5]
    defaults = parse(shards, "--paraclip-loss").paraclip
    assert defaults.terms == [("image", "para2"), ("caption", "para1"), ("para1", "para2")]
    assert defaults.weights == [1.0, 1.0, 1.0]
    assert parse(shards).paraclip.image_tower is None  # a stock run gets a run object too, unused


def test_the_run_is_one_line_in_params_txt_and_pickles_with_args(shards, patched_install):
    args = parse(shards, "--paraclip-loss", "--image-embeddings")
    model = tiny_tower_model(0)
    hooks.wrap_model(model, args)
    assert args.paraclip.image_tower is model.visual
    # open_clip_train.main writes params.txt (and wandb's config) from vars(args), one "name: value" line each
    lines = [f"{name}: {getattr(args, name)}" for name in sorted(vars(args))]
    assert "paraclip: ParaCLIPRun(terms=image:para2,caption:para1,para1:para2, weights=1,1,1)" in lines
    assert all("\n" not in line for line in lines)
    # wandb's config turns a dataclass into a dict of (deep-copied) fields, the image tower included; anything
    # else of a non-builtin type it writes as str(value), the line above
    assert not dataclasses.is_dataclass(args.paraclip)
    copy = pickle.loads(pickle.dumps(args))  # the live tower stays behind (its frozen class does not pickle)
    assert str(copy.paraclip) == str(args.paraclip) and copy.paraclip.image_tower is None
    assert args.paraclip.image_tower is model.visual


def test_each_parse_has_its_own_run(shards, patched_install):
    """Two runs in one process (the in-process runner, tests) check embeddings against their own towers."""
    first, second = (parse(shards, "--paraclip-loss", "--image-embeddings") for _ in range(2))
    model_a, model_b = tiny_tower_model(0), tiny_tower_model(1)
    hooks.wrap_model(model_a, first)
    hooks.wrap_model(model_b, second)
    hooks.wds_decode_stages(first, None, open_clip.get_tokenizer(TINY_MODEL), is_train=True)
    hooks.wds_decode_stages(second, None, open_clip.get_tokenizer(TINY_MODEL), is_train=True)
    assert first.paraclip.embeddings.visual_sha256 != second.paraclip.embeddings.visual_sha256
    assert first.paraclip.embeddings == EmbeddingExpectation.of_tower(
        model_a.visual, label=f"('{TINY_MODEL}', pretrained 'none') ", precision="fp32"
    )


def test_embeddings_are_fingerprinted_when_the_data_is_built_and_once(shards, patched_install):
    """--resume loads the weights after wrap_model: the fingerprint is of the weights the data is built with."""
    args = parse(shards, "--paraclip-loss", "--image-embeddings")
    model = tiny_tower_model(0)
    hooks.wrap_model(model, args)
    model.load_state_dict(tiny_tower_model(1).state_dict())  # what --resume does after wrap_model
    tokenizer = open_clip.get_tokenizer(TINY_MODEL)
    hooks.wds_decode_stages(args, None, tokenizer, is_train=True)
    expected = args.paraclip.embeddings
    assert expected.visual_sha256 == EmbeddingExpectation.of_tower(model.visual).visual_sha256
    assert expected.dim == model.visual.output_dim and expected.precision == "fp32"
    hooks.wds_decode_stages(args, None, tokenizer, is_train=True)  # the validation data, say
    assert args.paraclip.embeddings is expected


def test_hooks_called_out_of_order_say_which(shards, patched_install):
    bare = argparse.Namespace(paraclip_loss=True, image_embeddings=True, frozen_visual=True, causal_attention=False)
    bare.text_trimming = True
    with pytest.raises(RuntimeError, match=r"the create_loss hook ran before configure\(args\)"):
        hooks.create_loss(bare)
    with pytest.raises(RuntimeError, match=r"the wrap_model hook ran before configure\(args\)"):
        hooks.wrap_model(tiny_tower_model(0), bare)
    bare.train_data = str(shards / "s" / "00000.tar")
    with pytest.raises(RuntimeError, match=r"the wds_decode_stages hook ran before configure\(args\)"):
        hooks.wds_decode_stages(bare, None, None, is_train=True)
    args = parse(shards, "--paraclip-loss", "--image-embeddings")
    with pytest.raises(RuntimeError, match=r"the wds_decode_stages hook ran before wrap_model\(model, args\)"):
        hooks.wds_decode_stages(args, None, None, is_train=True)
