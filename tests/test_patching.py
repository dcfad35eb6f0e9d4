"""paraclip-patch: apply / apply again / check / revert on the installed open_clip_train."""

import base64
import csv
import errno
import glob
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys

import pytest

from conftest import BIN, REPO, run
from paraclip_plugin import patching


def release_hashes():
    """sha256 of each open_clip_train/*.py file as recorded by pip when open_clip_torch was installed."""
    dist = importlib.metadata.distribution("open_clip_torch")
    rows = csv.reader(dist.read_text("RECORD").splitlines())
    return {path: digest for path, digest, _ in rows if path.startswith("open_clip_train/") and path.endswith(".py")}


def current_hashes(root):
    return {
        str(p.relative_to(root)): "sha256="
        + base64.urlsafe_b64encode(hashlib.sha256(p.read_bytes()).digest()).rstrip(b"=").decode()
        for p in (root / "open_clip_train").glob("*.py")
    }


def test_round_trip_is_byte_identical_to_the_release(patched_install, tmp_path):
    """On a copy of the patched install (found first on PYTHONPATH): the installed one stays patched, so training
    jobs sharing this environment are never hit by a test's revert."""
    import compileall

    root = copy_of(patched_install, tmp_path)
    assert compileall.compile_file(str(root / "open_clip_train" / "plugins.py"), quiet=1)
    assert paraclip_patch_on(root, "check").returncode == 0
    reverted = paraclip_patch_on(root, "revert")
    assert reverted.returncode == 0 and reverted.stdout.startswith(f"reverted: {root / 'open_clip_train'}")
    assert current_hashes(root) == release_hashes()  # byte for byte, per pip's RECORD
    assert not list((root / "open_clip_train" / "__pycache__").glob("plugins.*.pyc"))
    check = paraclip_patch_on(root, "check")
    assert check.returncode == 1 and "hooks missing" in check.stderr

    first = paraclip_patch_on(root, "apply")
    assert first.returncode == 0 and first.stdout.startswith("patched:")
    patched = current_hashes(root)
    assert "open_clip_train/plugins.py" in patched and patched != release_hashes()
    assert patched == current_hashes(patched_install)
    again = paraclip_patch_on(root, "apply")
    assert again.returncode == 0 and again.stdout.startswith("already patched:")
    assert current_hashes(root) == patched
    assert paraclip_patch_on(root, "check").returncode == 0
    assert paraclip_patch_on(root, "revert").stdout.startswith("reverted:")
    assert current_hashes(root) == release_hashes()


def test_unsupported_version_is_refused_naming_supported_ones():
    with pytest.raises(
        patching.PatchError, match=r"open_clip_torch 2\.32\.0 is not supported.*supported versions: 3\.3\.0"
    ):
        patching.patch_series("2.32.0")


def test_locally_modified_files_are_refused_untouched(tmp_path, pristine_root):
    shutil.copytree(pristine_root / "open_clip_train", tmp_path / "open_clip_train")
    main = tmp_path / "open_clip_train" / "main.py"
    edited = main.read_text().replace("loss = create_loss(args)", "loss = create_loss(args)  # local edit")
    main.write_text(edited)
    patch = patching.patch_series(patching.installed_version())
    with pytest.raises(
        patching.PatchError,
        match=f"{main}: neither the release's text nor the patched text.*"
        f"pip install --force-reinstall --no-deps open_clip_torch==",
    ):
        patching.apply(tmp_path, patch)
    assert main.read_text() == edited
    assert not (tmp_path / "open_clip_train" / "plugins.py").exists()
    assert not list(tmp_path.rglob("*.orig")) and not list(tmp_path.rglob("*.rej"))


def test_an_added_file_of_another_patch_is_named_to_delete(tmp_path, pristine_root):
    """A reinstall of open_clip_torch restores its own files but keeps plugins.py (no wheel owns it): a plugins.py
    of another paraclip-plugin's patch is named with the advice to delete it, and nothing is changed."""
    shutil.copytree(pristine_root / "open_clip_train", tmp_path / "open_clip_train")
    added = tmp_path / "open_clip_train" / "plugins.py"
    added.write_text("# plugins.py of an older paraclip-plugin\n")
    main_before = (tmp_path / "open_clip_train" / "main.py").read_bytes()
    patch = patching.patch_series(patching.installed_version())
    with pytest.raises(patching.PatchError, match=f"and delete {added} \\(the patch adds it"):
        patching.apply(tmp_path, patch)
    assert added.read_text() == "# plugins.py of an older paraclip-plugin\n"
    assert (tmp_path / "open_clip_train" / "main.py").read_bytes() == main_before


def copy_of(root, folder):
    shutil.copytree(root / "open_clip_train", folder / "open_clip_train", ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def paraclip_patch_on(root, *args):
    """``paraclip-patch`` as a user runs it, on the open_clip_train found first on PYTHONPATH."""
    return run([BIN / "paraclip-patch", *args], check=False, env_extra={"PYTHONPATH": str(root)})


def test_a_stop_between_two_files_leaves_an_install_that_apply_or_revert_finishes(tmp_path, pristine_root, monkeypatch):
    patch = patching.patch_series(patching.installed_version())
    release = current_hashes(pristine_root)
    full = copy_of(pristine_root, tmp_path / "full")
    patching.apply(full, patch)
    patched = current_hashes(full)
    for stop_after in (1, 2, 3, 4):  # killed after the first ... fourth of the five renames
        root = copy_of(pristine_root, tmp_path / f"stopped{stop_after}")
        real, calls = patching._replace, []

        def replace_then_stop(path, content, calls=calls, stop_after=stop_after, real=real):
            if len(calls) == stop_after:
                raise KeyboardInterrupt  # a SIGINT/SIGKILL between two renames
            calls.append(path.name)
            real(path, content)

        monkeypatch.setattr(patching, "_replace", replace_then_stop)
        with pytest.raises(KeyboardInterrupt):
            patching.apply(root, patch)
        monkeypatch.setattr(patching, "_replace", real)
        assert calls[0] == "plugins.py"  # the new module first: alone, it changes nothing
        (root / "open_clip_train" / ".main.py.paraclip-patch-x1y2").write_bytes(b"a killed run's temporary file")
        now = current_hashes(root)
        assert all(now[name] in (release.get(name), patched[name]) for name in patched)  # no file half-written
        check = paraclip_patch_on(root, "check")
        assert check.returncode == 1 and "partly patched (an apply or revert was stopped" in check.stderr
        carried = [name for name in ("data.py", "main.py", "params.py", "plugins.py") if name in calls]
        first = "applied" if len(carried) == 4 else f"in {', '.join(carried)}, not in"
        assert f"0001-plugins-hooks.patch {first}" in check.stderr
        assert f"0004-zero-shot-numpy-float.patch {'applied' if 'zero_shot.py' in calls else 'missing'}" in check.stderr
        assert "run `paraclip-patch apply` to finish" in check.stderr
        if stop_after in (2, 4):  # these are rolled back instead
            finish = paraclip_patch_on(root, "revert")
            assert finish.returncode == 0 and finish.stdout.startswith("reverted:") and current_hashes(root) == release
            continue
        finish = paraclip_patch_on(root, "apply")
        assert finish.returncode == 0 and finish.stdout.startswith("patched:"), finish.stderr
        assert current_hashes(root) == patched and paraclip_patch_on(root, "check").returncode == 0
        assert not list((root / "open_clip_train").glob(".*paraclip-patch-*"))


SERIES = [
    "0001-plugins-hooks.patch",
    "0002-ddp-device-ids-on-cpu.patch",
    "0003-logs-dir.patch",
    "0004-zero-shot-numpy-float.patch",
]
# sha256 of the files the series gives open_clip_train 3.3.0: the same bytes as the single patch the series was
# split from, so an install patched by either is "patched" for the other
PATCHED_SHA256 = {
    "data.py": "ed52f3f04af8be484b76fcbdb2e214b37fab94589cea5ea68fceff8f93e2bb24",
    "main.py": "aa1172e40cec2d8b35cf38112063298e5f81191027742f997a46071441ddce27",
    "params.py": "ea4614b7f922f648881267347d180325a60a44262ef683fe534c60b061c86df3",
    "plugins.py": "a4b5790967f16defee2db00a5885022d8cd522915ae0461b0d98086c1008b0f5",
    "zero_shot.py": "1a2fb2441f7fb86f6a7eb5d64ad1b9363bbd6f6c8bd960935fba253298142d68",
}


def series_path():
    return patching.patch_series(patching.installed_version())


def sha256_of(root, names):
    return {name: hashlib.sha256((root / "open_clip_train" / name).read_bytes()).hexdigest() for name in names}


def apply_by_hand(root, *names):
    """Some patches of the series applied with GNU patch, as a user applying them one by one would."""
    for name in names:
        subprocess.run(
            ["patch", "-p1", "--fuzz=0", "--no-backup-if-mismatch", "--silent", "-d", str(root)],
            input=(series_path() / name).read_bytes(),
            check=True,
        )


def git_tree(folder):
    """``folder`` as a work tree of its own: git apply takes paths from the top of the enclosing one."""
    subprocess.run(["git", "init", "-q", str(folder)], check=True)
    return folder


def test_each_patch_is_a_described_pull_request_and_the_series_gives_the_patched_files(tmp_path, pristine_root):
    """Each patch applies on its own to the release (git apply, as a reviewer would); applied one after another,
    they give the same bytes as paraclip-patch apply."""
    assert [p.name for p in patching.series_patches(series_path())] == SERIES
    for number, name in enumerate(SERIES, 1):
        text = (series_path() / name).read_text()
        head, _, diff = text.partition("\n---\n")
        assert head.startswith("From ") and f"Subject: [PATCH {number}/{len(SERIES)}] " in head
        assert len(head.split("\n\n", 1)[1].split()) >= 30  # a description of what it fixes and why
        assert "diff --git a/open_clip_train/" in diff
        alone = git_tree(copy_of(pristine_root, tmp_path / name))
        check = subprocess.run(["git", "apply", "--check", "-"], cwd=alone, input=text.encode(), capture_output=True)
        assert check.returncode == 0, check.stderr
    in_order = git_tree(copy_of(pristine_root, tmp_path / "in-order"))
    for name in SERIES:
        subprocess.run(["git", "apply", "-"], cwd=in_order, input=(series_path() / name).read_bytes(), check=True)
    assert sha256_of(in_order, PATCHED_SHA256) == PATCHED_SHA256
    applied = copy_of(pristine_root, tmp_path / "applied")
    assert patching.apply(applied, series_path())
    assert current_hashes(applied) == current_hashes(in_order)
    assert patching.all_patched(patching.file_states(in_order, series_path()))


def test_a_patch_that_does_not_fit_changes_nothing(tmp_path, pristine_root):
    """The third patch does not fit params.py: the first two, which do, are not applied either."""
    root = copy_of(pristine_root, tmp_path)
    params = root / "open_clip_train" / "params.py"
    params.write_text(params.read_text().replace('default="./logs/",', 'default="/scratch/logs/",', 1))
    before = current_hashes(root)
    for command in ("apply", "check"):
        result = paraclip_patch_on(root, command)
        assert result.returncode == (2 if command == "apply" else 1)
        assert f"{params}: neither the release's text nor the patched text" in result.stderr
        assert "0003-logs-dir.patch neither applies to nor is applied in params.py" in result.stderr
        assert "0001-plugins-hooks.patch neither" not in result.stderr  # it fits params.py
    assert current_hashes(root) == before and not (root / "open_clip_train" / "plugins.py").exists()


def test_a_partial_series_is_named_and_apply_or_revert_finishes_it(tmp_path, pristine_root):
    release = current_hashes(pristine_root)
    for command in ("apply", "revert"):
        root = copy_of(pristine_root, tmp_path / command)
        apply_by_hand(root, SERIES[0], SERIES[3])  # main.py and params.py: the first of their two patches
        check = paraclip_patch_on(root, "check")
        assert check.returncode == 1 and "only some patches of the series were applied" in check.stderr
        assert (
            "0001-plugins-hooks.patch applied; 0002-ddp-device-ids-on-cpu.patch missing; 0003-logs-dir.patch missing; "
            "0004-zero-shot-numpy-float.patch applied; run `paraclip-patch apply` to finish"
        ) in check.stderr
        states = patching.file_states(root, series_path())
        assert states["open_clip_train/main.py"].state == patching.PARTLY
        assert states["open_clip_train/main.py"].applied == (SERIES[0],)
        done = paraclip_patch_on(root, command)
        assert done.returncode == 0 and done.stdout.startswith("patched:" if command == "apply" else "reverted:")
        if command == "apply":
            assert sha256_of(root, PATCHED_SHA256) == PATCHED_SHA256
            assert paraclip_patch_on(root, "check").returncode == 0
        else:
            assert current_hashes(root) == release


def test_two_applies_at_once_take_turns(tmp_path, pristine_root):
    """Every rank of a job applying the patch to one shared install."""
    patched = None
    for round_ in range(4):
        root = copy_of(pristine_root, tmp_path / f"r{round_}")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join((str(root), str(REPO)))}
        procs = [
            subprocess.Popen(
                [BIN / "paraclip-patch", "apply"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            for _ in range(3)
        ]
        outs = [(p.wait(timeout=120), *p.communicate()) for p in procs]
        assert all(rc == 0 for rc, _, _ in outs), outs
        assert sorted(out.split(":")[0] for _, out, _ in outs) == ["already patched", "already patched", "patched"]
        patched = patched or current_hashes(root)
        assert current_hashes(root) == patched
        assert not [p for p in root.rglob("*") if p.suffix in (".rej", ".orig") or "paraclip-patch-" in p.name]


def test_where_the_folder_cant_be_flocked_a_lock_file_is_used(tmp_path, pristine_root, monkeypatch):
    """NFS emulates flock with POSIX locks, which need a file open for writing: flock on a folder fails there."""
    root = copy_of(pristine_root, tmp_path)
    real_flock, locked = patching.fcntl.flock, []

    def nfs_flock(fd, operation):
        if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(errno.EBADF, "Bad file descriptor")
        real_flock(fd, operation)

    real_lockf = patching.fcntl.lockf
    monkeypatch.setattr(patching.fcntl, "flock", nfs_flock)
    monkeypatch.setattr(
        patching.fcntl, "lockf", lambda fd, op: (locked.append(os.readlink(f"/proc/self/fd/{fd}")), real_lockf(fd, op))
    )
    patch = patching.patch_series(patching.installed_version())
    assert patching.apply(root, patch) and patching.all_patched(patching.file_states(root, patch))
    assert locked == [str(root / "open_clip_train" / ".paraclip-patch.lock")]


def test_an_edit_to_a_patched_install_is_named_and_nothing_is_changed(tmp_path, pristine_root):
    root = copy_of(pristine_root, tmp_path)
    assert paraclip_patch_on(root, "apply").returncode == 0
    main = root / "open_clip_train" / "main.py"
    main.write_text(main.read_text().replace("model.set_grad_checkpointing()", "model.set_grad_checkpointing()  # me"))
    before = current_hashes(root)
    check = paraclip_patch_on(root, "check")
    assert check.returncode == 1 and f"{main}: neither the release's text nor the patched text" in check.stderr
    for command in ("apply", "revert"):
        result = paraclip_patch_on(root, command)
        assert result.returncode == 2 and f"{main}: neither the release's" in result.stderr
        assert "nothing was changed" in result.stderr and "--force-reinstall" in result.stderr
    assert current_hashes(root) == before


def test_an_unwritable_install_is_named_and_the_runner_suggested(tmp_path, pristine_root, monkeypatch):
    root = copy_of(pristine_root, tmp_path)

    def read_only(*args):
        raise OSError(errno.EROFS, "Read-only file system", str(root / "open_clip_train" / "plugins.py"))

    monkeypatch.setattr(patching.os, "replace", read_only)
    with pytest.raises(
        patching.PatchError, match=r"plugins\.py: Read-only file system.*python -m paraclip_plugin\.train"
    ):
        patching.apply(root, patching.patch_series(patching.installed_version()))
    assert current_hashes(root) == current_hashes(pristine_root) and not list(root.rglob(".*paraclip-patch-*"))


def test_the_runner_names_an_edited_install_not_its_private_copy(tmp_path, pristine_root, monkeypatch):
    from paraclip_plugin.train import runner

    root = copy_of(pristine_root, tmp_path)
    params = root / "open_clip_train" / "params.py"
    params.write_text(params.read_text().replace("import ast\n", "import ast  # edited\n", 1))
    monkeypatch.setattr(patching, "installed_root", lambda: root)
    with pytest.raises(patching.PatchError, match=f"{params}: neither the release's"):
        runner.hooked_open_clip_train_root()


PYTHON39 = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.9*/bin/python3.9")))


def plugin_site(folder, plugins):
    """A folder for PYTHONPATH: the series' ``open_clip_train/plugins.py`` alone (it needs no torch) and one
    installed distribution per plugin, found through its dist-info's entry points as pip installs them."""
    states = patching.file_states(folder, patching.patch_series(patching.installed_version()))
    (folder / "open_clip_train").mkdir(parents=True)
    (folder / "open_clip_train" / "__init__.py").write_text("")
    (folder / "open_clip_train" / "plugins.py").write_bytes(states["open_clip_train/plugins.py"].patched)
    for name, source in plugins.items():
        (folder / f"{name}_hooks.py").write_text(source)
        info = folder / f"{name}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        target = "no_such_module" if "BROKEN" in source else f"{name}_hooks"
        (info / "entry_points.txt").write_text(f"[open_clip_train.plugins]\n{name} = {target}\n")
    return folder


HOOK_CALLS = """
import argparse, sys
from open_clip_train import plugins
parser = argparse.ArgumentParser()
plugins.add_arguments(parser)
args = parser.parse_args([])
print("loss", plugins.create_loss(args))
print("stages", plugins.wds_decode_stages(args, None, None, True))
"""


@pytest.mark.parametrize(
    "python",
    [sys.executable, *PYTHON39[:1]]
    if PYTHON39
    else [sys.executable, pytest.param("python3.9", marks=pytest.mark.skip("no Python 3.9 here"))],
    ids=lambda p: os.path.basename(p),
)
def test_plugins_run_in_name_order_and_a_conflict_or_a_broken_plugin_is_named(tmp_path, python):
    """The hook module itself (no site-packages: only these plugins), also under open_clip_torch's oldest Python
    (3.9, whose entry_points() has no group=)."""

    def hooks(python_, site):
        return subprocess.run(
            [python_, "-S", "-c", HOOK_CALLS],
            env={"PYTHONPATH": str(site), "PATH": os.environ["PATH"]},
            cwd=site,
            capture_output=True,
            text=True,
            timeout=60,
        )

    both = plugin_site(
        tmp_path / "both",
        {
            "zplug": "def create_loss(args):\n    return 'z-loss'\n",
            "aplug": "def create_loss(args):\n    return 'a-loss'\ndef add_arguments(parser):\n    parser.add_argument('--a')\n",
        },
    )
    result = hooks(python, both)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["loss a-loss", "stages None"]  # by name, whatever the install order
    assert "plugins 'aplug', 'zplug' all provide create_loss; using 'aplug'" in result.stderr

    clash = plugin_site(
        tmp_path / "clash",
        {
            "aplug": "def add_arguments(parser):\n    parser.add_argument('--same')\n",
            "bplug": "def add_arguments(parser):\n    parser.add_argument('--same')\n",
        },
    )
    result = hooks(python, clash)
    assert result.returncode != 0
    assert "open_clip_train plugin 'bplug' could not add its arguments: argument --same: conflicting" in result.stderr

    twice = plugin_site(tmp_path / "twice", {"aplug": "def create_loss(args):\n    return 1\n"})
    other = twice / "other-1.0.dist-info"  # another distribution registering the same plugin name
    shutil.copytree(twice / "aplug-1.0.dist-info", other)
    (other / "METADATA").write_text("Metadata-Version: 2.1\nName: other\nVersion: 1.0\n")
    (other / "entry_points.txt").write_text("[open_clip_train.plugins]\naplug = other_hooks\n")
    result = hooks(python, twice)
    assert result.returncode != 0
    assert "two open_clip_train plugins are named 'aplug' (" in result.stderr and "other_hooks" in result.stderr

    broken = plugin_site(tmp_path / "broken", {"aplug": "BROKEN", "bplug": "def create_loss(args):\n    return 1\n"})
    result = hooks(python, broken)
    assert result.returncode != 0
    assert "open_clip_train plugin 'aplug' (no_such_module) failed to load: ModuleNotFoundError" in result.stderr


def test_zero_shot_accuracy_of_the_patched_install_runs_on_numpy_2_4(patched_install):
    """open_clip_train 3.3.0's --imagenet-val scoring converts a 1-element array with float(), which NumPy 2.4
    refuses ("only 0-dimensional arrays can be converted"), after a whole epoch and before its checkpoint."""
    import numpy
    import torch
    from open_clip_train.zero_shot import accuracy

    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    target = torch.tensor([1, 2, 2, 1])
    assert accuracy(logits, target, topk=(1, 2, 3)) == [2.0, 3.0, 4.0]
    assert all(type(a) is float for a in accuracy(logits, target, topk=(1,)))
    assert tuple(int(p) for p in numpy.__version__.split(".")[:2]) >= (2, 4)  # the NumPy that broke it
