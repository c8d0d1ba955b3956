"""training_step's two savings change nothing: gradient checkpointing gives the same gradients, and the feature
cache the same loss as encoding every step."""
import torch

from nanocustom.checkpoint import new_model
from nanocustom.clip import CLIPTextConfig
from nanocustom.personalize import attach
from nanocustom.pretrain import ZERO_SNR
from nanocustom.training import FeatureCache, Unmix, encode_text, training_step
from nanocustom.unet import UNetConfig
from nanocustom.vae import VAEConfig


def tiny_model():
    torch.manual_seed(0)
    return new_model(UNetConfig(model_channels=64, channel_mult=(1, 2), attention_resolutions=(1, 2), num_heads=2,
                                num_res_blocks=1, context_dim=32),
                     VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1),
                     CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
                     resolution=32)


def a_batch():
    g = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    return {"images": images[[0, 1, 2, 0]], "masks": torch.ones(4, 1, 16, 16),
            "prompts": ["photo of a <new1> square"] * 2 + ["photo of a square"] * 2,
            "is_reg": torch.tensor([False, False, True, True]), "sources": ["a.png", "b.png", "r0", "a.png"]}


def step(sd, delta, cache=None, seed=0):
    """One step with a zero learning rate: the loss, and the gradients it left."""
    params = [p for group in delta.trainable() for p in group["params"]]
    opt = torch.optim.SGD(params, lr=0.0)
    loss = training_step(sd, a_batch(), opt, torch.Generator().manual_seed(seed), torch.float32, cache=cache)
    return loss.item(), [p.grad.clone() for p in params]


def test_gradient_checkpointing_gives_the_same_gradients():
    sd = tiny_model()
    delta = attach(sd, "custom", tokens=["<new1>"])  # K/V and the token rows: gradients in the UNet and CLIP
    loss, grads = step(sd, delta)
    sd.unet.gradient_checkpointing = True
    loss_ckpt, grads_ckpt = step(sd, delta)
    assert loss_ckpt == loss
    assert len(grads) == len(grads_ckpt) and any(g.abs().max() > 0 for g in grads)
    for g, g_ckpt in zip(grads, grads_ckpt):
        torch.testing.assert_close(g_ckpt, g, rtol=1e-5, atol=1e-7)


def test_cached_and_uncached_steps_give_the_same_loss():
    for method in ("residual", "custom"):  # frozen text encoder (features cached), trained token rows (not)
        sd = tiny_model()
        delta = attach(sd, method, tokens=["<new1>"])
        loss, _ = step(sd, delta)
        cache = FeatureCache(sd)
        for seed in (0, 0):  # the first step fills the cache, the second reads it
            cached_loss, _ = step(sd, delta, cache, seed)
            assert abs(cached_loss - loss) <= 1e-5 * loss, method
        assert len(cache.posteriors) == 3 and len(cache.features) == (2 if method == "residual" else 0)


def a_cutmix_batch(sides=("<new1>", "<new2>")):
    batch = a_batch()
    batch["prompts"] = ["photo of a <new1> square and a <new2> circle"] * 2 + ["photo of a square"] * 2
    batch["cutmix"] = torch.tensor([True, True, False, False])
    batch["sides"] = [sides, sides, None, None]
    return batch


def unmix_term(sd, unmix, batch):
    watch, term = unmix.observe(batch)
    with watch:
        sd.unet(torch.randn(4, 4, 16, 16), torch.full((4,), 500), encode_text(sd, batch["prompts"]))
    return term()


def test_unmix_term_penalises_attention_on_the_other_concepts_half_and_trains_k_v():
    sd = tiny_model()
    delta = attach(sd, "custom", tokens=["<new1>", "<new2>"])
    unmix = Unmix(sd, ["<new1>", "<new2>"], weight=1.0)
    torch.manual_seed(0)
    term = unmix_term(sd, unmix, a_cutmix_batch())
    assert term > 0
    term.backward()
    k_grads = [p.grad for name, p in sd.unet.named_parameters() if name.endswith("attn2.to_k.weight")]
    assert k_grads and all(g is not None and g.abs().max() > 0 for g in k_grads)
    torch.manual_seed(0)  # the same pass with the halves swapped: M changes, so does the term
    with torch.no_grad():
        swapped = unmix_term(sd, unmix, a_cutmix_batch(sides=("<new2>", "<new1>")))
    assert abs(swapped.item() - term.item()) > 1e-6 * term.item()


def test_unmix_adds_nothing_to_a_batch_without_cut_mix_samples():
    sd = tiny_model()
    delta = attach(sd, "custom", tokens=["<new1>", "<new2>"])
    params = [p for group in delta.trainable() for p in group["params"]]
    batch = a_cutmix_batch()
    batch["cutmix"][:] = False
    losses = [training_step(sd, batch, torch.optim.SGD(params, lr=0.0), torch.Generator().manual_seed(0),
                            torch.float32, unmix=unmix).item()
              for unmix in (None, Unmix(sd, ["<new1>", "<new2>"], weight=1.0))]
    assert losses[0] == losses[1]
    batch["cutmix"][:2] = True  # with cut-mix samples the term is added
    with_term = training_step(sd, batch, torch.optim.SGD(params, lr=0.0), torch.Generator().manual_seed(0),
                              torch.float32, unmix=Unmix(sd, ["<new1>", "<new2>"], weight=1.0)).item()
    assert with_term > losses[0]


class Oracle(torch.nn.Module):
    """A stand-in UNet that knows the clean latents x0, and so outputs the exact eps or v for any x_t."""

    def __init__(self, x0, diffusion, prediction_type):
        super().__init__()
        self.x0, self.diffusion, self.prediction_type = x0, diffusion, prediction_type
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # something for the optimizer to hold

    def forward(self, x_t, t, context):
        sa, s1a = self.diffusion.sqrt_abar(t, x_t)
        noise = (x_t - sa * self.x0) / s1a
        return self.diffusion.target(self.x0, noise, t, self.prediction_type) + 0 * self.anchor


def test_training_step_learns_the_models_prediction_type(monkeypatch):
    """SD v1 predicts eps, a model after `pretrain.py`'s stage 3 v under a zero-terminal-SNR schedule: the loss is zero
    only for the oracle of the model's own prediction type."""
    import nanocustom.training
    x0 = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(nanocustom.training, "images_to_latents", lambda sd, images, generator=None: x0)
    losses = {}
    for model_type, schedule in (("eps", {}), ("v", ZERO_SNR)):
        sd = tiny_model()
        sd.prediction_type, sd.schedule = model_type, schedule
        for oracle_type in ("eps", "v"):
            sd.unet = Oracle(x0, sd.diffusion, oracle_type)
            opt = torch.optim.SGD(sd.unet.parameters(), lr=0.0)
            g = torch.Generator().manual_seed(0)
            losses[model_type, oracle_type] = training_step(sd, a_batch(), opt, g, torch.float32).item()
    assert losses["eps", "eps"] < 1e-8 and losses["v", "v"] < 1e-8
    assert losses["eps", "v"] > 0.1 and losses["v", "eps"] > 0.1


class Recorder(torch.nn.Module):
    """A stand-in UNet with a fixed, wrong output, that keeps the x_t and t it was given."""

    def __init__(self, out):
        super().__init__()
        self.out, self.seen = torch.nn.Parameter(out), []

    def forward(self, x_t, t, context):
        self.seen.append((x_t, t))
        return self.out


def test_a_v_models_loss_is_l_simple_on_eps_that_is_v_error_times_abar(monkeypatch):
    """For a v-predicting model the step's loss is ||eps - eps_hat||^2 (DDPM Eq. 14), which is abar_t times the v
    error, per sample: near T under zero terminal SNR (abar_t -> 0) the v error counts for nothing."""
    import nanocustom.training
    x0 = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(nanocustom.training, "images_to_latents", lambda sd, images, generator=None: x0)
    sd = tiny_model()
    sd.prediction_type, sd.schedule = "v", ZERO_SNR
    sd.unet = Recorder(torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(3)))
    batch = a_batch()
    batch["is_reg"] = torch.zeros(4, dtype=torch.bool)
    loss = training_step(sd, batch, torch.optim.SGD(sd.unet.parameters(), lr=0.0), torch.Generator().manual_seed(0),
                         torch.float32)
    (x_t, t), = sd.unet.seen
    d = sd.diffusion
    sa, s1a = d.sqrt_abar(t, x0)
    noise = (x_t - sa * x0) / s1a
    v_error = (sd.unet.out.detach() - d.target(x0, noise, t, "v")).pow(2).mean((1, 2, 3))
    expected = (sa.flatten() ** 2 * v_error).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(loss.detach(), v_error.mean(), rtol=1e-2)  # not the plain v-loss


def test_unmix_term_is_the_mean_over_cut_mix_samples_alone():
    sd = tiny_model()
    attach(sd, "custom", tokens=["<new1>", "<new2>"])
    unmix = Unmix(sd, ["<new1>", "<new2>"], weight=1.0)
    batch = a_cutmix_batch()
    torch.manual_seed(0)
    term = unmix_term(sd, unmix, batch).item()
    batch["prompts"][2] = "photo of a <new1> square"  # a plain target sample naming a token: M = 1, no error
    torch.manual_seed(0)
    assert unmix_term(sd, unmix, batch).item() == term  # not diluted by it


def test_a_float16_step_with_loss_scaling_trains_the_fp32_tensors():
    sd = tiny_model().to(dtype=torch.float16)  # the frozen weights in half, as train.py keeps them on CUDA
    delta = attach(sd, "custom", tokens=["<new1>"])
    params = [p for group in delta.trainable() for p in group["params"]]
    for p in params:
        p.data = p.data.float()
    before = [p.detach().clone() for p in params]
    opt, scaler = torch.optim.AdamW(params, lr=1e-3), torch.amp.GradScaler("cpu")
    loss = training_step(sd, a_batch(), opt, torch.Generator().manual_seed(0), torch.float16, scaler=scaler)
    assert torch.isfinite(loss) and scaler.get_scale() == 65536.0  # no overflow: the step was taken, not skipped
    assert all(p.dtype == torch.float32 for p in params)
    assert all(not torch.equal(p, b) for p, b in zip(params, before))
