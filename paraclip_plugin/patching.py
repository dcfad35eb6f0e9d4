"""``paraclip-patch apply | check | revert``: give an installed open_clip_train its plugin hook points.

The change itself is the series ``patches/open_clip_train-<version>/``: one ``NNNN-name.patch`` per upstream pull
request (the plugin hooks, a new ``open_clip_train/plugins.py`` plus a few calls into it, and three small fixes),
applied in the order of their names. Each applies on its own to the release; together they are one change here.

How it is applied, so that no stop leaves an install that nothing can repair:

* every file the series touches is classified on its own by the patches it carries: ``release`` (none: they all
  apply in order with no fuzz), ``patched`` (all: they all reverse-apply), ``partly patched`` (the first ones
  only) or ``modified`` (none of these: a local edit, or another build); a ``modified`` file is named, with the
  patches that fit it neither way, and nothing is written;
* GNU ``patch`` runs on private copies only, so every file's release and patched text is known before anything
  is written: a patch that does not fit leaves the install as it was. Each patched (or restored) file then
  replaces the installed one by an atomic rename, the new ``plugins.py`` first. A run killed between two renames
  leaves every file either the release's or the patched one, so the rerun finishes the job (``check`` says
  "partly patched");
* ``apply`` and ``revert`` hold an exclusive lock on the package folder: two jobs applying at once
  (every rank of a shared venv) take turns instead of failing.

``python -m paraclip_plugin.train`` applies the same series to a private copy instead of site-packages.
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
from typing import NamedTuple

from paraclip_plugin.clitools import PATCH, print_error
from paraclip_plugin.data.atomic import atomic_write_bytes, fsync_dir

PACKAGE = "open_clip_train"
DISTRIBUTION = "open_clip_torch"
PATCH_DIR = Path(__file__).resolve().parent / "patches"
TEMP_MARK = ".paraclip-patch-"  # temporary files next to the installed ones, removed by the next run
RELEASE, PATCHED, PARTLY, MODIFIED = "release", "patched", "partly patched", "modified"


class PatchError(RuntimeError):
    pass


def supported_versions():
    return sorted(p.name[len(PACKAGE) + 1 :] for p in PATCH_DIR.glob(f"{PACKAGE}-*") if series_patches(p))


def series_patches(series):
    """The patches of the series folder ``series``, in the order they apply."""
    return sorted(Path(series).glob("*.patch"))


def installed_version():
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise PatchError(
            f"{DISTRIBUTION} is not installed; supported versions: {', '.join(supported_versions())}"
        ) from None


def patch_series(version):
    """The folder of the patch series for open_clip_torch ``version``."""
    path = PATCH_DIR / f"{PACKAGE}-{version}"
    if not series_patches(path):
        supported = supported_versions()
        if not supported:
            raise PatchError(
                f"no {PACKAGE}-*/ patch series in {PATCH_DIR} (a checkout without its symlinks?); "
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


class FileDiff(NamedTuple):
    patch: str  # the name of the series' patch it is part of
    text: str  # that patch's diff of one file
    created: bool  # whether it creates the file


def file_diffs(series):
    """``{path under root: [FileDiff, ...]}``: each touched file's diffs, in the series' order."""
    diffs = {}
    for patch in series_patches(series):
        for part in re.split(r"^(?=diff --git )", patch.read_text(), flags=re.M):
            target = re.search(r"^\+\+\+ b/(\S+)", part, flags=re.M)
            if target:
                created = re.search(r"^--- /dev/null", part, flags=re.M) is not None
                diffs.setdefault(target.group(1), []).append(FileDiff(patch.name, part, created))
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


def _through(path, content, diffs, reverse=False):
    """``content`` taken through ``diffs`` in order (with ``reverse``, each reversed, the last first): the new
    bytes (None: no file), or ``False`` where one does not apply."""
    for diff in reversed(diffs) if reverse else diffs:
        starts_from_nothing = diff.created and not reverse  # a creation, and only a creation, needs no file
        if content is False or (content is None) != starts_from_nothing:
            return False
        content = _patched_text(path, content, diff.text, reverse)
    return content


class FileState(NamedTuple):
    state: str  # RELEASE, PATCHED, PARTLY or MODIFIED
    release: bytes | None  # the release's text (None: the release has no such file, or the file is MODIFIED)
    patched: bytes | None  # the text with the whole series applied (None: likewise)
    applied: tuple  # the names of the series' patches that the file carries
    patches: tuple  # the names of the series' patches that touch it
    misfits: tuple  # of a MODIFIED file: the patches that fit it neither way
    created: bool  # whether the series adds the file


def file_state(path, current, diffs):
    """The FileState of the file ``path`` holding ``current`` (None: no file), which ``diffs`` touch: it carries
    the first n of them for exactly one n, with an exact round trip both ways, or it is MODIFIED."""
    names, created = tuple(d.patch for d in diffs), any(d.created for d in diffs)
    fits = []
    for n in range(len(diffs) + 1):
        release = _through(path, current, diffs[:n], reverse=True)
        patched = False if release is False else _through(path, current, diffs[n:])
        if patched is False or _through(path, release, diffs[:n]) != current:
            continue
        if _through(path, patched, diffs[n:], reverse=True) == current:
            fits.append((n, release, patched))
    if len(fits) != 1:
        misfits = tuple(
            d.patch
            for d in diffs
            if _through(path, current, [d]) is False and _through(path, current, [d], reverse=True) is False
        )
        return FileState(MODIFIED, None, None, (), names, misfits, created)
    ((n, release, patched),) = fits
    state = RELEASE if n == 0 else PATCHED if n == len(diffs) else PARTLY
    return FileState(state, release, patched, names[:n], names, (), created)


def file_states(root, series):
    """``{path: FileState}`` for every file the series touches."""
    return {path: file_state(path, _read(Path(root) / path), diffs) for path, diffs in file_diffs(series).items()}


def series_summary(states):
    """Patch by patch, the files that carry it: "0001-x.patch applied; 0002-y.patch in a.py, not in b.py; ..."."""
    names = sorted({name for s in states.values() for name in s.patches})
    parts = []
    for name in names:
        touched = [(Path(path).name, name in s.applied) for path, s in states.items() if name in s.patches]
        having = [file for file, carried in touched if carried]
        lacking = [file for file, carried in touched if not carried]
        if not lacking:
            parts.append(f"{name} applied")
        elif not having:
            parts.append(f"{name} missing")
        else:
            parts.append(f"{name} in {', '.join(having)}, not in {', '.join(lacking)}")
    return "; ".join(parts)


def modified_message(root, states, version):
    """What to say about files that are neither the release's nor the patched ones; None when there are none."""
    modified = {str(Path(root) / p): s for p, s in states.items() if s.state == MODIFIED}
    if modified:
        misfits = "".join(
            f"; {patch} neither applies to nor is applied in {Path(path).name}"
            for path, s in modified.items()
            for patch in s.misfits
        )
        return (
            f"{', '.join(modified)}: neither the release's text nor the patched text around the series' lines (a "
            f"local edit, another build of {DISTRIBUTION} {version}, or a patch of an older paraclip-plugin){misfits}. "
            f"Restore the release's files with `pip install --force-reinstall --no-deps {DISTRIBUTION}=={version}`, "
            f"{_added_files_advice(modified)}then run `paraclip-patch apply`"
        )
    return None


def _added_files_advice(modified):
    """A reinstall leaves the files the series adds (no wheel owns them): name those to delete as well."""
    added = [path for path, s in modified.items() if s.created]
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


def _change(root, series, want, version):
    """Bring every touched file to ``want`` (RELEASE or PATCHED); True if a file changed. Every new text is
    computed before the first file is replaced: a patch of the series that does not fit changes nothing."""
    with _locked(root):
        for stale in (Path(root) / PACKAGE).glob(f".*{TEMP_MARK}*"):  # a killed run's temporary files
            stale.unlink()
        states = file_states(root, series)
        refuse_modified(root, states, version)
        # created files (no release text) first when patching: a lone plugins.py changes nothing; last when reverting
        todo = sorted(
            ((s.release is None) == (want == RELEASE), path, s.release if want == RELEASE else s.patched)
            for path, s in states.items()
            if s.state != want
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
    return all(s.state == PATCHED for s in states.values())


def apply(root, series, version=None):
    """Apply the patch series folder ``series`` under ``root``, finishing a partly applied one; a no-op when it is
    applied. Returns True if it changed files."""
    return _change(root, series, PATCHED, version or installed_version())


def revert(root, series, version=None):
    """Restore the original files exactly. Returns True if it changed files."""
    return _change(root, series, RELEASE, version or installed_version())


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="paraclip-patch",
        description="Apply (or remove) the patch series of patches/ to the installed open_clip_train: its "
        "generic plugin hook points, so `open_clip_train.main` accepts the ParaCLIP flags, and three fixes.",
    )
    parser.add_argument(
        "command",
        choices=["apply", "check", "revert"],
        help="apply: apply the series (idempotent; finishes a stopped or partial apply); check: exit 1 if "
        "the series is missing, partly applied or a file was edited; revert: restore the original files "
        "exactly",
    )
    args = parser.parse_args(argv)
    try:
        version = installed_version()
        series = patch_series(version)
        root = installed_root()
        target = root / PACKAGE
        if args.command == "apply":
            changed = apply(root, series, version)
            print(f"{'patched' if changed else 'already patched'}: {target} ({DISTRIBUTION} {version})")
        elif args.command == "revert":
            changed = revert(root, series, version)
            print(f"{'reverted' if changed else 'not patched'}: {target} ({DISTRIBUTION} {version})")
        else:
            states = file_states(root, series)
            kinds = {s.state for s in states.values()}
            if all_patched(states):
                print(f"hooks present: {target} ({DISTRIBUTION} {version})")
                return 0
            if MODIFIED in kinds:
                print(f"{PATCH}: {modified_message(root, states, version)}", file=sys.stderr)
            elif kinds == {RELEASE}:
                print(
                    f"hooks missing: {target} ({DISTRIBUTION} {version}); run `paraclip-patch apply` "
                    f"or train with `python -m paraclip_plugin.train`",
                    file=sys.stderr,
                )
            else:
                print(
                    f"partly patched (an apply or revert was stopped, or only some patches of the series were "
                    f"applied): {target} ({DISTRIBUTION} {version}): {series_summary(states)}; run `paraclip-patch apply` to finish (or `revert`)",
                    file=sys.stderr,
                )
            return 1
    except PatchError as e:
        print_error(PATCH, e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
