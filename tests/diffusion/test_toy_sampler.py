"""A sampler written once, in this file alone: registering its definition puts it in the registry and the catalog
(name, options with bounds, default steps, model-call count), its options are validated, `sample` runs it, and the
serving engine steps it one model call at a time, batched with a built-in sampler, to the same images."""

import math

import pytest
import torch

from diffusion.packaged import DiffusionModel
from diffusion.process import x0_from_eps
from diffusion.sampler_specs import SAMPLER_NAMES, SAMPLER_SPECS, OptionSpec, SamplerSpec, sampler_spec
from diffusion.samplers import SAMPLERS, Steps, Walk, get_sampler, register, sample
from diffusion.unet import UNet, UNetConfig
from services.engine import Engine, SampleJob

TOY = SamplerSpec("toy-midpoint", "two model calls per step: ε at x and again at x, averaged (a test toy)",
                  options={"shrink": OptionSpec(1.0, "factor on the step's ε", ge=0.5, le=1.0)},
                  default_steps=4, calls_per_step=2)


def toy(walk: Walk) -> Steps:
    """DDIM at η = 0, unclipped, with ε the mean of two calls (so calls_per_step = 2), scaled by `shrink`."""
    x = walk.x_T
    for i in walk.indices():
        first = yield x, walk.t(i)
        second = yield x, walk.t(i)
        eps = 0.5 * (first.eps + second.eps) * walk.options["shrink"]
        abar, abar_prev = float(walk.sched.alphas_cumprod[i]), float(walk.sched.alphas_cumprod_prev[i])
        x = math.sqrt(abar_prev) * x0_from_eps(x, eps, abar) + math.sqrt(1.0 - abar_prev) * eps
    return x


@pytest.fixture(scope="module")
def registered():
    register(TOY)(toy)
    yield TOY.name
    del SAMPLERS[TOY.name], SAMPLER_SPECS[TOY.name]


@pytest.fixture(scope="module")
def model():
    config = UNetConfig(image_size=8, in_channels=1, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                        dropout=0.0, norm_groups=8)
    torch.manual_seed(0)
    return DiffusionModel(UNet(config), "linear", 100).eval()


def test_registered_sampler_is_in_registry_and_catalog(registered):
    assert sampler_spec(registered) is TOY and get_sampler(registered).definition is toy
    assert registered in SAMPLERS and registered not in SAMPLER_NAMES  # the built-ins stay as they are
    assert TOY.steps_for(100) == 4 and TOY.model_calls(4) == 8
    with pytest.raises(ValueError, match="already in the catalog"):
        register(SamplerSpec(registered, "another", options={}))(toy)


def test_options_are_validated_by_name(registered, model):
    with pytest.raises(ValueError, match="'shrink' must be in"):
        sample(model, model.schedule(), (1, 1, 8, 8), registered, shrink=2.0)
    with pytest.raises(ValueError, match="'eta' applies only to sampler"):
        sample(model, model.schedule(), (1, 1, 8, 8), registered, eta=0.5)


def test_sample_runs_it_with_the_catalog_model_calls(registered, model):
    calls = []
    x = sample(model, model.schedule(), (2, 1, 8, 8), registered, generator=torch.Generator().manual_seed(1),
               progress=lambda k, n: calls.append((k, n)))
    assert calls == [(k, 8) for k in range(1, 9)]
    ref = sample(model, model.schedule(), (2, 1, 8, 8), "ddim", 4, torch.Generator().manual_seed(1), clip_x0=False,
                 spacing="linspace")  # the same update with ε computed once: equal up to float rounding
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-5)


def test_the_engine_serves_it_beside_a_builtin_sampler(registered, model):
    engine = Engine(model, "cpu")
    jobs = [SampleJob(registered, 5, 2, seed=3, options={"shrink": 0.9}), SampleJob("ddim", 3, 1, seed=4)]
    toy_images, ddim_images = engine.sample(jobs)
    for job, images in ((jobs[0], toy_images), (jobs[1], ddim_images)):
        alone = sample(model, model.schedule(), (job.num_images, 1, 8, 8), job.sampler, job.steps,
                       torch.Generator().manual_seed(job.seed), **job.options)
        torch.testing.assert_close(images, alone.clamp(-1, 1), rtol=0, atol=1e-5)
