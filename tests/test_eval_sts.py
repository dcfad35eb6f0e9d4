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
PAIRS_A = [
    ("u0 a", "u0 b", 4.0),
    ("u10 c", "u40 d", 5.0),
    ("u0 e", "u60 f", 2.0),
    ("u20 g", "u110 h", 2.5),
    ("u0 i", "u120 j", 0.5),
]
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
    subset_1 = [("u0 a", "u0 b", 2.0), ("u0 c", "u90 d", 1.0)]  # cos 1, 0
    subset_2 = [("u0 e", "u30 f", 5.0), ("u0 g", "u60 h", 4.0)]  # cos .87, .5
    write_sts(tmp_path / "sts13.tsv", subset_1 + subset_2)
    model = StandIn(_angle_features(subset_1 + subset_2), None)
    result = evaluate_sts(model, model.tokenizer, [read_task("sts13", tmp_path / "sts13.tsv")])
    # Cosine ranks 4, 1, 3, 2; gold ranks 2, 1, 4, 3: d = 2, 0, -1, -1, sum 6, rho = 1 - 36/60.
    assert result["tasks"]["sts13"]["spearman"] == pytest.approx(1 - 6 * 6 / (4 * 15))


def test_cli_runs_all_seven_with_the_tiny_model(tmp_path, capsys):
    for name in STS_NAMES:
        write_sts(
            tmp_path / f"{name}.tsv",
            [
                ("a dog runs", "a dog is running", 4.5),
                ("a cat", "the stock market", 0.2),
                ("a man 'quotes\" things", "a man says things", 3.0),
            ],
            extra_column=False,
        )
    assert main(["sts", "--model", TINY_MODEL, "--model-config", str(TINY_CONFIG), "--root", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result["tasks"]) == list(STS_NAMES)
    rhos = [t["spearman"] for t in result["tasks"].values()]
    assert all(-1.0 <= r <= 1.0 for r in rhos)
    assert len(set(rhos)) == 1  # identical files, deterministic model: identical correlations
    assert result["macro_spearman"] == pytest.approx(rhos[0])


@pytest.mark.parametrize(
    "content, message",
    [
        ("sentence1\tsentence2\tgold\na\tb\t1\n", "missing column(s) score"),
        ("sentence1,sentence2,score\na,b,1\n", "tab-separated"),
        ("sentence1\tsentence2\tscore\n", "0 scored pair(s)"),
        ("sentence1\tsentence2\tscore\na\tb\tfive\nc\td\t1\n", ":2: score 'five' is not a number"),
        ("sentence1\tsentence2\tscore\na\tb\t1\nc\td\t1\n", "Spearman is undefined"),
    ],
)
def test_bad_files_exit_2_naming_the_file(tmp_path, capsys, content, message):
    (tmp_path / "sickr.tsv").write_text(content)
    code = main(
        [
            "sts",
            "--model",
            TINY_MODEL,
            "--model-config",
            str(TINY_CONFIG),
            "--root",
            str(tmp_path),
            "--sts-tasks",
            "sickr",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and str(tmp_path / "sickr.tsv") in err and message in err


def test_missing_task_file_is_named(tmp_path, capsys):
    write_sts(tmp_path / "sts12.tsv", PAIRS_A)
    code = main(["sts", "--model", TINY_MODEL, "--root", str(tmp_path)])
    assert code == 2 and str(tmp_path / "sts13.tsv") in capsys.readouterr().err


# ------------------------------------------------------------------ the benchmarks' own files (SentEval's layout)


def _angle_rows(seed, count, unscored=0):
    """(sentence1, sentence2, gold) rows whose cosines (stand-in model) fall with a distinct angle gap
    per pair; the second sentence has a double space SentEval's word split removes. The last
    ``unscored`` rows have an empty gold score. Returns the rows and the rho a direct computation gives."""
    import random
    from scipy.stats import spearmanr

    rng = random.Random(seed)
    gaps = rng.sample(range(0, 180), count)
    rows = [
        (f"u{i} s{seed}.{i}", f"u{i + gap}  t{seed}.{i}", round(rng.uniform(0, 5), 1)) for i, gap in enumerate(gaps)
    ]
    rows = rows[: count - unscored] + [(a, b, "") for a, b, _ in rows[count - unscored :]]
    scored = count - unscored
    return rows, float(spearmanr([-g for g in gaps[:scored]], [r[2] for r in rows[:scored]]).statistic)


def _angle_model(rows):
    return StandIn(_angle_features([(a, " ".join(b.split()), g) for a, b, g in rows]), None)


def test_senteval_download_layout_scores_the_seven_test_sets(tmp_path, capsys):
    from eval_fixtures import write_senteval_downstream

    data = {
        name: _angle_rows(n, 12 + n, unscored=3 if name in ("sts15", "sts16") else 0)
        for n, name in enumerate(STS_NAMES)
    }
    write_senteval_downstream(tmp_path, {name: rows for name, (rows, _) in data.items()})
    tasks = read_tasks(tmp_path)
    err = capsys.readouterr().err
    model = _angle_model([row for rows, _ in data.values() for row in rows])
    result = evaluate_sts(model, model.tokenizer, tasks)
    for n, name in enumerate(STS_NAMES):
        rows, rho = data[name]
        unscored = 3 if name in ("sts15", "sts16") else 0
        task = result["tasks"][name]
        assert task["spearman"] == pytest.approx(rho)
        assert (task["num_pairs"], task["skipped_unscored"]) == (12 + n - unscored, unscored)
        assert f"paraclip-eval: {name}: {12 + n - unscored} scored test pairs ({unscored} unscored skipped)" in err
    assert [result["tasks"][n]["layout"] for n in STS_NAMES] == ["senteval-sts"] * 5 + ["stsb-csv", "sick"]
    assert result["tasks"]["sts12"]["path"] == str(tmp_path / "STS" / "STS12-en-test")
    assert result["tasks"]["sickr"]["path"] == str(tmp_path / "SICK" / "SICK_test_annotated.txt")
    # None of these tiny files has SentEval's test size: each is warned about, on stderr and in the result.
    assert len(result["warnings"]) == 7 and "sts12: 12 scored pairs" in result["warnings"][0]
    assert "SentEval's test set has 3108" in result["warnings"][0] and err.count("warning:") == 7


def test_senteval_sts_folder_without_the_sts_parent_and_sick_full_release(tmp_path):
    """``FOLDER/STS12-en-test`` directly; SICK.txt's 12 columns, only its TEST rows scored."""
    from eval_fixtures import write_senteval_sts, write_sick

    rows, rho = _angle_rows(1, 10)
    write_senteval_sts(tmp_path, "sts12", rows)
    test_rows, test_rho = _angle_rows(2, 9)
    other_rows, _ = _angle_rows(3, 6)
    write_sick(
        tmp_path / "SICK" / "SICK.txt",
        other_rows[:3] + test_rows + other_rows[3:],
        sets=["TRAIN", "TRIAL", "TRAIN"] + ["TEST"] * 9 + ["TRAIN"] * 3,
    )
    tasks = read_tasks(tmp_path, ["sts12", "sickr"])
    model = _angle_model(rows + test_rows + other_rows)
    result = evaluate_sts(model, model.tokenizer, tasks)
    assert result["tasks"]["sts12"]["spearman"] == pytest.approx(rho)
    assert result["tasks"]["sickr"]["spearman"] == pytest.approx(test_rho)
    assert result["tasks"]["sickr"]["num_pairs"] == 9 and result["tasks"]["sickr"]["other_splits_left_out"] == 6


def test_a_tsv_with_a_split_column_scores_its_test_rows_only(tmp_path, capsys):
    train, _ = _angle_rows(4, 10)
    test, test_rho = _angle_rows(5, 8)
    path = tmp_path / "stsb.tsv"
    path.write_text(
        "split\tsentence1\tsentence2\tscore\n"
        + "".join(
            f"{split}\t{a}\t{b}\t{g}\n"
            for split, rows in (("train", train[:5]), ("test", test), ("dev", train[5:]))
            for a, b, g in rows
        )
    )
    model = _angle_model(train + test)
    result = evaluate_sts(model, model.tokenizer, read_tasks(tmp_path, ["stsb"]))
    assert result["tasks"]["stsb"]["spearman"] == pytest.approx(test_rho)
    assert result["tasks"]["stsb"]["num_pairs"] == 8 and result["tasks"]["stsb"]["other_splits_left_out"] == 10
    assert "(0 unscored skipped, 10 rows of other splits left out)" in capsys.readouterr().err


def test_senteval_test_size_gives_no_warning(tmp_path, capsys):
    from eval_fixtures import write_stsb_csv

    rows = [(f"u0 a{i}", f"u{i % 90} b{i}", i % 5) for i in range(1379)]  # STS-B's test size
    write_stsb_csv(tmp_path / "STSBenchmark" / "sts-test.csv", rows)
    model = StandIn(_angle_features(rows), None)
    result = evaluate_sts(model, model.tokenizer, read_tasks(tmp_path, ["stsb"]))
    assert result["tasks"]["stsb"]["num_pairs"] == 1379 and "warnings" not in result
    assert "warning" not in capsys.readouterr().err


def _write_sts12(folder):
    from eval_fixtures import write_senteval_sts

    return write_senteval_sts(folder, "sts12", _angle_rows(6, 10)[0])


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda f: (f / "STS12-en-test" / "STS.gs.MSRvid.txt").write_text("1.0\n2.0\n3.0\n"),
            "STS.gs.MSRvid.txt: 3 lines but",
        ),
        (
            lambda f: (f / "STS12-en-test" / "STS.input.MSRpar.txt").write_text("only one sentence\nx\ty\n"),
            "STS.input.MSRpar.txt:1: expected two tab-separated sentences",
        ),
        (
            lambda f: (f / "STS12-en-test" / "STS.gs.SMTeuroparl.txt").write_text("4.0\nhigh\n"),
            "STS.gs.SMTeuroparl.txt:2: score 'high' is not a number",
        ),
        (
            lambda f: (f / "STS12-en-test" / "STS.input.surprise.OnWN.txt").unlink(),
            "STS.input.surprise.OnWN.txt: cannot read",
        ),
        (lambda f: (f / "sts12.tsv").write_text("sentence1\tsentence2\tscore\na\tb\t1\n"), "keep one"),
        (lambda f: (f / "STS12-en-test").rename(f / "STS12-test"), "sts12: no test file under"),
    ],
)
def test_senteval_file_errors_name_the_file(tmp_path, capsys, damage, message):
    _write_sts12(tmp_path)
    damage(tmp_path)
    code = main(["sts", "--model", TINY_MODEL, "--root", str(tmp_path), "--sts-tasks", "sts12"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and str(tmp_path) in err


@pytest.mark.parametrize(
    "line, message",
    [
        ("main\tMSRvid\t2012test\t0001\t2.5\tonly six fields", ":2: 6 tab-separated fields, expected at least 7"),
        ("main\tMSRvid\t2012test\t0001\t\ta\tb", ":2: empty score"),
    ],
)
def test_stsb_csv_errors_name_the_line(tmp_path, capsys, line, message):
    from eval_fixtures import write_stsb_csv

    path = write_stsb_csv(tmp_path / "STSBenchmark" / "sts-test.csv", [("a b", "c d", 1.0)])
    with open(path, "a") as f:
        f.write(line + "\n")
    assert main(["sts", "--model", TINY_MODEL, "--root", str(tmp_path), "--sts-tasks", "stsb"]) == 2
    assert f"{path}{message}" in capsys.readouterr().err


def test_stsb_lines_end_at_newlines_only_as_senteval_reads_them(tmp_path):
    """SentEval's STSBenchmarkEval reads ``for line in f``: U+2028, U+0085, \\x0c and \\x1c-\\x1e inside a
    line are not line ends there (``str.splitlines`` would cut the line at each)."""
    import io
    from eval_fixtures import write_stsb_csv

    odd_breaks = ["\u2028", "\x85", "\x0c", "\x1c", "\x1d", "\x1e"]
    rows = [(f"a{i}{odd}b{i}", f"c{i}{odd}d{i}", i) for i, odd in enumerate(odd_breaks)]
    path = write_stsb_csv(tmp_path / "STSBenchmark" / "sts-test.csv", rows)
    senteval = []  # SentEval's (and SimCSE's) STSBenchmarkEval.loadFile, then its word split
    with io.open(path, "r", encoding="utf-8") as f:
        for line in f:
            text = line.strip().split("\t")
            senteval.append((" ".join(text[5].split()), " ".join(text[6].split()), float(text[4])))
    task = read_task("stsb", path)
    assert list(zip(task.first, task.second, task.gold)) == senteval
    assert senteval[0] == ("a0 b0", "c0 d0", 0.0) and len(senteval) == len(rows)
