"""Prompts, cleaning, cache, input handling and the torch-free import path, piece by piece."""

import errno
import json
import os
import subprocess
import sys

import pytest

from paraclip_plugin.paraphrase import cleaning
from paraclip_plugin.paraphrase.backends.base import Completion
from paraclip_plugin.paraphrase.cache import CompletionCache, request_seed
from paraclip_plugin.data.inputs import expand_inputs, output_name, read_caption_file, slurm_job_defaults, split_for_job
from paraclip_plugin.paraphrase.prompts import PAPER_VERSION, PromptSet, load_prompts
from paraclip_plugin.data.errors import InputError
from paraclip_plugin.data.tars import atomic_tar_writer, read_tar_samples
from paraclip_plugin.data.atomic import atomic_create_text
from test_paraphrase_support import write_samples


def test_prompts_are_the_papers_wording():
    prompts = PromptSet()
    # Sec. 2.1 of the paper / the official release's call_openai.py, word for word.
    assert prompts.render(1, "dog.jpg on a beach") == (
        'Paraphrase the given caption "dog.jpg on a beach" concisely while preserving the meaning.'
    )
    assert prompts.render(2, "A dog at the beach") == (
        'Paraphrase the given text "A dog at the beach" concisely while preserving the meaning '
        "and avoiding use of existing words."
    )
    assert prompts.version == PAPER_VERSION
    assert prompts.render(1, "{braces} stay").count("{braces} stay") == 1


def test_prompts_replaced_from_a_file(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"step1": "Rewrite: {text}", "step2": "Reword: {text}"}))
    custom = load_prompts(path)
    assert custom.render(1, "a cat") == "Rewrite: a cat" and custom.render(2, "a cat") == "Reword: a cat"
    assert custom.version != PAPER_VERSION  # never shares cache entries with the paper's prompts
    path.write_text(json.dumps({"step1": "Rewrite: {text}", "step2": "Reword it: {text}"}))
    assert load_prompts(path).version != custom.version
    path.write_text(json.dumps({"step1": "no placeholder", "step2": "Reword: {text}"}))
    with pytest.raises(ValueError, match="step1"):
        load_prompts(path)
    path.write_text(json.dumps(["Rewrite: {text}", "Reword: {text}"]))
    with pytest.raises(ValueError, match=f"{path}: prompts file must hold a JSON object"):
        load_prompts(path)
    with pytest.raises(ValueError, match=f"--prompts {tmp_path / 'missing.json'}: No such file"):
        load_prompts(tmp_path / "missing.json")


@pytest.mark.parametrize(
    "raw, expected",
    [
        ('"A dog runs on the beach."', "A dog runs on the beach."),
        ('Paraphrase: "A dog runs on the beach"', "A dog runs on the beach"),
        ("Here is a concise paraphrase: A dog runs.\n\nThis keeps the meaning.", "A dog runs."),
        ("  “A dog runs”.  ", "A dog runs"),
        ("Rephrased:   a   dog\truns", "a dog runs"),
        # reasoning models: the <think> block goes, the answer stays; a cut-off <think> leaves nothing
        (
            "<think>\nThe user wants a paraphrase.\nOK.\n</think>\n\nA dog dashes along the shore.",
            "A dog dashes along the shore.",
        ),
        ('<THINK>x</THINK>Paraphrase: "A dog runs"', "A dog runs"),
        ("reasoning whose opening tag was in the prompt\n</think>\nA dog runs", "A dog runs"),
        ("<think>\nThe user wants a paraphrase, let me consider every wor", ""),
    ],
)
def test_cleaning_strips_wrappers(raw, expected):
    assert cleaning.clean(raw) == expected


ANSWER = "A crimson auto waits by the aged home."


@pytest.mark.parametrize(
    "raw",
    [
        # a lead-in before the answer, on its line
        "Sure! Here's a paraphrase: {}",
        "Sure, I'd be happy to help! Here's a paraphrased version: {}",
        "OK! Here's a paraphrase: {}",
        "Alright, here's a rephrased caption: {}",
        "Sure, here's one way to say it: {}",
        "Here's a paraphrased version of the caption, avoiding the original words: {}",
        "Here it is: {}",
        "Here's my attempt: {}",
        "Sure thing! {}",
        "Got it! {}",
        "Rewritten caption: {}",
        "Rephrase: {}",
        "Alternative caption: {}",
        "Paraphrased version of the caption: {}",
        'Paraphrased Caption: "{}"',
        "**Paraphrased caption:** {}",
        "Paraphrase - {}",
        '"{}" (8 words)',
        # ... or on lines of its own, the answer after it
        'Sure! Here is a paraphrased version:\n\n"{}"',
        "Here is a concise paraphrase of the caption:\n\n{}",
        "Sure! Here's a concise paraphrase that avoids the original words.\n\n{}",
        "**Paraphrased caption**\n\n{}",
        "### Paraphrase\n{}",
        "Paraphrase\n{}",
        "Sure! I'd be happy to help.\n\n{}",
        "Sure.\n{}",
        "Below is a shorter way to say it:\n{}",
        "Here are two options:\n1. {}\n2. A red auto.",
        "Original: a red car parked near the old house\nParaphrase: {}",
        "1. {}\n2. A red auto.",
        "The paraphrased caption is: {}",
        "A possible paraphrase is: {}",
        "Paraphrased caption (8 words): {}",
        "> {}",
        "Rephrased caption -- {}",
        "Sure\n{}",
        "New caption: {}",
        "Here is a simpler description:\n{}",
    ],
)
def test_cleaning_strips_a_chat_models_lead_ins(raw):
    assert cleaning.clean(raw.format(ANSWER)) == ANSWER


@pytest.mark.parametrize(
    "caption",
    [
        # paraphrases that only start like a lead-in stay whole (a list marker, an acknowledgement word, a label)
        "1. FC Köln fans celebrate in the stadium",
        "3) Close-up of a dandelion",
        "- 20% off all summer dresses",
        "Sure Fire Red Hot Sauce bottle on a table",
        "Sure, a dog on a beach",
        "Okay, so this is a red car",
        "Of course, the cat sleeps on the sofa",
        "Text: Happy Birthday written on a chocolate cake",
        "Caption: sunset over the lake",
        "Version 2: the redesigned company logo",
        "My version: homemade lasagna",
        "The new version: iPhone 12 in blue",
        "Here is the text: welcome to Paris",
        "Here is my dog: a beagle",
        "Here's the new caption for the album: Abbey Road",
        "Output: 12V power supply adapter",
        "__init__ file icon",
        "'Tis the season: christmas lights on a house",
        "Step 1: mix the flour",
        "#1 Dad mug on a kitchen table",
        "#MeToo protesters march downtown",
    ],
)
def test_cleaning_keeps_answers_that_only_look_like_lead_ins(caption):
    assert cleaning.clean(caption) == caption


@pytest.mark.parametrize(
    "raw",
    [
        'A sign that reads:\n"Welcome home"',
        "A poster with the following text:\nSALE 50% OFF",
        "Caption contest winner:\nfunny cat",
    ],
)
def test_a_line_ending_in_a_colon_is_joined_with_the_words_after_it(raw):
    assert cleaning.clean(raw) == " ".join(raw.split())


def test_rejection_reasons():
    source = "a brown dog running on the beach"
    assert cleaning.reject_reason("", source) == cleaning.EMPTY
    assert cleaning.reject_reason(cleaning.clean('""'), source) == cleaning.EMPTY
    assert cleaning.reject_reason("I'm sorry, but I can't help with that.", source) == cleaning.REFUSAL
    assert cleaning.reject_reason("As an AI language model, I ...", source) == cleaning.REFUSAL
    assert cleaning.reject_reason("word " * 60, source) == cleaning.TOO_LONG
    assert (
        cleaning.reject_reason(
            "A brown dog, running on the beach!", source, step1_output="a brown dog running on the beach"
        )
        == cleaning.SAME_AS_STEP1
    )
    assert cleaning.reject_reason("A dog dashes along the shore", source) is None


def test_cache_persists_and_keys_on_everything(tmp_path):
    path = str(tmp_path / "c.sqlite")
    cache = CompletionCache(path)
    paper = {"backend": "openai", "temperature": 1.0, "top_p": 0.1, "max_tokens": 512}
    cache.put("m", "v1", paper, 1, 0, "a cat", Completion("a feline", 5, 3, finish_reason="stop"))
    cache.put("m", "v1", paper, 1, 0, "a gun", Completion.from_service(None, "content_filter", 5, 0))
    cache.close()
    cache = CompletionCache(path)  # a new process would see the same
    found = cache.get_many("m", "v1", dict(reversed(paper.items())), 1, 0, ["a cat", "a dog", "a gun"])
    assert sorted(found) == ["a cat", "a gun"]  # settings key is canonical: dict order does not matter
    assert (found["a cat"].text, found["a cat"].prompt_tokens, found["a cat"].completion_tokens) == ("a feline", 5, 3)
    assert found["a gun"].text is None and found["a gun"].error == "content_filter"  # a final answer, replayed
    changed = [
        {**paper, name: value}
        for name, value in (("temperature", 0.7), ("top_p", 0.9), ("max_tokens", 64), ("backend", "vllm"))
    ]
    for model, version, settings, step, attempt in (
        ("m2", "v1", paper, 1, 0),
        ("m", "v2", paper, 1, 0),
        ("m", "v1", paper, 2, 0),
        ("m", "v1", paper, 1, 1),
        *(("m", "v1", c, 1, 0) for c in changed),
    ):
        assert cache.get_many(model, version, settings, step, attempt, ["a cat"]) == {}
    many = [f"caption {i}" for i in range(1200)]  # more than one sqlite parameter chunk
    for text in many:
        cache.put("m", "v1", paper, 1, 0, text, Completion(text.upper()))
    assert len(cache.get_many("m", "v1", paper, 1, 0, many)) == 1200


def test_request_seed_is_a_function_of_the_cache_key():
    settings = {"backend": "vllm", "seed": 0}
    seed = request_seed("m", "v1", settings, 1, 0, "a cat")
    assert seed == request_seed("m", "v1", dict(settings), 1, 0, "a cat") and 0 <= seed < 2**31
    others = {
        request_seed("m", "v1", settings, 1, 1, "a cat"),
        request_seed("m", "v1", settings, 2, 0, "a cat"),
        request_seed("m", "v1", {**settings, "seed": 1}, 1, 0, "a cat"),
        request_seed("m", "v1", settings, 1, 0, "a dog"),
    }
    assert seed not in others and len(others) == 4


def test_job_splitting_and_slurm_defaults():
    paths = [f"{i:05d}.tar" for i in range(10)]
    parts = [split_for_job(paths, 3, i) for i in range(3)]
    assert sorted(sum(parts, [])) == paths and all(len(p) >= 3 for p in parts)
    assert slurm_job_defaults({}) == (1, 0)
    assert slurm_job_defaults({"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_ID": "3"}) == (4, 3)
    contiguous = {"SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "8"}
    assert slurm_job_defaults({**contiguous, "SLURM_ARRAY_TASK_ID": "8"}) == (8, 7)
    # `sbatch --array=5,17` (resubmitting two failed tasks of 32): count 2, min 5 say nothing about the split.
    with pytest.raises(ValueError, match="--num-jobs and --job-index explicitly"):
        slurm_job_defaults(
            {
                "SLURM_ARRAY_TASK_COUNT": "2",
                "SLURM_ARRAY_TASK_MIN": "5",
                "SLURM_ARRAY_TASK_MAX": "17",
                "SLURM_ARRAY_TASK_ID": "17",
            }
        )
    with pytest.raises(ValueError, match="job-index"):
        split_for_job(paths, 3, 3)


def test_caption_files_report_file_and_line(tmp_path):
    good = tmp_path / "c.jsonl"
    good.write_text('{"caption": " a cat "}\n\n{"caption": "a dog"}\n')
    assert [r["caption"] for r in read_caption_file(str(good))] == ["a cat", "a dog"]
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"caption": "a cat"}\n{"text": "a dog"}\n')
    with pytest.raises(InputError, match=r"d\.jsonl:2: no string field 'caption'"):
        read_caption_file(str(bad))


def test_a_caption_file_that_is_not_utf8_names_the_line_and_the_byte_offset(tmp_path):
    # Far past the text reader's buffer (8 KiB), whose own error counts from the buffer, not the file.
    head = "".join(f"a caption number {i} of the file\r\n" for i in range(3000)).encode()
    path = tmp_path / "caps.txt"
    path.write_bytes(head + b"caf\xe9 tables on a street\n")
    offset = len(head) + 3
    with pytest.raises(InputError, match=rf"caps\.txt:3001: not UTF-8 text: byte 0xe9 at offset {offset} of the file"):
        read_caption_file(str(path))


def test_output_names_and_inputs_that_would_share_one(tmp_path):
    assert [output_name(f"/d/{n}") for n in ("a.tar", "a.tar.gz", "b.TGZ", "c.tar.xz", "d.txt", "e.jsonl")] == [
        "a.tar",
        "a.tar",
        "b.tar",
        "c.tar",
        "d.jsonl",
        "e.jsonl",
    ]
    for first, second in (("part1.jsonl", "part1.txt"), ("00000.tar", "00000.tar.gz")):
        for name in (first, second):
            (tmp_path / name).write_bytes(b"")
        with pytest.raises(
            InputError,
            match=rf"{first} and .*{second}: both inputs would be written to the "
            rf"output '{output_name(second)}'",
        ):
            expand_inputs(f"{tmp_path}/{first}::{tmp_path}/{second}", output_name)
        for name in (first, second):
            (tmp_path / name).unlink()


def test_a_sample_key_twice_is_an_error_naming_the_file_and_the_key(tmp_path):
    jpg = b"\xff\xd8jpg"
    apart = write_samples(
        tmp_path / "apart.tar",
        [
            ("000001", {"jpg": jpg, "txt": b"a red car"}),
            ("000002", {"jpg": jpg, "txt": b"a boat"}),
            ("000001", {"jpg": jpg, "txt": b"a tree"}),
        ],
    )
    with pytest.raises(InputError, match=r"apart\.tar: sample key '000001' occurs twice, apart"):
        list(read_tar_samples(apart))
    twice = write_samples(
        tmp_path / "twice.tar", [("000003", {"jpg": jpg, "txt": b"a tree"}), ("000003", {"txt": b"a tall tree"})]
    )
    with pytest.raises(InputError, match=r"twice\.tar: sample '000003' has two 'txt' members"):
        list(read_tar_samples(twice))


@pytest.mark.parametrize("hard_links", [True, False])
def test_a_new_file_never_replaces_one(tmp_path, monkeypatch, hard_links):
    if not hard_links:  # as gcsfuse / s3fs answer link(2)

        def no_link(src, dst):
            raise OSError(errno.EOPNOTSUPP, "Operation not supported", src)

        monkeypatch.setattr(os, "link", no_link)
    path = str(tmp_path / "stats" / "run.json")
    (tmp_path / "stats").mkdir()
    assert atomic_create_text(path, "first") == path
    assert atomic_create_text(path, "second") == str(tmp_path / "stats" / "run-2.json")
    assert atomic_create_text(path, "third") == str(tmp_path / "stats" / "run-3.json")
    assert [(p.name, p.read_text()) for p in sorted((tmp_path / "stats").iterdir())] == [
        ("run-2.json", "second"),
        ("run-3.json", "third"),
        ("run.json", "first"),
    ]  # no temp file left


def test_tar_round_trip_in_webdataset_layout(tmp_path):
    path = str(tmp_path / "s.tar")
    with atomic_tar_writer(path) as sink:
        sink.write({"__key__": "k1", "jpg": b"\xff\xd8img", "txt": "a cat", "para1.txt": "p1"})
        sink.write({"__key__": "k2", "jpg": b"x", "txt": "b"})
    samples = list(read_tar_samples(path))
    assert [s["__key__"] for s in samples] == ["k1", "k2"]
    assert samples[0]["para1.txt"] == b"p1" and samples[0]["jpg"] == b"\xff\xd8img"
    # webdataset itself reads it as the same samples.
    import webdataset as wds

    read = list(wds.WebDataset(path, shardshuffle=False))
    assert [r["__key__"] for r in read] == ["k1", "k2"] and read[0]["para1.txt"] == b"p1"


def test_a_tar_cut_anywhere_is_an_error_naming_it(tmp_path):
    """tarfile takes a header cut short for the end of the archive; the reader must not: every cut of a
    shard, at any byte, is an InputError naming the file, never fewer samples."""
    import gzip
    import tarfile

    path = tmp_path / "s.tar"
    with atomic_tar_writer(str(path)) as sink:
        for i in range(6):
            sink.write({"__key__": f"k{i}", "jpg": bytes(range(256)) * 3, "txt": f"caption {i}"})
    whole = path.read_bytes()
    assert len(list(read_tar_samples(str(path)))) == 6
    with tarfile.open(path) as tar:
        tar.getmembers()
        members_end = tar.offset  # where the end-of-archive blocks start (then zero padding to a record)
    cuts = sorted(
        set(range(0, members_end + tarfile.BLOCKSIZE, 97)) | set(range(0, members_end + 1, tarfile.BLOCKSIZE))
    )  # header boundaries too
    cut_path = tmp_path / "cut.tar"
    for cut in cuts:
        cut_path.write_bytes(whole[:cut])
        with pytest.raises(InputError, match=str(cut_path)):
            list(read_tar_samples(str(cut_path)))
    zipped = gzip.compress(whole)
    for cut in (50, len(zipped) // 2):
        (tmp_path / "cut.tar.gz").write_bytes(zipped[:cut])
        with pytest.raises(InputError, match="cut.tar.gz"):
            list(read_tar_samples(str(tmp_path / "cut.tar.gz")))


def test_a_second_writer_of_the_same_shard_is_refused_and_a_dead_writers_partial_reused(tmp_path):
    import multiprocessing

    from paraclip_plugin.data.atomic import OutputBusy, partial_path

    path = str(tmp_path / "s.tar")
    with atomic_tar_writer(path) as first:
        first.write({"__key__": "a", "txt": "first"})
        with pytest.raises(OutputBusy, match=f"{path}: another process is writing it"):
            # another process (flock locks are per open file; a child has its own)
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                pool.apply(_write_one, (path,))
        first.write({"__key__": "b", "txt": "first"})
    assert [s["__key__"] for s in read_tar_samples(path)] == ["a", "b"]
    with open(partial_path(path), "wb") as stale:  # a killed writer's leftovers: no lock held
        stale.write(b"half a tar" * 1000)
    _write_one(path)
    assert [s["txt"] for s in read_tar_samples(path)] == [b"second"]
    assert not (tmp_path / "s.tar.partial").exists()


def test_a_partial_stays_locked_until_it_is_renamed(tmp_path, monkeypatch):
    """Released before the rename, the lock would let a second writer open the finished ``.partial`` and empty it
    just before it became the output."""
    import fcntl

    from paraclip_plugin.data import atomic

    path = str(tmp_path / "s.tar")
    locked_at_rename = []
    real = atomic.replace_durably

    def rename(tmp, final):
        with open(tmp, "rb") as other:  # another open file: as a second process's
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked_at_rename.append(False)
            except BlockingIOError:
                locked_at_rename.append(True)
        real(tmp, final)

    monkeypatch.setattr(atomic, "replace_durably", rename)
    _write_one(path)
    assert locked_at_rename == [True] and [s["txt"] for s in read_tar_samples(path)] == [b"second"]


def _write_one(path):
    with atomic_tar_writer(path) as sink:
        sink.write({"__key__": "c", "txt": "second"})


def test_outputs_are_fsynced_then_renamed_then_their_folder_fsynced(tmp_path, monkeypatch):
    """A rename is durable only once the folder is synced; a folder that can't be synced (EINVAL) still works."""

    from paraclip_plugin.data import atomic

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.abspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    folder = str(tmp_path)
    with atomic_tar_writer(os.path.join(folder, "s.tar")) as sink:
        sink.write({"__key__": "a", "txt": "x"})
    atomic.atomic_write_text(os.path.join(folder, "n.json"), "{}")
    tar, text = os.path.join(folder, "s.tar"), os.path.join(folder, "n.json")
    assert events[:3] == [("fsync", tar + ".partial"), ("replace", tar), ("fsync", folder)]
    assert events[3][0] == "fsync" and events[3][1].startswith(os.path.join(folder, ".tmp-"))
    assert events[4:] == [("replace", text), ("fsync", folder)]

    def no_dir_sync(fd):
        if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", no_dir_sync)
    atomic.atomic_write_text(text, "[1]")
    assert open(text).read() == "[1]"


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_outputs_get_the_modes_of_files_made_by_open_under_the_umask(tmp_path, umask):
    """Shards and sizes.json of one account are read by other accounts' training jobs: mkstemp's 0600 would hide
    sizes.json from them."""
    import os

    from paraclip_plugin.data.layout import update_sizes_json

    old = os.umask(umask)
    try:
        with atomic_tar_writer(str(tmp_path / "s.tar")) as sink:
            sink.write({"__key__": "a", "txt": "x"})
        update_sizes_json(str(tmp_path), {"s.tar": 1})
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    expected = os.stat(tmp_path / "plain").st_mode & 0o777
    assert expected == 0o666 & ~umask
    for name in ("s.tar", "sizes.json"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == expected, name


def test_generation_path_does_not_import_torch():
    code = (
        "import sys; import paraclip_plugin.paraphrase.pipeline, paraclip_plugin.paraphrase.backends.openai_backend, "
        "paraclip_plugin.paraphrase.backends.vllm_backend, paraclip_plugin.paraphrase.backends.batch_backend, "
        "paraclip_plugin.testing.local_server, paraclip_plugin.paraphrase.cli; "
        "import runpy; sys.argv = ['make_shards', '--help']\n"
        "try: runpy.run_path('scripts/make_shards.py', run_name='__main__')\n"
        "except SystemExit: pass\n"
        "bad = [m for m in ('torch', 'webdataset', 'vllm') if m in sys.modules]; assert not bad, bad"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]),
    )
    assert result.returncode == 0, result.stderr
