"""Text to image with Stable Diffusion v1 (Rombach et al. 2022): encode the prompt, denoise latents, decode.

Classifier-free guidance (Ho & Salimans 2022): eps = eps(x, "") + w * (eps(x, prompt) - eps(x, "")), with the
empty prompt replaced by a negative prompt when one is given. The latent scale is applied here and only here.
"""
from contextlib import contextmanager, nullcontext

import numpy as np
import torch

from nanocustom.attention import LAG, observing, residual_delta
from nanocustom.diffusion import guided, sample
from nanocustom.errors import NanocustomError


@torch.no_grad()
def encode_prompts(sd, prompts):
    """list[str] -> CLIP token features [B, 77, hidden], the UNet's cross-attention context."""
    ids = sd.tokenizer.encode(prompts).to(sd.device)
    return sd.text_encoder(ids).to(sd.dtype)


def images_to_latents(sd, images, generator=None):
    """Images in [-1, 1] [B, 3, H, W] -> scaled latents: a sample of the posterior times the latent scale."""
    mean, logvar = sd.vae.encode(images.to(sd.device, sd.dtype))
    noise = torch.randn(mean.shape, generator=generator).to(mean)  # drawn on the CPU, as initial_noise
    return (mean + torch.exp(0.5 * logvar) * noise) * sd.latent_scale


@torch.no_grad()
def latents_to_images(sd, latents):
    """Scaled latents -> images in [-1, 1] [B, 3, H, W]."""
    return sd.vae.decode(latents.to(sd.dtype) / sd.latent_scale).float()


def to_uint8(images):
    """Images in [-1, 1] [B, 3, H, W] -> uint8 numpy [B, H, W, 3]."""
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def initial_noise(sd, n, height, width, generator):
    """x_T ~ N(0, I) in latent space, drawn on the CPU so a seed gives the same images on every device."""
    f = sd.vae.downsampling_factor
    shape = (n, sd.unet.config.in_channels, height // f, width // f)
    return torch.randn(shape, generator=generator).to(sd.device, sd.dtype)


def check_size(sd, height, width):
    """Each side a multiple of the VAE's factor times the UNet's 2^(levels - 1): every downsampling halves an even
    size, so the upsampling path meets its skip connections (64 px for SD v1, 16 for the shapes model)."""
    m = sd.vae.downsampling_factor * 2 ** (len(sd.unet.config.channel_mult) - 1)
    for name, size in (("height", height), ("width", width)):
        if size <= 0 or size % m:
            raise NanocustomError(f"--{name} {size} is not a positive multiple of {m}; use e.g. "
                                  f"{max(m, -(-size // m) * m)}")  # the next multiple up


@torch.no_grad()
def generate(sd, prompts, negative_prompt="", steps=50, sampler="ddim", eta=0.0, guidance=7.5, seed=0,
             height=None, width=None, latents=None, progress=True, callback=None, lag=False, attention_maps=None,
             base_unconditional=False):
    """prompts (one per image) -> uint8 images [B, H, W, 3]. Pass `latents` to start from given noise; `lag`
    (True or an attention.LAG) for LAG sampling; `attention_maps` (an attention.AttentionMaps) to record them.
    `base_unconditional`: with an unfolded personalized-residuals delta, the unconditional prediction of guidance
    comes from the base model and the residuals act on the conditional one only. Not the papers' sampler (they
    apply the residuals to both): a residual on every proj_out moves eps_uncond too, and guidance then amplifies
    the base model's pull to the class rather than the residual (README, "The papers' claims, end to end"). With
    `lag`, the unconditional half is the base model's and the conditional half blends by LAG's mask."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if sd.prediction_type == "eps" and sd.diffusion.alphas_cumprod[-1] == 0:
        raise NanocustomError("a zero-terminal-SNR schedule needs v-prediction (Lin et al. §3.2: eps says nothing "
                              "about x0 at abar_T = 0); the checkpoint's prediction_type says eps, fix its metadata")
    height, width = sd.resolution if height is None else height, sd.resolution if width is None else width
    check_size(sd, height, width)
    generator = torch.Generator().manual_seed(seed)  # x_T, then the fresh noise of DDPM / DDIM with eta > 0,
    if latents is None:                               # drawn in diffusers' order so its pipeline gives our images
        latents = initial_noise(sd, len(prompts), height, width, generator)
    latents = latents.to(sd.device, sd.dtype)  # given ones too: CoSINE's inverted z_T may come from another device
    context = encode_prompts(sd, prompts)
    use_guidance = guidance > 1.0  # as diffusers: w <= 1 skips the unconditional pass
    if use_guidance:
        context = torch.cat([encode_prompts(sd, [negative_prompt] * len(prompts)), context])

    def model_fn(x, t):
        if not use_guidance:
            return sd.unet(x, t, context)
        eps_uncond, eps_cond = sd.unet(torch.cat([x, x]), torch.cat([t, t]), context).chunk(2)
        return guided(eps_cond, eps_uncond, guidance)

    observers, lag_applied = [], nullcontext()
    if attention_maps is not None:  # attention.AttentionMaps(len(prompts), latents.shape[-2:])
        observers.append(attention_maps)
    if lag:  # Ham et al. §3.3: the residuals only where the concept's tokens attend
        lag = lag if isinstance(lag, LAG) else LAG(sd, prompts)
        observers.append(lag.observe)
        lag_applied = lag.applied(latents.shape[-1] / latents.shape[-2], use_guidance)
    branches = conditional_residuals(sd, len(prompts), use_guidance) if base_unconditional else nullcontext()
    with observing(sd.unet, *observers), lag_applied, branches:
        x0 = sample(model_fn, latents, steps=steps, sampler=sampler, eta=eta, generator=generator,
                    prediction_type=sd.prediction_type, diffusion=sd.diffusion, progress=progress, callback=callback)
    return to_uint8(latents_to_images(sd, x0))


@contextmanager
def conditional_residuals(sd, n, guided):
    """While active, a residual delta acts on the conditional half of a guided batch of 2n only."""
    delta = residual_delta(sd, "base_unconditional")
    branch = torch.cat([torch.zeros(n), torch.ones(n)]).view(2 * n, 1, 1, 1) if guided else None
    for layer in delta.layers.values():
        layer.branch = None if branch is None else branch.to(layer.A.device, layer.base.weight.dtype)
    try:
        yield
    finally:
        for layer in delta.layers.values():
            layer.branch = None


def image_grid(images, columns=None):
    """uint8 [B, H, W, 3] -> one uint8 [rows*H, columns*W, 3] grid."""
    B, H, W, C = images.shape
    columns = columns or int(np.ceil(np.sqrt(B)))
    rows = int(np.ceil(B / columns))
    grid = np.zeros((rows * H, columns * W, C), dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * H:(r + 1) * H, c * W:(c + 1) * W] = image
    return grid
