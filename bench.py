"""Benchmarks: nanocustom against diffusers, same weights, dtype and device, in one run.

    python bench.py                                          # CPU: UNet steps (shapes, reduced SD) + the merge
    python bench.py --device cuda --dtype fp16 --suite gpu   # SD v1 at 512x512: sampling, training, optimisations
    python bench.py --device cpu --suite gpu --tiny          # the GPU suite's code path on a tiny model

Our models and diffusers' get the same random weights: ours written in the original single-file layout and
converted by diffusers' own single-file functions (the CLIP text model through transformers). Ours against
diffusers' alternate one run of each, `--repeats` times, and report min and median; so do the rows of each
optimisation group, each on its own copy of the model; the training reference and the merge's two forms are timed
one after the other. Sections of the GPU suite:

  sampling       50-step DDIM with classifier-free guidance (7.5), one image: text encoding, 50 UNet calls on a
                 batch of 2, VAE decode; and one UNet call alone. Ours: pipeline.generate. Reference:
                 StableDiffusionPipeline with DDIMScheduler.
  training       one step of each method at its paper's batch size (Custom Diffusion 8, SVDiff 1, residuals 4):
                 time and peak memory; ours as train.py runs it (training.training_step: fp16 frozen weights, fp32
                 trained tensors, autocast), uncached, cached (--cache) and cached with --grad-checkpointing.
                 Reference: the per-step work of diffusers' examples/custom_diffusion/train_custom_diffusion.py
                 (VAE encode and text encoder every step, attn2 K/V and the whole token embedding trained, AdamW).
  merge          the SD-size two-concept Lagrangian merge (32 K/V matrices, C_reg 1000 x 768), on the CPU always.
  optimisations  each switch on and off, against the section's baseline row.

Results go to bench.json and BENCHMARKS.md, rewritten after every benchmark, so an interrupted run leaves what
it measured. diffusers is a dev dependency: this script uses it, the library never does.
"""
import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import nanocustom.personalize
from nanocustom.checkpoint import new_model
from nanocustom.clip import CLIPTextConfig
from nanocustom.diffusion import Diffusion, guided, sample
from nanocustom.merge import MergeSolver, RegularizerGram, lagrangian_merge
from nanocustom.personalize import attach
from nanocustom.pipeline import encode_prompts, generate
from nanocustom.pretrain import UNET_CONFIG
from nanocustom.training import FeatureCache, training_step
from nanocustom.unet import UNet, UNetConfig
from nanocustom.vae import VAEConfig

sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))
from helpers import write_clip_tokenizer_files  # noqa: E402  (CLIP's tokenizer files, made offline)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CONFIGS = {  # name -> (UNet config, latent side, batch); batch 2 = one image with classifier-free guidance
    "shapes": (UNET_CONFIG, 16, 2),  # 64x64 images, 16x16x4 latents
    "reduced": (UNetConfig(model_channels=128, channel_mult=(1, 2, 4, 4), num_heads=8), 32, 2),  # SD v1 at half width, 256x256
    "sd": (UNetConfig(), 64, 2),  # SD v1 at 512x512
}
TINY = dict(unet=UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                            num_heads=2, context_dim=32),
            vae=VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1),
            text_encoder=CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
            resolution=32)  # the GPU suite's code path on a CPU in a minute or two
BATCH_SIZES = {"custom": 8, "svdiff": 1, "residual": 4}  # Kumari et al. §4, Han et al. App. A (1 per concept), Ham et al. §4.1
SD_V1_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                       clip_sample=False, set_alpha_to_one=False, steps_offset=1)
PROMPT = "photo of a <new1> dog"
REF_PROMPT = "photo of a ktn dog"  # the reference's modifier token is the rare token ours starts from


# -----------------------------------------------------------------------------
# timing

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def stats(times):
    return {"min_s": min(times), "median_s": statistics.median(times)}


def alternate(runs, device, repeats, warmup=1):
    """{name: fn} -> {name: {min_s, median_s}}: warm-up, then one run of each in turn, `repeats` times, so drifts in
    machine load hit all alike."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for k, fn in runs.items():
            times[k].append(timed(fn, device))
    return {k: stats(v) for k, v in times.items()}


def peak_memory(fn, device, repeats):
    """Time fn (after one warm-up call) and the peak memory allocated while it ran, in GiB (None on a CPU)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    fn()
    result = stats([timed(fn, device) for _ in range(repeats)])
    result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return result


# -----------------------------------------------------------------------------
# models: ours with random weights, diffusers' from the same weights

def our_model(device, dtype, tiny):
    """A StableDiffusion of the SD v1 configs (or TINY's) with random weights, made directly on the device."""
    torch.manual_seed(0)
    with torch.device(device):
        sd = new_model(**TINY) if tiny else new_model()
    sd.fingerprint = "bench-random-weights"  # skips hashing the weights (only deltas read it)
    for m in (sd.unet, sd.vae, sd.text_encoder):
        m.to(dtype)
    return sd


def original_config(unet, vae):
    """The parts of v1-inference.yaml that diffusers' single-file config builders read, from our configs."""
    ddconfig = {k: v for k, v in asdict(vae).items() if k != "embed_dim"}
    ddconfig.update(double_z=True, resolution=256, attn_resolutions=[], dropout=0.0)
    return {"model": {"params": {
        "scale_factor": 0.18215,
        "unet_config": {"params": {**asdict(unet), "image_size": 64, "use_spatial_transformer": True}},
        "first_stage_config": {"params": {"embed_dim": vae.embed_dim, "ddconfig": ddconfig}}}}}


def diffusers_unet(ours, config):
    """diffusers' UNet with our weights, through diffusers' single-file conversion of the original layout."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
    checkpoint = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    ref_config = create_unet_diffusers_config_from_ldm(original_config(config, VAEConfig()), checkpoint)
    with torch.device(next(ours.parameters()).device):
        ref = UNet2DConditionModel(**ref_config)
    ref.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, ref_config), strict=True)
    return ref.to(next(ours.parameters()).dtype).eval()


def diffusers_pipeline(sd):
    """StableDiffusionPipeline (DDIM, SD v1's schedule) holding sd's weights, on sd's device and dtype."""
    import transformers
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_vae_checkpoint,
                                                     create_vae_diffusers_config_from_ldm)
    device, dtype = sd.device, sd.dtype
    unet = diffusers_unet(sd.unet, sd.unet.config)
    checkpoint = {"first_stage_model." + k: v for k, v in sd.vae.state_dict().items()}
    vae_config = create_vae_diffusers_config_from_ldm(original_config(sd.unet.config, sd.vae.config), checkpoint)
    with torch.device(device):
        vae = AutoencoderKL(**{**vae_config, "scaling_factor": sd.latent_scale})
        text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**asdict(sd.text_encoder.config)))
    vae.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, vae_config), strict=True)
    checkpoint = {"cond_stage_model.transformer.text_model." + k: v for k, v in sd.text_encoder.state_dict().items()}
    clip = convert_ldm_clip_checkpoint(checkpoint)
    if not hasattr(text_encoder, "text_model"):  # transformers >= 5 flattened CLIPTextModel
        clip = {k.removeprefix("text_model."): v for k, v in clip.items()}
    text_encoder.load_state_dict(clip, strict=True)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(
        write_clip_tokenizer_files(Path(tempfile.mkdtemp(prefix="bench-clip-"))), model_max_length=77)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SD_V1_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def move(sd, device):
    for m in (sd.unet, sd.vae, sd.text_encoder):
        m.to(device)


def unet_inputs(config, side, batch, device, dtype):
    x = torch.randn(batch, config.in_channels, side, side, device=device, dtype=dtype)
    t = torch.full((batch,), 500, device=device)
    context = torch.randn(batch, 77, config.context_dim, device=device, dtype=dtype)
    return x, t, context


# -----------------------------------------------------------------------------
# UNet step (CPU suite) and sampling

@torch.inference_mode()
def bench_unet(name, device, dtype, repeats):
    config, side, batch = CONFIGS[name]
    ours = UNet(config).eval()
    ref = diffusers_unet(ours, config).eval()
    ours.to(device, dtype)
    ref.to(device, dtype)
    x, t, context = unet_inputs(config, side, batch, device, dtype)
    times = alternate({"nanocustom": lambda: ours(x, t, context), "diffusers": lambda: ref(x, t, context).sample},
                      device, repeats)
    return {"section": "unet", "benchmark": f"UNet step, {name} config",
            "input": f"{batch}x{config.in_channels}x{side}x{side}", **times}


@torch.inference_mode()
def bench_unet_step(sd, pipe, repeats):
    """One UNet call of guided sampling (batch 2), ours against diffusers', same weights."""
    side = sd.resolution // sd.vae.downsampling_factor
    x, t, context = unet_inputs(sd.unet.config, side, 2, sd.device, sd.dtype)
    times = alternate({"nanocustom": lambda: sd.unet(x, t, context),
                       "diffusers": lambda: pipe.unet(x, t, context).sample}, sd.device, repeats)
    return {"section": "sampling", "benchmark": "UNet step (guided: batch 2)", "input": f"2x4x{side}x{side}", **times}


def bench_sampling(sd, pipe, repeats, steps=50):
    """Seconds per image: text encoding, `steps` DDIM steps with guidance 7.5, VAE decode, uint8 out."""
    size = sd.resolution
    ours = lambda: generate(sd, ["a photo of a dog"], steps=steps, guidance=7.5, seed=0, progress=False)  # noqa: E731
    ref = lambda: pipe("a photo of a dog", height=size, width=size, num_inference_steps=steps, guidance_scale=7.5,  # noqa: E731
                       generator=torch.Generator().manual_seed(0), output_type="np")
    times = alternate({"nanocustom": ours, "diffusers": ref}, sd.device, repeats)
    return {"section": "sampling", "benchmark": f"one image, {steps}-step DDIM + CFG 7.5", "input": f"{size}x{size}",
            **times}


# -----------------------------------------------------------------------------
# training

@contextmanager
def random_svd():
    """SVDiff's one-time SVD (cached on disk in real use) replaced by random factors of the same shapes: a step's
    time does not depend on their values, and the SVD of every SD weight would take minutes."""
    def svd(self, weights, name, cache_dir):
        out = {}
        for key, W in weights.items():
            o, n = W.shape[0], W[0].numel()
            k = min(o, n)
            kw = dict(device=W.device, dtype=torch.float32)
            out[key] = (torch.randn(o, k, **kw) / k**0.5, torch.rand(k, **kw), torch.randn(k, n, **kw) / n**0.5)
        return out

    original = nanocustom.personalize.SVDiff._svd
    nanocustom.personalize.SVDiff._svd = svd
    try:
        yield
    finally:
        nanocustom.personalize.SVDiff._svd = original


def a_batch(sd, batch_size, prompt=PROMPT):
    """A ConceptBatches-like batch of random images, no regularisation samples, each its own source."""
    side, latent = sd.resolution, sd.resolution // sd.vae.downsampling_factor
    g = torch.Generator().manual_seed(0)
    return {"images": torch.rand(batch_size, 3, side, side, generator=g) * 2 - 1,
            "masks": torch.ones(batch_size, 1, latent, latent), "prompts": [prompt] * batch_size,
            "is_reg": torch.zeros(batch_size, dtype=torch.bool), "sources": [f"image{i}" for i in range(batch_size)]}


def attach_for_training(sd, method):
    """attach as train.py does: the trained tensors in fp32 beside the frozen weights, AdamW over them alone."""
    with random_svd():
        delta = attach(sd, method, tokens=["<new1>"])
    trainable = delta.trainable()
    for p in (p for group in trainable for p in group["params"]):
        p.data = p.data.float()
    return delta, torch.optim.AdamW(trainable, weight_decay=0.0)


def bench_training_ours(sd, method, dtype, repeats):
    """Our step of `method` at its paper batch size: uncached, cached, cached with gradient checkpointing."""
    batch_size = BATCH_SIZES[method]
    batch, delta_opt = a_batch(sd, batch_size), attach_for_training(sd, method)
    delta, opt = delta_opt
    rows = []
    for name, cached, checkpointing in (("uncached", False, False), ("cached", True, False),
                                        ("cached + grad checkpointing", True, True)):
        cache, generator = (FeatureCache(sd) if cached else None), torch.Generator().manual_seed(0)
        scaler = torch.amp.GradScaler(sd.device.type) if dtype == torch.float16 else None  # as train.py
        sd.unet.gradient_checkpointing = checkpointing

        def step():
            loss = training_step(sd, batch, opt, generator, dtype, cache=cache, scaler=scaler)
            if not torch.isfinite(loss):
                print(f"  warning: non-finite loss ({loss.item()}): this step skipped backward", flush=True)

        rows.append({"section": "training", "benchmark": f"{method} step, nanocustom, {name}",
                     "input": f"batch {batch_size}, {sd.resolution}x{sd.resolution}",
                     "nanocustom": peak_memory(step, sd.device, repeats)})
    sd.unet.gradient_checkpointing = False
    delta.detach()
    return rows


def diffusers_custom_diffusion(pipe):
    """The reference's trained tensors, as train_custom_diffusion.py sets them up (--modifier_token, train_kv):
    every attn2's to_k/to_v in fp32 and the whole token embedding in fp32 (its other rows' gradients zeroed)."""
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
    params = []
    for name, m in pipe.unet.named_modules():
        if name.endswith("attn2"):
            for linear in (m.to_k, m.to_v):
                linear.weight = nn.Parameter(linear.weight.detach().float())
                params.append(linear.weight)
    embedding = pipe.text_encoder.get_input_embeddings()
    embedding.weight = nn.Parameter(embedding.weight.detach().float())
    return params, embedding.weight


def bench_training_diffusers(pipe, side, batch_size, dtype, repeats, params, embedding):
    """The per-step work of train_custom_diffusion.py at batch_size: VAE encode, text encoder, UNet forward and
    backward under autocast, token-row gradient masking, grad-norm clipping, AdamW step."""
    from diffusers import DDPMScheduler
    device, scheduler = pipe.device, DDPMScheduler(
        **{k: v for k, v in SD_V1_SCHEDULER.items() if k != "set_alpha_to_one"})
    opt = torch.optim.AdamW(params + [embedding], lr=1e-5, weight_decay=1e-2)
    images = torch.rand(batch_size, 3, side, side, device=device, dtype=pipe.vae.dtype) * 2 - 1
    ids = pipe.tokenizer([REF_PROMPT] * batch_size, padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids.to(device)
    keep = torch.zeros(embedding.shape[0], dtype=torch.bool, device=device)
    keep[ids[0, 4]] = True  # the modifier token's row

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            latents = pipe.vae.encode(images).latent_dist.sample() * pipe.vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), device=device)
            noisy = scheduler.add_noise(latents, noise, t)
            context = pipe.text_encoder(ids)[0]
            pred = pipe.unet(noisy, t, context).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        embedding.grad[~keep] = 0
        torch.nn.utils.clip_grad_norm_(params + [embedding], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return {"section": "training", "benchmark": "Custom Diffusion step, diffusers reference (uncached)",
            "input": f"batch {batch_size}, {side}x{side}", "diffusers": peak_memory(step, device, repeats)}


# -----------------------------------------------------------------------------
# merge

def bench_merge(repeats, concepts=2, tokens=8, s_reg=1000, dim=768):
    """The two-concept Lagrangian merge at SD size, on the CPU: 16 attn2 layers x (K, V), text encoding excluded.
    One RegularizerGram and one MergeSolver serve all 32 matrices; the second row solves each one from scratch."""
    g = torch.Generator().manual_seed(0)
    widths = [320] * 2 + [640] * 2 + [1280] * 2 + [1280] + [1280] * 3 + [640] * 3 + [320] * 3  # SD v1's attn2s
    C_reg = torch.randn(s_reg, dim, generator=g)
    C = torch.randn(concepts * tokens, dim, generator=g)
    problems = []
    for o in widths:
        for _ in "kv":
            W0 = torch.randn(o, dim, generator=g) / dim**0.5
            Ws = [W0 + 0.01 * torch.randn(o, dim, generator=g) for _ in range(concepts)]  # each concept's fine-tuned W
            V = torch.cat([W @ C[i * tokens:(i + 1) * tokens].T for i, W in enumerate(Ws)], dim=1)
            problems.append((W0, V))

    def shared():
        solver = MergeSolver(C, gram=RegularizerGram(C_reg))
        return [solver.solve(W0, V) for W0, V in problems]

    def one_shot():
        return [lagrangian_merge(W0, C, V, C_reg) for W0, V in problems]

    cpu = torch.device("cpu")
    times = alternate({"shared": shared}, cpu, repeats)
    times |= alternate({"one_shot": one_shot}, cpu, min(repeats, 3), warmup=0)  # ~3 s a run on 2 cores
    label = f"{len(problems)} K/V matrices, C {concepts}x{tokens} rows, C_reg {s_reg}x{dim}"
    return [{"section": "merge", "benchmark": "Lagrangian merge, one factorisation for all matrices", "input": label,
             "nanocustom": times["shared"]},
            {"section": "merge", "benchmark": "Lagrangian merge, lagrangian_merge per matrix", "input": label,
             "nanocustom": times["one_shot"]}]


# -----------------------------------------------------------------------------
# optimisations on and off

def plain_attention(q, k, v, *args, **kwargs):
    return (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1) @ v


@contextmanager
def sdpa_replaced():
    """F.scaled_dot_product_attention replaced by softmax(Q K^T / sqrt(d)) V, for this benchmark only."""
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = plain_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def cuda_graph(fn, *inputs):
    """fn(*inputs) captured once as a CUDA graph. Returns (replay(*new_inputs) -> output, static output):
    replay copies the new inputs into the captured ones and reruns the graph."""
    static = [x.clone() for x in inputs]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture, as torch.cuda.graphs asks
        for _ in range(3):
            fn(*static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static)

    def replay(*new):
        for s, x in zip(static, new):
            s.copy_(x)
        graph.replay()
        return out

    return replay


def row(group, config, result, baseline=None, note=""):
    r = {"section": "optimisations", "group": group, "config": config, **result, "note": note}
    r["speedup"] = baseline["median_s"] / result["median_s"] if baseline else 1.0
    return r


def print_skipped(name, error):
    print(f"  {name}: skipped ({type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]})", flush=True)


def usable(runs):
    """The runs whose first call (their warm-up) succeeds; each other one is reported skipped with its reason, so
    that one failing configuration does not take its group's other rows with it."""
    working = {}
    for name, fn in runs.items():
        try:
            fn()
            working[name] = fn
        except Exception as e:
            print_skipped(name, e)
    return working


def alternated_rows(group, runs, device, repeats):
    """{config: fn}, the baseline first -> the group's rows, every configuration timed in turn with the baseline."""
    baseline = next(iter(runs))
    times = alternate(usable(runs), device, repeats, warmup=0)
    return [row(group, config, result, None if config == baseline else times[baseline])
            for config, result in times.items()]


def training_rows(results):
    """Cache and gradient checkpointing on and off, from the training section's rows."""
    steps = {r["benchmark"]: r["nanocustom"] for r in results if r["section"] == "training" and "nanocustom" in r}
    rows = []
    for method in BATCH_SIZES:
        base = steps.get(f"{method} step, nanocustom, uncached")
        for config, variant in (("baseline: uncached", "uncached"), ("cached (latents; text too where no token row trains)", "cached"),
                                ("cached + gradient checkpointing", "cached + grad checkpointing")):
            r = steps.get(f"{method} step, nanocustom, {variant}")
            if r:
                note = f"peak {r['peak_gib']:.2f} GiB" if r["peak_gib"] is not None else ""
                rows.append(row(f"{method} training step", config, r, base if r is not base else None, note))
    return rows


@torch.inference_mode()
def bench_unet_options(sd, repeats, dtype_name):
    """One guided UNet call: attention kernel, dtype, memory format, CUDA graph. Each configuration that changes
    the weights runs on its own copy of the UNet, so that all of them alternate with the baseline."""
    device, side = sd.device, sd.resolution // sd.vae.downsampling_factor
    x, t, context = unet_inputs(sd.unet.config, side, 2, device, sd.dtype)
    unet = sd.unet

    def plain_attention():
        with sdpa_replaced():
            return unet(x, t, context)

    runs = {f"baseline: {dtype_name}, SDPA, eager": lambda: unet(x, t, context),
            "plain softmax attention": plain_attention}
    for name, dtype in DTYPES.items():
        if dtype != sd.dtype and not (device.type == "cpu" and dtype == torch.float16):
            other, xd, cd = copy.deepcopy(unet).to(dtype), x.to(dtype), context.to(dtype)
            runs[name] = lambda other=other, xd=xd, cd=cd: other(xd, t, cd)
    nhwc, xc = copy.deepcopy(unet).to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    runs["channels_last"] = lambda: nhwc(xc, t, context)
    if device.type == "cuda":
        replay = cuda_graph(unet, x, t, context)
        runs["CUDA graph"] = lambda: replay(x, t, context)
    else:
        print("  CUDA graphs: skipped (CUDA only)", flush=True)
    return alternated_rows("UNet step (batch 2)", runs, device, repeats)


@torch.inference_mode()
def bench_sampler_cuda_graph(sd, repeats, steps=50):
    """The 50-step guided DDIM loop (UNet and sampler, no text or VAE), UNet eager against one CUDA graph replayed
    for every step."""
    device, side = sd.device, sd.resolution // sd.vae.downsampling_factor
    context = encode_prompts(sd, ["", "a photo of a dog"])
    x_T = torch.randn(1, 4, side, side, device=device, dtype=sd.dtype)

    def unet_call(x, t):
        return sd.unet(torch.cat([x, x]), torch.cat([t, t]), context)

    replay = cuda_graph(unet_call, x_T, torch.full((1,), 981, device=device))

    def loop(call):
        def model_fn(x, t):
            eps_uncond, eps_cond = call(x, t).chunk(2)
            return guided(eps_cond, eps_uncond, 7.5)
        return lambda: sample(model_fn, x_T, steps=steps, progress=False, diffusion=Diffusion())

    times = alternate({"eager": loop(unet_call), "graph": loop(replay)}, device, repeats)
    group = f"{steps}-step guided DDIM loop"
    return [row(group, "baseline: UNet eager", times["eager"]),
            row(group, "UNet as one CUDA graph", times["graph"], times["eager"])]


@torch.inference_mode()
def bench_folding(sd, repeats):
    """A UNet call with each delta attached (its tensors applied on the fly) against the same delta folded, each
    on its own copy of the model, all alternated with the bare model."""
    device, side = sd.device, sd.resolution // sd.vae.downsampling_factor
    x, t, context = unet_inputs(sd.unet.config, side, 2, device, sd.dtype)
    runs = {"baseline: no delta": lambda: sd.unet(x, t, context)}
    for method in ("svdiff", "residual", "custom"):
        for folded in (False, True):
            copy_of_sd = replace(sd, tokenizer=copy.deepcopy(sd.tokenizer),
                                 text_encoder=copy.deepcopy(sd.text_encoder), unet=copy.deepcopy(sd.unet))
            with random_svd():
                delta = attach(copy_of_sd, method)
            if folded:
                delta.fold()  # the deltas start at zero: the folded weights are the base ones
            runs[f"{method}, {'folded' if folded else 'unfolded'}"] = lambda unet=copy_of_sd.unet: unet(x, t, context)
    return alternated_rows("delta at inference (UNet step)", runs, device, repeats)


@torch.inference_mode()
def bench_svdiff_reconstruction(sd, repeats):
    """W + U diag(shift) V^T for every weight of SVDiff's "all" subset: U's columns scaled (as SpectralShift
    does) against a dense diag(shift) matmul."""
    with random_svd():
        delta = attach(sd, "svdiff")
    shifts = [s for s in delta.shifts().values() if hasattr(s, "U")]
    for s in shifts:
        s.delta.normal_()
    scaled = lambda: [(s.U * (F.relu(s.sigma + s.delta) - s.sigma)) @ s.Vh for s in shifts]  # noqa: E731
    dense = lambda: [s.U @ torch.diag(F.relu(s.sigma + s.delta) - s.sigma) @ s.Vh for s in shifts]  # noqa: E731
    times = alternate({"scaled": scaled, "dense": dense}, sd.device, repeats)
    delta.detach()
    group = f"SVDiff weight reconstruction ({len(shifts)} matrices)"
    return [row(group, "baseline: U diag(s) V^T as a dense matmul", times["dense"]),
            row(group, "U's columns scaled, then one matmul", times["scaled"], times["dense"])]


def bench_compile(sd, repeats, mode):
    """torch.compile of the UNet: compile time, then the step, alternated with the eager one."""
    device, group = sd.device, "UNet step (batch 2)"
    side = sd.resolution // sd.vae.downsampling_factor
    x, t, context = unet_inputs(sd.unet.config, side, 2, device, sd.dtype)
    with torch.inference_mode():
        compiled = torch.compile(sd.unet, mode=mode)
        compile_s = timed(lambda: compiled(x, t, context), device)
        times = alternate({"eager": lambda: sd.unet(x, t, context), "compiled": lambda: compiled(x, t, context)},
                          device, repeats, warmup=2)
    return [row(group, f"torch.compile (mode={mode})", times["compiled"], times["eager"],
                note=f"compile {compile_s:.0f} s")]


# -----------------------------------------------------------------------------
# report

def environment(device, dtype, threads, tiny=False):
    import diffusers
    env = {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
           "dtype": dtype, "threads": threads, "model": "tiny (--tiny)" if tiny else "SD v1 configs, random weights"}
    env["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return env


def ms(r):
    return f"{1000 * r['min_s']:.1f} / {1000 * r['median_s']:.1f}"


def write_report(env, results, json_path, md_path):
    with open(json_path, "w") as f:
        json.dump({"environment": env, "results": results}, f, indent=2)
    lines = ["# Benchmarks", "", f"Device: {env['device']}; dtype {env['dtype']}; torch {env['torch']}, "
             f"diffusers {env['diffusers']}, Python {env['python']}; model: {env.get('model', '')}. "
             "Times in ms, min / median of alternated runs.", ""]
    compared = [r for r in results if r["section"] in ("unet", "sampling", "merge")]
    if compared:
        lines += ["| benchmark | input | nanocustom min / median | diffusers min / median | speed-up (median) |",
                  "| --- | --- | --- | --- | --- |"]
        for r in compared:
            ours, ref = r.get("nanocustom"), r.get("diffusers")
            speedup = f"{ref['median_s'] / ours['median_s']:.2f}x" if ours and ref else ""
            lines.append(f"| {r['benchmark']} | {r['input']} | {ms(ours) if ours else ''} | {ms(ref) if ref else ''} "
                         f"| {speedup} |")
        lines.append("")
    training = [r for r in results if r["section"] == "training"]
    if training:
        reference = {r["input"]: r["diffusers"] for r in training if "diffusers" in r}
        lines += ["## Training step", "", "Speed-up: the diffusers reference's median at the same batch size over the "
                  "row's.", "", "| step | input | min / median | peak memory (GiB) | speed-up vs reference |",
                  "| --- | --- | --- | --- | --- |"]
        for r in training:
            t, ref = r.get("nanocustom") or r.get("diffusers"), reference.get(r["input"])
            peak = f"{t['peak_gib']:.2f}" if t.get("peak_gib") is not None else "n/a (CPU)"
            speedup = f"{ref['median_s'] / t['median_s']:.2f}x" if ref else ""
            lines.append(f"| {r['benchmark']} | {r['input']} | {ms(t)} | {peak} | {speedup} |")
        lines.append("")
    options = [r for r in results if r["section"] == "optimisations"]
    if options:
        lines += ["## Optimisations on and off", "", "Speed-up: the group's baseline median over the row's.", "",
                  "| group | configuration | min / median | speed-up | note |", "| --- | --- | --- | --- | --- |"]
        for r in options:
            lines.append(f"| {r['group']} | {r['config']} | {ms(r)} | {r['speedup']:.2f}x | {r['note']} |")
        lines.append("")
    with open(md_path, "w") as f:
        f.write("\n".join(lines))


def report_line(r):
    if r["section"] == "optimisations":
        return f"[{r['group']}] {r['config']}: {ms(r)} ms, {r['speedup']:.2f}x {r['note']}"
    parts = [f"{k} {ms(r[k])} ms" + (f", peak {r[k]['peak_gib']:.2f} GiB" if r[k].get("peak_gib") else "")
             for k in ("nanocustom", "diffusers") if k in r]
    return f"[{r['section']}] {r['benchmark']} ({r['input']}): " + "; ".join(parts)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--suite", choices=["cpu", "gpu"], default="cpu", help="cpu: UNet steps of --configs and the "
                   "merge; gpu: sampling, training, merge and the optimisation rows (on any device)")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=["shapes", "reduced"], help="cpu suite")
    p.add_argument("--tiny", action="store_true", help="gpu suite on a tiny model: the code path, on a CPU")
    p.add_argument("--repeats", type=int, default=None, help="default: 10 (cpu suite), 5 (gpu suite)")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode, or 'off' to skip that row")
    p.add_argument("--skip-merge", action="store_true", help="gpu suite: leave out the (CPU) merge")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="default: bench.json (gpu suite), bench-cpu.json (cpu)")
    p.add_argument("--markdown", default=None, help="default: BENCHMARKS.md (gpu suite), BENCHMARKS-cpu.md (cpu)")
    args = p.parse_args()
    suffix = "-cpu" if args.suite == "cpu" else ""  # the two suites' reports side by side, neither overwritten
    args.json, args.markdown = args.json or f"bench{suffix}.json", args.markdown or f"BENCHMARKS{suffix}.md"
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    repeats = args.repeats or (10 if args.suite == "cpu" else 5)
    env = environment(device, args.dtype, torch.get_num_threads(), args.tiny)
    results, start = [], time.perf_counter()

    def record(rows):
        for r in rows if isinstance(rows, list) else [rows]:
            if r not in results:
                results.append(r)
                print(f"{time.perf_counter() - start:6.0f}s  {report_line(r)}", flush=True)
        write_report(env, results, args.json, args.markdown)

    torch.manual_seed(0)
    if args.suite == "cpu":
        for name in args.configs:
            record(bench_unet(name, device, dtype, repeats))
        record(bench_merge(repeats))
        return

    if not args.skip_merge:
        record(bench_merge(repeats))
    sd = our_model(device, dtype, args.tiny)
    pipe = diffusers_pipeline(sd)
    print(f"{time.perf_counter() - start:6.0f}s  built both models", flush=True)

    def attempt(name, fn, *a):
        """One benchmark; its failure is a skipped row with the reason, not a lost run."""
        try:
            rows = fn(*a)
            for r in rows if hasattr(rows, "__next__") else [rows]:  # generators yield their rows as they go
                record(r)
        except Exception as e:
            print_skipped(name, e)
            if getattr(sd, "delta", None) is not None:
                sd.delta.detach()
            sd.unet.gradient_checkpointing = False

    attempt("UNet step", bench_unet_step, sd, pipe, 2 * repeats)
    attempt("sampling", bench_sampling, sd, pipe, repeats)

    pipe.to("cpu")  # training: only the measured model on the device, so that peak memory is its own
    for method in BATCH_SIZES:
        attempt(f"{method} training", bench_training_ours, sd, method, dtype, repeats)
    move(sd, "cpu")
    pipe.to(device)
    params, embedding = diffusers_custom_diffusion(pipe)
    for batch_size in sorted(set(BATCH_SIZES.values()), reverse=True):
        attempt("reference training", bench_training_diffusers, pipe, sd.resolution, batch_size, dtype, repeats,
                params, embedding)
    del pipe, params, embedding
    move(sd, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    attempt("training rows", training_rows, results)

    attempt("UNet options", bench_unet_options, sd, 2 * repeats, args.dtype)
    if device.type == "cuda":
        attempt("CUDA graph sampler loop", bench_sampler_cuda_graph, sd, repeats)
    else:
        print("  CUDA graph sampler loop: skipped (CUDA only)", flush=True)
    attempt("folding", bench_folding, sd, 2 * repeats)
    attempt("SVDiff reconstruction", bench_svdiff_reconstruction, sd, repeats)
    if args.compile_mode == "off":
        print("  torch.compile: skipped (--compile-mode off)", flush=True)
    else:
        attempt("torch.compile", bench_compile, sd, 2 * repeats, args.compile_mode)
    print(f"{time.perf_counter() - start:6.0f}s  done: {args.markdown}, {args.json}", flush=True)


if __name__ == "__main__":
    main()
