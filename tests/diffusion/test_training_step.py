"""The pure training step (diffusion.training) checked for what a GPU would punish, on the CPU: the meta device (a
tensor made on the wrong device or a host sync raises there), a dtype audit (no float64 op on a batch-sized tensor),
torch.compile with fullgraph=True (no graph break) giving the eager step's loss and weights, and bf16 autocast
leaving the learned variance and L_0 at float32 precision."""

import pytest
import torch

from diffusion.ema import EMA
from diffusion.objectives import ImportanceSampler
from diffusion.schedule import build_schedule
from diffusion.training import StepOptions, TrainingStep
from diffusion.unet import UNet, UNetConfig
from tests.diffusion.audit import float64_on_batch

SCHED = build_schedule("linear", 50)
BATCH = 3
CASES = [("l_simple", "eps", False, None), ("l_simple", "v", False, 10), ("l_simple", "x0", False, None),
         ("l_hybrid", "eps", True, 10), ("l_hybrid", "v", True, None), ("l_vlb", "eps", True, None),
         ("l_vlb", "v", False, 10)]
IDS = [f"{o}-{p}-{'learned' if lv else 'fixed'}-{'cond' if k else 'uncond'}" for o, p, lv, k in CASES]


def make_step(case, device="cpu", compile=False, seed=0) -> TrainingStep:
    objective, prediction, learn_variance, num_classes = case
    torch.manual_seed(seed)
    unet = UNet(UNetConfig.preset("tiny", learn_variance=learn_variance, num_classes=num_classes)).to(device)
    options = StepOptions(objective=objective, prediction=prediction, learn_variance=learn_variance,
                          loss_weighting="min_snr" if objective == "l_simple" and prediction == "v" else "none",
                          p_uncond=0.2 if num_classes else 0.0)
    t_sampler = ImportanceSampler(SCHED.num_timesteps) if objective == "l_vlb" else None
    return TrainingStep(unet, SCHED, torch.optim.AdamW(unet.parameters(), lr=1e-3), EMA(unet, 0.99), options,
                        t_sampler=t_sampler, compile=compile)


def batch(case, device="cpu"):
    generator = torch.Generator().manual_seed(1)
    x0 = (torch.rand(BATCH, 1, 8, 8, generator=generator) * 2 - 1).to(device)
    y = None if case[3] is None else torch.randint(0, case[3], (BATCH,), generator=generator).to(device)
    return x0, y


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_the_step_runs_on_the_meta_device(case):
    """Every tensor the step makes follows the model's device, and nothing reads a value back to the host."""
    step = make_step(case, device="meta")
    metrics = step(*batch(case, device="meta"))
    assert {m.device.type for m in metrics.values()} == {"meta"}
    assert metrics["loss"].dtype == torch.float32
    assert len(step.pending) == (1 if case[0] == "l_vlb" else 0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_no_float64_op_touches_a_batch(case):
    step = make_step(case)
    with float64_on_batch(BATCH) as audit:
        step(*batch(case))
    assert audit.found == []


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_the_compiled_step_has_no_graph_break_and_equals_the_eager_step(case):
    """fullgraph=True through dynamo and AOT autograd (the graph a GPU backend compiles), same loss and weights."""
    eager, compiled = make_step(case), make_step(case)
    compiled.terms = torch.compile(compiled.terms, fullgraph=True, backend="aot_eager")
    assert_same_steps(eager, compiled, *batch(case))


def assert_same_steps(eager: TrainingStep, compiled: TrainingStep, x0, y, tol: float = 1e-5) -> None:
    for _ in range(2):
        torch.manual_seed(5)
        a = eager(x0, y)
        torch.manual_seed(5)
        b = compiled(x0, y)
        torch.testing.assert_close(b["loss"], a["loss"], rtol=tol, atol=tol)
    for p, q in zip(eager.unet.parameters(), compiled.unet.parameters()):
        torch.testing.assert_close(q, p, rtol=tol, atol=tol)


def test_the_inductor_compiled_step_equals_the_eager_step():
    """`compile=True` as the train stage uses it: inductor's generated code, conditional model, learned variance."""
    case = ("l_hybrid", "v", True, 10)
    assert_same_steps(make_step(case), make_step(case, compile=True), *batch(case), tol=1e-4)


def test_bf16_autocast_keeps_the_learned_variance_and_l0_at_float32_precision():
    """Under autocast the network's variance channels come out in bf16; log Σ_θ (eq. 15) and the decoder term L_0
    computed from them must be the float32 values of those same bf16 numbers, not bf16-rounded results."""
    from diffusion.losses import vlb_term
    from diffusion.parameterization import model_prediction
    from diffusion.process import q_posterior

    generator = torch.Generator().manual_seed(3)
    x0 = torch.rand(BATCH, 1, 8, 8, generator=generator) * 2 - 1
    x_t = torch.randn(BATCH, 1, 8, 8, generator=generator)
    output = torch.randn(BATCH, 2, 8, 8, generator=generator).to(torch.bfloat16)  # what autocast's network returns
    t = torch.tensor([0, 0, 30])

    def terms(out):
        pred = model_prediction(SCHED, x_t, t, out, "v", learn_variance=True)
        mean, _, _ = q_posterior(SCHED, pred.x0, x_t, t)
        return pred.log_variance, vlb_term(SCHED, x0, x_t, t, mean, pred.log_variance)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        log_variance, vb = terms(output)
    exact_log_variance, exact_vb = terms(output.float())
    assert log_variance.dtype == torch.float32 and vb.dtype == torch.float32
    torch.testing.assert_close(log_variance, exact_log_variance, rtol=1e-6, atol=0)
    torch.testing.assert_close(vb, exact_vb, rtol=1e-5, atol=0)
    gap = (SCHED.log_betas[30] - SCHED.posterior_log_variance_clipped[30]) / abs(SCHED.log_betas[30])
    assert gap < 2 ** -8, "the case this guards: log β − log β̃ is finer than one bf16 step at this t"
