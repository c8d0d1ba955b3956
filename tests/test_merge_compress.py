"""Low-rank Custom Diffusion deltas in files (Kumari et al. App. B): save_delta(keep=) stores U S and V^T of W - W0,
load_delta and combine multiply them out against the base weights, keep = 1 is the full delta, and storage falls with
keep."""
import json

import pytest
import torch
from safetensors import safe_open

from helpers import randomize_
from nanocustom.checkpoint import new_model
from nanocustom.clip import CLIPTextConfig
from nanocustom.errors import NanocustomError
from nanocustom.interop import export_diffusers_custom_diffusion
from nanocustom.merge import combine, compress_custom_delta, decompress_custom_tensors
from nanocustom.personalize import attach, load_delta, save_delta
from nanocustom.unet import UNetConfig
from nanocustom.vae import VAEConfig

TINY = dict(unet=UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                            num_heads=2, context_dim=32),
            vae=VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1),
            text_encoder=CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2))
PROMPT = "a photo of a <new1> dog"


def tiny_model(seed=0):
    sd = new_model(**TINY, resolution=64, latent_scale=0.5)
    for i, module in enumerate((sd.unet, sd.text_encoder, sd.vae)):
        randomize_(module, seed * 10 + i)
        module.requires_grad_(False)
    return sd


def unet_output(sd, prompt=PROMPT):
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    with torch.no_grad():
        return sd.unet(x, t, sd.text_encoder(sd.tokenizer.encode([prompt])))


def trained_custom(sd, token="<new1>", seed=0):
    """A Custom Diffusion delta whose K/V moved as training would: full rank changes of W0."""
    delta = attach(sd, "custom", tokens=[token], init_from=[42170 + seed])
    g = torch.Generator().manual_seed(seed)
    delta.load_state_dict({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in delta.state_dict().items()})
    return delta


@pytest.fixture
def sd():
    return tiny_model()


def test_compressed_file_holds_low_rank_factors_and_says_so(sd, tmp_path):
    delta = trained_custom(sd)
    save_delta(delta, tmp_path / "c.safetensors", keep=0.6)
    weights = [k for k in delta.originals_by_key()]
    with safe_open(str(tmp_path / "c.safetensors"), "pt") as f:
        keys, info = set(f.keys()), json.loads(f.metadata()["nanocustom"])
        shapes = {k: f.get_slice(k).get_shape() for k in keys}
    assert info["compression"]["keep"] == 0.6 and info["method"] == "custom"
    assert keys == {f"{k}.{f}" for k in weights for f in ("US", "Vt")} | {"modifier_tokens"}
    for k in weights:
        o, dim = delta.originals_by_key()[k].shape
        rank = shapes[f"{k}.US"][1]
        assert shapes[f"{k}.US"] == [o, rank] and shapes[f"{k}.Vt"] == [rank, dim] and 0 < rank < min(o, dim)


def test_compressed_file_loads_as_the_decompressed_delta_applied(sd, tmp_path):
    delta = trained_custom(sd)
    save_delta(delta, tmp_path / "c.safetensors", keep=0.6)
    low_rank, _ = compress_custom_delta(delta, 0.6)
    delta.load_state_dict(decompress_custom_tensors(low_rank, delta.originals_by_key()))
    expected, tensors = unet_output(sd), delta.state_dict()
    delta.detach()
    loaded = load_delta(sd, tmp_path / "c.safetensors")
    assert all(torch.equal(v, tensors[k]) for k, v in loaded.state_dict().items())
    assert torch.equal(unet_output(sd), expected)


def test_keep_1_gives_the_full_deltas_unet_output_to_fp32_rounding(sd, tmp_path):
    delta = trained_custom(sd)
    expected = unet_output(sd)
    save_delta(delta, tmp_path / "c.safetensors", keep=1.0)
    delta.detach()
    load_delta(sd, tmp_path / "c.safetensors").fold()
    torch.testing.assert_close(unet_output(sd), expected, rtol=1e-5, atol=1e-5)


def test_storage_and_file_size_fall_and_error_rises_as_keep_falls(sd, tmp_path):
    delta = trained_custom(sd)
    stats, sizes = [], []
    for keep in (1.0, 0.9, 0.6, 0.3):
        stats.append(compress_custom_delta(delta, keep)[1])
        save_delta(delta, tmp_path / f"{keep}.safetensors", keep=keep)
        sizes.append((tmp_path / f"{keep}.safetensors").stat().st_size)
    low, errors = [s["low_rank_bytes"] for s in stats], [s["rel_error"] for s in stats]
    assert all(b < a for a, b in zip(low, low[1:])) and all(b < a for a, b in zip(sizes, sizes[1:]))
    assert all(b > a for a, b in zip(errors, errors[1:])) and errors[0] < 1e-6
    assert low[-1] < stats[-1]["full_bytes"]


def test_compressed_file_for_another_base_is_refused_unless_forced(sd, tmp_path):
    save_delta(trained_custom(sd), tmp_path / "c.safetensors", keep=0.6)
    other = tiny_model(seed=1)
    with pytest.raises(NanocustomError, match="was made for base model"):
        load_delta(other, tmp_path / "c.safetensors")
    assert getattr(other, "delta", None) is None
    load_delta(other, tmp_path / "c.safetensors", force=True)


@pytest.mark.filterwarnings("ignore:C_reg")  # 40 captions in a 32-wide text space: the ridge fallback
@pytest.mark.parametrize("how", ["add", "lagrangian"])
def test_combine_reads_compressed_files_as_the_full_ones(sd, tmp_path, how):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    training = {"training": {"prompt": ["photo of a <new1> dog"]}}
    for path, keep in ((a, None), (tmp_path / "a1.safetensors", 1.0)):
        delta = trained_custom(sd)
        save_delta(delta, path, training, keep=keep)
        delta.detach()
    delta = trained_custom(sd, "<new2>", seed=1)
    save_delta(delta, b, {"training": {"prompt": ["photo of a <new2> cat"]}})
    delta.detach()
    reg = ["a dog", "a cat on a mat", "a red car", "a house by a lake"] * 10
    full = combine(sd, [a, b], how, reg_captions=reg, log=lambda _: None).state_dict()
    sd.delta.detach()
    low = combine(sd, [tmp_path / "a1.safetensors", b], how, reg_captions=reg, log=lambda _: None).state_dict()
    for k in full:
        torch.testing.assert_close(low[k], full[k], rtol=1e-4, atol=1e-5)


def test_compressing_svdiff_or_residuals_is_refused_with_the_reason(sd, tmp_path):
    for method in ("svdiff", "residual"):
        delta = attach(sd, method, **({"cache_dir": tmp_path} if method == "svdiff" else {}))
        with pytest.raises(NanocustomError, match="small and low-rank already"):
            save_delta(delta, tmp_path / "d.safetensors", keep=0.5)
        delta.detach()
    assert not (tmp_path / "d.safetensors").exists()


def test_diffusers_export_of_a_compressed_file_needs_and_uses_the_base(sd, tmp_path):
    delta = trained_custom(sd)
    save_delta(delta, tmp_path / "c.safetensors", keep=0.6)
    delta.detach()
    with pytest.raises(NanocustomError, match="needs its base model"):
        export_diffusers_custom_diffusion(tmp_path / "c.safetensors", tmp_path / "x", num_res_blocks=1)
    from_file = export_diffusers_custom_diffusion(tmp_path / "c.safetensors", tmp_path / "x", 1, sd=sd)
    live = export_diffusers_custom_diffusion(load_delta(sd, tmp_path / "c.safetensors"), tmp_path / "y")
    with safe_open(str(from_file[0]), "pt") as f, safe_open(str(live[0]), "pt") as g:
        assert set(f.keys()) == set(g.keys())
        assert all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in f.keys())
