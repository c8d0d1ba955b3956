"""Training data for teaching the model a concept: folders of images, Custom Diffusion's resize augmentation,
the regularisation (prior) set, and SVDiff's Cut-Mix-Unmix.

A concept is a folder of images of any size, mode and format Pillow reads; `name.txt` beside `name.png` (or
.jpg, ...) is that image's caption, one line, and an image without one gets "photo of a <new1> square". Each
image is turned upright (EXIF), made RGB (transparency onto white), centre-cropped to a square and resized.
Files that are not readable images are skipped with a warning; dotfiles are ignored.

- Kumari et al. 2023 (Custom Diffusion), "Training details" and Appendix D: target images are resized to
  0.4-1.0x the model's size S two times in three and pasted at a random place on a blank canvas (zero in
  [-1, 1], i.e. mid-gray, as the authors' code), "far away " / "very small " prepended below 0.6x; the rest of
  the time resized to 1.2-1.4x and cropped back to S, "zoomed in " / "close up " prepended. The loss is kept to
  the latent cells the pasted image covers. Regularisation images are never resized this way.
- §3.1: a regularisation set of real images with captions, or (DreamBooth; the "Ours w/ Gen" ablation)
  images the base model generates for "photo of a square". Half of every batch is target, half
  regularisation, and the loss weights the second half by lambda: the prior-preservation loss of SVDiff
  (Han et al. 2023) Eq. 3.
- Han et al. 2023 (SVDiff) §3.3, Cut-Mix-Unmix: with probability 0.6 a target sample is two concepts side by
  side, "photo of a <new1> square on the left and a <new2> circle on the right", and its regularisation
  sample is made alike from the two classes' images. For the unmix regulariser (§3.3; the loss of App. D.1,
  Eq. 10) `unmix_mask` gives, per token, the half of the image its cross-attention may go to.

    batches = ConceptBatches([shipped_concept("striped_square")], size=64, factor=8)
    batch = batches.next_batch(8, torch.Generator().manual_seed(0))   # images, masks, prompts, is_reg, ...
"""
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from nanocustom.checkpoint import atomic_write
from nanocustom.errors import NanocustomError
from nanocustom.pipeline import generate

ZOOM_OUT = (0.4, 1.0)   # scale range, times S, two times in three (Kumari et al. App. D)
ZOOM_IN = (1.2, 1.4)    # the other time
P_ZOOM_OUT = 2 / 3
SMALL = 0.6             # a zoomed-out scale below this is "far away" / "very small"
PREFIXES_SMALL = ("far away ", "very small ")
PREFIXES_ZOOM = ("zoomed in ", "close up ")
CUTMIX_PROB = 0.6       # Han et al. §3.3: "usually set to 0.6"

# ----------------------------------------------------------------------------- loading images


def to_rgb(im):
    """Any Pillow mode -> RGB: 16/32-bit and float greys rescaled to 8 bits, transparency composited on white."""
    if im.mode.startswith("I") or im.mode == "F":  # 16-bit PNG greys open as I;16 or I
        a = np.asarray(im, np.float64)
        if im.mode == "F" and a.max() <= 1:
            a = a * 255
        elif im.mode.startswith("I;16") or a.max() > 255:
            a = a / 257
        return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8)).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        im = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, "white"), im).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK (no ICC profile applied), YCbCr, ...


def square(im, size, resample=Image.LANCZOS):
    """Centre-crop to a square, then resize to size x size (by reduce() first when shrinking a lot). Cropping
    first keeps what lies outside the square out of the filter's reach at the edges."""
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return im.crop((left, top, left + side, top + side)).resize((size, size), resample, reducing_gap=3.0)


def load_image(path, size):
    """An image file -> PIL RGB size x size: upright, centre square, resized."""
    with Image.open(path) as im:
        im.draft("RGB", (size, size))  # JPEG: decode at 1/2, 1/4 or 1/8 scale, never below size
        im = ImageOps.exif_transpose(im)
        return square(to_rgb(im), size)


@dataclass
class Folder:
    images: list    # PIL RGB, size x size, in file-name order
    captions: list  # str, or None for an image without a caption file
    paths: list


def load_folder(folder, size, what="concept"):
    """Every readable image in `folder` at size x size, with the captions from name.txt files beside them."""
    folder = Path(folder)
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise NanocustomError(f"{what} folder {folder} {problem}; pass a folder of {what} images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix != ".txt")
    images, captions, paths = [], [], []
    for path in files:
        try:
            images.append(load_image(path, size))
        except Exception as e:  # Pillow raises many kinds on a bad file: OSError, SyntaxError, struct.error, ...
            warnings.warn(f"skipping {path}: not a readable image ({type(e).__name__}: {str(e).splitlines()[0]})")
            continue
        text = path.with_suffix(".txt")
        caption = " ".join(text.read_text(encoding="utf-8", errors="replace").split()) if text.is_file() else ""
        captions.append(caption or None)
        paths.append(path)
    if not files:
        raise NanocustomError(f"{what} folder {folder} holds no images; put the {what} images (PNG, JPEG, ...) in it")
    if not images:
        raise NanocustomError(f"{what} folder {folder} holds no readable images ({len(files)} files skipped); "
                              "add PNG or JPEG images")
    return Folder(images, captions, paths)


def to_tensor(im):
    """PIL RGB -> float [3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.asarray(im, np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1


# ----------------------------------------------------------------------------- Custom Diffusion's augmentation

def _rand(generator):
    return torch.rand((), generator=generator).item()


def _randint(low, high, generator):
    """An integer in [low, high], both included."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def mirror(prompt):
    """The prompt of the mirrored image: "left" and "right" trade places."""
    return re.sub(r"\b(left|right)\b", lambda m: "right" if m.group(1) == "left" else "left", prompt)


def flip(image, prompt, p, generator):
    """The random horizontal flip of Kumari et al.'s code, which the prompt follows: the shapes world's
    captions say where things stand."""
    if _rand(generator) < p:
        return image.transpose(Image.FLIP_LEFT_RIGHT), mirror(prompt)
    return image, prompt


def augment(image, prompt, size, factor, generator, flip_p=0.5, mask_margin=0):
    """Custom Diffusion's resize augmentation of one target image (Kumari et al. Training details, App. D).

    image: PIL RGB square, best about 1.4 x size (it is resized from here). Returns the image [3, S, S] in
    [-1, 1], the loss mask [1, S/f, S/f] and the prompt with its size words. The mask is 1 on the latent cells
    wholly inside the pasted image, less mask_margin cells at each of its edges: the authors' code drops one
    (their mask is [top // 8 + 1 : (top + scale) // 8 - 1]); we keep them by default, since at 64 px one cell
    is an eighth of the image. Where the authors' code and the paper differ we follow the paper: the smallest
    scale is 0.4 S (code: S // 3), the prefix is "far away " (code: "a far away "), and every scale up to S
    is pasted with its mask (src/finetune_data.py pastes only below 0.6 S; diffusers' port pastes all)."""
    S, f = size, factor
    image, prompt = flip(image, prompt, flip_p, generator)
    if _rand(generator) < P_ZOOM_OUT:
        scale = _randint(math.ceil(ZOOM_OUT[0] * S), S, generator)
        if scale < SMALL * S:
            prompt = PREFIXES_SMALL[_randint(0, 1, generator)] + prompt
        top, left = _randint(0, S - scale, generator), _randint(0, S - scale, generator)
        x = torch.zeros(3, S, S)  # the blank canvas: 0 in [-1, 1], mid-gray, as the authors'
        x[:, top:top + scale, left:left + scale] = to_tensor(image.resize((scale, scale), Image.BICUBIC))
        mask = torch.zeros(1, S // f, S // f)
        r0, r1 = math.ceil(top / f) + mask_margin, (top + scale) // f - mask_margin
        c0, c1 = math.ceil(left / f) + mask_margin, (left + scale) // f - mask_margin
        mask[:, r0:max(r0, r1), c0:max(c0, c1)] = 1
    else:
        scale = _randint(math.ceil(ZOOM_IN[0] * S), math.floor(ZOOM_IN[1] * S), generator)
        prompt = PREFIXES_ZOOM[_randint(0, 1, generator)] + prompt
        top, left = _randint(0, scale - S, generator), _randint(0, scale - S, generator)
        x = to_tensor(image.resize((scale, scale), Image.BICUBIC).crop((left, top, left + S, top + S)))
        mask = torch.ones(1, S // f, S // f)
    return x, mask, prompt


# ----------------------------------------------------------------------------- SVDiff's Cut-Mix-Unmix

def subject_column(image):
    """The x of the middle of what stands out from the image's border colour; the image's middle for a photo
    with no plain background (where nothing, or everything, stands out about evenly)."""
    k = max(1, image.size[0] // 64)  # a thumbnail of about 64 px finds it as well, 100x faster at 512
    a = np.asarray(image.reduce(k), np.float32)
    border = np.median(np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]), axis=0)
    weight = np.abs(a - border).sum(axis=(0, 2))  # per column
    if weight.sum() == 0:
        return image.size[0] / 2
    return float((weight * (np.arange(a.shape[1]) + 0.5)).sum() / weight.sum()) * k


def half_strip(image):
    """The half-width, full-height strip of a square image around its subject.

    SVDiff cuts, it does not resize ("CutMix-like"; App. C.2 splits "the left and right images" 1:1 or at
    random). Where in each image the strip is cut the paper leaves unsaid; a fixed left half of a photo would
    cut a centred subject in two, and in the shapes world would often hold no object at all, so we cut around
    the subject."""
    S = image.size[0]
    left = int(np.clip(round(subject_column(image) - S / 4), 0, S - S // 2))
    return image.crop((left, 0, left + S // 2, S))


def cut_mix(left_image, right_image):
    """Two square images of one size -> one: the strip around the first's subject on the left, the second's
    on the right."""
    S = left_image.size[0]
    out = Image.new("RGB", (S, S))
    out.paste(half_strip(left_image), (0, 0))
    out.paste(half_strip(right_image), (S // 2, 0))
    return out


def side_mask(side, size):
    """[size, size]: how much of each cell of a size x size grid lies in the left (or right) half of the image."""
    left = (size / 2 - torch.arange(size, dtype=torch.float32)).clamp(0, 1)  # 1, ..., 1, (0.5 for odd size), 0, ...
    return (left if side == "left" else 1 - left).expand(size, size).clone()


def unmix_mask(batch, token, size):
    """M for `token` in the unmix regulariser, [B, 1, size, size] at an attention map's resolution: in a
    cut-mix sample, the half of the image the token stands for; elsewhere 1 (no constraint).

    The loss on the token's cross-attention map A (SVDiff App. D.1, Eq. 10): ||A - sg(A * M)||^2, which pushes
    A to 0 outside M and leaves it free inside (§3.3: "MSE on the non-corresponding regions")."""
    masks = torch.ones(len(batch["prompts"]), 1, size, size)
    for i, sides in enumerate(batch["sides"]):
        if sides is not None and token in sides:
            masks[i, 0] = side_mask("left" if sides[0] == token else "right", size)
    return masks


# ----------------------------------------------------------------------------- generated regularisation images

def _saved(out_dir, i, class_prompt, size):
    """Image i of an earlier run for the same prompt, or None when it has to be (re)made."""
    png, txt = out_dir / f"{i:04d}.png", out_dir / f"{i:04d}.txt"
    if not (png.is_file() and txt.is_file()):
        return None
    if (saved_prompt := txt.read_text(encoding="utf-8").strip()) != class_prompt:
        raise NanocustomError(f"{out_dir} holds regularisation images of {saved_prompt!r}, not {class_prompt!r}; "
                              "use another out_dir or empty it")
    try:
        with Image.open(png) as im:
            image = np.asarray(im.convert("RGB"))
    except OSError:
        return None
    return image if image.shape[:2] == (size, size) else None


def generate_regularization(sd, class_prompt, n, seed=0, out_dir=None, steps=50, guidance=6.0, batch_size=8,
                            log=print):
    """n images of the base model for class_prompt ("photo of a square") -> uint8 [n, S, S, 3].

    Made batch_size at a time, the batch starting at image i from seed + i. With out_dir, image i is saved as
    0000.png with its caption in 0000.txt (each written atomically), and a later call reuses every saved
    image of the same prompt and size instead of making it again: an interrupted run resumes (empty the folder
    to remake them with other settings). It is then an ordinary regularisation folder (Concept.reg)."""
    if n < 1 or batch_size < 1:
        raise NanocustomError(f"n={n} and batch_size={batch_size} must be positive; ask for at least one image")
    S = sd.resolution
    out = None if out_dir is None else Path(out_dir)
    if out is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise NanocustomError(f"cannot create {out} ({e.strerror}); choose a writable out_dir") from e
    images = []
    for start in range(0, n, batch_size):
        indices = range(start, min(n, start + batch_size))
        saved = [None] * len(indices) if out is None else [_saved(out, i, class_prompt, S) for i in indices]
        if any(image is None for image in saved):
            saved = generate(sd, [class_prompt] * len(indices), steps=steps, guidance=guidance, seed=seed + start,
                             progress=False)
            for i, image in zip(indices, saved):
                if out is not None:
                    atomic_write(out / f"{i:04d}.png", lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))
                    atomic_write(out / f"{i:04d}.txt", lambda tmp: Path(tmp).write_text(class_prompt + "\n"))
        images.extend(saved)
        log(f"regularisation images for {class_prompt!r}: {indices.stop}/{n}")
    return np.stack(images)


# ----------------------------------------------------------------------------- concepts and batches

def _article(word):
    return "an" if word[:1].lower() in "aeiou" else "a"


@dataclass
class Concept:
    folder: str | Path  # the user's images; name.txt beside name.png is that image's caption
    token: str          # the modifier word V* (Kumari et al. §3.1), one per concept: "<new1>"
    class_word: str     # what the concept is: "square"
    reg: str | Path | np.ndarray | None = None  # regularisation images of the class: a folder (captions as
                                                 # above) or uint8 [N, H, W, 3], e.g. generate_regularization's
    caption: str | None = None        # the prompt of an image without a caption (default: the template below)
    class_caption: str | None = None  # the prompt of a regularisation image without a caption

    @property
    def prompt(self):  # Custom Diffusion's template "photo of a {}"
        return self.caption or f"photo of a {self.token} {self.class_word}"

    @property
    def class_prompt(self):
        return self.class_caption or f"photo of {_article(self.class_word)} {self.class_word}"


def shipped_concept(name, reg=None):
    """One of the shapes world's four held-out concepts, as shipped in nanocustom/assets/concepts/<name>."""
    from nanocustom import toy
    if name not in toy.CONCEPTS:
        raise NanocustomError(f"no shipped concept {name!r}; choose one of {', '.join(toy.CONCEPTS)}")
    return Concept(toy.CONCEPTS_DIR / name, toy.DEFAULT_TOKENS[name], toy.CONCEPTS[name].shape, reg)


class ConceptBatches:
    """Batches of target and regularisation samples for one or more concepts, drawn fresh every step.

    A target sample picks a concept uniformly (SVDiff: "randomly choosing one concept at each data sampling
    iteration"; Custom Diffusion's joint training pools the images instead, which differs only when the
    concepts have different numbers of images), then one of its images uniformly. With cutmix_prob > 0 (two
    or more concepts) it is instead, with that probability, a cut-mix of two distinct concepts in random
    order (no resize augmentation, mask all ones).

    When the concepts have regularisation images (all of them or none), the first half of a batch is target
    and sample B/2 + i is a regularisation sample of the same concept(s) as sample i: an image of that
    concept's set (its caption, or "photo of a square"), or the cut-mix of the two concepts' sets ("photo of a
    square on the left and a circle on the right"). Regularisation samples are flipped but never resized.

    With aug=False, flip_p=0 and cutmix_prob=0 (`cacheable`), every sample is one of a fixed set of (image,
    prompt) pairs named by batch["sources"], so latents and text features may be computed once.

    size: the model's resolution S; factor: the VAE's downsampling factor f (masks are S/f); cutmix_prob:
    CUTMIX_PROB (0.6) for SVDiff's multi-concept runs; mask_margin: see augment."""

    def __init__(self, concepts, size, factor=8, aug=True, flip_p=0.5, cutmix_prob=0.0, mask_margin=0):
        concepts = [concepts] if isinstance(concepts, Concept) else list(concepts)
        if not concepts:
            raise NanocustomError("no concepts given; pass at least one Concept")
        tokens = [c.token for c in concepts]
        if len(set(tokens)) != len(tokens) or any(not t or " " in t for t in tokens):
            raise NanocustomError(f"modifier tokens {tokens} must be single words, one per concept; "
                                  "give each concept its own, e.g. <new1>, <new2>")
        if size % factor or size % 2:
            raise NanocustomError(f"size {size} is not an even multiple of the VAE factor {factor}; "
                                  f"use e.g. {max(2 * factor, size // (2 * factor) * 2 * factor)}")
        if not 0 <= cutmix_prob <= 1 or (cutmix_prob > 0 and len(concepts) < 2):
            raise NanocustomError(f"cutmix_prob {cutmix_prob} needs a value in [0, 1] and two or more concepts; "
                                  "pass cutmix_prob=0 for a single concept")
        if len({c.reg is None for c in concepts}) > 1:
            raise NanocustomError("some concepts have regularisation images and some do not; "
                                  "give every concept a reg set, or none")
        self.concepts, self.size, self.factor = concepts, size, factor
        self.aug, self.flip_p, self.cutmix_prob, self.mask_margin = aug, flip_p, cutmix_prob, mask_margin
        source_size = math.ceil(ZOOM_IN[1] * size) if aug else size  # resize down, not up, to zoom in
        self.targets = [load_folder(c.folder, source_size) for c in concepts]
        self.cutmix_targets = [Folder([square(im, size) for im in t.images], t.captions, t.paths)
                               for t in self.targets] if cutmix_prob > 0 else None  # at S: cut-mix never resizes
        self.regs = None if concepts[0].reg is None else [self._load_reg(c) for c in concepts]

    def _load_reg(self, concept):
        reg = concept.reg
        if isinstance(reg, np.ndarray):
            if reg.ndim != 4 or reg.shape[-1] != 3 or reg.dtype != np.uint8 or not len(reg):
                raise NanocustomError(f"regularisation images of {concept.token} are {reg.dtype} {list(reg.shape)}; "
                                      "pass uint8 [N, H, W, 3] with N >= 1")
            images = [square(Image.fromarray(a), self.size) for a in reg]
            return Folder(images, [None] * len(images), [f"{concept.token} reg[{i}]" for i in range(len(images))])
        return load_folder(reg, self.size, what="regularisation")

    @property
    def has_reg(self):
        return self.regs is not None

    @property
    def cacheable(self):
        return not self.aug and self.flip_p == 0 and self.cutmix_prob == 0

    def _pick(self, folder, generator):
        j = _randint(0, len(folder.images) - 1, generator)
        return folder.images[j], folder.captions[j], str(folder.paths[j])

    def _single(self, c, generator):
        image, caption, source = self._pick(self.targets[c], generator)
        prompt = caption or self.concepts[c].prompt
        if self.aug:
            x, mask, prompt = augment(image, prompt, self.size, self.factor, generator, self.flip_p, self.mask_margin)
        else:
            image, prompt = flip(image, prompt, self.flip_p, generator)
            x, mask = to_tensor(image), torch.ones(1, self.size // self.factor, self.size // self.factor)
        return dict(image=x, mask=mask, prompt=prompt, is_reg=False, sides=None, source=source)

    def _cutmix(self, a, b, folders, prompt, sides, is_reg, generator):
        halves, sources = [], []
        for c in (a, b):
            image, _, source = self._pick(folders[c], generator)
            image, _ = flip(image, "", self.flip_p, generator)
            halves.append(image)
            sources.append(source)
        mask = torch.ones(1, self.size // self.factor, self.size // self.factor)
        return dict(image=to_tensor(cut_mix(*halves)), mask=mask, prompt=prompt, is_reg=is_reg, sides=sides,
                    source=" | ".join(sources))

    def _reg(self, c, generator):
        image, caption, source = self._pick(self.regs[c], generator)
        image, prompt = flip(image, caption or self.concepts[c].class_prompt, self.flip_p, generator)
        mask = torch.ones(1, self.size // self.factor, self.size // self.factor)
        return dict(image=to_tensor(image), mask=mask, prompt=prompt, is_reg=True, sides=None, source=source)

    def next_batch(self, batch_size, generator):
        """-> dict: images [B, 3, S, S] in [-1, 1]; masks [B, 1, S/f, S/f], the loss mask; prompts, B strings;
        is_reg, bool [B]; cutmix, bool [B]; sides, per sample (left token, right token) for a cut-mix target
        sample, else None; sources, per sample the file(s) it was made from. generator: torch.Generator or int."""
        if isinstance(generator, int):
            generator = torch.Generator().manual_seed(generator)
        if self.has_reg and (batch_size < 2 or batch_size % 2):
            raise NanocustomError(f"batch size {batch_size} cannot be half target, half regularisation; "
                                  f"use an even size, e.g. {max(2, batch_size + 1) // 2 * 2}")
        if batch_size < 1:
            raise NanocustomError(f"batch size {batch_size} is not positive; use e.g. 4")
        n = batch_size // 2 if self.has_reg else batch_size
        picks, samples = [], []
        for _ in range(n):
            if self.cutmix_prob > 0 and _rand(generator) < self.cutmix_prob:
                a, b = torch.randperm(len(self.concepts), generator=generator)[:2].tolist()
                A, B = self.concepts[a], self.concepts[b]
                prompt = f"photo of a {A.token} {A.class_word} on the left and a {B.token} {B.class_word} on the right"
                samples.append(self._cutmix(a, b, self.cutmix_targets, prompt, (A.token, B.token), False, generator))
                picks.append((a, b))
            else:
                c = _randint(0, len(self.concepts) - 1, generator)
                samples.append(self._single(c, generator))
                picks.append((c,))
        for pick in picks if self.has_reg else []:
            if len(pick) == 1:
                samples.append(self._reg(pick[0], generator))
            else:
                A, B = (self.concepts[c].class_word for c in pick)
                prompt = f"photo of {_article(A)} {A} on the left and {_article(B)} {B} on the right"
                samples.append(self._cutmix(*pick, self.regs, prompt, None, True, generator))
        return {
            "images": torch.stack([s["image"] for s in samples]),
            "masks": torch.stack([s["mask"] for s in samples]),
            "prompts": [s["prompt"] for s in samples],
            "is_reg": torch.tensor([s["is_reg"] for s in samples]),
            "cutmix": torch.tensor([len(p) == 2 for p in picks] * (2 if self.has_reg else 1)),
            "sides": [s["sides"] for s in samples],
            "sources": [s["source"] for s in samples],
        }
