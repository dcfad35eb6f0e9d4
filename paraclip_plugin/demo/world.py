"""The demo's synthetic image-caption world: coloured shapes in spatial relations, like web data in miniature.

A scene is two objects (colour + shape) and a relation, e.g. "red circle left of blue square". For each
training sample the builder renders a small image of the scene and writes three texts:

    txt        a noisy web-style caption: odd casing, file names, product-code junk, but the scene's
               words always in the one canonical vocabulary ("red", "circle", "left of")
    para1.txt  a plain paraphrase that draws each word from the synonym sets ("crimson ring west of ...")
    para2.txt  a second paraphrase that shares no content word with para1 (see ``content_words``)

This is the setting ParaCLIP addresses: a CLIP trained on the captions alone (the demo's baseline) only
ever sees the canonical words, so a synonym-worded query lands somewhere else in its embedding space,
while paraphrase fine-tuning teaches the text tower that the synonyms mean the same thing.

The evaluation set asks exactly that: each pair is a canonical-worded query ("a red circle left of a
blue square") and a paraphrase using only non-canonical synonyms, with the gold image. Evaluation scenes
are held out: no training sample shows the same scene, counting "A left of B" and "B right of A" as one
(``Scene.canonical``), and every evaluation image is a separate rendering.

Everything is seeded: each sample draws from its own ``random.Random`` keyed by (seed, split, index), so
the same arguments give byte-identical shards, images and pairs files whatever the shard count.
"""

import io
import itertools
import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw

from ..data.atomic import atomic_write_text
from ..data.layout import CAPTION, METADATA, PARA1, PARA2, update_sizes_json
from ..data.tars import atomic_tar_writer

# Canonical word first; every word appears in exactly one set (checked by the tests).
COLOURS = {
    "red": ((215, 35, 35), ("red", "crimson", "scarlet")),
    "green": ((35, 170, 55), ("green", "emerald", "lime")),
    "blue": ((40, 60, 215), ("blue", "azure", "navy")),
    "yellow": ((235, 210, 30), ("yellow", "golden", "lemon")),
    "purple": ((140, 45, 175), ("purple", "violet", "lilac")),
    "orange": ((240, 130, 20), ("orange", "amber", "tangerine")),
}
SHAPES = {
    "circle": ("circle", "ring", "disc"),
    "square": ("square", "block", "box"),
    "triangle": ("triangle", "wedge", "pyramid"),
}
RELATIONS = {
    "left of": ("left of", "to the left of", "west of"),
    "right of": ("right of", "to the right of", "east of"),
    "above": ("above", "over", "on top of"),
    "below": ("below", "under", "beneath"),
}
# Each relation and the one that says the same with the objects swapped.
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
HORIZONTAL = ("left of", "right of")

# Words that carry no scene meaning; every other word is a content word. Templates of para1 and para2
# use disjoint content words ("image"/"photo" vs "picture"/"showing") so para2 can avoid para1's.
FUNCTION_WORDS = frozenset({"a", "an", "the", "of", "to", "on", "there", "is", "with"})
PARA1_TEMPLATES = ("{a} {rel} {b}", "an image of {a} {rel} {b}", "photo of {a} {rel} {b}")
PARA2_TEMPLATES = ("there is {a} {rel} {b}", "a picture showing {a} {rel} {b}", "{a} {rel} {b}")
QUERY_TEMPLATE = "{a} {rel} {b}"

CAPTION_JUNK = (
    lambda r: f"IMG_{r.randrange(10000):04d}.jpg",
    lambda r: f"DSC{r.randrange(100000):05d}.JPG",
    lambda r: f"SKU-{''.join(r.choice('ABCDEFGHJKLMNPQRSTUVWXYZ') for _ in range(2))}{r.randrange(1000, 10000)}",
    lambda r: f"#{r.randrange(100, 1000)}",
    lambda r: r.choice(("free shipping", "stock photo", "| shop now", "(2)", "- copy", "hd wallpaper", "buy 2 get 1")),
)


@dataclass(frozen=True)
class Scene:
    colour_a: str
    shape_a: str
    relation: str
    colour_b: str
    shape_b: str

    def inverse(self):
        """The same scene described from the other object ("B right of A" for "A left of B")."""
        return Scene(self.colour_b, self.shape_b, INVERSE[self.relation], self.colour_a, self.shape_a)

    def canonical(self):
        """One representative of the scene's two descriptions: relation "left of" or "above"."""
        return self if self.relation in ("left of", "above") else self.inverse()


def all_canonical_scenes():
    """Every scene of two different objects, once per meaning, in a fixed order."""
    objects = list(itertools.product(COLOURS, SHAPES))
    return [
        Scene(ca, sa, rel, cb, sb)
        for (ca, sa), (cb, sb) in itertools.permutations(objects, 2)
        for rel in ("left of", "above")
    ]


def content_words(text):
    """Lower-case words of ``text`` that are not function words: what para2 must not share with para1."""
    return set(re.findall(r"[a-z]+", text.lower())) - FUNCTION_WORDS


def _with_article(phrase):
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def describe(scene, words, template):
    """Fill ``template`` with the scene, each concept (colour, shape, relation) spelled as ``words[concept]``."""
    a = _with_article(f"{words[scene.colour_a]} {words[scene.shape_a]}")
    b = _with_article(f"{words[scene.colour_b]} {words[scene.shape_b]}")
    return template.format(a=a, rel=words[scene.relation], b=b)


def _synonyms(concept):
    if concept in COLOURS:
        return COLOURS[concept][1]
    return SHAPES.get(concept) or RELATIONS[concept]


def _concepts(scene):
    # dict keeps first-seen order and merges a colour or shape both objects share: one word per concept.
    return list(dict.fromkeys((scene.colour_a, scene.shape_a, scene.relation, scene.colour_b, scene.shape_b)))


def paraphrase_pair(scene, rng):
    """(para1, para2): para1 picks any synonym per concept; para2 only those sharing no content word with para1."""
    words1 = {c: rng.choice(_synonyms(c)) for c in _concepts(scene)}
    para1 = describe(scene, words1, rng.choice(PARA1_TEMPLATES))
    taken = content_words(para1)
    words2 = {c: rng.choice([w for w in _synonyms(c) if not content_words(w) & taken]) for c in _concepts(scene)}
    para2 = describe(scene, words2, rng.choice(PARA2_TEMPLATES))
    assert not content_words(para2) & taken, (para1, para2)
    return para1, para2


def noisy_caption(scene, rng):
    """A web-style caption: canonical words only, random casing, optional articles, junk before and/or after."""
    canonical = {c: c for c in _concepts(scene)}
    core = describe(scene, canonical, QUERY_TEMPLATE)
    words = core.split()
    if rng.random() < 0.5:
        words = [w for w in words if w not in ("a", "an")]  # web captions often drop articles
    core = " ".join(rng.choice((str.lower, str.lower, str.upper, str.title))(w) for w in words)
    before = rng.choice(CAPTION_JUNK)(rng) + " " if rng.random() < 0.6 else ""
    after = " " + rng.choice(CAPTION_JUNK)(rng) if rng.random() < 0.6 else ""
    return before + core + after


def eval_query(scene):
    """The evaluation query: plain wording with the canonical words, the baseline's own vocabulary."""
    return describe(scene, {c: c for c in _concepts(scene)}, QUERY_TEMPLATE)


def eval_paraphrase(scene, rng):
    """The evaluation paraphrase: same template, no content word of the canonical one ("west of", not "to the left of")."""
    words = {
        c: rng.choice([w for w in _synonyms(c) if not content_words(w) & content_words(c)]) for c in _concepts(scene)
    }
    return describe(scene, words, QUERY_TEMPLATE)


def _draw_shape(draw, shape, centre, radius, fill):
    x, y = centre
    if shape == "circle":
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=fill)
    elif shape == "square":
        side = radius * 0.9  # a square of the circle's area looks the same size
        draw.rectangle((x - side, y - side, x + side, y + side), fill=fill)
    else:
        draw.polygon(
            ((x, y - radius * 1.1), (x - radius * 1.1, y + radius * 0.8), (x + radius * 1.1, y + radius * 0.8)),
            fill=fill,
        )


def render_scene(scene, rng, size=32, supersample=4):
    """PNG bytes of the scene: object a on the side its relation says, jittered position, size and colour.

    Drawn ``supersample`` times larger and downscaled, so 32-pixel shapes keep smooth, recognisable edges.
    The main-axis gap (>= 0.32 of the image) always exceeds the cross-axis offset (<= 0.3), so the
    relation is never ambiguous.
    """
    canvas = size * supersample
    grey = rng.randrange(170, 236)
    image = Image.new("RGB", (canvas, canvas), tuple(min(255, grey + rng.randrange(-12, 13)) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    first, second = rng.uniform(0.2, 0.34), rng.uniform(0.66, 0.8)
    a_main, b_main = (first, second) if scene.relation in ("left of", "above") else (second, first)
    for colour, shape, main in ((scene.colour_a, scene.shape_a, a_main), (scene.colour_b, scene.shape_b, b_main)):
        cross = rng.uniform(0.35, 0.65)
        x, y = (main, cross) if scene.relation in HORIZONTAL else (cross, main)
        fill = tuple(max(0, min(255, c + rng.randrange(-25, 26))) for c in COLOURS[colour][0])
        _draw_shape(draw, shape, (x * canvas, y * canvas), rng.uniform(0.11, 0.16) * canvas, fill)
    buffer = io.BytesIO()
    image.resize((size, size), Image.LANCZOS).save(buffer, format="PNG")
    return buffer.getvalue()


def split_scenes(seed, num_eval):
    """(train scenes, eval scenes): a seeded shuffle of all canonical scenes, the first ``num_eval`` held out."""
    scenes = all_canonical_scenes()
    if not 0 < num_eval < len(scenes):
        raise ValueError(f"num_eval must be in 1..{len(scenes) - 1}, got {num_eval}")
    random.Random(f"{seed}:split").shuffle(scenes)
    return scenes[num_eval:], scenes[:num_eval]


def _sample_rng(seed, split, index):
    # String seeds go through SHA-512 in random.seed, so they are stable across processes and platforms.
    return random.Random(f"{seed}:{split}:{index}")


def training_sample(index, train_scenes, seed, image_size=32):
    """One four-field sample (webdataset dict) for global sample number ``index``."""
    rng = _sample_rng(seed, "train", index)
    scene = rng.choice(train_scenes)
    if rng.random() < 0.5:
        scene = scene.inverse()  # captions describe a scene from either object, as people do
    para1, para2 = paraphrase_pair(scene, rng)
    return {
        "__key__": f"{index:08d}",
        "png": render_scene(scene, rng, image_size),
        CAPTION: noisy_caption(scene, rng),
        PARA1: para1,
        PARA2: para2,
        METADATA: json.dumps({"scene": asdict(scene)}),
    }


def eval_pair(index, scene, seed, image_size=32):
    """(pairs-file record, PNG bytes) for held-out scene ``scene``."""
    rng = _sample_rng(seed, "eval", index)
    if rng.random() < 0.5:
        scene = scene.inverse()
    image = render_scene(scene, rng, image_size)
    record = {
        "query": eval_query(scene),
        "paraphrase": eval_paraphrase(scene, rng),
        "image": f"{index:05d}.png",
        "scene": asdict(scene),
    }
    return record, image


@dataclass(frozen=True)
class World:
    """Where ``build_world`` put things; ``train_shards`` is the brace pattern for ``--train-data``."""

    root: str
    train_dir: str
    train_shards: str
    num_train: int
    num_shards: int
    eval_pairs: str
    eval_images: str
    num_eval: int


MANIFEST = "world.json"


def _prepare(root, train_dir, eval_dir):
    """Start from empty output folders; only ever delete folders a previous build (its manifest) made."""
    made_by_us = os.path.exists(os.path.join(root, MANIFEST))
    for folder in (train_dir, eval_dir):
        if os.path.isdir(folder) and os.listdir(folder):
            if not made_by_us:
                raise FileExistsError(
                    f"{folder} is not empty and {root} holds no {MANIFEST} (it was not made by "
                    f"a demo build): refusing to overwrite it; choose another --output"
                )
            shutil.rmtree(folder)
        os.makedirs(folder, exist_ok=True)


def build_world(root, num_train=4096, num_shards=8, num_eval=100, seed=0, image_size=32):
    """Write the training shards (``root/train``) and the evaluation set (``root/eval``); return a ``World``.

    Shards are ``train/00000.tar`` ... with ``sizes.json``, split as evenly as possible so ranks and data
    workers can share them; the evaluation set is ``eval/images/*.png`` + ``eval/pairs.jsonl`` in the
    format ``paraclip-eval paraphrased-retrieval`` reads.
    """
    if not 1 <= num_shards <= num_train:
        raise ValueError(f"num_shards must be in 1..num_train ({num_train}), got {num_shards}")
    root = os.path.abspath(root)
    train_dir, eval_dir = os.path.join(root, "train"), os.path.join(root, "eval")
    images_dir = os.path.join(eval_dir, "images")
    os.makedirs(root, exist_ok=True)
    _prepare(root, train_dir, eval_dir)
    # first: a build stopped from here on leaves folders a rerun knows it made (and replaces)
    atomic_write_text(os.path.join(root, MANIFEST), json.dumps({"state": "building", "seed": seed}) + "\n")
    train_scenes, eval_scenes = split_scenes(seed, num_eval)

    sizes = {}
    for shard in range(num_shards):
        start, stop = shard * num_train // num_shards, (shard + 1) * num_train // num_shards
        name = f"{shard:05d}.tar"
        # mtime fixed so equal content gives byte-identical tar files.
        with atomic_tar_writer(os.path.join(train_dir, name), mtime=0) as sink:
            for index in range(start, stop):
                sink.write(training_sample(index, train_scenes, seed, image_size))
        sizes[name] = stop - start
    update_sizes_json(train_dir, sizes)

    os.makedirs(images_dir)
    records = []
    for index, scene in enumerate(eval_scenes):
        record, image = eval_pair(index, scene, seed, image_size)
        with open(os.path.join(images_dir, record["image"]), "wb") as f:
            f.write(image)
        records.append(json.dumps(record))
    pairs_path = os.path.join(eval_dir, "pairs.jsonl")
    atomic_write_text(pairs_path, "\n".join(records) + "\n")

    world = World(
        root,
        train_dir,
        os.path.join(train_dir, f"{{00000..{num_shards - 1:05d}}}.tar"),
        num_train,
        num_shards,
        pairs_path,
        images_dir,
        num_eval,
    )
    atomic_write_text(
        os.path.join(root, MANIFEST),
        json.dumps({"seed": seed, "image_size": image_size, **asdict(world)}, indent=1) + "\n",
    )
    return world
