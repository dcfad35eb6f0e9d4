"""The demo's before/after report: a table on the terminal, ``results.json`` and ``results.png``.

Inputs are one or more runs ``(seed, before, after)``, where before and after are results of
``paraclip-eval paraphrased-retrieval`` (dicts or paths to its JSON output) for the checkpoint before
ParaCLIP fine-tuning and the one after, and the training loss curves as ``{run name: [(step, loss), ...]}``.
Over several runs the table and chart give the mean and the range (smallest, largest run). Nothing here
asserts a number: it reports what was measured.
"""
import json
import os
import sys

from ..shards import atomic_write_text

RESULTS_FILE = "results.json"
CHART_FILE = "results.png"


def load_result(result):
    """A result dict, read from its JSON file when given a path."""
    if isinstance(result, (str, os.PathLike)):
        with open(result) as f:
            return json.load(f)
    return result


def metric_rows(result):
    """[(label, value)] in table order: the rank-similarity metrics, then recall for both query kinds."""
    k = result["k"]
    rows = [(f"AO@{k}", result[f"AO@{k}"]), (f"JS@{k}", result[f"JS@{k}"])]
    for kind in ("original", "paraphrased"):
        rows += [(f"{name} {kind}", value) for name, value in result[kind].items()]
    return rows


def change_rows(before, after):
    """{label: after - before} for every metric row."""
    return {label: new - old for (label, old), (_, new) in zip(metric_rows(before), metric_rows(after))}


def spread(rows):
    """{label: (mean, min, max)} over runs, from one {label: value} dict per run."""
    return {label: (sum(r[label] for r in rows) / len(rows), min(r[label] for r in rows), max(r[label] for r in rows))
            for label in rows[0]}


def summarize_runs(runs):
    """(before, after, change), each {label: (mean, min, max)} over ``runs`` = [(seed, before, after), ...]."""
    return (spread([dict(metric_rows(b)) for _, b, _ in runs]), spread([dict(metric_rows(a)) for _, _, a in runs]),
            spread([change_rows(b, a) for _, b, a in runs]))


def _cell(stats, width, sign=""):
    mean, low, high = stats
    text = f"{mean:{sign}.3f}" if low == high else f"{mean:{sign}.3f} [{low:{sign}.2f}, {high:{sign}.2f}]"
    return f"{text:>{width}}"


def format_table(runs, names=("before", "after")):
    """Plain-text table: one metric per line, before, after and the change; over several runs the mean
    and, in brackets, the smallest and largest value of the runs."""
    before, after, change = summarize_runs(runs)
    label_width = max(len(label) for label in before) + 2
    column = max(8, *(len(n) + 2 for n in names)) if len(runs) == 1 else 24
    lines = [f"{'metric':<{label_width}}{names[0]:>{column}}{names[1]:>{column}}{'change':>{column}}"]
    for label in before:
        lines.append(f"{label:<{label_width}}{_cell(before[label], column)}{_cell(after[label], column)}"
                     f"{_cell(change[label], column, '+')}")
    if len(runs) > 1:
        lines.append(f"mean over {len(runs)} runs (seeds {', '.join(str(seed) for seed, _, _ in runs)}), "
                     f"[smallest, largest] run")
    k = runs[0][1]["k"]
    for kind in ("paraphrased", "original"):
        ratios = [a[kind][f"recall@{k}"] / b[kind][f"recall@{k}"] if b[kind][f"recall@{k}"] else float("inf")
                  for _, b, a in runs]
        lines.append(f"recall@{k} {kind}, after / before: " + ", ".join(f"{r:.2f}x" for r in ratios))
    return "\n".join(lines)


def chart_metrics(result):
    """The bars of the chart: AO@k, JS@k and recall@1/5/10 for original and paraphrased queries."""
    k = result["k"]
    bars = {f"AO@{k}": result[f"AO@{k}"], f"JS@{k}": result[f"JS@{k}"]}
    for kind, short in (("original", "orig."), ("paraphrased", "para.")):
        bars.update({f"{name.replace('recall', 'R')}\n{short}": value for name, value in result[kind].items()})
    return bars


def plot_chart(runs, loss_curves, path, names=("before", "after")):
    """Write a PNG: grouped before/after bars with the runs' range as error bars (left), training losses (right)."""
    # The Agg canvas directly, without pyplot: no global figure state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 4.6), layout="constrained")
    FigureCanvasAgg(figure)
    bars, losses = figure.subplots(1, 2, width_ratios=(3, 2))
    labels = list(chart_metrics(runs[0][1]))
    width = 0.38
    for offset, name, side in ((-width / 2, names[0], 1), (width / 2, names[1], 2)):
        per_run = [list(chart_metrics(run[side]).values()) for run in runs]
        means = [sum(values) / len(values) for values in zip(*per_run)]
        spread = [[m - min(v) for m, v in zip(means, zip(*per_run))], [max(v) - m for m, v in zip(means, zip(*per_run))]]
        drawn = bars.bar([i + offset for i in range(len(labels))], means, width, label=name,
                         yerr=spread if len(runs) > 1 else None, capsize=3)
        bars.bar_label(drawn, fmt="%.2f", fontsize=7, padding=2)
    bars.set_xticks(range(len(labels)), labels, fontsize=8)
    bars.set_ylim(0, 1.12)
    first = runs[0][1]
    over = f", mean of {len(runs)} runs, bars: range" if len(runs) > 1 else ""
    bars.set_title(f"Paraphrased retrieval ({first['num_pairs']} pairs, {first['num_images']} images{over})")
    bars.legend(loc="upper left")

    for run, curve in loss_curves.items():
        if curve:
            steps, values = zip(*curve)
            losses.plot(steps, values, label=run, linewidth=1)
    losses.set_xlabel("step")
    losses.set_ylabel("training loss")
    losses.set_title("Training loss (each run's own loss)")
    if loss_curves:
        losses.legend(fontsize=7)

    partial = f"{path}.partial"
    figure.savefig(partial, format="png", dpi=110)
    os.replace(partial, path)


def _checked_curve(run, curve):
    """``[(step, loss), ...]`` as a list of pairs, or a TypeError that says what was passed instead."""
    points = list(curve)
    if not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in points):
        raise TypeError(f"loss curve {run!r} must be a list of (step, loss) pairs, got {points[:3]!r}...")
    return points


def write_report(runs, loss_curves, out_dir, names=("before", "after"), stream=sys.stdout):
    """Print the table to ``stream`` and write ``results.json`` and ``results.png`` in ``out_dir``.

    ``runs`` is ``[(seed, before, after), ...]``, one entry per run. Returns
    ``{"table": str, "results": path, "chart": path}``.
    """
    if not runs:
        raise ValueError("no runs to report")
    runs = [(seed, load_result(before), load_result(after)) for seed, before, after in runs]
    loss_curves = {run: _checked_curve(run, curve) for run, curve in loss_curves.items()}
    for seed, before, after in runs:
        if before["k"] != after["k"] or before["k"] != runs[0][1]["k"]:
            raise ValueError(f"results use different k: {before['k']} and {after['k']} (seed {seed})")
    os.makedirs(out_dir, exist_ok=True)
    table = format_table(runs, names)
    print(table, file=stream)
    summary = dict(zip(("before", "after", "change"), summarize_runs(runs)))
    results = {
        "names": list(names),
        "runs": [{"seed": seed, "before": b, "after": a, "change": change_rows(b, a)} for seed, b, a in runs],
        # mean, smallest and largest value over the runs, per metric
        "summary": {side: {label: dict(zip(("mean", "min", "max"), stats)) for label, stats in rows.items()}
                    for side, rows in summary.items()},
        "loss_curves": {run: [[step, loss] for step, loss in curve] for run, curve in loss_curves.items()},
    }
    results_path = os.path.join(out_dir, RESULTS_FILE)
    atomic_write_text(results_path, json.dumps(results, indent=1) + "\n")
    chart_path = os.path.join(out_dir, CHART_FILE)
    plot_chart(runs, loss_curves, chart_path, names)
    return {"table": table, "results": results_path, "chart": chart_path}
