"""Bad input gets a clear error naming the shard or flag, or a counted skip."""

import pytest

from conftest import PYTHON, read_log, run, save_init_checkpoint, train_args, write_shards


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    return save_init_checkpoint(tmp_path_factory.mktemp("init") / "init.pt")


def train(tmp_path, data, init, *extra, name="run", check=False):
    args = train_args(data, tmp_path / "logs", name, init, "--paraclip-loss", *extra, samples=32)
    return run([PYTHON, "-m", "open_clip_train.main", *args], check=check)


def test_shard_without_paraphrases_is_an_error_naming_it(tmp_path, init, patched_install):
    data = write_shards(tmp_path / "plain", num_shards=1, per_shard=16, paraphrases=False)
    proc = train(tmp_path, data, init)
    assert proc.returncode != 0
    shard = str(tmp_path / "plain" / "00000.tar")
    assert f"shard {shard} has no 'para1.txt' or 'para2.txt' member" in proc.stderr


def test_samples_missing_a_field_are_skipped_and_counted(tmp_path, init, patched_install):
    data = write_shards(tmp_path / "holes", num_shards=1, per_shard=16, drop={3: "para2.txt", 5: "txt"})
    train(tmp_path, data, init, check=True)
    log = read_log(tmp_path / "logs", "run")
    assert "skipped sample '00000003'" in log and "missing para2.txt" in log
    assert "skipped sample '00000005'" in log and "missing txt" in log
    assert "2 skipped so far in this data worker" in log
    assert "Train Epoch: 0" in log


def test_corrupt_tar_is_logged_and_skipped(tmp_path, init, patched_install):
    write_shards(tmp_path / "mixed", num_shards=2, per_shard=16)
    corrupt = tmp_path / "mixed" / "00001.tar"
    corrupt.write_bytes(corrupt.read_bytes()[:700] + b"\x00garbage" * 64)
    args = ["--workers", "1"]
    train(tmp_path, str(tmp_path / "mixed" / "{00000..00001}.tar"), init, *args, check=True)
    log = read_log(tmp_path / "logs", "run")
    assert "Handling webdataset error" in log and str(corrupt) in log
    assert "Train Epoch: 0" in log


@pytest.mark.parametrize(
    "flags,message",
    [
        (
            ["--paraclip-terms", "image:para2,caption:paraX"],
            "argument --paraclip-terms: unknown field 'paraX' in term 'caption:paraX'; fields are image, caption, para1, para2",
        ),
        (["--paraclip-terms", "image"], "argument --paraclip-terms: term 'image' is not of the form FIELD:FIELD"),
        (["--paraclip-weights", "1,0.5"], "argument --paraclip-weights: 2 weights given for 3 terms"),
        (["--paraclip-weights", "1,x,1"], "argument --paraclip-weights:"),
        (["--siglip"], "--paraclip-loss is a CLIP (InfoNCE) loss"),
    ],
)
def test_bad_flags(tmp_path, init, patched_install, flags, message):
    data = write_shards(tmp_path / "ok", num_shards=1, per_shard=4)
    proc = train(tmp_path, data, init, *flags)
    assert proc.returncode == 2 and message in proc.stderr
    assert not (tmp_path / "logs" / "run" / "checkpoints").exists()
