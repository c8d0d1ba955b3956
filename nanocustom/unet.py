"""The denoising UNet of Stable Diffusion v1 (Rombach et al. 2022, §3.3), the SD v1 path of CompVis'
`openaimodel.UNetModel` with its `SpatialTransformer` blocks (`ldm/modules/attention.py`).

Module names equal the checkpoint's keys under `model.diffusion_model.`. At SD v1 size the blocks are:

    input_blocks  0: conv 4->320             output_blocks 0-2:  Res(1280) ..., 2 ends in Upsample (.2.1)
                  1, 2: Res+ST 320                        3-5:  Res+ST 1280, 5 ends in Upsample (.5.2)
                  3: Downsample (.3.0.op)                 6-8:  Res+ST 640,  8 ends in Upsample (.8.2)
                  4, 5: Res+ST 640                        9-11: Res+ST 320
                  6: Downsample               middle_block: Res, ST, Res (1280)
                  7, 8: Res+ST 1280           time_embed.0/.2, out.0/.2
                  9: Downsample
                  10, 11: Res 1280
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class UNetConfig:  # the fields of `unet_config.params` in v1-inference.yaml
    in_channels: int = 4  # latent channels
    out_channels: int = 4
    model_channels: int = 320  # width of the first level
    channel_mult: tuple = (1, 2, 4, 4)  # width of each level, in model_channels
    num_res_blocks: int = 2  # ResBlocks per level on the way down (one more on the way up)
    attention_resolutions: tuple = (4, 2, 1)  # downsampling factors whose levels get a SpatialTransformer
    num_heads: int = 8
    transformer_depth: int = 1  # BasicTransformerBlocks per SpatialTransformer
    context_dim: int = 768  # width of the text features


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of the timestep (Vaswani et al. 2017), cos first as in the CompVis code."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm over 32 groups, computed in float32 whatever the input dtype (as CompVis does)."""

    def __init__(self, channels, eps=1e-5):
        super().__init__(32, channels, eps=eps)

    def forward(self, x):
        weight, bias = self.weight.float(), self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


class ResBlock(nn.Module):
    def __init__(self, channels, emb_channels, out_channels):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]  # the timestep enters every ResBlock as a per-channel shift
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Self-attention when context is None (attn1), else attention from image tokens to text tokens (attn2)."""

    def __init__(self, query_dim, heads, dim_head, context_dim=None):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))
        self.observer = None  # observer(self, probs [B, h, T, T_context]): attention maps and LAG (attention.py)

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        B, h = x.shape[0], self.heads
        q, k, v = (t.view(B, -1, h, t.shape[-1] // h).transpose(1, 2) for t in (q, k, v))  # (B, h, T, hs)
        y = F.scaled_dot_product_attention(q, k, v)
        if self.observer is not None:  # SDPA never forms the probabilities; only an observer pays for them
            self.observer(self, (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).float().softmax(-1))
        return self.to_out(y.transpose(1, 2).reshape(B, -1, q.shape[-1] * h))


class GEGLU(nn.Module):
    """GLU variant with a GELU gate (Shazeer 2020): the first half of the projection, gated by the second."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, heads, dim_head, context_dim):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, dim_head, context_dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Norm, 1x1 conv in, transformer blocks over the h*w image tokens, 1x1 conv out, residual."""

    def __init__(self, channels, heads, depth, context_dim):
        super().__init__()
        self.norm = GroupNorm32(channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, channels // heads, context_dim) for _ in range(depth))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x))
        h = h.flatten(2).transpose(1, 2)  # (B, H*W, C)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = h.transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that hands the timestep embedding to ResBlocks and the text context to transformers."""

    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    def __init__(self, config=None):
        super().__init__()
        self.config = c = config or UNetConfig()
        mc, emb_dim = c.model_channels, 4 * c.model_channels

        def transformer(ch):
            return SpatialTransformer(ch, c.num_heads, c.transformer_depth, c.context_dim)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(c.in_channels, mc, 3, padding=1))])
        skip_channels, ch, ds = [mc], mc, 1  # ds: the downsampling factor of the current level
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers = [ResBlock(ch, emb_dim, mult * mc)]
                ch = mult * mc
                if ds in c.attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(c.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(ResBlock(ch, emb_dim, ch), transformer(ch), ResBlock(ch, emb_dim, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mult * mc)]
                ch = mult * mc
                if ds in c.attention_resolutions:
                    layers.append(transformer(ch))
                if level and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(mc, c.out_channels, 3, padding=1))
        self.gradient_checkpointing = False  # training: keep only block inputs, recompute the rest in backward

    def forward(self, x, t, context):
        """x [B, 4, h, w] noisy latents, t [B] timesteps, context [B, 77, context_dim] -> predicted noise."""
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(x.dtype))
        skips, h = [], x
        for block in self.input_blocks:
            h = self.run(block, h, emb, context)
            skips.append(h)
        h = self.run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = self.run(block, torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)

    def run(self, block, h, emb, context):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, use_reentrant=False)
        return block(h, emb, context)
