"""The demo report: table, results.json and chart from real-shaped evaluation results, one run or several."""

import io
import json

import pytest
import torch
from PIL import Image

from paraclip_plugin.demo.report import metric_rows, write_report
from paraclip_plugin.eval.paraphrased_retrieval import summarize


def _result(seed, noise):
    """A result dict made by the evaluation's own ``summarize`` from random scores."""
    generator = torch.Generator().manual_seed(seed)
    query_scores = torch.randn(30, 40, generator=generator)
    paraphrase_scores = query_scores + noise * torch.randn(30, 40, generator=generator)
    return summarize(query_scores, paraphrase_scores, torch.arange(30), k=10)


def _row(printed, label):
    return next(line for line in printed.splitlines() if line.startswith(label + " ")).split()


def test_report_writes_table_json_and_chart(tmp_path):
    before, after = _result(0, 2.0), _result(1, 0.3)
    (tmp_path / "before.json").write_text(json.dumps(before))
    curves = {"baseline CLIP": [(0, 4.1), (10, 3.2), (20, 2.5)], "ParaCLIP": [(0, 9.0), (10, 7.7)]}
    out = io.StringIO()
    paths = write_report([(0, str(tmp_path / "before.json"), after)], curves, tmp_path / "report", stream=out)

    printed = out.getvalue()
    assert printed.strip() == paths["table"]
    for (label, old), (_, new) in zip(metric_rows(before), metric_rows(after)):
        assert _row(printed, label)[-3:] == [f"{old:.3f}", f"{new:.3f}", f"{new - old:+.3f}"]
    ratio = after["paraphrased"]["recall@10"] / before["paraphrased"]["recall@10"]
    assert f"recall@10 paraphrased, after / before: {ratio:.2f}x" in printed
    assert printed.splitlines()[0].split() == ["metric", "before", "after", "change"]

    saved = json.loads(open(paths["results"]).read())
    assert saved["runs"][0]["results"] == {"before": before, "after": after}
    assert saved["runs"][0]["change"]["after"]["AO@10"] == pytest.approx(after["AO@10"] - before["AO@10"])
    assert saved["summary"]["after"]["AO@10"] == {"mean": after["AO@10"], "min": after["AO@10"], "max": after["AO@10"]}
    assert saved["loss_curves"]["ParaCLIP"] == [[0, 9.0], [10, 7.7]]

    with Image.open(paths["chart"]) as chart:
        assert chart.format == "PNG" and chart.width > 600 and chart.height > 300


def test_several_runs_give_mean_and_range(tmp_path):
    runs = [(seed, _result(seed, 2.0), _result(seed + 10, 0.3)) for seed in (5, 6, 7)]
    out = io.StringIO()
    paths = write_report(runs, {}, tmp_path, stream=out)
    values = [after["AO@10"] for _, _, after in runs]
    mean = sum(values) / 3
    # "AO@10  <before mean> [lo, hi]  <after mean> [lo, hi]  <change mean> [lo, hi]"
    cells = _row(out.getvalue(), "AO@10")
    assert cells[4:7] == [f"{mean:.3f}", f"[{min(values):.2f},", f"{max(values):.2f}]"]
    assert "mean over 3 runs (seeds 5, 6, 7)" in out.getvalue()
    summary = json.loads(open(paths["results"]).read())["summary"]
    assert summary["after"]["AO@10"] == pytest.approx({"mean": mean, "min": min(values), "max": max(values)})
    assert [r["seed"] for r in json.loads(open(paths["results"]).read())["runs"]] == [5, 6, 7]


def test_a_third_result_gets_its_own_columns_and_bars(tmp_path):
    runs = [(0, _result(0, 2.0), _result(1, 0.3), _result(2, 1.0))]
    out = io.StringIO()
    paths = write_report(runs, {}, tmp_path, names=("baseline", "full", "image:para2 only"), stream=out)
    printed = out.getvalue()
    assert printed.splitlines()[0].split() == ["metric", "baseline", "full", "change", "image:para2", "only", "change"]
    old, third = runs[0][1]["JS@10"], runs[0][3]["JS@10"]
    assert _row(printed, "JS@10")[-2:] == [f"{third:.3f}", f"{third - old:+.3f}"]
    assert "recall@10 original, image:para2 only / baseline:" in printed
    saved = json.loads(open(paths["results"]).read())
    assert saved["summary_change"]["image:para2 only"]["JS@10"]["mean"] == pytest.approx(third - old)
    with pytest.raises(ValueError, match="has 3 results for 2 names"):
        write_report(runs, {}, tmp_path, stream=io.StringIO())


def test_results_with_different_k_are_refused(tmp_path):
    other = summarize(torch.randn(5, 8), torch.randn(5, 8), torch.arange(5), k=5)
    with pytest.raises(ValueError, match="different k"):
        write_report([(0, _result(0, 2.0), other)], {}, tmp_path, stream=io.StringIO())


def test_loss_curve_without_steps_is_refused_with_its_name(tmp_path):
    with pytest.raises(TypeError, match="'ParaCLIP' must be a list of \\(step, loss\\) pairs"):
        write_report([(0, _result(0, 2.0), _result(1, 0.3))], {"ParaCLIP": [4.2, 3.9]}, tmp_path, stream=io.StringIO())
