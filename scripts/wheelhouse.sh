#!/usr/bin/env bash
# `make wheelhouse`: the pure-Python wheels a GPU machine without a package index lacks, into .whl/
# (git-ignored), for scripts/gpu_check.sh. The versions are the ones installed here (the project's
# pins). Also a copy of open_clip_train with the patch series applied, for machines without GNU patch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
rm -rf .whl && mkdir -p .whl
# what the CUDA image lacks (torch, timm, numpy, pandas, regex, huggingface_hub, safetensors, ... are there)
NEEDED="open_clip_torch webdataset braceexpand ftfy wcwidth"
SPECS=$($PY - $NEEDED <<'PY'
import sys
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))
PY
)
$PY -m pip download -q --no-deps --only-binary=:all: -d .whl $SPECS
# open_clip_train from that wheel, patched here (GNU patch may be missing there)
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
$PY -m zipfile -e .whl/open_clip_torch-*.whl "$TMP/site"
$PY - "$TMP/site" <<'PY'
import sys
from pathlib import Path
from paraclip_plugin import patching
root = Path(sys.argv[1])
patching.apply(root, patching.patch_series(patching.installed_version()))
PY
tar -C "$TMP/site" -cf .whl/open_clip_train-patched.tar open_clip_train
ls -l .whl
du -sh .whl
