"""Pretraining the shapes model: a tiny Stable Diffusion v1, same classes, small configs, on `toy.py`'s world.

Three stages and a half, one command. Stages 1 and 2 are Latent Diffusion's (Rombach et al. 2022, §3):
  1. the autoencoder, on images alone: L1 + MSE reconstruction + a tiny KL term (§3.1, "KL-reg."; we drop the
     perceptual and adversarial losses, which a world of flat shapes does not need). MSE matters here: with L1
     alone a small object is a minority of pixels, and the decoder painted it in the background's colour. On
     32 x 32 crops but for the last steps: four times the steps in the time (train_vae);
  1b. the text encoder, on captions alone: taught to parse them (train_text_encoder), then frozen, as SD v1's CLIP
     is. SD v1 reuses CLIP; ours is made here, since CLIP's weights are too big to ship, and made to bind each
     colour to its own shape, which the diffusion loss alone never taught it (JOURNAL.md, "How the recipe came to be");
  2. the UNet, on scaled latents of captioned images, under SD v1's schedule with eps-prediction and the DDPM
     loss L_simple (Ho et al. 2020, Eq. 14; LDM Eq. 2), and 10% empty captions so that classifier-free guidance
     works (Ho & Salimans 2022, §3.2). Here the model learns to draw the shapes;
  3. a short finish under zero terminal SNR with v-prediction (Lin et al. 2024, §3.1-3.3) and the loss balanced
     across timesteps (LossBalance). Here the background comes to follow the caption, not the noise (train_diffusion).
The latent scale is set, as SD's 0.18215 was, to make the latents about unit variance (§4.3.2).

    OMP_WAIT_POLICY=PASSIVE python -m nanocustom.pretrain --threads 2   # weights/shapes.safetensors
    python -m nanocustom.pretrain --device cuda         # the same recipe on a GPU
    python -m nanocustom.pretrain --evaluate            # the quality figures of the README, by toy.py's evaluator
    python -m nanocustom.pretrain --diagnose            # the quick protocol: which attributes go wrong, and how often
    python -m nanocustom.pretrain --vae-from CKPT       # stages 2 and 3 on a trained autoencoder
    python -m nanocustom.pretrain --init-from CKPT --text-steps 0 --unet-steps 0 --out /tmp/f.safetensors
                                          # stage 3 alone on a trained checkpoint
    python -m nanocustom.pretrain --init-from CKPT --unet-steps 0   # 1b on its text encoder (or a new one), then 3
    python -m nanocustom.pretrain --init-from CKPT --text-steps 0 --unet-steps 0 --finish-steps 2000 --patterns 0.5
                                          # stage 3 with half the objects patterned (the world has a quarter)
    python -m nanocustom.pretrain --init-from CKPT --text-steps 0 --unet-steps 0 --finish-steps 0 --decoder-steps 1000
                                          # the VAE decoder alone, the latent space kept (train_decoder)
"""
import argparse
import copy
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nanocustom import toy
from nanocustom.checkpoint import DEFAULT_CHECKPOINT, StableDiffusion, load, new_model, save
from nanocustom.clip import CLIPTextConfig, CLIPTextModel
from nanocustom.diffusion import Diffusion
from nanocustom.errors import NanocustomError, check_device, run_script
from nanocustom.unet import UNetConfig
from nanocustom.vae import VAEConfig

# 64x64 images -> 16x16x4 latents (a factor of 4; SD v1 uses 8). At a factor of 8 each latent pixel must hold
# an 8x8 patch's background, object colour and edge in 4 numbers: the decoder drew blobs. 64 channels, not 32: the
# GroupNorms have 32 groups, and with one channel per group they erase every flat colour (our whole world).
VAE_CONFIG = VAEConfig(ch=64, ch_mult=(1, 1, 1), num_res_blocks=1)
# Self-attention at 8x8 and 4x4 only (ds 2 and 4): with 16x16 too a CPU step costs 60% more (measured), which the
# 90-minute CPU budget of the recipe cannot pay.
UNET_CONFIG = UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(2, 4),
                         num_heads=4, context_dim=64)
# Not CLIP's causal mask: the encoder sees the whole caption, so a colour word can know whose colour it is
# (train_text_encoder; Imagen's bidirectional T5 encoder binds better than CLIP's, Saharia et al. 2022, §4.4).
TEXT_CONFIG = CLIPTextConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                             causal=False)
P_UNCOND = 0.1  # fraction of captions replaced by "" (classifier-free guidance)
ZERO_SNR = dict(zero_terminal_snr=True, spacing="trailing")  # stage 3's schedule; see train_diffusion
# The one command's steps: its runs met the quality targets on 2 CPU cores in 94 min (session 20), 99.5 min
# (session 28) and 77 min (session 30): the time is the machine's (README);
# 3,000 + 3,000 fell short (single-object 78.1%, session 21), and so did 50 whole-image VAE steps, 450 parse steps
# and 4,000 stage-3 scenes (79.7%, session 22).
VAE_STEPS, VAE_CROP, VAE_FULL_STEPS = 2000, 32, 100  # stage 1's, of 8 images: 32 x 32 crops but the last 100
TEXT_STEPS = 600  # stage 1b's, of 128 captions
UNET_STEPS, SCENES = 3000, 10_000  # stage 2's, of 32 latents, from SCENES scenes encoded once (0: render afresh)
FINISH_STEPS, FINISH_SCENES, FINISH_LR = 3500, 8_000, 5e-4  # stage 3's
PAIRS = 0.7  # the fraction of scenes with two objects: binding is learnt from them (JOURNAL.md)


def to_model_images(images):
    """uint8 [B, 64, 64, 3] -> float [B, 3, 64, 64] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def random_crops(x, side, generator):
    """A side x side crop of each image [B, C, H, W], at a random place."""
    tops = torch.randint(0, x.shape[2] - side + 1, (len(x),), generator=generator).tolist()
    lefts = torch.randint(0, x.shape[3] - side + 1, (len(x),), generator=generator).tolist()
    return torch.stack([im[:, t:t + side, l:l + side] for im, t, l in zip(x, tops, lefts)])


class Pace:
    """A stage's pace for its log lines, "0.70 s a step, 34 min to go", timed from its step 0: 2-core machines
    differ by up to 2x (README), so the log says early how long this one will take."""

    def __init__(self, steps):
        self.steps, self.start = steps, None

    def __call__(self, step):
        if self.start is None:
            self.start = time.time()
            return ""
        per_step = (time.time() - self.start) / step
        return f"  {per_step:.2f} s a step, {per_step * (self.steps - 1 - step) / 60:.0f} min to go"


def cosine_step(opt, loss, lr, step, steps):
    """One optimizer step on loss, then the next step's learning rate: lr on a cosine decay to 0 at `steps`."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    for group in opt.param_groups:
        group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * (step + 1) / steps))


def train_vae(vae, steps, batch, lr, seed, log, mse_weight=1.0, crop=None, full_steps=0):
    """Stage 1: L1 (+ mse_weight * MSE) reconstruction of a posterior sample, plus 1e-6 * KL(q(z|x) || N(0, I)).

    crop: train on random crop x crop patches, as LDM trains its autoencoders on crops (§4; the networks are
    convolutional), but for the last full_steps, which see whole images (the mid-block's self-attention then sees
    the latent size it will work at). A 32 x 32 crop costs a quarter of a 64 x 64 image: 4x the steps in the time."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    device = next(vae.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # start from a nearly deterministic posterior (std e^-5): with logvar ~ 0 at init the
        vae.quant_conv.bias[vae.config.embed_dim:] = -10.0  # decoder learns from noisy latents and blurs
    pace = Pace(steps)
    for step in range(steps):
        x = to_model_images(toy.sample_batch(batch, seed=[seed, 0, step])[0])
        if crop and step < steps - full_steps:
            x = random_crops(x, crop, generator)
        x = x.to(device)
        mean, logvar = vae.encode(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
        decoded = vae.decode(z)
        loss = F.l1_loss(decoded, x) + mse_weight * F.mse_loss(decoded, x) + 1e-6 * kl
        cosine_step(opt, loss, lr, step, steps)
        if step % 50 == 0 or step == steps - 1:
            log(f"vae  step {step:5d}/{steps}  loss {loss.item():.4f}{pace(step)}")  # L1 + MSE + KL
    return vae.eval().requires_grad_(False)


def train_decoder(vae, steps, batch, lr, seed, log, patterns=toy.PATTERN_PROB):
    """Stage 1 continued: the decoder alone (and post_quant_conv) on whole images of the current world, the encoder
    frozen, so the latent space, and every UNet trained on it, stays as it was; Stability AI fine-tuned SD's VAE
    decoder the same way (sd-vae-ft-mse), for sharper images under the same UNet. For a VAE trained before the world
    had patterns: its decoder drew a red and white striped square's round trip in other colours (JOURNAL.md, "Session
    12: the decoder was a ceiling"). L1 + MSE of the decoded posterior sample; no KL (the encoder does not train)."""
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    vae.eval().requires_grad_(False)
    vae.decoder.train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    device, generator = next(vae.parameters()).device, torch.Generator().manual_seed(seed)
    for p in params:
        p.requires_grad_(True)
    pace = Pace(steps)
    for step in range(steps):
        rng = np.random.default_rng([seed, 6, step])
        scenes = [toy.random_scene(rng, pattern_prob=patterns) for _ in range(batch)]
        x = to_model_images(np.stack([toy.render(s) for s in scenes])).to(device)
        with torch.no_grad():
            mean, logvar = vae.encode(x)
            z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator).to(device)
        decoded = vae.decode(z)
        loss = F.l1_loss(decoded, x) + F.mse_loss(decoded, x)
        cosine_step(opt, loss, lr, step, steps)
        if step % 50 == 0 or step == steps - 1:
            log(f"decoder step {step:5d}/{steps}  loss {loss.item():.4f}{pace(step)}")
    return vae.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- stage 1b: the text encoder

# Heads of the caption parse, per object: shape (0 = no object), colour, size, position, second colour (0 = unsaid;
# else 1 + index in toy.COLOURS, toy.SIZES, toy.SLOTS), pattern (0 = solid, else 1 + index in toy.PATTERNS).
OBJECT_CLASSES = (1 + len(toy.SHAPES), 1 + len(toy.COLOURS), 1 + len(toy.SIZES), 1 + len(toy.SLOTS),
                  1 + len(toy.COLOURS), 1 + len(toy.PATTERNS))
SCENE_CLASSES = OBJECT_CLASSES * 2 + (1 + len(toy.BACKGROUNDS),)  # from EOS on: both objects, the background
POSITION_ENDS = {words.split()[-1] for words in toy.POSITION_WORDS.values()}  # "left", "middle", "right"


def _object_target(o):
    if o is None:
        return [0] * len(OBJECT_CLASSES)
    return [1 + toy.SHAPES.index(o.shape), 0 if o.colour is None else 1 + list(toy.COLOURS).index(o.colour),
            0 if o.size is None else 1 + list(toy.SIZES).index(o.size),
            0 if o.position is None else 1 + toy.SLOTS.index(o.position),
            0 if o.colour2 is None else 1 + list(toy.COLOURS).index(o.colour2),
            0 if o.pattern is None else 1 + list(toy.PATTERNS).index(o.pattern)]


def parse_targets(captions, length=77, causal=True):
    """Captions -> what stage 1b teaches each token feature to say (-1: nothing).

    scene [B, length, 13]: the first object's 6 attributes, the second's (shape 0 when there is none) and the
    background (0 = unsaid); taught from EOS on (EOS and the padding, which repeats it).
    object [B, length, 6]: an object's attributes (_object_target). causal=True (CLIP's mask): only what a token
    can know, so at a shape word all but the position and at its position's last word ("left") all.
    causal=False (an encoder that sees the whole caption): at every word of the object's phrase, so that no word's
    feature says a colour without saying whose; every other token (BOS, "photo of", "and" between objects, the
    background's words) is taught the scene."""
    n = len(OBJECT_CLASSES)
    obj, scene = torch.full((len(captions), length, n), -1), torch.full((len(captions), length, 2 * n + 1), -1)
    for b, text in enumerate(captions):
        said, words = toy.parse_caption(text), text.split()
        second = said.objects[1] if len(said.objects) > 1 else None
        background = 0 if said.background is None else 1 + list(toy.BACKGROUNDS).index(said.background)
        whole = torch.tensor(_object_target(said.objects[0]) + _object_target(second) + [background])
        scene[b, len(words) + 1:] = whole
        if not causal:
            scene[b, :len(words) + 1] = whole
        first = 2 if words[:2] == ["photo", "of"] else 0
        last = len(words) - 4 if words[-1] == "background" else len(words)  # "on a blue background"
        k = 0  # which object the words are about
        for i in range(first, last):
            if words[i] == "and" and words[i + 1] in ("a", "an"):  # the next object's words begin (else a
                k += 1                                             # pattern's colours: "red and white striped")
                continue
            target = _object_target(said.objects[k])
            if not causal:
                obj[b, 1 + i], scene[b, 1 + i] = torch.tensor(target), -1
            elif words[i] in toy.SHAPES:
                obj[b, 1 + i] = torch.tensor(target[:3] + [-1] + target[4:])  # its position, if said, comes later
            elif words[i] in POSITION_ENDS:
                obj[b, 1 + i] = torch.tensor(target)
    return obj, scene


def parse_loss(logits_object, logits_scene, obj, scene):
    """Cross-entropy of each attribute head, ignoring -1; logits_object [B, T, sum(OBJECT_CLASSES)],
    logits_scene [B, T, sum(SCENE_CLASSES)]."""
    loss = 0.0
    for logits, targets, classes in ((logits_object, obj, OBJECT_CLASSES), (logits_scene, scene, SCENE_CLASSES)):
        for j, part in enumerate(logits.split(list(classes), dim=-1)):
            loss = loss + F.cross_entropy(part.flatten(0, 1), targets[..., j].flatten(), ignore_index=-1)
    return loss


def train_text_encoder(text_encoder, tokenizer, steps, batch, lr, seed, log, pairs=0.5, patterns=toy.PATTERN_PROB):
    """Stage 1b: SD v1 conditions on a frozen text encoder that CLIP's contrastive training made (Radford et al.
    2021); ours must be made here, and made to *bind*: with the text encoder trained only through the diffusion
    loss (sessions 2-7), a noun's feature hardly depended on its colour word (cosine 0.94-1.00 under swapped colours,
    binding_probe), and two-object prompts failed. So, as CLIP's features say what the caption describes, ours are
    trained to parse the caption: linear heads read each object's attributes off the features of its words, and
    the whole scene off the other tokens (parse_targets). Captions only, no images: a few minutes on a CPU. The
    heads are dropped; the encoder is frozen from here on, as SD v1's is.

    Measured (JOURNAL.md, "How the recipe came to be"): with CLIP's causal mask (session 8) only the shape word can
    know its colour, and the UNet kept reading the colour words themselves, which cannot say whose colour they are:
    two-object adherence stayed at 9.4% (quick protocol). Without the mask (TEXT_CONFIG, session 9) every word of
    an object's phrase is taught the whole object, and the shipped UNet continued on it went to 26.6%."""
    device = next(text_encoder.parameters()).device
    width = text_encoder.config.hidden_size
    heads = torch.nn.ModuleDict({"object": torch.nn.Linear(width, sum(OBJECT_CLASSES)),
                                 "scene": torch.nn.Linear(width, sum(SCENE_CLASSES))})
    heads.to(device)
    params = list(text_encoder.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    rng = np.random.default_rng([seed, 6])
    text_encoder.train().requires_grad_(True)
    pace = Pace(steps)
    for step in range(steps):
        captions = [toy.random_caption(toy.random_scene(rng, pair_prob=pairs, pattern_prob=patterns), rng)
                    for _ in range(batch)]
        obj, scene = (t.to(device) for t in parse_targets(captions, causal=text_encoder.config.causal))
        features = text_encoder(tokenizer.encode(captions).to(device))
        loss = parse_loss(heads["object"](features), heads["scene"](features), obj, scene)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in opt.param_groups:  # linear warm-up, then cosine decay
            group["lr"] = lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + np.cos(np.pi * step / steps))
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"text step {step:5d}/{steps}  parse loss {loss.item():.4f}{pace(step)}")
    return text_encoder.eval().requires_grad_(False)


@torch.no_grad()
def shape_word_similarity(sd, caption_pairs, positions):
    """The mean cosine similarity of the text features at `positions` (the shape words) between the two captions
    of each pair: 1.0 when the words that differ do not reach the shape words at all."""
    cosines = []
    for a, b in caption_pairs:
        features = sd.text_encoder(sd.tokenizer.encode([a, b]).to(sd.device))[:, positions]
        cosines.append(F.cosine_similarity(features[0], features[1], dim=-1).mean().item())
    return float(np.mean(cosines))


def binding_probe(sd, n=64, seed=0):
    """How much a shape word's feature depends on its own colour word: shape_word_similarity between "a red circle
    and a green square" and the same with the colours swapped, over n random pairs (1.0: not at all, a bag of words
    the UNet cannot bind; lower is better)."""
    rng, pairs = np.random.default_rng([seed, 7]), []
    for _ in range(n):
        (s1, s2), (c1, c2) = rng.choice(toy.SHAPES, 2, replace=False), rng.choice(list(toy.COLOURS), 2, replace=False)
        pairs.append((f"a {c1} {s1} and a {c2} {s2}", f"a {c2} {s1} and a {c1} {s2}"))
    return shape_word_similarity(sd, pairs, [3, 7])  # the shape words: after BOS, "a", the colour


def pattern_binding_probe(sd, n=64, seed=0):
    """binding_probe for patterns: "a red and green striped circle and a blue and orange checked square" against
    the same with the two patterns swapped (1.0: the shape words do not know their own pattern, and two patterned
    objects share their patterns; lower is better)."""
    rng, pairs = np.random.default_rng([seed, 8]), []
    for _ in range(n):
        (s1, s2), (p1, p2) = rng.choice(toy.SHAPES, 2, replace=False), rng.choice(list(toy.PATTERNS), 2, replace=False)
        c = rng.choice(list(toy.COLOURS), 4, replace=False)
        caption = f"a {c[0]} and {c[1]} {{}} {s1} and a {c[2]} and {c[3]} {{}} {s2}"
        pairs.append((caption.format(p1, p2), caption.format(p2, p1)))
    return shape_word_similarity(sd, pairs, [6, 13])  # BOS a colour and colour pattern SHAPE and a c and c p SHAPE


@torch.no_grad()
def measure_latent_scale(vae, seed, n=512):
    """1 / std of the latents, so the diffusion model sees unit variance (LDM §4.3.2)."""
    device = next(vae.parameters()).device
    mean, _ = vae.encode(to_model_images(toy.sample_batch(n, seed=[seed, 1])[0]).to(device))
    return float(1.0 / mean.std())


def save_samples(sd, folder, name, log):
    """A grid of fixed prompts, to watch training (with --samples DIR)."""
    from PIL import Image
    from nanocustom.pipeline import generate, image_grid
    prompts = ["a red circle", "a blue square on a yellow background", "a green triangle on the left",
               "a big purple star", "a small orange heart on a white background", "a black cross",
               "a red circle and a green square", "a yellow star on the left and a blue heart on the right"]
    images = generate(sd, prompts, steps=20, guidance=5.0, progress=False)
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_grid(images, columns=8)).resize((8 * 128, 128), Image.NEAREST).save(folder / f"{name}.png")
    log(f"samples -> {folder / name}.png")


@torch.no_grad()
def encode(sd, scenes):
    """Render scenes and encode them: the VAE posterior's (means, stds)."""
    mean, logvar = sd.vae.encode(to_model_images(np.stack([toy.render(s) for s in scenes])).to(sd.device))
    return mean, torch.exp(0.5 * logvar)


def encode_scenes(sd, n, seed, log, pairs=0.5, patterns=toy.PATTERN_PROB, chunk=256):
    """Stage 2's training set: n random scenes, rendered and encoded once. The VAE is frozen by now and its
    encoder at 64x64 costs a third of a CPU training step, so each scene is encoded once and seen ~10 times
    (3,000 steps x 32 / 10,000), each time under a freshly drawn caption (toy.random_caption).
    Returns (scenes, posterior means, stds)."""
    rng = np.random.default_rng([seed, 5])
    scenes = [toy.random_scene(rng, pair_prob=pairs, pattern_prob=patterns) for _ in range(n)]
    means, stds = zip(*[encode(sd, scenes[i:i + chunk]) for i in range(0, n, chunk)])
    log(f"encoded {n} scenes")
    return scenes, torch.cat(means), torch.cat(stds)


def scene_batches(sd, batch, steps, seed, scenes, generator, log, pairs=0.5, patterns=toy.PATTERN_PROB):
    """(posterior means, stds, scenes) of each step's batch: from `scenes` scenes encoded once and reshuffled
    each epoch, or, with scenes=0, from a fresh render every step (the VAE encoder then costs a third more per
    CPU step)."""
    if not scenes:
        for step in range(steps):
            rng = np.random.default_rng([seed, 2, step])
            scene_list = [toy.random_scene(rng, pair_prob=pairs, pattern_prob=patterns) for _ in range(batch)]
            yield *encode(sd, scene_list), scene_list
        return
    scene_list, means, stds = encode_scenes(sd, scenes, seed, log, pairs, patterns)
    order = torch.randperm(scenes, generator=generator)
    for step in range(steps):
        if len(order) < batch:  # a new epoch: a new order
            order = torch.randperm(scenes, generator=generator)
        index, order = order[:batch], order[batch:]
        yield means[index], stds[index], [scene_list[i] for i in index]


class LossBalance:
    """Per-timestep loss weights that give every noise level the same share of the loss: each sample's loss is
    divided by a running mean of the loss at its timestep (20 bins of T / 20), times their geometric mean, so
    the loss keeps its scale. This is the optimum EDM2's learned uncertainty weighting reaches (Karras et al. 2024,
    "Analyzing and Improving the Training Dynamics of Diffusion Models", where L / e^u + u is least at
    e^u = E[L]), without the extra network.

    Why: under zero terminal SNR the v-loss near T is the error of guessing a whole scene from its caption, which
    no model can make small (per element about ten times the loss at t = 50 to 400, measured). Uniform in t,
    that part ruled the gradients: the session-5 model denoised worse than the session-2 model at every t. With
    the balance the gap at mid t mostly closes, though from scratch the shapes stay blobs (JOURNAL.md, "How the recipe
    came to be")."""

    def __init__(self, T, bins=20, decay=0.99):
        self.T, self.decay = T, decay
        self.mean = torch.full((bins,), float("nan"), dtype=torch.float64)

    def __call__(self, per_sample, t):
        """per-sample losses [B] at timesteps t [B] -> their weights [B] (no gradient)."""
        index = (t.cpu() * len(self.mean) // self.T).long()
        losses = per_sample.detach().double().cpu()
        for b in index.unique().tolist():
            value = losses[index == b].mean()
            old = self.mean[b]
            self.mean[b] = value if old.isnan() else self.decay * old + (1 - self.decay) * value
        seen = self.mean[~self.mean.isnan()]
        return (seen.log().mean().exp() / self.mean[index]).to(per_sample)


def train_diffusion(sd, steps, batch, lr, seed, log, ema_decay=0.999, samples=None, scenes=SCENES, zero_snr=False,
                    pairs=0.5, patterns=toy.PATTERN_PROB, train_text=True):
    """Stages 2 and 3: the UNet and the text encoder learn together on scaled latents (train_text=False: the text
    encoder of stage 1b stays frozen, as SD v1's CLIP does, LDM §3.3). Returns EMA weights.

    zero_snr=False (stage 2): SD v1's schedule and eps-prediction, L_simple. The model learns to draw shapes,
    but not the background: SD's schedule ends at abar_T = 0.0047 (Lin et al. 2024, §3.1), so x_T keeps
    sqrt(abar_T) = 0.068 of the latent's mean while the mean of 16x16 noise has a std of only 1/16; the
    background can be read off the noise at every step, and the model never learns it from the caption (from
    the same seed "on a blue background" and "on a yellow background" drew the same one, measured).

    zero_snr=True (stage 3): the leak removed, Lin et al. §3.1-3.3: the schedule rescaled to SNR(T) = 0,
    v-prediction (eps says nothing about x0 at T) and sampling from T ("trailing" spacing); and the loss balanced
    across timesteps (LossBalance). From scratch this draws blobs (JOURNAL.md, "How the recipe came to be"): the loss
    near T rules the gradients. After stage 2 it teaches the backgrounds and keeps the shapes.

    pairs, patterns: the fraction of scenes with two objects, of objects patterned (toy.random_scene)."""
    diffusion = Diffusion(**ZERO_SNR) if zero_snr else Diffusion()
    prediction_type, stage = ("v", "finish") if zero_snr else ("eps", "unet")
    sd.prediction_type, sd.schedule = prediction_type, ZERO_SNR if zero_snr else {}
    caption_rng = np.random.default_rng([seed, 2])
    balance = LossBalance(diffusion.T) if zero_snr else None
    modules = torch.nn.ModuleDict({"unet": sd.unet, **({"text_encoder": sd.text_encoder} if train_text else {})})
    sd.text_encoder.eval().requires_grad_(False)
    modules.train().requires_grad_(True)
    ema = copy.deepcopy(modules).eval().requires_grad_(False)
    # fused: one kernel updates every tensor; the update alone 56 -> 21 ms on 2 CPU cores, 1 to 4% of a step (measured)
    opt = torch.optim.AdamW(modules.parameters(), lr=lr, weight_decay=0.01, fused=True)
    generator = torch.Generator().manual_seed(seed)
    batches = scene_batches(sd, batch, steps, seed, scenes, generator, log, pairs, patterns)
    pace = Pace(steps)  # timed from step 0, after the encoding
    for step, (mean, std, scene_list) in enumerate(batches):
        drop = torch.rand(batch, generator=generator) < P_UNCOND
        captions = ["" if d else toy.random_caption(scene, caption_rng) for scene, d in zip(scene_list, drop.tolist())]
        x0 = (mean + std * torch.randn(mean.shape, generator=generator).to(sd.device)) * sd.latent_scale  # q(z | x)
        noise = torch.randn(x0.shape, generator=generator).to(sd.device)
        t = torch.randint(0, diffusion.T, (batch,), generator=generator).to(sd.device)
        context = sd.text_encoder(sd.tokenizer.encode(captions).to(sd.device))
        prediction = sd.unet(diffusion.add_noise(x0, noise, t), t, context)
        per_sample = (prediction - diffusion.target(x0, noise, t, prediction_type)).pow(2).mean(dim=(1, 2, 3))
        loss = (balance(per_sample, t) * per_sample).mean() if balance else per_sample.mean()  # L_simple (Ho Eq. 14)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        for group in opt.param_groups:  # linear warm-up, then cosine decay
            group["lr"] = lr * min(1.0, (step + 1) / 200) * 0.5 * (1 + np.cos(np.pi * step / steps))
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), modules.parameters()):
                e.lerp_(p, 1 - decay)
        if step % 50 == 0 or step == steps - 1:
            log(f"{stage} step {step:5d}/{steps}  loss {loss.item():.4f}{pace(step)}")
        if samples and (step + 1) % 500 == 0:
            save_samples(StableDiffusion(**{**vars(sd), **ema}), samples, f"{stage}-{step + 1:05d}", log)
    for name, module in ema.items():
        setattr(sd, name, module)
    return sd


def pretrain(out=DEFAULT_CHECKPOINT, vae_steps=VAE_STEPS, unet_steps=UNET_STEPS, finish_steps=FINISH_STEPS,
             vae_batch=8, batch=32, vae_lr=1e-3, lr=1e-3, finish_lr=FINISH_LR, text_steps=TEXT_STEPS, text_batch=128,
             text_lr=3e-3, seed=0, threads=None, samples=None, device="cpu", vae_config=None, unet_config=None,
             mse_weight=1.0, vae_from=None, init_from=None, scenes=SCENES, finish_scenes=FINISH_SCENES, pairs=PAIRS,
             patterns=toy.PATTERN_PROB, decoder_steps=0, decoder_lr=2e-4):
    """The stages of the module docstring, written to `out` in fp16 with the recipe in its metadata.
    vae_from skips stage 1 (its VAE and latent scale are taken); init_from skips it too and continues that
    checkpoint's UNet and text encoder; text_steps > 0 runs stage 1b (with init_from: on the checkpoint's text
    encoder if it has TEXT_CONFIG, e.g. to teach it new words, else on a fresh one, which replaces it);
    text_steps=0, unet_steps=0 or finish_steps=0 skips stage 1b, 2 or 3. A parsed text encoder, or a checkpoint's
    that sees the whole caption, stays frozen in stages 2 and 3. decoder_steps > 0 then trains the decoder alone
    (train_decoder), the latent space kept."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    start = time.time()

    def log(msg):
        print(f"[{time.time() - start:7.0f}s] {msg}", flush=True)

    sd = new_model(unet_config or UNET_CONFIG, vae_config or VAE_CONFIG, TEXT_CONFIG, resolution=toy.RES).to(device)
    vae_from = vae_from or init_from
    if vae_from:  # stage 1 done before: take its autoencoder and latent scale
        trained = load(vae_from, device=device)
        sd.vae, sd.latent_scale = trained.vae.eval().requires_grad_(False), trained.latent_scale
        if init_from:  # and its UNet and text encoder (with the schedule they were trained under)
            sd.unet, sd.text_encoder = trained.unet, trained.text_encoder
            sd.prediction_type, sd.schedule = trained.prediction_type, trained.schedule
    else:
        if device == "cpu":  # NHWC convolutions: 23% off a VAE step on 2 cores (1.28 -> 0.99 s, measured)
            sd.vae.to(memory_format=torch.channels_last)
        sd.vae = train_vae(sd.vae.train(), vae_steps, vae_batch, vae_lr, seed, log, mse_weight, crop=VAE_CROP,
                           full_steps=VAE_FULL_STEPS)
        sd.latent_scale = measure_latent_scale(sd.vae, seed)
    log(f"latent scale {sd.latent_scale:.4f}")
    if decoder_steps:
        log("stage 1, the decoder alone: the latent space kept")
        sd.vae = train_decoder(sd.vae, decoder_steps, vae_batch, decoder_lr, seed, log, patterns)
    if text_steps:  # stage 1b, on a fresh encoder or on the checkpoint's if it has TEXT_CONFIG
        go_on = bool(init_from) and sd.text_encoder.config == TEXT_CONFIG
        log("stage 1b: the text encoder learns to parse captions" + (", continuing the checkpoint's" if go_on else ""))
        torch.manual_seed(seed)
        sd.text_encoder = train_text_encoder(sd.text_encoder if go_on else CLIPTextModel(TEXT_CONFIG).to(device),
                                             sd.tokenizer, text_steps, text_batch, text_lr, seed, log, pairs, patterns)
    # A parsed encoder, or a checkpoint's that sees the whole caption, is frozen from here on, as SD v1's CLIP is;
    # an unparsed one learns with the UNet (the recipe before stage 1b).
    train_text = not (text_steps or (init_from and not sd.text_encoder.config.causal))
    log(f"binding probe {binding_probe(sd):.3f}, patterns {pattern_binding_probe(sd):.3f} (1: a bag of words); "
        "the text encoder "
        + ("learns with the UNet" if train_text else "stays frozen"))
    if samples:
        from PIL import Image
        from nanocustom.pipeline import image_grid, latents_to_images, to_uint8
        x = to_model_images(toy.sample_batch(8, seed=[seed, 3])[0]).to(sd.device)
        with torch.no_grad():
            recon = to_uint8(latents_to_images(sd, sd.vae.encode(x)[0] * sd.latent_scale))
        samples.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image_grid(np.concatenate([to_uint8(x), recon]), columns=8)).save(samples / "vae.png")
    if device == "cpu":  # NHWC convolutions: 18% off a CPU training step, 12% off an encode (2 cores, measured)
        sd.unet.to(memory_format=torch.channels_last), sd.vae.to(memory_format=torch.channels_last)
    if unet_steps:
        log("stage 2: SD v1's schedule, eps-prediction")
        sd = train_diffusion(sd, unet_steps, batch, lr, seed, log, samples=samples, scenes=scenes, pairs=pairs,
                             patterns=patterns, train_text=train_text)
    if finish_steps:  # a new seed: new scenes, captions and noise
        log("stage 3: zero terminal SNR, v-prediction, LossBalance")
        sd = train_diffusion(sd, finish_steps, batch, finish_lr, seed + 1, log, samples=samples, scenes=finish_scenes,
                             zero_snr=True, pairs=pairs, patterns=patterns, train_text=train_text)
    for module in (sd.unet, sd.vae):  # safetensors stores the standard (NCHW) layout
        module.to(memory_format=torch.contiguous_format)
    recipe = dict(vae_steps=0 if vae_from else vae_steps, vae_batch=vae_batch, vae_lr=vae_lr, mse_weight=mse_weight,
                  vae_crop=None if vae_from else VAE_CROP, vae_full_steps=0 if vae_from else VAE_FULL_STEPS,
                  decoder_steps=decoder_steps, decoder_lr=decoder_lr,
                  text_steps=text_steps, text_batch=text_batch, text_lr=text_lr,
                  unet_steps=unet_steps, batch=batch, lr=lr, scenes=scenes, finish_steps=finish_steps,
                  finish_lr=finish_lr, finish_scenes=finish_scenes, pairs=pairs, patterns=patterns,
                  seed=seed, device=str(device), torch=torch.__version__, threads=torch.get_num_threads(),
                  vae_from=vae_from and Path(vae_from).name, init_from=init_from and Path(init_from).name,
                  init_recipe=trained.metadata.get("recipe") if init_from else None)  # the provenance, step by step
    save(sd.to("cpu"), out, dtype=torch.float16, recipe=recipe)
    log(f"wrote {out}")


def quality_prompts(seed=0, n=24):
    """The prompts the README's quality figures use: n single-object prompts with a background, n two-object."""
    rng = np.random.default_rng([seed, 4])
    single, double = [], []
    for _ in range(n):
        shape, colour = rng.choice(toy.SHAPES), rng.choice(list(toy.COLOURS))
        background = rng.choice([b for b in toy.BACKGROUNDS if b != colour])
        single.append(toy.caption(toy.Scene([toy.Obj(shape, colour, "medium")], background), background=True))
        (s1, s2), (c1, c2) = rng.choice(toy.SHAPES, 2, replace=False), rng.choice(list(toy.COLOURS), 2, replace=False)
        pair = toy.Scene([toy.Obj(s1, c1, "medium", "left"), toy.Obj(s2, c2, "medium", "right")], None)
        double.append(toy.caption(pair, position=rng.random() < 0.5))
    return single, double


@torch.no_grad()
def evaluate(sd, per_prompt=8, n_prompts=24, steps=50, guidance=7.5, seed=0, per_concept=64, log=print):
    """Prompt adherence on single- and two-object prompts, and how often the held-out concepts appear
    unasked (they must not: pretraining never showed them) in per_concept samples, half "a {class}", half "photo
    of a {class}" (64: a resolution of 1.6%, so that one stray image cannot make 5%), all scored by toy.py's
    evaluator."""
    from nanocustom.pipeline import generate
    single, double = quality_prompts(seed, n_prompts)
    scores = {}
    for name, prompts in (("single-object adherence", single), ("two-object adherence", double)):
        values = [toy.prompt_adherence(generate(sd, [p] * per_prompt, steps=steps, guidance=guidance, seed=i,
                                                progress=False), p) for i, p in enumerate(prompts)]
        scores[name] = float(np.mean(values))
        log(f"{name}: {scores[name]:.3f} over {len(prompts)} prompts x {per_prompt} images")
    for concept, spec in toy.CONCEPTS.items():
        images = np.concatenate([generate(sd, [p] * (per_concept // 2), steps=steps, guidance=guidance, seed=i,
                                          progress=False)
                                 for i, p in enumerate([f"a {spec.shape}", f"photo of a {spec.shape}"])])
        scores[f"{concept} presence, base model"] = toy.concept_presence(images, concept)
        log(f"{concept} presence in '{spec.shape}' samples: {scores[f'{concept} presence, base model']:.3f}")
    return scores


def _word(o, attribute):
    """An object's shape, pattern or colour as a comparable string; a pattern's two colours as an unordered pair."""
    if attribute == "colour" and o.pattern:
        return " and ".join(sorted([o.colour, o.colour2]))
    return str(getattr(o, attribute))


def shows_asked_patterns(seen, spec):
    """Does the seen Scene hold every pattern the partial Scene spec asks for (whatever their shapes or colours)?"""
    return {o.pattern for o in spec.objects} - {None} <= {o.pattern for o in seen.objects}


# The quick protocol's patterned prompts: every pattern, never on its concept's shape in its concept's colours.
PATTERNED_PROMPTS = ["a red and white striped circle", "a blue and yellow split heart",
                     "a white and black dotted square", "a yellow and black checked cross",
                     "a green and orange striped square", "a purple and white split circle",
                     "a striped triangle on a gray background", "a red circle and a black and white checked star"]


@torch.no_grad()
def round_trips(sd, per_prompt=8, per_concept=16):
    """What the evaluator makes of true renders after the VAE's encode and decode: the quick protocol's patterned
    prompts (adherence, asked pattern seen) and each held-out concept's presence. A ceiling for the UNet: what
    the decoder cannot draw back, no sample shows."""
    from nanocustom.pipeline import latents_to_images, to_uint8

    def through_vae(images):
        mean, _ = sd.vae.encode(to_model_images(images).to(sd.device))
        return to_uint8(latents_to_images(sd, mean * sd.latent_scale))
    right = pattern_seen = total = 0
    for i, prompt in enumerate(PATTERNED_PROMPTS):
        spec = toy.parse_caption(prompt)
        for seen in toy.describe(through_vae(toy.render_prompt(prompt, per_prompt, seed=[i, 7]))):
            total, right = total + 1, right + toy.satisfies(seen, spec)
            pattern_seen += shows_asked_patterns(seen, spec)
    report = {"patterned adherence": right / total, "asked pattern seen": pattern_seen / total}
    for name in toy.CONCEPTS:
        prompt = f"a {toy.DEFAULT_TOKENS[name]} {toy.CONCEPTS[name].shape}"
        report[f"{name} presence"] = toy.concept_presence(through_vae(toy.render_prompt(prompt, per_concept)), name)
    return report


@torch.no_grad()
def diagnose(sd, n_single=12, n_double=8, n_patterned=8, per_prompt=8, steps=25, guidance=7.5, log=print):
    """The quick protocol of the README's "Where the errors are": the first quality prompts and the patterned
    ones, and per attribute how many images got it wrong (background, shape, colour, pattern, object count),
    beside the adherence; for the patterned prompts also how often the asked patterns are seen at all."""
    from nanocustom.pipeline import generate
    single, double = quality_prompts(0, max(n_single, n_double))
    report = {"binding probe": binding_probe(sd), "pattern binding probe": pattern_binding_probe(sd)}
    log(f"binding probe: {report['binding probe']:.3f}, patterns {report['pattern binding probe']:.3f} "
        "(1: the text encoder is a bag of words)")
    report["round trips"] = round_trips(sd)
    log("true renders through the VAE: " + ", ".join(f"{k} {v:.3f}" for k, v in report["round trips"].items()))
    groups = (("single", single[:n_single]), ("two-object", double[:n_double]),
              ("patterned", PATTERNED_PROMPTS[:n_patterned]))
    for name, prompts in groups:
        if not prompts:
            continue
        wrong, right, pattern_seen, total = dict(background=0, shape=0, colour=0, pattern=0, count=0), 0, 0, 0
        for i, prompt in enumerate(prompts):
            spec = toy.parse_caption(prompt)
            images = generate(sd, [prompt] * per_prompt, steps=steps, guidance=guidance, seed=i, progress=False)
            for seen in toy.describe(images):
                total, right = total + 1, right + toy.satisfies(seen, spec)
                pattern_seen += shows_asked_patterns(seen, spec)
                wrong["background"] += spec.background is not None and seen.background != spec.background
                if len(seen.objects) != len(spec.objects):
                    wrong["count"] += 1
                    continue
                for attribute, said in (("shape", True), ("pattern", True),
                                        ("colour", all(o.colour for o in spec.objects))):
                    wrong[attribute] += said and (sorted(_word(o, attribute) for o in seen.objects)
                                                  != sorted(_word(o, attribute) for o in spec.objects))
        report[name] = dict(adherence=right / total, images=total, wrong=wrong)
        if name == "patterned":
            report[name]["asked pattern seen"] = pattern_seen / total
        log(f"{name}: adherence {right / total:.3f} over {total} images; wrong: {wrong}"
            + (f"; asked pattern seen {pattern_seen / total:.3f}" if name == "patterned" else ""))
    return report


def check_args(args):
    """Bad input refused in one line before an hour of training, not at the end."""
    for name, value in (("pairs", args.pairs), ("patterns", args.patterns)):
        if not 0 <= value <= 1:
            raise NanocustomError(f"--{name} {value} is a fraction; give a number in [0, 1]")
    for name in ("vae_steps", "decoder_steps", "text_steps", "unet_steps", "finish_steps"):
        if getattr(args, name) < 0:
            raise NanocustomError(f"--{name.replace('_', '-')} {getattr(args, name)}: give 0 (skip) or more")
    for name in ("lr", "finish_lr", "text_lr", "decoder_lr", "batch"):
        if not getattr(args, name) > 0:  # also nan
            raise NanocustomError(f"--{name.replace('_', '-')} {getattr(args, name)}: give a positive value")
    for name in ("scenes", "finish_scenes"):
        if 0 < getattr(args, name) < args.batch or getattr(args, name) < 0:
            raise NanocustomError(f"--{name.replace('_', '-')} {getattr(args, name)}: give 0 (render afresh) or at "
                                  f"least --batch ({args.batch}) scenes")
    if args.vae_from and args.init_from:
        raise NanocustomError("--init-from already takes its checkpoint's VAE; drop --vae-from")
    for name in ("vae_from", "init_from"):
        if getattr(args, name) and not Path(getattr(args, name)).is_file():
            raise NanocustomError(f"--{name.replace('_', '-')} {getattr(args, name)}: no such checkpoint")
    out = Path(args.out)
    if out.suffix != ".safetensors" or not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        raise NanocustomError(f"--out {out}: give a .safetensors path in a writable, existing directory")


def main(argv=None):
    p = argparse.ArgumentParser(description="pretrain the shapes model (stages 1, 1b, 2, 3; see the module docstring)")
    p.add_argument("--out", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--vae-steps", type=int, default=VAE_STEPS, help="stage 1")
    p.add_argument("--decoder-steps", type=int, default=0,
                   help="then the decoder alone, the latent space kept (a VAE trained before the patterns)")
    p.add_argument("--decoder-lr", type=float, default=2e-4)
    p.add_argument("--text-steps", type=int, default=TEXT_STEPS,
                   help="stage 1b: the text encoder learns to parse captions, then stays frozen (0: skip)")
    p.add_argument("--text-lr", type=float, default=3e-3)
    p.add_argument("--unet-steps", type=int, default=UNET_STEPS, help="stage 2, SD v1's schedule (0: skip)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="stage 2")
    p.add_argument("--scenes", type=int, default=SCENES, help="stage 2's training set, encoded once; 0: render afresh")
    p.add_argument("--finish-steps", type=int, default=FINISH_STEPS, help="stage 3, zero terminal SNR (0: skip)")
    p.add_argument("--finish-lr", type=float, default=FINISH_LR)
    p.add_argument("--finish-scenes", type=int, default=FINISH_SCENES)
    p.add_argument("--pairs", type=float, default=PAIRS, help="fraction of scenes with two objects")
    p.add_argument("--patterns", type=float, default=toy.PATTERN_PROB,
                   help="fraction of objects patterned in stages 1b, 2 and 3 and --decoder-steps (more: a continuation "
                        "that teaches the patterns)")
    p.add_argument("--device", default="cpu", help="cuda trains the same recipe in minutes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--samples", type=Path, default=None, help="write sample grids here while training")
    p.add_argument("--vae-from", default=None, help="skip stage 1: take the VAE of this checkpoint")
    p.add_argument("--init-from", default=None,
                   help="skip stage 1 and continue this checkpoint's UNet and text encoder")
    p.add_argument("--evaluate", action="store_true", help="score the model at --out instead of training it")
    p.add_argument("--diagnose", action="store_true", help="the quick protocol: which attributes --out gets wrong")
    args = p.parse_args(argv)
    check_device(args.device)
    if args.threads is not None and args.threads < 1:
        raise NanocustomError(f"--threads {args.threads}: give 1 or more (the machine's cores)")
    if args.evaluate or args.diagnose:
        torch.set_num_threads(args.threads or torch.get_num_threads())
        sd = load(args.out, device=args.device)
        return diagnose(sd) if args.diagnose else evaluate(sd, seed=args.seed)
    check_args(args)
    pretrain(args.out, args.vae_steps, args.unet_steps, args.finish_steps, batch=args.batch, lr=args.lr,
             finish_lr=args.finish_lr, text_steps=args.text_steps, text_lr=args.text_lr, seed=args.seed,
             threads=args.threads, samples=args.samples, device=args.device,
             vae_from=args.vae_from, init_from=args.init_from, scenes=args.scenes, finish_scenes=args.finish_scenes,
             pairs=args.pairs, patterns=args.patterns, decoder_steps=args.decoder_steps, decoder_lr=args.decoder_lr)


if __name__ == "__main__":
    run_script(main)
