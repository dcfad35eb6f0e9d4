"""STS: Spearman over all pairs of a task (checked against hand-made ranks), macro average, input errors."""
import json
import math

import pytest

from conftest import TINY_CONFIG, TINY_MODEL
from eval_fixtures import STS_NAMES, StandIn, write_sts
from paraclip_plugin.eval.cli import main
from paraclip_plugin.eval.sts import evaluate_sts, read_task, read_tasks


def _angle_features(pairs):
    """Sentence "u<k>" is the unit vector at k degrees, so a pair's cosine is cos(difference)."""
    features = {}
    for first, second, _ in pairs:
        for sentence in (first, second):
            angle = math.radians(int(sentence.split()[0][1:]))
            features[sentence] = (math.cos(angle), math.sin(angle))
    return features


# Cosines fall with the angle gap: gaps 0, 30, 60, 90, 120 degrees -> cosine ranks 5, 4, 3, 2, 1.
PAIRS_A = [("u0 a", "u0 b", 4.0), ("u10 c", "u40 d", 5.0), ("u0 e", "u60 f", 2.0),
           ("u20 g", "u110 h", 2.5), ("u0 i", "u120 j", 0.5)]
# Gold ranks 4, 5, 2, 3, 1: d = 1, -1, 1, -1, 0, sum d^2 = 4, rho = 1 - 6*4 / (5*(25-1)) = 0.8.
RHO_A = 1 - 6 * 4 / (5 * 24)
# Same pairs, gold reversed in order of cosine except the two middle ones swapped:
# gold ranks 1, 2, 4, 3, 5 against cosine ranks 5, 4, 3, 2, 1: d = -4, -2, 1, 1, 4, sum d^2 = 38.
PAIRS_B = [(a, b, g) for (a, b, _), g in zip(PAIRS_A, (0.0, 1.0, 3.0, 2.0, 4.0))]
RHO_B = 1 - 6 * 38 / (5 * 24)


def test_spearman_and_macro_match_hand_ranks(tmp_path):
    write_sts(tmp_path / "sts12.tsv", PAIRS_A)
    write_sts(tmp_path / "stsb.tsv", PAIRS_B + [("u0 z", "u0 y", "")])  # unscored row: skipped
    tasks = read_tasks(tmp_path, ["sts12", "stsb"])
    model = StandIn(_angle_features(PAIRS_A + PAIRS_B + [("u0 z", "u0 y", 0)]), None)
    result = evaluate_sts(model, model.tokenizer, tasks)
    assert result["tasks"]["sts12"]["spearman"] == pytest.approx(RHO_A)
    assert result["tasks"]["stsb"]["spearman"] == pytest.approx(RHO_B)
    assert result["tasks"]["stsb"]["num_pairs"] == 5 and result["tasks"]["stsb"]["skipped_unscored"] == 1
    assert result["macro_spearman"] == pytest.approx((RHO_A + RHO_B) / 2)


def test_all_aggregation_pools_subsets_instead_of_averaging_them(tmp_path):
    """Two 'subsets' each perfectly ranked, but on different gold scales: pooled rho < 1."""
    subset_1 = [("u0 a", "u0 b", 2.0), ("u0 c", "u90 d", 1.0)]    # cos 1, 0
    subset_2 = [("u0 e", "u30 f", 5.0), ("u0 g", "u60 h", 4.0)]   # cos .87, .5
    write_sts(tmp_path / "sts13.tsv", subset_1 + subset_2)
    model = StandIn(_angle_features(subset_1 + subset_2), None)
    result = evaluate_sts(model, model.tokenizer, [read_task("sts13", tmp_path / "sts13.tsv")])
    # Cosine ranks 4, 1, 3, 2; gold ranks 2, 1, 4, 3: d = 2, 0, -1, -1, sum 6, rho = 1 - 36/60.
    assert result["tasks"]["sts13"]["spearman"] == pytest.approx(1 - 6 * 6 / (4 * 15))


def test_cli_runs_all_seven_with_the_tiny_model(tmp_path, capsys):
    for name in STS_NAMES:
        write_sts(tmp_path / f"{name}.tsv", [("a dog runs", "a dog is running", 4.5), ("a cat", "the stock market", 0.2),
                                            ("a man 'quotes\" things", "a man says things", 3.0)], extra_column=False)
    assert main(["sts", "--model", TINY_MODEL, "--model-config", str(TINY_CONFIG), "--folder", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result["tasks"]) == list(STS_NAMES)
    rhos = [t["spearman"] for t in result["tasks"].values()]
    assert all(-1.0 <= r <= 1.0 for r in rhos)
    assert len(set(rhos)) == 1  # identical files, deterministic model: identical correlations
    assert result["macro_spearman"] == pytest.approx(rhos[0])


@pytest.mark.parametrize("content, message", [
    ("sentence1\tsentence2\tgold\na\tb\t1\n", "missing column(s) score"),
    ("sentence1,sentence2,score\na,b,1\n", "tab-separated"),
    ("sentence1\tsentence2\tscore\n", "0 scored pair(s)"),
    ("sentence1\tsentence2\tscore\na\tb\tfive\nc\td\t1\n", ":2: score 'five' is not a number"),
    ("sentence1\tsentence2\tscore\na\tb\t1\nc\td\t1\n", "Spearman is undefined"),
])
def test_bad_files_exit_2_naming_the_file(tmp_path, capsys, content, message):
    (tmp_path / "sickr.tsv").write_text(content)
    code = main(["sts", "--model", TINY_MODEL, "--model-config", str(TINY_CONFIG), "--folder", str(tmp_path),
                 "--sts-tasks", "sickr"])
    err = capsys.readouterr().err
    assert code == 2 and str(tmp_path / "sickr.tsv") in err and message in err


def test_missing_task_file_is_named(tmp_path, capsys):
    write_sts(tmp_path / "sts12.tsv", PAIRS_A)
    code = main(["sts", "--model", TINY_MODEL, "--folder", str(tmp_path)])
    assert code == 2 and str(tmp_path / "sts13.tsv") in capsys.readouterr().err
