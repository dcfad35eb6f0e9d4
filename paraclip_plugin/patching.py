"""``paraclip-patch apply | check | revert``: give an installed open_clip_train its plugin hook points.

The change itself is ``patches/open_clip_train-<version>.patch``: a small, generic diff (a new
``open_clip_train/plugins.py`` plus a few calls into it) that open_clip could take upstream. It is
applied with GNU ``patch`` with no fuzz, so a file that differs from the release is refused
rather than patched half-way. ``python -m paraclip_plugin.train`` applies the same file to a
private copy instead of site-packages.
"""
import argparse
import glob
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

PACKAGE = "open_clip_train"
DISTRIBUTION = "open_clip_torch"
PATCH_DIR = Path(__file__).resolve().parent / "patches"
# files the patch creates; their byte-code caches are removed again on revert
CREATED_MODULES = ("plugins",)


class PatchError(RuntimeError):
    pass


def supported_versions():
    return sorted(p.name[len(PACKAGE) + 1:-len(".patch")] for p in PATCH_DIR.glob(f"{PACKAGE}-*.patch"))


def installed_version():
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise PatchError(f"{DISTRIBUTION} is not installed; supported versions: {', '.join(supported_versions())}")


def patch_file(version):
    path = PATCH_DIR / f"{PACKAGE}-{version}.patch"
    if not path.is_file():
        raise PatchError(
            f"{DISTRIBUTION} {version} is not supported by paraclip-patch; "
            f"supported versions: {', '.join(supported_versions())}. "
            f"Install one with: pip install {DISTRIBUTION}=={supported_versions()[-1]}")
    return path


def installed_root():
    """The folder that holds the installed ``open_clip_train`` package (site-packages)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PatchError(f"{PACKAGE} is not importable; install {DISTRIBUTION}")
    return Path(list(spec.submodule_search_locations)[0]).parent


def _run_patch(root, patch, *flags):
    if shutil.which("patch") is None:
        raise PatchError("GNU patch is required (apt-get install patch)")
    with open(patch, "rb") as stdin:
        return subprocess.run(
            ["patch", "-p1", "-d", str(root), "--fuzz=0", "--no-backup-if-mismatch", "--force", *flags],
            stdin=stdin, capture_output=True, text=True)


def is_applied(root, patch):
    # --force: take the direction as given (--batch would quietly flip a "reversed-looking" patch)
    return _run_patch(root, patch, "--reverse", "--dry-run", "--silent").returncode == 0


def apply(root, patch):
    """Apply ``patch`` under ``root``; a no-op when it is already applied. Returns True if it changed files."""
    if is_applied(root, patch):
        return False
    dry = _run_patch(root, patch, "--forward", "--dry-run")
    if dry.returncode != 0:
        raise PatchError(
            f"{patch.name} does not apply cleanly to {root / PACKAGE}: the installed files differ from the "
            f"release it was made for.\n{dry.stdout}{dry.stderr}")
    done = _run_patch(root, patch, "--forward", "--silent")
    if done.returncode != 0:
        raise PatchError(f"patch failed on {root / PACKAGE}:\n{done.stdout}{done.stderr}")
    return True


def revert(root, patch):
    """Restore the original files exactly. Returns True if it changed files."""
    if not is_applied(root, patch):
        return False
    done = _run_patch(root, patch, "--reverse", "--remove-empty-files", "--silent")
    if done.returncode != 0:
        raise PatchError(f"reverting {patch.name} failed on {root / PACKAGE}:\n{done.stdout}{done.stderr}")
    for module in CREATED_MODULES:
        for cached in glob.glob(str(root / PACKAGE / "__pycache__" / f"{module}.*.pyc")):
            os.remove(cached)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="paraclip-patch",
        description="Add (or remove) the generic plugin hook points of patches/ to the installed "
                    "open_clip_train, so `open_clip_train.main` accepts the ParaCLIP flags.")
    parser.add_argument("command", choices=["apply", "check", "revert"],
                        help="apply: add the hooks (idempotent); check: exit 1 if the hooks are missing; "
                             "revert: restore the original files exactly")
    args = parser.parse_args(argv)
    try:
        version = installed_version()
        patch = patch_file(version)
        root = installed_root()
        target = root / PACKAGE
        if args.command == "apply":
            changed = apply(root, patch)
            print(f"{'patched' if changed else 'already patched'}: {target} ({DISTRIBUTION} {version})")
        elif args.command == "revert":
            changed = revert(root, patch)
            print(f"{'reverted' if changed else 'not patched'}: {target} ({DISTRIBUTION} {version})")
        elif is_applied(root, patch):
            print(f"hooks present: {target} ({DISTRIBUTION} {version})")
        else:
            print(f"hooks missing: {target} ({DISTRIBUTION} {version}); run `paraclip-patch apply` "
                  f"or train with `python -m paraclip_plugin.train`", file=sys.stderr)
            return 1
    except PatchError as e:
        print(f"paraclip-patch: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
