"""Loading original-layout checkpoints: round trips, the named ignore list, and one-line refusals."""
import argparse
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from nanocustom.checkpoint import (PREFIXES, CheckpointError, fingerprint, load, new_model, read_state_dict, save,
                                   save_atomic, to_original_layout)
from nanocustom.clip import CLIPTextConfig
from nanocustom.pretrain import ZERO_SNR
from nanocustom.unet import UNetConfig
from nanocustom.vae import VAEConfig

TINY = dict(unet=UNetConfig(model_channels=32, channel_mult=(1, 2), attention_resolutions=(1, 2), num_heads=2,
                            num_res_blocks=1, context_dim=32),
            vae=VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1),
            text_encoder=CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    sd = new_model(**TINY, resolution=32, latent_scale=0.5, prediction_type="v",
                   schedule=ZERO_SNR)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save(sd, path)
    return sd, path


def outputs(sd):
    torch.manual_seed(1)
    ids = sd.tokenizer.encode(["a red circle"])
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
    with torch.no_grad():
        context = sd.text_encoder(ids)
        return context, sd.unet(x, t, context), sd.vae.decode(x), sd.vae.encode(torch.randn(1, 3, 32, 32))[0]


def test_saved_model_loads_with_its_configs_and_gives_the_same_outputs(tiny):
    sd, path = tiny
    loaded = load(path)
    assert (loaded.resolution, loaded.latent_scale, loaded.prediction_type) == (32, 0.5, "v")
    assert loaded.diffusion.alphas_cumprod[-1] == 0 and loaded.diffusion.timesteps(50)[0] == 999  # its schedule
    for a, b in zip(outputs(sd), outputs(loaded)):  # equal weights; kernels may sum in another order
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_checkpoint_keys_are_the_original_prefixes_plus_module_names(tiny):
    sd, path = tiny
    keys, _ = read_state_dict(path)
    assert PREFIXES["unet"] + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in keys
    assert PREFIXES["vae"] + "decoder.up.1.upsample.conv.weight" in keys
    assert PREFIXES["text_encoder"] + "encoder.layers.1.mlp.fc2.bias" in keys
    assert set(keys) == set(to_original_layout(sd))


def test_ignore_list_skips_schedule_buffers_ema_and_position_ids(tiny, tmp_path):
    sd, path = tiny
    tensors, metadata = read_state_dict(path)
    tensors.update({"betas": torch.zeros(1000), "alphas_cumprod": torch.zeros(1000),
                    "model_ema.decay": torch.tensor(0.999), "model_ema.diffusion_modelinput_blocks00weight": torch.zeros(1),
                    PREFIXES["text_encoder"] + "embeddings.position_ids": torch.arange(77)[None],
                    PREFIXES["vae"] + "loss.logvar": torch.zeros(())})  # a VAE's training loss, in VAE-swapped files
    save_file(tensors, tmp_path / "with_extras.safetensors", metadata=metadata)
    with pytest.warns(UserWarning, match="holds an EMA copy of the UNet too; loading the other"):
        loaded = load(tmp_path / "with_extras.safetensors")
    assert loaded.fingerprint == load(path).fingerprint  # the same weights, the same id: deltas still apply
    for a, b in zip(outputs(sd), outputs(loaded)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_the_older_clip_layout_without_text_model_loads_as_the_same_model(tiny, tmp_path):
    """Some SD v1 files keep CLIP's embeddings, encoder and final norm under cond_stage_model.transformer.* (older
    transformers); diffusers and the web UIs read them as the same weights."""
    sd, path = tiny
    tensors, metadata = read_state_dict(path)
    old = {k.replace("transformer.text_model.", "transformer."): v for k, v in tensors.items()}
    assert old.keys() != tensors.keys()
    save_file(old, tmp_path / "old_layout.safetensors", metadata=metadata)
    for a, b in zip(outputs(sd), outputs(load(tmp_path / "old_layout.safetensors"))):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_metadata_that_is_not_json_is_one_line(tiny, tmp_path):
    tensors, _ = read_state_dict(tiny[1])
    save_file(tensors, tmp_path / "bad_metadata.safetensors", metadata={"nanocustom": "{not json"})
    with pytest.raises(CheckpointError, match="its nanocustom metadata is not JSON") as refused:
        load(tmp_path / "bad_metadata.safetensors")
    assert "\n" not in str(refused.value)


def test_save_refuses_a_model_with_a_delta_attached(tiny, tmp_path):
    from nanocustom.personalize import attach
    sd = load(tiny[1])
    delta = attach(sd, "custom", tokens=["<new1>"])
    with pytest.raises(CheckpointError, match="fold\\(\\) or detach\\(\\) it first"):
        save(sd, tmp_path / "attached.safetensors")
    assert not (tmp_path / "attached.safetensors").exists()
    delta.fold()
    save(sd, tmp_path / "folded.safetensors")
    assert load(tmp_path / "folded.safetensors").tokenizer.added_tokens == ["<new1>"]


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop(PREFIXES["unet"] + "out.2.weight"), "1 missing (e.g. out.2.weight)"),
    (lambda t: t.update({PREFIXES["vae"] + "encoder.extra.weight": torch.zeros(1)}), "1 unexpected"),
    (lambda t: t.update({PREFIXES["unet"] + "out.2.bias": torch.zeros(5)}), "1 mis-shaped (e.g. out.2.bias (5,)"),
    (lambda t: t.update({"something.else": torch.zeros(1)}), "outside the three SD v1 models"),
])
def test_every_missing_unexpected_or_misshaped_key_is_reported(tiny, tmp_path, change, message):
    tensors, metadata = read_state_dict(tiny[1])
    change(tensors)
    save_file(tensors, tmp_path / "bad.safetensors", metadata=metadata)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load(tmp_path / "bad.safetensors")


def test_other_model_families_are_named(tmp_path):
    sdxl = {"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(1),
            "model.diffusion_model.out.2.weight": torch.zeros(1)}
    sd2 = {"cond_stage_model.model.ln_final.weight": torch.zeros(1),
           "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 1024)}
    inpainting = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 9, 3, 3)}
    for name, tensors, family in (("sdxl", sdxl, "SDXL"), ("sd2", sd2, "SD 2.x"), ("inpainting", inpainting,
                                                                                   "an inpainting \\(9\\)")):
        save_file(tensors, tmp_path / f"{name}.safetensors")
        with pytest.raises(CheckpointError, match=family):
            load(tmp_path / f"{name}.safetensors")
    save_file({"weight": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="not a Stable Diffusion v1 checkpoint"):
        load(tmp_path / "other.safetensors")


def test_truncated_safetensors_is_refused_in_one_line(tiny, tmp_path):
    data = tiny[1].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or not a checkpoint") as e:
        load(tmp_path / "cut.safetensors")
    assert "\n" not in str(e.value)


def test_ckpt_is_read_without_unpickling_code(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(tmp_path / "evil.ckpt", "wb") as f:
        pickle.dump({"state_dict": {"w": Exploit()}}, f)
    with pytest.raises(CheckpointError, match="truncated or not a checkpoint|refusing to load"):
        load(tmp_path / "evil.ckpt")
    assert not marker.exists()

    torch.save({"state_dict": {"a": torch.ones(2)}, "global_step": 10}, tmp_path / "good.ckpt")
    tensors, _ = read_state_dict(tmp_path / "good.ckpt")
    assert torch.equal(tensors["a"], torch.ones(2))


def test_ckpt_whose_pickle_holds_objects_names_the_problem(tmp_path):
    hyper_parameters = argparse.Namespace(lr=1e-4)  # as old PyTorch Lightning files hold
    torch.save({"state_dict": {"a": torch.ones(2)}, "hparams": hyper_parameters}, tmp_path / "objects.ckpt")
    with pytest.raises(CheckpointError, match="refusing to load objects.ckpt"):
        read_state_dict(tmp_path / "objects.ckpt")


def test_missing_file_and_unreachable_hub_give_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load(tmp_path / "nope.safetensors")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="could not download v1-5-pruned-emaonly.safetensors"):
        load("someone/stable-diffusion-v1-5/v1-5-pruned-emaonly.safetensors")


def test_fingerprint_is_stable_across_fp32_and_fp16_and_changes_with_weights(tiny):
    tensors = to_original_layout(tiny[0])
    assert fingerprint(tensors) == fingerprint({k: v.half() for k, v in tensors.items()})
    key = PREFIXES["unet"] + "input_blocks.0.0.weight"
    assert fingerprint(tensors) != fingerprint({**tensors, key: tensors[key] + 1})


def test_save_refuses_a_missing_directory_and_leaves_no_partial_file(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        save(tiny[0], tmp_path / "missing" / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_an_atomic_write_gets_the_usual_permissions_not_the_temporary_files(tmp_path):
    umask = os.umask(0o022)
    try:
        save_atomic({"x": torch.zeros(2)}, tmp_path / "x.safetensors")
    finally:
        os.umask(umask)
    assert (tmp_path / "x.safetensors").stat().st_mode & 0o777 == 0o644
    assert [f.name for f in tmp_path.iterdir()] == ["x.safetensors"]
