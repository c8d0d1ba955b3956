"""The papers' end-to-end claims, measured on the shapes model by toy.py's evaluator (the README's figures).

    python -m nanocustom.endtoend personalize   # each method learns a held-out concept: presence before/after, and
                                                #   drift of the class prompt; Custom Diffusion with and without
                                                #   regularisation images (Kumari et al. Table 3)
    python -m nanocustom.endtoend compose       # two concepts: Lagrangian merge vs addition vs joint training
                                                #   (Kumari et al. Table 7); the same for a control pair of
                                                #   plain looks that the base model draws together
    python -m nanocustom.endtoend lag           # background preservation with and without LAG (Ham et al. §3.3),
                                                #   for the concept's images and for it shot on one background
    python -m nanocustom.endtoend words         # the base model asked in words: each concept's look, the pair,
                                                #   two patterned objects (what a method could find at best)
    python -m nanocustom.endtoend all --quick   # fewer steps and images: the CI version

Training runs `train.py` as a user would (a subprocess, its defaults unless said here, training seed 0 unless
--train-seed); sampling is 25 DDIM steps (--steps; Ham et al. §4.3 evaluate with 50) at guidance 6 (both papers'
scale) from fixed seeds. Results are printed and written as JSON (--json), with the protocol that made them.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nanocustom import toy
from nanocustom.checkpoint import REPO_ROOT, atomic_write, load
from nanocustom.merge import combine
from nanocustom.personalize import load_delta
from nanocustom.pipeline import generate
from nanocustom.pretrain import shows_asked_patterns

STEPS, GUIDANCE = 25, 6.0
A, B = "striped_square", "split_circle"  # the two concepts of the composition experiment
# not yellow, the one-background set's, nor the concept's own red or white: a background avoids its object's colours
LAG_BACKGROUNDS = ("blue", "green", "black", "gray", "purple", "orange")


def train(out, method, concepts, *flags, folders=None, seed=0):
    """python train.py --method METHOD --concept DIR --prompt "photo of a <newK> class" ... --seed SEED --out OUT;
    each concept's DIR is its shipped folder unless `folders` names another."""
    pairs = [((folders or {}).get(name, toy.CONCEPTS_DIR / name), concept_prompt(name)) for name in concepts]
    return train_on(out, method, pairs, *flags, seed=seed)


def train_on(out, method, pairs, *flags, seed=0):
    """train.py on (folder, prompt) pairs, one --concept/--prompt each."""
    argv = [sys.executable, str(REPO_ROOT / "train.py"), "--method", method, "--out", str(out), "--seed", str(seed),
            *map(str, flags)]
    for folder, prompt in pairs:
        argv += ["--concept", str(folder), "--prompt", prompt]
    run = subprocess.run(argv, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"train.py failed ({run.returncode}): {run.stderr.strip().splitlines()[-1:]}")
    return out


def concept_prompt(name, photo=True):
    return f"{'photo of ' if photo else ''}a {toy.DEFAULT_TOKENS[name]} {toy.CONCEPTS[name].shape}"


def samples(sd, prompt, n, seed=0, steps=STEPS, **options):
    return generate(sd, [prompt] * n, steps=steps, guidance=GUIDANCE, seed=seed, progress=False, **options)


def concept_scores(sd, name, n, **options):
    """Presence of the concept for its prompts; for the class prompt, how often it gives a plain member of the
    class (prompt adherence of "a square") and how often the concept leaks into it. `options` go to generate."""
    shape = toy.CONCEPTS[name].shape
    scores = {}
    if toy.DEFAULT_TOKENS[name] in sd.tokenizer.added_tokens:
        images = np.concatenate([samples(sd, concept_prompt(name, photo), n, seed=s, **options)
                                 for s, photo in enumerate((True, False))])
        scores["presence"] = toy.concept_presence(images, name)
    plain = samples(sd, f"a {shape}", n, seed=7, **options)
    scores["class prompt: plain member"] = toy.prompt_adherence(plain, f"a {shape}")
    scores["class prompt: concept leaks"] = toy.concept_presence(plain, name)
    return scores


def reg_folder(folder, shape, n):
    """n rendered members of the class with their captions: the "real" regularisation images of the shapes world."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(toy.render_prompt(f"a {shape}", n, seed=11)):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"photo of a {shape}")
    return folder


def personalize(work, n, quick, steps, seed):
    base = load()
    results = {"base model": concept_scores(base, A, n, steps=steps)}
    short = ["--steps", 20] if quick else []
    for method in ("custom", "svdiff", "residual"):
        sd = load()
        load_delta(sd, train(work / f"{method}.safetensors", method, [A], *short, seed=seed))
        results[method] = concept_scores(sd, A, n, steps=steps)
    # the same residuals with LAG (Ham et al. §3.3; "a square", naming no token, is then the base model's), and
    # with guidance's unconditional prediction from the base model (ours, not the papers'), alone and with LAG
    results["residual, LAG"] = concept_scores(sd, A, n, steps=steps, lag=True)
    results["residual, base unconditional"] = concept_scores(sd, A, n, steps=steps, base_unconditional=True)
    results["residual, LAG + base unconditional"] = concept_scores(sd, A, n, steps=steps, lag=True,
                                                                   base_unconditional=True)
    # the modifier token's row trained too (Ham et al. Table 3's "update token embedding"): <new1> starts from a
    # rare token's row, a trained word in SD's CLIP but in the shapes model still nearly its random initialisation,
    # since no shapes caption uses it
    sd = load()
    load_delta(sd, train(work / "residual-token.safetensors", "residual", [A], "--train-tokens", *short, seed=seed))
    results["residual, token trained"] = concept_scores(sd, A, n, steps=steps)
    results["residual, token trained, LAG + base unconditional"] = concept_scores(sd, A, n, steps=steps, lag=True,
                                                                                  base_unconditional=True)
    sd = load()
    reg = reg_folder(work / "reg", toy.CONCEPTS[A].shape, 8 if quick else 64)
    load_delta(sd, train(work / "custom-reg.safetensors", "custom", [A], "--reg-dir", reg, *short, seed=seed))
    results["custom + regularisation images"] = concept_scores(sd, A, n, steps=steps)
    return results


def both_present(sd, n, prompt=None, **options):
    """How often A and B appear together for `prompt` (default: photo of a <new1> square and a <new2> circle)."""
    prompt = prompt or f"{concept_prompt(A)} and {concept_prompt(B, photo=False)}"
    images = samples(sd, prompt, n, seed=3, **options)
    seen = toy.describe(images)
    both = [{o.concept for o in s.objects} >= {A, B} for s in seen]
    return {"both concepts": float(np.mean(both)), A: toy.concept_presence(images, A),
            B: toy.concept_presence(images, B)}


# The control: two looks the base model draws side by side when asked in words, taught as concepts from six
# renders each. What the merge keeps of a pair that the base model can draw (the held-out pair it cannot).
CONTROL = {"red square": ("square", "red"), "blue circle": ("circle", "blue")}


def control_present(sd, n, prompt, **options):
    """How often the control's two looks (plain, not patterned) appear together for `prompt`, and each alone."""
    seen = toy.describe(samples(sd, prompt, n, seed=3, **options))
    found = np.array([[any((o.shape, o.colour, o.pattern, o.concept) == (*look, None, None) for o in s.objects)
                       for look in CONTROL.values()] for s in seen])
    return {"both": float(found.all(1).mean()), **{k: float(v) for k, v in zip(CONTROL, found.mean(0))}}


def merge_add_joint(paths, joint, score):
    """score(sd) for the deltas `paths` merged by Eq. 5 and added, and for the jointly trained delta `joint`."""
    results = {}
    for how in ("lagrangian", "add"):
        sd = load()
        combine(sd, paths, how=how, log=lambda *_: None)
        results[f"{how} merge"] = score(sd)
    sd = load()
    load_delta(sd, joint)
    results["joint training"] = score(sd)
    return results


def compose(work, n, quick, steps, seed):
    short = ["--steps", 20] if quick else []
    paths = [train(work / f"{name}.safetensors", "custom", [name], *short, seed=seed) for name in (A, B)]
    joint = train(work / "joint.safetensors", "custom", [A, B], *short, seed=seed)
    results = merge_add_joint(paths, joint, lambda sd: both_present(sd, n, steps=steps))
    results["control: a pair the base model draws"] = control(work, n, short, steps, seed)
    return results


def control(work, n, short, steps, seed):
    """The compose experiment on CONTROL (each look as <newK> from six renders; the base model asked in words),
    and the same pair for SVDiff and the residuals, each concept trained alone and the two combined."""
    pairs = []  # (folder, training prompt) per look
    for k, (look, (shape, colour)) in enumerate(CONTROL.items()):
        folder = work / look.replace(" ", "_")
        folder.mkdir()
        for i, image in enumerate(toy.render_prompt(f"a {colour} {shape}", 6, seed=[13, k])):
            Image.fromarray(image).save(folder / f"{i:02d}.png")
        pairs.append((folder, f"photo of a <new{k + 1}> {shape}"))
    (s1, c1), (s2, c2) = CONTROL.values()
    results = {"in words": control_present(load(), n, f"photo of a {c1} {s1} and a {c2} {s2}", steps=steps)}
    paths = [train_on(work / f"control{k}.safetensors", "custom", [pair], *short, seed=seed)
             for k, pair in enumerate(pairs)]
    joint = train_on(work / "control-joint.safetensors", "custom", pairs, *short, seed=seed)
    prompt = f"photo of a <new1> {s1} and a <new2> {s2}"
    results.update(merge_add_joint(paths, joint, lambda sd: control_present(sd, n, prompt, steps=steps)))
    # the other methods' combinations: spectral shifts added (Han et al. Eq. 4), residuals summed (Ham et al.
    # §3.2; their token rows trained, as the residuals learn best on the shapes model), also under LAG
    for method, flags in (("svdiff", []), ("residual", ["--train-tokens"])):
        paths = [train_on(work / f"control-{method}{k}.safetensors", method, [pair], *flags, *short, seed=seed)
                 for k, pair in enumerate(pairs)]
        sd = load()
        combine(sd, paths, log=lambda *_: None)
        results[f"{method} combined"] = control_present(sd, n, prompt, steps=steps)
        if method == "residual":
            results["residual combined, LAG + base unconditional"] = control_present(
                sd, n, prompt, steps=steps, lag=True, base_unconditional=True)
    return results


def in_words(name):
    """A held-out concept's look in the world's words: "a red and white striped square"."""
    c = toy.CONCEPTS[name]
    return f"a {c.colours[0]} and {c.colours[1]} {c.pattern} {c.shape}"


def patterned_pairs(k, seed=0):
    """k prompts naming two patterned objects, neither a held-out concept's look."""
    rng, prompts = np.random.default_rng(seed), []
    while len(prompts) < k:
        (s1, s2), (p1, p2) = rng.choice(toy.SHAPES, 2, replace=False), rng.choice(list(toy.PATTERNS), 2, replace=False)
        c = rng.choice(list(toy.COLOURS), 4, replace=False)
        if toy.concept_of_look(s1, p1, c[:2]) is None and toy.concept_of_look(s2, p2, c[2:]) is None:
            prompts.append(f"a {c[0]} and {c[1]} {p1} {s1} and a {c[2]} and {c[3]} {p2} {s2}")
    return prompts


def words(work, n, quick, steps, seed):
    """The base model asked in words, no training: each concept's look (presence), the composition pair (both
    present) and pairs of patterned objects that are no concept (adherence; both asked patterns seen at all).
    A method that finds a concept's words can find at most this, so the pair bounds the compose experiment."""
    base = load()
    results = {"concepts in words": {name: toy.concept_presence(samples(base, in_words(name), n, steps=steps), name)
                                     for name in toy.CONCEPTS}}
    results["the pair in words"] = both_present(base, n, prompt=f"{in_words(A)} and {in_words(B)}", steps=steps)
    adherence, patterns_seen = [], []
    for i, prompt in enumerate(patterned_pairs(2 if quick else 8)):
        images, spec = samples(base, prompt, n, seed=i, steps=steps), toy.parse_caption(prompt)
        adherence.append(toy.prompt_adherence(images, prompt))
        patterns_seen.append(np.mean([shows_asked_patterns(seen, spec) for seen in toy.describe(images)]))
    results["two patterned objects"] = {"adherence": float(np.mean(adherence)),
                                        "both patterns seen": float(np.mean(patterns_seen))}
    return results


def one_background_folder(folder, name, background, n=6):
    """n images of the concept, all on one background: a subject always photographed in the same place, the
    case Ham et al. §3.3 give for LAG (residuals that have not told the concept from its surroundings)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        scene = toy.complete_scene(toy.Scene([toy.Obj(toy.CONCEPTS[name].shape, concept=name)], background), rng)
        Image.fromarray(toy.render(scene)).save(folder / f"{i:02d}.png")
    return folder


def lag(work, n, quick, steps, seed):
    """Background preservation (against the base model from the same noise, the concept's token left out) with
    and without LAG, for residuals trained on the shipped images (varied backgrounds) and on the concept shot on
    one background (yellow), asked for on backgrounds other than its images'."""
    short = ["--steps", 20] if quick else []
    sets = {"varied backgrounds": toy.CONCEPTS_DIR / A,
            "one background (yellow)": one_background_folder(work / "yellow", A, "yellow")}
    prompts = [f"{concept_prompt(A)} on a {colour} background" for colour in LAG_BACKGROUNDS[:3 if quick else None]]
    base = load()  # the reference: the same x_T without the concept's token
    references = [samples(base, prompt.replace(f"{toy.DEFAULT_TOKENS[A]} ", ""), n, seed=5, steps=steps)
                  for prompt in prompts]
    results = {}
    for label, folder in sets.items():
        sd = load()
        # attached, not folded: LAG blends base and personalised proj_out
        load_delta(sd, train(work / f"residual-{len(results)}.safetensors", "residual", [A], *short,
                             folders={A: folder}, seed=seed))
        results[label] = {}
        for colour, prompt, reference in zip(LAG_BACKGROUNDS, prompts, references):
            plain = samples(sd, prompt, n, seed=5, steps=steps)
            localized = samples(sd, prompt, n, seed=5, steps=steps, lag=True)
            results[label][colour] = {"plain": toy.background_preservation(plain, reference),
                                      "LAG": toy.background_preservation(localized, reference)}
    return results


EXPERIMENTS = {"personalize": personalize, "compose": compose, "lag": lag, "words": words}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("experiment", choices=[*EXPERIMENTS, "all"])
    p.add_argument("--quick", action="store_true", help="20 training steps and 4 images a prompt: a smoke run")
    p.add_argument("--n", type=int, default=None, help="images per prompt (default 16, 4 with --quick)")
    p.add_argument("--steps", type=int, default=STEPS, help="DDIM steps a sample (Ham et al. §4.3: 50)")
    p.add_argument("--train-seed", type=int, default=0, help="train.py --seed: the deltas' initialisation and batches")
    p.add_argument("--json", default=None, help="also write the results here, with the protocol")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps {args.steps}: a sample needs at least 1 DDIM step; use 25 (ours) or 50 (Ham et al.)")
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.n or (4 if args.quick else 16)
    names = list(EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for name in names:
            results[name] = EXPERIMENTS[name](Path(work), n, args.quick, args.steps, args.train_seed)
            print(json.dumps({name: results[name]}, indent=1), flush=True)
    if args.json:
        protocol = {"images per prompt": n, "DDIM steps": args.steps, "guidance": GUIDANCE,
                    "training seed": args.train_seed, "quick": args.quick}
        text = json.dumps({"protocol": protocol, **results}, indent=1)
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(text))
    return results


if __name__ == "__main__":
    main()
