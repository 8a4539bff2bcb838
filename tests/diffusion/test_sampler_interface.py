"""The one sampler interface: the registry matches the catalog, `sample` reaches every sampler by name, options are
checked by name, and a run advanced one model call at a time (as the serving engine does, several runs sharing each
call) lands on the exact law of its update rule."""

import math

import pytest
import torch

from diffusion.sampler_specs import SAMPLER_NAMES, SAMPLER_SPECS, sampler_spec
from diffusion.samplers import SAMPLERS, Denoised, ddim_sample, ddpm_sample, model_eps, sample
from diffusion.schedule import NoiseSchedule, spaced_timesteps
from tests.diffusion.oracles import GaussianOracle
from tests.diffusion.test_samplers import _exact_final_moments


def test_registry_and_catalog_list_the_same_samplers():
    assert tuple(SAMPLERS) == SAMPLER_NAMES == ("ddpm", "ddim", "sde", "pc", "ode-euler", "ode-heun", "dpmpp-2m",
                                                       "distilled")
    assert all(SAMPLERS[name].spec is SAMPLER_SPECS[name] for name in SAMPLER_NAMES)


@pytest.mark.parametrize("name, loop, options", [
    ("ddpm", ddpm_sample, {"variance": "large"}),
    ("ddim", ddim_sample, {"eta": 0.5}),
])
def test_sample_by_name_equals_the_named_loop(name, loop, options):
    sched = NoiseSchedule.linear(100)
    model = GaussianOracle(sched, 0.1, 0.5)
    ours = sample(model, sched, (4, 1, 2, 2), sampler=name, steps=7, generator=torch.Generator().manual_seed(3),
                  **options)
    ref = loop(model, sched, (4, 1, 2, 2), steps=7, generator=torch.Generator().manual_seed(3), **options)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_default_steps_and_nfe_come_from_the_catalog():
    sched = NoiseSchedule.linear(100)
    for name, expected in (("ddpm", 100), ("ddim", 50)):
        calls = []
        sample(GaussianOracle(sched, 0.0, 1.0), sched, (1, 1), sampler=name, progress=lambda k, n: calls.append((k, n)))
        assert calls == [(k, expected) for k in range(1, expected + 1)]
        assert sampler_spec(name).model_calls(sampler_spec(name).steps_for(100)) == expected


@pytest.mark.parametrize("kwargs, match", [
    ({"sampler": "euler"}, "unknown sampler 'euler'; known samplers: ddpm, ddim"),
    ({"sampler": "ddpm", "eta": 0.5}, "option 'eta' applies only to sampler\\(s\\) ddim; sampler 'ddpm' takes"),
    ({"sampler": "ddim", "eta": 1.5}, "option 'eta' must be in \\[0.0, 1.0\\]"),
    ({"sampler": "ddpm", "variance": "medium"}, "option 'variance' must be one of small, large"),
    ({"sampler": "ddim", "spacing": "cubic"}, "option 'spacing' must be one of"),
    ({"sampler": "ddim", "clip_x0": 1}, "option 'clip_x0' must be a bool"),
    ({"sampler": "ddim", "steps": 101}, "steps must be in \\[1, 100\\]"),
])
def test_bad_sampler_names_options_and_steps_are_named(kwargs, match):
    sched = NoiseSchedule.linear(100)
    with pytest.raises(ValueError, match=match):
        sample(GaussianOracle(sched, 0.0, 1.0), sched, (1, 1), **kwargs)


@pytest.mark.parametrize("name, steps, options", [("ddim", 10, {"eta": 0.3}), ("ddpm", 20, {})])
def test_runs_advanced_one_call_at_a_time_in_a_shared_batch_follow_their_exact_law(name, steps, options):
    """Two runs of different step counts share each model call (one concatenated batch, each its own t), as the
    engine does; each ends on the mean/variance its discrete update rule gives for Gaussian data."""
    mu, s, n = 0.3, 0.15, 20000
    sched = NoiseSchedule.linear()
    model, impl = GaussianOracle(sched, mu, s), SAMPLERS[name]
    gens = [torch.Generator().manual_seed(k) for k in (0, 1)]
    states = [impl.start(sched, torch.randn(n, 1, generator=g), k_steps, clip_x0=False, **options)
              for g, k_steps in zip(gens, (steps, steps // 2))]
    while any(not st.done for st in states):
        live = [(st, g) for st, g in zip(states, gens) if not st.done]
        inputs = [impl.model_input(st) for st, _ in live]
        x = torch.cat([xi for xi, _ in inputs])
        t = torch.cat([torch.full((xi.shape[0],), ti) for xi, ti in inputs])
        for (st, g), eps in zip(live, model(x, t).split([xi.shape[0] for xi, _ in inputs])):
            impl.step(st, Denoised(eps), g)
    for st, k_steps in zip(states, (steps, steps // 2)):
        assert st.nfe == k_steps
        spacing = sampler_spec(name).options["spacing"].default
        walk = sched.respace(spaced_timesteps(1000, k_steps, spacing))
        m, v = _exact_final_moments(walk, mu, s, options.get("eta", 0.0), None if name == "ddim" else "small")
        assert st.x.mean().item() == pytest.approx(m, abs=4 * math.sqrt(v / n))
        assert st.x.std().item() == pytest.approx(math.sqrt(v), rel=0.03)


def test_model_eps_checks_the_output_shape():
    with pytest.raises(AssertionError, match="model output"):
        model_eps(lambda x, t: x[:, :1], torch.zeros(2, 3, 4, 4), 5)
