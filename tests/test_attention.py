"""Cross-attention observers, attention maps and LAG sampling (Ham et al. §3.3) on a tiny random model."""
import numpy as np
import pytest
import torch

from nanocustom.attention import LAG, AttentionMaps, concept_positions, observing
from nanocustom.checkpoint import new_model
from nanocustom.clip import CLIPTextConfig
from nanocustom.errors import NanocustomError
from nanocustom.personalize import attach
from nanocustom.pipeline import generate
from nanocustom.unet import UNetConfig
from nanocustom.vae import VAEConfig

PROMPT = "photo of a <new1> square"


def tiny(seed=0):
    torch.manual_seed(seed)
    sd = new_model(UNetConfig(model_channels=64, channel_mult=(1, 2), attention_resolutions=(1, 2), num_heads=2,
                              num_res_blocks=1, context_dim=32),
                   VAEConfig(ch=64, ch_mult=(1, 1), num_res_blocks=1),
                   CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
                   resolution=32)
    with torch.no_grad():  # proj_out and the residual's A start at zero in training; random here, or LAG is moot
        for p in sd.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return sd


def residual(sd):
    delta = attach(sd, "residual", tokens=["<new1>"])
    with torch.no_grad():
        for layer in delta.layers.values():
            layer.A.normal_(std=0.5)
    return delta


def test_concept_positions_are_the_modifier_token_and_its_class_word():
    sd = tiny()
    sd.tokenizer.add_tokens(["<new1>"])
    assert concept_positions(sd.tokenizer, PROMPT) == [4, 5]  # BOS photo of a <new1> square
    assert concept_positions(sd.tokenizer, "a <new1> teddybear on a table") == [2, 3, 4]  # "teddy", "bear</w>"
    assert concept_positions(sd.tokenizer, "photo of a square") == []  # C empty: LAG leaves it to the base model


def test_a_class_of_several_words_is_given_and_must_follow_the_token():
    sd = tiny()
    residual(sd)  # adds <new1>
    prompt = "a <new1> teddy bear on a table"
    assert concept_positions(sd.tokenizer, prompt) == [2, 3]  # "teddy" alone: the one word after the token
    assert concept_positions(sd.tokenizer, prompt, "teddy bear") == [2, 3, 4]
    assert LAG(sd, [prompt] * 2, class_phrase="teddy bear").positions == [[2, 3, 4]] * 2
    with pytest.raises(NanocustomError, match="'bear' does not follow the modifier token"):
        concept_positions(sd.tokenizer, prompt, "bear")


def test_observing_sees_softmax_attention_and_leaves_outputs_unchanged():
    sd = tiny()
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 77, 32)
    seen = {}
    with torch.no_grad():
        plain = sd.unet(x, t, context)
        with observing(sd.unet, lambda path, probs: seen.setdefault(path, probs)):
            observed = sd.unet(x, t, context)
    assert torch.equal(plain, observed)
    assert len(seen) == sum(name.endswith("attn2") for name, _ in sd.unet.named_modules())
    probs = seen["input_blocks.1.1.transformer_blocks.0.attn2"]
    assert probs.shape == (2, 2, 64, 77)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 64))


def test_attention_maps_average_to_a_distribution_over_tokens_per_position():
    sd = tiny()
    maps = AttentionMaps(2, (8, 8))
    generate(sd, ["a red circle", "a blue square"], steps=3, progress=False, attention_maps=maps)
    n_attn2 = sum(name.endswith("attn2") for name, _ in sd.unet.named_modules())
    assert maps.maps.shape == (2, 77, 8, 8) and maps.count == 3 * n_attn2  # every step, every cross-attention
    torch.testing.assert_close(maps.maps.sum(1), torch.ones(2, 8, 8), atol=1e-4, rtol=0)


def test_lag_masks_are_median_binarised_and_cost_no_extra_unet_pass():
    sd = tiny()
    residual(sd)
    calls = []
    sd.unet.register_forward_hook(lambda *_: calls.append(1))
    generate(sd, [PROMPT], steps=3, progress=False)
    plain_calls = len(calls)
    lag = LAG(sd, [PROMPT])
    generate(sd, [PROMPT], steps=3, progress=False, lag=lag)
    assert len(calls) - plain_calls == plain_calls
    assert set(lag.masks) == {name.removesuffix(".proj_out") for name in (l.name for l in lag.layers.values())}
    for block, masks in lag.masks.items():
        assert len(masks) == 3
        for M in masks:
            assert set(M.unique().tolist()) <= {0.0, 1.0}
            assert 0.3 <= M.mean().item() <= 0.5  # strictly above the median: just under half the positions


def test_lag_blends_base_and_personalised_features_per_eq3():
    sd = tiny()
    prompts = [PROMPT]
    delta = attach(sd, "residual", tokens=["<new1>"])  # A = 0: the base model, with the token registered
    base = generate(sd, prompts, steps=3, progress=False, seed=1)
    with torch.no_grad():
        for layer in delta.layers.values():
            layer.A.normal_(std=0.5)
    personalised = generate(sd, prompts, steps=3, progress=False, seed=1)
    with_lag = generate(sd, prompts, steps=3, progress=False, seed=1, lag=True)
    assert (with_lag != personalised).any() and (with_lag != base).any()  # M neither all ones nor all zeros
    for layer in delta.layers.values():
        layer.mask = torch.ones(1)
    assert (generate(sd, prompts, steps=3, progress=False, seed=1) == personalised).all()  # M = 1: f'
    for layer in delta.layers.values():
        layer.mask = torch.zeros(1)
    assert (generate(sd, prompts, steps=3, progress=False, seed=1) == base).all()  # M = 0: f


def test_lag_keeps_a_half_precision_model_in_its_dtype():
    """The 0/1 mask is made in float32; blended into bf16 features it must not promote them (the next conv is bf16)."""
    sd = tiny().to(dtype=torch.bfloat16)
    delta = residual(sd)
    with torch.no_grad():
        for layer in delta.layers.values():
            layer.A.normal_(std=0.5)
    images = generate(sd, [PROMPT], steps=2, progress=False, lag=True)
    assert images.dtype == np.uint8 and images.shape[0] == 1


def test_lag_leaves_a_prompt_without_the_token_to_the_base_model():
    """C empty: M = 0, so that prompt's rows of a guided batch [uncond, cond] are the base model's, exactly; the
    concept's prompt blends both its halves by its own (conditional) mask."""
    from nanocustom.pipeline import encode_prompts
    sd = tiny()
    delta = residual(sd)
    prompts = [PROMPT, "photo of a square"]
    x, t = torch.randn(4, 4, 8, 8), torch.full((4,), 500)
    context = torch.cat([encode_prompts(sd, [""] * 2), encode_prompts(sd, prompts)])
    with torch.no_grad():
        personalised = sd.unet(x, t, context)
        for layer in delta.layers.values():
            layer.mask = torch.zeros(1)
        base = sd.unet(x, t, context)
        for layer in delta.layers.values():
            layer.mask = None
        lag = LAG(sd, prompts)
        with observing(sd.unet, lag.observe), lag.applied(1.0, guided=True):
            blended = sd.unet(x, t, context)
    assert not torch.allclose(personalised[[1, 3]], base[[1, 3]])  # the residuals would move those rows
    torch.testing.assert_close(blended[[1, 3]], base[[1, 3]], rtol=0, atol=0)
    for row in (0, 2):  # the concept's prompt, unconditional and conditional halves
        assert not torch.allclose(blended[row], base[row]) and not torch.allclose(blended[row], personalised[row])
    assert all((masks[0][1] == 0).all() and masks[0][0].any() for masks in lag.masks.values())


@pytest.mark.parametrize("method", ["custom", "svdiff"])
def test_lag_refuses_deltas_that_are_not_residuals(method, tmp_path, monkeypatch):
    sd = tiny()
    monkeypatch.setattr("nanocustom.personalize.SVD_CACHE", tmp_path)
    attach(sd, method, tokens=["<new1>"])
    with pytest.raises(NanocustomError, match=f"has a {method} delta"):
        LAG(sd, [PROMPT])


def test_base_unconditional_gives_the_unconditional_half_the_base_prediction():
    """pipeline.generate(base_unconditional=True): in a guided batch [uncond, cond] the residuals act on the
    conditional rows only; the unconditional rows are the base model's, exactly."""
    from nanocustom.pipeline import conditional_residuals, encode_prompts
    sd = tiny()
    delta = residual(sd)
    n, x, t = 2, torch.randn(2, 4, 8, 8), torch.tensor([500, 500])
    context = torch.cat([encode_prompts(sd, [""] * n), encode_prompts(sd, [PROMPT] * n)])
    with torch.no_grad():
        personalised = sd.unet(torch.cat([x, x]), torch.cat([t, t]), context)
        for layer in delta.layers.values():
            layer.mask = torch.zeros(1)
        base = sd.unet(torch.cat([x, x]), torch.cat([t, t]), context)
        for layer in delta.layers.values():
            layer.mask = None
        with conditional_residuals(sd, n, guided=True):
            mixed = sd.unet(torch.cat([x, x]), torch.cat([t, t]), context)
    assert not torch.allclose(personalised[:n], base[:n])  # the residuals do move the unconditional prediction
    torch.testing.assert_close(mixed[:n], base[:n], rtol=0, atol=0)
    torch.testing.assert_close(mixed[n:], personalised[n:], rtol=0, atol=0)
    plain = generate(sd, [PROMPT], steps=3, progress=False, seed=1)
    assert (generate(sd, [PROMPT], steps=3, progress=False, seed=1, base_unconditional=True) != plain).any()
    assert all(layer.branch is None for layer in delta.layers.values())  # reset after sampling
    unguided = generate(sd, [PROMPT], steps=3, progress=False, seed=1, guidance=1.0)  # no unconditional pass
    assert (generate(sd, [PROMPT], steps=3, progress=False, seed=1, guidance=1.0, base_unconditional=True)
            == unguided).all()


def test_base_unconditional_refuses_a_model_without_a_residual_delta():
    sd = tiny()
    with pytest.raises(NanocustomError, match="base_unconditional needs an unfolded personalized-residuals delta"):
        generate(sd, [PROMPT], steps=2, progress=False, base_unconditional=True)


def test_base_unconditional_combines_with_lag():
    """With LAG the factor multiplies M: the conditional half gets (1 - M) f + M f', the unconditional half f."""
    sd = tiny()
    delta = residual(sd)
    lag_only = generate(sd, [PROMPT], steps=3, progress=False, seed=1, lag=True)
    lag = LAG(sd, [PROMPT])
    both = generate(sd, [PROMPT], steps=3, progress=False, seed=1, lag=lag, base_unconditional=True)
    assert lag.masks and (both != lag_only).any()
    assert all(layer.branch is None and layer.mask is None for layer in delta.layers.values())
