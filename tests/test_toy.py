"""The shapes world: deterministic renders, captions that parse back, held-out concepts kept out of
pretraining, and an evaluator that reads fresh renders right."""
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from nanocustom.errors import NanocustomError
from nanocustom.toy import (BACKGROUNDS, CONCEPTS, CONCEPTS_DIR, HELDOUT_SEED, PATTERNS, Obj, Scene, background_preservation,
                            caption, complete_scene, concept_of_look, concept_presence, concept_scene, describe,
                            export_concepts, heldout_accuracy, load_evaluator, look, parse_caption, prompt_adherence,
                            random_scene, render, render_concept, render_prompt, sample_batch)

FLAGS = ("colour", "size", "position", "background", "photo")


def test_same_seed_renders_same_pixels_and_another_seed_does_not():
    a, captions_a, _ = sample_batch(16, seed=3)
    b, captions_b, _ = sample_batch(16, seed=3)
    c, _, _ = sample_batch(16, seed=4)
    assert a.dtype == np.uint8 and a.shape == (16, 64, 64, 3)
    assert np.array_equal(a, b) and captions_a == captions_b
    assert not np.array_equal(a, c)


def test_the_required_caption_forms_read_back():
    rng = np.random.default_rng(0)
    circle = Obj("circle", "red", "medium", "left")
    square = Obj("square", "green", "medium", "right")
    pair = complete_scene(Scene([circle, square], "blue"), rng)
    lone = complete_scene(Scene([Obj("circle", "red", "medium")], "blue"), rng)
    assert caption(lone) == "a red circle"
    assert caption(lone, background=True) == "a red circle on a blue background"
    assert caption(pair) == "a red circle and a green square"
    assert caption(pair, position=True) == "a red circle on the left and a green square on the right"
    for size in ("small", "big"):
        lone.objects[0].size = size
        assert caption(lone, size=True) == f"a {size} red circle"
    assert caption(lone, colour=False, photo=True) == "photo of a circle"
    striped = complete_scene(Scene([Obj("square", "red", pattern="striped", colour2="white")], "blue"), rng)
    assert caption(striped) == "a red and white striped square"
    assert caption(striped, colour=False) == "a striped square"


@pytest.mark.parametrize("with_concepts", [False, True])
def test_every_caption_style_round_trips_through_parse_caption(with_concepts):
    rng = np.random.default_rng(1)
    for _ in range(40):
        scene = random_scene(rng, concept_prob=0.5 if with_concepts else 0.0)
        for values in itertools.product([False, True], repeat=len(FLAGS)):
            said = dict(zip(FLAGS, values))
            parsed = parse_caption(caption(scene, **said))
            expected = Scene([Obj(o.shape, o.colour if said["colour"] and not o.concept else None,
                                  o.size if said["size"] and o.size != "medium" else None,
                                  o.position if said["position"] else None, o.concept, o.pattern,
                                  o.colour2 if said["colour"] else None) for o in scene.objects],
                             scene.background if said["background"] else None)
            assert parsed.attributes() == expected.attributes(), caption(scene, **said)


def test_parse_caption_reads_personalization_prompts():
    spec = parse_caption("photo of a <new1> square")
    assert spec.attributes() == ([("square", None, None, None, "striped_square", None, None)], None)
    spec = parse_caption("A photo of a sks circle on the left and a big red star on an orange background.",
                         tokens={"split_circle": "sks"})
    assert spec.attributes() == ([("circle", None, None, "left", "split_circle", None, None),
                                  ("star", "red", "big", None, None, None, None)], "orange")
    assert parse_caption("a circle in the centre").objects[0].position == "centre"
    spec = parse_caption("a red and white striped square and a blue circle")  # "and" inside and between objects
    assert spec.attributes() == ([("square", "red", None, None, None, "striped", "white"),
                                  ("circle", "blue", None, None, None, None, None)], None)
    for bad in ["a red dog", "red circle", "a shiny red circle", "a red circle on a pink background", "a <new9> star",
                "a red and white square", "a red white striped square", "a red and striped square"]:
        with pytest.raises(NanocustomError):
            parse_caption(bad)


def test_pretraining_samples_never_draw_or_name_a_concept():
    images, captions, labels = sample_batch(500, seed=5)
    occupied = labels["shape"] > 0
    assert (labels["concept"][occupied] == 0).all() and (labels["concept"][~occupied] == -1).all()
    assert not any("<" in c for c in captions)
    _, _, labels = sample_batch(200, seed=5, concept_prob=0.5)
    assert (labels["concept"] > 0).any()  # the labels do see concepts when they are asked for


def test_pretraining_draws_every_pattern_and_near_misses_of_each_concept_but_never_its_look():
    rng = np.random.default_rng(11)
    objects = [o for _ in range(6000) for o in random_scene(rng).objects]
    patterned = [o for o in objects if o.pattern]
    assert 0.15 < len(patterned) / len(objects) < 0.35 and {o.pattern for o in patterned} == set(PATTERNS)
    assert all(concept_of_look(o.shape, o.pattern, (o.colour, o.colour2)) is None for o in patterned)
    for c in CONCEPTS.values():  # its pattern on its shape in other colours, and its colours in its pattern elsewhere
        assert any((o.shape, o.pattern) == (c.shape, c.pattern) for o in patterned), c.name
        assert any(o.pattern == c.pattern and {o.colour, o.colour2} == set(c.colours) for o in patterned), c.name
    assert concept_of_look("square", "striped", ("white", "red")) == "striped_square"  # either order
    with pytest.raises(NanocustomError, match="name both"):
        complete_scene(parse_caption("a red striped square"), rng)


def test_backgrounds_never_share_a_colour_with_an_object():
    rng = np.random.default_rng(6)
    for _ in range(300):
        scene = random_scene(rng, concept_prob=0.3)
        colours = {c for o in scene.objects for c in look(o)[1]}
        assert scene.background not in colours
        assert len(scene.objects) in (1, 2)
        if len(scene.objects) == 2:
            assert {o.position for o in scene.objects} == {"left", "right"}
            a, b = scene.objects
            assert (a.shape, a.colour, a.concept) != (b.shape, b.colour, b.concept)


def test_shipped_concept_folders_are_what_export_concepts_writes(tmp_path):
    export_concepts(tmp_path)
    for name in CONCEPTS:
        shipped = sorted(p.name for p in (CONCEPTS_DIR / name).iterdir())
        assert shipped == [f"{i:02d}.png" for i in range(6)]
        for file in shipped:
            assert np.array_equal(np.asarray(Image.open(CONCEPTS_DIR / name / file)),
                                  np.asarray(Image.open(tmp_path / name / file)))


def test_render_concept_varies_and_keeps_beside_objects():
    rng = np.random.default_rng(7)
    images = [render_concept("split_circle", rng) for _ in range(4)]
    assert all(im.shape == (64, 64, 3) for im in images) and not np.array_equal(images[0], images[1])
    scene = concept_scene("striped_square", rng, beside="object")
    assert sorted(o.concept or "-" for o in scene.objects) == ["-", "striped_square"]
    scene = concept_scene("striped_square", rng, beside="checkered_star")
    assert sorted(o.concept for o in scene.objects) == ["checkered_star", "striped_square"]


def test_evaluator_reads_every_head_of_unseen_renders():
    accuracy = heldout_accuracy(load_evaluator(), n=600, seed=HELDOUT_SEED + 7)
    for head, value in accuracy.items():
        assert value >= 0.95, (head, accuracy)


def test_prompt_adherence_is_high_for_the_prompt_and_low_for_another():
    prompts = ["a red circle", "a big blue star on a white background", "a small yellow heart",
               "a purple cross on the left and an orange triangle on the right", "a green square and a black heart",
               "photo of a <new1> square", "photo of a <new2> circle and a white star on a gray background",
               "photo of a triangle", "a blue and yellow dotted heart", "a big black and white checked cross"]
    for i, prompt in enumerate(prompts):
        images = render_prompt(prompt, 24, seed=100 + i)
        assert prompt_adherence(images, prompt) >= 0.95, prompt
        other = prompts[(i + 1) % len(prompts)]
        assert prompt_adherence(images, other) <= 0.1, (prompt, other)
    # a left/right swap and a wrong size are both caught
    images = render_prompt("a red circle on the left and a green square on the right", 24, seed=1)
    assert prompt_adherence(images, "a red circle on the right and a green square on the left") <= 0.1
    assert prompt_adherence(render_prompt("a small red circle", 24, seed=2), "a big red circle") <= 0.1


def test_a_concepts_look_asked_in_words_is_that_concept():
    """"a red and white striped square" describes the striped square: its true renders adhere (the evaluator
    names them by the concept, not by pattern and colours), in either colour order and beside another object."""
    for prompt in ("a red and white striped square", "a white and red striped square on the left",
                   "a red and white striped square and a blue and yellow split circle",
                   "a green heart and a yellow and black checked star on a blue background"):
        assert prompt_adherence(render_prompt(prompt, 16, seed=4), prompt) >= 0.95, prompt
    near_miss = render_prompt("a red and blue striped square", 16, seed=4)
    assert prompt_adherence(near_miss, "a red and white striped square") <= 0.05


def test_prompt_adherence_accepts_floats_in_minus_one_to_one():
    images = render_prompt("a blue heart", 8, seed=3)
    floats = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert prompt_adherence(floats, "a blue heart") == prompt_adherence(images, "a blue heart") == 1.0


def test_concept_presence_finds_the_concept_and_only_it():
    rng = np.random.default_rng(8)
    for name in CONCEPTS:
        images = np.stack([render_concept(name, rng, beside="object" if i % 2 else None) for i in range(16)])
        assert concept_presence(images, name) >= 0.95
        others = [c for c in CONCEPTS if c != name]
        assert all(concept_presence(images, other) <= 0.05 for other in others)
    assert concept_presence(sample_batch(64, seed=9)[0], "striped_square") <= 0.05
    for near_miss in ("a red and white striped circle", "a red and blue striped square",
                      "a red and white split square"):
        assert concept_presence(render_prompt(near_miss, 16, seed=12), "striped_square") <= 0.05, near_miss
    assert concept_presence(render_prompt("a yellow and blue split circle", 16, seed=13), "split_circle") >= 0.95


def test_the_evaluator_tells_each_concept_from_its_near_misses():
    """An object one step from a concept (toy.near_miss: another shape, one colour changed, another pattern) is
    not the concept; the concept with its colours swapped still is."""
    rng = np.random.default_rng(14)
    scenes = [random_scene(rng, pair_prob=0.0, near_miss_prob=1.0) for _ in range(200)]
    truth = [concept_of_look(o.shape, o.pattern, (o.colour, o.colour2)) for s in scenes for o in s.objects]
    described = describe(np.stack([render(s) for s in scenes]))
    seen = [s.objects[0].concept if len(s.objects) == 1 else "?" for s in described]
    assert 20 < sum(t is not None for t in truth) < 80  # a quarter are the concept, swapped
    assert np.mean([a == b for a, b in zip(seen, truth)]) >= 0.95


def test_background_preservation_is_one_for_the_same_image_and_low_for_another_background():
    rng = np.random.default_rng(10)
    scene = complete_scene(parse_caption("a red circle on a blue background"), rng)
    image = render(scene)[None]
    assert background_preservation(image, image) == 1.0
    moved = Scene([Obj("square", "red", "big", "right", x=47, y=32, r=14)], "blue")
    assert background_preservation(image, render(moved)[None]) == 1.0  # objects differ, the background is kept
    for other in ("green", "gray", "white"):
        changed = Scene(scene.objects, other)
        assert background_preservation(image, render(changed)[None]) <= 0.05
    with pytest.raises(NanocustomError):
        background_preservation(image, np.concatenate([image, image]))


def test_background_repainted_away_from_the_border_is_seen():
    """object_mask takes what differs from an image's border for objects; a repainted patch larger than any object
    is not one, so a background changed everywhere but a frame at the edges still scores low."""
    rng = np.random.default_rng(10)
    image = render(complete_scene(parse_caption("a red circle on a blue background"), rng))[None]
    for frame in (4, 8):
        inner = image[0, frame:-frame, frame:-frame]
        blue = (inner == BACKGROUNDS["blue"]).all(-1, keepdims=True)
        repainted = image.copy()
        repainted[0, frame:-frame, frame:-frame] = np.where(blue, BACKGROUNDS["yellow"], inner)
        frame_share = 1 - (64 - 2 * frame) ** 2 / 64 ** 2  # the blue left: 23% and 44% of the image
        assert background_preservation(repainted, image) < frame_share + 0.05  # (the object's pixels are left out)
