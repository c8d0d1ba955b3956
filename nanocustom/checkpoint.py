"""Reading and writing original single-file Stable Diffusion v1 checkpoints.

An SD v1 file (`v1-5-pruned-emaonly.safetensors`, `sd-v1-4.ckpt`) holds three models under three key
prefixes. Our modules are named as CompVis named them, so loading is: strip the prefix, `load_state_dict`.
Checkpoints that nanocustom writes use the same layout and carry their configs as safetensors metadata,
so the shapes model and SD v1 load through the same `load()`.
"""
import hashlib
import json
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nanocustom.clip import CLIPTextConfig, CLIPTextModel, Tokenizer
from nanocustom.diffusion import Diffusion
from nanocustom.errors import NanocustomError
from nanocustom.unet import UNet, UNetConfig
from nanocustom.vae import AutoencoderKL, VAEConfig

PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.text_model.",
}
# Some SD v1 files (written with older transformers) keep CLIP's modules one level up, without "text_model."
OLD_TEXT_PREFIX = re.compile(r"^cond_stage_model\.transformer\.(?=(embeddings|encoder|final_layer_norm)\.)")
# Keys an SD v1 file holds that are not weights of the three models: the DDPM schedule the training code
# stored as buffers, the EMA copy in non-EMA-only files (the non-EMA weights load, as CompVis' use_ema: False
# and diffusers do), and CLIP's constant position_ids buffer.
IGNORED = re.compile(r"^(betas|alphas_cumprod(_prev)?|sqrt_.*|log_one_minus_alphas_cumprod|posterior_.*|logvar"
                     r"|lvlb_weights|model_ema\..*|.*position_ids|loss\..*)$")  # loss.*: a VAE's training loss
SD_V1_LATENT_SCALE = 0.18215  # Rombach et al. §4.3.2: scales SD v1's latents to about unit variance
SD_V1_RESOLUTION = 512
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINT = REPO_ROOT / "weights" / "shapes.safetensors"


class CheckpointError(NanocustomError):
    """A checkpoint that cannot be used; the message is one line naming the problem and the fix."""


@dataclass
class StableDiffusion:
    tokenizer: Tokenizer
    text_encoder: CLIPTextModel
    unet: UNet
    vae: AutoencoderKL
    latent_scale: float = SD_V1_LATENT_SCALE
    resolution: int = SD_V1_RESOLUTION  # native image size in pixels
    prediction_type: str = "eps"
    schedule: dict = field(default_factory=dict)  # Diffusion's settings where they differ from SD v1's
    name: str = ""
    fingerprint: str = ""  # identifies the base weights, so deltas refuse a base they were not made for
    metadata: dict = field(default_factory=dict)

    @property
    def device(self):
        return next(self.unet.parameters()).device

    @property
    def diffusion(self):
        """The noise schedule this model was trained with: SD v1's unless `schedule` says otherwise."""
        return Diffusion(**self.schedule)

    @property
    def dtype(self):
        return next(self.unet.parameters()).dtype

    def to(self, device=None, dtype=None):
        """Move the three models (in place, like nn.Module.to) and return self."""
        for module in (self.text_encoder, self.unet, self.vae):
            module.to(device=device, dtype=dtype)
        return self


def new_model(unet=None, vae=None, text_encoder=None, **settings):
    """A randomly initialised model of the given configs (SD v1 by default); settings as in StableDiffusion."""
    return StableDiffusion(Tokenizer(), CLIPTextModel(text_encoder).eval(), UNet(unet).eval(),
                           AutoencoderKL(vae).eval(), **settings)


def read_state_dict(path):
    """Read a .safetensors or .ckpt file -> (state_dict without the IGNORED keys, metadata). Never unpickles
    arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}; pass the path of an SD v1 .safetensors/.ckpt file")
    try:
        if path.suffix == ".safetensors":  # only the kept tensors are read: not the 3.4 GB of a full file's EMA copy
            with safe_open(str(path), "pt") as f:
                warn_of_ema(path, f.keys())
                return {k: f.get_tensor(k) for k in f.keys() if not IGNORED.match(k)}, f.metadata() or {}
        # mmap needs torch.save's zip format; a bare pickle (older torch, or hand-made) is read whole, still safely
        with warnings.catch_warnings():  # torch warns of pickle protocols it did not write, before refusing
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        why = [line.strip() for line in str(e).splitlines() if line.strip().startswith("Unsupported")]
        raise CheckpointError(f"refusing to load {path.name}: its pickle holds code or objects other than tensors"
                              f"{f' ({why[0][:120]})' if why else ''}; convert it to .safetensors with a tool you "
                              "trust") from e
    except Exception as e:
        raise CheckpointError(f"cannot read {path.name}: truncated or not a checkpoint "
                              f"({type(e).__name__}); download it again") from e
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise CheckpointError(f"{path.name} is not a state dict of tensors; pass an SD v1 checkpoint")
    warn_of_ema(path, checkpoint.keys())
    return {k: v for k, v in checkpoint.items() if not IGNORED.match(k)}, {}


def warn_of_ema(path, keys):
    if any(k.startswith("model_ema.") for k in keys):
        warnings.warn(f"{path.name} holds an EMA copy of the UNet too; loading the other (non-EMA) weights, as "
                      "CompVis' use_ema: False and diffusers do; for sampling, the EMA-only file is the usual choice")


def check_family(state_dict, name):
    """Refuse, in one line, checkpoints of other model families before any shape error can."""
    keys = state_dict.keys()
    if any(k.startswith("conditioner.embedders") for k in keys):
        raise CheckpointError(f"{name} is an SDXL checkpoint; nanocustom implements Stable Diffusion v1 (1.x) only")
    to_k = state_dict.get(PREFIXES["unet"] + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if any(k.startswith("cond_stage_model.model.") for k in keys) or (to_k is not None and to_k.shape[1] == 1024):
        raise CheckpointError(f"{name} is an SD 2.x checkpoint (OpenCLIP text encoder, 1024-wide context); "
                              "nanocustom implements Stable Diffusion v1 (1.x) only")
    if not any(k.startswith(PREFIXES["unet"]) for k in keys):
        raise CheckpointError(f"{name} has no {PREFIXES['unet']}* weights: not a Stable Diffusion v1 checkpoint")


def split_state_dict(state_dict):
    """One flat original-layout state dict -> {"unet": ..., "vae": ..., "text_encoder": ...} and leftovers."""
    parts, unexpected = {part: {} for part in PREFIXES}, []
    for key, value in state_dict.items():
        key = OLD_TEXT_PREFIX.sub(PREFIXES["text_encoder"], key)
        part = next((p for p, prefix in PREFIXES.items() if key.startswith(prefix)), None)
        if part is not None and not IGNORED.match(key[len(PREFIXES[part]):]):
            parts[part][key[len(PREFIXES[part]):]] = value
        elif part is None and not IGNORED.match(key):
            unexpected.append(key)
    return parts, unexpected


def load_strict(module, state_dict, name):
    """load_state_dict(strict=True), but reporting every missing, unexpected and mis-shaped key at once."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [f"{k} {tuple(state_dict[k].shape)} != {tuple(v.shape)}"
                 for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or misshaped:
        problems = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in
                    (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if v]
        raise CheckpointError(f"{name} does not match the model config: " + "; ".join(problems))
    module.load_state_dict(state_dict, strict=True, assign=True)


def fingerprint(state_dict):
    """A short id of the weights: a hash of every key, shape and tensor's leading values (of the keys load()
    keeps, so a file repacked without its EMA copy or schedule buffers keeps its id).

    Values are rounded to fp16 first, so the fp32 and fp16 files of one model share a fingerprint."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        h.update(f"{key}{tuple(state_dict[key].shape)}".encode())
        h.update(state_dict[key].flatten()[:1024].half().numpy().tobytes())
    return h.hexdigest()[:16]


def resolve(path_or_repo):
    """A local path, or `owner/repo/file.safetensors` on the Hugging Face Hub (needs a network)."""
    if path_or_repo is None:
        if not DEFAULT_CHECKPOINT.is_file():
            raise CheckpointError(f"the shapes model {DEFAULT_CHECKPOINT} is missing; pass --ckpt PATH to an SD v1 file")
        return DEFAULT_CHECKPOINT
    path = Path(path_or_repo).expanduser()
    parts = str(path_or_repo).split("/")
    looks_local = path.is_absolute() or parts[0] in (".", "..", "~") or Path(parts[0]).exists()
    if path.exists() or looks_local or len(parts) < 3 or path.suffix not in (".safetensors", ".ckpt"):
        return path
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        from huggingface_hub import hf_hub_download
        return Path(hf_hub_download(repo_id, filename))
    except Exception as e:
        raise CheckpointError(f"could not download {filename} from {repo_id} ({type(e).__name__}); "
                              "download it yourself and pass its local path") from e


def load(path_or_repo=None, device="cpu", dtype=torch.float32):
    """Load an original single-file SD v1 checkpoint (or one nanocustom wrote) -> StableDiffusion."""
    path = resolve(path_or_repo)
    state_dict, metadata = read_state_dict(path)
    check_family(state_dict, path.name)
    try:
        info = json.loads(metadata.get("nanocustom", "{}"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path.name}: its nanocustom metadata is not JSON ({e.msg}); write it again with "
                              "checkpoint.save") from None
    conv_in = state_dict.get(PREFIXES["unet"] + "input_blocks.0.0.weight")
    if not info and conv_in is not None and conv_in.shape[1] != 4:  # SD v1's UNet reads the 4 latent channels alone
        raise CheckpointError(f"{path.name}'s UNet reads {conv_in.shape[1]} channels: an inpainting (9) or "
                              "instruct-pix2pix (8) checkpoint; nanocustom implements text-to-image SD v1 only")
    parts, unexpected = split_state_dict(state_dict)
    if unexpected:
        raise CheckpointError(f"{path.name} holds {len(unexpected)} keys outside the three SD v1 models "
                              f"(e.g. {unexpected[0]}); is it an SD v1 checkpoint?")
    kept = {PREFIXES[name] + key: value for name, part in parts.items() for key, value in part.items()}
    tokenizer = Tokenizer()
    tokenizer.add_tokens(info.get("added_tokens", []))
    def config(cls, name):  # JSON turned the configs' tuples into lists
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in info[name].items()}) if name in info else None

    with torch.device("meta"):  # no random init: the weights come from the file
        unet = UNet(config(UNetConfig, "unet"))
        vae = AutoencoderKL(config(VAEConfig, "vae"))
        text_encoder = CLIPTextModel(config(CLIPTextConfig, "text_encoder"))
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        load_strict(module, parts[name], f"{path.name} ({name})")
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return StableDiffusion(tokenizer, text_encoder, unet, vae,
                           latent_scale=info.get("latent_scale", SD_V1_LATENT_SCALE),
                           resolution=info.get("resolution", SD_V1_RESOLUTION),
                           prediction_type=info.get("prediction_type", "eps"), schedule=info.get("schedule", {}),
                           name=path.name, fingerprint=info.get("fingerprint") or fingerprint(kept),
                           metadata=info)


def to_original_layout(sd):
    """The three models' weights under the original single-file prefixes."""
    return {PREFIXES[name] + key: value.detach().contiguous()
            for name, module in (("unet", sd.unet), ("vae", sd.vae), ("text_encoder", sd.text_encoder))
            for key, value in module.state_dict().items()}


def atomic_write(path, write):
    """write(tmp) to a temporary file beside path, then rename it onto path: a crash or Ctrl-C never leaves a
    partial file under the real name."""
    path = Path(path)
    if not path.parent.is_dir():
        raise CheckpointError(f"cannot write {path}: directory {path.parent} does not exist; create it first")
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise CheckpointError(f"cannot write to {path.parent} ({e.strerror}); choose a writable directory") from e
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # on disk before the rename, so a power cut cannot leave a short file named path
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private (and a writer may recreate it); not the result
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_atomic(tensors, path, metadata=None):
    """Write a safetensors file atomically."""
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save(sd, path, dtype=None, **extra):
    """Write a model in the original single-file layout, its configs as metadata (so `load` rebuilds it)."""
    if getattr(sd, "delta", None) is not None:
        raise CheckpointError("a delta is attached to this model, and its wrapped layers are not the checkpoint's; "
                              "fold() or detach() it first, or write it with interop.save_folded")
    tensors = to_original_layout(sd)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    info = {"unet": asdict(sd.unet.config), "vae": asdict(sd.vae.config),
            "text_encoder": asdict(sd.text_encoder.config), "latent_scale": sd.latent_scale,
            "resolution": sd.resolution, "prediction_type": sd.prediction_type, "schedule": sd.schedule,
            "added_tokens": sd.tokenizer.added_tokens if hasattr(sd.tokenizer, "added_tokens") else [], **extra}
    save_atomic(tensors, path, metadata={"nanocustom": json.dumps(info)})
