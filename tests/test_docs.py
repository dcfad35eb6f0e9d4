"""The README and docs/ as a reader uses them: the shell blocks marked ``<!-- runs-here -->`` run as written
(cheap ones: --help outputs, ``paraclip-patch check``), every relative link points to a file (and heading) that
exists, and every ``paraclip-*`` command and ``make`` target named in a code block exists."""

import configparser
import os
import re
import subprocess

import pytest
from conftest import BIN, REPO

PAGES = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]
MARK = "<!-- runs-here -->"
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```$", re.M | re.S)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def code_blocks(page):
    """(language, code, marked to run here) of each fenced block of ``page``."""
    text = page.read_text()
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        yield match.group(1), match.group(2), before.strip() == MARK


def runnable_blocks():
    return [
        pytest.param(code, id=f"{page.relative_to(REPO)}#{n}")
        for page in PAGES
        for n, (lang, code, marked) in enumerate(code_blocks(page))
        if marked
    ]


def slug(heading):
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page):
    text = FENCE.sub("", page.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def console_scripts():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return {
        line.split("=")[0].strip()
        for line in cfg["options.entry_points"]["console_scripts"].splitlines()
        if line.strip()
    }


def make_targets():
    return set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M))


def test_there_are_blocks_to_run_and_the_readme_starts_with_the_two_commands():
    assert len(runnable_blocks()) >= 5
    readme = (REPO / "README.md").read_text()
    first = next(code_blocks(REPO / "README.md"))[1].splitlines()
    assert [line.split()[:2] for line in first] == [["make", "demo"], ["make", "test"]]
    assert len(readme.splitlines()) <= 200


@pytest.mark.parametrize("code", runnable_blocks())
def test_marked_shell_block_runs(code, patched_install, tmp_path):
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"{code}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr
    assert proc.stdout.strip(), "a block meant to show something printed nothing"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_to_existing_files_and_headings(page):
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading '{anchor}' in {file.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_commands_and_make_targets_in_code_blocks_exist(page):
    scripts, targets = console_scripts(), make_targets()
    unknown = []
    for _, code, _ in code_blocks(page):
        for name in re.findall(r"(?<![\w/.-])(paraclip-[a-z-]+)(?![\w\[.-])", code):
            if name not in scripts and name != "paraclip-plugin":
                unknown.append(name)
        for target in re.findall(r"(?:^|[;&|]\s*)make\s+([a-z][\w-]*)", code, re.M):
            if target not in targets:
                unknown.append(f"make {target}")
    assert not unknown, f"{page.name}: not in setup.cfg's console scripts or the Makefile: {unknown}"


def test_the_checks_catch_a_missing_script_target_and_link(tmp_path):
    """The extraction is not vacuous: a page naming what does not exist is caught by each check."""
    page = tmp_path / "bad.md"
    page.write_text("[x](nowhere.md) [y](#no-heading)\n\n```bash\nparaclip-train-everything\nmake deploy\n```\n")
    assert [code for _, code, _ in code_blocks(page)] == ["paraclip-train-everything\nmake deploy\n"]
    with pytest.raises(AssertionError, match="nowhere.md.*no-heading"):
        test_relative_links_point_to_existing_files_and_headings(page)
    with pytest.raises(AssertionError, match=r"paraclip-train-everything.*make deploy"):
        test_commands_and_make_targets_in_code_blocks_exist(page)
