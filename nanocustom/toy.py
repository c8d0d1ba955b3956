"""The shapes world: a procedurally rendered stand-in for LAION that a tiny SD v1 can learn on a CPU.

A scene holds one or two objects (6 shapes x 8 colours x 3 sizes; a quarter of them patterned in two colours:
striped, split, dotted or checked) on a plain background, and its caption states some of what is in it: "a red
circle", "a small red circle on a blue background", "a red and white striped circle", "a red circle on the left
and a green square on the right", "photo of a square". Four held-out concepts, one exact look each that no
pretraining scene has, play the user's photos: a square with red and white stripes is "<new1> square", as a dog
is "V* dog" in Custom Diffusion (Kumari et al. 2023, Sec. 3.1). Pretraining draws stripes on squares and red
and white stripes on circles, never red and white stripes on a square: the model knows patterns, as SD knows fur,
and what fine-tuning must learn is which pattern and colours the token means.

A small CNN trained on renders scores what a model generates. It describes an image as a Scene: what sits in
each of three slots (left, centre, right), the background, and which concept, if any, each object is. From
that description: prompt_adherence (does the image show everything the prompt says), concept_presence (is the
concept there) and background_preservation (does the image keep a reference image's background outside the
objects; for LAG sampling, Ham et al. 2024, Sec. 3.3).

Images go in as uint8 numpy [N, 64, 64, 3] (or one [64, 64, 3]) or as float torch [N, 3, 64, 64] in [-1, 1],
what the VAE decodes to. Everything is deterministic from a seed.

    python -m nanocustom.toy render --n 16 --out out/world   # a grid PNG to look at
    python -m nanocustom.toy concepts                        # rewrite nanocustom/assets/concepts/<name>/0?.png
    python -m nanocustom.toy train-evaluator                 # weights/shapes-evaluator.safetensors
"""
import argparse
import itertools
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import save_file

from nanocustom.errors import NanocustomError

ROOT = Path(__file__).resolve().parent
CONCEPTS_DIR = ROOT / "assets" / "concepts"
EVALUATOR_PATH = ROOT.parent / "weights" / "shapes-evaluator.safetensors"
HELDOUT_SEED = 10**6  # the evaluator trains on batch seeds [seed, step]; integer seeds from here on are unseen

# ----------------------------------------------------------------------------- the world's vocabulary

RES, SS = 64, 4  # image side; objects are drawn at SS x the resolution and box-filtered down (antialiasing)
SHAPES = ("circle", "square", "triangle", "star", "heart", "cross")
COLOURS = {  # RGB that a person names this way
    "red": (220, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (250, 215, 35),
    "green": (35, 155, 60),
    "blue": (35, 80, 215),
    "purple": (130, 50, 175),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
BACKGROUNDS = {**COLOURS, "gray": (128, 128, 128)}  # a background never has the colour of an object on it
SIZES = {"small": 7.0, "medium": 10.0, "big": 14.0}  # half-extent in pixels; captions leave "medium" unsaid
SLOTS = ("left", "centre", "right")  # where an object stands; a pair always takes left and right
SLOT_X = {"left": 17.0, "centre": 32.0, "right": 47.0}  # a lone object's centre, +-3 px
PAIR_X = {"left": 16.0, "right": 48.0}  # the two objects of a pair, +-2 px, so that they never touch
POSITION_WORDS = {"left": "on the left", "centre": "in the middle", "right": "on the right"}


@dataclass
class Obj:
    shape: str
    colour: str | None = None    # None for a concept object (it has its own colours) or when a caption is silent
    size: str | None = None      # small | medium | big
    position: str | None = None  # left | centre | right
    concept: str | None = None   # a held-out concept's name (it has its own look), or None
    pattern: str | None = None   # None for a solid object, else a key of PATTERNS, painted in colour and colour2
    colour2: str | None = None
    x: float = 0.0               # centre and half-extent in pixels; only render() reads them
    y: float = 0.0
    r: float = 0.0

    def attributes(self):
        return (self.shape, self.colour, self.size, self.position, self.concept, self.pattern, self.colour2)


@dataclass
class Scene:
    objects: list[Obj]             # in the order the caption names them
    background: str | None = None

    def attributes(self):
        return ([o.attributes() for o in self.objects], self.background)


# ----------------------------------------------------------------------------- patterns and held-out concepts

def _stripes(u, v):
    return np.floor((u + v) / 0.8).astype(np.int64) % 2  # diagonal bands 0.4 radii wide along u + v


def _halves(u, v):
    return (u > 0).astype(np.int64)


def _dots(u, v, spacing=0.55, radius=0.17):  # a hexagonal grid of dots
    row = np.round(v / (spacing * 0.866))
    du = u - spacing * 0.5 * (row % 2)
    du = du - spacing * np.round(du / spacing)
    dv = v - row * spacing * 0.866
    return (du**2 + dv**2 < radius**2).astype(np.int64)


def _checks(u, v, cell=0.5):
    return (np.floor(u / cell) + np.floor(v / cell)).astype(np.int64) % 2


# pattern word (one CLIP token each) -> (u, v) in object radii from its centre, v down -> index into the two colours
PATTERNS: dict[str, Callable] = {"striped": _stripes, "split": _halves, "dotted": _dots, "checked": _checks}
PATTERN_PROB = 0.25  # the chance that a pretraining object is patterned


@dataclass(frozen=True)
class Concept:
    name: str
    shape: str                 # the class word the world already knows: "<new1> square"
    colours: tuple[str, str]   # what the pattern paints with; the background avoids them
    pattern: str               # a key of PATTERNS


CONCEPTS = {c.name: c for c in [
    Concept("striped_square", "square", ("red", "white"), "striped"),
    Concept("split_circle", "circle", ("blue", "yellow"), "split"),
    Concept("dotted_triangle", "triangle", ("white", "black"), "dotted"),
    Concept("checkered_star", "star", ("yellow", "black"), "checked"),
]}
CONCEPT_SIZES = ("medium", "big")  # a pattern needs room: at "small" stripes and dots blur to one colour
DEFAULT_TOKENS = {name: f"<new{i + 1}>" for i, name in enumerate(CONCEPTS)}  # concept -> its word in captions


def concept_of_look(shape, pattern, colours):
    """The held-out concept that an object of this shape, pattern and pair of colours (either order, as the
    evaluator reads them: scene_labels) would be, or None. Pretraining draws every look but these four."""
    for c in CONCEPTS.values():
        if (c.shape, c.pattern, set(c.colours)) == (shape, pattern, set(colours)):
            return c.name
    return None


def look(o):
    """An object -> (pattern function or None, its colours): a concept's own look, a pattern, or one colour."""
    if o.concept is not None:
        c = CONCEPTS[o.concept]
        return PATTERNS[c.pattern], c.colours
    if o.pattern is not None:
        return PATTERNS[o.pattern], (o.colour, o.colour2)
    return None, (o.colour,)

# ----------------------------------------------------------------------------- rendering


def _unit_polygon(shape):
    """Vertices (K, 2), x right and y down, with the bounding box centred on 0 and half-extent 1 (times a scale
    that evens out how big the shapes look)."""
    t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    if shape == "circle":
        p, scale = np.stack([np.cos(t), np.sin(t)], 1), 1.0
    elif shape == "square":
        p, scale = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float), 0.85
    elif shape == "triangle":
        a = np.radians([-90, 30, 150])
        p, scale = np.stack([np.cos(a), np.sin(a)], 1), 1.1
    elif shape == "star":
        a = np.radians(-90 + 36 * np.arange(10))
        radius = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        p, scale = np.stack([radius * np.cos(a), radius * np.sin(a)], 1), 1.05
    elif shape == "heart":  # the classic parametric heart
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        p, scale = np.stack([x, y], 1), 0.95
    elif shape == "cross":  # a plus sign with arms 0.34 wide
        a = 0.34
        p = np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a],
                      [a, 1], [-a, 1], [-a, a], [-1, a], [-1, -a], [-a, -a]], float)
        scale = 0.95
    p = p - (p.max(0) + p.min(0)) / 2
    return p / np.abs(p).max() * scale


POLYGONS = {shape: _unit_polygon(shape) for shape in SHAPES}
_V, _U = (np.mgrid[0:RES * SS, 0:RES * SS] + 0.5) / SS  # supersample centres in image pixels


def _downsample(a):
    """(h*SS, w*SS, ...) -> (h, w, ...), the mean of each SS x SS block."""
    h, w = a.shape[0] // SS, a.shape[1] // SS
    return a.reshape(h, SS, w, SS, *a.shape[2:]).mean((1, 3))


def render(scene):
    """Scene (with geometry, e.g. from random_scene) -> uint8 [64, 64, 3]."""
    canvas = np.empty((RES, RES, 3), np.float32)
    canvas[:] = BACKGROUNDS[scene.background]
    for o in scene.objects:  # drawn inside the object's box of whole pixels only, which is faster
        x0, y0 = max(0, int(o.x - o.r) - 1), max(0, int(o.y - o.r) - 1)
        x1, y1 = min(RES, int(o.x + o.r) + 2), min(RES, int(o.y + o.r) + 2)
        mask = Image.new("L", ((x1 - x0) * SS, (y1 - y0) * SS), 0)
        if o.shape == "circle":
            box = [(o.x - o.r - x0) * SS, (o.y - o.r - y0) * SS, (o.x + o.r - x0) * SS, (o.y + o.r - y0) * SS]
            ImageDraw.Draw(mask).ellipse(box, fill=255)
        else:
            points = (np.array([o.x - x0, o.y - y0]) + o.r * POLYGONS[o.shape]) * SS
            ImageDraw.Draw(mask).polygon([tuple(p) for p in points], fill=255)
        mask = np.asarray(mask, np.float32) / 255
        alpha = _downsample(mask)[..., None]
        pattern, colours = look(o)
        if pattern is None:
            paint = alpha * np.array(COLOURS[colours[0]], np.float32)
        else:  # paint the pattern, then composite its premultiplied colour like the solid case
            u, v = _U[y0 * SS:y1 * SS, x0 * SS:x1 * SS], _V[y0 * SS:y1 * SS, x0 * SS:x1 * SS]
            index = pattern((u - o.x) / o.r, (v - o.y) / o.r)
            paint = _downsample(mask[..., None] * np.array([COLOURS[k] for k in colours], np.float32)[index])
        canvas[y0:y1, x0:x1] = canvas[y0:y1, x0:x1] * (1 - alpha) + paint
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- scenes and captions

def _pick(rng, options):
    options = list(options)
    return options[rng.integers(len(options))]


def complete_scene(spec, rng):
    """Fill in what a partial Scene (e.g. from parse_caption) leaves open: colours, sizes, positions, geometry,
    background. The result is a scene the caption describes truly."""
    objects = [Obj(**{k: getattr(o, k) for k in ("shape", "colour", "size", "position", "concept", "pattern",
                                                 "colour2")}) for o in spec.objects]
    if len(objects) not in (1, 2):
        raise NanocustomError(f"a scene holds one or two objects, not {len(objects)}; name one or two")
    if len(objects) == 1:
        objects[0].position = objects[0].position or _pick(rng, SLOTS)
    else:
        a, b = objects
        if a.position is None and b.position is None:
            a.position = _pick(rng, PAIR_X)
        a.position = a.position or {"left": "right", "right": "left"}.get(b.position)
        b.position = b.position or {"left": "right", "right": "left"}.get(a.position)
        if {a.position, b.position} != {"left", "right"}:
            raise NanocustomError(f"the two objects of a pair stand left and right, not {a.position} and {b.position}")
    for o in objects:
        if o.pattern is not None and o.colour is None and o.colour2 is None:  # any two colours but a concept's
            pairs = [(a, b) for a in COLOURS for b in COLOURS if a != b and spec.background not in (a, b)
                     and concept_of_look(o.shape, o.pattern, (a, b)) is None]
            o.colour, o.colour2 = _pick(rng, pairs)
        elif o.pattern is not None and None in (o.colour, o.colour2):
            raise NanocustomError(f"a {o.pattern} {o.shape} has two colours; name both ('a red and white "
                                  f"{o.pattern} {o.shape}') or neither")
        if o.concept is None and o.colour is None:  # not the background's, and a pair is never two identical objects
            taken = {p.colour for p in objects if p is not o and p.shape == o.shape and p.concept is None}
            o.colour = _pick(rng, [c for c in COLOURS if c not in taken and c != spec.background])
        o.size = o.size or _pick(rng, CONCEPT_SIZES if o.concept or o.pattern else SIZES)
        o.r = SIZES[o.size] + rng.uniform(-0.5, 0.5)
        if len(objects) == 1:
            o.x = SLOT_X[o.position] + rng.uniform(-3, 3)
        else:
            o.x = PAIR_X[o.position] + rng.uniform(-2, 2)
        o.x = float(np.clip(o.x, o.r + 1, RES - 1 - o.r))
        o.y = float(np.clip(RES / 2 + rng.uniform(-8, 8), o.r + 1, RES - 1 - o.r))
    used = {name for o in objects for name in look(o)[1]}
    if spec.background in used:
        raise NanocustomError(f"a {spec.background} object on a {spec.background} background is invisible; "
                              "pick another background")
    background = spec.background or _pick(rng, [b for b in BACKGROUNDS if b not in used])
    return Scene(objects, background)


def near_miss(rng):
    """An object one step from a held-out concept: its pattern and colours on another shape, its shape and
    pattern with one colour changed, its shape and colours in another pattern, or (a quarter of the time) the
    concept itself with its colours swapped, which still is the concept (a mirrored split circle). The evaluator
    learns the differences from these."""
    c = CONCEPTS[_pick(rng, CONCEPTS)]
    shape, pattern, colours = c.shape, c.pattern, list(c.colours)
    kind = rng.integers(4)
    if kind == 0:
        shape = _pick(rng, [s for s in SHAPES if s != c.shape])
    elif kind == 1:
        i = rng.integers(2)
        colours[i] = _pick(rng, [k for k in COLOURS if k not in c.colours])
    elif kind == 2:
        pattern = _pick(rng, [p for p in PATTERNS if p != c.pattern])
    else:
        colours = colours[::-1]
    return Obj(shape, colours[0], pattern=pattern, colour2=colours[1])


def random_scene(rng, concept_prob=0.0, pair_prob=0.5, pattern_prob=PATTERN_PROB, near_miss_prob=0.0):
    """One object, or two with probability pair_prob; each a held-out concept with probability concept_prob
    (0 for pretraining), else a near miss of one with probability near_miss_prob (0 for pretraining), else
    patterned with probability pattern_prob, else solid."""
    objects = []
    for _ in range(2 if rng.random() >= 1 - pair_prob else 1):  # at 0.5, the same draws as before pair_prob
        if rng.random() < concept_prob:
            name = _pick(rng, [c for c in CONCEPTS if c not in {o.concept for o in objects}])
            objects.append(Obj(CONCEPTS[name].shape, concept=name))
        elif near_miss_prob and rng.random() < near_miss_prob:
            objects.append(near_miss(rng))
        elif rng.random() < pattern_prob:
            objects.append(Obj(_pick(rng, SHAPES), pattern=_pick(rng, PATTERNS)))
        else:
            objects.append(Obj(_pick(rng, SHAPES)))
    return complete_scene(Scene(objects), rng)


def concept_scene(name, rng, beside=None):
    """The concept `name` at a random size, position and background; beside=None alone, "object" next to a
    random solid-colour object, or another concept's name next to that concept."""
    objects = [Obj(CONCEPTS[name].shape, concept=name)]
    if beside == "object":
        objects.append(Obj(_pick(rng, SHAPES)))
    elif beside is not None:
        objects.append(Obj(CONCEPTS[beside].shape, concept=beside))
    objects = [objects[i] for i in rng.permutation(len(objects))]
    return complete_scene(Scene(objects), rng)


def render_concept(name, rng, beside=None):
    """uint8 [64, 64, 3]: render(concept_scene(name, rng, beside))."""
    return render(concept_scene(name, rng, beside))


def _article(word):
    return "an" if word[0] in "aeiou" else "a"


def caption(scene, colour=True, size=False, position=False, background=False, photo=False, tokens=None):
    """Scene -> English, stating the shapes and whichever of colour/size/position/background is asked for.

    Objects are named in scene order; a concept object is named by its token ("a <new1> square") in place of
    a colour; a patterned one by its pattern, after its two colours if colour=True ("a red and white striped
    square"). size=True says "small"/"big" and leaves medium unsaid."""
    tokens = tokens or DEFAULT_TOKENS
    phrases = []
    for o in scene.objects:
        words = [o.size] if size and o.size != "medium" else []
        if o.concept is not None:
            words.append(tokens[o.concept])
        elif colour:
            words += [o.colour] if o.pattern is None else [o.colour, "and", o.colour2]
        if o.concept is None and o.pattern is not None:
            words.append(o.pattern)
        words.append(o.shape)
        phrase = " ".join([_article(words[0])] + words)
        phrases.append(phrase + " " + POSITION_WORDS[o.position] if position else phrase)
    text = " and ".join(phrases)
    if background:
        text += f" on {_article(scene.background)} {scene.background} background"
    return "photo of " + text if photo else text


def random_caption(scene, rng, tokens=None):
    """The pretraining caption distribution: colour said 90% of the time (always when two objects share a
    shape), a pattern always, size, position and background each 50%, a "photo of" prefix 25%."""
    same_shapes = len(scene.objects) == 2 and scene.objects[0].shape == scene.objects[1].shape
    return caption(scene, colour=same_shapes or rng.random() < 0.9, size=rng.random() < 0.5,
                   position=rng.random() < 0.5, background=rng.random() < 0.5, photo=rng.random() < 0.25,
                   tokens=tokens)


def parse_caption(prompt, tokens=None):
    """The inverse of caption(): English -> a partial Scene whose unstated attributes are None. An object's
    concept is None when the prompt names no concept token: "a red square" is a plain solid square.

    tokens maps concept name -> word (default <new1>..<new4>); "photo of a ..." and "a photo of a ..." are read."""
    words_to_concept = {w.lower(): name for name, w in (tokens or DEFAULT_TOKENS).items()}
    text = " ".join(prompt.lower().strip().rstrip(".").split())
    text = re.sub(r"^(a )?photo of ", "", text)
    background = None
    m = re.fullmatch(r"(.*) on an? (\w+) background", text)
    if m:
        text, background = m.groups()
        if background not in BACKGROUNDS:
            raise NanocustomError(f"unknown background {background!r} in {prompt!r}; use one of {list(BACKGROUNDS)}")
    objects = []
    for phrase in re.split(r" and (?=an? )", text):  # "and" also joins a pattern's two colours
        position = None
        for slot, said in list(POSITION_WORDS.items()) + [("centre", "in the centre"), ("centre", "in the center")]:
            if phrase.endswith(" " + said):
                position, phrase = slot, phrase[:-len(said) - 1]
        words = phrase.split()
        if len(words) < 2 or words[0] not in ("a", "an") or words[-1] not in SHAPES:
            raise NanocustomError(f"cannot read {phrase!r} in {prompt!r}; write objects as 'a [small|big] "
                                  f"[colour|token|colour and colour pattern] <shape>' with a shape from {list(SHAPES)}")
        o, colours = Obj(words[-1], position=position), []
        for w in words[1:-1]:
            if w in SIZES:
                o.size = w
            elif w in COLOURS:
                colours.append(w)
            elif w in PATTERNS:
                o.pattern = w
            elif w in words_to_concept:
                o.concept = words_to_concept[w]
            elif w != "and":
                raise NanocustomError(f"unknown word {w!r} in {prompt!r}; expected a size, a colour, a pattern "
                                      f"({', '.join(PATTERNS)}) or a concept token ({', '.join(words_to_concept)})")
        if len(colours) > (1 if o.pattern is None else 2) or ("and" in words) != (len(colours) == 2):
            raise NanocustomError(f"cannot read the colours of {phrase!r} in {prompt!r}; a solid object has one "
                                  "colour ('a red square'), a patterned one two ('a red and white striped square')")
        o.colour, o.colour2 = (colours + [None, None])[:2]
        objects.append(o)
    return Scene(objects, background)


def scene_labels(scene):
    """Scene -> the evaluator's targets, per slot (left, centre, right): shape (0 = empty slot, else 1 +
    index), colour, size, pattern (0 = solid, else 1 + index), colour2 (a pattern's second colour) and concept
    (0 = none, else 1 + index); -1 where a head has nothing to say (an empty slot, or the colours of a concept
    object). Plus the background index. An object that looks like a concept is labelled that concept. A pattern's
    colours are labelled in the order of COLOURS, not the caption's: red and white stripes are white and red
    stripes moved by one band, which no classifier can tell apart (satisfies compares them as a pair). For split
    and dotted the order is visible (which half is left, which colour the dots are) and is not scored: a
    mirrored split circle, or black with white dots, passes for the other order (and for the concept)."""
    labels = {"shape": np.zeros(3, np.int64), "colour": np.full(3, -1), "size": np.full(3, -1),
              "pattern": np.full(3, -1), "colour2": np.full(3, -1), "concept": np.full(3, -1),
              "background": np.int64(list(BACKGROUNDS).index(scene.background))}
    for o in scene.objects:
        s = SLOTS.index(o.position)
        concept = o.concept or (o.pattern and concept_of_look(o.shape, o.pattern, (o.colour, o.colour2)))
        labels["shape"][s] = 1 + SHAPES.index(o.shape)
        labels["size"][s] = list(SIZES).index(o.size)
        labels["concept"][s] = 0 if concept is None else 1 + list(CONCEPTS).index(concept)
        if concept is None:
            labels["pattern"][s] = 0 if o.pattern is None else 1 + list(PATTERNS).index(o.pattern)
            labels["colour"][s] = list(COLOURS).index(o.colour)
            if o.pattern is not None:
                pair = sorted(list(COLOURS).index(c) for c in (o.colour, o.colour2))
                labels["colour"][s], labels["colour2"][s] = pair
    return labels


def sample_batch(n, seed, concept_prob=0.0, near_miss_prob=0.0):
    """n random scenes -> (uint8 images [n, 64, 64, 3], captions, labels: dict of arrays [n, 3] / [n]).
    Pretraining uses concept_prob=0 and near_miss_prob=0, so no held-out concept is ever drawn or named."""
    rng = np.random.default_rng(seed)
    images, captions, labels = np.empty((n, RES, RES, 3), np.uint8), [], []
    for i in range(n):
        scene = random_scene(rng, concept_prob, near_miss_prob=near_miss_prob)
        images[i] = render(scene)
        captions.append(random_caption(scene, rng))
        labels.append(scene_labels(scene))
    return images, captions, {k: np.stack([l[k] for l in labels]) for k in labels[0]}


def render_prompt(prompt, n, seed=0, tokens=None):
    """n images that show what the prompt says, the rest random: uint8 [n, 64, 64, 3]."""
    rng, spec = np.random.default_rng(seed), parse_caption(prompt, tokens)
    return np.stack([render(complete_scene(spec, rng)) for _ in range(n)])


def export_concepts(root=CONCEPTS_DIR, seed=0, n=6):
    """Write each concept's n reference images, alone on varied backgrounds, to root/<name>/00.png..."""
    for i, name in enumerate(CONCEPTS):
        rng = np.random.default_rng([seed, i])
        folder = Path(root) / name
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(n):
            Image.fromarray(render_concept(name, rng)).save(folder / f"{j:02d}.png")


# ----------------------------------------------------------------------------- the evaluator

@dataclass
class EvaluatorConfig:
    width: int = 24    # channels of the first conv; 2x and 4x deeper down
    hidden: int = 192  # the feature every head reads


HEADS = {  # head -> classes per slot (None: one background per image)
    "background": (None, len(BACKGROUNDS)),
    "shape": (3, 1 + len(SHAPES)),
    "colour": (3, len(COLOURS)),
    "size": (3, len(SIZES)),
    "pattern": (3, 1 + len(PATTERNS)),
    "colour2": (3, len(COLOURS)),
    "concept": (3, 1 + len(CONCEPTS)),
}


class ShapesEvaluator(nn.Module):
    """Images in [-1, 1] [N, 3, 64, 64] -> logits per head. Six 3x3 convs down to a 4x4 map, flattened so
    that the heads can tell left from right."""

    def __init__(self, config=EvaluatorConfig()):
        super().__init__()
        self.config = config
        w = config.width
        layers, c_in = [], 3
        for c_out, stride in [(w, 2), (2 * w, 2), (2 * w, 1), (4 * w, 2), (4 * w, 1), (2 * w, 2)]:  # 64 -> 4
            layers += [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(2 * w * 4 * 4, config.hidden)
        self.heads = nn.ModuleDict({k: nn.Linear(config.hidden, (slots or 1) * classes)
                                    for k, (slots, classes) in HEADS.items()})

    def forward(self, x):
        h = F.relu(self.fc(self.features(x).flatten(1)))
        out = {}
        for k, (slots, classes) in HEADS.items():
            logits = self.heads[k](h)
            out[k] = logits if slots is None else logits.view(-1, slots, classes)  # (N, slots, classes)
        return out


def to_unit(images):
    """uint8 numpy [N, H, W, 3] / [H, W, 3], or float torch [N, 3, H, W] / [3, H, W] in [-1, 1]
    -> float32 numpy [N, H, W, 3] in [0, 1]."""
    if isinstance(images, torch.Tensor) and images.is_floating_point():
        x = images.detach().float().cpu()
        x = x[None] if x.dim() == 3 else x
        return ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    if isinstance(images, np.ndarray) and images.dtype == np.uint8:
        x = images[None] if images.ndim == 3 else images
        return x.astype(np.float32) / 255
    raise NanocustomError(f"images must be uint8 numpy [N, H, W, 3] or float torch [N, 3, H, W] in [-1, 1], "
                          f"not {type(images).__name__} {getattr(images, 'dtype', '')}")


def degrade(x, generator):
    """Float [N, 3, H, W] in [0, 1] -> the same, blurred, colour-jittered and noised by random amounts per
    image, so the evaluator also reads the imperfect images a tiny diffusion model makes."""
    N, C, H, W = x.shape
    rand = lambda *shape: torch.rand(*shape, generator=generator)
    sigma = 0.01 + 1.2 * rand(N)  # a separable 5-tap Gaussian blur, one sigma per image
    k = torch.exp(-torch.arange(-2.0, 3.0) ** 2 / (2 * sigma[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (N*C, 5)
    y = x.reshape(1, N * C, H, W)
    y = F.conv2d(F.pad(y, (2, 2, 0, 0), mode="replicate"), k[:, None, None, :], groups=N * C)
    y = F.conv2d(F.pad(y, (0, 0, 2, 2), mode="replicate"), k[:, None, :, None], groups=N * C)
    x = y.view(N, C, H, W)
    contrast, brightness = 0.85 + 0.3 * rand(N, 1, 1, 1), 0.1 * (rand(N, 1, 1, 1) - 0.5)
    x = (x - 0.5) * contrast + 0.5 + brightness + 0.08 * (rand(N, C, 1, 1) - 0.5)
    blotches = F.interpolate(torch.randn(N, C, 8, 8, generator=generator), size=(H, W), mode="bilinear")
    x = x + 0.04 * rand(N, 1, 1, 1) * blotches + 0.06 * rand(N, 1, 1, 1) * torch.randn(x.shape, generator=generator)
    return x.clamp(0, 1)


def evaluator_loss(logits, labels):
    """Sum of the heads' cross-entropies; labels of -1 are not scored."""
    return sum(F.cross_entropy(logits[k].flatten(0, -2), labels[k].flatten(), ignore_index=-1) for k in HEADS)


def _batch_tensors(images, labels):
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return x, {k: torch.from_numpy(np.asarray(v)).long() for k, v in labels.items()}


NOT_SAVED = ("num_batches_tracked",)  # BatchNorm's update counter, which eval mode never reads


def train_evaluator(steps=3000, batch=64, lr=3e-3, concept_prob=0.3, near_miss_prob=0.3, seed=0, out=EVALUATOR_PATH,
                    log=print):
    """Train on fresh renders (batch seeds [seed, step]), three quarters of them degraded; save fp16 weights
    with the config and class lists in the safetensors metadata. Returns the model."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = ShapesEvaluator().to(memory_format=torch.channels_last)  # faster convolutions on a CPU
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    log(f"evaluator: {sum(p.numel() for p in model.parameters()):,} parameters, {steps} steps of {batch}")
    t0 = time.time()
    for step in range(steps):
        images, _, labels = sample_batch(batch, seed=[seed, step], concept_prob=concept_prob,
                                         near_miss_prob=near_miss_prob)
        x, y = _batch_tensors(images, labels)
        keep = torch.rand(batch, generator=generator) < 0.25
        x = torch.where(keep[:, None, None, None], x, degrade(x, generator)).to(memory_format=torch.channels_last)
        loss = evaluator_loss(model(x * 2 - 1), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - t0:.0f}s")
    model.eval()
    metadata = {"config": json.dumps(vars(model.config)), "shapes": json.dumps(SHAPES),
                "colours": json.dumps(list(COLOURS)), "backgrounds": json.dumps(list(BACKGROUNDS)),
                "sizes": json.dumps(list(SIZES)), "concepts": json.dumps(list(CONCEPTS)), "slots": json.dumps(SLOTS),
                "patterns": json.dumps(list(PATTERNS)),
                "trained": f"train_evaluator(steps={steps}, batch={batch}, lr={lr}, concept_prob={concept_prob}, "
                           f"near_miss_prob={near_miss_prob}, seed={seed})"}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.half().contiguous() for k, v in model.state_dict().items() if not k.endswith(NOT_SAVED)}
    save_file(state, str(out), metadata=metadata)
    return model


_loaded = {}


def load_evaluator(path=EVALUATOR_PATH):
    """The trained evaluator in eval mode (cached per path). Refuses weights made for another world."""
    path = str(path)
    if path not in _loaded:
        if not Path(path).exists():
            raise NanocustomError(f"no evaluator weights at {path}; run python -m nanocustom.toy train-evaluator")
        with safe_open(path, "pt") as f:
            meta = f.metadata()
            state = {k: f.get_tensor(k).float() for k in f.keys()}
        world = {"shapes": list(SHAPES), "colours": list(COLOURS), "backgrounds": list(BACKGROUNDS),
                 "sizes": list(SIZES), "concepts": list(CONCEPTS), "slots": list(SLOTS), "patterns": list(PATTERNS)}
        for k, v in world.items():
            trained = json.loads(meta.get(k, "[]"))
            if trained != v:
                raise NanocustomError(f"{path} was trained for {k} {trained}, this world has {v}; "
                                      "retrain with python -m nanocustom.toy train-evaluator")
        model = ShapesEvaluator(EvaluatorConfig(**json.loads(meta["config"])))
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and all(k.endswith(NOT_SAVED) for k in missing), (missing, unexpected)
        _loaded[path] = model.eval()
    return _loaded[path]


@torch.no_grad()
def predict(images, evaluator=None, batch=256):
    """Images -> dict of predicted class indices: background [N], and the other heads' [N, 3]."""
    model = evaluator or load_evaluator()
    x = torch.from_numpy(to_unit(images)).permute(0, 3, 1, 2) * 2 - 1
    outs = [model(x[i:i + batch]) for i in range(0, len(x), batch)]
    return {k: torch.cat([o[k] for o in outs]).argmax(-1).numpy() for k in HEADS}


def describe(images, evaluator=None):
    """Images -> what the evaluator sees in each, as a Scene without geometry, objects left to right."""
    p = predict(images, evaluator)
    scenes = []
    for i in range(len(p["background"])):
        objects = []
        for s, slot in enumerate(SLOTS):
            if p["shape"][i, s] == 0:
                continue
            concept = None if p["concept"][i, s] == 0 else list(CONCEPTS)[p["concept"][i, s] - 1]
            if concept and CONCEPTS[concept].shape != SHAPES[p["shape"][i, s] - 1]:
                concept = None  # a concept is its look on its shape: red and white stripes on a circle are not it
            pattern = None if concept or p["pattern"][i, s] == 0 else list(PATTERNS)[p["pattern"][i, s] - 1]
            objects.append(Obj(SHAPES[p["shape"][i, s] - 1], None if concept else list(COLOURS)[p["colour"][i, s]],
                               list(SIZES)[p["size"][i, s]], slot, concept, pattern,
                               list(COLOURS)[p["colour2"][i, s]] if pattern else None))
        scenes.append(Scene(objects, list(BACKGROUNDS)[p["background"][i]]))
    return scenes


def _as_concept(o):
    """A concept's look asked in words ("a red and white striped square") is that concept, as the evaluator names it."""
    if o.concept is None and o.pattern is not None and o.colour2 is not None:
        concept = concept_of_look(o.shape, o.pattern, (o.colour, o.colour2))
        if concept is not None:
            return Obj(o.shape, size=o.size, position=o.position, concept=concept)
    return o


def satisfies(seen, spec):
    """Does the seen Scene show everything the partial Scene spec states, and no object it doesn't name?"""
    if spec.background is not None and seen.background != spec.background:
        return False
    if len(seen.objects) != len(spec.objects):
        return False
    wanted = [_as_concept(o) for o in spec.objects]

    def match(o, want):
        pair = o.pattern is not None  # a pattern's two colours are compared as a pair (scene_labels)
        colours = {o.colour, o.colour2} if pair else o.colour
        wanted = None if want.colour is None else {want.colour, want.colour2} if pair else want.colour
        return (o.shape == want.shape and o.concept == want.concept and o.pattern == want.pattern
                and all(w is None or w == v for v, w in [(colours, wanted), (o.size, want.size),
                                                         (o.position, want.position)]))
    return any(all(map(match, order, wanted)) for order in itertools.permutations(seen.objects))


def prompt_adherence(images, prompt, evaluator=None, tokens=None):
    """Fraction of images that show everything the prompt states (parse_caption) and nothing else."""
    spec = parse_caption(prompt, tokens)
    return float(np.mean([satisfies(seen, spec) for seen in describe(images, evaluator)]))


def concept_presence(images, concept, evaluator=None):
    """Fraction of images in which the evaluator finds the held-out concept."""
    if concept not in CONCEPTS:
        raise NanocustomError(f"unknown concept {concept!r}; the world has {list(CONCEPTS)}")
    return float(np.mean([any(o.concept == concept for o in seen.objects) for seen in describe(images, evaluator)]))


OBJECT_EXTENT = 38  # px: the tallest an object's mask gets (true renders <= 34, model samples <= 35, measured)


def object_mask(x, threshold=0.25):
    """[N, H, W, 3] in [0, 1] -> bool [N, H, W]: pixels whose colour differs from the median of the image's
    2-pixel border by more than threshold in some channel, grown by one pixel to take in antialiased edges, in
    the connected regions objects can fill: at most OBJECT_EXTENT high and twice that wide (a pair side by side).
    A larger region (a repainted patch of background, a halo around an object) is background that changed, and
    stays out of the mask so that background_preservation sees it."""
    border = np.concatenate([x[:, :2].reshape(len(x), -1, 3), x[:, -2:].reshape(len(x), -1, 3),
                             x[:, :, :2].reshape(len(x), -1, 3), x[:, :, -2:].reshape(len(x), -1, 3)], 1)
    median = np.median(border, 1)[:, None, None, :]
    mask = np.pad(np.abs(x - median).max(-1) > threshold, ((0, 0), (1, 1), (1, 1)))
    H, W = x.shape[1:3]
    mask = np.any([mask[:, 1 + dy:1 + dy + H, 1 + dx:1 + dx + W] for dy in (-1, 0, 1) for dx in (-1, 0, 1)], 0)
    for image in mask:
        for ys, xs in regions(image):
            if np.ptp(ys) >= OBJECT_EXTENT or np.ptp(xs) >= 2 * OBJECT_EXTENT:
                image[ys, xs] = False
    return mask


def regions(mask):
    """bool [H, W] -> (ys, xs) index arrays of each 8-connected region of True pixels (a flood fill)."""
    H, W = mask.shape
    seen, found = np.zeros_like(mask), []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start], stack, pixels = True, [start], []
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for v in range(max(y - 1, 0), min(y + 2, H)):
                for u in range(max(x - 1, 0), min(x + 2, W)):
                    if mask[v, u] and not seen[v, u]:
                        seen[v, u] = True
                        stack.append((v, u))
        found.append(tuple(np.array(c) for c in zip(*pixels)))
    return found


def background_preservation(images, reference_images, threshold=0.25, tol=0.1):
    """Mean over image pairs of: among the pixels outside both images' object masks (object_mask), the
    fraction whose colours (in [0, 1]) agree within tol in every channel. 1.0: the background is kept
    exactly; a pair with no pixel outside the masks scores 0. A change that an object could be (a patch no
    larger than one, within OBJECT_EXTENT) is taken for an object and not seen."""
    a, b = to_unit(images), to_unit(reference_images)
    if a.shape != b.shape:
        raise NanocustomError(f"{a.shape[0]} images of {a.shape[1:]} against {b.shape[0]} references of "
                              f"{b.shape[1:]}; pass one reference per image, same size")
    outside = ~(object_mask(a, threshold) | object_mask(b, threshold))
    agree = (np.abs(a - b).max(-1) <= tol) & outside
    return float(np.mean(agree.sum((1, 2)) / np.maximum(outside.sum((1, 2)), 1)))


# ----------------------------------------------------------------------------- command line

def heldout_accuracy(model, n=2000, seed=HELDOUT_SEED, concept_prob=0.3, near_miss_prob=0.3, degraded=False):
    """Per-head accuracy on n fresh renders from seeds the training never drew."""
    images, _, labels = sample_batch(n, seed, concept_prob, near_miss_prob)
    if degraded:
        x = degrade(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, torch.Generator().manual_seed(seed))
        images = (x * 255).round().byte().permute(0, 2, 3, 1).numpy()
    p = predict(images, model)
    occupied = labels["shape"] > 0
    concept_object = labels["concept"] > 0
    return {
        "background": np.mean(p["background"] == labels["background"]),
        "position": np.mean(((p["shape"] > 0) == occupied).all(1)),  # which slots hold an object, all three right
        "shape": np.mean(p["shape"][occupied] == labels["shape"][occupied]),
        "colour": np.mean(p["colour"][labels["colour"] >= 0] == labels["colour"][labels["colour"] >= 0]),
        "pattern": np.mean(p["pattern"][labels["pattern"] >= 0] == labels["pattern"][labels["pattern"] >= 0]),
        "colour2": np.mean(p["colour2"][labels["colour2"] >= 0] == labels["colour2"][labels["colour2"] >= 0]),
        "size": np.mean(p["size"][occupied] == labels["size"][occupied]),
        "concept": np.mean(p["concept"][occupied] == labels["concept"][occupied]),
        "concept (concept objects only)": np.mean(p["concept"][concept_object] == labels["concept"][concept_object]),
    }


def _save_grid(images, path, columns=8, scale=2):
    n = len(images)
    rows = (n + columns - 1) // columns
    grid = np.full((rows * (RES + 2), columns * (RES + 2), 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * (RES + 2):r * (RES + 2) + RES, c * (RES + 2):c * (RES + 2) + RES] = im
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def cmd_render(args):
    images, captions, _ = sample_batch(args.n, args.seed, args.concept_prob)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _save_grid(images, out / "grid.png")
    (out / "captions.txt").write_text("\n".join(captions) + "\n")
    print(f"wrote {out / 'grid.png'} and {out / 'captions.txt'}")


def cmd_concepts(args):
    export_concepts(args.out, args.seed)
    print(f"wrote {len(CONCEPTS)} concept folders under {args.out}")


def cmd_train_evaluator(args):
    t0 = time.time()
    model = train_evaluator(args.steps, args.batch, args.lr, seed=args.seed, out=args.out)
    print(f"trained in {time.time() - t0:.0f}s; wrote {args.out} ({Path(args.out).stat().st_size / 1e3:.0f} kB)")
    for degraded in (False, True):
        acc = heldout_accuracy(model, degraded=degraded)
        print(("degraded" if degraded else "clean   ") + " held-out accuracy: "
              + ", ".join(f"{k} {v:.4f}" for k, v in acc.items()))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m nanocustom.toy", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("render", help="a grid of random scenes and their captions, to look at")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--out", default="out/world")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concept-prob", type=float, default=0.0, help="chance that an object is a held-out concept")
    p.set_defaults(run=cmd_render)

    p = sub.add_parser("concepts", help="rewrite the concepts' reference images")
    p.add_argument("--out", default=str(CONCEPTS_DIR))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_concepts)

    p = sub.add_parser("train-evaluator", help="train the CNN that scores generated images")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(EVALUATOR_PATH))
    p.set_defaults(run=cmd_train_evaluator)

    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    try:
        args.run(args)
    except NanocustomError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
