"""The three parameterizations (Custom Diffusion, SVDiff, personalized residuals) on a tiny random SD v1: zero-delta
identity, which tensors train, the start-token detach, round trips, fold, detach, the SVD cache, combining, LAG's
mask hook, bad input, and the parameter counts at SD v1 size (on the meta device)."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

from helpers import randomize_
from nanocustom.checkpoint import load, new_model, save
from nanocustom.clip import CLIPTextConfig
from nanocustom.errors import NanocustomError
from nanocustom.personalize import (RARE_TOKENS, SUBSETS, ModifierEmbedding, ResidualConv, SpectralShift, attach,
                                    delta_method, load_delta, parameter_count, read_delta_metadata, residual_sum,
                                    save_delta, svdiff_combine, svdiff_interpolate, svdiff_scale)
from nanocustom.unet import UNetConfig
from nanocustom.vae import VAEConfig

torch.set_num_threads(1)
# model_channels 64: two channels per GroupNorm group (with one, the norm would erase the timestep signal)
TINY = dict(unet=UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                            num_heads=2, context_dim=32),
            vae=VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1),
            text_encoder=CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2))
METHODS = ["custom", "svdiff", "residual"]
PROMPT = "a photo of a <new1> dog"


def tiny_model(seed=0):
    sd = new_model(**TINY, resolution=64, latent_scale=0.5)
    for i, module in enumerate((sd.unet, sd.text_encoder, sd.vae)):
        randomize_(module, seed * 10 + i)
        module.requires_grad_(False)  # as checkpoint.load() leaves a model
    return sd


@pytest.fixture
def sd():
    return tiny_model()


def options(method, tmp_path):
    return {"cache_dir": tmp_path / "svd"} if method == "svdiff" else {}


def run(sd, prompt=PROMPT, ids=None, grad=False):
    """(text features, predicted noise) for one prompt, fixed latents and timestep."""
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    ids = sd.tokenizer.encode([prompt]) if ids is None else ids
    with torch.set_grad_enabled(grad):
        context = sd.text_encoder(ids)
        return context, sd.unet(x, t, context)


def randomize_delta_(delta, seed=0):
    """A trained-looking delta: every tensor of it moved by noise (residuals' A leaves zero, spectral shifts too)."""
    g = torch.Generator().manual_seed(seed)
    delta.load_state_dict({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in delta.state_dict().items()})


def base_state(sd):
    return {f"{name}.{k}": v.clone() for name in ("unet", "text_encoder", "vae")
            for k, v in getattr(sd, name).state_dict().items()}


def names_of(sd, tensors):
    ids = {id(t) for t in tensors}
    return {f"{name}.{k}" for name in ("unet", "text_encoder", "vae")
            for k, p in getattr(sd, name).named_parameters() if id(p) in ids}


# -----------------------------------------------------------------------------
# All three methods

@pytest.mark.parametrize("method", METHODS)
def test_zero_delta_reproduces_the_base_model_exactly(sd, method, tmp_path):
    base = run(sd, "a photo of a dog")
    attach(sd, method, tokens=["<new1>"], **options(method, tmp_path))
    for a, b in zip(base, run(sd, "a photo of a dog")):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", METHODS)
def test_modifier_tokens_start_as_the_rare_tokens_42170_47629_43514(sd, method, tmp_path):
    tokens = ["<new1>", "<new2>", "<new3>"]
    attach(sd, method, tokens=tokens, **options(method, tmp_path))
    ids = sd.tokenizer.encode(["<new1> <new2> <new3> dog"])
    assert ids[0, 1:5].tolist() == [49408, 49409, 49410, sd.tokenizer.token_id("dog</w>")]
    rare = ids.clone()
    rare[0, 1:4] = torch.tensor([42170, 47629, 43514])  # "ktn", "pll", "ucd</w>" (Kumari et al. App. B)
    assert torch.equal(run(sd, ids=ids)[0], run(sd, ids=rare)[0])


@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_exactly_the_delta_and_nothing_else(sd, method, tmp_path):
    delta = attach(sd, method, tokens=["<new1>"], **options(method, tmp_path))
    if method == "residual":
        randomize_delta_(delta)  # with A = 0 (the init), B's gradient A^T (...) is zero
    trained = [p for group in delta.trainable() for p in group["params"]]
    _, eps = run(sd, grad=True)
    eps.square().mean().backward()
    every = [p for m in (sd.unet, sd.text_encoder, sd.vae) for p in m.parameters()]
    assert {id(p) for p in every if p.grad is not None} == {id(p) for p in trained}
    assert {id(p) for p in every if p.requires_grad} == {id(p) for p in trained}
    assert all(p.grad.abs().sum() > 0 for p in trained)
    names = names_of(sd, trained)
    if method == "custom":  # K/V of every cross-attention and the new embedding rows: nothing else
        assert names == {n for n in names_of(sd, every) if ".attn2.to_k." in n or ".attn2.to_v." in n} | {
            "text_encoder.embeddings.token_embedding.rows"}
        assert sd.text_encoder.embeddings.token_embedding.base.weight.grad is None
    elif method == "svdiff":  # spectral shifts of every UNet weight; frozen token rows
        assert all(n.startswith("unet.") and n.endswith(".delta") for n in names) and len(names) == len(delta.layers)
    else:
        assert names == {f"{key}.{ab}" for key in delta.layers for ab in "AB"}


@pytest.mark.parametrize("method", METHODS)
def test_save_and_load_delta_round_trip_gives_identical_outputs(sd, method, tmp_path):
    delta = attach(sd, method, tokens=["<new1>"], **options(method, tmp_path))
    randomize_delta_(delta)
    expected, tensors = run(sd), delta.state_dict()
    save_delta(delta, tmp_path / "concept.safetensors", extra_metadata={"steps": 150})
    delta.detach()
    with safe_open(str(tmp_path / "concept.safetensors"), "pt") as f:
        info = json.loads(f.metadata()["nanocustom"])
    assert (info["method"], info["tokens"], info["steps"]) == (method, ["<new1>"], 150)
    assert read_delta_metadata(tmp_path / "concept.safetensors") == info
    assert delta_method(tmp_path / "concept.safetensors") == method
    loaded = load_delta(sd, tmp_path / "concept.safetensors", **options(method, tmp_path))
    assert loaded.state_dict().keys() == tensors.keys()
    for a, b in zip(expected, run(sd)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", METHODS)
def test_fold_equals_unfolded_and_gives_plain_modules_with_the_original_keys(sd, method, tmp_path):
    keys = {name: set(getattr(sd, name).state_dict()) for name in ("unet", "text_encoder")}
    delta = attach(sd, method, tokens=["<new1>"], **options(method, tmp_path))
    randomize_delta_(delta)
    unfolded = run(sd)
    delta.fold()
    folded = run(sd)
    torch.testing.assert_close(folded[0], unfolded[0], rtol=0, atol=0)
    torch.testing.assert_close(folded[1], unfolded[1], rtol=0, atol=1e-5)  # residuals: f + A(Bx) vs (W + AB) x
    assert {name: set(getattr(sd, name).state_dict()) for name in ("unet", "text_encoder")} == keys  # (order aside)
    modules = [m for part in (sd.unet, sd.text_encoder) for m in part.modules()]
    assert not any(isinstance(m, (ModifierEmbedding, ResidualConv, SpectralShift)) for m in modules)
    assert not any(m._forward_hooks for m in modules)  # Custom Diffusion's start-token detach is gone
    assert not any(p.requires_grad for m in modules for p in m.parameters())
    assert type(sd.text_encoder.embeddings.token_embedding) is nn.Embedding
    assert sd.text_encoder.config.vocab_size == 49409 and TINY["text_encoder"].vocab_size == 49408


def test_folded_model_saves_and_loads_as_an_ordinary_checkpoint(sd, tmp_path):
    delta = attach(sd, "custom", tokens=["<new1>"])
    randomize_delta_(delta)
    delta.fold()
    save(sd, tmp_path / "folded.safetensors")
    loaded = load(tmp_path / "folded.safetensors")
    assert loaded.tokenizer.added_tokens == ["<new1>"]
    for a, b in zip(run(sd), run(loaded)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_detach_restores_the_base_model_exactly(sd, method, tmp_path):
    sd.unet.out.requires_grad_(True)  # flags as someone left them: restored, not just frozen
    state, tokenizer, outputs = base_state(sd), sd.tokenizer, run(sd, "a photo of a dog")
    flags = [p.requires_grad for p in sd.unet.parameters()]
    delta = attach(sd, method, tokens=["<new1>"], **options(method, tmp_path))
    randomize_delta_(delta)
    optimizer = torch.optim.AdamW(delta.trainable(), weight_decay=0.1)
    run(sd, grad=True)[1].square().mean().backward()
    optimizer.step()
    delta.detach()
    after = base_state(sd)
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert sd.tokenizer is tokenizer and "<new1>" not in tokenizer.backend.get_vocab()
    assert [p.requires_grad for p in sd.unet.parameters()] == flags and sd.delta is None
    for a, b in zip(outputs, run(sd, "a photo of a dog")):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", METHODS)
def test_loading_a_delta_keeps_the_tensors_an_optimizer_holds(sd, method, tmp_path):
    delta = attach(sd, method, tokens=["<new1>"], **options(method, tmp_path))
    held = [p for group in delta.trainable() for p in group["params"]]
    randomize_delta_(delta)  # load_state_dict, as a resumed training run does after building its optimizer
    assert [id(p) for group in delta.trainable() for p in group["params"]] == [id(p) for p in held]


@pytest.mark.parametrize("method", METHODS)
def test_fp32_trained_tensors_beside_a_half_model_fold_back_to_its_dtype(sd, method, tmp_path):
    """As train.py keeps them: the frozen model in bf16, the trained tensors in fp32. (The whole half model runs
    on CUDA only: GroupNorm32 feeds fp32 activations to half weights, which CPU group_norm refuses.)"""
    for part in (sd.unet, sd.text_encoder, sd.vae):
        part.to(torch.bfloat16)
    delta = attach(sd, method, tokens=["<new1>"], **options(method, tmp_path))
    for p in (p for group in delta.trainable() for p in group["params"]):
        p.data = p.data.float()
    randomize_delta_(delta)
    assert sd.text_encoder.embeddings.token_embedding(sd.tokenizer.encode([PROMPT])).dtype == torch.bfloat16
    if method == "residual":
        layer = delta.layers["unet.middle_block.1.proj_out"]
        assert layer(torch.randn(1, 128, 4, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16
    delta.fold()
    assert all(p.dtype == torch.bfloat16 for part in (sd.unet, sd.text_encoder) for p in part.parameters())


def test_deltas_for_one_base_still_load_after_another_is_folded(sd, tmp_path):
    """sample.py folds several deltas one after another: the base's id is kept through fold()."""
    for i, method in enumerate(("residual", "svdiff")):
        delta = attach(sd, method, tokens=[f"<new{i + 1}>"], **options(method, tmp_path))
        randomize_delta_(delta, seed=i)
        save_delta(delta, tmp_path / f"{method}.safetensors")
        delta.detach()
    base = run(sd, "a <new1> and a <new2>")[1]
    load_delta(sd, tmp_path / "residual.safetensors").fold()
    svdiff = load_delta(sd, tmp_path / "svdiff.safetensors", cache_dir=tmp_path / "svd")
    unfolded = run(sd, "a <new1> and a <new2>")[1]
    svdiff.fold()
    assert sd.tokenizer.added_tokens == ["<new1>", "<new2>"]
    assert not torch.allclose(unfolded, base)
    torch.testing.assert_close(run(sd, "a <new1> and a <new2>")[1], unfolded, rtol=1e-5, atol=1e-5)


def test_param_groups_carry_the_papers_learning_rates(sd, tmp_path):
    groups = lambda d, **kw: {g["name"]: g["lr"] for g in d.trainable(**kw)}  # noqa: E731
    delta = attach(sd, "custom", tokens=["<new1>"])
    assert groups(delta) == {"cross_attention": 8e-5, "modifier_tokens": 8e-5}  # Kumari et al. App. D
    delta.detach()
    delta = attach(sd, "svdiff", cache_dir=tmp_path)
    assert groups(delta) == {"spectral_shifts": 1e-3, "1d_shifts": 1e-6}  # Han et al. App. A
    assert groups(delta, lr=5e-3) == pytest.approx({"spectral_shifts": 5e-3, "1d_shifts": 5e-6})
    delta.detach()
    assert groups(attach(sd, "residual")) == {"residuals": 1e-3}  # Ham et al. §4.1


def test_load_delta_refuses_another_base_in_one_line_unless_forced(sd, tmp_path):
    delta = attach(sd, "residual", tokens=["<new1>"])
    save_delta(delta, tmp_path / "concept.safetensors")
    other = tiny_model(seed=1)
    with pytest.raises(NanocustomError, match="was made for base model .* pass force=True") as e:
        load_delta(other, tmp_path / "concept.safetensors")
    assert "\n" not in str(e.value) and getattr(other, "delta", None) is None
    assert load_delta(other, tmp_path / "concept.safetensors", force=True).base_fingerprint != delta.base_fingerprint


@pytest.mark.parametrize("call, message", [
    (lambda sd: attach(sd, "lora"), "unknown method 'lora'"),
    (lambda sd: attach(sd, "custom", rank=4), "custom has no option 'rank'"),
    (lambda sd: attach(sd, "custom", train="all"), "train='all'"),
    (lambda sd: attach(sd, "svdiff", subset="text"), "subset='text'"),
    (lambda sd: attach(sd, "residual", rank_fraction=0), "rank_fraction=0"),
    (lambda sd: attach(sd, "custom", tokens=["<New1>"]), "one lowercase word"),
    (lambda sd: attach(sd, "custom", tokens=["dog</w>"]), "already in the vocabulary"),
    (lambda sd: attach(sd, "custom", tokens=[f"<new{i}>" for i in range(1, 5)]), "4 modifier tokens but 3 rare"),
    (lambda sd: attach(sd, "custom", tokens=["<new1>"], init_from=["zzzzqq"]), "init_from"),
    (lambda sd: load_delta(sd, "missing.safetensors"), "delta not found"),
    (lambda sd: load_delta(sd, Path(__file__).parent.parent / "README.md"), "README.md is not a nanocustom delta"),
])
def test_bad_input_is_refused_in_one_line_and_leaves_the_model_untouched(sd, call, message):
    sd.unet.requires_grad_(True)  # so that a refusal must give the flags back, not just leave them frozen
    state, tokenizer = base_state(sd), sd.tokenizer
    with pytest.raises(NanocustomError, match=message.replace("(", r"\(")) as e:
        call(sd)
    assert "\n" not in str(e.value) and sd.tokenizer is tokenizer and getattr(sd, "delta", None) is None
    assert all(p.requires_grad for p in sd.unet.parameters())
    assert all(torch.equal(v, state[k]) for k, v in base_state(sd).items())


def test_a_second_delta_or_a_spent_one_is_refused(sd):
    delta = attach(sd, "residual")
    with pytest.raises(NanocustomError, match="already attached"):
        attach(sd, "custom")
    delta.detach()
    with pytest.raises(NanocustomError, match="folded or detached already"):
        delta.fold()


def test_new_k_starts_from_the_kth_rare_token_in_a_run_of_its_own_too(sd):
    """A concept trained alone as <new2> gets the row a joint run would give it (47629), not <new1>'s 42170: on the
    shapes model two concepts started from one row stay nearly one token, and their merge drew one twice."""
    base = sd.text_encoder.embeddings.token_embedding.weight.detach().clone()
    for tokens, starts in [(["<new2>"], [47629]), (["<new3>", "<new1>"], [43514, 42170]),
                           (["<sks>", "<new1>"], [47629, 42170]), (["<new1>", "<sks>"], [42170, 47629]),
                           (["<new1>", "<new2>", "<sks>"], [42170, 47629, 43514]), (["<sks>"], [42170])]:
        delta = attach(sd, "custom", tokens=tokens)
        assert torch.equal(delta.embedding.rows, base[starts]), tokens
        assert delta.metadata()["options"]["init_from"] == starts
        delta.detach()


def test_more_than_three_tokens_need_their_own_rare_tokens(sd):
    tokens = [f"<new{i}>" for i in range(1, 5)]
    delta = attach(sd, "custom", tokens=tokens, init_from=RARE_TOKENS + ["sks</w>"])
    rows = sd.text_encoder.embeddings.token_embedding
    assert torch.equal(rows.rows[3], rows.base.weight[sd.tokenizer.token_id("sks</w>")])
    assert delta.metadata()["options"]["init_from"][3] == "sks</w>"


# -----------------------------------------------------------------------------
# Custom Diffusion

def test_custom_diffusion_start_token_keys_and_values_get_no_gradient(sd):
    """Text features reach the UNet only through attn2's to_k / to_v, so the gradient on the features of position 0
    is the gradient through the start token's K and V: zero with the authors' detach, nonzero without."""
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    with torch.no_grad():
        features = sd.text_encoder(sd.tokenizer.encode(["a photo of a dog"]))

    def feature_grad():
        context = features.clone().requires_grad_(True)
        sd.unet(x, t, context).square().mean().backward()
        return context.grad[0]

    base = feature_grad()
    attach(sd, "custom")
    detached = feature_grad()
    assert base[0].abs().sum() > 0 and torch.equal(detached[0], torch.zeros_like(detached[0]))
    torch.testing.assert_close(detached[1:], base[1:], rtol=1e-5, atol=1e-8)  # the other tokens as before


def test_custom_diffusion_train_attn2_trains_q_k_v_and_out(sd):
    delta = attach(sd, "custom", train="attn2")
    names = names_of(sd, [p for g in delta.trainable() for p in g["params"]])
    expected = {n for n, _ in sd.unet.named_parameters() if ".attn2." in n}
    assert names == {f"unet.{n}" for n in expected} and any(n.endswith("to_out.0.bias") for n in names)


def test_custom_diffusion_delta_stores_the_fine_tuned_weights_not_differences(sd):
    W0 = sd.unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k.weight.clone()
    delta = attach(sd, "custom")
    assert torch.equal(delta.state_dict()["unet.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"], W0)


# -----------------------------------------------------------------------------
# SVDiff

def test_svdiff_zero_shift_is_W_and_the_svd_cache_is_written_once_and_reused(sd, tmp_path, monkeypatch):
    weights = {n: p.clone() for n, p in sd.unet.named_parameters()}
    delta = attach(sd, "svdiff", cache_dir=tmp_path)
    (cache,) = tmp_path.iterdir()
    for key, m in delta.layers.items():
        W = weights[key.removeprefix("unet.") + ".weight"]
        assert torch.equal(m.weight, W)  # delta = 0: W exactly
        s = m.parametrizations.weight[0]
        if isinstance(s, SpectralShift):  # and the cached SVD reconstructs it, conv kernels as c_out x (c_in k k)
            assert s.U.shape[0] == W.shape[0] and s.Vh.shape[1] == W[0].numel()
            torch.testing.assert_close((s.U * s.sigma) @ s.Vh, W.flatten(1), rtol=0, atol=1e-5)
    delta.detach()
    written = cache.stat().st_mtime_ns
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: pytest.fail("SVD recomputed despite the cache"))
    attach(sd, "svdiff", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == [cache] and cache.stat().st_mtime_ns == written


def test_svdiff_weight_is_eq_2_with_relu_clamping_shifted_singular_values(sd, tmp_path):
    delta = attach(sd, "svdiff", subset="kv", cache_dir=tmp_path)
    m = delta.layers["unet.middle_block.1.transformer_blocks.0.attn2.to_v"]
    s = m.parametrizations.weight[0]
    with torch.no_grad():
        s.delta.copy_(torch.randn(s.delta.shape) * s.sigma)
        s.delta[0] = -2 * s.sigma[0]  # sigma + delta < 0: ReLU clamps it to 0
    eq2 = (s.U * torch.relu(s.sigma + s.delta)) @ s.Vh  # W_delta = U diag(ReLU(sigma + delta)) V^T
    torch.testing.assert_close(m.weight, eq2, rtol=0, atol=1e-5)


def test_svdiff_subsets_are_table_1s(sd, tmp_path):
    expected = {"kv": lambda n: ".attn2.to_k" in n or ".attn2.to_v" in n, "cross_attn": lambda n: ".attn2." in n,
                "up": lambda n: n.startswith("output_blocks"), "mid": lambda n: n.startswith("middle_block"),
                "down": lambda n: n.startswith("input_blocks")}
    weights = [n.removesuffix(".weight") for n, _ in sd.unet.named_parameters() if n.endswith(".weight")]
    for subset, rule in expected.items():
        delta = attach(sd, "svdiff", subset=subset, cache_dir=tmp_path)
        assert set(delta.layers) == {f"unet.{n}" for n in weights if rule(n)}
        delta.detach()
    delta = attach(sd, "svdiff", subset="all", text_encoder=True, cache_dir=tmp_path)
    assert len(delta.layers) == len(weights) + 2 * 6 + 2 * 2 + 1  # + CLIP: 6 linear, 2 norms per layer, final norm


def test_svdiff_combine_interpolate_scale_are_eq_4_eq_5_and_e3(sd, tmp_path):
    delta = attach(sd, "svdiff", tokens=["<new1>"], cache_dir=tmp_path)
    g = torch.Generator().manual_seed(1)  # two concepts' shifts, same frozen token rows
    a, b = ({k: 0.1 * torch.randn(v.shape, generator=g) if k.endswith(".delta") else v
             for k, v in delta.state_dict().items()} for _ in range(2))
    key = "unet.middle_block.1.proj_out.delta"
    assert torch.equal(svdiff_combine(a, b)[key], a[key] + b[key])
    torch.testing.assert_close(svdiff_interpolate(a, b, 0.25)[key], 0.25 * a[key] + 0.75 * b[key])
    torch.testing.assert_close(svdiff_scale(a, 2.0)[key], 2 * a[key])
    assert torch.equal(svdiff_combine(a, b)["modifier_tokens"], a["modifier_tokens"])  # frozen rows, shared
    delta.load_state_dict(svdiff_combine(a, b))
    s = delta.layers["unet.middle_block.1.proj_out"].parametrizations.weight[0]
    eq4 = (s.U * torch.relu(s.sigma + a[key] + b[key])) @ s.Vh  # Eq. 4
    torch.testing.assert_close(delta.layers["unet.middle_block.1.proj_out"].weight.flatten(1), eq4, rtol=0, atol=1e-5)
    b["modifier_tokens"] = b["modifier_tokens"] + 1
    with pytest.raises(NanocustomError, match="modifier_tokens differs"):
        svdiff_combine(a, b)


# -----------------------------------------------------------------------------
# Personalized residuals

def test_residual_rank_is_five_percent_of_proj_out_channels_and_starts_at_zero(sd):
    delta = attach(sd, "residual")
    ranks = {layer.name: (layer.A.shape, layer.B.shape) for layer in delta.layers.values()}
    assert ranks["input_blocks.1.1.proj_out"] == ((64, 3), (3, 64))  # round(0.05 * 64) = 3
    assert ranks["middle_block.1.proj_out"] == ((128, 6), (6, 128))  # round(0.05 * 128) = 6
    # one per SpatialTransformer: 2 on the way down, 1 in the middle, 4 on the way up
    assert len(ranks) == 7 and all(torch.equal(layer.A, torch.zeros_like(layer.A)) for layer in delta.layers.values())
    assert all(layer.B.abs().sum() > 0 for layer in delta.layers.values())


def test_residual_mask_blends_base_and_personalised_features_as_lag_eq_3(sd):
    base = run(sd)[1]
    delta = attach(sd, "residual")
    randomize_delta_(delta)
    personalised = run(sd)[1]
    layer = delta.layers["unet.middle_block.1.proj_out"]
    x = torch.randn(2, 128, 4, 4)
    f, f_prime = layer.outputs(x)
    M = (torch.rand(2, 1, 4, 4) > 0.5).float()
    layer.mask = M
    torch.testing.assert_close(layer(x), (1 - M) * f + M * f_prime)  # Eq. 3
    seen = []
    layer.mask = lambda module: seen.append(module.name) or torch.ones(1, 1, 1, 1)
    torch.testing.assert_close(layer(x), f_prime)
    assert seen == ["middle_block.1.proj_out"]
    for layer in delta.layers.values():  # M = 0 everywhere: the base model, in the same UNet pass
        layer.mask = torch.zeros(1, 1, 1, 1)
    masked = run(sd)[1]
    assert not torch.equal(masked, personalised)
    torch.testing.assert_close(masked, base, rtol=0, atol=1e-6)


def test_residual_sum_adds_the_scaled_weight_deltas(sd, tmp_path):
    W = sd.unet.middle_block[1].proj_out.weight.clone()
    delta = attach(sd, "residual")
    randomize_delta_(delta, seed=1)
    a = delta.state_dict()
    randomize_delta_(delta, seed=2)
    b = delta.state_dict()
    delta.load_state_dict(residual_sum([a, b], [0.5, 2.0]))
    layer = delta.layers["unet.middle_block.1.proj_out"]
    assert layer.A.shape == (128, 12)  # rank 6 + 6
    delta.fold()
    A, B = "unet.middle_block.1.proj_out.A", "unet.middle_block.1.proj_out.B"
    expected = W + (0.5 * a[A] @ a[B] + 2.0 * b[A] @ b[B])[:, :, None, None]
    torch.testing.assert_close(sd.unet.middle_block[1].proj_out.weight, expected)


# -----------------------------------------------------------------------------
# Stable Diffusion v1 sizes, on the meta device

@pytest.fixture(scope="module")
def sd_v1():
    with torch.device("meta"):
        return new_model()


def test_custom_diffusion_trains_19_17m_parameters_at_sd_v1_size(sd_v1):
    delta = attach(sd_v1, "custom")
    n = parameter_count(delta)
    delta.detach()
    assert n == 19_169_280 and round(n / 1e6, 2) == 19.17  # Kumari et al. / Ham et al. Table 1: 19M
    delta = attach(sd_v1, "custom", tokens=["<new1>"])
    assert parameter_count(delta) == n + 768
    delta.detach()


def test_personalized_residuals_are_1_2m_parameters_at_sd_v1_size(sd_v1):
    delta = attach(sd_v1, "residual")
    n = parameter_count(delta)
    delta.detach()
    assert n == 1_239_040 and round(n / 1e6, 1) == 1.2  # Ham et al. §4.1: "totalling 1.2M trainable parameters"


def test_svdiff_sizes_at_sd_v1_size_are_table_1s(sd_v1):
    """Table 1's storage is a torch.save file of the fp32 shifts; ours are the same tensors. Its numbers are matched
    by our floats x 4 bytes plus ~290 bytes of file overhead per tensor, for all 12 subsets."""
    table_1_kb = {"all": 1404, "cross_attn": 194, "kv": 84.8, "1d": 430, "2d": 617, "4d": 355, "up": 789,
                  "down": 469, "mid": 135, "up_cross_attn": 106, "down_cross_attn": 70.4, "mid_cross_attn": 17.7}
    assert set(table_1_kb) == set(SUBSETS)
    for subset, kb in table_1_kb.items():
        delta = attach(sd_v1, "svdiff", subset=subset)
        n, tensors = parameter_count(delta), len(delta.state_dict())
        delta.detach()
        if subset == "all":
            assert n == 322_856 and 4 * n == 1_291_424  # 1.29 MB of fp32; 1.40 MB as Table 1 stores it
        assert (4 * n + 290 * tensors) / 1e3 == pytest.approx(kb, rel=0.02)
    delta = attach(sd_v1, "svdiff", text_encoder=True)  # the introduction's "1.7MB for StableDiffusion"
    assert parameter_count(delta) == 397_352  # 1.59 MB of fp32, + 196 tensors' overhead ~ 1.7 MB
    delta.detach()



def test_a_given_rate_replaces_the_methods_own_and_keeps_the_1d_rate_in_proportion(sd, tmp_path):
    for subset in ("all", "1d"):  # with "1d" the 1-D shifts are the first group, and still get App. A's ratio
        delta = attach(sd, "svdiff", tokens=["<new1>"], subset=subset, cache_dir=tmp_path)
        rates = {g["name"]: g["lr"] for g in delta.trainable(lr=2e-3)}
        assert rates["1d_shifts"] == pytest.approx(2e-6)  # 1e-6, times 2e-3 / 1e-3
        assert rates.get("spectral_shifts", 2e-3) == pytest.approx(2e-3)
        delta.detach()
