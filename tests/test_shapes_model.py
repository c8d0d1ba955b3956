"""The shipped shapes model: it loads through the same loader as SD v1, samples, and is sample.py's default."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nanocustom.checkpoint import DEFAULT_CHECKPOINT, load
from nanocustom.errors import NanocustomError
from nanocustom.pipeline import generate
from nanocustom.pretrain import TEXT_CONFIG, UNET_CONFIG, VAE_CONFIG

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shapes():
    return load()


def test_shipped_model_is_the_default_and_loads_with_its_configs(shapes):
    assert shapes.name == DEFAULT_CHECKPOINT.name
    assert (shapes.unet.config, shapes.vae.config, shapes.text_encoder.config) == (UNET_CONFIG, VAE_CONFIG, TEXT_CONFIG)
    assert shapes.resolution == 64 and shapes.vae.downsampling_factor == 4  # 16x16x4 latents


def test_shipped_weights_stay_under_25_mb():
    total = sum(p.stat().st_size for p in (REPO / "weights").glob("*.safetensors") if p.name.startswith("shapes"))
    assert total <= 25 * 2**20


def test_shapes_model_samples_distinct_images_for_distinct_prompts(shapes):
    images = generate(shapes, ["a red circle on a blue background", "a yellow square on a black background"],
                      steps=10, seed=0, progress=False)
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8
    assert np.abs(images[0].astype(int) - images[1].astype(int)).mean() > 10


def test_given_latents_are_moved_to_the_models_dtype():
    """CoSINE hands generate() its own z_T in float32; a bf16 model samples from it as from its own noise."""
    sd = load(dtype=torch.bfloat16)
    x_T = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))  # initial_noise's draw for seed 0
    given = generate(sd, ["a red circle"], steps=3, seed=0, latents=x_T, progress=False)
    assert np.array_equal(given, generate(sd, ["a red circle"], steps=3, seed=0, progress=False))


def test_a_zero_snr_schedule_with_eps_prediction_is_refused(shapes):
    shapes.prediction_type = "eps"  # at abar_T = 0, eps says nothing about x0: every sample would be inf
    try:
        with pytest.raises(NanocustomError, match="needs v-prediction"):
            generate(shapes, ["a red circle"], steps=3, progress=False)
    finally:
        shapes.prediction_type = "v"


def test_sample_py_uses_the_shapes_model_by_default(tmp_path):
    result = subprocess.run([sys.executable, "sample.py", "--prompt", "a green star", "--n", "2", "--steps", "5",
                             "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "shapes model" in result.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["000.png", "001.png", "grid.png"]
    assert Image.open(tmp_path / "out" / "000.png").size == (64, 64)


def test_the_caption_decides_the_background(shapes):
    """The same starting noise under two background words gives two backgrounds: the zero terminal SNR of
    pretrain.train_diffusion at work (under SD v1's schedule the noise decided, and both prompts drew the same one)."""
    from nanocustom import toy
    seen = {}
    for background in ("blue", "yellow"):
        images = generate(shapes, [f"a red circle on a {background} background"] * 8, steps=20, seed=0,
                          progress=False)
        seen[background] = [scene.background for scene in toy.describe(images)]
    assert sum(b == "blue" for b in seen["blue"]) >= 6 and sum(b == "yellow" for b in seen["yellow"]) >= 6, seen


def test_pretraining_recipe_runs_stage_two_from_a_trained_vae(tmp_path):
    out = tmp_path / "tiny.safetensors"
    result = subprocess.run([sys.executable, "-m", "nanocustom.pretrain", "--vae-from", str(DEFAULT_CHECKPOINT),
                             "--text-steps", "2", "--unet-steps", "2", "--scenes", "64", "--finish-steps", "0",
                             "--batch", "8", "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "encoded 64 scenes" in result.stdout
    model = load(out)
    assert model.latent_scale == pytest.approx(load().latent_scale, rel=1e-3)  # stage 1 taken, not retrained
    assert model.unet.config == UNET_CONFIG
