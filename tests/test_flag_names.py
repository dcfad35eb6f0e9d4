"""Flags renamed outside paraclip-eval so one name means one thing in every command: the older names still
work and say on stderr which name to use (paraclip-eval's own renames: test_eval_flags.py)."""

import sys

import pytest
from conftest import script_module as script

from paraclip_plugin.embed.images import parse_args as embed_images_args


def test_embed_images_precision_amp_bf16_is_open_clip_trains_name_and_amp_is_deprecated(capsys):
    base = ["--shards", "s.tar", "--model", "M"]
    assert embed_images_args(base + ["--precision", "amp_bf16"]).precision == "amp_bf16"
    assert capsys.readouterr().err == ""
    assert embed_images_args(base + ["--precision", "amp"]).precision == "amp_bf16"
    assert "paraclip-embed-images: warning: --precision amp is deprecated; use --precision amp_bf16" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        embed_images_args(base + ["--precision", "fp16"])
    assert "invalid choice: 'fp16' (choose from 'fp32', 'amp_bf16')" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, old, new, dest",
    [("bench_step", "--warmup", "--skip-steps", "warmup"), ("bench_generation", "--shards", "--num-shards", "shards")],
)
def test_a_renamed_benchmark_flag_keeps_its_old_name_with_a_warning(capsys, monkeypatch, name, old, new, dest):
    parse_args = script(name).parse_args
    monkeypatch.setattr(sys, "argv", [f"{name}.py"])
    assert getattr(parse_args([new, "3"]), dest) == 3
    assert capsys.readouterr().err == ""
    assert getattr(parse_args([old, "3"]), dest) == 3
    assert f"warning: {old} is deprecated; use {new}" in capsys.readouterr().err
