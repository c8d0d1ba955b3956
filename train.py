"""Teach the model a concept from a few images: Custom Diffusion, SVDiff or personalized residuals.

    python train.py --method custom --concept nanocustom/assets/concepts/striped_square \\
                    --prompt "photo of a <new1> square" --out out/striped_square.safetensors   # the shapes model
    python train.py --method residual --ckpt weights/v1-5-pruned-emaonly.safetensors --device cuda \\
                    --concept my_dog/ --prompt "photo of a <new1> dog" --out dog.safetensors

Repeat --concept/--prompt for joint training, one modifier token per concept. The loss is DDPM's L_simple
(Ho et al. 2020 Eq. 14) on the augmented target images (on the shapes model, the images as they are: see
SHAPES_DEFAULTS), masked to the valid latent region (Kumari et al., Training details), plus lambda times the same
loss on regularisation images of the class (prior preservation, SVDiff Eq. 3). The delta is written atomically,
checkpointed every --save-every steps (with `--resume` to go on), kept on Ctrl-C, and a non-finite loss stops
training with the last good delta saved.
"""
import argparse
import math
import os
import re
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from nanocustom.checkpoint import atomic_write, load
from nanocustom.data import CUTMIX_PROB, Concept, ConceptBatches, generate_regularization
from nanocustom.errors import NanocustomError, check_device, run_script
from nanocustom.personalize import attach, save_delta
from nanocustom.pipeline import generate, image_grid
from nanocustom.training import FeatureCache, Unmix, training_step

# Paper defaults: (learning rate, batch size, steps). Custom Diffusion: 1e-5 scaled by the batch size (§4); SVDiff:
# App. A; personalized residuals: §4.1.
DEFAULTS = {"custom": (1e-5 * 8, 8, 250), "svdiff": (1e-3, 4, 500), "residual": (1e-3, 4, 150)}
# On the shapes model (no --ckpt), measured in session 13 on the model then shipped, training seed 0 (JOURNAL.md;
# README, "The papers' claims, end to end"): the papers' rates move too little at this scale (Custom Diffusion 8e-5:
# presence 0%, 1e-3: 62.5%; SVDiff in 300 steps, within 3 CPU minutes, 1e-3: 0%, 1e-2: 9.4%, 3e-2: 46.9%, 6e-2:
# 68.8%; residuals 1e-3: 0%, 1e-2 in 500 steps: 15.6%), and the resize augmentation and flips are off: the
# concept images already vary size and position, and a 64 px scene shrunk to 0.4 S keeps no stripes (K/V trained
# on the concept's images captioned in words: presence for those words fell from 56% to 0% with the augmentation,
# to 41% without). The samples are then fixed, so each image and prompt is encoded once (--cache).
SHAPES_DEFAULTS = {"custom": (1e-3, 8, 250), "svdiff": (6e-2, 4, 300), "residual": (1e-2, 4, 500)}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=list(DEFAULTS), required=True)
    p.add_argument("--concept", action="append", required=True, help="a folder of the concept's images (repeatable)")
    p.add_argument("--prompt", action="append", required=True, help='one per --concept: "photo of a <new1> square"')
    p.add_argument("--class-prompt", action="append", default=None, help="one per --concept (default: the prompt "
                                                                            "without its modifier token)")
    p.add_argument("--reg-dir", action="append", default=None, help="one per --concept: real class images")
    p.add_argument("--gen-reg", type=int, default=0, help="generate N class images per concept with the base model")
    p.add_argument("--prior-weight", type=float, default=1.0, help="lambda of the prior-preservation loss")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--no-augment", action="store_true", help="no resize augmentation")
    p.add_argument("--augment", action="store_true", help="the resize augmentation and flips on the shapes model too")
    p.add_argument("--cache", action="store_true", help="encode each image and prompt once (implies --no-augment and "
                                                        "no flips; the text features only while no token rows train)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute the UNet's activations in backward: "
                                                                     "less memory, a slower step")
    p.add_argument("--cutmix", action="store_true", help="SVDiff's Cut-Mix-Unmix when training several concepts")
    p.add_argument("--unmix-weight", type=float, default=0.0, help="with --cutmix: weight of the unmix attention "
                                                                   "regulariser (SVDiff App. D.1 Eq. 10; 0: off)")
    p.add_argument("--train-attn2", action="store_true", help="Custom Diffusion: train all of attn2, not only K/V")
    p.add_argument("--train-tokens", action="store_true", help="SVDiff/residuals: train the modifier token rows "
                   "too (Ham et al. Table 3's 'update token embedding'; Custom Diffusion always does)")
    p.add_argument("--subset", default="all", help="SVDiff: the layer subset of Han et al. Table 1")
    p.add_argument("--rank-fraction", type=float, default=None, help="residuals: rank r_i = FRACTION x m_i "
                   "(default 0.05, Ham et al. §4.1; their Table 5 varies it)")
    p.add_argument("--ckpt", default=None, help="base model (default: the shapes model)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="frozen weights' dtype (default: fp16 on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (for --resume)")
    p.add_argument("--resume", action="store_true", help="go on from the checkpoint beside --out")
    p.add_argument("--out", required=True, help="the delta, FILE.safetensors")
    return p.parse_args(argv)


def check_args(args):
    check_device(args.device)
    shapes_model = args.ckpt is None
    lr, batch_size, steps = (SHAPES_DEFAULTS if shapes_model else DEFAULTS)[args.method]
    if args.lr is None and args.method == "custom" and args.batch_size is not None:
        lr *= args.batch_size / batch_size  # Custom Diffusion's rate scales with the batch size (§4)
    for flag, default in zip(("lr", "batch_size", "steps"), (lr, batch_size, steps)):
        if getattr(args, flag) is None:
            setattr(args, flag, default)
    if args.rank_fraction is not None and args.method != "residual":
        raise NanocustomError("--rank-fraction sets the residuals' rank; use it with --method residual")
    if args.rank_fraction is not None and not 0 < args.rank_fraction <= 1:  # also nan
        raise NanocustomError(f"--rank-fraction {args.rank_fraction} is out of range; use a fraction in (0, 1], "
                              "e.g. the paper's 0.05")
    if args.train_tokens and args.method == "custom":
        raise NanocustomError("--train-tokens: Custom Diffusion always trains its modifier tokens; drop the flag")
    if args.augment and (args.no_augment or args.cache):
        raise NanocustomError("--augment contradicts --no-augment and --cache; keep one")
    if shapes_model and not args.augment:
        args.no_augment, args.cache = True, not args.cutmix  # cut-mix draws new composites: nothing to cache
    args.flip_p = 0.0 if args.cache or (shapes_model and not args.augment) else 0.5
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--lr", args.lr),
                        ("--save-every", args.save_every)):
        if not value > 0:  # also nan
            raise NanocustomError(f"{flag} {value} is out of range; use a positive value")
    if not 0 <= args.prior_weight < math.inf or args.gen_reg < 0:  # also nan
        raise NanocustomError("--prior-weight and --gen-reg must be 0 or more")
    if not args.unmix_weight >= 0 or (args.unmix_weight > 0 and not args.cutmix):
        raise NanocustomError(f"--unmix-weight {args.unmix_weight} needs a value >= 0, and --cutmix when above 0")
    if args.cutmix and len(args.concept) < 2:
        raise NanocustomError("--cutmix composes two concepts; give two or more --concept/--prompt pairs, or drop it")
    if args.unmix_weight > 0 and args.grad_checkpointing:  # its maps would be recomputed without the observer
        raise NanocustomError("--unmix-weight watches attention maps that --grad-checkpointing recomputes in "
                              "backward; drop one of them")
    if args.cache and args.cutmix:
        raise NanocustomError("--cache needs a fixed set of samples; Cut-Mix-Unmix makes new ones: drop one of them")
    if len(args.prompt) != len(args.concept):
        raise NanocustomError(f"{len(args.concept)} --concept but {len(args.prompt)} --prompt; give one prompt per concept")
    for flag in ("class_prompt", "reg_dir"):
        given = getattr(args, flag)
        if given is not None and len(given) != len(args.concept):
            raise NanocustomError(f"give one --{flag.replace('_', '-')} per --concept ({len(args.concept)})")
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise NanocustomError(f"--out {out} must end in .safetensors")
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        raise NanocustomError(f"--out {out}: {out.parent} is not a writable directory; create it or choose another")


def concepts_from(args):
    """One Concept per --concept/--prompt: the modifier token and class word read off the prompt."""
    concepts = []
    for i, (folder, prompt) in enumerate(zip(args.concept, args.prompt)):
        m = re.search(r"(<[^<>\s]+>)\s+(\w+)", prompt)
        if not m:
            raise NanocustomError(f"--prompt {prompt!r} names no modifier token before a class word; "
                                  f"write e.g. 'photo of a <new{i + 1}> dog'")
        token, class_word = m.groups()
        class_prompt = args.class_prompt[i] if args.class_prompt else " ".join(prompt.replace(token, "").split())
        reg = args.reg_dir[i] if args.reg_dir else None
        concepts.append(Concept(folder, token, class_word, reg, caption=prompt, class_caption=class_prompt))
    return concepts


def save_resume_state(path, delta, opt, step, generator, scaler=None):
    """The delta, optimizer, RNG and (fp16) loss-scale state, written atomically, for --resume."""
    state = {"delta": delta.state_dict(), "optimizer": opt.state_dict(), "step": step, "generator": generator.get_state(),
             "scaler": scaler.state_dict() if scaler else None}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    torch.manual_seed(args.seed)  # the deltas' random initialisation
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if args.device.startswith("cuda") else torch.float32)
    if args.ckpt is None:
        print("training on the shapes model; pass --ckpt for Stable Diffusion v1")
    sd = load(args.ckpt, device=args.device, dtype=dtype)
    concepts = concepts_from(args)
    if args.gen_reg:
        for i, c in enumerate(concepts):
            c.reg = generate_regularization(sd, c.class_prompt, args.gen_reg, seed=args.seed + 1000 * i)
    batches = ConceptBatches(concepts, sd.resolution, sd.vae.downsampling_factor,
                             aug=not (args.no_augment or args.cache), flip_p=args.flip_p,
                             cutmix_prob=CUTMIX_PROB if args.cutmix else 0.0)
    cache = FeatureCache(sd) if args.cache else None
    unmix = Unmix(sd, [c.token for c in concepts], args.unmix_weight) if args.unmix_weight > 0 else None
    sd.unet.gradient_checkpointing = args.grad_checkpointing
    options = {"custom": {"train": "attn2" if args.train_attn2 else "kv"}, "svdiff": {"subset": args.subset},
               "residual": {}}[args.method]
    if args.rank_fraction is not None:  # else the paper's 0.05, PersonalizedResiduals' default
        options["rank_fraction"] = args.rank_fraction
    if args.train_tokens:
        options["train_tokens"] = True
    delta = attach(sd, args.method, tokens=[c.token for c in concepts], **options)
    trainable = delta.trainable(args.lr)
    for p in (p for group in trainable for p in group["params"]):
        p.data = p.data.float()  # trained tensors stay fp32 when the frozen weights are half; autocast casts them
    opt = torch.optim.AdamW(trainable, weight_decay=0.0)
    scaler = torch.amp.GradScaler(sd.device.type) if dtype == torch.float16 else None
    generator = torch.Generator().manual_seed(args.seed)
    out, resume_path = Path(args.out), Path(args.out).with_suffix(".resume.pt")
    start = 0
    if args.resume:
        if not resume_path.is_file():
            raise NanocustomError(f"--resume: no checkpoint {resume_path}; train without --resume first")
        state = torch.load(resume_path, weights_only=True)
        delta.load_state_dict(state["delta"])
        opt.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        if scaler and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start = state["step"]
        print(f"resuming at step {start}")

    metadata = {"training": {k: v for k, v in vars(args).items() if k != "resume"}}
    diffusion, last_good = sd.diffusion, delta.state_dict()
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps)
    try:
        for step in bar:
            batch = batches.next_batch(args.batch_size, generator)
            loss = training_step(sd, batch, opt, generator, dtype, args.prior_weight, cache, diffusion, unmix,
                                 scaler)
            if not torch.isfinite(loss):
                delta.load_state_dict(last_good)
                save_delta(delta, out, metadata)
                raise NanocustomError(f"the loss became {loss.item()} at step {step}; kept the last good delta in "
                                      f"{out}; lower --lr (now {args.lr:g})")
            last_good = delta.state_dict()
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if (step + 1) % args.save_every == 0 and step + 1 < args.steps:
                save_resume_state(resume_path, delta, opt, step + 1, generator, scaler)
                save_delta(delta, out, metadata)
    except KeyboardInterrupt:
        delta.load_state_dict(last_good)
        save_delta(delta, out, metadata)
        print(f"\ninterrupted: saved the last good delta to {out}", file=sys.stderr)
        sys.exit(130)
    save_delta(delta, out, metadata)
    resume_path.unlink(missing_ok=True)
    print(f"wrote {out}")

    from PIL import Image  # a grid of the concept, to look at
    prompts = [c.prompt for c in concepts for _ in range(4)]
    grid = Image.fromarray(image_grid(generate(sd, prompts, seed=args.seed, progress=False), columns=4))
    atomic_write(out.with_suffix(".png"), lambda tmp: grid.save(tmp, format="PNG"))
    print(f"wrote {out.with_suffix('.png')}")


if __name__ == "__main__":
    run_script(main)
