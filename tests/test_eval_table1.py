"""``paraclip-eval table1``: every task on the fixtures with the tiny model, both outputs, --compare, errors."""

import hashlib
import json
import os
import shutil
import subprocess

import pytest
import torch

from conftest import BIN, TINY_CONFIG, TINY_MODEL
from eval_fixtures import WORDS, StandIn, mean_colour, write_data_root
from paraclip_plugin.eval.cli import main
from paraclip_plugin.eval.common import load_model
from paraclip_plugin.eval.table1 import COLUMNS, TASKS, prepare, run_task, task_paths


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return root, write_data_root(str(root))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model, _, _ = load_model(TINY_MODEL, model_config=str(TINY_CONFIG))
    path = tmp_path_factory.mktemp("ckpt") / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


def test_table1_writes_json_and_markdown_for_every_task(data_root, checkpoint, tmp_path):
    root, templates = data_root
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            str(BIN / "paraclip-eval"),
            "table1",
            "--model",
            TINY_MODEL,
            "--model-config",
            str(TINY_CONFIG),
            "--pretrained",
            str(checkpoint),
            "--data-root",
            str(root),
            "--output",
            str(out),
            "--imagenet-templates",
            templates,
            "--device",
            "cpu",
            "--coco-split",
            "val2017",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "table1.json").read_text())
    inputs = result["inputs"]
    assert inputs["pretrained_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert inputs["tasks"] == list(TASKS) and inputs["data_root"] == str(root)
    assert inputs["model_config"] == [str(TINY_CONFIG)]  # a list: --model-config may be repeated
    assert inputs["model_config_sha256"] == [hashlib.sha256(TINY_CONFIG.read_bytes()).hexdigest()]
    counts = result["results"]
    assert counts["paraphrased-retrieval"]["num_pairs"] == 6
    # The whole val2017/ folder is the gallery: 6 pair images + 4 no pair names.
    assert (
        counts["paraphrased-retrieval"]["gallery"] == "folder" and counts["paraphrased-retrieval"]["num_images"] == 10
    )
    assert counts["vg-relation"]["num_cases"] == 3 and counts["vg-attribution"]["num_cases"] == 26
    assert [t["num_pairs"] for t in counts["sts"]["tasks"].values()] == [9] * 7  # SentEval's layout, per task
    assert len(counts["sts"]["warnings"]) == 7  # none is SentEval's test size
    assert counts["zeroshot-imagenet"]["num_images"] == 1000 and counts["zeroshot-imagenet"]["num_templates"] == 1
    assert counts["coco-retrieval"]["num_images"] == 9 and counts["coco-retrieval"]["num_captions"] == 18
    assert counts["coco-retrieval"]["split"] == inputs["coco_split"] == "val2017"
    assert counts["zeroshot-imagenet"]["tie_rule"].startswith("tied classes share the hit")
    for task in TASKS:  # every result says what it was computed in
        assert counts[task]["precision"] == {"device": "cpu", "weights": "float32", "autocast": None}, task
    assert counts["sts"]["inputs"]["folder"] == str(root / "sts")
    # Every Table 1 cell is filled, is a fraction, and is the number its task reported.
    row = result["table1"]
    assert set(row) == {header for header, _, _ in COLUMNS}
    assert all(v is not None and -1.0 <= v <= 1.0 for v in row.values())
    assert row["VG-A Acc"] == counts["vg-attribution"]["macro_accuracy"]
    assert row["T Rtrv. R@5"] == counts["coco-retrieval"]["text_retrieval_recall@5"]
    table = (out / "table1.md").read_text()
    assert proc.stdout == table
    lines = table.splitlines()
    assert lines[2].startswith("| OpenAI's CLIP (400M), paper | 67.2 | 57.7 | 59.7")
    assert "epoch_1.pt" in lines[4] and f"{100 * row['STS Avg.']:.1f}" in lines[4]
    assert inputs["pretrained_sha256"] in table
    assert "- Paraphrased retrieval: 6 pairs, gallery of 10 images (every image in the folder)." in lines
    assert "- STS pairs: sts12 9, sts13 9, sts14 9, sts15 9, sts16 9, stsb 9, sickr 9." in lines
    assert "- COCO split: val2017 (9 images, 18 captions)." in lines
    assert f"- Precision: cpu, float32 weights, no autocast ({', '.join(TASKS)})." in lines
    # STS, gallery size, pair count, COCO counts
    assert sum(line.startswith("- Warning (") for line in lines) == 7 + 1 + 1 + 1
    assert any("holds 6 pairs; the paper's set (Cheng et al.) has 4155" in line for line in lines)
    assert "pair counts" not in proc.stdout  # the table on stdout, counts and warnings on stderr
    assert "sts12: 9 scored test pairs" in proc.stderr


def test_a_rerun_reuses_the_tasks_a_stopped_run_finished(data_root, checkpoint, tmp_path, capsys, monkeypatch):
    import paraclip_plugin.eval.table1 as table1_module

    root, _ = data_root
    argv = [
        "table1",
        "--model",
        TINY_MODEL,
        "--model-config",
        str(TINY_CONFIG),
        "--pretrained",
        str(checkpoint),
        "--data-root",
        str(root),
        "--tasks",
        "sts",
        "vg-relation",
    ]
    assert main(argv + ["--output", str(tmp_path / "clean")]) == 0
    real, ran = table1_module.run_task, []

    def stopped_in_vg_relation(task, *args):
        ran.append(task)
        if task == "vg-relation":
            raise KeyboardInterrupt  # as a job killed in its last task
        return real(task, *args)

    monkeypatch.setattr(table1_module, "run_task", stopped_in_vg_relation)
    with pytest.raises(KeyboardInterrupt):
        main(argv + ["--output", str(tmp_path / "out")])
    assert (
        sorted(os.listdir(tmp_path / "out" / "tasks")) == ["sts.json"]
        and not (tmp_path / "out" / "table1.json").exists()
    )
    monkeypatch.setattr(table1_module, "run_task", lambda task, *args: ran.append(task) or real(task, *args))
    ran.clear()
    capsys.readouterr()
    assert main(argv + ["--output", str(tmp_path / "out")]) == 0
    assert ran == ["vg-relation"] and "table1: sts: the result kept in" in capsys.readouterr().err
    assert (
        main(["table1", "--compare", str(tmp_path / "clean" / "table1.json"), str(tmp_path / "out" / "table1.json")])
        == 0
    )
    assert capsys.readouterr().out == "no differences\n"
    # other inputs (here the batch size) compute every task again
    ran.clear()
    assert main(argv + ["--output", str(tmp_path / "out"), "--batch-size", "7"]) == 0
    assert ran == ["sts", "vg-relation"]


def test_compare_reports_changed_numbers(data_root, tmp_path, capsys):
    root, templates = data_root
    runs = []
    for name in ("a", "b"):
        torch.manual_seed(0)
        assert (
            main(
                [
                    "table1",
                    "--model",
                    TINY_MODEL,
                    "--model-config",
                    str(TINY_CONFIG),
                    "--data-root",
                    str(root),
                    "--tasks",
                    "sts",
                    "vg-relation",
                    "--output",
                    str(tmp_path / name),
                ]
            )
            == 0
        )
        runs.append(tmp_path / name / "table1.json")
    capsys.readouterr()
    assert main(["table1", "--compare", str(runs[0]), str(runs[1])]) == 0
    assert capsys.readouterr().out == "no differences\n"  # same seed, same numbers; timings ignored
    edited = json.loads(runs[1].read_text())
    edited["table1"]["STS Avg."] += 0.25
    runs[1].write_text(json.dumps(edited))
    assert main(["table1", "--compare", str(runs[0]), str(runs[1])]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("table1.STS Avg.: ") and out[0].endswith("(+0.25)")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tasks", "sts"], "sts/sts12.tsv"),  # removed below: names the missing file
        (["--tasks", "zeroshot-imagenet"], "imagenet/val"),
        ([], "--model and --data-root"),
    ],
)
def test_bad_input_exits_2_before_loading_a_model(tmp_path, capsys, argv, message):
    (tmp_path / "sts").mkdir()
    (tmp_path / "imagenet").mkdir()
    (tmp_path / "imagenet" / "meta.bin").write_bytes(b"")
    base = ["table1"] if not argv else ["table1", "--model", "no-such-model", "--data-root", str(tmp_path)]
    assert main(base + argv) == 2
    assert message in capsys.readouterr().err


def test_an_output_that_cannot_be_written_is_refused_before_the_model_loads(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_folder").mkdir()
    cases = [
        (["table1", "--output", str(tmp_path / "a_file")], f"--output {tmp_path / 'a_file'}: not a folder"),
        (
            ["sts", "--root", str(tmp_path), "--json", str(tmp_path / "a_folder")],
            f"--json {tmp_path / 'a_folder'}: a folder; give the JSON file's name",
        ),
        (
            ["sts", "--root", str(tmp_path), "--json", str(tmp_path / "a_file" / "x" / "r.json")],
            f"{tmp_path / 'a_file'} is not a folder",
        ),
    ]
    for argv, message in cases:
        # the model named does not exist: the output is checked before it would be loaded
        assert main(argv[:1] + ["--model", "no-such-model", *argv[1:]]) == 2
        err = capsys.readouterr().err
        assert message in err and "no-such-model" not in err, err


def test_compare_names_a_file_that_is_not_a_result(tmp_path, capsys):
    (tmp_path / "a.json").write_text("[]")
    assert main(["table1", "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 2
    assert "a.json: not a table1 result" in capsys.readouterr().err


def test_paraphrased_retrieval_gallery_follows_the_layout(data_root, tmp_path):
    """``val2017/`` present: the whole folder is the gallery; absent: ``images/``, pairs-only."""
    shutil.copytree(data_root[0] / "paraphrased_retrieval", tmp_path / "paraphrased_retrieval")
    model = StandIn(
        {
            text: [float(i), 1.0, float(i % 3)]
            for i, w in enumerate(WORDS)
            for text in (f"a {w} thing", f"something {w}")
        },
        mean_colour,
    )
    results = {}
    for layout in ("val2017", "images"):
        if layout == "images":
            (tmp_path / "paraphrased_retrieval" / "val2017").rename(tmp_path / "paraphrased_retrieval" / "images")
        paths = task_paths(str(tmp_path))["paraphrased-retrieval"]
        prepared = prepare("paraphrased-retrieval", paths)
        results[layout] = run_task(
            "paraphrased-retrieval", paths, prepared, model, mean_colour, model.tokenizer, "cpu", 4, False
        )
    assert (results["val2017"]["gallery"], results["val2017"]["num_images"]) == ("folder", 10)
    assert (results["images"]["gallery"], results["images"]["num_images"]) == ("pairs", 6)
    assert "not a whole folder" in results["images"]["warnings"][0]


def _edit(path, old, new):
    """Replace ``old`` by ``new`` (same length) in a file, keeping its size and mtime: only its content tells."""
    stat, text = os.stat(path), path.read_text(encoding="utf-8")
    assert old in text and len(old) == len(new)
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _append_byte(path):
    with open(path, "ab") as f:
        f.write(b"\0")


def _repoint(link, target):
    os.unlink(link)
    os.symlink(target, link)


def _gallery_links(root):
    """val2017/ as a link to one of two identical copies (same names, sizes and mtimes)."""
    pr = root / "paraphrased_retrieval"
    (pr / "val2017").rename(pr / "gallery_a")
    shutil.copytree(pr / "gallery_a", pr / "gallery_b")
    os.symlink(pr / "gallery_a", pr / "val2017")


# (set-up before the first run, the change before the rerun, the tasks the rerun must compute again)
DATA_CHANGES = {
    "nothing changed": (None, lambda root, config: None, []),
    "val2017/ added to a pairs-only layout": (
        lambda root: (root / "paraphrased_retrieval" / "val2017").rename(root / "paraphrased_retrieval" / "images"),
        lambda root, config: shutil.copytree(
            root / "paraphrased_retrieval" / "images", root / "paraphrased_retrieval" / "val2017"
        ),
        ["paraphrased-retrieval"],
    ),
    "val2017 link re-pointed": (
        _gallery_links,
        lambda root, config: _repoint(
            root / "paraphrased_retrieval" / "val2017", root / "paraphrased_retrieval" / "gallery_b"
        ),
        ["paraphrased-retrieval"],
    ),
    "pairs.jsonl edited": (
        None,
        lambda root, config: _edit(root / "paraphrased_retrieval" / "pairs.jsonl", "a red thing", "a tan thing"),
        ["paraphrased-retrieval"],
    ),
    "STS-B gold score edited": (
        None,
        lambda root, config: _edit(root / "sts" / "STS" / "STSBenchmark" / "sts-test.csv", "\t3.000\t", "\t4.000\t"),
        ["sts"],
    ),
    "SICK file edited": (
        None,
        lambda root, config: _edit(root / "sts" / "SICK" / "SICK_test_annotated.txt", "\t0\tNEUTRAL", "\t5\tNEUTRAL"),
        ["sts"],
    ),
    "VG-R annotations edited": (
        None,
        lambda root, config: _edit(
            root / "aro" / "visual_genome_relation.json", "red cup on table", "red mug on table"
        ),
        ["vg-relation"],
    ),
    "ARO image replaced": (
        None,
        lambda root, config: _append_byte(root / "aro" / "images" / "scene.png"),
        ["vg-relation", "vg-attribution"],
    ),
    "ImageNet image replaced": (
        None,
        lambda root, config: _append_byte(root / "imagenet" / "val" / "n00000007" / "ILSVRC2012_val_00000008.JPEG"),
        ["zeroshot-imagenet"],
    ),
    "ImageNet templates edited": (
        None,
        lambda root, config: _edit(root / "imagenet_templates.json", "a photo of", "a image of"),
        ["zeroshot-imagenet"],
    ),
    "COCO captions edited": (
        None,
        lambda root, config: _edit(root / "coco" / "coco_test_karpathy.json", "a red picture", "a tan picture"),
        ["coco-retrieval"],
    ),
    "model config folder edited": (
        None,
        lambda root, config: (config / TINY_CONFIG.name).write_text(
            json.dumps(json.loads(TINY_CONFIG.read_text()), indent=3)
        ),
        list(TASKS),
    ),
}


@pytest.mark.parametrize("change", DATA_CHANGES)
def test_a_rerun_computes_again_the_tasks_whose_files_changed(data_root, tmp_path, monkeypatch, capsys, change):
    """The kept results' key covers each task's files: contents of text files, listings of image folders,
    resolved links, the templates and a model-config folder. Nothing else is computed again."""
    import paraclip_plugin.eval.table1 as table1_module

    set_up, edit, expected = DATA_CHANGES[change]
    root, config = tmp_path / "data", tmp_path / "configs"
    shutil.copytree(data_root[0], root)
    config.mkdir()
    shutil.copy(TINY_CONFIG, config)
    (tmp_path / "epoch_1.pt").write_bytes(b"weights")  # never loaded: the model is stood in for
    if set_up:
        set_up(root)
    ran, hashed = [], []
    monkeypatch.setattr(table1_module, "load_model", lambda *args: (None, None, None))
    monkeypatch.setattr(table1_module, "run_task", lambda task, *args: ran.append(task) or {"n": len(ran)})
    real_sha256 = table1_module.sha256_of
    monkeypatch.setattr(table1_module, "sha256_of", lambda path: hashed.append(path) or real_sha256(path))

    def run():
        ran.clear()
        return table1_module.run_table1(
            TINY_MODEL,
            str(tmp_path / "epoch_1.pt"),
            str(root),
            TASKS,
            str(config),
            imagenet_templates=str(root / "imagenet_templates.json"),
            keep_tasks=str(tmp_path / "tasks"),
        )

    first = run()
    assert ran == list(TASKS)
    assert not [p for p in hashed if p.lower().endswith((".png", ".jpg", ".jpeg"))]  # image folders: listed, not read
    edit(root, config)
    capsys.readouterr()
    second = run()
    assert ran == expected
    kept = [t for t in TASKS if t not in expected]
    err = capsys.readouterr().err
    assert [t for t in TASKS if f"table1: {t}: the result kept in" in err] == kept
    assert [second["results"][t] for t in kept] == [first["results"][t] for t in kept]


@pytest.mark.parametrize(
    "task, relative, line",
    [
        ("paraphrased-retrieval", "paraphrased_retrieval/pairs.jsonl", 3),
        ("vg-relation", "aro/visual_genome_relation.json", 1),
        ("sts", "sts/SICK/SICK_test_annotated.txt", 4),
        ("sts", "sts/STS/STSBenchmark/sts-test.csv", 2),
        ("zeroshot-imagenet", "imagenet_templates.json", 1),
    ],
)
def test_a_file_that_is_not_utf8_exits_2_naming_it_and_its_line(data_root, tmp_path, capsys, task, relative, line):
    root = tmp_path / "data"
    shutil.copytree(data_root[0], root)
    path = root / relative
    lines = path.read_bytes().split(b"\n")
    lines[line - 1] += " café".encode("latin-1")
    path.write_bytes(b"\n".join(lines))
    # the model named does not exist: the file is checked before a model would be loaded
    assert (
        main(
            [
                "table1",
                "--model",
                "no-such-model",
                "--data-root",
                str(root),
                "--tasks",
                task,
                "--imagenet-templates",
                str(root / "imagenet_templates.json"),
                "--output",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert f"{path}:{line}: not UTF-8 (" in err and "no-such-model" not in err, err


def test_an_image_folder_is_listed_as_its_task_reads_it(tmp_path, monkeypatch):
    """A gallery is its folder's own files: a sub-folder it never reads (lost+found on a volume) is not walked;
    a folder the walk needs and can't list is an input error naming it (exit 2), not a traceback."""
    from paraclip_plugin.eval import table1

    gallery = tmp_path / "val2017"
    (gallery / "lost+found").mkdir(parents=True)
    (gallery / "a.jpg").write_bytes(b"x")
    scandir = os.scandir

    def no_lost_and_found(path):
        if str(path).endswith("lost+found"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(table1.os, "scandir", no_lost_and_found)
    before = table1.fingerprint(str(gallery), False, depth=1)
    (gallery / "b.jpg").write_bytes(b"y")
    assert table1.fingerprint(str(gallery), False, depth=1) != before
    with pytest.raises(table1.InputError, match=r"lost\+found: can't be listed \(Permission denied\)"):
        table1.fingerprint(str(gallery), False)
