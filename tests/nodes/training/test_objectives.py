"""Each objective's noising and target match their definitions, and sampling schedulers match training."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from dagfusion.nodes.training.objectives import (  # noqa: E402
    EpsilonObjective,
    ModelCall,
    Objective,
    RectifiedFlowObjective,
    TrainBatch,
    TrainStep,
    VPredictionObjective,
)


class _Identity:
    """A family stand-in: call the module as a function, drop nothing."""

    name = "test"

    def call(self, module, sample, timestep, kwargs):
        return module(sample, timestep)

    def drop_variance(self, out, module):
        return out


def _oracle_call(objective, x0, seed, expected):
    """A model call whose prediction is ``expected(x0, noise, t)`` for the noise the objective draws."""
    noise, t = objective.draw(x0, torch.Generator().manual_seed(seed))
    seen = {}

    def module(sample, timestep):
        seen.update(sample=sample, timestep=timestep)
        return expected(x0, noise, t)

    import contextlib

    return ModelCall(module, _Identity(), {}, contextlib.nullcontext), noise, t, seen


def _x0():
    return torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))


def _diffusers_alphas(**config):
    return diffusers.DDPMScheduler(**config).alphas_cumprod


def test_epsilon_target_is_the_noise_and_noising_matches_diffusers():
    objective = EpsilonObjective()
    x0 = _x0()
    call, noise, t, seen = _oracle_call(objective, x0, 0, lambda x0, noise, t: noise)
    loss, logs = objective.loss(call, TrainBatch(x0, ("a",) * 3), TrainStep(0, 1), torch.Generator().manual_seed(0))
    assert loss.item() == 0.0 and logs == {}
    reference = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    torch.testing.assert_close(seen["sample"], reference.add_noise(x0, noise, t))
    assert torch.equal(seen["timestep"], t)
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) < 1000


def test_v_target_is_alpha_eps_minus_sigma_x0():
    objective = VPredictionObjective(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    abar = _diffusers_alphas(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)

    def v(x0, noise, t):
        alpha = abar[t].sqrt().view(-1, 1, 1, 1)
        sigma = (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
        return alpha * noise - sigma * x0

    x0 = _x0()
    call, noise, t, _ = _oracle_call(objective, x0, 5, v)
    loss, _ = objective.loss(call, TrainBatch(x0, ("",) * 3), TrainStep(0, 1), torch.Generator().manual_seed(5))
    assert loss.item() < 1e-12
    # the same target as diffusers' own definition (DDPMScheduler.get_velocity)
    reference = diffusers.DDPMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    torch.testing.assert_close(objective.target(x0, noise, t), reference.get_velocity(x0, noise, t))


def test_zero_terminal_snr_makes_the_last_step_pure_noise():
    objective = VPredictionObjective(zero_terminal_snr=True)
    abar = objective.alphas_cumprod
    assert abar[-1].item() == 0.0
    torch.testing.assert_close(abar, _diffusers_alphas(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                       rescale_betas_zero_snr=True))
    x0, noise = _x0(), torch.randn(3, 4, 8, 8)
    last = torch.full((3,), 999)
    torch.testing.assert_close(objective.noisy(x0, noise, last), noise)
    torch.testing.assert_close(objective.target(x0, noise, last), -x0)  # v = -x0 at zero SNR
    with pytest.raises(ValueError, match="undefined at zero terminal SNR"):
        EpsilonObjective(zero_terminal_snr=True)


@pytest.mark.parametrize("sampling,shift", [("uniform", 1.0), ("logit_normal", 3.0)])
def test_flow_target_is_noise_minus_x0_and_one_euler_step_recovers_x0(sampling, shift):
    objective = RectifiedFlowObjective(shift=shift, timestep_sampling=sampling)
    x0 = _x0()
    call, noise, sigma, seen = _oracle_call(objective, x0, 2, lambda x0, noise, s: noise - x0)
    loss, _ = objective.loss(call, TrainBatch(x0, ("",) * 3), TrainStep(0, 1), torch.Generator().manual_seed(2))
    assert loss.item() == 0.0
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(seen["sample"], (1 - s) * x0 + s * noise)
    torch.testing.assert_close(seen["timestep"], sigma * 1000)
    assert 0.0 <= float(sigma.min()) and float(sigma.max()) < 1.0
    # diffusers' flow sampler steps x <- x + (sigma_next - sigma) * v: with the exact velocity, to sigma = 0 gives x0
    x_t = seen["sample"]
    torch.testing.assert_close(x_t + (0 - s) * (noise - x0), x0)


def test_flow_shift_matches_the_sampler_shift():
    objective = RectifiedFlowObjective(shift=3.0)
    scheduler = objective.sampling_scheduler(None).create()
    assert type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert scheduler.config.shift == 3.0
    _, sigma = objective.draw(torch.zeros(3, 1, 1, 1), torch.Generator().manual_seed(0))
    u = torch.rand(3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sigma, 3.0 * u / (1 + 2.0 * u))  # diffusers: shift*s / (1 + (shift-1)*s)
    assert torch.all(sigma > u)  # a shift above 1 moves training towards noise


def test_sampling_schedulers_match_the_training_schedule(parts):
    base = parts["model"].scheduler  # PNDM, SD schedule
    eps = EpsilonObjective(beta_schedule="linear", beta_start=0.0001, beta_end=0.02).sampling_scheduler(base)
    assert eps.class_name == base.class_name
    assert eps.config["prediction_type"] == "epsilon" and eps.config["beta_schedule"] == "linear"
    v = VPredictionObjective(zero_terminal_snr=True).sampling_scheduler(base)
    assert v.class_name == "DDIMScheduler"  # PNDM cannot rescale to zero SNR
    assert v.config["prediction_type"] == "v_prediction"
    assert v.config["rescale_betas_zero_snr"] is True and v.config["timestep_spacing"] == "trailing"
    assert v.config["clip_sample"] is False
    sampler = v.create()
    assert sampler.alphas_cumprod[-1].item() == 0.0
    assert VPredictionObjective().sampling_scheduler(None).class_name == "DDIMScheduler"


def test_objectives_are_plain_fingerprintable_values():
    from dagfusion.fingerprint import fingerprint

    a, b = VPredictionObjective(zero_terminal_snr=True), VPredictionObjective(zero_terminal_snr=True)
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) != fingerprint(VPredictionObjective())
    assert fingerprint(a) != fingerprint(EpsilonObjective())
    described = RectifiedFlowObjective().describe()
    assert described["objective"] == "rectified_flow" and "timesteps" in described and "schedule" in described
    with pytest.raises(ValueError, match="beta schedule"):
        EpsilonObjective(beta_schedule="cubic")
    with pytest.raises(ValueError, match="timestep_sampling"):
        RectifiedFlowObjective(timestep_sampling="beta")
    with pytest.raises(NotImplementedError, match="must implement loss"):
        Objective().loss(None, None, None, None)
