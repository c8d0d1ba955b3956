"""Deltas in the formats other Stable Diffusion v1 tools read: diffusers' Custom Diffusion files, a LoRA, a folded
single-file checkpoint.

    export_diffusers_custom_diffusion(delta, "out/")   # pytorch_custom_diffusion_weights.safetensors + <new1>.safetensors
    import_diffusers_custom_diffusion(sd, "out/pytorch_custom_diffusion_weights.safetensors", ["out/<new1>.safetensors"])
    export_residual_lora(delta, "dog_lora.safetensors")  # Ham et al.'s Delta W = A B as lora_B @ lora_A, scale 1
    save_folded(sd, "dog.safetensors")                  # fold the attached delta, write an original-layout checkpoint

diffusers names the UNet's modules by block (`down_blocks.0.attentions.1`), the CompVis checkpoint by position
(`input_blocks.2.1`). The mapping is the block arithmetic of diffusers' `convert_ldm_unet_checkpoint`, computed
below from `num_res_blocks`; tests/test_interop.py checks it against that function. Like the rest of the library,
this file does not import diffusers: the files are plain safetensors with diffusers' key names.
"""
from pathlib import Path

import torch
from safetensors.torch import load_file

from nanocustom import checkpoint
from nanocustom.checkpoint import save_atomic
from nanocustom.errors import NanocustomError
from nanocustom.personalize import RARE_TOKENS, Delta, attach, read_delta_metadata, read_delta_tensors

CUSTOM_DIFFUSION_WEIGHTS = "pytorch_custom_diffusion_weights.safetensors"  # the name unet.save_attn_procs gives
SD_V1_NUM_RES_BLOCKS = 2
# Our Linear in attn2 -> its copy in diffusers' CustomDiffusionAttnProcessor ("attn2": to_q and to_out trained too)
CUSTOM_DIFFUSION_NAMES = {"to_q": "to_q_custom_diffusion", "to_k": "to_k_custom_diffusion",
                          "to_v": "to_v_custom_diffusion", "to_out.0": "to_out_custom_diffusion.0"}


# -----------------------------------------------------------------------------
# CompVis module paths <-> diffusers module paths, for what lives in a SpatialTransformer

def diffusers_module_name(path, num_res_blocks=SD_V1_NUM_RES_BLOCKS):
    """"input_blocks.2.1.transformer_blocks.0.attn2" -> "down_blocks.0.attentions.1.transformer_blocks.0.attn2".

    Each level of input_blocks holds num_res_blocks Res(+ST) blocks and then a Downsample (input_blocks.0 is conv_in);
    output_blocks hold num_res_blocks + 1 per level; the ST is sub-module 1 of its block. Inside the ST the names agree."""
    parts = path.split(".")
    n = num_res_blocks + 1  # blocks per level
    if parts[0] == "middle_block" and parts[1:2] == ["1"]:
        return ".".join(["mid_block.attentions.0", *parts[2:]])
    if parts[0] in ("input_blocks", "output_blocks") and len(parts) > 2 and parts[2] == "1" and parts[1].isdigit():
        i = int(parts[1])
        if parts[0] == "input_blocks" and i > 0 and (i - 1) % n < num_res_blocks:
            return ".".join([f"down_blocks.{(i - 1) // n}.attentions.{(i - 1) % n}", *parts[3:]])
        if parts[0] == "output_blocks":
            return ".".join([f"up_blocks.{i // n}.attentions.{i % n}", *parts[3:]])
    raise NanocustomError(f"{path} is not inside a SpatialTransformer of an SD v1 UNet with num_res_blocks="
                          f"{num_res_blocks}; pass the UNet's num_res_blocks")


def compvis_module_name(name, num_res_blocks=SD_V1_NUM_RES_BLOCKS):
    """The inverse of diffusers_module_name."""
    parts = name.split(".")
    n = num_res_blocks + 1
    if parts[:3] == ["mid_block", "attentions", "0"]:
        return ".".join(["middle_block.1", *parts[3:]])
    if len(parts) > 3 and parts[0] in ("down_blocks", "up_blocks") and parts[2] == "attentions" \
            and parts[1].isdigit() and parts[3].isdigit() and int(parts[3]) < n:
        level, j = int(parts[1]), int(parts[3])
        if parts[0] == "down_blocks" and j < num_res_blocks:
            return ".".join([f"input_blocks.{level * n + j + 1}.1", *parts[4:]])
        if parts[0] == "up_blocks":
            return ".".join([f"output_blocks.{level * n + j}.1", *parts[4:]])
    raise NanocustomError(f"{name} is not inside an attention block of a diffusers SD v1 UNet with num_res_blocks="
                          f"{num_res_blocks}; pass the UNet's num_res_blocks")


# -----------------------------------------------------------------------------
# reading and writing

def read_tensors(path):
    """A flat {name: tensor} from .safetensors, or from a .bin read with torch.load(weights_only=True).
    train_custom_diffusion.py writes its token files as safetensors under a .bin name, so .bin is tried as
    safetensors first. Non-tensor values (save_attn_procs' `{}` for processors without weights) are dropped."""
    path = Path(path)
    if not path.is_file():
        raise NanocustomError(f"file not found: {path}")
    try:
        return load_file(str(path))
    except Exception:
        if path.suffix == ".safetensors":
            raise NanocustomError(f"cannot read {path.name}: truncated or not safetensors; export it again") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise NanocustomError(f"cannot read {path.name} as tensors ({type(e).__name__}); "
                              "pass a .safetensors file, or a .bin that holds only tensors") from None
    if not isinstance(data, dict):
        raise NanocustomError(f"{path.name} holds a {type(data).__name__}, not a dict of tensors")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def _delta_tensors(delta_or_path, method, num_res_blocks, sd=None):
    """(tensors, tokens, num_res_blocks) of a live Delta or a file save_delta wrote."""
    if isinstance(delta_or_path, Delta):
        delta = delta_or_path
        if delta.method != method:
            raise NanocustomError(f"this is a {delta.method} delta; only a {method} delta can be exported this way")
        delta._check_live()
        return delta.state_dict(), delta.tokens, delta.sd.unet.config.num_res_blocks
    info = read_delta_metadata(delta_or_path)
    if info["method"] != method:
        raise NanocustomError(f"{Path(delta_or_path).name} is a {info['method']} delta; "
                              f"only a {method} delta can be exported this way")
    tensors = read_delta_tensors(sd, delta_or_path, info, device="cpu")  # a compressed file needs sd's W0
    return tensors, info.get("tokens", []), num_res_blocks or SD_V1_NUM_RES_BLOCKS


def _write_token_files(out_dir, tokens, rows):
    """One file per token, {token: embedding [hidden]}: what pipeline.load_textual_inversion reads, as
    train_custom_diffusion.py's save_new_embed writes it."""
    paths = []
    for token, row in zip(tokens, rows):
        path = Path(out_dir) / f"{token}.safetensors"
        save_atomic({token: row.detach().contiguous().cpu()}, path, metadata={"format": "pt"})
        paths.append(path)
    return paths


# -----------------------------------------------------------------------------
# Custom Diffusion <-> diffusers' CustomDiffusionAttnProcessor files

def export_diffusers_custom_diffusion(delta_or_path, out_dir, num_res_blocks=None, sd=None):
    """Write a Custom Diffusion delta as train_custom_diffusion.py leaves it: the processors' weights, keyed
    "<attn2 path>.processor.to_k_custom_diffusion.weight" (unet.save_attn_procs' names), and a textual-inversion
    file per modifier token. num_res_blocks: taken from the model for a live delta, else SD v1's 2. sd: the base
    model, needed to read a low-rank (compressed) delta file. Returns the paths written, the weights first."""
    tensors, tokens, num_res_blocks = _delta_tensors(delta_or_path, "custom", num_res_blocks, sd)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = {}
    for key, value in tensors.items():
        if key == "modifier_tokens":
            continue
        path, pname = key.removeprefix("unet.").rsplit(".", 1)  # "...attn2.to_out.0", "bias"
        attn, linear = path.split(".attn2.")
        processor = diffusers_module_name(attn + ".attn2", num_res_blocks) + ".processor"
        weights[f"{processor}.{CUSTOM_DIFFUSION_NAMES[linear]}.{pname}"] = value.contiguous().cpu()
    paths = [out_dir / CUSTOM_DIFFUSION_WEIGHTS]
    save_atomic(weights, paths[0], metadata={"format": "pt"})
    return paths + _write_token_files(out_dir, tokens, tensors.get("modifier_tokens", []))


def import_diffusers_custom_diffusion(sd, weights_path, token_files=()):
    """Attach to sd the Custom Diffusion delta in diffusers' files (.safetensors or .bin): the processors' weights
    and one textual-inversion file ({token: embedding}) per modifier token. Returns the attached Delta."""
    weights = read_tensors(weights_path)
    ours, num_res_blocks = {}, sd.unet.config.num_res_blocks
    linears = {v: k for k, v in CUSTOM_DIFFUSION_NAMES.items()}
    for key, value in weights.items():
        processor, sep, rest = key.partition(".processor.")
        linear, _, pname = rest.rpartition(".")
        if not sep or linear not in linears:
            raise NanocustomError(f"{Path(weights_path).name}: {key} is not a Custom Diffusion processor weight; "
                                  "pass the file unet.save_attn_procs wrote")
        ours[f"unet.{compvis_module_name(processor, num_res_blocks)}.{linears[linear]}.{pname}"] = value
    tokens, rows = [], []
    for path in token_files:
        embedding = read_tensors(path)
        if len(embedding) != 1:
            raise NanocustomError(f"{Path(path).name} holds {len(embedding)} tensors; a token file holds one, "
                                  "{token: embedding}")
        (token, row), = embedding.items()
        tokens.append(token)
        rows.append(row.reshape(-1))
    train = "attn2" if any(".to_q_custom_diffusion." in k for k in weights) else "kv"
    init_from = RARE_TOKENS if len(tokens) <= len(RARE_TOKENS) else list(range(len(tokens)))  # rows replaced below
    delta = attach(sd, "custom", tokens=tokens, init_from=init_from, train=train)
    if tokens:
        ours["modifier_tokens"] = torch.stack(rows)
    try:
        delta.load_state_dict(ours)
    except NanocustomError:
        delta.detach()
        raise
    return delta


# -----------------------------------------------------------------------------
# Personalized residuals as a LoRA

def export_residual_lora(delta_or_path, path, num_res_blocks=None):
    """Write each proj_out's residual Delta W = A B (Ham et al. §3.2) as a LoRA in diffusers/peft's key format,
    which pipeline.load_lora_weights reads: "unet.<module>.lora_A.weight" = B (down, [r, m, 1, 1]) and
    "lora_B.weight" = A (up, [m, r, 1, 1]), the shapes of peft's LoRA for a 1x1 Conv2d. No alphas are written:
    diffusers then sets alpha = rank for every module, scale 1, so W' = W + A B exactly. Modifier tokens, if any,
    go beside it as textual-inversion files. Returns the paths written, the LoRA first."""
    tensors, tokens, num_res_blocks = _delta_tensors(delta_or_path, "residual", num_res_blocks)
    lora = {}
    for key, value in tensors.items():
        if key == "modifier_tokens":
            continue
        module, name = key.removeprefix("unet.").rsplit(".", 1)  # "...proj_out", "A"
        if name in ("A", "B"):
            down_or_up = {"B": "lora_A", "A": "lora_B"}[name]
            lora[f"unet.{diffusers_module_name(module, num_res_blocks)}.{down_or_up}.weight"] = \
                value[:, :, None, None].contiguous().cpu()
    path = Path(path)
    save_atomic(lora, path, metadata={"format": "pt"})
    return [path] + _write_token_files(path.parent, tokens, tensors.get("modifier_tokens", []))


# -----------------------------------------------------------------------------
# A delta folded into a full checkpoint

def save_folded(sd, path, dtype=None):
    """Fold sd's attached delta into its weights and write the whole model in the original single-file layout
    (checkpoint.save): the modifier tokens become the grown embedding table and the metadata's added_tokens,
    and the delta's own metadata is kept under "folded_delta". sd is left folded; the delta is spent."""
    delta = getattr(sd, "delta", None)
    if delta is None:
        raise NanocustomError("no delta is attached to this model; attach or load one, or use checkpoint.save")
    info = delta.metadata()
    delta.fold()
    checkpoint.save(sd, path, dtype=dtype, folded_delta=info)
