"""Reading the UNet's cross-attention: per-token heatmaps, and localized attention-guided (LAG) sampling.

Each cross-attention (attn2) computes A(Q, K) = softmax(Q K^T / sqrt(d_k)) between image positions and the 77
text tokens (Ham et al. 2024 Eq. 2). SDPA never forms A, so `CrossAttention.observer` recomputes it only while
one of these is active:

  AttentionMaps   A per token, averaged over heads, layers and steps (as Kumari et al. 2023 Fig. 16 shows them);
  LAG             Ham et al. §3.3: at each transformer block i, A_{i,C} = sum of A_j over the concept tokens C
                  ("<new1>" and its class word), M_i = binarize(A_{i,C}) at its median, and the block's output
                  f^_i = (1 - M_i) ⊙ f_i + M_i ⊙ f'_i (Eq. 3), f from the base proj_out, f' from the
                  personalised one, in the same UNet pass: no extra evaluation.

With classifier-free guidance the UNet sees [unconditional, conditional] halves; both read the maps of the
conditional half, the only one whose prompt names the concept, so that guidance's eps_c - eps_u compares like
with like. A prompt that names no modifier token has C empty and M = 0 in both halves: the base model. (Giving
the unconditional half M = 0 too, pipeline.generate's base_unconditional, lets guidance amplify the residuals w
times: more of the concept, less of the background kept; README, "The papers' claims, end to end".)

LAG needs a personalised *residual* (the paper's case): the base and personalised outputs of proj_out exist side
by side only there. Custom Diffusion changes K/V inside attn2 itself, and SVDiff every weight of the UNet, so a
per-block blend of "base" and "personalised" features has no single place to happen; LAG refuses them.
"""
import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from nanocustom.errors import NanocustomError


def concept_positions(tokenizer, prompt, class_phrase=None):
    """Positions in the encoded prompt of each modifier token and of the word after it (its class word), e.g.
    "photo of a <new1> square" -> [4, 5]; [] for a prompt that names no modifier token. A class of several words
    ("teddy bear") is given as class_phrase: then every piece of it, which must follow each modifier token."""
    ids = tokenizer.encode([prompt])[0].tolist()
    added = {tokenizer.token_id(t) for t in tokenizer.added_tokens}
    phrase = [tokenizer.token_id(piece) for piece in tokenizer.tokenize(class_phrase)] if class_phrase else None
    positions = []
    for i, token in enumerate(ids):
        if token not in added:
            continue
        positions.append(i)
        if phrase:
            if ids[i + 1:i + 1 + len(phrase)] != phrase:
                raise NanocustomError(f"LAG's class {class_phrase!r} does not follow the modifier token in "
                                      f"{prompt!r}; write the class right after the token (--lag-class)")
            positions += range(i + 1, i + 1 + len(phrase))
            continue
        j = i + 1  # the class word: BPE pieces up to the one that ends the word
        while j < len(ids) and ids[j] != tokenizer.eos_id and ids[j] not in added:
            positions.append(j)
            if tokenizer.backend.id_to_token(ids[j]).endswith("</w>"):
                break
            j += 1
    return positions


@contextmanager
def observing(unet, *observers):
    """Call each observer(path, probs [B, heads, H*W, 77]) from every cross-attention while the block runs."""
    layers = [(path, m) for path, m in unet.named_modules() if path.endswith("attn2")]

    def observe(path, probs):
        for observer in observers:
            observer(path, probs)

    for path, module in layers:
        module.observer = (lambda _, probs, path=path: observe(path, probs)) if observers else None
    try:
        yield
    finally:
        for _, module in layers:
            module.observer = None


def conditional(probs, n):
    """The conditional half of a guided batch ([uncond, cond]), or the batch itself."""
    return probs[n:] if probs.shape[0] == 2 * n else probs


def spatial(maps, aspect):
    """[B, C, H*W] -> [B, C, H, W] for an image of width / height = aspect."""
    B, C, T = maps.shape
    H = round(math.sqrt(T / aspect))
    return maps.reshape(B, C, H, T // H)


class AttentionMaps:
    """Per-token attention, averaged over heads, every attn2 and every step, at the latent resolution."""

    def __init__(self, n_prompts, latent_size):
        self.n, self.size, self.sum, self.count = n_prompts, latent_size, None, 0

    def __call__(self, path, probs):
        maps = conditional(probs, self.n).mean(1).transpose(1, 2)  # [B, 77, H*W]
        maps = F.interpolate(spatial(maps, self.size[1] / self.size[0]), size=self.size, mode="bilinear")
        self.sum = maps if self.sum is None else self.sum + maps
        self.count += 1

    @property
    def maps(self):
        """[B, 77, h, w]: the mean attention each token received at each latent position."""
        return self.sum / self.count


def residual_delta(sd, purpose):
    """sd's unfolded personalized-residuals delta, which `purpose` needs to tell the base proj_out from f'."""
    delta = getattr(sd, "delta", None)
    if delta is None or delta.method != "residual":
        method = "no delta" if delta is None else f"a {delta.method} delta"
        raise NanocustomError(f"{purpose} needs an unfolded personalized-residuals delta (it blends the base and "
                              f"personalised proj_out); the model has {method}: attach one with load_delta, unfolded")
    return delta


class LAG:
    """Localized attention-guided sampling (Ham et al. §3.3) for a personalized-residuals delta attached to sd."""

    def __init__(self, sd, prompts, positions=None, class_phrase=None):
        """positions: C for each prompt, else found by concept_positions (with class_phrase, if given)."""
        delta = residual_delta(sd, "LAG")
        self.sd, self.n = sd, len(prompts)
        self.positions = ([concept_positions(sd.tokenizer, p, class_phrase) for p in prompts] if positions is None
                          else positions)
        self.layers = {layer.name.removesuffix(".proj_out"): layer for layer in delta.layers.values()}
        self.scores = {}  # block -> A_{i,C} [n, H*W], summed over the block's transformer blocks
        self.masks = {}   # block -> M_i, for inspection (the notebooks show them)

    def observe(self, path, probs):
        block = path.split(".transformer_blocks.")[0]
        probs = conditional(probs, self.n).mean(1)  # [n, H*W, 77], averaged over heads
        score = torch.stack([probs[i, :, pos].sum(-1) for i, pos in enumerate(self.positions)])  # A_{i,C}; 0 if C empty
        self.scores[block] = self.scores.get(block, 0) + score

    def mask(self, layer):
        """M_i for this block's proj_out, from the scores its attn2 just recorded; [B, 1, H, W] of 0/1."""
        block = layer.name.removesuffix(".proj_out")
        score = self.scores.pop(block)
        M = (score > score.median(dim=1, keepdim=True).values).float()  # binarize at the median; C empty: M = 0
        M = spatial(M[:, None], self.aspect)
        self.masks.setdefault(block, []).append(M)
        return M.repeat(2, 1, 1, 1) if self.guided else M

    @contextmanager
    def applied(self, aspect, guided):
        """While active, every proj_out blends f and f' by its block's mask (pass `observe` to `observing`)."""
        self.aspect, self.guided = aspect, guided
        for layer in self.layers.values():
            layer.mask = self.mask
        try:
            yield self
        finally:
            for layer in self.layers.values():
                layer.mask = None


def heatmap_strip(maps, tokenizer, prompt, image):
    """One row: the image, then for each token of the prompt (BOS..EOS) its attention map laid over the image,
    the token's text printed under it. maps [77, h, w] of one sample; image uint8 [H, W, 3] -> uint8 strip."""
    from PIL import Image, ImageDraw
    ids = tokenizer.encode([prompt])[0].tolist()
    n = ids.index(tokenizer.eos_id) + 1  # BOS, the prompt's tokens, the first EOS
    H, W = image.shape[:2]
    labels = ["<start>"] + [tokenizer.decode([i]) or tokenizer.backend.id_to_token(i) for i in ids[1:n - 1]] + ["<end>"]
    tiles = [Image.fromarray(image)]
    for j in range(n):
        m = F.interpolate(maps[j][None, None].float(), size=(H, W), mode="bilinear")[0, 0]
        m = ((m - m.min()) / (m.max() - m.min() + 1e-8)).cpu().numpy()[..., None]
        heat = (0.35 * image + 0.65 * 255 * m * [1.0, 0.3, 0.1]).clip(0, 255).astype("uint8")  # red where attended
        tiles.append(Image.fromarray(heat))
    strip = Image.new("RGB", (W * len(tiles), H + 14), "white")
    draw = ImageDraw.Draw(strip)
    for k, (tile, label) in enumerate(zip(tiles, ["image"] + labels)):
        strip.paste(tile, (k * W, 0))
        draw.text((k * W + 2, H + 1), label[: max(3, W // 6)], fill="black")
    return strip
