"""train.py's input checks, through main(argv): out-of-range flags, an unusable --out and concept folders without a
readable image are each one NanocustomError line (the `__main__` block prints it as `error: ...` and exits 2, see
tests/test_train.py), raised before anything is written."""
import contextlib

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import train
from nanocustom.checkpoint import new_model, save
from nanocustom.clip import CLIPTextConfig
from nanocustom.errors import NanocustomError
from nanocustom.unet import UNetConfig
from nanocustom.vae import VAEConfig


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    sd = new_model(UNetConfig(model_channels=32, channel_mult=(1,), attention_resolutions=(1,), num_heads=2,
                              num_res_blocks=1, context_dim=32),
                   VAEConfig(ch=32, ch_mult=(1, 1), num_res_blocks=1),
                   CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
                   resolution=16)
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    save(sd, path)
    return path


@pytest.fixture
def concept(tmp_path):
    folder = tmp_path / "concept"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((16, 16, 3), 60 * i, np.uint8)).save(folder / f"{i}.png")
    return folder


def argv(tiny, concept, out, *extra):
    return ["--method", "residual", "--ckpt", str(tiny), "--concept", str(concept), "--prompt",
            "photo of a <new1> square", "--steps", "1", "--batch-size", "1", "--out", str(out), *extra]


def refused(call, message):
    with pytest.raises(NanocustomError) as e:
        call()
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("extra, message", [
    (["--lr", "0"], "--lr 0.0 is out of range"),
    (["--lr=-1e-4"], "--lr -0.0001 is out of range"),
    (["--lr", "nan"], "--lr nan is out of range"),  # argparse's type=float takes "nan"
    (["--steps=-1"], "--steps -1 is out of range"),
    (["--batch-size", "0"], "--batch-size 0 is out of range"),
    (["--save-every", "0"], "--save-every 0 is out of range"),
    (["--prior-weight=-1"], "--prior-weight and --gen-reg must be 0 or more"),
    (["--prior-weight", "nan"], "--prior-weight and --gen-reg must be 0 or more"),
    (["--device", "foo"], "--device 'foo' is not a device torch knows"),
])
def test_out_of_range_training_flags_are_refused_in_one_line(tiny, concept, tmp_path, extra, message):
    out = tmp_path / "out" / "d.safetensors"
    out.parent.mkdir()
    refused(lambda: train.main(argv(tiny, concept, out, *extra)), message)
    assert list(out.parent.iterdir()) == []


def test_out_in_a_missing_or_unwritable_directory_is_refused(tiny, concept, tmp_path, monkeypatch):
    refused(lambda: train.main(argv(tiny, concept, tmp_path / "missing" / "d.safetensors")),
            "is not a writable directory")
    refused(lambda: train.main(argv(tiny, concept, tmp_path / "d.pt")), "must end in .safetensors")
    # chmod cannot make a directory unwritable to root, who runs the tests: os.access answers for the file system
    monkeypatch.setattr(train.os, "access", lambda path, mode: False)
    refused(lambda: train.main(argv(tiny, concept, tmp_path / "d.safetensors")), "is not a writable directory")
    assert not (tmp_path / "d.safetensors").exists()


@pytest.mark.parametrize("case", ["empty", "only_corrupt_or_not_images"])
def test_a_concept_folder_without_a_readable_image_is_refused_and_nothing_is_written(tiny, tmp_path, case):
    folder = tmp_path / "concept"
    folder.mkdir()
    if case == "only_corrupt_or_not_images":
        (folder / "a.png").write_bytes(b"\x89PNG not really")
        (folder / "notes.txt").write_text("a caption\n")
    out = tmp_path / "d.safetensors"
    with pytest.warns(UserWarning) if case != "empty" else contextlib.nullcontext():
        refused(lambda: train.main(argv(tiny, folder, out)), str(folder))
    assert not out.exists() and not out.with_suffix(".png").exists()


def test_corrupt_files_among_good_ones_are_skipped_with_a_warning_and_training_runs(tiny, concept, tmp_path):
    (concept / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    out = tmp_path / "d.safetensors"
    with pytest.warns(UserWarning, match="skipping .*broken.jpg"):
        train.main(argv(tiny, concept, out))
    assert out.is_file()


def test_sample_out_in_an_unwritable_directory_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(sample.os, "access", lambda path, mode: False)
    refused(lambda: sample.main(["--out", str(tmp_path / "out")]), "is not writable")
    assert not (tmp_path / "out").exists()


def checked(*extra):
    args = train.parse_args(["--method", "custom", "--concept", "c", "--prompt", "photo of a <new1> square",
                             "--out", "delta.safetensors", *extra])
    train.check_args(args)
    return args


def test_the_shapes_model_trains_on_its_images_as_they_are_at_its_own_rates(tmp_path, monkeypatch):
    """No --ckpt: SHAPES_DEFAULTS, no resize augmentation, no flips, features cached; --augment restores the
    paper's augmentation; a --ckpt (SD v1) keeps the papers' rates and augmentation."""
    monkeypatch.chdir(tmp_path)
    shapes = checked()
    assert (shapes.lr, shapes.batch_size, shapes.steps) == train.SHAPES_DEFAULTS["custom"]
    assert shapes.no_augment and shapes.cache and shapes.flip_p == 0.0
    augmented = checked("--augment")
    assert not augmented.no_augment and not augmented.cache and augmented.flip_p == 0.5
    sd_v1 = checked("--ckpt", "weights/v1-5-pruned-emaonly.safetensors")
    assert (sd_v1.lr, sd_v1.batch_size, sd_v1.steps) == train.DEFAULTS["custom"]
    assert not sd_v1.no_augment and not sd_v1.cache and sd_v1.flip_p == 0.5
    two = ["--concept", "c2", "--prompt", "photo of a <new2> circle"]
    assert checked(*two, "--cutmix").cache is False  # cut-mix composites are drawn anew: nothing to cache
    with pytest.raises(NanocustomError, match="--cutmix composes two concepts"):
        checked("--cutmix")
    with pytest.raises(NanocustomError, match="--augment contradicts"):
        checked("--augment", "--cache")


def test_method_specific_flags_are_refused_where_they_mean_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NanocustomError, match="--rank-fraction sets the residuals' rank"):
        checked("--rank-fraction", "0.1")  # checked() trains Custom Diffusion
    with pytest.raises(NanocustomError, match="Custom Diffusion always trains its modifier tokens"):
        checked("--train-tokens")


def test_rank_fraction_and_train_tokens_reach_the_residuals(tiny, concept, tmp_path):
    """r_i = round(fraction x m_i) (Ham et al. §4.1 / Table 5), and --train-tokens adds the token rows to the
    trained tensors (their Table 3 ablation): both are in the saved delta."""
    from safetensors.torch import load_file

    from nanocustom.checkpoint import load
    from nanocustom.personalize import RARE_TOKENS
    rare_row = load(tiny).text_encoder.embeddings.token_embedding.weight[RARE_TOKENS[0]]
    rows = {}
    for extra in ([], ["--train-tokens"]):
        out = tmp_path / f"d{len(extra)}.safetensors"
        train.main(argv(tiny, concept, out, "--rank-fraction", "0.25", *extra))
        tensors = load_file(out)
        ranks = {k: v.shape[1] for k, v in tensors.items() if k.endswith(".A")}
        assert ranks and set(ranks.values()) == {8}, ranks  # the tiny UNet's proj_out has m = 32 channels
        rows[len(extra)] = tensors["modifier_tokens"][0]
    assert torch.equal(rows[0], rare_row)  # frozen by default: the rare token's row as it was
    assert not torch.equal(rows[1], rare_row)  # trained
    for bad in ("0", "1.5", "nan"):
        refused(lambda: train.main(argv(tiny, concept, tmp_path / "e.safetensors", "--rank-fraction", bad)),
                f"--rank-fraction {float(bad)} is out of range")
    assert not (tmp_path / "e.safetensors").exists()
