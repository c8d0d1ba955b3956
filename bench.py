"""Benchmarks: nanocustom against diffusers, same weights, dtype and device, in one run.

    python bench.py                                  # CPU: the shapes model's UNet and a reduced SD config
    python bench.py --device cuda --dtype fp16 --configs sd   # SD v1 at 512x512 on a GPU

For each UNet config, our UNet and diffusers' UNet2DConditionModel get the same random weights (ours written in
the original layout and converted by diffusers' own single-file functions), then alternate: one timed forward
pass each, `--repeats` times; we report min and median. Results go to bench.json and BENCHMARKS.md.
diffusers is a dev dependency: this script uses it, the library never does.
"""
import argparse
import json
import platform
import statistics
import time
from dataclasses import asdict

import torch

from nanocustom.pretrain import UNET_CONFIG
from nanocustom.unet import UNet, UNetConfig

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CONFIGS = {  # name -> (UNet config, latent side, batch); batch 2 = one image with classifier-free guidance
    "shapes": (UNET_CONFIG, 8, 2),
    "reduced": (UNetConfig(model_channels=128, channel_mult=(1, 2, 4, 4), num_heads=8), 32, 2),  # SD v1 at half width, 256x256
    "sd": (UNetConfig(), 64, 2),  # SD v1 at 512x512
}


def diffusers_unet(ours, config):
    """diffusers' UNet with our weights, through diffusers' single-file conversion of the original layout."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
    unet_params = {**asdict(config), "image_size": 64, "use_spatial_transformer": True}
    vae_params = {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}  # read only for the VAE's scale factor
    original = {"model": {"params": {"unet_config": {"params": unet_params},
                                     "first_stage_config": {"params": vae_params}}}}
    checkpoint = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    ref_config = create_unet_diffusers_config_from_ldm(original, checkpoint)
    ref = UNet2DConditionModel(**ref_config)
    ref.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, ref_config), strict=True)
    return ref


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.inference_mode()
def bench_unet(name, device, dtype, repeats):
    config, side, batch = CONFIGS[name]
    ours = UNet(config).eval()
    ref = diffusers_unet(ours, config).eval()
    ours.to(device, dtype)
    ref.to(device, dtype)
    x = torch.randn(batch, config.in_channels, side, side, device=device, dtype=dtype)
    t = torch.full((batch,), 500, device=device)
    context = torch.randn(batch, 77, config.context_dim, device=device, dtype=dtype)
    runs = {"nanocustom": lambda: ours(x, t, context), "diffusers": lambda: ref(x, t, context).sample}
    for fn in runs.values():  # warm-up
        fn()
    times = {k: [] for k in runs}
    for _ in range(repeats):  # alternate, so drifts in machine load hit both alike
        for k, fn in runs.items():
            times[k].append(timed(fn, device))
    return {"benchmark": f"UNet step, {name} config", "latent": f"{batch}x{config.in_channels}x{side}x{side}",
            **{k: {"min_s": min(v), "median_s": statistics.median(v)} for k, v in times.items()}}


def environment(device, dtype, threads):
    import diffusers
    env = {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
           "dtype": dtype, "threads": threads}
    env["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return env


def write_report(env, results, json_path, md_path):
    with open(json_path, "w") as f:
        json.dump({"environment": env, "results": results}, f, indent=2)
    lines = ["# Benchmarks", "", f"Device: {env['device']}; dtype {env['dtype']}; torch {env['torch']}, "
             f"diffusers {env['diffusers']}, Python {env['python']}. Min and median of alternated runs.", "",
             "| benchmark | input | nanocustom min / median (s) | diffusers min / median (s) | speed-up (median) |",
             "| --- | --- | --- | --- | --- |"]
    for r in results:
        ours, ref = r["nanocustom"], r["diffusers"]
        lines.append(f"| {r['benchmark']} | {r['latent']} | {ours['min_s']:.4f} / {ours['median_s']:.4f} | "
                     f"{ref['min_s']:.4f} / {ref['median_s']:.4f} | {ref['median_s'] / ours['median_s']:.2f}x |")
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=["shapes", "reduced"])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--json", default="bench.json")
    p.add_argument("--markdown", default="BENCHMARKS.md")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    results = []
    for name in args.configs:
        results.append(bench_unet(name, device, DTYPES[args.dtype], args.repeats))
        r = results[-1]
        print(f"{r['benchmark']}: nanocustom {r['nanocustom']['median_s']:.4f} s, "
              f"diffusers {r['diffusers']['median_s']:.4f} s (median of {args.repeats})")
    write_report(environment(device, args.dtype, torch.get_num_threads()), results, args.json, args.markdown)


if __name__ == "__main__":
    main()
