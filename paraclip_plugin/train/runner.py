"""``python -m paraclip_plugin.train ARGS``: ``open_clip_train.main ARGS`` with the plugin hooks,
for installs whose site-packages can't be patched (read-only environments, shared clusters).

The installed open_clip_train is left untouched: its files are copied to a private temporary folder,
the same patches/ series that ``paraclip-patch apply`` uses is applied there, and that copy is
imported in this process in place of the installed one. Hooks, flags and behaviour are therefore
exactly those of a patched install. Works under torchrun/srun like ``-m open_clip_train.main``.
"""

import atexit
import runpy
import shutil
import sys
import tempfile
from pathlib import Path

from paraclip_plugin import patching


def hooked_open_clip_train_root():
    """A folder whose ``open_clip_train`` has the hook points: the install itself if it is patched."""
    root = patching.installed_root()
    version = patching.installed_version()
    series = patching.patch_series(version)
    states = patching.file_states(root, series)
    if patching.all_patched(states):
        return root
    patching.refuse_modified(root, states, version)  # named in the install, not in the private copy
    private = Path(tempfile.mkdtemp(prefix="paraclip-open_clip_train-"))
    atexit.register(shutil.rmtree, private, ignore_errors=True)
    shutil.copytree(root / patching.PACKAGE, private / patching.PACKAGE, ignore=shutil.ignore_patterns("__pycache__"))
    patching.apply(private, series, version)
    return private


def main(argv):
    try:
        root = hooked_open_clip_train_root()
    except patching.PatchError as e:
        raise SystemExit(f"paraclip_plugin.train: error: {e}") from None
    sys.path.insert(0, str(root))
    for name in [m for m in sys.modules if m == patching.PACKAGE or m.startswith(patching.PACKAGE + ".")]:
        del sys.modules[name]
    sys.argv = [str(root / patching.PACKAGE / "main.py"), *argv]
    runpy.run_module(f"{patching.PACKAGE}.main", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
