"""sample.py end to end: a run writes its PNGs; every bad input is one `error:` line on stderr, exit code 2, no file.

Each Python process pays for `import torch` (3 s of CPU, more on a loaded machine), so the bad inputs all run in
one process: a driver that runs sample.py as `__main__` once per argument list, as `python sample.py ...` would,
and reports the exit code and stderr of each. The good run is a plain `python sample.py ...`.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from nanocustom.checkpoint import new_model, save
from nanocustom.clip import CLIPTextConfig
from nanocustom.unet import UNetConfig
from nanocustom.vae import VAEConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 300  # seconds per process; a good run takes ~10 s on a busy 2-core machine
VAE_FACTOR = 4  # ch_mult (1, 2, 2): two halvings
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


DRIVER = """
import contextlib, io, json, runpy, sys, traceback
results = []
for argv in json.loads(sys.argv[1]):
    sys.argv = ["sample.py", *argv]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            runpy.run_path("sample.py", run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code or 0
        except BaseException:  # what the interpreter does with an uncaught exception
            traceback.print_exc()
            code = 1
    results.append([code, stderr.getvalue()])
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
    "height_not_a_multiple_of_the_vae_factor": (["--height", "30"], f"multiple of {VAE_FACTOR}"),
    "ckpt_missing": (["--ckpt", "{tmp}/nope.safetensors"], "checkpoint not found"),
    "ckpt_truncated": (["--ckpt", "{tmp}/cut.safetensors"], "truncated"),
    "ckpt_sdxl": (["--ckpt", "{tmp}/sdxl.safetensors"], "SDXL"),
    "out_parent_missing": (["--out", "{tmp}/missing/out"], "is not an existing directory"),
    # An unwritable --out directory (chmod 555) cannot be tested: the tests run as root, who writes there anyway.
    # These two paths are unwritable to root as well.
    "out_under_a_file": (["--out", "{tmp}/a_file/out"], "a_file"),
    "out_is_a_file": (["--out", "{tmp}/a_file"], "a_file"),
}
UNKNOWN_SAMPLER = (["--sampler", "euler"], "argument --sampler: invalid choice")  # argparse's own error


@pytest.fixture(scope="module")
def bad_runs(ckpt, tmp_path_factory):
    """name -> (exit code, stderr, expected message, --out path), all run by one driver process."""
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "a_file").write_text("not a directory")
    data = ckpt.read_bytes()
    (tmp / "cut.safetensors").write_bytes(data[: len(data) // 2])
    save_file({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(1),
               "model.diffusion_model.out.2.weight": torch.zeros(1)}, tmp / "sdxl.safetensors")
    table = {}
    for name, (args, message) in {**BAD_INPUTS, "sampler_unknown": UNKNOWN_SAMPLER}.items():
        args = [a.format(tmp=tmp) for a in args]
        out = Path(args[args.index("--out") + 1]) if "--out" in args else tmp / f"out_{name}"
        table[name] = (["--ckpt", str(ckpt), *FAST, "--n", "1", "--out", str(out), *args], message, out)
    result = run(["-c", DRIVER, json.dumps([args for args, _, _ in table.values()])])
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout.splitlines()[-1])
    runs = {name: (code, stderr, message, out)
            for (name, (_, message, out)), (code, stderr) in zip(table.items(), results)}
    return runs, tmp


def files_in(out):
    return [p for p in out.rglob("*") if p.is_file()] if out.is_dir() else []


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_exits_2_with_one_error_line_and_writes_nothing(bad_runs, name):
    runs, tmp = bad_runs
    code, stderr, message, out = runs[name]
    assert "Traceback" not in stderr, stderr
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr
    assert files_in(out) == [] and not list(tmp.rglob("*.tmp"))
    assert (tmp / "a_file").read_text() == "not a directory"


def test_unknown_sampler_is_argparses_exit_2_and_writes_nothing(bad_runs):
    runs, _ = bad_runs
    code, stderr, message, out = runs["sampler_unknown"]
    assert code == 2 and "Traceback" not in stderr
    assert message in stderr.strip().splitlines()[-1]
    assert not out.exists()
