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

from paraclip_plugin.data.atomic import atomic_write_text

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
        cases.append(
            {"name": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0)), "properties": props}
        )
    return tests_summary(cases)


def tests_summary(cases, **extra):
    count = lambda o: sum(c["outcome"] == o for c in cases)  # noqa: E731
    return {
        "passed": count("passed"),
        "failed": count("failed") + count("error"),
        "skipped": count("skipped"),
        "cases": cases,
        **extra,
    }


# pytest -v's line per finished test: what is left of a tests stage stopped before pytest wrote its junit xml
VERBOSE_RE = re.compile(r"^\S+::(\S+) (PASSED|FAILED|ERROR|SKIPPED)\b", re.M)


def read_stopped_tests(work):
    """A tests stage stopped before pytest wrote ``tests.xml`` (its time budget): the tests that finished,
    {"passed", "failed", "skipped", "cases", "stopped": True}. From pytest_parallel.py's parts: process
    K's junit xml (``tests-K.xml``) where it wrote one, else the tests its ``pytest -v`` log
    (``logs/tests-K.log``) shows finished; or from ``logs/tests.log`` (a plain pytest run)."""
    logs = os.path.join(work, "logs")
    # each process's log exists until pytest_parallel.py has written tests.xml
    parts = sorted(
        int(re.search(r"tests-(\d+)\.log$", path).group(1)) for path in glob.glob(os.path.join(logs, "tests-*.log"))
    )
    sources = [(os.path.join(work, f"tests-{k}.xml"), os.path.join(logs, f"tests-{k}.log")) for k in parts]
    if not sources and not os.path.exists(os.path.join(logs, "tests.log")):
        return None
    outcome = {"PASSED": "passed", "FAILED": "failed", "ERROR": "error", "SKIPPED": "skipped"}
    cases = []
    for xml, log in sources or [(None, os.path.join(logs, "tests.log"))]:
        if xml and os.path.exists(xml):
            cases += read_tests(xml)["cases"]
        elif os.path.exists(log):
            cases += [
                {"name": name, "outcome": outcome[word], "seconds": None, "properties": {}}
                for name, word in VERBOSE_RE.findall(open(log, errors="replace").read())
            ]
    return tests_summary(cases, stopped=True)


def environment():
    env = {"python": platform.python_version(), "cpu_cores": os.cpu_count()}
    try:
        import torch

        env["torch"] = torch.__version__
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name()
            env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    except ImportError:
        pass
    try:
        env["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        pass
    return env


def short_commit(commit):
    """'a3421b4b43a1+changes' -> 'a3421b4b43+changes' (gpu_check.sh marks a tree that differs from its commit)."""
    sha, plus, rest = (commit or "?").partition("+")
    return sha[:10] + plus + rest


def step_case(step, name, batch, longest=None):
    """The case of that step at that batch (and longest text, where the file has text-length settings)."""
    for case in (step or {}).get("cases", []):
        if case["step"] == name and case["batch"] == batch and not case.get("oom") and case.get("longest") == longest:
            return case
    return None


# the figures' conditions, by case
STEP_RUNS = {
    "naive": "images through the image tower (no grad) + 3 separate text forwards at the full 77-token context",
    "plugin-img": "images through the frozen image tower (forward included) + 1 fused text forward cut to the "
    "batch's longest text",
    "plugin-emb": "cached image embeddings (no image tower; the embedding pass not counted) + 1 fused text "
    "forward cut to the batch's longest text",
}


def step_conditions(name):
    kind, *modifiers = name.split("+")
    return f"{STEP_RUNS.get(kind, kind)}; {'torch.compile' if 'compile' in modifiers else 'eager'}" + (
        "; causal SDPA (FlashAttention)" if "causal" in modifiers else ""
    )


E2E_RUNS = {
    "stock": "stock open_clip `--lock-image`: JPEGs decoded by the data workers each step, image tower "
    "forward (no grad), 1 text at the full 77-token context; eager",
    "paraclip": "`--paraclip-loss` from JPEGs: decoded each step, frozen image tower forward, 3 texts in "
    "one forward cut to the longest; eager",
    "embed": "`embed_images.py`, the one-time pass that makes the cached shards: decoding + image tower over "
    "every setting's shards; images/s over the whole run, start-up included",
    "embed-float32": "`embed_images.py --transfer float32`, as embed",
    "cached": "`--paraclip-loss --image-embeddings`: cached embeddings (the embedding pass not counted: see "
    "embed and *When the cache pays*), no image decoding or tower, texts cut to the longest",
    "compact": "cached embeddings from compact shards (the embedding pass not counted), texts cut to the longest",
    "accum": "cached embeddings, one optimizer step per --accum-freq micro-batches",
}


def e2e_conditions(name, case):
    kind = name.split("@")[0]
    base, *flags = kind.split("+")
    text = E2E_RUNS.get(base, kind)
    if base in ("cached", "compact", "accum"):
        text += "; " + ("torch.compile" if "compile" in flags or "--torchcompile" in case.get("flags", "") else "eager")
        if "causal" in flags or "--causal-attention" in case.get("flags", ""):
            text += ", causal SDPA"
    if base == "accum":
        blocks = re.search(r"--paraclip-loss-block-size (\d+)", case.get("flags", ""))
        text += f"; {case.get('batch', 0):,} per optimizer step; " + (
            f"loss in blocks of {int(blocks.group(1)):,} rows" if blocks else "loss unblocked"
        )
    return text


def best_cached(cases, longest):
    """The fastest --paraclip-loss --image-embeddings run at that setting: (key, samples/s), or (None, None)."""
    runs = {
        k: c["samples_per_s"]
        for k, c in cases.items()
        if c.get("samples_per_s")
        and c.get("longest") == longest
        and (k.startswith("cached") or k.startswith("compact"))
    }
    best = max(runs, key=runs.get, default=None)
    return best, runs.get(best)


def embed_rate(cases):
    """The embedding pass: (steady images/s after start-up, start-up seconds), from the embed run."""
    embed = cases.get("embed") or {}
    if embed.get("exit") != 0 or not embed.get("images"):
        return None, None
    if embed.get("after_startup_s"):
        return embed["images"] / embed["after_startup_s"], embed["seconds"] - embed["after_startup_s"]
    return embed.get("images_per_s"), None


def cache_pays(e2e, longest):
    """'When the cache pays' at that setting: rows (label, passes, x stock, x ParaCLIP from JPEGs) from the
    measured rates, and the passes from which the cached path is faster than stock; None where not measured."""
    cases = (e2e or {}).get("cases", {})
    stock = cases.get(f"stock@{longest}", {}).get("samples_per_s")
    jpeg = cases.get(f"paraclip@{longest}", {}).get("samples_per_s")
    which, cached = best_cached(cases, longest)
    embed, startup = embed_rate(cases)
    if not (cached and embed and (stock or jpeg)):
        return None
    ratio = lambda base, k: None if not base else (k / base) / (1 / embed + k / cached)  # noqa: E731
    rows = [
        ("one epoch (the paper's recipe)", 1),
        ("Table 2 sweep: 7 runs on the same data and base model", 7),
        ("several base models: an embedding pass per model, so per model as above (one epoch each)", 1),
    ]
    even = None if not stock or 1 / stock <= 1 / cached else (1 / embed) / (1 / stock - 1 / cached)
    return {
        "longest": longest,
        "cached": which,
        "stock": stock,
        "jpeg": jpeg,
        "cached_rate": cached,
        "embed_rate": embed,
        "embed_startup_s": startup,
        "break_even_passes": even,
        "rows": [(label, k, ratio(stock, k), ratio(jpeg, k)) for label, k in rows],
    }


def targets(step, e2e):
    """Each target of the fast path: value, goal, met (None where not measured); a row per text-length
    setting (the headline first)."""
    out = []

    def add(name, value, goal, met, note=""):
        out.append({"target": name, "value": value, "goal": goal, "met": met, "note": note})

    def ratio_target(name, goal, floor, case, base, note):
        if case and base:
            r = case["samples_per_s"] / base["samples_per_s"]
            add(
                name,
                round(r, 2),
                goal,
                r >= floor,
                f"{note}: {case['samples_per_s']:,.0f} vs {base['samples_per_s']:,.0f} samples/s",
            )
        else:
            add(name, None, goal, None, "not measured")

    for longest in (step or {}).get("text_lengths") or [40]:
        naive = step_case(step, "naive", 1024, longest)
        ratio_target(
            f"step from images vs naive, batch 1,024, longest text {longest}",
            ">= 3x",
            3,
            step_case(step, "plugin-img+causal+compile", 1024, longest),
            naive,
            "plugin-img+causal+compile (frozen tower forward included)",
        )
        cached = [
            c
            for c in (step or {}).get("cases", [])
            if c["step"].startswith("plugin-emb")
            and c["batch"] == 1024
            and c.get("longest") == longest
            and not c.get("oom")
        ]
        best = max(cached, key=lambda c: c["samples_per_s"], default=None)
        ratio_target(
            f"step from cached embeddings vs naive, batch 1,024, longest text {longest}",
            ">= 4x",
            4,
            best,
            naive,
            f"{best['step'] if best else ''} (no image tower; the embedding pass not counted)",
        )
    big = [c for c in (step or {}).get("cases", []) if c["batch"] == 3072 and c["step"] != "naive"]
    if big:
        fits = [c for c in big if not c.get("oom") and c.get("peak_gib") is not None]
        worst = max((c["peak_gib"] for c in fits), default=None)
        add(
            "plugin step at batch 3,072: peak GPU memory",
            worst,
            "< 80 GiB",
            bool(fits) and len(fits) == len(big) and worst < 80,
            ", ".join(f"{c['step']} {'OOM' if c.get('oom') else format(c.get('peak_gib') or 0, '.1f')}" for c in big),
        )
    cases = (e2e or {}).get("cases", {})
    for longest in (e2e or {}).get("text_lengths") or [40]:
        stock, jpeg = cases.get(f"stock@{longest}"), cases.get(f"paraclip@{longest}")
        which, rate = best_cached(cases, longest)
        cached = {"samples_per_s": rate} if rate else None
        add(
            f"end to end, cached embeddings: samples/s, longest text {longest}",
            rate,
            ">= 10,000",
            None if rate is None else rate >= 10000,
            f"{which} (the embedding pass not counted)" if which else "not measured",
        )
        ratio_target(
            f"end to end, cached vs stock, longest text {longest}",
            ">= 4x",
            4,
            cached,
            stock,
            f"{which} (the embedding pass not counted)",
        )
        ratio_target(
            f"end to end, ParaCLIP from JPEGs vs stock, longest text {longest}", ">= 0.9x", 0.9, jpeg, stock, "paraclip"
        )
        pays = cache_pays(e2e, longest)
        epoch = pays and pays["rows"][0][2]
        add(
            f"one epoch, the embedding pass included, vs stock, longest text {longest}",
            None if epoch is None else round(epoch, 2),
            ">= 2x",
            None if epoch is None else epoch >= 2,
            "computed from this call's rates (embed's steady rate, the fastest cached run, stock), not one timed run"
            if epoch is not None
            else "not measured",
        )
        accum = cases.get(f"accum@{longest}")
        if accum or longest == 40:
            name = (
                f"{(accum or {}).get('batch', 32768):,} per optimizer step, longest text {longest}: peak "
                f"torch.cuda.max_memory_allocated"
            )
            peak = (accum or {}).get("peak_allocated_gib")
            if not accum:
                add(name, None, "< 75 GiB", None, "not measured")
            else:
                ran = accum["exit"] == 0 and accum.get("optimizer_steps", 0) >= 1
                add(
                    name,
                    peak,
                    "< 75 GiB",
                    None if peak is None and ran else ran and peak is not None and peak < 75,
                    f"exit {accum['exit']}, {accum.get('optimizer_steps')} optimizer steps; {accum.get('flags', '')}"
                    + (
                        f"; in use with the allocator's cache (nvidia-smi) max {accum['gpu_memory_max_gib']} GiB"
                        if accum.get("gpu_memory_max_gib") is not None
                        else ""
                    ),
                )
    return out


def range_text(case):
    low_high = case.get("range_samples_per_s")
    return "n/a" if not low_high else f"{low_high[0]:,.0f}-{low_high[1]:,.0f}"


def render_step(step):
    """The step table of a file with text-length settings: every figure with its conditions."""
    peak = step.get("bf16_peak_tflops")
    lines = [
        f"**One training step** (`scripts/bench_step.py`, {step['model']} random init, bf16 autocast; the batch "
        f"already on the device: no data loading; {step['steps']} timed steps after {step['warmup']} untimed "
        f"(compilation happens there and is not counted); texts: longest {', '.join(map(str, step['text_lengths']))} "
        f"tokens, each text's length {step['text_length_distribution']}; x naive: the naive step at the same "
        f"batch and texts, in this call):",
        "",
        "| step | batch | longest text | texts in the batch (tokens) | tower ran (tokens) | samples/s | peak GiB "
        "(max_memory_allocated) | TFLOP/s | % of bf16 peak | x naive |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in step["cases"]:
        tokens = case.get("text_tokens") or {}
        head = (
            f"| {case['step']} | {case['batch']:,} | {case.get('longest')} | "
            f"{tokens.get('batch_shortest')}-{tokens.get('batch_longest')} | {tokens.get('tower_ran')} |"
        )
        if case.get("oom"):
            lines.append(f"{head} out of memory | | | | |")
            continue
        naive = step_case(step, "naive", case["batch"], case.get("longest"))
        ratio = fmt(case["samples_per_s"] / naive["samples_per_s"], ".2f") if naive else "n/a"
        share = fmt(100 * case["tflops"] / peak, ".1f") if peak else "n/a"
        lines.append(
            f"{head} {fmt(case['samples_per_s'])} | {fmt(case.get('peak_gib'), '.1f')} | "
            f"{fmt(case['tflops'], '.3g')} | {share} | {ratio} |"
        )
    names = list(dict.fromkeys(c["step"] for c in step["cases"]))
    lines += ["", "What each step runs: " + "; ".join(f"**{n}**: {step_conditions(n)}" for n in names) + ".", ""]
    return lines


def render_e2e(e2e):
    """The end-to-end table of a file with text-length settings: median and range of the windows, conditions."""
    measured = (e2e.get("shards") or {}).get("text_tokens") or {}
    held = "; ".join(f"{k}: {v['shortest']}-{v['longest']}" for k, v in measured.items())
    lines = [
        f"**End to end** (`scripts/bench_e2e.py`: `torchrun -m open_clip_train.main` on 1 GPU, {e2e['model']}, "
        f"batch {e2e['batch']:,}, {e2e['workers']} data workers, {e2e['precision']}, {e2e['samples']:,} synthetic "
        f"LAION-like samples per text-length setting on local disk; texts: longest "
        f"{', '.join(map(str, e2e['text_lengths']))} tokens, each text's length {e2e['text_length_distribution']}"
        + (f" (tokens the shards hold, by setting: {held})" if held else "")
        + f"; samples/s: open_clip's own, steps {e2e['skip_steps'] + 1}-{e2e['steps']} in {e2e['windows']} "
        f"windows, their median and range, data waits included; x stock: stock at the same texts, this call):",
        "",
        "| run | longest text | samples/s (median) | range | x stock | Data (t) % | GPU util % | peak GiB "
        "(max_memory_allocated) | in use, max GiB (nvidia-smi) | exit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, case in e2e["cases"].items():
        longest = case.get("longest")
        stock = e2e["cases"].get(f"stock@{longest}", {}).get("samples_per_s")
        if "images_per_s" in case:
            rate = f"{fmt(case.get('images_per_s'))} images/s"
            if case.get("after_startup_s"):
                rate += f" ({fmt(case['images'] / case['after_startup_s'])} after {case['seconds'] - case['after_startup_s']:.0f} s start-up)"
            ratio = "n/a"
        else:
            rate = fmt(case.get("samples_per_s"))
            ratio = (
                fmt(case["samples_per_s"] / stock, ".2f")
                if stock and case.get("samples_per_s")
                else "n/a"
                if name.startswith("stock")
                else f"n/a (no stock@{longest})"
            )
        lines.append(
            f"| {name} | {longest or 'all'} | {rate} | {range_text(case)} | {ratio} "
            f"| {fmt(case.get('data_wait_pct'), '.0f')} | {fmt(case.get('gpu_util_mean_pct'), '.0f')} "
            f"| {fmt(case.get('peak_allocated_gib'), '.1f')} | {fmt(case.get('gpu_memory_max_gib'), '.1f')} "
            f"| {case['exit']} |"
        )
    runs = {name.split("@")[0]: e2e_conditions(name, case) for name, case in e2e["cases"].items()}
    lines += [
        "",
        "What each run is: " + "; ".join(f"**{name}**: {text}" for name, text in runs.items()) + ".",
        "",
        "Data (t) %: open_clip's data timer's share of the step time. It also holds the GPU finishing "
        "the step before (open_clip's per-step log line waits for it), so with the GPU busy the step is "
        "the bound, not the loader. `embed_images.py` rows: its main process waiting for its data workers.",
        "",
    ]
    for longest in e2e["text_lengths"]:
        pays = cache_pays(e2e, longest)
        if not pays:
            continue
        startup = f" + {pays['embed_startup_s']:.0f} s of start-up per pass" if pays["embed_startup_s"] else ""
        even = (
            f"the cached path overtakes stock from {pays['break_even_passes']:.1f} passes over the data"
            if pays["break_even_passes"]
            else "the cached path is not faster than stock per pass"
        )
        lines += [
            f"**When the cache pays** (longest text {longest}; computed from this call's rates, not timed runs: "
            f"embedding {pays['embed_rate']:,.0f} images/s in steady state{startup}, once per base model and "
            f"data set; {pays['cached']} {pays['cached_rate']:,.0f} samples/s; stock {fmt(pays['stock'])}; "
            f"ParaCLIP from JPEGs {fmt(pays['jpeg'])}; k passes over N samples take N/embed + kN/cached against "
            f"kN/stock; {even}):",
            "",
            "| use | passes over the data per embedding | cached + embedding, x stock | x ParaCLIP from JPEGs |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {label} | {k} | {fmt(vs_stock, '.2f')} | {fmt(vs_jpeg, '.2f')} |"
            for label, k, vs_stock, vs_jpeg in pays["rows"]
        ]
        lines.append("")
    return lines


def run_facts(cpu_smoke):
    """What a result says of its run: kind, date, commit, and the machine it ran on (this one)."""
    return {
        "kind": "cpu-smoke" if cpu_smoke else "gpu",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": os.environ.get("GPU_CHECK_COMMIT"),
        "commit_source": os.environ.get("GPU_CHECK_COMMIT_SOURCE"),
        "environment": environment(),
    }


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
        "tests": (read_tests(os.path.join(args.work, "tests.xml")) or read_stopped_tests(args.work)),
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
    lines = [
        f"Measured {result['date']} on **{env.get('gpu', 'no GPU')}** "
        f"({env.get('gpu_memory_gib', '?')} GiB, driver {env.get('driver') or '?'}, {env.get('cpu_cores')} CPU cores), "
        f"torch {env.get('torch')}, commit {short_commit(result.get('commit'))}; source: `{source}`"
        + (" (CPU smoke run: checks the scripts, measures nothing)" if result["kind"] == "cpu-smoke" else "")
        + ".",
        "",
    ]
    if result.get("stages"):
        lines += [
            "Stages: "
            + "; ".join(
                f"{st['stage']} exit {st['rc']} in {st['seconds']} s of {st['budget']}"
                + (" (stopped at its time budget)" if st["rc"] in (124, 137) else "")
                for st in result["stages"]
            )
            + ".",
            "",
        ]
    tests = result.get("tests")
    if tests:
        stopped = (
            " (the stage was stopped before pytest ended: the tests that finished, from its log)"
            if tests.get("stopped")
            else ""
        )
        lines += [
            f"**Correctness on the device** (`pytest -m gpu`): {tests['passed']} passed, {tests['failed']} "
            f"failed{stopped}.",
            "",
            "| test | outcome | s | measured |",
            "|---|---|---|---|",
        ]
        for case in tests["cases"]:
            props = ", ".join(
                f"{k} {float(v):.3g}" if re.fullmatch(r"[-+0-9.e]+", v) else f"{k} {v}"
                for k, v in case["properties"].items()
            )
            lines.append(f"| {case['name']} | {case['outcome']} | {fmt(case['seconds'], '.1f')} | {props} |")
        lines.append("")
    step = result.get("step")
    if step and "text_lengths" in step:
        lines += render_step(step)
        lines += render_profile(step)
    elif step:
        lines += render_step_v1(step)
    e2e = result.get("e2e")
    if e2e and "text_lengths" in e2e:
        lines += render_e2e(e2e)
    elif e2e:
        lines += render_e2e_v1(e2e)
    lengths = (result.get("step") or {}).get("text_lengths") or (result.get("e2e") or {}).get("text_lengths")
    lines += [
        f"**Targets** (the headline: longest text {lengths[0]}):" if lengths else "**Targets:**",
        "",
        "| target | measured | goal | met | |",
        "|---|---|---|---|---|",
    ]
    for t in result["targets"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        value = t["value"]
        if isinstance(value, int) and not isinstance(value, bool):
            value = f"{value:,}"
        elif value is None or isinstance(value, float):
            value = fmt(value, ",.0f" if value is not None and value >= 100 else ",.2f")
        lines.append(f"| {t['target']} | {value} | {t['goal']} | {met} | {t['note']} |")
    return "\n".join(lines) + "\n"


def render_step_v1(step):
    """The step table of a file from before the text-length settings (one caption-length range)."""
    lines = []
    peak = step.get("bf16_peak_tflops")
    lines += [
        f"**One training step** (`scripts/bench_step.py`, {step['model']} random init, bf16 autocast, "
        f"texts of {step['caption_tokens']} tokens, {step['steps']} timed steps after {step['warmup']}):",
        "",
        "| step | batch | samples/s | peak GiB | TFLOP/s | % of bf16 peak | x naive |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in step["cases"]:
        if case.get("oom"):
            lines.append(f"| {case['step']} | {case['batch']:,} | out of memory | | | | |")
            continue
        naive = step_case(step, "naive", case["batch"])
        ratio = fmt(case["samples_per_s"] / naive["samples_per_s"], ".2f") if naive else "n/a"
        share = fmt(100 * case["tflops"] / peak, ".1f") if peak else "n/a"
        lines.append(
            f"| {case['step']} | {case['batch']:,} | {fmt(case['samples_per_s'])} | "
            f"{fmt(case.get('peak_gib'), '.1f')} | {fmt(case['tflops'], '.3g')} | {share} | {ratio} |"
        )
    lines.append("")
    return lines + render_profile(step)


def render_profile(step):
    lines = []
    profiled = [c for c in step["cases"] if c.get("profile")]
    if profiled:
        lines += [
            f"Where a step's time goes (`bench_step.py --profile`: {profiled[0]['profile']['steps']} steps under "
            f"torch.profiler; {profiled[0]['profile']['time']} time by kind; busy: the GPU's share of the "
            f"profiled wall time):",
            "",
            "| step | batch | busy % | matmul % | attention % | optimizer % | other % | longest |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for case in profiled:
            prof = case["profile"]
            kinds = " | ".join(
                fmt(prof["by_kind_pct"].get(k), ".0f") for k in ("matmul", "attention", "optimizer", "other")
            )
            longest = prof["top"][0] if prof["top"] else None
            longest = f"`{longest['name'][:60]}` {longest['pct']:.0f}%" if longest else ""
            lines.append(
                f"| {case['step']} | {case['batch']:,} | {fmt(prof.get('busy_pct'), '.0f')} | {kinds} | {longest} |"
            )
        lines.append("")
    return lines


def render_e2e_v1(e2e):
    """The end-to-end table of a file from before the text-length settings."""
    lines = []
    lines += [
        f"**End to end** (`scripts/bench_e2e.py`: `torchrun -m open_clip_train.main` on 1 GPU, {e2e['model']}, "
        f"batch {e2e['batch']:,}, {e2e['workers']} data workers, {e2e['precision']}, {e2e['samples']:,} "
        f"synthetic LAION-like samples on local disk; open_clip's own samples/s over steps "
        f"{e2e['skip_steps'] + 1}-{e2e['steps']}, data waits included):",
        "",
        "| run | samples/s | x stock | Data (t) % | GPU util % | GPU memory in use, max GiB | exit |",
        "|---|---|---|---|---|---|---|",
    ]
    stock = e2e["cases"].get("stock", {}).get("samples_per_s")
    for name, case in e2e["cases"].items():
        ratio = case["samples_per_s"] / stock if stock and case.get("samples_per_s") else None
        rate = (
            fmt(case.get("samples_per_s"))
            if "images_per_s" not in case
            else f"{fmt(case.get('images_per_s'))} images/s"
        )
        label = {
            "stock": "stock `--lock-image`, JPEG + caption",
            "paraclip": "`--paraclip-loss`, JPEG",
            "embed": "`embed_images.py` (whole run, start-up included)",
            "embed-float32": "`embed_images.py --transfer float32` (whole run, start-up included)",
            "cached": "`--paraclip-loss --image-embeddings`",
            "cached+causal": "`--paraclip-loss --image-embeddings --causal-attention`",
            "cached+compile": "`--paraclip-loss --image-embeddings --torchcompile`",
            "cached+causal+compile": "`--paraclip-loss --image-embeddings --causal-attention --torchcompile`",
            "compact": "`--paraclip-loss --image-embeddings`, compact shards",
            "accum": f"`{case.get('flags', '')}`, {case.get('batch', 0):,} per optimizer step",
        }.get(name, name)
        lines.append(
            f"| {label} | {rate} | {fmt(ratio, '.2f')} | {fmt(case.get('data_wait_pct'), '.0f')} "
            f"| {fmt(case.get('gpu_util_mean_pct'), '.0f')} "
            f"| {fmt(case.get('gpu_memory_max_gib'), '.1f')} | {case['exit']} |"
        )
    lines += [
        "",
        "Data (t) %: open_clip's data timer's share of the step time. It also holds the GPU finishing "
        "the step before (open_clip's per-step log line waits for it), so with the GPU busy the step is "
        "the bound, not the loader. `embed_images.py` rows: its main process waiting for its data workers.",
        "",
    ]
    return lines


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
