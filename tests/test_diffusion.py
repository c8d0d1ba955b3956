"""Our schedule and samplers against diffusers' DDPMScheduler, DDIMScheduler and DDIMInverseScheduler,
configured as StableDiffusionPipeline configures them for SD v1.5, step by step and over whole loops."""

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, DDPMScheduler

from nanocustom.diffusion import Diffusion, guided, invert, sample
from nanocustom.errors import NanocustomError
from nanocustom.pretrain import ZERO_SNR

SD_V1 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
             steps_offset=1, timestep_spacing="leading")
DIFFUSERS_NAME = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
SHAPE = (2, 4, 8, 8)
STEP_ATOL = 1e-5  # max abs error of one step's x_prev


def ddim(prediction_type="eps"):
    return DDIMScheduler(**SD_V1, set_alpha_to_one=False, prediction_type=DIFFUSERS_NAME[prediction_type])


def ddpm(prediction_type="eps"):
    return DDPMScheduler(**SD_V1, prediction_type=DIFFUSERS_NAME[prediction_type])


# the schedule of `pretrain.py`'s stage 3: Lin et al. 2024's zero terminal SNR and trailing spacing, with v-prediction
ZERO_SNR_DIFFUSERS = dict(SD_V1, timestep_spacing="trailing", steps_offset=0, rescale_betas_zero_snr=True)


def ddim_zero_snr():
    return DDIMScheduler(**ZERO_SNR_DIFFUSERS, set_alpha_to_one=False, prediction_type="v_prediction")


def ddim_inverse(prediction_type="eps"):
    return DDIMInverseScheduler(**SD_V1, set_alpha_to_one=False, prediction_type=DIFFUSERS_NAME[prediction_type])


def randn(seed, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def toy_model(x, t):
    """Deterministic, nonlinear in x and t, about unit scale: stands in for the UNet."""
    s = t.float().view(-1, 1, 1, 1) / 1000
    return torch.tanh(x) * (1 - s) + 0.3 * torch.sin(3 * x + s)


def assert_step_close(ours, theirs, atol=STEP_ATOL):
    assert (ours - theirs).abs().max().item() < atol


def assert_loop_close(ours, theirs):  # toy-model latents reach ~50, where float32 steps are ~4e-6: relative
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() < 1e-5


def assert_x0_close(ours, theirs):  # x0 = x_t / sqrt(abar_t) - ... reaches ~100 at t = 981: compare relatively
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 20, 30, 50, 999])
def test_timesteps_equal_diffusers_leading_spacing_with_offset(steps):
    ours = Diffusion().timesteps(steps)
    for scheduler in (ddim(), ddpm()):
        scheduler.set_timesteps(steps)
        assert ours.tolist() == scheduler.timesteps.tolist()
    inverse = ddim_inverse()
    inverse.set_timesteps(steps)
    assert ours.flip(0).tolist() == inverse.timesteps.tolist()


def test_timesteps_reject_out_of_range_steps():
    for steps in (0, 1000):
        with pytest.raises(NanocustomError):
            Diffusion().timesteps(steps)


def test_schedule_equals_diffusers_alphas_cumprod():
    ours = Diffusion().alphas_cumprod
    theirs = ddim().alphas_cumprod.double()  # theirs is computed in float32, ours in float64 as CompVis
    assert ((ours - theirs) / ours).abs().max().item() < 2e-6
    assert ours.dtype == torch.float64


def test_zero_terminal_snr_schedule_equals_diffusers_rescaled_betas():
    ours = Diffusion(**ZERO_SNR).alphas_cumprod
    theirs = ddim_zero_snr().alphas_cumprod.double()
    assert ours[-1].item() == 0.0  # SNR(T) = 0: x_T is pure noise
    assert ours[0].item() == pytest.approx(Diffusion().alphas_cumprod[0].item(), rel=1e-12)  # the first step kept
    assert (ours - theirs).abs().max().item() < 2e-6


@pytest.mark.parametrize("steps", [1, 7, 20, 30, 50, 999])
def test_trailing_timesteps_equal_diffusers_and_start_at_T(steps):
    ours = Diffusion(**ZERO_SNR).timesteps(steps)
    scheduler = ddim_zero_snr()
    scheduler.set_timesteps(steps)
    assert ours.tolist() == scheduler.timesteps.tolist()
    assert ours[0].item() == 999


@pytest.mark.parametrize("steps", [50, 30])
def test_zero_snr_v_prediction_ddim_step_equals_diffusers_at_every_timestep(steps):
    d, ref = Diffusion(**ZERO_SNR), ddim_zero_snr()
    ref.set_timesteps(steps)
    for i, t in enumerate(ref.timesteps.tolist()):
        x, out = randn(2 * i), randn(2 * i + 1)
        theirs = ref.step(out, t, x, eta=0.0)
        x0, eps = d.split(out, x, t, "v")
        assert torch.isfinite(x0).all() and torch.isfinite(eps).all()  # at t = T too, where sqrt(abar) = 0
        assert_step_close(d.ddim_step(x0, eps, t, t - 1000 // steps), theirs.prev_sample)
        assert_x0_close(x0, theirs.pred_original_sample)


def test_zero_snr_sample_equals_diffusers_loop():
    x_T = randn(0)
    ours = sample(toy_model, x_T, steps=20, prediction_type="v", progress=False, diffusion=Diffusion(**ZERO_SNR))
    assert_loop_close(ours, diffusers_loop(ddim_zero_snr(), 20, x_T, eta=0.0))


def test_add_noise_equals_diffusers():
    x0, noise, t = randn(0), randn(1), torch.tensor([3, 977])
    assert_step_close(Diffusion().add_noise(x0, noise, t), ddpm().add_noise(x0, noise, t))


def test_v_target_equals_diffusers_get_velocity():
    x0, noise, t = randn(0), randn(1), torch.tensor([0, 500])
    assert_step_close(Diffusion().target(x0, noise, t, "v"), ddim().get_velocity(x0, noise, t))


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_split_inverts_target_for_every_prediction_type(prediction_type):
    d = Diffusion()
    x0, noise, t = randn(0), randn(1), torch.tensor([1, 999])
    x_t = d.add_noise(x0, noise, t)
    x0_back, eps_back = d.split(d.target(x0, noise, t, prediction_type), x_t, t, prediction_type)
    torch.testing.assert_close(x0_back, x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eps_back, noise, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [50, 20])
@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_ddim_eta0_step_equals_diffusers_at_every_timestep(steps, prediction_type):
    d, ref = Diffusion(), ddim(prediction_type)
    ref.set_timesteps(steps)
    for i, t in enumerate(ref.timesteps.tolist()):
        x, out = randn(2 * i), randn(2 * i + 1)
        theirs = ref.step(out, t, x, eta=0.0)
        x0, eps = d.split(out, x, t, prediction_type)
        # x0-prediction's eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar), times sqrt(1 - abar_prev): diffusers
        # takes 1 - abar of a float32 abar ~ 1, which at t = 1 is off by 4e-5 here (ours: 3e-7, against float64)
        atol = 1e-4 if prediction_type == "x0" else STEP_ATOL
        assert_step_close(d.ddim_step(x0, eps, t, t - 1000 // steps), theirs.prev_sample, atol)
        assert_x0_close(x0, theirs.pred_original_sample)


@pytest.mark.parametrize("steps", [50, 20])
def test_ddim_eta_step_equals_diffusers_with_the_same_noise_or_generator(steps):
    d, ref = Diffusion(), ddim()
    ref.set_timesteps(steps)
    for i, t in enumerate(ref.timesteps.tolist()):
        x, out, z = randn(3 * i), randn(3 * i + 1), randn(3 * i + 2)
        x0, eps = d.split(out, x, t)
        t_prev = t - 1000 // steps
        ours = d.ddim_step(x0, eps, t, t_prev, eta=0.5, noise=z)
        assert_step_close(ours, ref.step(out, t, x, eta=0.5, variance_noise=z).prev_sample)
        g_ours, g_theirs = torch.Generator().manual_seed(i), torch.Generator().manual_seed(i)
        ours = d.ddim_step(x0, eps, t, t_prev, eta=0.5, generator=g_ours)
        assert_step_close(ours, ref.step(out, t, x, eta=0.5, generator=g_theirs).prev_sample)


@pytest.mark.parametrize("steps", [50, 20])
@pytest.mark.parametrize("prediction_type", ["eps", "v"])
def test_ddpm_step_equals_diffusers_with_the_same_generator(steps, prediction_type):
    d, ref = Diffusion(), ddpm(prediction_type)
    ref.set_timesteps(steps)
    for i, t in enumerate(ref.timesteps.tolist()):
        x, out = randn(2 * i), randn(2 * i + 1)
        g_ours, g_theirs = torch.Generator().manual_seed(i), torch.Generator().manual_seed(i)
        theirs = ref.step(out, t, x, generator=g_theirs)
        x0, _ = d.split(out, x, t, prediction_type)
        assert_step_close(d.ddpm_step(x, x0, t, t - 1000 // steps, generator=g_ours), theirs.prev_sample)
        assert_x0_close(x0, theirs.pred_original_sample)
        assert torch.equal(g_ours.get_state(), g_theirs.get_state())  # same number of draws


def test_ddpm_last_step_returns_the_x0_prediction():
    d = Diffusion()
    x, out = randn(0), randn(1)
    x0, _ = d.split(out, x, 1)
    torch.testing.assert_close(d.ddpm_step(x, x0, 1, -19, noise=randn(2)), x0, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("steps", [50, 20])
@pytest.mark.parametrize("prediction_type", ["eps", "v"])
def test_ddim_inversion_step_equals_diffusers_inverse_scheduler(steps, prediction_type):
    d, ref = Diffusion(), ddim_inverse(prediction_type)
    ref.set_timesteps(steps)
    for i, t_next in enumerate(ref.timesteps.tolist()):
        x, out = randn(2 * i), randn(2 * i + 1)
        t = t_next - 1000 // steps
        x0, eps = d.split(out, x, max(t, 0), prediction_type)
        assert_step_close(d.ddim_step(x0, eps, t, t_next), ref.step(out, t_next, x).prev_sample)


def diffusers_loop(scheduler, steps, x, generator=None, **step_kwargs):
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        out = toy_model(x, t.repeat(x.shape[0]))
        x = scheduler.step(out, t, x, generator=generator, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize("sampler, eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
def test_sample_equals_diffusers_loop_with_the_same_generator(sampler, eta):
    """The pipeline's order: x_T first, then one draw per step after the model call."""
    g_ours, g_theirs = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    x_T = torch.randn(SHAPE, generator=g_ours)
    ours = sample(toy_model, x_T, steps=20, sampler=sampler, eta=eta, generator=g_ours, progress=False)
    x_T = torch.randn(SHAPE, generator=g_theirs)
    if sampler == "ddim":
        theirs = diffusers_loop(ddim(), 20, x_T, generator=g_theirs, eta=eta)
    else:
        theirs = diffusers_loop(ddpm(), 20, x_T, generator=g_theirs)
    assert_loop_close(ours, theirs)


def test_invert_equals_diffusers_inverse_loop():
    x0 = randn(0)
    ours = invert(toy_model, x0, steps=20, progress=False)
    ref = ddim_inverse()
    ref.set_timesteps(20)
    x = x0
    for t in ref.timesteps:
        x = ref.step(toy_model(x, t.repeat(x.shape[0])), t, x).prev_sample
    assert_loop_close(ours, x)


def test_invert_then_sample_returns_x0_when_the_model_is_exact():
    """A model whose eps is the same everywhere is exact for the chain through x0 with that eps."""
    x0, eps = randn(0), randn(1)
    model = lambda x, t: eps  # noqa: E731
    x_T = invert(model, x0, steps=20, progress=False)
    torch.testing.assert_close(sample(model, x_T, steps=20, progress=False), x0, rtol=1e-5, atol=1e-5)


def test_callback_sees_every_step_with_its_x0_prediction():
    seen = []
    x = sample(toy_model, randn(0), steps=10, progress=False, callback=lambda *a: seen.append(a))
    assert [s[0] for s in seen] == list(range(10))
    assert [s[1] for s in seen] == Diffusion().timesteps(10).tolist()
    i, t, x_t, x0 = seen[-1]
    assert x_t.shape == x0.shape == x.shape


def test_sample_returns_the_input_dtype_and_feeds_the_model_it():
    dtypes = []

    def model(x, t):
        dtypes.append((x.dtype, t.dtype, tuple(t.shape)))
        return toy_model(x.float(), t).to(x.dtype)

    x = sample(model, randn(0).bfloat16(), steps=3, progress=False)
    assert x.dtype == torch.bfloat16
    assert set(dtypes) == {(torch.bfloat16, torch.long, (SHAPE[0],))}


def test_guided_is_uncond_plus_scale_times_difference():
    cond, uncond = randn(0), randn(1)
    torch.testing.assert_close(guided(cond, uncond, 1.0), cond)
    torch.testing.assert_close(guided(cond, uncond, 0.0), uncond)
    torch.testing.assert_close(guided(cond, uncond, 7.5), uncond + 7.5 * (cond - uncond))


def test_unknown_sampler_and_prediction_type_are_rejected():
    with pytest.raises(NanocustomError):
        sample(toy_model, randn(0), steps=2, sampler="euler", progress=False)
    with pytest.raises(NanocustomError):
        Diffusion().target(randn(0), randn(1), torch.tensor([1, 2]), "epsilon")


def test_slerp_is_han_et_al_eq_7():
    from nanocustom.diffusion import slerp
    g = torch.Generator().manual_seed(0)
    z, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    torch.testing.assert_close(slerp(0.0, z, eps), z)
    torch.testing.assert_close(slerp(1.0, z, eps), eps)
    # orthonormal inputs: the midpoint is (z + e) / sqrt(2), and every point stays on the unit sphere
    e1, e2 = torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)
    e1.view(-1)[0], e2.view(-1)[1] = 1.0, 1.0
    torch.testing.assert_close(slerp(0.5, e1, e2), (e1 + e2) / 2**0.5)
    for alpha in (0.1, 0.3, 0.9):
        assert abs(slerp(alpha, e1, e2).norm().item() - 1.0) < 1e-6
    # per sample, against Eq. 7 written out with phi from that sample alone
    a, b = z[1].flatten().double(), eps[1].flatten().double()
    phi = torch.arccos(a @ b / (a.norm() * b.norm()))
    expected = (torch.sin(0.7 * phi) * a + torch.sin(0.3 * phi) * b) / torch.sin(phi)
    torch.testing.assert_close(slerp(0.3, z, eps)[1].flatten().double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(slerp(0.4, z, z), z)  # parallel inputs: the linear limit, no 0 / 0
