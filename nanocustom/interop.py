"""Deltas in the formats other Stable Diffusion v1 tools read: diffusers' Custom Diffusion files, a LoRA, a folded
single-file checkpoint.

    export_diffusers_custom_diffusion(delta, "out/")   # pytorch_custom_diffusion_weights.safetensors + <new1>.safetensors
    import_diffusers_custom_diffusion(sd, "out/pytorch_custom_diffusion_weights.safetensors", ["out/<new1>.safetensors"])
    export_residual_lora(delta, "dog_lora.safetensors")  # Ham et al.'s Delta W = A B as lora_B @ lora_A, scale 1
    save_folded(sd, "dog.safetensors")                  # fold the attached delta, write an original-layout checkpoint

or from the shell (--ckpt: the base model; default: the shapes model):

    python -m nanocustom.interop from-diffusers out/ --out concept.safetensors    # then sample.py --delta
    python -m nanocustom.interop to-diffusers concept.safetensors --out exported/  # Custom Diffusion, or residuals as a LoRA
    python -m nanocustom.interop fold concept.safetensors --out full.safetensors   # any method

diffusers names the UNet's modules by block (`down_blocks.0.attentions.1`), the CompVis checkpoint by position
(`input_blocks.2.1`). The mapping is the block arithmetic of diffusers' `convert_ldm_unet_checkpoint`, computed
below from `num_res_blocks`; tests/test_interop.py checks it against that function. Like the rest of the library,
this file does not import diffusers: the files are plain safetensors with diffusers' key names.
"""
import argparse
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from nanocustom import checkpoint
from nanocustom.checkpoint import load, save_atomic
from nanocustom.errors import NanocustomError, run_script
from nanocustom.personalize import (RARE_TOKENS, Delta, attach, base_fingerprint, check_made_for, load_delta,
                                    read_delta_metadata, read_delta_tensors, save_delta)

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
    "lora_B.weight" = A (up, [m, r, 1, 1]), the shapes of peft's LoRA for a 1x1 Conv2d. Every module is written at
    the largest rank, its A and B padded with zeros (A B unchanged), and no alphas: diffusers then gives every module
    alpha = rank, scale 1, so W' = W + A B exactly. (With ranks 0.05 m_i, 16 to 64 at SD v1 size, older diffusers
    took one module's rank as everyone's alpha: scales 1, 0.5 and 0.25.) Modifier tokens, if any, go beside it as
    textual-inversion files. Returns the paths written, the LoRA first."""
    tensors, tokens, num_res_blocks = _delta_tensors(delta_or_path, "residual", num_res_blocks)
    rank = max(v.shape[1] for k, v in tensors.items() if k.endswith(".A"))
    lora = {}
    for key, value in tensors.items():
        if key == "modifier_tokens":
            continue
        module, name = key.removeprefix("unet.").rsplit(".", 1)  # "...proj_out", "A"
        if name in ("A", "B"):
            down_or_up = {"B": "lora_A", "A": "lora_B"}[name]
            padded = F.pad(value, (0, rank - value.shape[1]) if name == "A" else (0, 0, 0, rank - value.shape[0]))
            lora[f"unet.{diffusers_module_name(module, num_res_blocks)}.{down_or_up}.weight"] = \
                padded[:, :, None, None].contiguous().cpu()
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


# -----------------------------------------------------------------------------
# The command line: python -m nanocustom.interop from-diffusers | to-diffusers | fold

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the name pipeline.load_lora_weights(folder) looks for


def find_diffusers_files(source):
    """The Custom Diffusion weights and the token files train_custom_diffusion.py left in a folder (or beside the
    weights file given): pytorch_custom_diffusion_weights.{safetensors,bin} and one <token>.{safetensors,bin} each."""
    source = Path(source)
    if source.is_dir():
        found = [source / CUSTOM_DIFFUSION_WEIGHTS, source / CUSTOM_DIFFUSION_WEIGHTS.replace(".safetensors", ".bin")]
        weights = next((f for f in found if f.is_file()), None)
        if weights is None:
            raise NanocustomError(f"{source} holds no {CUSTOM_DIFFUSION_WEIGHTS} (or .bin); pass the output folder "
                                  "of train_custom_diffusion.py, or the weights file itself")
    elif source.is_file():
        weights = source
    else:
        raise NanocustomError(f"{source} does not exist; pass the output folder of train_custom_diffusion.py")
    tokens = sorted(f for f in weights.parent.iterdir()
                    if f.stem.startswith("<") and f.stem.endswith(">") and f.suffix in (".safetensors", ".bin"))
    return weights, tokens


def check_out(out, is_dir=False):
    out = Path(out)
    if is_dir and out.exists() and not out.is_dir():
        raise NanocustomError(f"--out {out} is a file, not a directory; choose a directory")
    parent = out if is_dir and out.is_dir() else out.parent
    if not is_dir and out.suffix != ".safetensors":
        raise NanocustomError(f"--out {out} must end in .safetensors")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise NanocustomError(f"--out {out}: {parent} is not a writable directory; create it or choose another")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m nanocustom.interop", description="Convert deltas to and from the "
                                "formats other SD v1 tools read. --ckpt: the base model (default: the shapes model).")
    commands = p.add_subparsers(dest="command", required=True)
    c = commands.add_parser("from-diffusers", help="a Custom Diffusion concept trained with diffusers' "
                            "train_custom_diffusion.py -> a nanocustom delta for sample.py --delta")
    c.add_argument("source", help="its output folder, or the weights file (token files are read beside it)")
    c = commands.add_parser("to-diffusers", help="a Custom Diffusion delta -> diffusers' Custom Diffusion files; "
                            f"a residual delta -> a LoRA ({LORA_WEIGHTS}) for pipeline.load_lora_weights")
    c.add_argument("delta")
    c = commands.add_parser("fold", help="a delta folded into a full checkpoint in the original single-file layout")
    c.add_argument("delta")
    c.add_argument("--fp16", action="store_true", help="store the weights in fp16 (half the size)")
    outs = {"from-diffusers": "the delta, FILE.safetensors", "to-diffusers": "a folder (created if its parent "
            "exists)", "fold": "the checkpoint, FILE.safetensors"}
    for name, c in commands.choices.items():
        c.add_argument("--ckpt", default=None, help="the base model the delta belongs to (default: the shapes model)")
        c.add_argument("--out", required=True, help=outs[name])
        if name != "from-diffusers":
            c.add_argument("--force", action="store_true", help="use a delta made for another base model anyway")
    args = p.parse_args(argv)
    out = check_out(args.out, is_dir=args.command == "to-diffusers")
    if args.command == "from-diffusers":  # the input checked before the model is loaded
        weights, token_files = find_diffusers_files(args.source)
    else:
        info = read_delta_metadata(args.delta)
        if args.command == "to-diffusers" and info["method"] == "svdiff":
            raise NanocustomError("diffusers has no format for SVDiff's spectral shifts; write a full checkpoint "
                                  "with `python -m nanocustom.interop fold` instead")
    sd = load(args.ckpt)

    if args.command == "from-diffusers":
        delta = import_diffusers_custom_diffusion(sd, weights, token_files)
        save_delta(delta, out, extra_metadata={"imported_from": str(weights)})
        print(f"wrote {out}: Custom Diffusion ({delta.options['train']}), tokens {', '.join(delta.tokens) or 'none'}, "
              f"for base model {base_fingerprint(sd)} ({sd.name})")
        return
    check_made_for(sd, args.delta, info, args.force, "pass the --ckpt it was trained on, or --force")
    if args.command == "fold":
        load_delta(sd, args.delta, force=True)
        save_folded(sd, out, dtype=torch.float16 if args.fp16 else None)
        print(f"wrote {out}: {sd.name} with {Path(args.delta).name} folded in")
        return
    out.mkdir(exist_ok=True)
    num_res_blocks = sd.unet.config.num_res_blocks
    if info["method"] == "custom":
        paths = export_diffusers_custom_diffusion(args.delta, out, num_res_blocks=num_res_blocks, sd=sd)
    else:
        paths = export_residual_lora(args.delta, out / LORA_WEIGHTS, num_res_blocks=num_res_blocks)
    print(f"wrote {', '.join(f.name for f in paths)} to {out}/")


if __name__ == "__main__":
    run_script(main)
