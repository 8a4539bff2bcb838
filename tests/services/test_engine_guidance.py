"""Class-conditional sampling and classifier-free guidance in the serving engine, without Ray: requests with
different labels and guidance scales share ONE forward pass per tick and still end with the images each gets alone;
s = 1 is plain conditional sampling; bad conditioning is a ValueError naming the problem.

"The images it gets alone" means up to the float rounding of batched convolutions, which guidance amplifies by about
2s − 1: ATOL, still ~100× below one 8-bit level (1/127.5)."""

import pytest
import torch

from diffusion.guidance import denoise
from diffusion.packaged import DiffusionModel
from diffusion.samplers import sample
from diffusion.unet import UNet, UNetConfig
from services.engine import Engine, SampleJob

ATOL = 1e-4
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def conditional_model(seed: int = 0) -> DiffusionModel:
    """A tiny 10-class model whose zero-initialised layers (output conv, residual branches) get small random weights,
    so that, untrained, its ε̂ still depends on x, t and the label."""
    torch.manual_seed(seed)
    model = DiffusionModel(UNet(UNetConfig.preset("tiny", num_classes=10)), "linear", 1000, class_names=NAMES)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    return model.eval()


class ForwardCounter:
    """Counts the U-Net's forward calls and the images in each."""

    def __init__(self, engine: Engine):
        self.sizes: list[int] = []
        self.handle = engine.model.unet.register_forward_hook(lambda m, args, out: self.sizes.append(args[0].shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.fixture(scope="module")
def engine():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: more threads only add contention
    yield Engine(conditional_model(), "cpu")
    torch.set_num_threads(threads)


def run(engine: Engine, jobs: list[SampleJob], max_forward: int = 1024) -> tuple[list[torch.Tensor], int]:
    """→ (each job's images, ticks) with all jobs started together."""
    trajectories = [engine.start(job) for job in jobs]
    ticks = 0
    while not all(tr.done for tr in trajectories):
        engine.tick(trajectories, max_forward)
        ticks += 1
    return [engine.result(tr) for tr in trajectories], ticks


def test_engine_reports_the_model_classes(engine):
    assert engine.num_classes == 10 and engine.model.class_names[7] == "seven"
    labels = engine.labels_for(SampleJob("ddim", 3, 3, 0, class_labels=(4,)))
    assert labels.dtype == torch.long and labels.tolist() == [4, 4, 4]  # one label for all images


def test_conditioning_changes_the_output(engine):
    job = SampleJob("ddim", 4, 2, seed=5)
    (uncond,) = engine.sample([job])
    (zero,), (one,) = (engine.sample([SampleJob("ddim", 4, 2, seed=5, class_labels=(k,))]) for k in (0, 1))
    assert (zero - one).abs().max() > 1e-3 and (zero - uncond).abs().max() > 1e-3
    (guided,) = engine.sample([SampleJob("ddim", 4, 2, seed=5, class_labels=(0,), guidance_scale=4.0)])
    assert (guided - zero).abs().max() > 1e-3, "a guidance scale ≠ 1 must change the images"


def test_scale_one_is_plain_conditional_sampling_exactly(engine):
    """s = 1: no null-class rows in the forward pass, and bit for bit the library's conditional sampler."""
    labels = torch.tensor([3, 1, 4])
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999, 500, 10])
    with torch.inference_mode():
        assert torch.equal(denoise(engine.model, x, t, labels, 1.0).eps, engine.model(x, t, labels))
    with ForwardCounter(engine) as calls:
        (ours,) = engine.sample([SampleJob("ddpm", 6, 3, seed=2, class_labels=(3, 1, 4), guidance_scale=1.0)])
    assert calls.sizes == [3] * 6, "s = 1 must not evaluate the null class"
    with torch.inference_mode():
        ref = sample(engine.model, engine.schedule, (3, 1, 8, 8), "ddpm", 6, torch.Generator().manual_seed(2),
                     y=labels)
    assert torch.equal(ours, ref.clamp(-1, 1))


def test_guided_job_equals_the_library_sampler(engine):
    job = SampleJob("dpmpp-2m", 5, 2, seed=9, class_labels=(2, 8), guidance_scale=3.0)
    (ours,) = engine.sample([job])
    with torch.inference_mode():
        ref = sample(engine.model, engine.schedule, (2, 1, 8, 8), "dpmpp-2m", 5, torch.Generator().manual_seed(9),
                     y=torch.tensor([2, 8]), guidance_scale=3.0)
    torch.testing.assert_close(ours, ref.clamp(-1, 1), rtol=0, atol=ATOL)


def test_mixed_labels_and_scales_share_one_forward_pass_per_tick_and_keep_their_images(engine):
    """Unconditional, conditional (s = 1), per-image labels with guidance, s = 0 and different samplers in one set:
    one U-Net call per tick holding every image once plus each guided image again, and every job ends with the
    images it gets alone."""
    jobs = [SampleJob("ddim", 4, 2, seed=1),                                                    # null class
            SampleJob("ddim", 4, 2, seed=1, class_labels=(3,)),                                 # s = 1
            SampleJob("ddpm", 4, 3, seed=2, class_labels=(1, 2, 3), guidance_scale=3.0),         # one label per image
            SampleJob("ode-heun", 3, 1, seed=3, class_labels=(7,), guidance_scale=0.0),          # s = 0: ε(∅)
            SampleJob("dpmpp-2m", 4, 2, seed=4, class_labels=(9,), guidance_scale=7.5)]
    with ForwardCounter(engine) as calls:
        merged, ticks = run(engine, jobs)
    assert len(calls.sizes) == ticks == 5  # ode-heun: 3 steps = 5 model calls
    assert calls.sizes[0] == (2 + 2 + 3 + 1 + 2) + (3 + 1 + 2), calls.sizes  # 10 images, 6 of them guided
    assert engine.counters["tick_images"] >= sum(calls.sizes)
    for job, images in zip(jobs, merged):
        (alone,) = engine.sample([job])
        torch.testing.assert_close(images, alone, rtol=0, atol=ATOL, msg=lambda m: f"{job}: {m}")
    assert not torch.allclose(merged[0], merged[1], atol=1e-3), "label 3 must differ from the null class"


def test_chunked_guided_ticks_stay_within_max_forward(engine):
    jobs = [SampleJob("ddim", 3, 3, seed=1, class_labels=(5,), guidance_scale=2.0),
            SampleJob("ddim", 3, 2, seed=2)]
    (alone_a,), (alone_b,) = engine.sample([jobs[0]]), engine.sample([jobs[1]])
    with ForwardCounter(engine) as calls:
        (a, b), ticks = run(engine, jobs, max_forward=4)
    assert ticks == 3 and max(calls.sizes) <= 4 and sum(calls.sizes) == 3 * (5 + 3)
    torch.testing.assert_close(a, alone_a, rtol=0, atol=ATOL)
    torch.testing.assert_close(b, alone_b, rtol=0, atol=ATOL)


@pytest.mark.parametrize("job,match", [
    (SampleJob("ddim", 3, 3, 0, class_labels=(1, 2)), "class_labels has 2 labels"),
    (SampleJob("ddim", 3, 1, 0, class_labels=(10,)), r"outside the model's classes 0\.\.9"),
    (SampleJob("ddim", 3, 1, 0, class_labels=(-1,)), "outside"),
    (SampleJob("ddim", 3, 1, 0, class_labels=(True,)), "outside"),
    (SampleJob("ddim", 3, 1, 0, class_labels=("three",)), "outside"),
    (SampleJob("ddim", 3, 1, 0, guidance_scale=3.0), "needs class_labels"),
    (SampleJob("ddim", 3, 1, 0, class_labels=(1,), guidance_scale=float("nan")), "finite"),
])
def test_bad_conditioning_is_rejected(engine, job, match):
    with pytest.raises(ValueError, match=match):
        engine.start(job)


def test_guidance_on_an_unconditional_model_is_rejected():
    torch.manual_seed(0)
    plain = Engine(DiffusionModel(UNet(UNetConfig.preset("tiny")), "linear", 1000).eval(), "cpu")
    assert plain.num_classes is None
    with pytest.raises(ValueError, match="guidance_scale .* needs a class-conditional model"):
        plain.start(SampleJob("ddim", 3, 1, 0, guidance_scale=3.0))
    with pytest.raises(ValueError, match="unconditional"):
        plain.start(SampleJob("ddim", 3, 1, 0, class_labels=(1,)))
    assert plain.start(SampleJob("ddim", 3, 1, 0, guidance_scale=1.0)).labels is None
