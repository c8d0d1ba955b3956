"""The KL-regularised autoencoder of Stable Diffusion v1 (Rombach et al. 2022, §3.1), CompVis'
`ldm/models/autoencoder.py` AutoencoderKL with the Encoder/Decoder of `diffusionmodules/model.py`.

An image [B, 3, H, W] in [-1, 1] maps to a diagonal Gaussian over latents [B, 4, H/8, W/8]. Module names
equal the checkpoint's keys under `first_stage_model.`. The latent scale (0.18215 for SD v1) is not applied
here: `pipeline.py` applies it in one place.
"""
from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VAEConfig:  # the fields of `first_stage_config.params.ddconfig`, plus embed_dim
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128  # width of the first level
    ch_mult: tuple = (1, 2, 4, 4)  # width of each level in ch; len(ch_mult) - 1 halvings of the resolution
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4  # latent channels after quant_conv


def Normalize(channels):
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions; q, k, v and proj_out are 1x1 convs."""

    def __init__(self, channels):
        super().__init__()
        self.norm = Normalize(channels)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).flatten(2).transpose(1, 2)[:, None] for conv in (self.q, self.k, self.v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)
        h = h[:, 0].transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as CompVis does


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: ResnetBlocks, then (except at the bottom/top) a down- or upsample."""

    def __init__(self, blocks, resample=None, resample_name=None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if resample is not None:
            setattr(self, resample_name, resample)


class Encoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        self.down = nn.ModuleList()
        ch = c.ch
        for level, mult in enumerate(c.ch_mult):
            blocks = []
            for _ in range(c.num_res_blocks):
                blocks.append(ResnetBlock(ch, c.ch * mult))
                ch = c.ch * mult
            last = level == len(c.ch_mult) - 1
            self.down.append(Level(blocks, None if last else Downsample(ch), "downsample"))
        self.mid = Mid(ch)
        self.norm_out = Normalize(ch)
        self.conv_out = nn.Conv2d(ch, 2 * c.z_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        ch = c.ch * c.ch_mult[-1]
        self.conv_in = nn.Conv2d(c.z_channels, ch, 3, padding=1)
        self.mid = Mid(ch)
        levels = []
        for level in reversed(range(len(c.ch_mult))):
            blocks = []
            for _ in range(c.num_res_blocks + 1):
                blocks.append(ResnetBlock(ch, c.ch * c.ch_mult[level]))
                ch = c.ch * c.ch_mult[level]
            levels.insert(0, Level(blocks, Upsample(ch) if level else None, "upsample"))
        self.up = nn.ModuleList(levels)  # indexed by resolution: up[-1] (the lowest) runs first
        self.norm_out = Normalize(ch)
        self.conv_out = nn.Conv2d(ch, c.out_ch, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    def __init__(self, config=None):
        super().__init__()
        self.config = c = config or VAEConfig()
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.quant_conv = nn.Conv2d(2 * c.z_channels, 2 * c.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(c.embed_dim, c.z_channels, 1)

    @property
    def downsampling_factor(self):
        return 2 ** (len(self.config.ch_mult) - 1)

    def encode(self, x):
        """Image in [-1, 1] -> (mean, logvar) of the latent posterior, each [B, embed_dim, H/f, W/f]."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        """Unscaled latent -> image in (about) [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))
