"""python -m nanocustom.interop on the shipped shapes model, as a user runs it: a Custom Diffusion delta to
diffusers' files and back, a residual delta to a LoRA that diffusers loads, any delta folded into a checkpoint
that samples as the delta does; bad input is one line and writes nothing."""
import os
import subprocess
import sys

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from nanocustom.checkpoint import load, save, to_original_layout
from nanocustom.errors import NanocustomError
from nanocustom.interop import main
from nanocustom.personalize import attach, load_delta, read_delta_metadata, save_delta
from test_interop import diffusers_unet, perturb_
from test_parity_models import rel_err

TOL = 1e-4


@pytest.fixture(scope="module")
def deltas(tmp_path_factory):
    """A trained-looking delta of each method on the shapes model."""
    folder = tmp_path_factory.mktemp("deltas")
    for method in ("custom", "svdiff", "residual"):
        delta = attach(load(), method, tokens=["<new1>"])
        perturb_(delta)
        save_delta(delta, folder / f"{method}.safetensors")
    return folder


def unet_inputs(sd, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = sd.tokenizer.encode(["photo of a <new1> square", ""])
    with torch.no_grad():
        context = sd.text_encoder(ids)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 900]), context


def test_custom_diffusion_to_diffusers_and_back_is_the_same_delta(deltas, tmp_path):
    main(["to-diffusers", str(deltas / "custom.safetensors"), "--out", str(tmp_path / "exported")])
    assert sorted(f.name for f in (tmp_path / "exported").iterdir()) == [
        "<new1>.safetensors", "pytorch_custom_diffusion_weights.safetensors"]
    main(["from-diffusers", str(tmp_path / "exported"), "--out", str(tmp_path / "back.safetensors")])
    original, back = load_file(deltas / "custom.safetensors"), load_file(tmp_path / "back.safetensors")
    assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)
    before, after = read_delta_metadata(deltas / "custom.safetensors"), read_delta_metadata(tmp_path / "back.safetensors")
    assert after["tokens"] == ["<new1>"] and after["base_fingerprint"] == before["base_fingerprint"]


def test_a_residual_delta_exported_as_a_lora_loads_in_diffusers_to_our_outputs(deltas, tmp_path):
    main(["to-diffusers", str(deltas / "residual.safetensors"), "--out", str(tmp_path)])
    sd = load()
    ref = diffusers_unet(to_original_layout(sd), sd.unet.config)
    state_dict, alphas = StableDiffusionPipeline.lora_state_dict(str(tmp_path / "pytorch_lora_weights.safetensors"))
    StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, unet=ref, adapter_name="concept")
    load_delta(sd, deltas / "residual.safetensors").fold()
    x, t, context = unet_inputs(sd)
    with torch.no_grad():
        ours, expected = sd.unet(x, t, context), ref(x, t, encoder_hidden_states=context).sample
    assert rel_err(ours, expected) < TOL


@pytest.mark.parametrize("method", ["custom", "svdiff", "residual"])
def test_a_folded_checkpoint_loads_and_computes_as_the_base_with_its_delta(deltas, tmp_path, method):
    main(["fold", str(deltas / f"{method}.safetensors"), "--out", str(tmp_path / "full.safetensors")])
    folded, sd = load(tmp_path / "full.safetensors"), load()
    load_delta(sd, deltas / f"{method}.safetensors")
    assert folded.tokenizer.added_tokens == ["<new1>"]
    x, t, context = unet_inputs(sd)
    with torch.no_grad():
        assert rel_err(folded.text_encoder(sd.tokenizer.encode(["a <new1> square"])),
                       sd.text_encoder(sd.tokenizer.encode(["a <new1> square"]))) < TOL
        assert rel_err(folded.unet(x, t, context), sd.unet(x, t, context)) < TOL


def test_fp16_fold_halves_the_file(deltas, tmp_path):
    main(["fold", str(deltas / "residual.safetensors"), "--out", str(tmp_path / "fp32.safetensors")])
    main(["fold", str(deltas / "residual.safetensors"), "--fp16", "--out", str(tmp_path / "fp16.safetensors")])
    assert all(v.dtype == torch.float16 for v in load_file(tmp_path / "fp16.safetensors").values())
    ratio = (tmp_path / "fp16.safetensors").stat().st_size / (tmp_path / "fp32.safetensors").stat().st_size
    assert 0.49 < ratio < 0.51


@pytest.mark.parametrize("argv, message", [
    (["to-diffusers", "{d}/svdiff.safetensors", "--out", "{o}/x"], "diffusers has no format for SVDiff"),
    (["from-diffusers", "{o}/missing", "--out", "{o}/d.safetensors"], "does not exist"),
    (["from-diffusers", "{d}", "--out", "{o}/d.safetensors"], "holds no pytorch_custom_diffusion_weights"),
    (["from-diffusers", "{d}/residual.safetensors", "--out", "{o}/d.safetensors"], "not a Custom Diffusion"),
    (["fold", "{d}/custom.safetensors", "--out", "{o}/missing/f.safetensors"], "is not a writable directory"),
    (["fold", "{d}/custom.safetensors", "--out", "{o}/f.ckpt"], "must end in .safetensors"),
    (["to-diffusers", "{d}/custom.safetensors", "--out", "{d}/custom.safetensors"], "is a file, not a directory"),
    (["fold", "{o}/missing.safetensors", "--out", "{o}/f.safetensors"], "delta not found"),
    (["to-diffusers", "{d}/custom.safetensors", "--ckpt", "{o}/base.safetensors", "--out", "{o}/x"],
     "was made for base model"),
], ids=["svdiff_to_diffusers", "source_missing", "folder_without_weights", "not_custom_diffusion_weights",
        "out_dir_missing", "out_not_safetensors", "out_is_a_file", "delta_missing", "delta_for_another_base"])
def test_bad_input_is_one_error_and_writes_nothing(deltas, tmp_path, argv, message):
    if "{o}/base.safetensors" in argv:
        sd = load()
        with torch.no_grad():
            sd.unet.out[2].bias += 1  # another base model of the same shapes
        save(sd, tmp_path / "base.safetensors")
    before = sorted(tmp_path.iterdir())
    with pytest.raises(NanocustomError, match=message):
        main([a.format(d=deltas, o=tmp_path) for a in argv])
    assert sorted(tmp_path.iterdir()) == before


def test_the_command_exits_2_with_one_error_line(deltas, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "nanocustom.interop", "to-diffusers",
                             str(deltas / "svdiff.safetensors"), "--out", str(tmp_path / "x")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.startswith("error: diffusers has no format for SVDiff")
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
