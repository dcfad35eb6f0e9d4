"""A non-editable install (a wheel, as `pip install paraclip-plugin` gives) has the generation commands."""

import os
import shutil
import subprocess
import sys

from test_paraphrase_support import REPO

SERIES_OF_THE_INSTALL = """
from paraclip_plugin import patching
series = patching.patch_series("3.3.0")
print(series.resolve(), *(p.name for p in patching.series_patches(series)))
"""


def test_wheel_install_gives_console_scripts(tmp_path):
    src = tmp_path / "src"  # build from a copy: an in-tree build would leave build/ and egg-info here
    shutil.copytree(REPO / "paraclip_plugin", src / "paraclip_plugin", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
        check=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("paraclip_plugin-*.whl")
    site = tmp_path / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], check=True, timeout=300
    )
    shutil.rmtree(src)  # nothing of a checkout is left to fall back on
    env = {**os.environ, "PYTHONPATH": str(site)}
    for name, flag in (("paraclip-make-shards", "--api-key-env"), ("paraclip-embed-images", "--shards")):
        result = subprocess.run(
            [str(site / "bin" / name), "--help"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"usage: {name}") and flag in result.stdout
    # The commands run the installed copy, and scripts/ calls the same code.
    where = subprocess.run(
        [sys.executable, "-c", "import paraclip_plugin.paraphrase.cli as m; print(m.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=True,
    ).stdout
    assert where.startswith(str(site))
    # paraclip-patch finds its patch series in the installed package
    series = subprocess.run(
        [sys.executable, "-c", SERIES_OF_THE_INSTALL], capture_output=True, text=True, env=env, cwd=tmp_path, check=True
    ).stdout.split()
    assert series[0] == str(site / "paraclip_plugin" / "patches" / "open_clip_train-3.3.0")
    assert series[1:] == sorted(p.name for p in (REPO / "patches" / "open_clip_train-3.3.0").glob("*.patch"))
    assert len(series[1:]) == 4
    assert "from paraclip_plugin.paraphrase.cli import main" in (REPO / "scripts" / "make_shards.py").read_text()
