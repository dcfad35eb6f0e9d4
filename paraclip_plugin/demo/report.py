"""The demo's before/after report: a table on the terminal, ``results.json`` and ``results.png``.

Inputs are two results of ``paraclip-eval paraphrased-retrieval`` (dicts or paths to its JSON output),
one for the checkpoint before ParaCLIP fine-tuning and one after, and the training loss curves as
``{run name: [(step, loss), ...]}``. Nothing here asserts a number: it reports what was measured.
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


def format_table(before, after, names=("before", "after")):
    """Plain-text table: one metric per line, both values and the change, three decimals."""
    label_width = max(len(label) for label, _ in metric_rows(before)) + 2
    column = max(8, *(len(n) + 2 for n in names))
    lines = [f"{'metric':<{label_width}}{names[0]:>{column}}{names[1]:>{column}}{'change':>{column}}"]
    for (label, old), (_, new) in zip(metric_rows(before), metric_rows(after)):
        lines.append(f"{label:<{label_width}}{old:>{column}.3f}{new:>{column}.3f}{new - old:>+{column}.3f}")
    return "\n".join(lines)


def chart_metrics(result):
    """The bars of the chart: AO@k, JS@k and recall@1 for original and paraphrased queries."""
    k = result["k"]
    return {f"AO@{k}": result[f"AO@{k}"], f"JS@{k}": result[f"JS@{k}"],
            "R@1 original": result["original"]["recall@1"], "R@1 paraphrased": result["paraphrased"]["recall@1"]}


def plot_chart(before, after, loss_curves, path, names=("before", "after")):
    """Write a PNG: grouped before/after bars (left) and every run's training loss against step (right)."""
    # The Agg canvas directly, without pyplot: no global figure state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    bars, losses = figure.subplots(1, 2, width_ratios=(3, 2))
    labels = list(chart_metrics(before))
    width = 0.38
    for offset, name, result in ((-width / 2, names[0], before), (width / 2, names[1], after)):
        values = list(chart_metrics(result).values())
        drawn = bars.bar([i + offset for i in range(len(labels))], values, width, label=name)
        bars.bar_label(drawn, fmt="%.2f", fontsize=8)
    bars.set_xticks(range(len(labels)), labels)
    bars.set_ylim(0, 1.1)
    bars.set_title(f"Paraphrased retrieval ({before['num_pairs']} pairs, {before['num_images']} images)")
    bars.legend(loc="upper left")

    for run, curve in loss_curves.items():
        if curve:
            steps, values = zip(*curve)
            losses.plot(steps, values, label=run)
    losses.set_xlabel("step")
    losses.set_ylabel("training loss")
    losses.set_title("Training loss (each run's own loss)")
    if loss_curves:
        losses.legend()

    partial = f"{path}.partial"
    figure.savefig(partial, format="png", dpi=110)
    os.replace(partial, path)


def _checked_curve(run, curve):
    """``[(step, loss), ...]`` as a list of pairs, or a TypeError that says what was passed instead."""
    points = list(curve)
    if not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in points):
        raise TypeError(f"loss curve {run!r} must be a list of (step, loss) pairs, got {points[:3]!r}...")
    return points


def write_report(before, after, loss_curves, out_dir, names=("before", "after"), stream=sys.stdout):
    """Print the table to ``stream`` and write ``results.json`` and ``results.png`` in ``out_dir``.

    Returns ``{"table": str, "results": path, "chart": path}``.
    """
    before, after = load_result(before), load_result(after)
    loss_curves = {run: _checked_curve(run, curve) for run, curve in loss_curves.items()}
    if before["k"] != after["k"]:
        raise ValueError(f"results use different k: {before['k']} and {after['k']}")
    os.makedirs(out_dir, exist_ok=True)
    table = format_table(before, after, names)
    print(table, file=stream)
    results = {
        "names": list(names),
        "before": before,
        "after": after,
        "change": {label: new - old for (label, old), (_, new) in zip(metric_rows(before), metric_rows(after))},
        "loss_curves": {run: [[step, loss] for step, loss in curve] for run, curve in loss_curves.items()},
    }
    results_path = os.path.join(out_dir, RESULTS_FILE)
    atomic_write_text(results_path, json.dumps(results, indent=1) + "\n")
    chart_path = os.path.join(out_dir, CHART_FILE)
    plot_chart(before, after, loss_curves, chart_path, names)
    return {"table": table, "results": results_path, "chart": chart_path}
