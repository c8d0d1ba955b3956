"""A whole text-to-image run of `generate` equals diffusers' StableDiffusionPipeline on the same weights.

A random model is saved with `save()`; the file is loaded by us and, through diffusers' own single-file conversion
functions (tests/test_parity_models.py, whose helpers we reuse), assembled into a StableDiffusionPipeline with SD v1's
scheduler settings. Both draw x_T and then each step's fresh noise from one `torch.Generator().manual_seed(seed)`,
so DDPM and DDIM with eta > 0 are compared as well as deterministic DDIM.
"""
import dataclasses

import numpy as np
import pytest
import torch
import transformers
from diffusers import AutoencoderKL as RefAutoencoderKL
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor

import nanocustom.pipeline
from helpers import write_clip_tokenizer_files
from nanocustom.checkpoint import load, new_model, read_state_dict, save
from nanocustom.clip import CLIPTextConfig
from nanocustom.pipeline import generate
from nanocustom.pretrain import ZERO_SNR
from nanocustom.unet import UNetConfig
from nanocustom.vae import VAEConfig
from test_parity_models import convert_clip, convert_unet, convert_vae, hf_clip_config, randomize_

# Two channels per UNet GroupNorm group: with one, the norm after each ResBlock's timestep shift would erase it and the
# UNet would not depend on t at all.
TINY = dict(unet=UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                            num_heads=2, context_dim=32),
            vae=VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1),
            text_encoder=CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2))
LATENT_SCALE = 0.5  # not SD v1's 0.18215: a scale hard-coded on either side would show
SIZE = 32  # pixels; latents are 16 x 16
PROMPTS = ["a red circle on a blue background", "two small green squares"]
# v1-inference.yaml's schedule, as StableDiffusionPipeline configures DDIM for SD v1.5
SD_V1_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                       clip_sample=False, set_alpha_to_one=False, steps_offset=1)
# that of `pretrain.py`'s stage 3: Lin et al. 2024's zero terminal SNR and trailing spacing, with v-prediction
ZERO_SNR_SCHEDULER = dict(SD_V1_SCHEDULER, rescale_betas_zero_snr=True, timestep_spacing="trailing", steps_offset=0,
                          prediction_type="v_prediction")
IMAGE_ATOL = 1e-4  # images in [0, 1], float32


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(ours, diffusers' pipeline), both built from one saved file."""
    torch.manual_seed(0)
    sd = new_model(**TINY, resolution=SIZE, latent_scale=LATENT_SCALE)
    for seed, module in enumerate((sd.unet, sd.vae, sd.text_encoder)):
        randomize_(module, seed)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save(sd, path)
    ours = load(path)
    checkpoint, _ = read_state_dict(path)

    unet_config, unet_weights = convert_unet(checkpoint, TINY["unet"])
    unet = UNet2DConditionModel(**unet_config).eval()
    unet.load_state_dict(unet_weights, strict=True)
    vae_config, vae_weights = convert_vae(checkpoint, TINY["vae"])
    vae = RefAutoencoderKL(**{**vae_config, "scaling_factor": LATENT_SCALE}).eval()
    vae.load_state_dict(vae_weights, strict=True)
    text_encoder = transformers.CLIPTextModel(hf_clip_config(TINY["text_encoder"])).eval()
    text_encoder.load_state_dict(convert_clip(checkpoint, text_encoder), strict=True)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(  # 77: as openai/clip-vit-large-patch14's config says
        write_clip_tokenizer_files(tmp_path_factory.mktemp("clip_tokenizer")), model_max_length=77)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SD_V1_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return ours, pipe


def run_ours(sd, monkeypatch, **kwargs):
    """generate(...) -> (final latents, float images in [0, 1], uint8 images), the floats caught on their way to
    the uint8 rounding."""
    caught = {}

    def latents_to_images(sd, latents):
        caught["latents"] = latents.clone()
        caught["images"] = decode(sd, latents)
        return caught["images"]

    decode = nanocustom.pipeline.latents_to_images
    monkeypatch.setattr(nanocustom.pipeline, "latents_to_images", latents_to_images)
    uint8 = generate(sd, PROMPTS, progress=False, height=SIZE, width=SIZE, **kwargs)
    return caught["latents"], (caught["images"].clamp(-1, 1) + 1) / 2, uint8


def run_diffusers(pipe, sampler, seed, latents, scheduler_config=SD_V1_SCHEDULER, **kwargs):
    """pipe(...) -> (final latents, float images in [0, 1], uint8 images as diffusers' output_type="pil" rounds them)."""
    scheduler_class = DDIMScheduler if sampler == "ddim" else DDPMScheduler
    pipe.scheduler = scheduler_class.from_config(scheduler_config)  # how diffusers' docs swap samplers
    caught = {}

    def on_step_end(pipe, i, t, tensors):
        caught["latents"] = tensors["latents"].clone()
        return tensors

    images = pipe(PROMPTS, height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(seed), latents=latents,
                  output_type="pt", callback_on_step_end=on_step_end, **kwargs).images
    uint8 = np.stack([np.asarray(image) for image in
                      VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(images))])
    return caught["latents"], images, uint8


CASES = {  # name: (sampler, eta, guidance, negative prompt, steps, start from given latents, schedule)
    "ddim_eta0_cfg_negative_prompt": ("ddim", 0.0, 7.5, "blurry, low quality", 10, False, "sd_v1"),
    "ddim_eta0.5": ("ddim", 0.5, 7.5, "", 7, False, "sd_v1"),  # 7 steps: 1000 // 7 leaves a remainder
    "ddpm": ("ddpm", 0.0, 7.5, "", 8, False, "sd_v1"),
    "ddim_no_cfg_at_guidance_1": ("ddim", 0.0, 1.0, "", 5, False, "sd_v1"),
    "ddpm_from_given_latents": ("ddpm", 0.0, 3.0, "", 6, True, "sd_v1"),  # step noise still comes from the seed
    "ddim_zero_snr_v_prediction": ("ddim", 0.0, 7.5, "", 7, False, "zero_snr"),  # pretrain.py's stage 3
    "ddpm_zero_snr_v_prediction": ("ddpm", 0.0, 7.5, "", 6, False, "zero_snr"),
}


@pytest.mark.parametrize("case", CASES)
def test_generate_equals_diffusers_stable_diffusion_pipeline(models, monkeypatch, case):
    ours, pipe = models
    sampler, eta, guidance, negative_prompt, steps, given_latents, schedule = CASES[case]
    scheduler_config = SD_V1_SCHEDULER
    if schedule == "zero_snr":
        ours = dataclasses.replace(ours, prediction_type="v", schedule=ZERO_SNR)
        scheduler_config = ZERO_SNR_SCHEDULER
    seed = 1234
    latents = None
    if given_latents:
        latents = torch.randn(len(PROMPTS), 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(7))

    z, images, uint8 = run_ours(ours, monkeypatch, negative_prompt=negative_prompt, steps=steps, sampler=sampler,
                                eta=eta, guidance=guidance, seed=seed, latents=latents)
    with torch.no_grad():
        ref_z, ref_images, ref_uint8 = run_diffusers(
            pipe, sampler, seed, latents, scheduler_config, negative_prompt=[negative_prompt] * len(PROMPTS),
            num_inference_steps=steps, eta=eta, guidance_scale=guidance)

    latent_err = ((z - ref_z).abs().max() / ref_z.abs().max()).item()
    image_err = (images - ref_images).abs().max().item()
    unsaturated = ((ref_images > 0.02) & (ref_images < 0.98)).float().mean().item()
    print(f"{case}: latents max rel err {latent_err:.2e}, images max abs err {image_err:.2e}, "
          f"uint8 levels off {np.abs(uint8.astype(int) - ref_uint8).max()}, {unsaturated:.0%} of values unsaturated")
    assert latent_err < 1e-4
    assert image_err < IMAGE_ATOL
    assert uint8.shape == ref_uint8.shape == (len(PROMPTS), SIZE, SIZE, 3)
    assert np.abs(uint8.astype(int) - ref_uint8).max() <= 1
    # not a vacuous match: the images are mostly unsaturated, and the two prompts give different images
    assert unsaturated > 0.5
    assert (ref_images[0] - ref_images[1]).abs().max() > 0.05
