"""sample.py end to end: a run writes its PNGs; every bad input is one `error:` line on stderr, exit code 2, no file.

Each Python process pays for `import torch` (3 s of CPU, more on a loaded machine), so the bad inputs all run in
one process: a driver that runs sample.py as `__main__` once per argument list, as `python sample.py ...` would,
and reports the exit code and stderr of each. The good run is a plain `python sample.py ...`.
"""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from nanocustom.checkpoint import load, new_model, save
from nanocustom.clip import CLIPTextConfig
from nanocustom.personalize import attach, save_delta
from nanocustom.unet import UNetConfig
from nanocustom.vae import VAEConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 300  # seconds per process; a good run takes ~10 s on a busy 2-core machine
SIZE_MULTIPLE = 8  # the VAE halves twice (ch_mult (1, 2, 2)), the UNet once more (channel_mult (1, 2))
TINY = dict(unet=UNetConfig(model_channels=32, channel_mult=(1, 2), attention_resolutions=(1, 2), num_heads=2,
                            num_res_blocks=1, context_dim=32),
            vae=VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1),
            text_encoder=CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2))
LONG_PROMPT = "a red circle on a blue background, " * 12  # 96 tokens: CLIP keeps 75
FAST = ["--steps", "2", "--height", "32", "--width", "32"]


def run(args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save(new_model(**TINY, resolution=32), path)
    return path


@pytest.fixture(scope="module")
def good_run(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("good") / "out"  # sample.py creates it: its parent exists
    result = run(["sample.py", "--ckpt", str(ckpt), "--prompt", LONG_PROMPT, "--n", "3", "--steps", "2",
                  "--width", "48", "--out", str(out)])  # height: the model's native 32
    return result, out


def test_run_writes_n_pngs_of_the_asked_size_and_a_grid(good_run):
    result, out = good_run
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["000.png", "001.png", "002.png", "grid.png"]
    for i in range(3):
        image = np.asarray(Image.open(out / f"{i:03d}.png"))
        assert image.shape == (32, 48, 3) and image.dtype == np.uint8
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (2 * 32, 2 * 48, 3)  # 3 images: 2 columns, 2 rows
    assert np.array_equal(grid[32:, :48], np.asarray(Image.open(out / "002.png")))


def test_prompt_over_77_tokens_warns_of_the_cut_and_is_not_an_error(good_run):
    result, _ = good_run
    assert result.returncode == 0
    assert "21 were cut" in result.stderr  # 96 tokens, 75 kept
    assert "error" not in result.stderr.lower()
    assert result.stderr.startswith("warning: ") and "UserWarning" not in result.stderr  # a script's one-line form


DRIVER = """
import contextlib, io, json, runpy, sys, traceback
results = []
for argv in json.loads(sys.argv[1]):
    sys.argv = ["sample.py", *argv]
    stderr, stdout = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
        try:
            runpy.run_path("sample.py", run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code or 0
        except BaseException:  # what the interpreter does with an uncaught exception
            traceback.print_exc()
            code = 1
    results.append([code, stderr.getvalue(), stdout.getvalue()])
print(json.dumps(results))
"""


# name: (arguments, text the error line must hold); {tmp} is the test's directory. Every run gets --out {tmp}/out_name
# unless it sets its own, and the default arguments of FAST before its own (argparse: the last flag wins).
BAD_INPUTS = {
    "steps_0": (["--steps", "0"], "--steps 0"),
    "steps_negative": (["--steps", "-1"], "--steps -1"),
    "steps_1000": (["--steps", "1000"], "steps=1000"),
    "guidance_negative": (["--guidance", "-1"], "--guidance -1"),
    "eta_negative": (["--eta", "-1"], "--eta -1"),
    "n_0": (["--n", "0"], "--n 0"),
    "height_not_a_multiple_of_the_vae_factor": (["--height", "30"], f"multiple of {SIZE_MULTIPLE}"),
    "height_the_unet_cannot_halve": (["--height", "36"], f"multiple of {SIZE_MULTIPLE}; use e.g. 40"),
    "eta_above_1": (["--eta", "5"], "--eta 5.0 is out of range"),
    "guidance_inf": (["--guidance", "inf"], "--guidance inf is out of range"),
    "device_unknown": (["--device", "foo"], "--device 'foo' is not a device torch knows"),
    "device_cuda_99": (["--device", "cuda:99"], "--device cuda:99: "),
    "save_delta_then_an_unknown_token": (["--delta", "{tmp}/custom.safetensors", "--save-delta", "{tmp}/nope.safetensors",
                                          "--prompt", "photo of a <new9> square"], "no loaded delta provides"),
    "save_delta_then_a_bad_size": (["--delta", "{tmp}/custom.safetensors", "--save-delta", "{tmp}/nope.safetensors",
                                    "--height", "36"], "--height 36"),
    "ckpt_missing": (["--ckpt", "{tmp}/nope.safetensors"], "checkpoint not found"),
    "ckpt_truncated": (["--ckpt", "{tmp}/cut.safetensors"], "truncated"),
    "ckpt_sdxl": (["--ckpt", "{tmp}/sdxl.safetensors"], "SDXL"),
    "ckpt_sd2": (["--ckpt", "{tmp}/sd2.safetensors"], "SD 2.x"),
    "ckpt_pickle_runs_code": (["--ckpt", "{tmp}/evil.ckpt"], "refusing to load evil.ckpt: its pickle holds code"),
    "prompt_names_an_unknown_token": (["--prompt", "photo of a <new1> square"], "no loaded delta provides"),
    "delta_for_another_base": (["--delta", "{tmp}/other_base.safetensors"], "or --force to apply it anyway"),
    "two_deltas_claim_one_token": (["--delta", "{tmp}/custom.safetensors", "--delta", "{tmp}/custom_again.safetensors"],
                                   "same modifier token twice"),
    "compress_0": (["--delta", "{tmp}/custom.safetensors", "--compress", "0"], "--compress 0.0 is out of range"),
    "compress_1.5": (["--delta", "{tmp}/custom.safetensors", "--compress", "1.5"], "--compress 1.5 is out of range"),
    "compress_nan": (["--delta", "{tmp}/custom.safetensors", "--compress", "nan"], "--compress nan is out of range"),
    "compress_without_delta": (["--compress", "0.5"], "--compress needs a delta"),
    "compress_residual": (["--delta", "{tmp}/residual.safetensors", "--compress", "0.5", "--save-delta",
                           "{tmp}/nope.safetensors"], "low-rank already"),
    "base_uncond_without_delta": (["--base-uncond"], "--base-uncond needs a personalized-residuals delta"),
    "base_uncond_custom": (["--delta", "{tmp}/custom.safetensors", "--base-uncond"],
                           "--base-uncond needs a personalized-residuals delta, got custom"),
    "lag_and_base_uncond_custom": (["--delta", "{tmp}/custom.safetensors", "--lag", "--base-uncond"],
                                   "--lag and --base-uncond need a personalized-residuals delta, got custom"),
    "lag_prompt_without_its_token": (["--delta", "{tmp}/residual.safetensors", "--lag", "--prompt",
                                      "photo of a square"], "--lag: 'photo of a square' names no modifier token"),
    "lag_class_without_lag": (["--lag-class", "red square"],
                              "--lag-class 'red square' names the class for LAG; add --lag"),
    "lag_class_not_after_its_token": (["--delta", "{tmp}/residual.safetensors", "--lag", "--lag-class", "red square",
                                       "--prompt", "photo of a <new1> square"], "does not follow the modifier token"),
    "save_delta_in_a_missing_directory": (["--delta", "{tmp}/custom.safetensors", "--save-delta",
                                           "{tmp}/missing/d.safetensors"], "writable, existing directory"),
    "out_parent_missing": (["--out", "{tmp}/missing/out"], "is not an existing directory"),
    # An unwritable --out directory (chmod 555) cannot be tested: the tests run as root, who writes there anyway.
    # These two paths are unwritable to root as well.
    "out_under_a_file": (["--out", "{tmp}/a_file/out"], "a_file"),
    "out_is_a_file": (["--out", "{tmp}/a_file"], "a_file"),
}
UNKNOWN_SAMPLER = (["--sampler", "euler"], "argument --sampler: invalid choice")  # argparse's own error
# name: arguments of runs that must succeed, in the same driver process
GOOD_INPUTS = {
    "delta_for_another_base_forced": ["--delta", "{tmp}/other_base.safetensors", "--force"],
    "custom": ["--delta", "{tmp}/custom.safetensors"],
    "custom_compressed_1": ["--delta", "{tmp}/custom.safetensors", "--compress", "1"],
    "custom_compressed_0.3": ["--delta", "{tmp}/custom.safetensors", "--compress", "0.3", "--save-delta",
                              "{tmp}/low.safetensors"],
    "custom_from_the_compressed_file": ["--delta", "{tmp}/low.safetensors"],
    "residual_base_uncond": ["--delta", "{tmp}/residual.safetensors", "--base-uncond"],
    "residual_lag": ["--delta", "{tmp}/residual.safetensors", "--lag", "--prompt", "photo of a <new1> square"],
    "residual_lag_class": ["--delta", "{tmp}/residual.safetensors", "--lag", "--lag-class", "red square", "--prompt",
                           "photo of a <new1> red square"],
}


class Exploit:
    """A pickle that would create a file when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_delta(sd, method, token, path, seed):
    delta = attach(sd, method, tokens=[token])
    g = torch.Generator().manual_seed(seed)
    delta.load_state_dict({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in delta.state_dict().items()})
    save_delta(delta, path, {"training": {"prompt": [f"photo of a {token} square"]}})
    delta.detach()


@pytest.fixture(scope="module")
def bad_runs(ckpt, tmp_path_factory):
    """name -> (exit code, stderr, expected message, --out path), all run by one driver process."""
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "a_file").write_text("not a directory")
    data = ckpt.read_bytes()
    (tmp / "cut.safetensors").write_bytes(data[: len(data) // 2])
    save_file({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(1),
               "model.diffusion_model.out.2.weight": torch.zeros(1)}, tmp / "sdxl.safetensors")
    save_file({"cond_stage_model.model.ln_final.weight": torch.zeros(1),
               "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 1024)},
              tmp / "sd2.safetensors")
    with open(tmp / "evil.ckpt", "wb") as f:
        pickle.dump({"state_dict": {"w": Exploit(str(tmp / "pwned"))}}, f)
    sd = load(ckpt)
    write_delta(sd, "custom", "<new1>", tmp / "custom.safetensors", 1)
    write_delta(sd, "custom", "<new1>", tmp / "custom_again.safetensors", 2)
    write_delta(sd, "residual", "<new1>", tmp / "residual.safetensors", 3)
    torch.manual_seed(1)
    write_delta(new_model(**TINY, resolution=32), "residual", "<new1>", tmp / "other_base.safetensors", 4)
    table = {}
    for name, (args, message) in {**BAD_INPUTS, "sampler_unknown": UNKNOWN_SAMPLER,
                                  **{k: (v, None) for k, v in GOOD_INPUTS.items()}}.items():
        args = [a.format(tmp=tmp) for a in args]
        out = Path(args[args.index("--out") + 1]) if "--out" in args else tmp / f"out_{name}"
        table[name] = (["--ckpt", str(ckpt), *FAST, "--n", "1", "--out", str(out), *args], message, out)
    result = run(["-c", DRIVER, json.dumps([args for args, _, _ in table.values()])])
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout.splitlines()[-1])
    runs = {name: (code, stderr, message, out, stdout)
            for (name, (_, message, out)), (code, stderr, stdout) in zip(table.items(), results)}
    return runs, tmp


def files_in(out):
    return [p for p in out.rglob("*") if p.is_file()] if out.is_dir() else []


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_exits_2_with_one_error_line_and_writes_nothing(bad_runs, name):
    runs, tmp = bad_runs
    code, stderr, message, out, _ = runs[name]
    assert "Traceback" not in stderr, stderr
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr
    assert files_in(out) == [] and not list(tmp.rglob("*.tmp")) and not (tmp / "nope.safetensors").exists()
    assert (tmp / "a_file").read_text() == "not a directory"
    assert not (tmp / "pwned").exists()  # the pickle's code never ran


def test_unknown_sampler_is_argparses_exit_2_and_writes_nothing(bad_runs):
    runs, _ = bad_runs
    code, stderr, message, out, _ = runs["sampler_unknown"]
    assert code == 2 and "Traceback" not in stderr
    assert message in stderr.strip().splitlines()[-1]
    assert not out.exists()


def images_of(out):
    return [np.asarray(Image.open(out / f"{i:03d}.png")).astype(int) for i in range(1)]


@pytest.mark.parametrize("name", GOOD_INPUTS)
def test_good_delta_runs_exit_0_and_write_their_images(bad_runs, name):
    runs, _ = bad_runs
    code, stderr, _, out, _ = runs[name]
    assert code == 0 and "Traceback" not in stderr, stderr
    assert sorted(p.name for p in out.iterdir()) == ["000.png", "grid.png"]


def test_compress_prints_storage_and_error_and_keep_1_samples_the_full_deltas_images(bad_runs):
    runs, tmp = bad_runs
    full, exact, low = (runs[name] for name in ("custom", "custom_compressed_1", "custom_compressed_0.3"))
    assert "relative error of W - W0" in exact[4] and "bytes (" in exact[4]
    assert "% of the full delta" in low[4] and "wrote the compressed delta" in low[4]
    assert max(np.abs(a - b).max() for a, b in zip(images_of(full[3]), images_of(exact[3]))) <= 1  # fp32 rounding
    assert any(np.abs(a - b).max() > 0 for a, b in zip(images_of(full[3]), images_of(low[3])))
    # the file --save-delta wrote samples the images that the compressed run did
    reread = runs["custom_from_the_compressed_file"]
    assert all(np.array_equal(a, b) for a, b in zip(images_of(low[3]), images_of(reread[3])))
    assert (tmp / "low.safetensors").stat().st_size < (tmp / "custom.safetensors").stat().st_size
