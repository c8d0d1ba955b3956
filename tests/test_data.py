"""Training data: any image file loads as an RGB square, bad files are skipped and bad folders refused in one
line, Custom Diffusion's augmentation keeps its proportions, prefixes and masks, batches are half target and
half regularisation, and Cut-Mix-Unmix puts the right halves beside the right words."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from nanocustom.data import (Concept, ConceptBatches, augment, cut_mix, generate_regularization, half_strip,
                             load_folder, load_image, shipped_concept, side_mask, unmix_mask)
from nanocustom.errors import NanocustomError
from nanocustom.toy import CONCEPTS

torch.set_num_threads(1)
S, f = 64, 8


def solid(colour, size=(40, 40)):
    return Image.new("RGB", size, colour)


def two_tone(size=90):
    """Left half red, right half blue."""
    a = np.zeros((size, size, 3), np.uint8)
    a[:, : size // 2] = (255, 0, 0)
    a[:, size // 2:] = (0, 0, 255)
    return Image.fromarray(a)


def concept_folder(root, name, colours, captions=None):
    """A folder of solid-colour images, one per colour, with optional captions."""
    folder = root / name
    folder.mkdir()
    for j, colour in enumerate(colours):
        solid(colour, (48 + 8 * j, 40)).save(folder / f"{j:02d}.png")
        if captions:
            (folder / f"{j:02d}.txt").write_text(captions[j] + "\n")
    return folder


def rgb_at(image, x, y):
    return np.asarray(image)[y, x].astype(int)


# ----------------------------------------------------------------------------- loading


def test_every_image_mode_loads_as_an_rgb_square(tmp_path):
    g16 = np.full((30, 50), 65535, np.uint16)
    g16[:, 25:] = 32768
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))  # fully transparent red: white once composited
    palette = Image.new("P", (40, 40), 3)
    palette.putpalette([0, 0, 0] * 3 + [0, 200, 0] + [0, 0, 0] * 252)
    files = {
        "gray.png": (Image.new("L", (40, 30), 100), (100, 100, 100)),
        "gray_alpha.png": (Image.new("LA", (40, 30), (0, 0)), (255, 255, 255)),
        "rgba.png": (rgba, (255, 255, 255)),
        "palette.png": (palette, (0, 200, 0)),
        "bits.png": (Image.new("1", (30, 40), 1), (255, 255, 255)),
        "cmyk.jpg": (Image.new("CMYK", (40, 40), (255, 0, 0, 0)), (0, 255, 255)),
        "cmyk.tif": (Image.new("CMYK", (40, 40), (0, 255, 0, 0)), (255, 0, 255)),
        "i16.png": (Image.fromarray(g16), None),
        "i32.tif": (Image.fromarray((g16.astype(np.int32))), None),
    }
    for name, (image, _) in files.items():
        image.save(tmp_path / name)
    for name, (_, colour) in files.items():
        im = load_image(tmp_path / name, S)
        assert im.mode == "RGB" and im.size == (S, S), name
        if colour is not None:
            assert np.abs(rgb_at(im, S // 2, S // 2) - colour).max() <= 3, name
    for name in ("i16.png", "i32.tif"):  # 16-bit values are rescaled, not clipped to white
        im = load_image(tmp_path / name, S)
        assert tuple(rgb_at(im, 2, 2)) == (255, 255, 255) and tuple(rgb_at(im, S - 3, 2)) == (128, 128, 128), name


def test_a_non_square_image_is_centre_cropped(tmp_path):
    a = np.zeros((30, 90, 3), np.uint8)
    a[:, :30], a[:, 30:60], a[:, 60:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    Image.fromarray(a).save(tmp_path / "wide.png")
    Image.fromarray(a.transpose(1, 0, 2).copy()).save(tmp_path / "tall.png")
    for name in ("wide.png", "tall.png"):
        im = np.asarray(load_image(tmp_path / name, S)).astype(int)
        assert im.shape == (S, S, 3) and np.abs(im - (0, 255, 0)).max() <= 2, name


def test_a_very_large_image_loads_as_an_rgb_square(tmp_path):
    big = Image.new("RGB", (8000, 6000), (0, 0, 255))
    big.paste((255, 0, 0), (1000, 0, 7000, 6000))  # the centre square is red; what a crop drops is blue
    big.save(tmp_path / "big.jpg", quality=90)
    im = load_image(tmp_path / "big.jpg", S)
    assert im.mode == "RGB" and im.size == (S, S)
    assert np.abs(np.asarray(im).astype(int)[2:-2, 2:-2] - (255, 0, 0)).max() <= 12


def test_exif_orientation_is_honoured(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 3  # rotated 180 degrees: what is stored on the left shows on the right
    two_tone(64).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    im = load_image(tmp_path / "rotated.jpg", S)
    assert rgb_at(im, 5, 32)[2] > 200 and rgb_at(im, S - 5, 32)[0] > 200  # blue left, red right


def test_unreadable_files_are_skipped_with_a_warning_naming_each(tmp_path):
    for j in range(2):
        solid((200, 0, 0)).save(tmp_path / f"good{j}.png")
    (tmp_path / "good0.txt").write_text("a caption\n")  # captions and dotfiles are not images, and not warned about
    (tmp_path / ".DS_Store").write_bytes(b"\0\1\2")
    (tmp_path / "random.png").write_bytes(np.random.default_rng(0).bytes(500))
    (tmp_path / "truncated.png").write_bytes((tmp_path / "good1.png").read_bytes()[:60])
    (tmp_path / "notes.md").write_text("# not an image\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folder = load_folder(tmp_path, S)
    assert [p.name for p in folder.paths] == ["good0.png", "good1.png"]
    assert folder.captions == ["a caption", None]
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 3
    for message, name in zip(messages, ("notes.md", "random.png", "truncated.png")):
        assert message.startswith(f"skipping {tmp_path / name}: not a readable image") and "\n" not in message


@pytest.mark.parametrize("case", ["missing", "empty", "only_unreadable", "a_file"])
def test_a_folder_without_readable_images_is_refused_in_one_line(tmp_path, case):
    folder = tmp_path / "concept"
    if case == "empty":
        folder.mkdir()
    elif case == "only_unreadable":
        folder.mkdir()
        (folder / "a.png").write_bytes(b"not a png")
        (folder / "b.txt").write_text("a caption without an image\n")
    elif case == "a_file":
        folder.write_bytes(b"")
    with pytest.raises(NanocustomError) as e, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ConceptBatches([Concept(folder, "<new1>", "square")], size=S)
    message = str(e.value)
    assert "\n" not in message and str(folder) in message and ";" in message


def test_captions_beside_images_are_used_and_the_template_fills_in(tmp_path):
    folder = concept_folder(tmp_path, "c", [(200, 0, 0), (0, 0, 200)], captions=None)
    (folder / "00.txt").write_text("a <new1> square  on a\nblue background\n")
    batches = ConceptBatches([Concept(folder, "<new1>", "square")], size=S, aug=False, flip_p=0)
    batch = batches.next_batch(64, 0)
    by_source = dict(zip(batch["sources"], batch["prompts"]))
    assert by_source == {str(folder / "00.png"): "a <new1> square on a blue background",
                         str(folder / "01.png"): "photo of a <new1> square"}


# ----------------------------------------------------------------------------- Custom Diffusion's augmentation


def draws(image, prompt, n, seed, **kwargs):
    g = torch.Generator().manual_seed(seed)
    return [augment(image, prompt, S, f, g, **kwargs) for _ in range(n)]


def test_augmentation_regimes_prefixes_and_pasted_sizes_follow_custom_diffusion():
    out = draws(solid((255, 255, 255), (90, 90)), "photo of a <new1> square", 1500, seed=0)
    kinds = {"zoom": 0, "small": 0, "plain": 0}
    for x, mask, prompt in out:
        pasted = x[0] > 0.5  # white image on a 0 (mid-gray) canvas
        rows, cols = pasted.any(1).nonzero(), pasted.any(0).nonzero()
        side = int(rows.max() - rows.min() + 1)
        assert side == int(cols.max() - cols.min() + 1) and pasted.sum() == side * side  # one square
        if prompt.startswith(("zoomed in ", "close up ")):
            kinds["zoom"] += 1
            assert side == S and bool(mask.all())
        elif prompt.startswith(("far away ", "very small ")):
            kinds["small"] += 1
            assert 0.4 * S <= side < 0.6 * S
        else:
            kinds["plain"] += 1
            assert prompt == "photo of a <new1> square" and 0.6 * S <= side <= S
    p_zoom = kinds["zoom"] / len(out)
    assert abs(p_zoom - 1 / 3) < 0.04
    # within the zoomed-out two thirds, the scale is uniform on [0.4, 1.0] S: a third of it is below 0.6
    assert abs(kinds["small"] / (len(out) - kinds["zoom"]) - 1 / 3) < 0.05
    assert {p.split("photo")[0] for _, _, p in out} == {"zoomed in ", "close up ", "far away ", "very small ", ""}


@pytest.mark.parametrize("margin", [0, 1])
def test_augmentation_mask_is_the_latent_cells_inside_the_pasted_image(margin):
    for x, mask, prompt in draws(solid((255, 255, 255), (90, 90)), "p", 300, seed=1, mask_margin=margin):
        assert mask.shape == (1, S // f, S // f)
        inside = F.avg_pool2d((x[:1] > 0.5).float(), f)[0] == 1  # cells whose every pixel is pasted image
        if margin and not prompt.startswith(("zoomed in", "close up")):  # as the authors: one cell less each side
            rows, cols = inside.any(1).nonzero()[:, 0], inside.any(0).nonzero()[:, 0]
            inside = torch.zeros_like(inside)
            inside[rows.min() + 1:rows.max(), cols.min() + 1:cols.max()] = True
        assert torch.equal(mask[0].bool(), inside), prompt


def test_augmentation_flips_half_the_images_and_mirrors_their_prompts():
    out = draws(two_tone(), "a <new1> square on the left", 600, seed=2)
    flipped = 0
    for x, _, prompt in out:
        first_column = (x.abs().sum(0) > 0).any(0).nonzero().min()  # leftmost column of image, not canvas
        red_first = bool(x[0, :, first_column].max() > 0.9)
        assert prompt.endswith("on the right") == (not red_first)
        flipped += not red_first
    assert abs(flipped / len(out) - 0.5) < 0.06


def test_augmentation_is_deterministic_per_seed():
    a, b, c = (draws(two_tone(), "a <new1> square", 20, seed) for seed in (5, 5, 6))
    assert all(torch.equal(x1, x2) and torch.equal(m1, m2) and p1 == p2 for (x1, m1, p1), (x2, m2, p2) in zip(a, b))
    assert any(not torch.equal(x1, x2) for (x1, _, _), (x2, _, _) in zip(a, c))


# ----------------------------------------------------------------------------- regularisation and joint training


def test_batches_are_half_target_half_regularisation_of_the_same_concept(tmp_path):
    concepts = [Concept(concept_folder(tmp_path, "sq", [(200, 0, 0)] * 2), "<new1>", "square",
                        reg=concept_folder(tmp_path, "sq_reg", [(0, 0, 200)] * 3, captions=["a blue square"] * 3)),
                Concept(concept_folder(tmp_path, "ci", [(0, 200, 0)] * 3), "<new2>", "circle",
                        reg=np.full((2, 32, 32, 3), 77, np.uint8))]
    batches = ConceptBatches(concepts, size=S, factor=f)
    batch = batches.next_batch(64, torch.Generator().manual_seed(0))
    assert batch["images"].shape == (64, 3, S, S) and batch["masks"].shape == (64, 1, S // f, S // f)
    assert batch["is_reg"].tolist() == [False] * 32 + [True] * 32 and not batch["cutmix"].any()
    assert batch["images"].min() >= -1 and batch["images"].max() <= 1
    for i in range(32):
        target, reg = batch["sources"][i], batch["sources"][32 + i]
        if "/sq/" in target:
            assert "/sq_reg/" in reg and batch["prompts"][32 + i] == "a blue square"
        else:
            assert "/ci/" in target and reg.startswith("<new2> reg[")
            assert batch["prompts"][32 + i] == "photo of a circle"  # no caption: the class template
            assert torch.allclose(batch["images"][32 + i], torch.tensor(77 / 127.5 - 1))
        assert batch["masks"][32 + i].all()  # regularisation images are never resized
    assert {"/sq/" in s for s in batch["sources"][:32]} == {True, False}  # both concepts drawn


def test_without_regularisation_the_whole_batch_is_target(tmp_path):
    batches = ConceptBatches([Concept(concept_folder(tmp_path, "c", [(200, 0, 0)]), "<new1>", "square")], size=S)
    batch = batches.next_batch(5, 0)
    assert batch["images"].shape[0] == 5 and not batch["is_reg"].any()


def test_bad_batch_and_concept_settings_are_refused_in_one_line(tmp_path):
    good = concept_folder(tmp_path, "c", [(200, 0, 0)])
    with_reg = ConceptBatches([Concept(good, "<new1>", "square", reg=np.zeros((1, 8, 8, 3), np.uint8))], size=S)
    bad = [lambda: with_reg.next_batch(3, 0),
           lambda: ConceptBatches([Concept(good, "<new1>", "square")] * 2, size=S),
           lambda: ConceptBatches([Concept(good, "<new1>", "square")], size=S, cutmix_prob=0.6),
           lambda: ConceptBatches([Concept(good, "<new1>", "square", reg=np.zeros((1, 8, 8, 3), np.uint8)),
                                   Concept(good, "<new2>", "circle")], size=S),
           lambda: ConceptBatches([Concept(good, "<new1>", "square", reg=np.zeros((8, 8), np.uint8))], size=S),
           lambda: ConceptBatches([Concept(good, "<new1>", "square")], size=60)]
    for make in bad:
        with pytest.raises(NanocustomError) as e:
            make()
        assert "\n" not in str(e.value) and ";" in str(e.value)


def test_without_augmentation_samples_are_fixed_and_cacheable(tmp_path):
    folder = concept_folder(tmp_path, "c", [(200, 0, 0), (0, 0, 200)])
    batches = ConceptBatches([Concept(folder, "<new1>", "square")], size=S, aug=False, flip_p=0)
    assert batches.cacheable and not ConceptBatches([Concept(folder, "<new1>", "square")], size=S).cacheable
    batch = batches.next_batch(16, 0)
    assert batch["masks"].all() and set(batch["prompts"]) == {"photo of a <new1> square"}
    for x, source in zip(batch["images"], batch["sources"]):
        assert torch.equal(x, (torch.from_numpy(np.array(load_image(source, S))).permute(2, 0, 1) / 127.5 - 1))


def tiny_model():
    from nanocustom.checkpoint import new_model
    from nanocustom.pretrain import TEXT_CONFIG, UNET_CONFIG, VAE_CONFIG
    torch.manual_seed(0)
    return new_model(UNET_CONFIG, VAE_CONFIG, TEXT_CONFIG, resolution=S)


def test_generated_regularisation_is_saved_atomically_and_reused(tmp_path, monkeypatch):
    import nanocustom.data as data
    sd, out, logs = tiny_model(), tmp_path / "reg", []
    images = generate_regularization(sd, "photo of a square", 3, seed=0, out_dir=out, steps=2, batch_size=2,
                                     log=logs.append)
    assert images.shape == (3, S, S, 3) and images.dtype == np.uint8 and len(logs) == 2
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0000.txt", "0001.png", "0001.txt",
                                                     "0002.png", "0002.txt"]  # no temporary files left
    (out / "0002.png").unlink()  # as if interrupted: only the missing batch is made again
    calls = []
    real_generate = data.generate
    monkeypatch.setattr(data, "generate", lambda *a, **k: calls.append(k["seed"]) or real_generate(*a, **k))
    again = generate_regularization(sd, "photo of a square", 3, seed=0, out_dir=out, steps=2, batch_size=2,
                                    log=logs.append)
    assert calls == [2] and np.array_equal(again, images)
    folder = load_folder(out, S)  # an ordinary regularisation folder, captions included
    assert len(folder.images) == 3 and set(folder.captions) == {"photo of a square"}
    with pytest.raises(NanocustomError, match="holds regularisation images of 'photo of a square'"):
        generate_regularization(sd, "photo of a circle", 3, out_dir=out, steps=2, log=logs.append)


# ----------------------------------------------------------------------------- Cut-Mix-Unmix


def cutmix_concepts(tmp_path, reg=False):
    reds = [(100 + 40 * j, 0, 0) for j in range(3)]
    blues = [(0, 0, 100 + 40 * j) for j in range(3)]
    regs = ([np.full((2, S, S, 3), v, np.uint8) for v in (10, 240)] if reg else [None, None])
    return [Concept(concept_folder(tmp_path, "sq", reds), "<new1>", "square", regs[0]),
            Concept(concept_folder(tmp_path, "ci", blues), "<new2>", "circle", regs[1])]


def test_cutmix_puts_each_named_image_beside_its_token(tmp_path):
    batches = ConceptBatches(cutmix_concepts(tmp_path), size=S, cutmix_prob=1.0)
    batch = batches.next_batch(40, 0)
    assert batch["cutmix"].all() and batch["masks"].all()
    orders = set()
    for x, prompt, sides, source in zip(batch["images"], batch["prompts"], batch["sides"], batch["sources"]):
        left_path, right_path = source.split(" | ")
        for half, path in ((x[:, :, : S // 2], left_path), (x[:, :, S // 2:], right_path)):
            colour = torch.tensor(np.asarray(Image.open(path)).astype(np.float32)[0, 0] / 127.5 - 1)
            assert torch.allclose(half, colour[:, None, None].expand_as(half), atol=1e-6)
        left, right = ("<new1>", "<new2>") if "/sq/" in left_path else ("<new2>", "<new1>")
        word = {"<new1>": "square", "<new2>": "circle"}
        assert sides == (left, right)
        assert prompt == f"photo of a {left} {word[left]} on the left and a {right} {word[right]} on the right"
        orders.add(sides)
    assert len(orders) == 2  # both orders occur


def test_cutmix_regularisation_sample_pairs_the_two_classes(tmp_path):
    batches = ConceptBatches(cutmix_concepts(tmp_path, reg=True), size=S, cutmix_prob=1.0)
    batch = batches.next_batch(20, 0)
    assert batch["cutmix"].all() and batch["is_reg"].tolist() == [False] * 10 + [True] * 10
    for i in range(10):
        left, right = batch["sides"][i]
        j = 10 + i
        expected = {"<new1>": ("square", 10), "<new2>": ("circle", 240)}
        assert batch["prompts"][j] == (f"photo of a {expected[left][0]} on the left "
                                       f"and a {expected[right][0]} on the right")
        assert batch["sides"][j] is None  # the unmix loss is for the modifier tokens
        for half, token in ((batch["images"][j, :, :, : S // 2], left), (batch["images"][j, :, :, S // 2:], right)):
            assert torch.allclose(half, torch.tensor(expected[token][1] / 127.5 - 1))


def test_cutmix_cuts_each_half_around_its_subject():
    a = np.full((S, S, 3), 30, np.uint8)
    a[28:36, 52:60] = 250  # a small object far to the right: a fixed left half would miss it
    strip = np.asarray(half_strip(Image.fromarray(a)))
    assert strip.shape == (S, S // 2, 3) and (strip == 250).all(-1).sum() == 64
    composite = np.asarray(cut_mix(Image.fromarray(a), Image.fromarray(a[:, ::-1].copy())))
    assert (composite[:, : S // 2] == 250).all(-1).sum() == 64 and (composite[:, S // 2:] == 250).all(-1).sum() == 64


def test_cutmix_probability_is_respected(tmp_path):
    batches = ConceptBatches(cutmix_concepts(tmp_path), size=S, cutmix_prob=0.6)
    share = batches.next_batch(600, 0)["cutmix"].float().mean().item()
    assert abs(share - 0.6) < 0.06


def test_unmix_masks_give_each_token_its_half_at_any_resolution(tmp_path):
    batch = ConceptBatches(cutmix_concepts(tmp_path), size=S, cutmix_prob=0.6).next_batch(30, 1)
    assert {s is None for s in batch["sides"]} == {True, False}
    for size in (8, 4, 2):
        left = torch.zeros(size, size)
        left[:, : size // 2] = 1
        assert torch.equal(side_mask("left", size), left) and torch.equal(side_mask("right", size), 1 - left)
        for token in ("<new1>", "<new2>", "<new3>"):
            masks = unmix_mask(batch, token, size)
            assert masks.shape == (30, 1, size, size)
            for mask, sides in zip(masks, batch["sides"]):
                if sides is None or token not in sides:
                    assert mask.eq(1).all()  # no constraint: Eq. 10's loss is 0
                else:
                    assert torch.equal(mask[0], left if sides[0] == token else 1 - left)
    assert torch.equal(side_mask("left", 3)[0], torch.tensor([1.0, 0.5, 0.0]))  # an odd grid splits its middle


# ----------------------------------------------------------------------------- the shipped concepts


def test_the_shipped_concept_folders_load():
    concepts = [shipped_concept(name) for name in CONCEPTS]
    batches = ConceptBatches(concepts, size=S, cutmix_prob=0.6)
    assert [len(t.images) for t in batches.targets] == [6, 6, 6, 6]
    assert [(c.token, c.class_word) for c in concepts] == [("<new1>", "square"), ("<new2>", "circle"),
                                                           ("<new3>", "triangle"), ("<new4>", "star")]
    batch = batches.next_batch(8, 0)
    assert batch["images"].shape == (8, 3, S, S) and all("<new" in p for p in batch["prompts"])
    with pytest.raises(NanocustomError, match="no shipped concept 'striped_circle'"):
        shipped_concept("striped_circle")
