"""The diffusion schedule and samplers of Stable Diffusion v1.

Forward process, training target and ancestral sampling: DDPM (Ho et al. 2020). Deterministic and eta
sampling, and inversion: DDIM (Song et al. 2021). v-prediction: Salimans & Ho 2022, §4. Classifier-free
guidance: Ho & Salimans 2022. Paper symbols: abar_t is DDPM's \\bar\\alpha_t (DDIM writes it \\alpha_t),
x0 is \\hat x_0, eps is \\epsilon_\\theta.

The numbers are SD v1's (v1-inference.yaml: 1000 steps, "scaled linear" betas from 0.00085 to 0.012), and the
timesteps and step rules are those of diffusers' DDIMScheduler, DDPMScheduler and DDIMInverseScheduler as
StableDiffusionPipeline configures them for SD v1.5 (timestep_spacing="leading", steps_offset=1,
set_alpha_to_one=False, clip_sample=False); tests/test_diffusion.py holds us to them step by step.

Samplers are model-agnostic: `model_fn(x_t, t) -> output`, with t a LongTensor[B]. Tensor math runs in float32
whatever the caller's dtype; the schedule is float64, as in CompVis' `make_beta_schedule`.
"""
import torch
from tqdm.auto import tqdm

from nanocustom.errors import NanocustomError

PREDICTION_TYPES = ("eps", "x0", "v")  # diffusers: "epsilon", "sample", "v_prediction"
SAMPLERS = ("ddim", "ddpm")
SPACINGS = ("leading", "trailing")


def guided(eps_cond, eps_uncond, scale):
    """Classifier-free guidance, Ho & Salimans 2022 Eq. 6 with scale = 1 + w."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def check(name, value, allowed):
    if value not in allowed:
        raise NanocustomError(f"unknown {name} {value!r}; use one of {', '.join(allowed)}")


class Diffusion:
    """SD v1's noise schedule, its three parameterizations, and one step of each sampler.

    SD v1 uses the defaults. zero_terminal_snr and spacing="trailing" are the two fixes of Lin et al. 2024
    ("Common Diffusion Noise Schedules and Sample Steps are Flawed", §3.1-3.3), which `pretrain.py`'s stage 3
    trains with: SD v1's schedule ends at abar_T = 0.0047, not 0, so x_T still holds a little of the
    image, and "leading" sampling never starts at T itself. Zero terminal SNR needs v-prediction (§3.2): at T
    eps-prediction says nothing about x0."""

    def __init__(self, num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, zero_terminal_snr=False,
                 spacing="leading"):
        check("timestep spacing", spacing, SPACINGS)
        self.T, self.spacing = num_train_timesteps, spacing
        # "scaled linear": linear in sqrt(beta), squared
        self.betas = torch.linspace(beta_start**0.5, beta_end**0.5, self.T, dtype=torch.float64) ** 2
        if zero_terminal_snr:
            self.betas = rescaled_to_zero_terminal_snr(self.betas)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)  # abar_t = prod_s (1 - beta_s), DDPM §2

    def sqrt_abar(self, t, like):
        """sqrt(abar_t), sqrt(1 - abar_t): computed in float64, returned in float32 shaped to broadcast
        against `like`; t an int or a LongTensor[B]."""
        a = self.alphas_cumprod[torch.as_tensor(t).reshape(-1).cpu()]
        shape = (-1,) + (1,) * (like.dim() - 1)
        return [c.to(like.device, torch.float32).view(shape) for c in (a.sqrt(), (1 - a).sqrt())]

    def timesteps(self, steps):
        """The inference timesteps, descending. "leading" is diffusers' spacing plus steps_offset=1, as SD v1
        samples: 50 steps -> 981, 961, ..., 21, 1. "trailing" counts down from T itself (Lin et al. §3.3, Table 2):
        50 steps -> 999, 979, ..., 39, 19. Either way a step goes from t to t - T // steps, as diffusers' DDIM
        steps (for trailing spacing and a step count that does not divide T, the list's gaps are 1 longer)."""
        if not 0 < steps < self.T:
            raise NanocustomError(f"steps={steps} is out of range; use 1 to {self.T - 1}")
        if self.spacing == "trailing":
            return torch.round(self.T - torch.arange(steps, dtype=torch.float64) * (self.T / steps)).long() - 1
        return torch.arange(steps - 1, -1, -1) * (self.T // steps) + 1

    # --- training ---

    def add_noise(self, x0, noise, t):
        """Sample q(x_t | x_0): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, DDPM Eq. 4 (Algorithm 1)."""
        sa, s1a = self.sqrt_abar(t, x0)
        return (sa * x0.float() + s1a * noise.float()).to(x0.dtype)

    def target(self, x0, noise, t, prediction_type="eps"):
        """What the model learns to output at x_t = add_noise(x0, noise, t): eps (DDPM Eq. 14, L_simple),
        x0, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho 2022, §4)."""
        check("prediction_type", prediction_type, PREDICTION_TYPES)
        if prediction_type == "eps":
            return noise
        if prediction_type == "x0":
            return x0
        sa, s1a = self.sqrt_abar(t, x0)
        return (sa * noise.float() - s1a * x0.float()).to(x0.dtype)

    def split(self, out, x_t, t, prediction_type="eps"):
        """Model output -> (x0, eps) in float32, solving x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
        check("prediction_type", prediction_type, PREDICTION_TYPES)
        sa, s1a = self.sqrt_abar(t, x_t)
        x, out = x_t.float(), out.float()
        if prediction_type == "eps":
            return (x - s1a * out) / sa, out  # DDPM Eq. 15
        if prediction_type == "x0":
            return out, (x - sa * out) / s1a
        return sa * x - s1a * out, sa * out + s1a * x  # v: uses sa^2 + s1a^2 = 1

    # --- sampling: one step from t to t_prev, float32 in and out ---

    def noise(self, like, noise=None, generator=None):
        """eps ~ N(0, I) shaped like `like`: the given tensor, else drawn as diffusers' randn_tensor draws it
        (float32, on the generator's device), so one generator seeded alike gives the same numbers."""
        if noise is None:
            device = generator.device if generator is not None else like.device
            noise = torch.randn(like.shape, generator=generator, device=device, dtype=torch.float32)
        return noise.to(like.device, torch.float32)

    def ddpm_step(self, x_t, x0, t, t_prev, noise=None, generator=None):
        """Ancestral step: sample the posterior q(x_{t_prev} | x_t, x0), DDPM Eq. 6-7 and Algorithm 2, with the
        "fixed_small" variance sigma^2 = beta~ (§3.2). When steps are skipped, alpha_t and beta_t are those of the
        jump: alpha = abar_t / abar_prev (as diffusers). The chain ends at abar = 1 (t_prev < 0), where the
        mean is x0 and the variance 0."""
        a_t = self.alphas_cumprod[t].item()
        a_prev = self.alphas_cumprod[t_prev].item() if t_prev >= 0 else 1.0
        alpha, beta = a_t / a_prev, 1 - a_t / a_prev
        mean = (a_prev**0.5 * beta / (1 - a_t)) * x0 + (alpha**0.5 * (1 - a_prev) / (1 - a_t)) * x_t.float()  # Eq. 7
        var = (1 - a_prev) / (1 - a_t) * beta  # beta~_t, Eq. 7
        if t > 0:  # Algorithm 2 line 3; drawn even when var = 0, as diffusers, to keep a shared generator in step
            return mean + var**0.5 * self.noise(mean, noise, generator)
        return mean

    def ddim_step(self, x0, eps, t, t_prev, eta=0.0, noise=None, generator=None):
        """x_t -> x_{t_prev}, DDIM Eq. 12 with sigma_t = eta * sigma from Eq. 16 (eta = 0: deterministic). The
        chain ends at abar_0 (t_prev < 0; set_alpha_to_one=False). With eta = 0 this also runs forward in time
        (t_prev > t), the inversion: the result depends on t only through x0 and eps."""
        a_prev = self.alphas_cumprod[max(t_prev, 0)].item()
        sigma = 0.0
        if eta > 0:
            a_t = self.alphas_cumprod[t].item()
            sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5  # Eq. 16
        x_prev = a_prev**0.5 * x0 + (1 - a_prev - sigma**2) ** 0.5 * eps  # Eq. 12: "predicted x0" + "direction to x_t"
        if eta > 0:  # Eq. 12: "random noise"; drawn even when sigma = 0, as diffusers
            x_prev = x_prev + sigma * self.noise(x0, noise, generator)
        return x_prev


def rescaled_to_zero_terminal_snr(betas):
    """Lin et al. 2024, Algorithm 1: shift and scale sqrt(abar_t) so that it ends at exactly 0 (SNR(T) = 0) and
    keeps its first value, then read the betas back off the new abar_t."""
    sqrt_abar = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def as_timestep(t, x):
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)


@torch.no_grad()
def sample(model_fn, x_T, steps=50, sampler="ddim", eta=0.0, generator=None, prediction_type="eps",
           progress=True, callback=None, diffusion=None):
    """Run the reverse chain from the noise x_T to x_0 (latents, in x_T's dtype).

    model_fn(x_t, t) gets x_t in x_T's dtype; the chain itself is kept in float32. The fresh noise of DDPM and
    of DDIM with eta > 0 comes from `generator`, one draw per step after the model call (as diffusers).
    callback(i, t, x_t, x0), after the model call of step i, gets x_t and its x0 prediction in float32."""
    check("sampler", sampler, SAMPLERS)
    diffusion = diffusion or Diffusion()
    x = x_T.float()
    timesteps = diffusion.timesteps(steps).tolist()
    for i, t in enumerate(tqdm(timesteps, disable=not progress)):
        out = model_fn(x.to(x_T.dtype), as_timestep(t, x))
        x0, eps = diffusion.split(out, x, t, prediction_type)
        if callback is not None:
            callback(i, t, x, x0)
        if sampler == "ddim":  # as diffusers' DDIMScheduler, to t - T // steps (< 0 on the last step)
            x = diffusion.ddim_step(x0, eps, t, t - diffusion.T // steps, eta, generator=generator)
        else:  # as its DDPMScheduler, to the next timestep of the list; the same unless trailing spacing is uneven
            x = diffusion.ddpm_step(x, x0, t, timesteps[i + 1] if i + 1 < steps else -1, generator=generator)
    return x.to(x_T.dtype)


@torch.no_grad()
def invert(model_fn, x0, steps=50, prediction_type="eps", progress=True, callback=None, diffusion=None):
    """DDIM inversion (DDIM §4.3, the ODE run toward noise): clean latents x0 -> x_T at the first timestep of
    `sample` (981 for 50 steps), from which deterministic DDIM sampling approximately returns x0.

    As diffusers' DDIMInverseScheduler (DiffEdit, Pix2Pix-Zero) and Null-text inversion, the step t -> t_next
    calls the model at the *target* t_next on x_t, and x0 itself counts as the point at abar_0.
    callback(i, t_next, x_t, x0_pred) as in `sample`."""
    diffusion = diffusion or Diffusion()
    x = x0.float()
    for i, t_next in enumerate(tqdm(diffusion.timesteps(steps).flip(0).tolist(), disable=not progress)):
        t = t_next - diffusion.T // steps  # < 0 on the first step: x is at abar_0
        out = model_fn(x.to(x0.dtype), as_timestep(t_next, x))
        x0_pred, eps = diffusion.split(out, x, max(t, 0), prediction_type)
        if callback is not None:
            callback(i, t_next, x, x0_pred)
        x = diffusion.ddim_step(x0_pred, eps, t, t_next)  # Eq. 12 with sigma = 0, forward in time
    return x.to(x0.dtype)


def slerp(alpha, z_T, noise):
    """CoSINE's noise injection (Han et al. §3.4, Eq. 7): spherical interpolation from the inverted latents z_T
    (alpha = 0) to fresh noise eps (alpha = 1), per sample,
        slerp(alpha, z_T, eps) = sin((1 - alpha) phi) / sin(phi) z_T + sin(alpha phi) / sin(phi) eps,
    phi = arccos(cos(z_T, eps)). Where phi is 0 (parallel inputs) it is the linear interpolation, its limit."""
    if not 0.0 <= alpha <= 1.0:
        raise NanocustomError(f"slerp alpha {alpha} is out of range; use a value in [0, 1] (0: z_T itself)")
    a, b = z_T.flatten(1).double(), noise.flatten(1).to(z_T.device, torch.float64)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)
    phi = torch.arccos(cos.clamp(-1.0, 1.0))[:, None]
    small = phi < 1e-6
    sin_phi = torch.where(small, torch.ones_like(phi), torch.sin(phi))
    wa = torch.where(small, torch.full_like(phi, 1 - alpha), torch.sin((1 - alpha) * phi) / sin_phi)
    wb = torch.where(small, torch.full_like(phi, alpha), torch.sin(alpha * phi) / sin_phi)
    return (wa * a + wb * b).reshape(z_T.shape).to(z_T.dtype)
