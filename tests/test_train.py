"""train.py on a tiny random model: every method writes a loadable delta, bad input is one line, a non-finite loss
or Ctrl-C keeps the last good delta, and --resume gives the uninterrupted run's result."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import nanocustom.training
import train
from nanocustom.checkpoint import load, new_model, save
from nanocustom.clip import CLIPTextConfig
from nanocustom.errors import NanocustomError
from nanocustom.personalize import load_delta, read_delta_metadata
from nanocustom.toy import CONCEPTS_DIR
from nanocustom.unet import UNetConfig
from nanocustom.vae import VAEConfig

REPO = Path(__file__).resolve().parent.parent
CONCEPT = str(CONCEPTS_DIR / "striped_square")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    sd = new_model(UNetConfig(model_channels=64, channel_mult=(1, 2), attention_resolutions=(1, 2), num_heads=2,
                              num_res_blocks=1, context_dim=32),
                   VAEConfig(ch=64, ch_mult=(1, 1), num_res_blocks=1),
                   CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
                   resolution=32)
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    save(sd, path)
    return path


def args(tiny, out, method="residual", *extra):
    return ["--method", method, "--ckpt", str(tiny), "--concept", CONCEPT, "--prompt", "photo of a <new1> square",
            "--steps", "4", "--batch-size", "2", "--save-every", "2", "--out", str(out), *extra]


@pytest.mark.parametrize("method", ["custom", "svdiff", "residual"])
def test_each_method_trains_and_writes_a_delta_the_sampler_loads(tiny, tmp_path, method):
    out = tmp_path / f"{method}.safetensors"
    train.main(args(tiny, out, method))
    info = read_delta_metadata(out)
    assert info["method"] == method and info["tokens"] == ["<new1>"]
    assert info["training"]["steps"] == 4 and info["training"]["concept"] == [CONCEPT]
    assert out.with_suffix(".png").is_file() and not out.with_suffix(".resume.pt").exists()
    sd = load(tiny)
    load_delta(sd, out).fold()
    assert sd.tokenizer.added_tokens == ["<new1>"]


def shapes_args(out, method, *extra):
    """train.py on the shipped shapes model (no --ckpt), as a reader runs it, cut to 4 steps."""
    return ["--method", method, "--concept", CONCEPT, "--prompt", "photo of a <new1> square", "--steps", "4",
            "--batch-size", "2", "--save-every", "2", "--out", str(out), *extra]


@pytest.mark.parametrize("method", ["custom", "svdiff", "residual"])
def test_resume_after_an_interruption_gives_the_uninterrupted_result(tmp_path, monkeypatch, method):
    train.main(shapes_args(tmp_path / "straight.safetensors", method))
    calls, masked_loss = [], nanocustom.training.masked_loss

    def interrupt_at_step_3(*a):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return masked_loss(*a)

    monkeypatch.setattr(nanocustom.training, "masked_loss", interrupt_at_step_3)
    with pytest.raises(SystemExit) as e:
        train.main(shapes_args(tmp_path / "resumed.safetensors", method))
    assert e.value.code == 130
    interrupted = load_file(tmp_path / "resumed.safetensors")  # Ctrl-C kept the delta of step 2
    monkeypatch.setattr(nanocustom.training, "masked_loss", masked_loss)
    train.main(shapes_args(tmp_path / "resumed.safetensors", method, "--resume"))
    straight, resumed = load_file(tmp_path / "straight.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert straight.keys() == resumed.keys()
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=1e-6)
    assert any(not torch.equal(interrupted[k], straight[k]) for k in straight)


def test_a_non_finite_loss_stops_with_the_last_good_delta(tiny, tmp_path, monkeypatch):
    calls, masked_loss = [], nanocustom.training.masked_loss

    def nan_at_step_3(*a):
        calls.append(1)
        return masked_loss(*a) * (float("nan") if len(calls) == 3 else 1.0)

    monkeypatch.setattr(nanocustom.training, "masked_loss", nan_at_step_3)
    with pytest.raises(train.NanocustomError, match="loss became nan at step 2; kept the last good delta"):
        train.main(args(tiny, tmp_path / "d.safetensors"))
    assert all(torch.isfinite(v).all() for v in load_file(tmp_path / "d.safetensors").values())


@pytest.mark.parametrize("extra, message", [
    (["--steps", "0"], "--steps 0 is out of range"),
    (["--batch-size", "-1"], "--batch-size -1 is out of range"),
    (["--out", "/nonexistent/d.safetensors"], "is not a writable directory"),
    (["--prompt", "photo of a square"], "names no modifier token"),
    (["--concept", "/nonexistent/folder"], "nonexistent"),
])
def test_bad_training_input_is_one_line_and_exit_2(tiny, tmp_path, extra, message):
    argv = args(tiny, tmp_path / "d.safetensors")
    for flag, value in zip(extra[::2], extra[1::2]):
        argv[argv.index(flag) + 1] = value
    result = subprocess.run([sys.executable, "train.py", *argv], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []


def test_custom_diffusions_default_rate_scales_with_the_batch_size(tiny, tmp_path):
    for batch_size, lr in (("8", 8e-5), ("2", 2e-5), ("16", 1.6e-4)):  # 1e-5 x the batch (Kumari et al. §4)
        argv = args(tiny, tmp_path / "d.safetensors", "custom")
        argv[argv.index("--batch-size") + 1] = batch_size
        parsed = train.parse_args(argv)
        train.check_args(parsed)
        assert parsed.lr == pytest.approx(lr)


def test_unmix_with_gradient_checkpointing_is_refused(tiny, tmp_path):
    parsed = train.parse_args(args(tiny, tmp_path / "d.safetensors", "custom", "--concept", CONCEPT, "--prompt",
                                   "photo of a <new2> circle", "--cutmix", "--unmix-weight", "1",
                                   "--grad-checkpointing"))
    with pytest.raises(NanocustomError, match="--grad-checkpointing"):
        train.check_args(parsed)
