"""Generate images with Stable Diffusion v1 or the shipped shapes model.

    python sample.py --prompt "a red circle on a blue background"              # the shapes model (CPU, seconds)
    python sample.py --ckpt weights/v1-5-pruned-emaonly.safetensors --prompt "a photo of a dog" --device cuda

Writes one PNG per sample and a grid PNG to --out.
"""
import argparse
import math
import os
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nanocustom.attention import LAG, AttentionMaps, concept_positions, heatmap_strip
from nanocustom.checkpoint import DEFAULT_CHECKPOINT, atomic_write, load
from nanocustom.errors import NanocustomError, check_device, run_script
from nanocustom.merge import combine, compress_custom_delta, decompress_custom_tensors
from nanocustom.personalize import check_made_for, load_delta, read_delta_metadata, save_delta
from nanocustom.pipeline import check_size, generate, image_grid

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default=None, help="SD v1 .safetensors/.ckpt path, or owner/repo/file on the Hub "
                                                "(default: the shapes model in weights/)")
    p.add_argument("--prompt", default="a red circle on a blue background")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity: 0 deterministic, 1 DDPM-like")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (<= 1: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=4, help="number of images")
    p.add_argument("--height", type=int, default=None, help="default: the model's native size")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: fp16 on CUDA, fp32 on the CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--delta", action="append", default=[], help="a delta from train.py (repeatable)")
    p.add_argument("--merge", choices=["lagrangian", "add"], default="lagrangian",
                   help="how several Custom Diffusion deltas combine (Kumari et al. Eq. 5, or plain addition)")
    p.add_argument("--save-delta", default=None, help="also write the combined delta to this .safetensors file")
    p.add_argument("--compress", type=float, default=None, metavar="K",
                   help="Custom Diffusion: keep W - W0 in low rank, the top singular values summing to the fraction "
                        "K of their total (Kumari et al. App. B; 1 is exact); --save-delta then writes the factors")
    p.add_argument("--force", action="store_true", help="apply deltas made for another base model")
    p.add_argument("--lag", action="store_true", help="LAG sampling (Ham et al. §3.3): the residual delta only "
                                                      "where the concept's tokens attend")
    p.add_argument("--lag-class", default=None, metavar="WORDS", help="--lag: the concept's class when it is more "
                   "than one word, e.g. 'teddy bear' (default: the one word after the modifier token)")
    p.add_argument("--base-uncond", action="store_true", help="residual delta: guidance's unconditional prediction "
                   "from the base model, the residuals on the conditional one only (not the papers'; see README)")
    p.add_argument("--attn-maps", action="store_true", help="also save per-token cross-attention heatmaps")
    p.add_argument("--out", default="out", help="output directory (created if its parent exists)")
    return p.parse_args(argv)


def check_args(args):
    for flag, ok, fix in (("--steps", args.steps > 0, "use at least 1"), ("--n", args.n > 0, "use at least 1"),
                          ("--guidance", 0 <= args.guidance < math.inf, "use 0 or more (7.5 is SD's default)"),
                          ("--eta", 0 <= args.eta <= 1, "use a value in [0, 1]"),
                          ("--compress", args.compress is None or 0 < args.compress <= 1,
                           "use a fraction in (0, 1], e.g. 0.6; 1 keeps the delta exact")):
        if not ok:
            raise NanocustomError(f"{flag} {getattr(args, flag[2:])} is out of range; {fix}")
    check_device(args.device)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NanocustomError(f"--out {out} is a file, not a directory; choose a directory")
    if not out.parent.is_dir():
        raise NanocustomError(f"--out {out}: {out.parent} is not an existing directory; create it or choose another")
    if not os.access(out if out.exists() else out.parent, os.W_OK):
        raise NanocustomError(f"--out {out} is not writable; choose a writable directory")
    if args.save_delta:
        save_to = Path(args.save_delta)
        if save_to.suffix != ".safetensors" or not save_to.parent.is_dir() or not os.access(save_to.parent, os.W_OK):
            raise NanocustomError(f"--save-delta {save_to}: give a .safetensors path in a writable, existing directory")
    if args.lag_class is not None and not (args.lag and args.lag_class.strip()):
        raise NanocustomError(f"--lag-class {args.lag_class!r} names the class for LAG; add --lag, and give the "
                              "class's words")
    if (args.compress is not None or args.save_delta) and not args.delta:
        raise NanocustomError(f"--{'compress' if args.compress is not None else 'save-delta'} needs a delta; "
                              "pass --delta FILE")


def apply_deltas(sd, paths, force, how="lagrangian", save_to=None, keep_unfolded=(), keep=None, check=lambda: None):
    """Load the deltas (several: combined into one, nanocustom.merge.combine), optionally compress it (Kumari et al.
    App. B: W - W0 in low rank, `keep` of the sum of singular values) and save the result, and fold it into the
    weights. keep_unfolded: the flags given ("--lag", "--base-uncond") that need a residual delta kept unfolded;
    check(): the input checks that need the deltas' tokens, run before anything is written."""
    flags = f"{' and '.join(keep_unfolded)} {'need' if len(keep_unfolded) > 1 else 'needs'}"  # "--lag needs"
    if not paths:
        if keep_unfolded:
            raise NanocustomError(f"{flags} a personalized-residuals delta: pass --delta FILE")
        return check()
    for path in paths:  # as load_delta and combine check, with the flags in the way out
        check_made_for(sd, path, read_delta_metadata(path), force, "pass the --ckpt it was trained on, or --force to "
                       "apply it anyway")
    delta = combine(sd, paths, how, force=force) if len(paths) > 1 else load_delta(sd, paths[0], force=force)
    combined = f" ({how} merge)" if len(paths) > 1 and delta.method == "custom" else ""
    print(f"applied {', '.join(Path(p).name for p in paths)}{combined}")
    if keep_unfolded and delta.method != "residual":
        raise NanocustomError(f"{flags} a personalized-residuals delta, got {delta.method}: only "
                              "residuals keep the base and personalised proj_out features apart, to blend them")
    check()
    if keep is not None:
        if delta.method != "custom":
            raise NanocustomError(f"--compress is for Custom Diffusion deltas, and this one is {delta.method}: SVDiff's "
                                  "spectral shifts and personalized residuals are small and low-rank already")
        low_rank, stats = compress_custom_delta(delta, keep)  # Kumari et al. App. B
        full, low = stats["full_bytes"], stats["low_rank_bytes"]
        print(f"compressed the delta to keep {keep:g} of its singular values' sum (Kumari et al. App. B): {full:,} -> "
              f"{low:,} bytes ({100 * low / full:.1f}% of the full delta); relative error of W - W0: "
              f"{stats['rel_error']:.3g}")
        if save_to:
            save_delta(delta, save_to, keep=keep)  # from the full delta: the same factors as low_rank
            print(f"wrote the compressed delta to {save_to}")
        delta.load_state_dict(decompress_custom_tensors(low_rank, delta.originals_by_key()))  # sample what is stored
    elif save_to:
        save_delta(delta, save_to)
        print(f"wrote the combined delta to {save_to}")
    if not keep_unfolded:
        delta.fold()


def check_tokens(sd, prompts):
    """A prompt naming a modifier token that no loaded delta provides is a mistake, not a word to tokenize."""
    known = sd.tokenizer.added_tokens
    for token in {t for prompt in prompts for t in re.findall(r"<[^<>\s]+>", prompt.lower())}:
        if token not in known:
            raise NanocustomError(f"the prompt names {token}, which no loaded delta provides; known tokens: "
                                  f"{', '.join(known) or 'none (pass --delta FILE)'}")


def save_png(image, path):
    atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if args.device.startswith("cuda") else torch.float32)
    if args.ckpt is None:
        print(f"using the shapes model ({DEFAULT_CHECKPOINT.name}); pass --ckpt for Stable Diffusion v1")
    sd = load(args.ckpt, device=args.device, dtype=dtype)
    height = sd.resolution if args.height is None else args.height
    width = sd.resolution if args.width is None else args.width

    def check():  # once the deltas' tokens are known, before a merged delta is written
        check_tokens(sd, [args.prompt, args.negative_prompt])
        if args.lag and not concept_positions(sd.tokenizer, args.prompt, args.lag_class):
            raise NanocustomError(f"--lag: {args.prompt!r} names no modifier token, so LAG would leave it all to the "
                                  "base model; name the concept, e.g. 'photo of a <new1> dog'")
        check_size(sd, height, width)

    unfolded = [flag for flag, on in (("--lag", args.lag), ("--base-uncond", args.base_uncond)) if on]
    apply_deltas(sd, args.delta, args.force, args.merge, args.save_delta, keep_unfolded=unfolded, keep=args.compress,
                 check=check)
    f = sd.vae.downsampling_factor
    maps = AttentionMaps(args.n, (height // f, width // f)) if args.attn_maps else None
    lag = LAG(sd, [args.prompt] * args.n, class_phrase=args.lag_class) if args.lag else False
    images = generate(sd, [args.prompt] * args.n, negative_prompt=args.negative_prompt, steps=args.steps,
                      sampler=args.sampler, eta=args.eta, guidance=args.guidance, seed=args.seed,
                      height=height, width=width, lag=lag, attention_maps=maps,
                      base_unconditional=args.base_uncond)
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    for i, image in enumerate(images):
        save_png(image, out / f"{i:03d}.png")
        if maps is not None:
            save_png(np.asarray(heatmap_strip(maps.maps[i], sd.tokenizer, args.prompt, image)), out / f"{i:03d}-attn.png")
    save_png(image_grid(images), out / "grid.png")
    print(f"wrote {len(images)} images and grid.png to {out}/")


if __name__ == "__main__":
    run_script(main)
