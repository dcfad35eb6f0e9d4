#!/usr/bin/env python
"""Results of scripts/gpu_check.sh: one JSON file, its Markdown, and the section of docs/benchmarks.md.

    python scripts/gpu_report.py started --work DIR [--cpu-smoke]
        DIR/started.json: the machine, torch, date and commit, written on the device when the check starts
    python scripts/gpu_report.py collect --work DIR --out OUT [--cpu-smoke]
        gpu_check.sh's stage results (started.json, stages.jsonl, tests.xml, step.json, e2e.json in DIR)
        -> OUT/gpu_check.json + OUT/gpu_check.md, with every target of the fast path checked. DIR is
        $OUT/work on the device, so a call stopped at its time limit still brings it back: collect it
        here then (the machine is named from started.json, not from where collect runs).
    python scripts/gpu_report.py publish OUT/gpu_check.json
        -> benchmarks/<gpu>-<date>-<HHMM>.json + .md, and the section of docs/benchmarks.md between the
           gpu-benchmark markers regenerated from the newest file per GPU kind in benchmarks/
    python scripts/gpu_report.py readme
        regenerate that section only (what `publish` does last)

No number reaches docs/benchmarks.md without the file it comes from: the section names its file.
"""
import argparse
import datetime
import glob
import json
import os
import platform
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

from paraclip_plugin.shards import atomic_write_text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(REPO, "benchmarks")
PAGE = os.path.join(REPO, "docs", "benchmarks.md")
BEGIN, END = "<!-- gpu-benchmark:begin -->", "<!-- gpu-benchmark:end -->"


def read_json(path):
    """The JSON in ``path``; None when it is missing, or cut short (a stage killed while saving), with a warning."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        try:
            return json.load(f)
        except ValueError as e:
            print(f"gpu_report: {path}: not readable as JSON ({e}): left out", file=sys.stderr)
            return None


def write_json(path, data):
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def read_tests(path):
    """junit xml -> {"passed", "failed", "cases": [{name, outcome, seconds, properties}]}"""
    if not os.path.exists(path):
        return None
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        cases.append({"name": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0)),
                      "properties": props})
    return tests_summary(cases)


def tests_summary(cases, **extra):
    count = lambda o: sum(c["outcome"] == o for c in cases)  # noqa: E731
    return {"passed": count("passed"), "failed": count("failed") + count("error"), "skipped": count("skipped"),
            "cases": cases, **extra}


# pytest -v's line per finished test: what is left of a tests stage stopped before pytest wrote its junit xml
VERBOSE_RE = re.compile(r"^\S+::(\S+) (PASSED|FAILED|ERROR|SKIPPED)\b", re.M)


def read_stopped_tests(work):
    """A tests stage stopped before pytest wrote ``tests.xml`` (its time budget): the tests that finished,
    {"passed", "failed", "skipped", "cases", "stopped": True}. From pytest_parallel.py's parts: process
    K's junit xml (``tests-K.xml``) where it wrote one, else the tests its ``pytest -v`` log
    (``logs/tests-K.log``) shows finished; or from ``logs/tests.log`` (a plain pytest run)."""
    logs = os.path.join(work, "logs")
    # each process's log exists until pytest_parallel.py has written tests.xml
    parts = sorted(int(re.search(r"tests-(\d+)\.log$", path).group(1))
                   for path in glob.glob(os.path.join(logs, "tests-*.log")))
    sources = [(os.path.join(work, f"tests-{k}.xml"), os.path.join(logs, f"tests-{k}.log")) for k in parts]
    if not sources and not os.path.exists(os.path.join(logs, "tests.log")):
        return None
    outcome = {"PASSED": "passed", "FAILED": "failed", "ERROR": "error", "SKIPPED": "skipped"}
    cases = []
    for xml, log in sources or [(None, os.path.join(logs, "tests.log"))]:
        if xml and os.path.exists(xml):
            cases += read_tests(xml)["cases"]
        elif os.path.exists(log):
            cases += [{"name": name, "outcome": outcome[word], "seconds": None, "properties": {}}
                      for name, word in VERBOSE_RE.findall(open(log, errors="replace").read())]
    return tests_summary(cases, stopped=True)


def environment():
    env = {"python": platform.python_version(), "cpu_cores": os.cpu_count()}
    try:
        import torch
        env["torch"] = torch.__version__
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name()
            env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)
    except ImportError:
        pass
    try:
        env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    return env


def short_commit(commit):
    """'a3421b4b43a1+changes' -> 'a3421b4b43+changes' (gpu_check.sh marks a tree that differs from its commit)."""
    sha, plus, rest = (commit or "?").partition("+")
    return sha[:10] + plus + rest


def step_case(step, name, batch):
    for case in (step or {}).get("cases", []):
        if case["step"] == name and case["batch"] == batch and not case.get("oom"):
            return case
    return None


def targets(step, e2e):
    """Each target of the fast path: value, goal, met (None where not measured)."""
    out = []

    def add(name, value, goal, met, note=""):
        out.append({"target": name, "value": value, "goal": goal, "met": met, "note": note})

    naive = step_case(step, "naive", 1024)
    plugin = [c for c in (step or {}).get("cases", [])
              if c["batch"] == 1024 and c["step"] != "naive" and not c.get("oom")]
    if naive and plugin:
        best = max(plugin, key=lambda c: c["samples_per_s"])
        ratio = best["samples_per_s"] / naive["samples_per_s"]
        add("plugin step vs naive step, batch 1,024", round(ratio, 2), ">= 4x", ratio >= 4,
            f"{best['step']}: {best['samples_per_s']:,.0f} vs {naive['samples_per_s']:,.0f} samples/s")
        img = step_case(step, "plugin-img", 1024)
        if img:
            r = img["samples_per_s"] / naive["samples_per_s"]
            add("plugin step from images vs naive step, batch 1,024", round(r, 2), ">= 4x", r >= 4,
                f"{img['samples_per_s']:,.0f} vs {naive['samples_per_s']:,.0f} samples/s")
    else:
        add("plugin step vs naive step, batch 1,024", None, ">= 4x", None, "not measured")
    big = [c for c in (step or {}).get("cases", []) if c["batch"] == 3072 and c["step"] != "naive"]
    if big:
        fits = [c for c in big if not c.get("oom") and c.get("peak_gib") is not None]
        worst = max((c["peak_gib"] for c in fits), default=None)
        add("plugin step at batch 3,072: peak GPU memory", worst, "< 80 GiB",
            bool(fits) and len(fits) == len(big) and worst < 80,
            ", ".join(f"{c['step']} {'OOM' if c.get('oom') else format(c.get('peak_gib') or 0, '.1f')}" for c in big))
    else:
        add("plugin step at batch 3,072: peak GPU memory", None, "< 80 GiB", None, "not measured")
    cases = (e2e or {}).get("cases", {})
    accum = cases.get("accum")
    if accum:
        add("one optimizer step of 32,768 via --accum-freq", accum.get("batch"), "runs",
            accum["exit"] == 0 and accum.get("optimizer_steps", 0) >= 1,
            f"exit {accum['exit']}, {accum.get('optimizer_steps')} optimizer steps, GPU memory in use "
            f"max {accum.get('gpu_memory_max_gib')} GiB")
    else:
        add("one optimizer step of 32,768 via --accum-freq", None, "runs", None, "not measured")
    stock, para = (cases.get(k, {}).get("samples_per_s") for k in ("stock", "paraclip"))
    # (c) is --paraclip-loss --image-embeddings with whichever further flags ran fastest
    cached_runs = {k: c["samples_per_s"] for k, c in cases.items()
                   if (k.startswith("cached") or k == "compact") and c.get("samples_per_s")}
    best = max(cached_runs, key=cached_runs.get, default=None)
    cached, which = (cached_runs[best], f"{best}: {cached_runs[best]:,.0f} samples/s") if best else (None, "")
    add("end to end, cached embeddings: samples/s", cached, ">= 10,000", None if cached is None else cached >= 10000,
        which)
    for name, value, goal, floor, note in (("end to end, cached vs stock", cached, ">= 4x", 4, which),
                                           ("end to end, ParaCLIP from JPEGs vs stock", para, ">= 0.9x", 0.9, "")):
        ratio = None if not (value and stock) else round(value / stock, 2)
        add(name, ratio, goal, None if ratio is None else ratio >= floor, note)
    return out


def run_facts(cpu_smoke):
    """What a result says of its run: kind, date, commit, and the machine it ran on (this one)."""
    return {"kind": "cpu-smoke" if cpu_smoke else "gpu",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": os.environ.get("GPU_CHECK_COMMIT"), "environment": environment()}


def started(args):
    os.makedirs(args.work, exist_ok=True)
    write_json(os.path.join(args.work, "started.json"), run_facts(args.cpu_smoke))
    return 0


def collect(args):
    stages = []
    path = os.path.join(args.work, "stages.jsonl")
    for number, line in enumerate(open(path) if os.path.exists(path) else [], 1):
        try:
            stages.append(json.loads(line)) if line.strip() else None
        except ValueError:  # a line cut short when the call was stopped
            print(f"gpu_report: {path}:{number}: not readable as JSON: left out", file=sys.stderr)
    step, e2e = read_json(os.path.join(args.work, "step.json")), read_json(os.path.join(args.work, "e2e.json"))
    result = {
        **(read_json(os.path.join(args.work, "started.json")) or run_facts(args.cpu_smoke)),
        "stages": stages,
        "tests": (read_tests(os.path.join(args.work, "tests.xml"))
                  or read_stopped_tests(args.work)),
        "step": step,
        "e2e": e2e,
    }
    result["targets"] = targets(step, e2e)
    os.makedirs(args.out, exist_ok=True)
    report = render(result, "gpu_check.json")
    write_json(os.path.join(args.out, "gpu_check.json"), result)
    atomic_write_text(os.path.join(args.out, "gpu_check.md"), report)
    print(report)
    failed = [s["stage"] for s in stages if s["rc"] != 0]
    if failed:
        print(f"gpu_report: stages that failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed or not stages else 0


def fmt(value, spec=",.0f"):
    return "n/a" if value is None else format(value, spec)


def render(result, source):
    env = result["environment"]
    lines = [f"Measured {result['date']} on **{env.get('gpu', 'no GPU')}** "
             f"({env.get('gpu_memory_gib', '?')} GiB, driver {env.get('driver') or '?'}, {env.get('cpu_cores')} CPU cores), "
             f"torch {env.get('torch')}, commit {short_commit(result.get('commit'))}; source: `{source}`"
             + (" (CPU smoke run: checks the scripts, measures nothing)" if result["kind"] == "cpu-smoke" else "") + ".",
             ""]
    if result.get("stages"):
        lines += ["Stages: " + "; ".join(
            f"{st['stage']} exit {st['rc']} in {st['seconds']} s of {st['budget']}"
            + (" (stopped at its time budget)" if st["rc"] in (124, 137) else "") for st in result["stages"]) + ".", ""]
    tests = result.get("tests")
    if tests:
        stopped = " (the stage was stopped before pytest ended: the tests that finished, from its log)" \
            if tests.get("stopped") else ""
        lines += [f"**Correctness on the device** (`pytest -m gpu`): {tests['passed']} passed, {tests['failed']} "
                  f"failed{stopped}.", "",
                  "| test | outcome | s | measured |", "|---|---|---|---|"]
        for case in tests["cases"]:
            props = ", ".join(f"{k} {float(v):.3g}" if re.fullmatch(r"[-+0-9.e]+", v) else f"{k} {v}"
                              for k, v in case["properties"].items())
            lines.append(f"| {case['name']} | {case['outcome']} | {fmt(case['seconds'], '.1f')} | {props} |")
        lines.append("")
    step = result.get("step")
    if step:
        peak = step.get("bf16_peak_tflops")
        lines += [f"**One training step** (`scripts/bench_step.py`, {step['model']} random init, bf16 autocast, "
                  f"texts of {step['caption_tokens']} tokens, {step['steps']} timed steps after {step['warmup']}):", "",
                  "| step | batch | samples/s | peak GiB | TFLOP/s | % of bf16 peak | x naive |", "|---|---|---|---|---|---|---|"]
        for case in step["cases"]:
            if case.get("oom"):
                lines.append(f"| {case['step']} | {case['batch']:,} | out of memory | | | | |")
                continue
            naive = step_case(step, "naive", case["batch"])
            ratio = fmt(case["samples_per_s"] / naive["samples_per_s"], ".2f") if naive else "n/a"
            share = fmt(100 * case["tflops"] / peak, ".1f") if peak else "n/a"
            lines.append(f"| {case['step']} | {case['batch']:,} | {fmt(case['samples_per_s'])} | "
                         f"{fmt(case.get('peak_gib'), '.1f')} | {fmt(case['tflops'], '.3g')} | {share} | {ratio} |")
        lines.append("")
        profiled = [c for c in step["cases"] if c.get("profile")]
        if profiled:
            lines += [f"Where a step's time goes (`bench_step.py --profile`: {profiled[0]['profile']['steps']} steps under "
                      f"torch.profiler; {profiled[0]['profile']['time']} time by kind; busy: the GPU's share of the "
                      f"profiled wall time):", "",
                      "| step | batch | busy % | matmul % | attention % | optimizer % | other % | longest |",
                      "|---|---|---|---|---|---|---|---|"]
            for case in profiled:
                prof = case["profile"]
                kinds = " | ".join(fmt(prof["by_kind_pct"].get(k), ".0f") for k in ("matmul", "attention", "optimizer", "other"))
                longest = prof["top"][0] if prof["top"] else None
                longest = f"`{longest['name'][:60]}` {longest['pct']:.0f}%" if longest else ""
                lines.append(f"| {case['step']} | {case['batch']:,} | {fmt(prof.get('busy_pct'), '.0f')} | {kinds} | {longest} |")
            lines.append("")
    e2e = result.get("e2e")
    if e2e:
        lines += [f"**End to end** (`scripts/bench_e2e.py`: `torchrun -m open_clip_train.main` on 1 GPU, {e2e['model']}, "
                  f"batch {e2e['batch']:,}, {e2e['workers']} data workers, {e2e['precision']}, {e2e['samples']:,} "
                  f"synthetic LAION-like samples on local disk; open_clip's own samples/s over steps "
                  f"{e2e['skip_steps'] + 1}-{e2e['steps']}, data waits included):", "",
                  "| run | samples/s | x stock | Data (t) % | GPU util % | GPU memory in use, max GiB | exit |",
                  "|---|---|---|---|---|---|---|"]
        stock = e2e["cases"].get("stock", {}).get("samples_per_s")
        for name, case in e2e["cases"].items():
            ratio = case["samples_per_s"] / stock if stock and case.get("samples_per_s") else None
            rate = fmt(case.get("samples_per_s")) if "images_per_s" not in case else f"{fmt(case.get('images_per_s'))} images/s"
            label = {"stock": "stock `--lock-image`, JPEG + caption", "paraclip": "`--paraclip-loss`, JPEG",
                     "embed": "`embed_images.py` (whole run, start-up included)",
                     "embed-float32": "`embed_images.py --transfer float32` (whole run, start-up included)",
                     "cached": "`--paraclip-loss --image-embeddings`",
                     "cached+causal": "`--paraclip-loss --image-embeddings --causal-attention`",
                     "cached+compile": "`--paraclip-loss --image-embeddings --torchcompile`",
                     "cached+causal+compile": "`--paraclip-loss --image-embeddings --causal-attention --torchcompile`",
                     "compact": "`--paraclip-loss --image-embeddings`, compact shards",
                     "accum": f"`{case.get('flags', '')}`, {case.get('batch', 0):,} per optimizer step"}.get(name, name)
            lines.append(f"| {label} | {rate} | {fmt(ratio, '.2f')} | {fmt(case.get('data_wait_pct'), '.0f')} "
                         f"| {fmt(case.get('gpu_util_mean_pct'), '.0f')} "
                         f"| {fmt(case.get('gpu_memory_max_gib'), '.1f')} | {case['exit']} |")
        lines += ["", "Data (t) %: open_clip's data timer's share of the step time. It also holds the GPU finishing "
                      "the step before (open_clip's per-step log line waits for it), so with the GPU busy the step is "
                      "the bound, not the loader. `embed_images.py` rows: its main process waiting for its data workers.",
                  ""]
    lines += ["**Targets:**", "", "| target | measured | goal | met | |", "|---|---|---|---|---|"]
    for t in result["targets"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        value = t["value"]
        if isinstance(value, int) and not isinstance(value, bool):
            value = f"{value:,}"
        elif value is None or isinstance(value, float):
            value = fmt(value, ",.0f" if value is not None and value >= 100 else ",.2f")
        lines.append(f"| {t['target']} | {value} | {t['goal']} | {met} | {t['note']} |")
    return "\n".join(lines) + "\n"


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def filed_benchmarks():
    """benchmarks/*.json, oldest first."""
    return sorted(glob.glob(os.path.join(BENCHMARKS, "*.json")), key=lambda p: read_json(p)["date"])


def readme_section():
    """The newest call per GPU kind, each with its file (older calls stay in theirs)."""
    newest = {read_json(p)["environment"].get("gpu"): p for p in filed_benchmarks()}
    if not newest:
        return "No GPU measurement is filed in `benchmarks/` yet.\n"
    return "\n".join(render(read_json(p), os.path.relpath(p, REPO)) for p in newest.values())


def update_readme(_args=None):
    text = open(PAGE).read()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"gpu_report: {PAGE} has no {BEGIN} ... {END} section")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{readme_section()}{END}{tail}"
    if new != text:
        atomic_write_text(PAGE, new)
    return 0


def publish(args):
    result = read_json(args.result)
    if result is None or result["kind"] != "gpu":
        raise SystemExit(f"gpu_report: {args.result} is not the result of a GPU run")
    name = f"{slug(result['environment'].get('gpu', 'gpu'))}-{result['date'][:10]}-{result['date'][11:16].replace(':', '')}"
    os.makedirs(BENCHMARKS, exist_ok=True)
    report = f"# {result['environment'].get('gpu')}, {result['date']}\n\n" + render(result, f"{name}.json")
    write_json(os.path.join(BENCHMARKS, f"{name}.json"), result)
    atomic_write_text(os.path.join(BENCHMARKS, f"{name}.md"), report)
    print(f"benchmarks/{name}.json, benchmarks/{name}.md")
    return update_readme()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--work", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--cpu-smoke", action="store_true")
    st = sub.add_parser("started")
    st.add_argument("--work", required=True)
    st.add_argument("--cpu-smoke", action="store_true")
    pub = sub.add_parser("publish")
    pub.add_argument("result")
    sub.add_parser("readme")
    args = p.parse_args(argv)
    return {"started": started, "collect": collect, "publish": publish, "readme": update_readme}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
