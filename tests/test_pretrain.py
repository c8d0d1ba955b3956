"""Pieces of the pretraining recipe (nanocustom/pretrain.py) that a short run cannot show."""
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from nanocustom import pretrain
from nanocustom.errors import NanocustomError
from nanocustom.pretrain import LossBalance, Pace


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


def test_a_stages_log_says_its_pace_and_the_time_left(monkeypatch):
    """Timed from step 0: after 50 steps in 35 s, 0.70 s a step and (3,000 - 1 - 50) x 0.7 s = 34 min to go."""
    clock = iter([100.0, 135.0])
    monkeypatch.setattr(pretrain, "time", SimpleNamespace(time=lambda: next(clock)))  # pretrain's clock alone
    pace = Pace(3000)
    assert pace(0) == ""
    assert pace(50) == "  0.70 s a step, 34 min to go"


def test_diagnose_counts_each_wrong_attribute_of_the_quick_protocol():
    from nanocustom.checkpoint import load
    from nanocustom.pretrain import diagnose
    from nanocustom.toy import CONCEPTS
    report = diagnose(load(), n_single=2, n_double=1, n_patterned=1, per_prompt=2, steps=2, log=lambda _: None)
    assert report["single"]["images"] == 4 and report["two-object"]["images"] == report["patterned"]["images"] == 2
    assert 0.0 < report["binding probe"] <= 1.0
    assert report["patterned"]["asked pattern seen"] in (0.0, 0.5, 1.0)
    trips = report["round trips"]  # true renders through the shipped VAE: its patterns survive
    assert set(trips) == {"patterned adherence", "asked pattern seen"} | {f"{c} presence" for c in CONCEPTS}
    assert trips["asked pattern seen"] >= 0.75, trips
    for part in (report["single"], report["two-object"], report["patterned"]):
        assert set(part["wrong"]) == {"background", "shape", "colour", "pattern", "count"}
        right = round(part["adherence"] * part["images"])
        assert right + max(part["wrong"].values()) <= part["images"]  # an image with a wrong attribute is not right


def test_init_from_continues_a_trained_unet_and_text_encoder_under_zero_snr(tmp_path):
    """--init-from takes all three parts of a checkpoint; one warm-up step of stage 3 at lr 3e-4 / 200 barely
    moves them (the text encoder, which sees the whole caption, not at all: it stays frozen), and the result
    carries the schedule and prediction type it was trained under, and the recipe of the file it continued."""
    from nanocustom.checkpoint import DEFAULT_CHECKPOINT, load
    from nanocustom.pretrain import ZERO_SNR, pretrain
    out = tmp_path / "continued.safetensors"
    pretrain(out, text_steps=0, unet_steps=0, finish_steps=1, batch=4, finish_scenes=16, init_from=DEFAULT_CHECKPOINT,
             threads=1)
    source, continued = load(DEFAULT_CHECKPOINT), load(out)
    assert (continued.prediction_type, continued.schedule) == ("v", ZERO_SNR)
    assert continued.latent_scale == source.latent_scale
    for part in ("unet", "text_encoder", "vae"):
        a, b = getattr(source, part).state_dict(), getattr(continued, part).state_dict()
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 2e-2, part  # the trained weights, not a new init
    text_before, text_after = source.text_encoder.state_dict(), continued.text_encoder.state_dict()
    assert all(torch.equal(text_before[k], text_after[k]) for k in text_before)
    assert continued.metadata["recipe"]["vae_steps"] == 0  # stage 1 was not run here
    assert continued.metadata["recipe"]["vae_crop"] is None
    assert continued.metadata["recipe"]["init_recipe"] == source.metadata["recipe"]


def test_stage_1b_on_a_checkpoint_continues_its_text_encoder(tmp_path, capsys):
    """--init-from with --text-steps teaches the checkpoint's own text encoder (new words, such as the patterns):
    one warm-up step at lr 1e-3 / 100 leaves it close to the checkpoint's, which a fresh encoder is not."""
    from nanocustom.checkpoint import DEFAULT_CHECKPOINT, load
    from nanocustom.clip import CLIPTextModel
    from nanocustom.pretrain import TEXT_CONFIG, pretrain
    out = tmp_path / "taught.safetensors"
    pretrain(out, text_steps=1, text_batch=4, text_lr=1e-3, unet_steps=0, finish_steps=0, init_from=DEFAULT_CHECKPOINT,
             threads=1)
    assert "continuing the checkpoint's" in capsys.readouterr().out
    before, after = load(DEFAULT_CHECKPOINT).text_encoder.state_dict(), load(out).text_encoder.state_dict()
    fresh = CLIPTextModel(TEXT_CONFIG).state_dict()
    assert max((before[k] - after[k]).abs().max().item() for k in before) < 2e-3
    assert max((before[k] - fresh[k]).abs().max().item() for k in before) > 0.1


def test_the_vae_trains_on_random_crops_and_ends_on_whole_images():
    """random_crops cuts each image's own window; train_vae with crop=32 runs its crop steps, then whole images."""
    from nanocustom.checkpoint import new_model
    from nanocustom.pretrain import TEXT_CONFIG, UNET_CONFIG, VAE_CONFIG, random_crops, train_vae
    x = torch.arange(2 * 3 * 64 * 64, dtype=torch.float32).view(2, 3, 64, 64)
    crops = random_crops(x, 32, torch.Generator().manual_seed(0))
    assert crops.shape == (2, 3, 32, 32)
    for image, crop in zip(x, crops):  # a window of that very image: its top-left value says where
        top, left = divmod(int(crop[0, 0, 0].item()) % (64 * 64), 64)
        assert torch.equal(crop, image[:, top:top + 32, left:left + 32])
    torch.manual_seed(0)
    vae = new_model(UNET_CONFIG, VAE_CONFIG, TEXT_CONFIG, resolution=64).vae.train()
    lines = []
    train_vae(vae, steps=2, batch=2, lr=1e-3, seed=0, log=lines.append, crop=32, full_steps=1)
    assert len(lines) == 2 and not vae.training


def test_the_text_encoder_trains_with_the_unet_only_when_nothing_parsed_it(tmp_path, capsys):
    """From scratch with --text-steps 0 the text encoder is a random one: it must learn with the UNet (the recipe
    before stage 1b), not stay frozen at its random init; after stage 1b it stays frozen."""
    from nanocustom.pretrain import pretrain
    for text_steps, says in ((0, "the text encoder learns with the UNet"), (2, "the text encoder stays frozen")):
        pretrain(tmp_path / "scratch.safetensors", vae_steps=1, text_steps=text_steps, text_batch=4, unet_steps=0,
                 finish_steps=0, threads=1)
        assert says in capsys.readouterr().out, text_steps


def test_the_recipe_is_one_command_of_three_stages(tmp_path):
    """`python -m nanocustom.pretrain` with every stage cut to two steps: the VAE, the text encoder, stage 2 under
    SD v1's schedule (eps), stage 3 under zero terminal SNR (v), one file at the end whose metadata says so."""
    import subprocess
    import sys
    from pathlib import Path
    from nanocustom.checkpoint import load
    from nanocustom.pretrain import TEXT_CONFIG, UNET_CONFIG, ZERO_SNR
    out = tmp_path / "tiny.safetensors"
    result = subprocess.run([sys.executable, "-m", "nanocustom.pretrain", "--vae-steps", "2", "--text-steps", "2",
                             "--unet-steps", "2", "--finish-steps", "2", "--scenes", "16", "--finish-scenes", "8",
                             "--patterns", "0.5", "--batch", "4", "--threads", "1", "--out", str(out)],
                            cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    log = result.stdout
    assert log.index("vae  step") < log.index("text step") < log.index("encoded 16 scenes") \
        < log.index("unet step") < log.index("encoded 8 scenes") < log.index("finish step") < log.index("wrote"), log
    model = load(out)
    assert (model.prediction_type, model.schedule, model.unet.config) == ("v", ZERO_SNR, UNET_CONFIG)
    assert model.text_encoder.config == TEXT_CONFIG and not TEXT_CONFIG.causal  # it sees the whole caption
    recipe = model.metadata["recipe"]
    assert (recipe["vae_steps"], recipe["text_steps"], recipe["unet_steps"], recipe["finish_steps"]) == (2, 2, 2, 2)
    assert recipe["patterns"] == 0.5
    assert (recipe["torch"], recipe["threads"], recipe["seed"]) == (torch.__version__, 1, 0)  # what a rerun needs


@pytest.mark.parametrize("extra, message", [
    (["--pairs", "1.5"], "--pairs 1.5 is a fraction; give a number in [0, 1]"),
    (["--patterns", "-0.1"], "--patterns -0.1 is a fraction; give a number in [0, 1]"),
    (["--unet-steps", "-1"], "--unet-steps -1: give 0 (skip) or more"),
    (["--scenes", "8"], "--scenes 8: give 0 (render afresh) or at least --batch (32) scenes"),
    (["--lr", "nan"], "--lr nan: give a positive value"),
    (["--vae-from", "a.safetensors", "--init-from", "b.safetensors"], "drop --vae-from"),
    (["--init-from", "missing.safetensors"], "--init-from missing.safetensors: no such checkpoint"),
    (["--out", "missing/m.safetensors"], "give a .safetensors path in a writable, existing directory"),
    (["--out", "m.ckpt"], "give a .safetensors path in a writable, existing directory"),
    (["--device", "foo"], "--device 'foo' is not a device torch knows"),
    (["--threads", "0"], "--threads 0: give 1 or more"),
])
def test_bad_input_is_refused_in_one_line_before_any_training(tmp_path, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NanocustomError) as refused:
        pretrain.main(["--out", "m.safetensors", *extra])
    assert message in str(refused.value) and "\n" not in str(refused.value)
    assert list(tmp_path.iterdir()) == []


def test_patterns_sets_the_share_of_patterned_objects():
    import numpy as np
    from nanocustom import toy
    rng = np.random.default_rng(0)
    patterned = {p: [o.pattern is not None for _ in range(50) for o in toy.random_scene(rng, pattern_prob=p).objects]
                 for p in (0.0, 1.0)}
    assert not any(patterned[0.0]) and all(patterned[1.0])


def test_pairs_sets_the_share_of_two_object_scenes():
    import numpy as np
    from nanocustom import toy
    rng = np.random.default_rng(0)
    counts = [len(toy.random_scene(rng, pair_prob=p).objects) for p in (0.0, 1.0) for _ in range(50)]
    assert counts == [1] * 50 + [2] * 50


def test_parse_targets_put_each_objects_attributes_on_its_shape_and_position_words():
    """Stage 1b's targets: token i + 1 is word i (all the world's words are single CLIP tokens). "circle" learns
    (circle, red, small) but not its position, said only later; "left" learns all four; EOS and the padding
    after it learn both objects and the background; every other token learns nothing."""
    from nanocustom import toy
    from nanocustom.pretrain import parse_targets
    text = "a small red circle on the left and a green square on the right on a blue background"
    obj, scene = parse_targets([text, "photo of a star"])
    circle, red, small, left, solid = 1, 1, 1, 1, 0
    square, green, unsaid, right = 2, 1 + list(toy.COLOURS).index("green"), 0, 3
    assert obj[0, 4].tolist() == [circle, red, small, -1, unsaid, solid]
    assert obj[0, 7].tolist() == [circle, red, small, left, unsaid, solid]
    assert obj[0, 11].tolist() == [square, green, unsaid, -1, unsaid, solid]
    assert obj[0, 14].tolist() == [square, green, unsaid, right, unsaid, solid]
    labelled = (obj[0] >= 0).any(-1).nonzero().flatten().tolist()
    assert labelled == [4, 7, 11, 14]
    eos = len(text.split()) + 1
    blue = 1 + list(toy.BACKGROUNDS).index("blue")
    assert (scene[0, :eos] == -1).all()
    assert (scene[0, eos:] == torch.tensor([circle, red, small, left, unsaid, solid,
                                            square, green, unsaid, right, unsaid, solid, blue])).all()
    star = 1 + toy.SHAPES.index("star")
    assert obj[1, 4].tolist() == [star, unsaid, unsaid, -1, unsaid, solid] and scene[1, 5].tolist() == [star] + [0] * 12


def test_for_an_encoder_that_sees_the_whole_caption_every_word_of_an_object_learns_the_whole_object():
    """causal=False: each word of an object's phrase ("a", "small", "red", "circle", "on", "the", "left") learns
    all four of its attributes, so no token says "red" without saying whose; "and", the "photo of" prefix, the
    background's words, BOS, EOS and the padding learn the whole scene."""
    from nanocustom import toy
    from nanocustom.pretrain import parse_targets
    text = "photo of a small red circle on the left and a green square on a blue background"
    obj, scene = parse_targets([text], causal=False)
    circle, red, small, left = 1, 1, 1, 1
    square, green, unsaid = 2, 1 + list(toy.COLOURS).index("green"), 0
    first, second = [circle, red, small, left, 0, 0], [square, green, unsaid, unsaid, 0, 0]  # size, position unsaid
    words = text.split()
    for i, word in enumerate(words):
        if 2 <= i <= 8:
            assert obj[0, 1 + i].tolist() == first and (scene[0, 1 + i] == -1).all(), word
        elif 10 <= i <= 12:
            assert obj[0, 1 + i].tolist() == second and (scene[0, 1 + i] == -1).all(), word
        else:
            assert (obj[0, 1 + i] == -1).all(), word
    told = [0, 1 + 0, 1 + 1, 1 + 9] + list(range(1 + 13, 77))  # BOS, "photo of", "and", the background, EOS on
    blue = 1 + list(toy.BACKGROUNDS).index("blue")
    assert (scene[0, told] == torch.tensor(first + second + [blue])).all()


def test_a_patterns_and_joins_its_two_colours_and_only_an_article_starts_the_next_object():
    """ "a red and white striped square and a blue circle": the first "and" is inside the square's phrase and
    learns the square (second colour white, pattern striped); the second "and" starts the circle."""
    from nanocustom import toy
    from nanocustom.pretrain import parse_targets
    text = "a red and white striped square and a blue circle"
    obj, scene = parse_targets([text], causal=False)
    white, striped = 1 + list(toy.COLOURS).index("white"), 1 + list(toy.PATTERNS).index("striped")
    square = [2, 1, 0, 0, white, striped]
    circle = [1, 1 + list(toy.COLOURS).index("blue"), 0, 0, 0, 0]
    assert [obj[0, 1 + i].tolist() for i in range(6)] == [square] * 6  # "a red and white striped square"
    assert (obj[0, 7] == -1).all() and scene[0, 7].tolist() == square + circle + [0]
    assert [obj[0, 1 + i].tolist() for i in range(7, 10)] == [circle] * 3


def test_the_text_encoders_mask_is_a_config_switch():
    """CLIPTextConfig.causal: with CLIP's mask a token's feature ignores later words; without it, not."""
    import dataclasses
    from nanocustom.clip import CLIPTextModel
    from nanocustom.pretrain import TEXT_CONFIG
    ids = torch.tensor([[49406, 320, 736, 49407], [49406, 320, 1901, 49407]])  # "a red" / "a green"
    for causal in (True, False):
        torch.manual_seed(0)
        features = CLIPTextModel(dataclasses.replace(TEXT_CONFIG, causal=causal, max_position_embeddings=4))(ids)
        assert torch.allclose(features[0, :2], features[1, :2], atol=1e-6) == causal


def test_after_stage_1b_the_text_encoder_stays_frozen_and_without_it_learns_with_the_unet():
    """train_text=False (after stage 1b, as SD v1's CLIP): only the UNet moves; the default trains both."""
    from nanocustom.checkpoint import load
    from nanocustom.pretrain import train_diffusion
    for train_text in (False, True):
        sd = load()
        before = {k: v.clone() for k, v in sd.text_encoder.state_dict().items()}
        unet_before = sd.unet.state_dict()["out.2.weight"].clone()
        train_diffusion(sd, steps=2, batch=4, lr=1e-3, seed=0, log=lambda _: None, scenes=8, train_text=train_text)
        same = all(torch.equal(before[k], v) for k, v in sd.text_encoder.state_dict().items())
        assert same != train_text, train_text
        assert not torch.equal(unet_before, sd.unet.state_dict()["out.2.weight"])


def test_the_parse_stage_teaches_the_text_encoder_to_parse():
    """Stage 1b on a fresh text encoder, 150 steps: the parse loss (every attribute head's cross-entropy, about 25
    at the start) falls below half of where it began (11.6 measured)."""
    from nanocustom.checkpoint import new_model
    from nanocustom.pretrain import TEXT_CONFIG, UNET_CONFIG, VAE_CONFIG, train_text_encoder
    torch.manual_seed(0)
    sd = new_model(UNET_CONFIG, VAE_CONFIG, TEXT_CONFIG, resolution=64)
    lines = []
    train_text_encoder(sd.text_encoder, sd.tokenizer, steps=150, batch=64, lr=3e-3, seed=0, log=lines.append)
    losses = [float(line.split("parse loss")[1].split()[0]) for line in lines]
    assert losses[0] > 20 and losses[-1] < losses[0] / 2, losses


def test_the_shipped_text_encoder_binds_colours_to_shapes():
    """The binding probe of the shipped model: 0.761 for its parsed encoder that sees the whole caption (0.688
    before it learnt the pattern words); the encoder trained through the diffusion loss alone (sessions 2 to 8)
    was a bag of words at 0.986."""
    from nanocustom.checkpoint import load
    from nanocustom.pretrain import binding_probe
    assert binding_probe(load(), n=16) < 0.8


def test_the_pattern_binding_probe_reads_context_and_is_one_without_it():
    """An encoder with no layers gives each word its own embedding whatever surrounds it: the probe is then 1.
    The shipped encoder's shape words know their own pattern, if weakly (see JOURNAL.md, session 24)."""
    from nanocustom.checkpoint import load
    from nanocustom.clip import CLIPTextModel
    from nanocustom.pretrain import TEXT_CONFIG, pattern_binding_probe
    sd = load()
    assert pattern_binding_probe(sd, n=16) < 0.97
    sd.text_encoder = CLIPTextModel(dataclasses.replace(TEXT_CONFIG, num_hidden_layers=0)).eval()
    assert pattern_binding_probe(sd, n=16) == pytest.approx(1.0, abs=1e-5)


def test_decoder_steps_train_the_decoder_alone_and_keep_the_latent_space(tmp_path):
    """--decoder-steps on a checkpoint: the decoder moves; the encoder, the UNet and the latent scale do not."""
    from nanocustom.checkpoint import DEFAULT_CHECKPOINT, load
    from nanocustom.pretrain import pretrain
    out = tmp_path / "decoder.safetensors"
    pretrain(out, text_steps=0, unet_steps=0, finish_steps=0, init_from=DEFAULT_CHECKPOINT, decoder_steps=2,
             vae_batch=2, decoder_lr=1e-3, threads=1)
    before, after = load(DEFAULT_CHECKPOINT), load(out)
    moved = {k for k, v in before.vae.state_dict().items() if not torch.equal(v, after.vae.state_dict()[k])}
    assert moved and all(k.startswith(("decoder.", "post_quant_conv.")) for k in moved), sorted(moved)[:5]
    assert all(torch.equal(v, after.unet.state_dict()[k]) for k, v in before.unet.state_dict().items())
    assert after.latent_scale == before.latent_scale
    assert after.metadata["recipe"]["decoder_steps"] == 2


def test_the_patterned_prompts_cover_every_pattern_and_never_ask_for_a_concept():
    from nanocustom import toy
    from nanocustom.pretrain import PATTERNED_PROMPTS
    objects = [o for prompt in PATTERNED_PROMPTS for o in toy.parse_caption(prompt).objects]
    assert {o.pattern for o in objects} - {None} == set(toy.PATTERNS)
    assert not any(toy.concept_of_look(o.shape, o.pattern, {o.colour, o.colour2}) for o in objects if o.pattern)
