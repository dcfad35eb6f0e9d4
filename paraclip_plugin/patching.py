"""``paraclip-patch apply | check | revert``: give an installed open_clip_train its plugin hook points.

The change itself is ``patches/open_clip_train-<version>.patch``: a small, generic diff (a new
``open_clip_train/plugins.py`` plus a few calls into it) that open_clip could take upstream.

How it is applied, so that no stop leaves an install that nothing can repair:

* every file the patch touches is classified on its own: ``release`` (the patch applies to it with no
  fuzz and does not reverse-apply), ``patched`` (the other way round) or ``modified`` (neither: a local
  edit, or another build); a ``modified`` file is named and nothing is written;
* GNU ``patch`` runs on private copies only; each patched (or restored) file then replaces the installed
  one by an atomic rename, the new ``plugins.py`` first. A run killed between two renames leaves every
  file either the release's or the patched one, so the rerun finishes the job (``check`` says
  "partly patched");
* ``apply`` and ``revert`` hold an exclusive lock on the package folder: two jobs applying at once
  (every rank of a shared venv) take turns instead of failing.

``python -m paraclip_plugin.train`` applies the same file to a private copy instead of site-packages.
"""

import argparse
import contextlib
import fcntl
import glob
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from paraclip_plugin.data.atomic import atomic_write_bytes, fsync_dir

PACKAGE = "open_clip_train"
DISTRIBUTION = "open_clip_torch"
PATCH_DIR = Path(__file__).resolve().parent / "patches"
TEMP_MARK = ".paraclip-patch-"  # temporary files next to the installed ones, removed by the next run
RELEASE, PATCHED, MODIFIED = "release", "patched", "modified"


class PatchError(RuntimeError):
    pass


def supported_versions():
    return sorted(p.name[len(PACKAGE) + 1 : -len(".patch")] for p in PATCH_DIR.glob(f"{PACKAGE}-*.patch"))


def installed_version():
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise PatchError(
            f"{DISTRIBUTION} is not installed; supported versions: {', '.join(supported_versions())}"
        ) from None


def patch_file(version):
    path = PATCH_DIR / f"{PACKAGE}-{version}.patch"
    if not path.is_file():
        supported = supported_versions()
        if not supported:
            raise PatchError(
                f"no {PACKAGE}-*.patch file in {PATCH_DIR} (a checkout without its symlinks?); "
                f"reinstall paraclip-plugin"
            )
        raise PatchError(
            f"{DISTRIBUTION} {version} is not supported by paraclip-patch; "
            f"supported versions: {', '.join(supported)}. "
            f"Install one with: pip install {DISTRIBUTION}=={supported[-1]}"
        )
    return path


def installed_root():
    """The folder that holds the installed ``open_clip_train`` package (site-packages)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PatchError(f"{PACKAGE} is not importable; install {DISTRIBUTION}")
    return Path(list(spec.submodule_search_locations)[0]).parent


def file_diffs(patch):
    """``{path under root: (its part of the diff, whether the patch creates it)}``, in the patch's order."""
    text = Path(patch).read_text()
    parts = re.split(r"^(?=diff --git )", text, flags=re.M)
    diffs = {}
    for part in parts:
        target = re.search(r"^\+\+\+ b/(\S+)", part, flags=re.M)
        if target:
            diffs[target.group(1)] = (part, re.search(r"^--- /dev/null", part, flags=re.M) is not None)
    return diffs


def _patched_text(path, content, diff, reverse=False):
    """``content`` (bytes, or None for no file) with ``diff`` applied by GNU patch in a private folder, no
    fuzz: the new bytes (None: the file is removed), or ``False`` when it does not apply."""
    if shutil.which("patch") is None:
        raise PatchError("GNU patch is required (apt-get install patch)")
    with tempfile.TemporaryDirectory(prefix="paraclip-patch-") as folder:
        target = Path(folder) / path
        target.parent.mkdir(parents=True)
        if content is not None:
            target.write_bytes(content)
        done = subprocess.run(
            [
                "patch",
                "-p1",
                "-d",
                folder,
                "--fuzz=0",
                "--no-backup-if-mismatch",
                "--force",
                "--reject-file=-",
                "--remove-empty-files",
                "--silent",
                "--reverse" if reverse else "--forward",
            ],
            input=diff.encode(),
            capture_output=True,
        )
        if done.returncode != 0:
            return False
        return target.read_bytes() if target.exists() else None


def _read(path):
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def file_states(root, patch):
    """``{path: (state, release bytes, patched bytes)}`` for every file the patch touches (None: no file)."""
    states = {}
    for path, (diff, created) in file_diffs(patch).items():
        current = _read(Path(root) / path)
        if created:  # a new file: absent, or exactly the patch's text
            new = _patched_text(path, None, diff)
            state = RELEASE if current is None else PATCHED if current == new else MODIFIED
            states[path] = (state, None, new)
            continue
        forward = _patched_text(path, current, diff) if current is not None else False
        backward = _patched_text(path, current, diff, reverse=True) if current is not None else False
        if forward is not False and backward is False and _patched_text(path, forward, diff, reverse=True) == current:
            states[path] = (RELEASE, current, forward)
        elif backward is not False and forward is False and _patched_text(path, backward, diff) == current:
            states[path] = (PATCHED, backward, current)
        else:
            states[path] = (MODIFIED, None, None)
    return states


def state_summary(states):
    return ", ".join(f"{Path(p).name} {s}" for p, (s, _, _) in states.items())


def modified_message(root, states, version):
    """What to say about files that are neither the release's nor the patched ones; None when there are none."""
    modified = [str(Path(root) / p) for p, (s, _, _) in states.items() if s == MODIFIED]
    if modified:
        return (
            f"{', '.join(modified)}: neither the release's text nor the patched text around the patch's lines (a "
            f"local edit, another build of {DISTRIBUTION} {version}, or a patch of an older paraclip-plugin). "
            f"Restore the release's files with `pip install --force-reinstall --no-deps {DISTRIBUTION}=={version}`, "
            f"{_added_files_advice(root, states)}then run `paraclip-patch apply`"
        )
    return None


def _added_files_advice(root, states):
    """A reinstall leaves the files the patch adds (no wheel owns them): name those to delete as well."""
    added = [str(Path(root) / p) for p, (s, _, new) in states.items() if s == MODIFIED and new is not None]
    return f"and delete {', '.join(added)} (the patch adds it; a reinstall keeps it), " if added else ""


def refuse_modified(root, states, version):
    message = modified_message(root, states, version)
    if message:
        raise PatchError(message.replace(". Restore", "; nothing was changed. Restore", 1))


@contextlib.contextmanager
def _locked(root):
    """An exclusive lock held while files are replaced: ``flock`` on the package folder itself (no file made);
    where the file system refuses that (NFS emulates flock with POSIX locks, which need a file open for writing;
    Lustre without -o flock), a POSIX lock on ``.paraclip-patch.lock`` in it."""
    folder = Path(root) / PACKAGE
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            os.close(fd)
            fd = os.open(folder / ".paraclip-patch.lock", os.O_RDWR | os.O_CREAT, 0o666)
            fcntl.lockf(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _replace(path, content):
    """Put ``content`` (None: remove the file) at ``path`` by an atomic rename, keeping the file's mode (a new
    file: what open() gives under the umask), and make the rename durable."""
    if content is None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        for cached in glob.glob(str(path.parent / "__pycache__" / f"{path.stem}.*.pyc")):
            os.remove(cached)
        fsync_dir(path.parent)
        return
    atomic_write_bytes(
        path, content, mode=path.stat().st_mode & 0o777 if path.exists() else None, prefix=f".{path.name}{TEMP_MARK}"
    )


def _change(root, patch, want, version):
    """Bring every touched file to ``want`` (RELEASE or PATCHED); True if a file changed."""
    with _locked(root):
        for stale in (Path(root) / PACKAGE).glob(f".*{TEMP_MARK}*"):  # a killed run's temporary files
            stale.unlink()
        states = file_states(root, patch)
        refuse_modified(root, states, version)
        # created files (no release text) first when patching: a lone plugins.py changes nothing; last when reverting
        todo = sorted(
            ((release is None) == (want == RELEASE), path, release if want == RELEASE else patched)
            for path, (state, release, patched) in states.items()
            if state != want
        )
        try:
            for _, path, content in todo:
                _replace(Path(root) / path, content)
        except OSError as e:
            raise PatchError(
                f"{e.filename or Path(root) / PACKAGE}: {e.strerror}; nothing that was already replaced is "
                f"half-written, and a rerun finishes the job. On a read-only install, train with "
                f"`python -m paraclip_plugin.train`, which patches a private copy"
            ) from None
        return bool(todo)


def all_patched(states):
    return all(state == PATCHED for state, _, _ in states.values())


def apply(root, patch, version=None):
    """Apply ``patch`` under ``root``; a no-op when it is already applied. Returns True if it changed files."""
    return _change(root, patch, PATCHED, version or installed_version())


def revert(root, patch, version=None):
    """Restore the original files exactly. Returns True if it changed files."""
    return _change(root, patch, RELEASE, version or installed_version())


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="paraclip-patch",
        description="Add (or remove) the generic plugin hook points of patches/ to the installed "
        "open_clip_train, so `open_clip_train.main` accepts the ParaCLIP flags.",
    )
    parser.add_argument(
        "command",
        choices=["apply", "check", "revert"],
        help="apply: add the hooks (idempotent; finishes a stopped apply); check: exit 1 if the hooks "
        "are missing, partly applied or a file was edited; revert: restore the original files "
        "exactly",
    )
    args = parser.parse_args(argv)
    try:
        version = installed_version()
        patch = patch_file(version)
        root = installed_root()
        target = root / PACKAGE
        if args.command == "apply":
            changed = apply(root, patch, version)
            print(f"{'patched' if changed else 'already patched'}: {target} ({DISTRIBUTION} {version})")
        elif args.command == "revert":
            changed = revert(root, patch, version)
            print(f"{'reverted' if changed else 'not patched'}: {target} ({DISTRIBUTION} {version})")
        else:
            states = file_states(root, patch)
            kinds = {s for s, _, _ in states.values()}
            if all_patched(states):
                print(f"hooks present: {target} ({DISTRIBUTION} {version})")
                return 0
            if MODIFIED in kinds:
                print(f"paraclip-patch: {modified_message(root, states, version)}", file=sys.stderr)
            elif kinds == {RELEASE}:
                print(
                    f"hooks missing: {target} ({DISTRIBUTION} {version}); run `paraclip-patch apply` "
                    f"or train with `python -m paraclip_plugin.train`",
                    file=sys.stderr,
                )
            else:
                print(
                    f"partly patched (an apply or revert was stopped): {target} ({DISTRIBUTION} {version}): "
                    f"{state_summary(states)}; run `paraclip-patch apply` to finish (or `revert`)",
                    file=sys.stderr,
                )
            return 1
    except PatchError as e:
        print(f"paraclip-patch: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
