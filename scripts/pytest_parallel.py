#!/usr/bin/env python
"""pytest in a few processes at once, with one junit xml: gpu_check.sh's tests stage.

    python scripts/pytest_parallel.py tests/test_gpu.py --alone open_clip_train --junitxml tests.xml \\
        --logs logs/ -- -p no:cacheprovider -m gpu

Collects the tests (``pytest --collect-only -q`` with the options after ``--``). The tests that hold no
``--alone`` string run together in one pytest process; each test whose id holds one (the GPU tests that
start open_clip_train and compile: most of their time is start-up and Inductor on the CPU, little is
GPU work) runs in a process of its own; all at once. Process K writes its ``pytest -v`` output to
``LOGS/tests-K.log`` and its junit xml to ``tests-K.xml`` beside ``--junitxml``. At the end the xmls
are merged into ``--junitxml`` in collection order, the parts removed and the logs printed.

Nothing is lost to a failure: a process that dies without its xml (killed, crashed) gives each of its
tests an error in the merged xml, and a collection that fails gives one. A run stopped before the end
(SIGTERM: gpu_check.sh's time budget; it stops its processes too) leaves the ``tests-K`` files, from
which ``gpu_report.py`` reads the tests that finished. Exit status: 0 when every process passed, else
the first non-zero pytest status (1 for a process killed by a signal).
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

from paraclip_plugin.data.atomic import atomic_write_text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="test files or folders")
    p.add_argument(
        "--alone",
        action="append",
        default=[],
        metavar="TEXT",
        help="tests whose id holds TEXT run in a process of their own (repeatable)",
    )
    p.add_argument("--junitxml", required=True, help="the merged junit xml (the parts go beside it)")
    p.add_argument("--logs", required=True, help="folder for each process's pytest -v output (tests-K.log)")
    p.add_argument("--tmp", default=None, help="where the processes' --basetemp folders go (default: TMPDIR)")
    if argv is None:
        argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:split])
    args.options = argv[split + 1 :]
    return args


def collect(paths, options):
    """(the test ids pytest collects, in its order; None or pytest's output where collecting failed)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", *options, *paths], capture_output=True, text=True
    )
    listing = proc.stdout.split("\n\n", 1)[0]  # the ids, then a blank line and the summary
    ids = [line for line in listing.splitlines() if "::" in line]
    if proc.returncode != 0 or not ids:
        return ids, f"exit {proc.returncode}, {len(ids)} tests\n{proc.stdout[-4000:]}{proc.stderr[-2000:]}"
    return ids, None


def groups(ids, alone):
    """The tests without an --alone string in one group, then one group per test with one."""
    single = [[i] for i in ids if any(text in i for text in alone)]
    rest = [i for i in ids if not any(text in i for text in alone)]
    return ([rest] if rest else []) + single


def junit_key(test_id):
    """'tests/test_x.py::TestA::test_y[p]' -> ('tests.test_x.TestA', 'test_y[p]'): how pytest's junit xml
    names it (classname, name)."""
    path, *names = test_id.split("::")
    module = path[:-3] if path.endswith(".py") else path
    return ".".join([module.replace("/", "."), *names[:-1]]), names[-1]


def error_case(test_id, message, output=""):
    classname, name = junit_key(test_id)
    case = ET.Element("testcase", classname=classname, name=name, time="0")
    ET.SubElement(case, "error", message=message).text = output
    return case


def merge_junit(parts, order, out):
    """The testcases of the junit xmls ``parts`` [(path, test ids it should hold, why it may be
    missing)] in one testsuite, in ``order`` (test ids). Tests a part lacks get an error."""
    merged = ET.Element("testsuites")
    suite = ET.SubElement(merged, "testsuite", name="pytest")
    seconds, cases = 0.0, []
    for path, ids, missing in parts:
        found = set()
        if os.path.exists(path):
            for part in ET.parse(path).getroot().iter("testsuite"):
                seconds = max(seconds, float(part.get("time", 0)))  # they ran at once
                for case in part.findall("testcase"):
                    cases.append(case)
                    found.add((case.get("classname"), case.get("name")))
        cases += [error_case(i, missing) for i in ids if junit_key(i) not in found]
    rank = {junit_key(i): n for n, i in enumerate(order)}
    cases.sort(key=lambda c: rank.get((c.get("classname"), c.get("name")), len(rank)))
    for case in cases:
        suite.append(case)
    count = lambda tag: sum(case.find(tag) is not None for case in cases)  # noqa: E731
    suite.attrib.update(
        tests=str(len(cases)),
        failures=str(count("failure")),
        errors=str(count("error")),
        skipped=str(count("skipped")),
        time=f"{seconds:.3f}",
    )
    atomic_write_text(out, ET.tostring(merged, encoding="unicode") + "\n")


def main(argv=None):
    args = parse_args(argv)
    folder = os.path.dirname(os.path.abspath(args.junitxml))
    os.makedirs(folder, exist_ok=True)
    ids, failed = collect(args.paths, args.options)
    if failed:
        merge_junit(
            [("", [" ".join(args.paths) + "::collection"], "collecting the tests failed: " + failed)], [], args.junitxml
        )
        print(f"pytest_parallel.py: collecting {' '.join(args.paths)} failed: {failed}")
        return 1
    os.makedirs(args.logs, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="pytest_parallel.", dir=args.tmp)
    procs = []

    def stop(signum, frame):  # stopped at a time budget: stop the processes too, keep their files
        for proc, *_ in procs:
            proc.terminate()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    for k, group in enumerate(groups(ids, args.alone), 1):
        log, xml = os.path.join(args.logs, f"tests-{k}.log"), os.path.join(folder, f"tests-{k}.xml")
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-v",
            *args.options,
            "--junitxml",
            xml,
            "--basetemp",
            os.path.join(scratch, f"tmp-{k}"),
            *group,
        ]
        with open(log, "w") as out:
            procs.append((subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT), log, xml, group))
    codes = [proc.wait() for proc, *_ in procs]
    merge_junit(
        [
            (
                xml,
                group,
                f"its pytest process ended with {code} and wrote no result"
                + (f" (signal {-code})" if code < 0 else ""),
            )
            for (_, _, xml, group), code in zip(procs, codes)
        ],
        ids,
        args.junitxml,
    )
    for _, log, xml, _ in procs:  # the whole output in one place (the stage's log), then the parts go
        with open(log) as f:
            sys.stdout.write(f.read())
        os.remove(log)
        if os.path.exists(xml):
            os.remove(xml)
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"pytest_parallel.py: {len(ids)} tests in {len(procs)} processes at once; exit {', '.join(map(str, codes))}")
    return next((code if code > 0 else 1 for code in codes if code != 0), 0)


if __name__ == "__main__":
    sys.exit(main())
