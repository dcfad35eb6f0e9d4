"""The demo report: table, results.json and chart from two real-shaped evaluation results."""
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


def test_report_writes_table_json_and_chart(tmp_path):
    before, after = _result(0, 2.0), _result(1, 0.3)
    (tmp_path / "before.json").write_text(json.dumps(before))
    curves = {"baseline CLIP": [(0, 4.1), (10, 3.2), (20, 2.5)], "ParaCLIP": [(0, 9.0), (10, 7.7)]}
    out = io.StringIO()
    paths = write_report(str(tmp_path / "before.json"), after, curves, tmp_path / "report", stream=out)

    printed = out.getvalue()
    assert printed.strip() == paths["table"]
    for (label, old), (_, new) in zip(metric_rows(before), metric_rows(after)):
        line = next(l for l in printed.splitlines() if l.startswith(label + " "))
        assert line.split()[-3:] == [f"{old:.3f}", f"{new:.3f}", f"{new - old:+.3f}"]

    saved = json.loads(open(paths["results"]).read())
    assert saved["before"] == before and saved["after"] == after
    assert saved["change"]["AO@10"] == pytest.approx(after["AO@10"] - before["AO@10"])
    assert saved["loss_curves"]["ParaCLIP"] == [[0, 9.0], [10, 7.7]]

    with Image.open(paths["chart"]) as chart:
        assert chart.format == "PNG" and chart.width > 600 and chart.height > 300


def test_results_with_different_k_are_refused(tmp_path):
    other = summarize(torch.randn(5, 8), torch.randn(5, 8), torch.arange(5), k=5)
    with pytest.raises(ValueError, match="different k"):
        write_report(_result(0, 2.0), other, {}, tmp_path, stream=io.StringIO())


def test_loss_curve_without_steps_is_refused_with_its_name(tmp_path):
    with pytest.raises(TypeError, match="'ParaCLIP' must be a list of \\(step, loss\\) pairs"):
        write_report(_result(0, 2.0), _result(1, 0.3), {"ParaCLIP": [4.2, 3.9]}, tmp_path, stream=io.StringIO())
