"""Pieces of the pretraining recipe (nanocustom/pretrain.py) that a short run cannot show."""
import torch

from nanocustom.pretrain import LossBalance


def test_loss_balance_gives_every_noise_level_the_same_share_of_the_loss():
    """Losses a hundred times larger near T than near 0 (as under zero terminal SNR) weigh the same once
    balanced: each bin's weighted loss equals the geometric mean of the bins' running means."""
    T, bins = 1000, 20
    balance = LossBalance(T, bins=bins, decay=0.9)
    generator = torch.Generator().manual_seed(0)
    level = lambda t: 0.01 * 100 ** (t.double() / T)  # a smooth 100x rise from t = 0 to T
    for _ in range(300):
        t = torch.randint(0, T, (64,), generator=generator)
        loss = level(t) * (1 + 0.1 * torch.randn(64, generator=generator, dtype=torch.float64))
        weights = balance(loss, t)
    t = torch.arange(T)
    weighted = (balance(level(t), t) * level(t)).view(bins, -1).mean(1)
    assert weighted.max() / weighted.min() < 1.3, weighted  # unweighted, the ratio is about 100
    assert weights.dtype == loss.dtype and not weights.requires_grad


def test_loss_balance_keeps_the_loss_scale_and_starts_from_the_first_loss_it_sees():
    balance = LossBalance(1000, bins=4)
    t = torch.tensor([0, 300, 600, 900])  # one sample in each bin
    loss = torch.tensor([1.0, 2.0, 4.0, 8.0])
    weights = balance(loss, t)
    assert torch.allclose(weights * loss, torch.full((4,), 64.0 ** 0.25))  # the geometric mean of 1, 2, 4, 8
    unseen = LossBalance(1000, bins=4)
    assert torch.allclose(unseen(torch.tensor([3.0]), torch.tensor([10])), torch.tensor([1.0]))


def test_diagnose_counts_each_wrong_attribute_of_the_quick_protocol():
    from nanocustom.checkpoint import load
    from nanocustom.pretrain import diagnose
    report = diagnose(load(), n_single=2, n_double=1, per_prompt=2, steps=2, log=lambda _: None)
    assert report["single"]["images"] == 4 and report["two-object"]["images"] == 2
    for part in report.values():
        right = round(part["adherence"] * part["images"])
        assert right + max(part["wrong"].values()) <= part["images"]  # an image with a wrong attribute is not right


def test_init_from_continues_a_trained_unet_and_text_encoder_under_zero_snr(tmp_path):
    """--init-from takes all three parts of a checkpoint; one warm-up step of stage 3 at lr 3e-4 / 200 barely
    moves them, and the result carries the schedule and prediction type it was trained under."""
    from nanocustom.checkpoint import DEFAULT_CHECKPOINT, load
    from nanocustom.pretrain import ZERO_SNR, pretrain
    out = tmp_path / "continued.safetensors"
    pretrain(out, unet_steps=0, finish_steps=1, batch=4, finish_scenes=16, init_from=DEFAULT_CHECKPOINT, threads=1)
    source, continued = load(DEFAULT_CHECKPOINT), load(out)
    assert (continued.prediction_type, continued.schedule) == ("v", ZERO_SNR)
    assert continued.latent_scale == source.latent_scale
    for part in ("unet", "text_encoder", "vae"):
        a, b = getattr(source, part).state_dict(), getattr(continued, part).state_dict()
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 2e-2, part  # the trained weights, not a new init
    assert continued.metadata["recipe"]["vae_steps"] == 0  # stage 1 was not run here


def test_the_recipe_is_one_command_of_three_stages(tmp_path):
    """`python -m nanocustom.pretrain` with every stage cut to two steps: the VAE, stage 2 under SD v1's schedule
    (eps), stage 3 under zero terminal SNR (v), one file at the end whose metadata says so."""
    import subprocess
    import sys
    from pathlib import Path
    from nanocustom.checkpoint import load
    from nanocustom.pretrain import UNET_CONFIG, ZERO_SNR
    out = tmp_path / "tiny.safetensors"
    result = subprocess.run([sys.executable, "-m", "nanocustom.pretrain", "--vae-steps", "2", "--unet-steps", "2",
                             "--finish-steps", "2", "--scenes", "16", "--finish-scenes", "8", "--batch", "4",
                             "--threads", "1", "--out", str(out)],
                            cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    log = result.stdout
    assert log.index("vae  step") < log.index("encoded 16 scenes") < log.index("unet step") \
        < log.index("encoded 8 scenes") < log.index("finish step") < log.index("wrote"), log
    model = load(out)
    assert (model.prediction_type, model.schedule, model.unet.config) == ("v", ZERO_SNR, UNET_CONFIG)
    recipe = model.metadata["recipe"]
    assert (recipe["vae_steps"], recipe["unet_steps"], recipe["finish_steps"]) == (2, 2, 2)


def test_pairs_sets_the_share_of_two_object_scenes():
    import numpy as np
    from nanocustom import toy
    rng = np.random.default_rng(0)
    counts = [len(toy.random_scene(rng, pair_prob=p).objects) for p in (0.0, 1.0) for _ in range(50)]
    assert counts == [1] * 50 + [2] * 50
