#!/usr/bin/env python
"""pytest in a few processes at once, with one junit xml: gpu_check.sh's tests stage.

    python scripts/pytest_parallel.py tests/test_gpu.py --alone open_clip_train --junitxml tests.xml \\
        --logs logs/ -- -p no:cacheprovider -m gpu

Collects the tests (``pytest --collect-only -q`` with the options after ``--``). Each test whose id
holds an ``--alone`` string runs in a pytest process of its own (the GPU tests that start
open_clip_train and compile: most of their time is start-up and Inductor on the CPU, little is GPU
work), the others together in one more process; all at once. Each process writes its ``pytest -v``
output to ``LOGS/tests-K.log``, its junit xml beside ``--junitxml`` and its temporary files under its
own ``--basetemp``. At the end the xmls are merged into ``--junitxml`` in collection order and the logs
printed. A run stopped before the end (at gpu_check.sh's time budget) leaves the ``tests-K.log``
files: ``gpu_report.py`` reads the finished tests from them. Exit status: the worst pytest's.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

from paraclip_plugin.shards import atomic_write_text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="test files or folders")
    p.add_argument("--alone", action="append", default=[], metavar="TEXT",
                   help="tests whose id holds TEXT run in a process of their own (repeatable)")
    p.add_argument("--junitxml", required=True, help="the merged junit xml")
    p.add_argument("--logs", required=True, help="folder for each process's pytest -v output (tests-K.log)")
    if argv is None:
        argv = sys.argv[1:]
    options = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.options = options
    return args


def collect(paths, options):
    """The test ids pytest collects, in its order."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *options, *paths],
                          capture_output=True, text=True)
    ids = [line.strip() for line in proc.stdout.splitlines() if "::" in line and " " not in line.strip()]
    if proc.returncode != 0 or not ids:
        sys.stdout.write(proc.stdout + proc.stderr)
        raise SystemExit(f"pytest_parallel.py: collecting {' '.join(paths)} failed (exit {proc.returncode}, "
                         f"{len(ids)} tests)")
    return ids


def groups(ids, alone):
    """One group per test that holds an --alone string, then one with the rest."""
    single = [[i] for i in ids if any(text in i for text in alone)]
    rest = [i for i in ids if not any(text in i for text in alone)]
    return single + ([rest] if rest else [])


def merge_junit(paths, order, out):
    """The testcases of the junit xmls ``paths`` in one testsuite, in ``order`` (test names)."""
    merged = ET.Element("testsuites")
    suite = ET.SubElement(merged, "testsuite", name="pytest")
    counts, seconds, cases = dict.fromkeys(("errors", "failures", "skipped", "tests"), 0), 0.0, []
    for path in paths:
        if not os.path.exists(path):  # a process that died before writing it: its exit status says so
            continue
        for part in ET.parse(path).getroot().iter("testsuite"):
            for key in counts:
                counts[key] += int(part.get(key, 0))
            seconds = max(seconds, float(part.get("time", 0)))  # they ran at once
            cases += part.findall("testcase")
    rank = {name: n for n, name in enumerate(order)}
    for case in sorted(cases, key=lambda c: rank.get(c.get("name"), len(rank))):
        suite.append(case)
    suite.attrib.update({k: str(v) for k, v in counts.items()}, time=f"{seconds:.3f}")
    atomic_write_text(out, ET.tostring(merged, encoding="unicode") + "\n")


def main(argv=None):
    args = parse_args(argv)
    ids = collect(args.paths, args.options)
    os.makedirs(args.logs, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="pytest_parallel.")
    procs = []
    for k, group in enumerate(groups(ids, args.alone), 1):
        log = open(os.path.join(args.logs, f"tests-{k}.log"), "w")
        xml = os.path.join(scratch, f"tests-{k}.xml")
        cmd = [sys.executable, "-m", "pytest", "-v", *args.options, "--junitxml", xml,
               "--basetemp", os.path.join(scratch, f"tmp-{k}"), *group]
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log, xml))
    codes = [proc.wait() for proc, _, _ in procs]
    for _, log, _ in procs:
        log.close()
    merge_junit([xml for _, _, xml in procs], [i.split("::")[-1] for i in ids], args.junitxml)
    for _, log, _ in procs:  # the whole output in one place (the stage's log), then the parts go
        with open(log.name) as f:
            sys.stdout.write(f.read())
        os.remove(log.name)
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"pytest_parallel.py: {len(ids)} tests in {len(procs)} processes at once; exit {', '.join(map(str, codes))}")
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
