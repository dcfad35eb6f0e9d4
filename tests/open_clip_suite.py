#!/usr/bin/env python
"""open_clip_torch's own test suite against the installed open_clip_train, patch series applied, plugin installed.

    python tests/open_clip_suite.py [--include-slow] [PYTEST ARGS]   (`make test` runs it after the plugin's suite)

The source distribution of the installed open_clip_torch version ships open_clip's tests. It is
downloaded once with pip (``pip download --no-binary :all: --no-deps open_clip_torch==VERSION``) and
unpacked inside the virtual environment (``<venv>/open_clip_tests/``); nothing of it is copied into this
repository. The patch series is applied first (idempotent, as `paraclip-patch apply`), then pytest runs
the sdist's ``tests/`` with the tests listed in ``tests/open_clip_deselected.txt`` left out, each with
its reason there (``--include-slow`` runs the ones left out only for time). Every other test runs and must pass.

The paraclip hooks are counted while the tests run: without ParaCLIP flags each must be a no-op
(``wrap_model`` returns the model it got, the others None), and each hook whose call site the selected
tests reach must have been called (so a suite that silently stopped going through the patched code fails).
That check covers the files of ``REACHES`` that have tests left to run: in the default run that is
``test_wds.py`` only, since all of ``test_training_simple.py`` is left out (``[time]``, ``[hub]``); with
``--include-slow`` its training tests run and ``wrap_model`` and ``create_loss`` must be called too. In the
default run, ``main()``'s own path through the patch is covered by the plugin's suite instead
(``tests/test_train.py``: a patched run without ParaCLIP flags equals an unpatched one).
"""

import collections
import importlib.metadata
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
DESELECTED = HERE / "open_clip_deselected.txt"
PACKAGE = "open_clip_torch"
REASON_TAGS = ("[hub]", "[data]", "[gpu]", "[time]")
HOOKS = ("add_arguments", "configure", "wrap_model", "wds_decode_stages", "create_loss")
# hooks each test file's tests reach through the patched open_clip_train (parse_args, get_wds_dataset, main)
REACHES = {
    "test_wds.py": ("add_arguments", "configure", "wds_decode_stages"),
    "test_training_simple.py": ("add_arguments", "configure", "wrap_model", "create_loss"),
}


def read_deselected(path=DESELECTED, include_slow=False):
    """[(node id or test file, reason)] from the list: one per line, the id, white space, the reason;
    with ``include_slow`` the ones left out only for time ([time]) are not returned."""
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        node, _, reason = line.partition(" ")
        if not reason.strip().startswith(REASON_TAGS):
            raise SystemExit(f"{path}:{number}: '{node}' needs a reason starting with one of {', '.join(REASON_TAGS)}")
        if not (include_slow and reason.strip().startswith("[time]")):
            entries.append((node, reason.strip()))
    return entries


def sdist_tests(version):
    """The unpacked sdist of open_clip_torch ``version`` (pyproject.toml + tests/), downloaded on first use."""
    cache = Path(sys.prefix) / "open_clip_tests"
    root = cache / f"{PACKAGE}-{version}"
    if (root / "tests").is_dir():
        return root
    cache.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-binary",
                ":all:",
                "--no-deps",
                "--dest",
                tmp,
                f"{PACKAGE}=={version}",
            ],
            check=True,
        )
        (archive,) = Path(tmp).glob("*.tar.gz")
        prefix = archive.name.removesuffix(".tar.gz")
        with tarfile.open(archive) as tar:
            members = [
                m
                for m in tar.getmembers()
                if m.name in (f"{prefix}/pyproject.toml",) or m.name.startswith(f"{prefix}/tests/")
            ]
            tar.extractall(tmp, members=members, filter="data")
        # appears whole or not at all, so an interrupted download is fetched again next time
        os.replace(Path(tmp) / prefix, root)
    return root


class HookCheck:
    """A pytest plugin: counts the paraclip hooks' calls and checks each is a no-op."""

    def __init__(self, deselected):
        self.deselected = deselected
        self.calls = collections.Counter()
        self.not_noop = []
        self.ran_files = set()
        self.deselected_ids = []

    def pytest_sessionstart(self, session):
        from open_clip_train import plugins
        from paraclip_plugin.train import hooks

        if hooks not in plugins.get_plugins():
            raise pytest.UsageError("the paraclip plugin is not registered in the open_clip_train.plugins entry points")
        for name in HOOKS:
            setattr(hooks, name, self.counting(name, getattr(hooks, name)))

    def counting(self, name, hook):
        def counted(*args):
            result = hook(*args)
            self.calls[name] += 1
            expected = args[0] if name == "wrap_model" else None
            if result is not expected:
                self.not_noop.append(f"{name} returned {type(result).__name__} without ParaCLIP flags")
            return result

        return counted

    def pytest_deselected(self, items):
        self.deselected_ids += [item.nodeid for item in items]

    def pytest_runtest_logreport(self, report):
        if report.when == "call":
            self.ran_files.add(Path(report.nodeid.split("::")[0]).name)

    def problems(self):
        found = list(self.not_noop)
        for node, _ in self.deselected:
            if "::" in node and not any(
                i == node or i.startswith(node + "[") or i.startswith(node + "::") for i in self.deselected_ids
            ):
                found.append(f"{DESELECTED.name} lists {node}, which is not a test of this open_clip version")
        for file in sorted(self.ran_files):
            for name in REACHES.get(file, ()):
                if not self.calls[name]:
                    found.append(
                        f"{file} ran, but the paraclip hook {name} was never called: "
                        f"is the patched open_clip_train the one imported?"
                    )
        return found

    def pytest_terminal_summary(self, terminalreporter):
        terminalreporter.section("paraclip hooks during open_clip's tests")
        terminalreporter.write_line(", ".join(f"{name}: {self.calls[name]} calls" for name in HOOKS))
        for problem in self.problems():
            terminalreporter.write_line(f"FAILED: {problem}", red=True)

    def pytest_sessionfinish(self, session):
        if self.problems() and session.exitstatus == 0:
            session.exitstatus = 1


def main(argv):
    from paraclip_plugin import patching

    version = importlib.metadata.version(PACKAGE)
    patching.apply(patching.installed_root(), patching.patch_series(version))
    root = sdist_tests(version)
    include_slow = "--include-slow" in argv
    argv = [a for a in argv if a != "--include-slow"]
    deselected = read_deselected(include_slow=include_slow)
    options = []
    for node, _ in deselected:
        if "::" in node:
            options += ["--deselect", node]
        elif (root / node).is_file():
            options += ["--ignore", str(root / node)]
        else:
            raise SystemExit(f"{DESELECTED}: {node} is not a test file of {PACKAGE} {version}")
    print(
        f"== {PACKAGE} {version}'s own tests ({root / 'tests'}), patched open_clip_train, paraclip plugin "
        f"installed; {len(deselected)} left out, see {DESELECTED.relative_to(HERE.parent)}",
        flush=True,
    )
    os.chdir(root)  # open_clip's tests write data/ and logs/ relative to the folder they run in
    return pytest.main(["tests", "-p", "no:cacheprovider", *options, *argv], plugins=[HookCheck(deselected)])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
