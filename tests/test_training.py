"""training_step's two savings change nothing: gradient checkpointing gives the same gradients, and the feature
cache the same loss as encoding every step."""
import torch

from nanocustom.checkpoint import new_model
from nanocustom.clip import CLIPTextConfig
from nanocustom.personalize import attach
from nanocustom.training import FeatureCache, training_step
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
