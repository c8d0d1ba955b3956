"""Merging whole Custom Diffusion deltas (Kumari et al. §3.2): each concept's target captions keep their own
fine-tuned keys and values, the regularization captions keep the base model's, and every token survives."""
import pytest
import torch

from nanocustom.checkpoint import new_model
from nanocustom.clip import CLIPTextConfig
from nanocustom.errors import NanocustomError
from nanocustom.merge import (REG_CAPTIONS, MergeSolver, add_custom_deltas, class_words, combine, merge_custom_deltas,
                              target_prompts, token_features)
from nanocustom.personalize import attach, save_delta
from nanocustom.unet import UNetConfig
from nanocustom.vae import VAEConfig
from test_merge_math import kkt_solve

REG = REG_CAPTIONS.read_text().splitlines()[:200]


def tiny():
    torch.manual_seed(0)
    sd = new_model(UNetConfig(model_channels=64, channel_mult=(1,), attention_resolutions=(1,), num_heads=2,
                                num_res_blocks=1, context_dim=64),
                     VAEConfig(ch=64, ch_mult=(1, 1), num_res_blocks=1),
                     CLIPTextConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
                     resolution=16)
    with torch.no_grad():  # a trained text encoder's final norm has a bias: its features span all dim directions
        sd.text_encoder.final_layer_norm.bias.normal_(std=0.5)
    return sd


def fine_tuned(sd, token, seed):
    """A Custom Diffusion delta whose K/V and token row moved away from the base, as training would; several
    tokens (a list): one delta trained jointly on several concepts (Kumari et al. §3.2)."""
    tokens = [token] if isinstance(token, str) else token
    delta = attach(sd, "custom", tokens=tokens, init_from=[42170 + seed + i for i in range(len(tokens))])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (p for group in delta.trainable() for p in group["params"]):
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    tensors, info = delta.state_dict(), delta.metadata()
    delta.detach()
    return tensors, info


def test_reg_captions_are_about_a_thousand_distinct_lines():
    captions = REG_CAPTIONS.read_text().splitlines()
    assert len(set(captions)) == len(captions) >= 1000


def test_merged_kv_reproduce_each_concepts_targets_and_keep_the_base_elsewhere():
    sd = tiny()
    deltas = [fine_tuned(sd, "<new1>", 1), fine_tuned(sd, "<new2>", 2)]
    merged = merge_custom_deltas(sd, deltas, ["square", "circle"], reg_captions=REG, log=lambda _: None)
    assert sd.tokenizer.added_tokens == ["<new1>", "<new2>"]
    W0 = merged.originals_by_key()
    W = merged.state_dict()
    for (tensors, _), token, word in zip(deltas, ["<new1>", "<new2>"], ["square", "circle"]):
        # "<new1> square" and, of "photo of a <new1> square", the rows from the token on: the "photo of a" rows
        # are the same for every concept (causal attention) and can only fit the concepts' mean
        c = token_features(sd, [f"{token} {word}", f"photo of a {token} {word}"]).float()[[0, 1, 2, 6, 7, 8]]
        for key in W0:
            target = tensors[key] @ c.T
            assert ((W[key] @ c.T - target).norm() / target.norm()) < 1e-4  # Eq. 4's constraint W C^T = V
    # and W is Eq. 4's minimiser: a generic KKT solve of the same problem (repeated rows once, their mean target)
    C = token_features(sd, [p for t, w in (("<new1>", "square"), ("<new2>", "circle")) for p in target_prompts(t, w)])
    C_reg = token_features(sd, REG)
    solver = MergeSolver(C, C_reg)
    for key in W0:
        V = torch.cat([t[key].double() @ token_features(sd, target_prompts(tok, w)).T
                       for (t, _), tok, w in zip(deltas, ["<new1>", "<new2>"], ["square", "circle"])], dim=1)
        expected = kkt_solve(W0[key].double(), solver.C, solver.unique_targets(V), C_reg.T @ C_reg)
        torch.testing.assert_close(W[key].double(), expected, rtol=1e-4, atol=1e-5)


def test_every_token_of_a_jointly_trained_delta_keeps_its_targets():
    sd = tiny()
    deltas = [fine_tuned(sd, ["<new1>", "<new2>"], 1), fine_tuned(sd, "<new3>", 3)]
    merged = merge_custom_deltas(sd, deltas, [["square", "circle"], "star"], reg_captions=REG, log=lambda _: None)
    W = merged.state_dict()
    for tensors, token, word in [(deltas[0][0], "<new1>", "square"), (deltas[0][0], "<new2>", "circle"),
                                 (deltas[1][0], "<new3>", "star")]:
        c = token_features(sd, [f"{token} {word}"]).float()  # the bare caption's rows: no row shared with another
        for key in merged.originals_by_key():
            target = tensors[key] @ c.T
            assert ((W[key] @ c.T - target).norm() / target.norm()) < 1e-4


def test_more_concepts_than_rare_tokens_merge_and_add():
    sd = tiny()
    deltas = [fine_tuned(sd, f"<new{i}>", i) for i in range(1, 5)]  # four; RARE_TOKENS has three
    merged = merge_custom_deltas(sd, deltas, ["square", "circle", "star", "heart"], reg_captions=REG,
                                 log=lambda _: None)
    assert merged.tokens == ["<new1>", "<new2>", "<new3>", "<new4>"]
    merged.detach()
    added = add_custom_deltas(sd, deltas)
    assert torch.equal(added.state_dict()["modifier_tokens"], torch.cat([d[0]["modifier_tokens"] for d in deltas]))


def test_deltas_trained_on_all_of_attn2_add_whole_and_are_refused_by_eq_4():
    sd = tiny()
    deltas = []
    for i, token in enumerate(["<new1>", "<new2>"]):
        delta = attach(sd, "custom", tokens=[token], init_from=[42170 + i], train="attn2")
        with torch.no_grad():
            for p in (p for group in delta.trainable() for p in group["params"]):
                p.add_(0.01 * (i + 1))
        deltas.append((delta.state_dict(), delta.metadata()))
        delta.detach()
    with pytest.raises(NanocustomError, match="--merge add"):
        merge_custom_deltas(sd, deltas, ["square", "circle"], reg_captions=REG)
    added = add_custom_deltas(sd, deltas)
    W0, W = added.originals_by_key(), added.state_dict()
    assert any(".to_q." in k for k in W0) and any(".to_out." in k for k in W0)  # q and out kept, not only K/V
    for key in W0:
        torch.testing.assert_close(W[key], deltas[0][0][key] + deltas[1][0][key] - W0[key])
    added.detach()
    with pytest.raises(NanocustomError, match="trained alike"):
        add_custom_deltas(sd, [deltas[0], fine_tuned(sd, "<new3>", 3)])


def test_class_words_are_read_per_token_from_the_training_prompts():
    info = {"tokens": ["<new1>", "<new2>"],
            "training": {"prompt": ["photo of a <new1> tortoise plushy", "a <new2> circle."]}}
    assert class_words(info) == ["tortoise plushy", "circle"]
    with pytest.raises(NanocustomError, match="no training prompt"):
        class_words({"tokens": ["<new3>"], "training": {"prompt": ["photo of a <new1> dog"]}})


def test_adding_deltas_is_the_plain_sum_of_weight_changes():
    sd = tiny()
    deltas = [fine_tuned(sd, "<new1>", 1), fine_tuned(sd, "<new2>", 2)]
    added = add_custom_deltas(sd, deltas)
    W0, W = added.originals_by_key(), added.state_dict()
    for key in W0:
        torch.testing.assert_close(W[key], deltas[0][0][key] + deltas[1][0][key] - W0[key])
    assert torch.equal(W["modifier_tokens"], torch.cat([d[0]["modifier_tokens"] for d in deltas]))


def test_merge_refuses_two_deltas_claiming_one_token():
    sd = tiny()
    deltas = [fine_tuned(sd, "<new1>", 1), fine_tuned(sd, "<new1>", 2)]
    with pytest.raises(NanocustomError, match="same modifier token twice"):
        merge_custom_deltas(sd, deltas, ["square", "circle"], reg_captions=REG)


@pytest.mark.parametrize("method", ["residual", "svdiff"])
def test_combined_residuals_and_spectral_shifts_sum_their_deltas(method, tmp_path, monkeypatch):
    monkeypatch.setattr("nanocustom.personalize.SVD_CACHE", tmp_path)
    sd = tiny()
    paths, states = [], []
    for i, token in enumerate(["<new1>", "<new2>"]):
        delta = attach(sd, method, tokens=[token], init_from=[42170 + i])
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in (p for group in delta.trainable() for p in group["params"]):
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        states.append(delta.state_dict())
        paths.append(tmp_path / f"{i}.safetensors")
        save_delta(delta, paths[-1])
        delta.detach()
    combined = combine(sd, paths, scales=[1.0, 0.5])
    assert sd.tokenizer.added_tokens == ["<new1>", "<new2>"] and combined.method == method
    state = combined.state_dict()
    assert torch.equal(state["modifier_tokens"], torch.cat([s["modifier_tokens"] for s in states]))
    for key in state:
        if key.endswith(".A"):  # Ham et al.: Delta W = A B per layer; combined, sum_k s_k A_k B_k
            B = key[:-2] + ".B"
            expected = states[0][key] @ states[0][B] + 0.5 * states[1][key] @ states[1][B]
            torch.testing.assert_close(state[key] @ state[B], expected)
        elif key.endswith(".delta"):  # Han et al. Eq. 4 (and Eq. 5's weights): delta' = delta_1 + s delta_2
            torch.testing.assert_close(state[key], states[0][key] + 0.5 * states[1][key])
