"""Parity of the UNet, the VAE and the CLIP text encoder with diffusers' and transformers' implementations.

Each test fills one of our modules with random weights, writes its state dict in the layout of an original SD v1
single-file checkpoint (`model.diffusion_model.`, `first_stage_model.`, `cond_stage_model.transformer.text_model.`),
converts that with diffusers' own single-file conversion functions, loads the result strictly into the reference
model and compares outputs in float32. At full SD v1 size the same path is run on the meta device, for keys and shapes.
"""
from dataclasses import asdict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from diffusers import AutoencoderKL as RefAutoencoderKL
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)

from helpers import randomize_
from nanocustom.clip import CLIPTextConfig, CLIPTextModel
from nanocustom.unet import UNet, UNetConfig
from nanocustom.vae import AutoencoderKL, VAEConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
BOS, EOS = 49406, 49407
TOL = 1e-4  # max |ours - ref| / max |ref|, in float32

# Small models with every kind of block of the SD v1 path. Three UNet levels with attention on the first two only, like
# SD v1's last level: this covers the CrossAttn and the plain down/up blocks, Upsample at output_blocks.N.2 (after an
# ST) and at .N.1 (no ST), and skip_connection convs. At least 2 channels per GroupNorm group: with one, the norm
# would erase the per-channel timestep shift and hide bugs in the timestep path.
SMALL_UNET = UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(1, 2),
                        num_heads=4, transformer_depth=1, context_dim=48)
SMALL_VAE = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2)
SMALL_CLIP = CLIPTextConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)


def original_config(unet=None, vae=None):
    """The parts of v1-inference.yaml that diffusers' config builders read, filled from our config dataclasses."""
    unet, vae = unet or UNetConfig(), vae or VAEConfig()
    ddconfig = {k: v for k, v in asdict(vae).items() if k != "embed_dim"}
    ddconfig.update(double_z=True, resolution=256, attn_resolutions=[], dropout=0.0)
    return {"model": {"params": {
        "scale_factor": 0.18215,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                        "params": {**asdict(unet), "image_size": 32, "use_spatial_transformer": True, "legacy": False}},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL",
                               "params": {"embed_dim": vae.embed_dim, "ddconfig": ddconfig}},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"},
    }}}


def to_original(model, prefix):
    return {prefix + k: v for k, v in model.state_dict().items()}


def convert_unet(checkpoint, unet_config):
    config = create_unet_diffusers_config_from_ldm(original_config(unet=unet_config), checkpoint)
    return config, convert_ldm_unet_checkpoint(checkpoint, config)


def convert_vae(checkpoint, vae_config):
    config = create_vae_diffusers_config_from_ldm(original_config(vae=vae_config), checkpoint)
    return config, convert_ldm_vae_checkpoint(checkpoint, config)


def hf_clip_config(config):
    # our field names are transformers' own; hidden_act defaults to quick_gelu, layer_norm_eps to 1e-5
    return transformers.CLIPTextConfig(**asdict(config))


def convert_clip(checkpoint, ref):
    state_dict = convert_ldm_clip_checkpoint(checkpoint)  # keys start with "text_model."
    if not hasattr(ref, "text_model"):  # transformers >= 5 flattened CLIPTextModel, as diffusers' loader handles it
        state_dict = {k.removeprefix("text_model."): v for k, v in state_dict.items()}
    return state_dict


def rel_err(ours, ref):
    assert ours.shape == ref.shape
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def test_unet_matches_diffusers_unet2dconditionmodel_on_random_weights():
    torch.manual_seed(0)
    ours = randomize_(UNet(SMALL_UNET))
    config, converted = convert_unet(to_original(ours, UNET_PREFIX), SMALL_UNET)
    ref = UNet2DConditionModel(**config).eval()
    ref.load_state_dict(converted, strict=True)

    x = torch.randn(2, 4, 16, 16)
    context = torch.randn(2, 77, SMALL_UNET.context_dim)
    with torch.no_grad():
        for t in ([1, 999], [500, 500], [999, 1]):  # a different timestep per sample, too
            t = torch.tensor(t)
            expected = ref(x, t, encoder_hidden_states=context).sample
            err = rel_err(ours(x, t, context), expected)
            assert err < TOL, f"t={t.tolist()}: relative error {err:.2e}"


def test_vae_encode_and_decode_match_diffusers_autoencoderkl_on_random_weights():
    torch.manual_seed(0)
    ours = randomize_(AutoencoderKL(SMALL_VAE))
    config, converted = convert_vae(to_original(ours, VAE_PREFIX), SMALL_VAE)
    ref = RefAutoencoderKL(**config).eval()
    ref.load_state_dict(converted, strict=True)

    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        mean, logvar = ours.encode(x)
        posterior = ref.encode(x).latent_dist
        assert rel_err(mean, posterior.mean) < TOL
        assert rel_err(logvar, posterior.logvar) < TOL
        assert rel_err(ours.decode(z), ref.decode(z).sample) < TOL

        # both clamp the log-variance to [-30, 20]: push one channel above and one below
        for model in (ours, ref):
            model.quant_conv.bias[SMALL_VAE.embed_dim] += 100
            model.quant_conv.bias[SMALL_VAE.embed_dim + 1] -= 100
        _, logvar = ours.encode(x)
        assert torch.all(logvar[:, 0] == 20) and torch.all(logvar[:, 1] == -30)
        assert rel_err(logvar, ref.encode(x).latent_dist.logvar) < TOL


def test_clip_text_encoder_matches_transformers_cliptextmodel_last_hidden_state():
    torch.manual_seed(0)
    ours = randomize_(CLIPTextModel(SMALL_CLIP))
    ref = transformers.CLIPTextModel(hf_clip_config(SMALL_CLIP)).eval()
    ref.load_state_dict(convert_clip(to_original(ours, CLIP_PREFIX), ref), strict=True)

    # as the tokenizer writes them: BOS, tokens, EOS, then EOS as padding up to 77; two prompt lengths
    input_ids = torch.full((2, 77), EOS)
    for row, n in zip(input_ids, (5, 30)):
        row[0] = BOS
        row[1:n + 1] = torch.randint(0, BOS, (n,))
    with torch.no_grad():
        expected = ref(input_ids).last_hidden_state  # transformers applies the final layer norm here, as SD uses it
        assert rel_err(ours(input_ids), expected) < TOL


def meta_shapes(state_dict):
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def assert_norms_match(ours, prefix, checkpoint, converted, ref):
    """Each of our norms has the kind, eps and groups of the reference norm its weight loads into. (An eps of 1e-5 for
    1e-6 moves random-weight outputs by ~1e-6 only, below what the parity tests can see.)"""
    key_of = {id(v): k for k, v in converted.items()}  # the conversion renames, so the tensors are the same objects
    norms = [(name, m) for name, m in ours.named_modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm))]
    assert norms
    for name, m in norms:
        r = ref.get_submodule(key_of[id(checkpoint[prefix + name + ".weight"])].removesuffix(".weight"))
        kind = nn.GroupNorm if isinstance(m, nn.GroupNorm) else nn.LayerNorm
        assert isinstance(r, kind) and r.eps == m.eps, (name, m, r)
        assert kind is nn.LayerNorm or r.num_groups == m.num_groups, (name, m, r)


def test_full_size_unet_loads_strictly_into_diffusers_with_same_shapes_and_norm_eps():
    with torch.device("meta"):
        ours = UNet()
    assert len(ours.state_dict()) == 686
    assert sum(p.numel() for p in ours.parameters()) == 859_520_964
    checkpoint = to_original(ours, UNET_PREFIX)
    config, converted = convert_unet(checkpoint, UNetConfig())
    with torch.device("meta"):
        ref = UNet2DConditionModel(**config)
    assert meta_shapes(converted) == meta_shapes(ref.state_dict())
    assert_norms_match(ours, UNET_PREFIX, checkpoint, converted, ref)
    ref.load_state_dict(converted, strict=True, assign=True)


def test_full_size_vae_loads_strictly_into_diffusers_with_same_shapes_and_norm_eps():
    with torch.device("meta"):
        ours = AutoencoderKL()
    assert len(ours.state_dict()) == 248
    assert sum(p.numel() for p in ours.parameters()) == 83_653_863
    checkpoint = to_original(ours, VAE_PREFIX)
    config, converted = convert_vae(checkpoint, VAEConfig())
    with torch.device("meta"):
        ref = RefAutoencoderKL(**config)
    assert meta_shapes(converted) == meta_shapes(ref.state_dict())
    assert_norms_match(ours, VAE_PREFIX, checkpoint, converted, ref)
    ref.load_state_dict(converted, strict=True, assign=True)


def test_full_size_clip_text_encoder_loads_strictly_into_transformers_with_same_shapes_and_norm_eps():
    # the original file also holds embeddings.position_ids, a buffer that neither model keeps in its state dict
    with torch.device("meta"):
        ours = CLIPTextModel()
        ref = transformers.CLIPTextModel(hf_clip_config(CLIPTextConfig()))
    assert len(ours.state_dict()) == 196
    assert sum(p.numel() for p in ours.parameters()) == 123_060_480
    checkpoint = to_original(ours, CLIP_PREFIX)
    converted = convert_clip(checkpoint, ref)
    assert meta_shapes(converted) == meta_shapes(ref.state_dict())
    assert_norms_match(ours, CLIP_PREFIX, checkpoint, converted, ref)
    ref.load_state_dict(converted, strict=True, assign=True)


@pytest.mark.parametrize("name", ["unet", "vae", "clip"])
def test_attention_runs_through_sdpa_without_explicit_softmax(name, monkeypatch):
    """Every attention layer calls F.scaled_dot_product_attention, so no (T, T) softmax matrix is built by hand and
    the fused kernels (flash, memory-efficient) apply on GPU."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(args[0].shape)
        return sdpa(*args, **kwargs)

    def no_softmax(*args, **kwargs):
        raise AssertionError("explicit softmax in attention")

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    for owner in (torch, F, torch.Tensor):
        monkeypatch.setattr(owner, "softmax", no_softmax)

    torch.manual_seed(0)
    with torch.no_grad():
        if name == "unet":
            model = UNet(SMALL_UNET).eval()
            model(torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 77, SMALL_UNET.context_dim))
            # attn1 and attn2 in each transformer block: 2 + 2 down, 1 mid, 3 + 3 up
            expected = 2 * SMALL_UNET.transformer_depth * 11
        elif name == "vae":
            model = AutoencoderKL(SMALL_VAE).eval()
            model.decode(model.encode(torch.randn(1, 3, 32, 32))[0])
            expected = 2  # the mid attention of the encoder and of the decoder
        else:
            model = CLIPTextModel(SMALL_CLIP).eval()
            model(torch.full((1, 77), EOS))
            expected = SMALL_CLIP.num_hidden_layers
    assert len(calls) == expected, calls
