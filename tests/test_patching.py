"""paraclip-patch: apply / apply again / check / revert on the installed open_clip_train."""
import base64
import csv
import hashlib
import importlib.metadata
import shutil

import pytest

from conftest import BIN, run
from paraclip_plugin import patching


def release_hashes():
    """sha256 of each open_clip_train/*.py file as recorded by pip when open_clip_torch was installed."""
    dist = importlib.metadata.distribution("open_clip_torch")
    rows = csv.reader(dist.read_text("RECORD").splitlines())
    return {path: digest for path, digest, _ in rows if path.startswith("open_clip_train/") and path.endswith(".py")}


def current_hashes(root):
    return {
        str(p.relative_to(root)): "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(p.read_bytes()).digest()).rstrip(b"=").decode()
        for p in (root / "open_clip_train").glob("*.py")
    }


def paraclip_patch(*args):
    return run([BIN / "paraclip-patch", *args], check=False)


def test_round_trip_is_byte_identical_to_the_release(patched_install):
    root = patched_install
    try:
        assert paraclip_patch("revert").returncode == 0
        assert current_hashes(root) == release_hashes()
        check = paraclip_patch("check")
        assert check.returncode == 1 and "hooks missing" in check.stderr

        first = paraclip_patch("apply")
        assert first.returncode == 0 and first.stdout.startswith("patched:")
        patched = current_hashes(root)
        assert "open_clip_train/plugins.py" in patched and patched != release_hashes()
        again = paraclip_patch("apply")
        assert again.returncode == 0 and again.stdout.startswith("already patched:")
        assert current_hashes(root) == patched
        assert paraclip_patch("check").returncode == 0

        assert paraclip_patch("revert").stdout.startswith("reverted:")
        assert current_hashes(root) == release_hashes()
        assert not list((root / "open_clip_train" / "__pycache__").glob("plugins.*.pyc"))
    finally:
        paraclip_patch("apply")
    assert paraclip_patch("check").returncode == 0


def test_unsupported_version_is_refused_naming_supported_ones():
    with pytest.raises(patching.PatchError, match=r"open_clip_torch 2\.32\.0 is not supported.*supported versions: 3\.3\.0"):
        patching.patch_file("2.32.0")


def test_locally_modified_files_are_refused_untouched(tmp_path, pristine_root):
    shutil.copytree(pristine_root / "open_clip_train", tmp_path / "open_clip_train")
    main = tmp_path / "open_clip_train" / "main.py"
    edited = main.read_text().replace("loss = create_loss(args)", "loss = create_loss(args)  # local edit")
    main.write_text(edited)
    patch = patching.patch_file(patching.installed_version())
    with pytest.raises(patching.PatchError, match="does not apply cleanly"):
        patching.apply(tmp_path, patch)
    assert main.read_text() == edited
    assert not (tmp_path / "open_clip_train" / "plugins.py").exists()
    assert not list(tmp_path.rglob("*.orig")) and not list(tmp_path.rglob("*.rej"))
