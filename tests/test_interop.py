"""Deltas in other tools' formats, checked against diffusers' own code: the CompVis <-> diffusers module names
against convert_ldm_unet_checkpoint, Custom Diffusion files run through diffusers' CustomDiffusionAttnProcessor and
its textual-inversion loader, files written by diffusers' save_attn_procs imported to diffusers' outputs, the
residual LoRA loaded by diffusers (lora_state_dict, then load_lora_into_unet, which hands it to peft: the two
steps of pipeline.load_lora_weights), and a folded checkpoint that loads back and converts with diffusers'
single-file functions."""
import pytest
import torch
import transformers
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders import TextualInversionLoaderMixin
from diffusers.models.attention_processor import CustomDiffusionAttnProcessor
from safetensors.torch import load_file, save_file

from helpers import write_clip_tokenizer_files
from nanocustom.checkpoint import load, read_state_dict, to_original_layout
from nanocustom.errors import NanocustomError
from nanocustom.interop import (compvis_module_name, diffusers_module_name, export_diffusers_custom_diffusion,
                                export_residual_lora, import_diffusers_custom_diffusion, read_tensors, save_folded)
from nanocustom.personalize import attach, save_delta
from nanocustom.unet import SpatialTransformer, UNet, UNetConfig
from test_parity_models import UNET_PREFIX, convert_clip, convert_unet, hf_clip_config, rel_err
from test_personalize import PROMPT, TINY, tiny_model

torch.set_num_threads(1)
TOL = 1e-4  # max |ours - ref| / max |ref|, float32


def perturb_(delta, seed=1):
    """A trained-looking delta: every trained tensor and the token rows moved off their start."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        params = [p for group in delta.trainable() for p in group["params"]]
        if delta.embedding is not None and not delta.embedding.rows.requires_grad:
            params.append(delta.embedding.rows)
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _save(tensors, path):
    save_file(tensors, path)
    return path


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 900]),
            torch.randn(2, 77, TINY["unet"].context_dim, generator=g))


def diffusers_unet(original_layout, unet_config=TINY["unet"]):
    config, converted = convert_unet({k: v for k, v in original_layout.items() if k.startswith(UNET_PREFIX)},
                                     unet_config)
    ref = UNet2DConditionModel(**config).eval()
    ref.load_state_dict(converted, strict=True)
    return ref


@torch.no_grad()
def outputs(sd, ref, x, t, context):
    return sd.unet(x, t, context), ref(x, t, encoder_hidden_states=context).sample


@pytest.mark.parametrize("unet_config", [UNetConfig(), TINY["unet"]], ids=["sd_v1", "tiny"])
def test_module_names_agree_with_diffusers_convert_ldm_unet_checkpoint(unet_config):
    with torch.device("meta"):
        unet = UNet(unet_config)
    checkpoint = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    _, converted = convert_unet(checkpoint, unet_config)
    renamed = {id(v): k for k, v in converted.items()}  # the conversion renames: the tensors are the same objects
    paths = [p for p, m in unet.named_modules() if isinstance(m, SpatialTransformer)]
    assert len(paths) == (16 if unet_config == UNetConfig() else 7)  # tiny: 2 down, 1 mid, 4 up
    checked = 0
    for key, value in checkpoint.items():
        key = key.removeprefix(UNET_PREFIX)
        if any(key.startswith(p + ".") for p in paths):
            module, pname = key.rsplit(".", 1)
            name = diffusers_module_name(module, unet_config.num_res_blocks)
            assert f"{name}.{pname}" == renamed[id(value)], key
            assert compvis_module_name(name, unet_config.num_res_blocks) == module
            checked += 1
    assert checked > 0


@pytest.mark.parametrize("train", ["kv", "attn2"])
def test_custom_diffusion_export_runs_in_diffusers_processors_as_our_delta(tmp_path, train):
    sd = tiny_model()
    base = to_original_layout(sd)
    delta = attach(sd, "custom", tokens=["<new1>"], train=train)
    perturb_(delta)
    weights, token_file = export_diffusers_custom_diffusion(delta, tmp_path)
    assert weights.name == "pytorch_custom_diffusion_weights.safetensors" and token_file.name == "<new1>.safetensors"

    ref = diffusers_unet(base)
    x, t, context = inputs()
    ours_base, ref_base = outputs(sd, ref, x, t, context)
    # unet.load_attn_procs' own parsing of the file, then the processors set as it would set them. (In diffusers
    # 0.42.1 load_attn_procs itself sets processors only when given _pipeline, and then wants an entry for every
    # attention layer, which a .safetensors file cannot hold: save_attn_procs drops the {} of attn1's processors.)
    # The attn1 layers keep their current processors.
    processors = ref._process_custom_diffusion(load_file(weights))
    assert len(processors) == 7 and all(name.endswith("attn2.processor") for name in processors)
    assert all(p.train_q_out == (train == "attn2") for p in processors.values())
    ref.set_attn_processor({**ref.attn_processors, **processors})

    ours, expected = outputs(sd, ref, x, t, context)
    assert rel_err(ours, ref_base) > 1e-2  # the delta changes the output
    assert rel_err(ours, expected) < TOL
    delta.fold()
    assert rel_err(outputs(sd, ref, x, t, context)[0], expected) < TOL


def test_custom_diffusion_token_file_loads_through_diffusers_textual_inversion(tmp_path):
    sd = tiny_model()
    text_encoder = transformers.CLIPTextModel(hf_clip_config(TINY["text_encoder"])).eval()
    text_encoder.load_state_dict(convert_clip(to_original_layout(sd), text_encoder), strict=True)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(write_clip_tokenizer_files(tmp_path), model_max_length=77)
    delta = attach(sd, "custom", tokens=["<new1>", "<new2>"])
    perturb_(delta)
    files = export_diffusers_custom_diffusion(delta, tmp_path / "out")[1:]

    class Pipeline(TextualInversionLoaderMixin):  # the two attributes load_textual_inversion reads of a pipeline
        hf_device_map, components = None, {}

    Pipeline().load_textual_inversion([str(f) for f in files], tokenizer=tokenizer, text_encoder=text_encoder)
    prompts = [PROMPT, "<new2> and <new1> on a beach"]
    ids = tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ids, sd.tokenizer.encode(prompts))
    with torch.no_grad():
        assert rel_err(sd.text_encoder(ids), text_encoder(ids).last_hidden_state) < TOL


@pytest.mark.parametrize("train", ["kv", "attn2"])
def test_custom_diffusion_export_then_import_gives_the_same_tensors(tmp_path, train):
    sd = tiny_model()
    delta = attach(sd, "custom", tokens=["<new1>", "<new2>"], train=train)
    perturb_(delta)
    save_delta(delta, tmp_path / "delta.safetensors")
    for source in (delta, tmp_path / "delta.safetensors"):  # a live delta or the file save_delta wrote
        weights, *token_files = export_diffusers_custom_diffusion(source, tmp_path / "st", num_res_blocks=1)
        imported = import_diffusers_custom_diffusion(tiny_model(), weights, token_files)
        assert imported.tokens == ["<new1>", "<new2>"] and imported.options["train"] == train
        expected, got = delta.state_dict(), imported.state_dict()
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)

    # .bin, as save_attn_procs(safe_serialization=False) writes it: with {} for the processors without weights
    tensors = load_file(weights)
    torch.save({**tensors, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor": {}}, tmp_path / "w.bin")
    for i, f in enumerate(token_files):
        torch.save(load_file(f), tmp_path / f"t{i}.bin")
    imported = import_diffusers_custom_diffusion(tiny_model(), tmp_path / "w.bin",
                                                 [tmp_path / "t0.bin", tmp_path / "t1.bin"])
    got = imported.state_dict()
    assert all(torch.equal(v, got[k]) for k, v in delta.state_dict().items())


def trained_by_diffusers(ref, train, seed=2):
    """Processors set up as train_custom_diffusion.py sets them (attn2: CustomDiffusionAttnProcessor started from
    the UNet's own to_k/to_v (and to_q/to_out with --freeze_model crossattn); attn1: one without weights), then
    moved off their start as training would move them."""
    g, state, procs = torch.Generator().manual_seed(seed), ref.state_dict(), {}
    for name in ref.attn_processors:
        layer = name.removesuffix(".processor")
        if name.endswith("attn1.processor"):
            procs[name] = CustomDiffusionAttnProcessor(train_kv=False, train_q_out=False)
            continue
        weights = {f"to_{x}_custom_diffusion.weight": state[f"{layer}.to_{x}.weight"] for x in "kv"}
        if train == "attn2":
            weights.update({"to_q_custom_diffusion.weight": state[f"{layer}.to_q.weight"],
                            "to_out_custom_diffusion.0.weight": state[f"{layer}.to_out.0.weight"],
                            "to_out_custom_diffusion.0.bias": state[f"{layer}.to_out.0.bias"]})
        to_q = ref.get_submodule(layer).to_q
        procs[name] = CustomDiffusionAttnProcessor(train_kv=True, train_q_out=train == "attn2",
                                                   hidden_size=to_q.out_features,
                                                   cross_attention_dim=ref.config.cross_attention_dim)
        procs[name].load_state_dict({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in weights.items()})
    ref.set_attn_processor(procs)


@pytest.mark.parametrize("train, safe", [("kv", True), ("kv", False), ("attn2", True)])
def test_custom_diffusion_written_by_diffusers_imports_to_the_same_outputs(tmp_path, train, safe):
    sd = tiny_model()
    ref = diffusers_unet(to_original_layout(sd))
    x, t, context = inputs()
    base = outputs(sd, ref, x, t, context)[0]
    trained_by_diffusers(ref, train)
    ref.save_attn_procs(tmp_path, safe_serialization=safe)  # train_custom_diffusion.py's last step
    weights = tmp_path / ("pytorch_custom_diffusion_weights." + ("safetensors" if safe else "bin"))
    row = torch.randn(TINY["text_encoder"].hidden_size)
    token_file = tmp_path / "<new1>.bin"  # save_new_embed: {token: row}, as safetensors under .bin or pickled
    save_file({"<new1>": row}, token_file) if safe else torch.save({"<new1>": row}, token_file)

    delta = import_diffusers_custom_diffusion(sd, weights, [token_file])
    assert delta.tokens == ["<new1>"] and delta.options["train"] == train
    ours, expected = outputs(sd, ref, x, t, context)
    assert rel_err(expected, base) > 1e-2  # the trained processors change the output
    assert rel_err(ours, expected) < TOL
    assert torch.equal(delta.state_dict()["modifier_tokens"][0], row)
    delta.fold()
    token_id = sd.tokenizer.encode(["<new1>"])[0, 1]
    assert torch.equal(sd.text_encoder.embeddings.token_embedding.weight[token_id], row)
    assert rel_err(outputs(sd, ref, x, t, context)[0], expected) < TOL


def test_custom_diffusion_import_refuses_other_files_and_leaves_the_model_free(tmp_path):
    sd = tiny_model()
    torch.save({"down_blocks.0.attentions.0.proj_out.lora_A.weight": torch.zeros(3, 64, 1, 1)}, tmp_path / "x.bin")
    with pytest.raises(NanocustomError, match="not a Custom Diffusion processor weight"):
        import_diffusers_custom_diffusion(sd, tmp_path / "x.bin")
    delta = attach(sd, "custom")
    weights = export_diffusers_custom_diffusion(delta, tmp_path)[0]
    delta.detach()
    partial = dict(list(load_file(weights).items())[1:])  # one weight missing
    with pytest.raises(NanocustomError, match="missing"):
        import_diffusers_custom_diffusion(sd, _save(partial, tmp_path / "partial.safetensors"))
    assert sd.delta is None
    with pytest.raises(NanocustomError, match="only a custom delta"):
        export_diffusers_custom_diffusion(attach(sd, "residual"), tmp_path)


def test_residual_lora_loaded_by_diffusers_gives_our_outputs(tmp_path):
    sd = tiny_model()
    base = to_original_layout(sd)
    delta = attach(sd, "residual", tokens=["<new1>"])
    perturb_(delta)
    lora_path, token_file = export_residual_lora(delta, tmp_path / "lora.safetensors")
    assert token_file.name == "<new1>.safetensors"

    # one rank for every module (the smaller ones zero-padded), so no diffusers version can scale them differently
    ranks = {layer.A.shape[1] for layer in delta.layers.values()}
    written = load_file(lora_path)
    assert len(ranks) > 1 and {v.shape[1 if ".lora_B." in k else 0] for k, v in written.items()} == {max(ranks)}

    # pipeline.load_lora_weights(path) without a pipeline: its two steps, diffusers' parser, then peft
    state_dict, network_alphas = StableDiffusionPipeline.lora_state_dict(str(lora_path))
    assert network_alphas is None and all(k.startswith("unet.") and "lora" in k for k in state_dict)
    ref = diffusers_unet(base)
    StableDiffusionPipeline.load_lora_into_unet(state_dict, network_alphas, unet=ref, adapter_name="concept")
    lora_layers = {name for name, m in ref.named_modules() if hasattr(m, "lora_A")}
    assert lora_layers == {diffusers_module_name(k.removeprefix("unet."), 1) for k in delta.layers}
    assert all(ref.get_submodule(name).scaling["concept"] == 1.0 for name in lora_layers)  # W' = W + A B

    x, t, context = inputs()
    ours, expected = outputs(sd, ref, x, t, context)
    assert rel_err(ours, outputs(sd, diffusers_unet(base), x, t, context)[1]) > 1e-2  # the delta changes the output
    assert rel_err(ours, expected) < TOL
    delta.fold()
    assert rel_err(outputs(sd, ref, x, t, context)[0], expected) < TOL


@pytest.mark.parametrize("method", ["custom", "svdiff", "residual"])
def test_folded_checkpoint_loads_back_identically_and_converts_with_diffusers_single_file(tmp_path, method):
    sd = tiny_model()
    delta = attach(sd, method, tokens=["<new1>"])
    perturb_(delta)
    x, t, _ = inputs()
    with torch.no_grad():
        context = sd.text_encoder(sd.tokenizer.encode([PROMPT, "a dog"]))
        unfolded = sd.unet(x, t, context)
    save_folded(sd, tmp_path / "folded.safetensors")
    assert sd.delta is None

    loaded = load(tmp_path / "folded.safetensors")
    assert loaded.tokenizer.added_tokens == ["<new1>"] and loaded.metadata["folded_delta"]["method"] == method
    ids = loaded.tokenizer.encode([PROMPT, "a dog"])
    assert torch.equal(ids, sd.tokenizer.encode([PROMPT, "a dog"]))
    with torch.no_grad():
        assert torch.equal(loaded.text_encoder(ids), sd.text_encoder(ids))
        assert rel_err(loaded.text_encoder(ids), context) < 1e-6
        got = loaded.unet(x, t, context)
        assert torch.equal(got, sd.unet(x, t, context))
    assert rel_err(got, unfolded) < 1e-5

    state_dict, _ = read_state_dict(tmp_path / "folded.safetensors")
    ref = diffusers_unet(state_dict)  # diffusers' single-file conversion, loaded strictly
    with torch.no_grad():
        assert rel_err(ref(x, t, encoder_hidden_states=context).sample, got) < TOL


def test_save_folded_needs_an_attached_delta(tmp_path):
    with pytest.raises(NanocustomError, match="no delta is attached"):
        save_folded(tiny_model(), tmp_path / "x.safetensors")


def test_read_tensors_reads_safetensors_saved_under_a_bin_name(tmp_path):
    # train_custom_diffusion.py's save_new_embed writes safetensors into "<new1>.bin"
    _save({"<new1>": torch.arange(4.0)}, tmp_path / "<new1>.bin")
    assert torch.equal(read_tensors(tmp_path / "<new1>.bin")["<new1>"], torch.arange(4.0))
