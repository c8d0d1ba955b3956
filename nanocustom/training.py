"""One fine-tuning step, shared by train.py and bench.py: DDPM's L_simple (Ho et al. 2020 Eq. 14) on the target
images, masked to the valid latent region (Kumari et al., Training details), plus lambda times the same loss on
regularisation images of the class (prior preservation, SVDiff Eq. 3), then one optimizer step on the delta.

L_simple is a loss on the noise eps, as all three papers train SD v1. A model that predicts v instead (the
shapes model, under a zero-terminal-SNR schedule) has its output read as eps, which weighs the v error by abar_t:
||eps - eps_hat||^2 = abar_t ||v - v_hat||^2. Near T, where abar_t -> 0, the v error is the model's guess of a
whole image from its caption, which a few images cannot teach and which on the shapes model ruled a plain v-loss:
every method drew smears of the concept images' background colours (README, "Session 13").

The frozen weights may be half precision while the trained tensors stay fp32: the forward runs under autocast.
Two ways to spend less per step, both leaving the result unchanged:

  FeatureCache                    when the samples are a fixed set (ConceptBatches.cacheable: no resize
                                  augmentation, flips or cut-mix), each image's VAE posterior and each prompt's
                                  text features are computed once; the posterior is still sampled every step.
  unet.gradient_checkpointing     recompute each UNet block's activations in backward instead of keeping them.

With Cut-Mix-Unmix (Han et al. §3.3) an optional `Unmix` term adds, on the cut-mix samples, the attention
regulariser of App. D.1 (Eq. 10): each modifier token's cross-attention map is pushed to 0 on the half of the
image that shows the other concept.
"""
import math
from contextlib import nullcontext

import torch

from nanocustom.attention import observing
from nanocustom.data import unmix_mask
from nanocustom.pipeline import images_to_latents


def masked_loss(prediction, target, masks, is_reg, prior_weight):
    """Per-sample MSE over the valid latent region; targets' mean + lambda * regularisation samples' mean."""
    masks = masks.to(prediction.dtype).expand_as(prediction)
    squared_error = (prediction.float() - target.float()) ** 2 * masks
    per_sample = squared_error.sum((1, 2, 3)) / masks.sum((1, 2, 3)).clamp(min=1)
    loss = per_sample[~is_reg].mean()
    if is_reg.any():
        loss = loss + prior_weight * per_sample[is_reg].mean()
    return loss


class FeatureCache:
    """VAE posteriors by sample source and text features by prompt, for batches of a cacheable ConceptBatches.

    The VAE is always frozen; the text encoder is frozen unless the delta trains its modifier-token rows (Custom
    Diffusion) or its weights (SVDiff with text_encoder=True): then its features are computed every step."""

    def __init__(self, sd):
        self.sd, self.posteriors, self.features = sd, {}, {}

    @torch.no_grad()
    def latents(self, batch, generator):
        """As pipeline.images_to_latents, drawing the same random numbers: a sample of each cached posterior."""
        sources = batch["sources"]
        new = [i for i, s in enumerate(sources) if s not in self.posteriors]
        if new:
            mean, logvar = self.sd.vae.encode(batch["images"][new].to(self.sd.device, self.sd.dtype))
            self.posteriors.update({sources[i]: (m, lv) for i, m, lv in zip(new, mean, logvar)})
        mean, logvar = (torch.stack(x) for x in zip(*(self.posteriors[s] for s in sources)))
        noise = torch.randn(mean.shape, generator=generator).to(mean)
        return (mean + torch.exp(0.5 * logvar) * noise) * self.sd.latent_scale

    def text_features(self, prompts):
        if any(p.requires_grad for p in self.sd.text_encoder.parameters()):
            return encode_text(self.sd, prompts)
        new = [p for p in dict.fromkeys(prompts) if p not in self.features]
        if new:
            with torch.no_grad():
                self.features.update(zip(new, encode_text(self.sd, new)))
        return torch.stack([self.features[p] for p in prompts])


class Unmix:
    """SVDiff's unmix regulariser (§3.3, App. D.1 Eq. 10): weight * mean over attn2 layers and modifier tokens of
    ||A - sg(A ⊙ M)||^2, where A is the token's cross-attention map (averaged over heads) and M the half of a
    cut-mix image that the token stands for (data.unmix_mask). Outside M the term is ||A||^2; inside it is 0, so
    attention is pushed off the other concept's half and left free on its own. Samples that are not cut-mixes
    have M = 1 everywhere and add nothing."""

    def __init__(self, sd, tokens, weight):
        self.sd, self.tokens, self.weight = sd, list(tokens), weight

    def observe(self, batch):
        """-> (context manager that watches the UNet's attn2 layers, function returning the term after the pass)."""
        ids = self.sd.tokenizer.encode(batch["prompts"])
        where = {}  # token -> (its position in each prompt, which prompts hold it), once per batch
        for token in self.tokens:
            at = ids == self.sd.tokenizer.token_id(token)  # [B, 77]
            present = at.any(1) & batch["cutmix"].cpu()  # the term averages over the cut-mixes naming the token
            if present.any():
                where[token] = at.float().argmax(1), present
        masks, terms = {}, []  # masks: (token, side) -> M flattened, one per attention resolution

        def observer(path, probs):  # probs [B, heads, H*W, 77], with grad
            A = probs.float().mean(1)  # (B, H*W, 77)
            side = int(math.isqrt(A.shape[1]))
            for token, (position, present) in where.items():
                index = position.to(A.device).view(-1, 1, 1).expand(-1, A.shape[1], 1)
                a = A.gather(2, index)[..., 0]  # (B, H*W): the token's attention map
                if (token, side) not in masks:
                    masks[token, side] = unmix_mask(batch, token, side).flatten(1).to(a)
                M = masks[token, side]
                err = (a - (a * M).detach()) ** 2  # Eq. 10
                terms.append(err[present.to(a.device)].mean())

        def term():
            return self.weight * torch.stack(terms).mean() if terms else torch.zeros((), device=self.sd.device)

        return observing(self.sd.unet, observer), term


def encode_text(sd, prompts):
    return sd.text_encoder(sd.tokenizer.encode(prompts).to(sd.device))


def training_step(sd, batch, opt, generator, dtype, prior_weight=1.0, cache=None, diffusion=None, unmix=None,
                  scaler=None):
    """One step on `batch` (ConceptBatches.next_batch) -> the loss. `dtype`: the frozen weights' dtype, autocast's
    when not float32; `unmix`: an Unmix, applied when the batch holds cut-mix samples; `scaler`: a GradScaler for
    float16, whose gradients through the frozen UNet would otherwise underflow (a per-element gradient of the loss
    is ~1e-5 at 64x64 latents, below float16's smallest normal 6e-5). A non-finite loss is returned before
    backward, no step taken, so that the caller can keep the last good delta."""
    diffusion = diffusion or sd.diffusion
    if cache is None:
        with torch.no_grad():
            x0 = images_to_latents(sd, batch["images"], generator=generator)
    else:
        x0 = cache.latents(batch, generator)
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    t = torch.randint(0, diffusion.T, (x0.shape[0],), generator=generator).to(sd.device)
    watch, unmix_term = unmix.observe(batch) if unmix and batch["cutmix"].any() else (nullcontext(), None)
    x_t = diffusion.add_noise(x0, noise, t)
    with torch.autocast(sd.device.type, dtype=dtype, enabled=dtype != torch.float32), watch:
        context = encode_text(sd, batch["prompts"]) if cache is None else cache.text_features(batch["prompts"])
        prediction = sd.unet(x_t, t, context)
    eps = prediction if sd.prediction_type == "eps" else diffusion.split(prediction, x_t, t, sd.prediction_type)[1]
    loss = masked_loss(eps, noise, batch["masks"].to(sd.device), batch["is_reg"].to(sd.device), prior_weight)
    if unmix_term is not None:
        loss = loss + unmix_term()
    if not torch.isfinite(loss):
        return loss
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        opt.step()
    else:  # loss scaling (Micikevicius et al. 2018): a step whose scaled gradients overflow is skipped
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return loss
