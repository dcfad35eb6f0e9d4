"""The demo's synthetic world: four fields everywhere, seeded determinism, paraphrase grammar, held-out eval set."""

import filecmp
import io
import json
import os
import tarfile
from collections import defaultdict

import pytest
from PIL import Image

from conftest import TINY_CONFIG
from paraclip_plugin.demo.world import COLOURS, RELATIONS, SHAPES, Scene, build_world, content_words
from paraclip_plugin.eval.paraphrased_retrieval import build_gallery, read_pairs
from paraclip_plugin.data.layout import CAPTION, METADATA, PARA1, PARA2, SIZES_FILE

FIELDS = ("png", CAPTION, PARA1, PARA2, METADATA)
SYNONYM_SETS = {**{c: words for c, (_, words) in COLOURS.items()}, **SHAPES, **RELATIONS}
WORD_TO_CONCEPT = {w: concept for concept, phrases in SYNONYM_SETS.items() for p in phrases for w in content_words(p)}
CANONICAL_WORDS = {w for concept in SYNONYM_SETS for w in content_words(concept)}


def read_samples(tar_path):
    """{key: {field: bytes}} of one shard, grouped the way webdataset groups members (key = name up to first '.')."""
    samples = defaultdict(dict)
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            key, field = member.name.split(".", 1)
            samples[key][field] = tar.extractfile(member).read()
    return dict(samples)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"), num_train=240, num_shards=4, num_eval=40, seed=3)


@pytest.fixture(scope="module")
def samples(world):
    per_shard = {}
    for shard in range(world.num_shards):
        per_shard[f"{shard:05d}.tar"] = read_samples(os.path.join(world.train_dir, f"{shard:05d}.tar"))
    return per_shard


def scene_of(sample):
    return Scene(**json.loads(sample[METADATA])["scene"])


def test_every_sample_has_all_fields_and_sizes_json_matches(world, samples):
    with open(os.path.join(world.train_dir, SIZES_FILE)) as f:
        sizes = json.load(f)
    assert sizes == {name: len(shard) for name, shard in samples.items()}
    assert sum(sizes.values()) == world.num_train and set(sizes.values()) == {world.num_train // world.num_shards}
    keys = [key for shard in samples.values() for key in shard]
    assert len(set(keys)) == world.num_train
    for shard in samples.values():
        for sample in shard.values():
            assert set(sample) == set(FIELDS)
            assert all(sample[f].strip() for f in FIELDS)
            assert Image.open(io.BytesIO(sample["png"])).size == (32, 32)


def test_paraphrases_follow_the_grammar(samples):
    # Content words: lower-case words outside the function words ("a", "of", "the", ...; world.FUNCTION_WORDS).
    for shard in samples.values():
        for sample in shard.values():
            scene = scene_of(sample)
            meaning = {scene.colour_a, scene.shape_a, scene.relation, scene.colour_b, scene.shape_b}
            para1, para2 = sample[PARA1].decode(), sample[PARA2].decode()
            assert not content_words(para1) & content_words(para2), (para1, para2)
            for para in (para1, para2):
                # Every scene word of a paraphrase names one of the scene's own concepts, and all concepts appear.
                concepts = {WORD_TO_CONCEPT[w] for w in content_words(para) if w in WORD_TO_CONCEPT}
                assert concepts == meaning, (para, scene)
            # The caption is noisy but speaks only the canonical vocabulary: that is what the baseline learns from.
            caption_scene_words = content_words(sample[CAPTION].decode()) & set(WORD_TO_CONCEPT)
            assert caption_scene_words <= CANONICAL_WORDS, sample[CAPTION]


def test_synonym_words_belong_to_one_concept_each():
    seen = {}
    for concept, phrases in SYNONYM_SETS.items():
        assert phrases[0] == concept  # the canonical word leads its set
        for word in {w for p in phrases for w in content_words(p)}:
            assert seen.setdefault(word, concept) == concept, word


def test_eval_set_is_held_out_and_readable_by_the_evaluation(world, samples):
    pairs = read_pairs(world.eval_pairs)
    names, gold = build_gallery(pairs, world.eval_images, world.eval_pairs)
    assert len(pairs) == len(names) == world.num_eval and sorted(gold.tolist()) == list(range(world.num_eval))
    records = [json.loads(line) for line in open(world.eval_pairs)]
    eval_scenes = {Scene(**r["scene"]).canonical() for r in records}
    assert len(eval_scenes) == world.num_eval  # one gold image per scene: no ambiguous golds
    train_samples = [s for shard in samples.values() for s in shard.values()]
    assert not eval_scenes & {scene_of(s).canonical() for s in train_samples}
    train_images = {s["png"] for s in train_samples}
    for record in records:
        with open(os.path.join(world.eval_images, record["image"]), "rb") as f:
            assert f.read() not in train_images
        query, paraphrase = content_words(record["query"]), content_words(record["paraphrase"])
        assert query <= CANONICAL_WORDS and not paraphrase & CANONICAL_WORDS, record
        assert {WORD_TO_CONCEPT[w] for w in query} == {WORD_TO_CONCEPT[w] for w in paraphrase}


def _centroid(image, rgb):
    """Mean (x, y) of pixels close to ``rgb``."""
    points = [
        (x, y)
        for y in range(image.height)
        for x in range(image.width)
        if sum(abs(a - b) for a, b in zip(image.getpixel((x, y)), rgb)) < 90
    ]
    assert points, rgb
    return tuple(sum(p[i] for p in points) / len(points) for i in (0, 1))


def test_images_show_the_relation_their_scene_states(world):
    checked = 0
    for record in map(json.loads, open(world.eval_pairs)):
        scene = Scene(**record["scene"])
        if scene.colour_a == scene.colour_b:
            continue
        image = Image.open(os.path.join(world.eval_images, record["image"])).convert("RGB")
        (xa, ya), (xb, yb) = (_centroid(image, COLOURS[c][0]) for c in (scene.colour_a, scene.colour_b))
        expected = {"left of": xa < xb, "right of": xa > xb, "above": ya < yb, "below": ya > yb}
        assert expected[scene.relation], record
        checked += 1
    assert checked >= world.num_eval // 2


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path, world):
    again = build_world(tmp_path / "again", num_train=240, num_shards=4, num_eval=40, seed=3)
    names = [f"{s:05d}.tar" for s in range(4)] + [SIZES_FILE]
    match, mismatch, errors = filecmp.cmpfiles(world.train_dir, again.train_dir, names, shallow=False)
    assert match == names and not errors
    assert filecmp.cmp(world.eval_pairs, again.eval_pairs, shallow=False)
    assert not filecmp.dircmp(world.eval_images, again.eval_images).diff_files
    # Rebuilding over a previous build replaces it; another seed changes the data.
    other = build_world(tmp_path / "again", num_train=240, num_shards=4, num_eval=40, seed=4)
    assert not filecmp.cmp(
        os.path.join(world.train_dir, "00000.tar"), os.path.join(other.train_dir, "00000.tar"), shallow=False
    )


def test_refuses_to_overwrite_folders_it_did_not_make(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "precious.tar").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="refusing to overwrite it; choose another --output"):
        build_world(tmp_path, num_train=8, num_shards=2, num_eval=4)
    assert (tmp_path / "train" / "precious.tar").exists()


def test_a_build_stopped_midway_is_rebuilt_by_the_rerun(tmp_path, monkeypatch):
    import paraclip_plugin.demo.world as world_module

    real = world_module.training_sample
    calls = []

    def stop_at_the_third_shard(index, *args):
        calls.append(index)
        if index == 4:
            raise KeyboardInterrupt  # as Ctrl-C while shard 2 of 4 is written
        return real(index, *args)

    monkeypatch.setattr(world_module, "training_sample", stop_at_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        build_world(tmp_path, num_train=8, num_shards=4, num_eval=4)
    assert sorted(os.listdir(tmp_path / "train")) == ["00000.tar", "00001.tar"]  # what was done, no partial
    monkeypatch.setattr(world_module, "training_sample", real)
    world = build_world(tmp_path, num_train=8, num_shards=4, num_eval=4)
    assert sorted(p for p in os.listdir(world.train_dir) if p.endswith(".tar")) == [f"{i:05d}.tar" for i in range(4)]
    assert json.load(open(tmp_path / "world.json"))["num_train"] == 8


def test_every_text_fits_the_tiny_models_context(samples):
    # open_clip truncates silently; a caption cut before its scene words would teach nothing.
    from open_clip import SimpleTokenizer

    tokenizer = SimpleTokenizer()
    context = json.load(open(TINY_CONFIG))["text_cfg"]["context_length"]
    longest = max(
        len(tokenizer.encode(sample[field].decode()))
        for shard in samples.values()
        for sample in shard.values()
        for field in (CAPTION, PARA1, PARA2)
    )
    assert longest <= context - 2  # start and end tokens
