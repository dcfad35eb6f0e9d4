"""The demo's before/after report: a table on the terminal, ``results.json`` and ``results.png``.

Inputs are one or more runs ``(seed, before, after, *more)``: results of ``paraclip-eval
paraphrased-retrieval`` (dicts or paths to its JSON output) for the checkpoint before ParaCLIP fine-tuning,
the one after, and optionally further fine-tuned checkpoints (an ablation), each compared with ``before``;
and the training loss curves as ``{run name: [(step, loss), ...]}``. Over several runs the table and chart
give the mean and the range (smallest, largest run). Nothing here asserts a number: it reports what was
measured.
"""

import json
import os
import sys

from ..data.atomic import atomic_file, atomic_write_text

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
    return {
        label: (sum(r[label] for r in rows) / len(rows), min(r[label] for r in rows), max(r[label] for r in rows))
        for label in rows[0]
    }


def summarize_runs(runs, names):
    """({name: {label: (mean, min, max)}}, {name: the same for the change from names[0]}) over ``runs``."""
    values = {name: spread([dict(metric_rows(run[1 + i])) for run in runs]) for i, name in enumerate(names)}
    changes = {name: spread([change_rows(run[1], run[1 + i]) for run in runs]) for i, name in enumerate(names) if i > 0}
    return values, changes


def _cell(stats, width, sign=""):
    mean, low, high = stats
    text = f"{mean:{sign}.3f}" if low == high else f"{mean:{sign}.3f} [{low:{sign}.2f}, {high:{sign}.2f}]"
    return f"{text:>{width}}"


def format_table(runs, names=("before", "after")):
    """Plain-text table: one metric per line, the value for each name and, after each but the first, its
    change from the first; over several runs the mean and, in brackets, the smallest and largest run."""
    values, changes = summarize_runs(runs, names)
    labels = list(values[names[0]])
    label_width = max(len(label) for label in labels) + 2
    column = max(8, *(len(n) + 2 for n in names)) if len(runs) == 1 else max(24, *(len(n) + 2 for n in names))
    header = [names[0]] + [text for name in names[1:] for text in (name, "change")]
    lines = [f"{'metric':<{label_width}}" + "".join(f"{text:>{column}}" for text in header)]
    for label in labels:
        cells = [_cell(values[names[0]][label], column)]
        for name in names[1:]:
            cells += [_cell(values[name][label], column), _cell(changes[name][label], column, "+")]
        lines.append(f"{label:<{label_width}}" + "".join(cells))
    if len(runs) > 1:
        lines.append(
            f"mean over {len(runs)} runs (seeds {', '.join(str(run[0]) for run in runs)}), [smallest, largest] run"
        )
    k = runs[0][1]["k"]
    for i, name in enumerate(names[1:], start=2):
        for kind in ("paraphrased", "original"):
            ratios = [
                run[i][kind][f"recall@{k}"] / run[1][kind][f"recall@{k}"]
                if run[1][kind][f"recall@{k}"]
                else float("inf")
                for run in runs
            ]
            lines.append(f"recall@{k} {kind}, {name} / {names[0]}: " + ", ".join(f"{r:.2f}x" for r in ratios))
    return "\n".join(lines)


def chart_metrics(result):
    """The bars of the chart: AO@k, JS@k and recall@1/5/10 for original and paraphrased queries."""
    k = result["k"]
    bars = {f"AO@{k}": result[f"AO@{k}"], f"JS@{k}": result[f"JS@{k}"]}
    for kind, short in (("original", "orig."), ("paraphrased", "para.")):
        bars.update({f"{name.replace('recall', 'R')}\n{short}": value for name, value in result[kind].items()})
    return bars


def plot_chart(runs, loss_curves, path, names=("before", "after")):
    """Write a PNG: grouped bars per name with the runs' range as error bars (left), training losses (right)."""
    # The Agg canvas directly, without pyplot: no global figure state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 4.6), layout="constrained")
    FigureCanvasAgg(figure)
    bars, losses = figure.subplots(1, 2, width_ratios=(3, 2))
    labels = list(chart_metrics(runs[0][1]))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        per_metric = list(zip(*(chart_metrics(run[1 + i]).values() for run in runs)))
        means = [sum(values) / len(values) for values in per_metric]
        errors = [[m - min(v) for m, v in zip(means, per_metric)], [max(v) - m for m, v in zip(means, per_metric)]]
        offset = (i - (len(names) - 1) / 2) * width
        drawn = bars.bar(
            [x + offset for x in range(len(labels))],
            means,
            width,
            label=name,
            yerr=errors if len(runs) > 1 else None,
            capsize=3,
        )
        bars.bar_label(drawn, fmt="%.2f", fontsize=7 if len(names) < 3 else 6, padding=2)
    bars.set_xticks(range(len(labels)), labels, fontsize=8)
    bars.set_ylim(0, 1.25)  # room for the legend above bars of 1.0
    first = runs[0][1]
    over = f", mean of {len(runs)} runs, bars: range" if len(runs) > 1 else ""
    bars.set_title(f"Paraphrased retrieval ({first['num_pairs']} pairs, {first['num_images']} images{over})")
    bars.legend(loc="upper center", ncol=len(names), fontsize=8)

    for run, curve in loss_curves.items():
        if curve:
            steps, values = zip(*curve)
            losses.plot(steps, values, label=run, linewidth=1)
    losses.set_xlabel("step")
    losses.set_ylabel("training loss")
    losses.set_title("Training loss (each run's own loss)")
    if loss_curves:
        losses.legend(fontsize=7)

    with atomic_file(path) as stream:
        figure.savefig(stream, format="png", dpi=110)


def _checked_curve(run, curve):
    """``[(step, loss), ...]`` as a list of pairs, or a TypeError that says what was passed instead."""
    points = list(curve)
    if not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in points):
        raise TypeError(f"loss curve {run!r} must be a list of (step, loss) pairs, got {points[:3]!r}...")
    return points


def write_report(runs, loss_curves, out_dir, names=("before", "after"), stream=sys.stdout):
    """Print the table to ``stream`` and write ``results.json`` and ``results.png`` in ``out_dir``.

    ``runs`` is ``[(seed, before, after, *more), ...]``, one entry per run, one result per name in ``names``.
    Returns ``{"table": str, "results": path, "chart": path}``.
    """
    if not runs:
        raise ValueError("no runs to report")
    if len(set(names)) != len(names) or len(names) < 2:
        raise ValueError(f"names must be at least two distinct names, got {names!r}")
    runs = [(run[0], *map(load_result, run[1:])) for run in runs]
    for run in runs:
        if len(run) != 1 + len(names):
            raise ValueError(f"run with seed {run[0]} has {len(run) - 1} results for {len(names)} names")
        ks = sorted({result["k"] for result in run[1:]} | {runs[0][1]["k"]})
        if len(ks) > 1:
            raise ValueError(f"results use different k: {', '.join(map(str, ks))} (seed {run[0]})")
    loss_curves = {run: _checked_curve(run, curve) for run, curve in loss_curves.items()}
    os.makedirs(out_dir, exist_ok=True)
    table = format_table(runs, names)
    print(table, file=stream)
    values, changes = summarize_runs(runs, names)

    def as_dict(rows):
        return {label: dict(zip(("mean", "min", "max"), stats)) for label, stats in rows.items()}

    results = {
        "names": list(names),
        "runs": [
            {
                "seed": run[0],
                "results": dict(zip(names, run[1:])),
                "change": {name: change_rows(run[1], result) for name, result in zip(names[1:], run[2:])},
            }
            for run in runs
        ],
        # mean, smallest and largest value over the runs, per name and metric; changes are from names[0]
        "summary": {name: as_dict(rows) for name, rows in values.items()},
        "summary_change": {name: as_dict(rows) for name, rows in changes.items()},
        "loss_curves": {run: [[step, loss] for step, loss in curve] for run, curve in loss_curves.items()},
    }
    results_path = os.path.join(out_dir, RESULTS_FILE)
    atomic_write_text(results_path, json.dumps(results, indent=1) + "\n")
    chart_path = os.path.join(out_dir, CHART_FILE)
    plot_chart(runs, loss_curves, chart_path, names)
    return {"table": table, "results": results_path, "chart": chart_path}
