"""torch.compile on this machine's CPU, each number against a baseline measured in the same run (interleaved rounds):

1. The conditional training step (diffusion.training, l_simple, label dropout), compiled vs eager: the small preset at
   batch 64 (target ≥ 1.25×) and the CIFAR-10 preset at batch 8.
2. Achieved FLOP/s of the small preset's step (torch's FLOP counter over one step) against a 2048² fp32 matmul
   (target ≥ 0.6×), eager and compiled.
3. The samplers' model call (DiffusionModel.denoise, no grad), compiled vs eager.
4. Where the step's time goes, eager and compiled (torch.profiler): the oneDNN convolution, matmul and attention
   kernels, which the compiled graph calls unchanged, and everything else (what compile fuses), with the bound the
   kernels' share puts on any compiled speedup.

    python -m benchmarks.compile_cpu [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.gpu_check import make_step, matmul_peak, step_flops, timed
from benchmarks.report import Row, emit, interleaved
from diffusion.packaged import DiffusionModel
from diffusion.unet import UNet, UNetConfig

CPU = torch.device("cpu")


def step_rows(preset: str, batch: int, rounds: int, steps: int, peak: float | None) -> list[Row]:
    """Compiled vs eager img/s of the conditional step; with `peak`, achieved FLOP/s of each against it."""
    eager, x0, y = make_step(preset, batch, CPU, bf16=False, compile=False, num_classes=10)
    compiled, _, _ = make_step(preset, batch, CPU, bf16=False, compile=True, num_classes=10)
    flops = step_flops(eager, x0, y)
    compiled(x0, y)  # compiles
    seconds = interleaved({"eager": lambda: timed(lambda: eager(x0, y), CPU, steps, warmup=1),
                           "compiled": lambda: timed(lambda: compiled(x0, y), CPU, steps, warmup=1)}, rounds)
    rows = [Row(f"train step {preset} b{batch}: compiled vs eager", batch / seconds["compiled"],
                batch / seconds["eager"], "img/s", "≥ 1.25× (small)" if preset == "small" else "")]
    if peak is not None:
        for mode in ("eager", "compiled"):
            rows.append(Row(f"train step {preset} b{batch} {mode}: FLOP/s vs 2048² sgemm",
                            flops / seconds[mode] / 1e9, peak / 1e9, "GFLOP/s", "≥ 0.6×"))
    return rows


KERNELS = ("convolution", "addmm", "aten::mm", "bmm", "scaled_dot_product")


def kernel_times(preset: str, batch: int, compile: bool, steps: int = 5) -> tuple[float, float]:
    """(ms per step in convolution/matmul/attention kernels, ms per step in everything else), torch.profiler's self
    times over `steps` steps of the conditional step, eager or compiled."""
    from torch.profiler import ProfilerActivity, profile

    step, x0, y = make_step(preset, batch, CPU, bf16=False, compile=compile, num_classes=10)
    step(x0, y)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(x0, y)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / steps / 1e3
    kernels = sum(e.self_cpu_time_total for e in events if any(k in e.key for k in KERNELS)) / steps / 1e3
    return kernels, total - kernels


def kernel_rows(preset: str, batch: int) -> list[Row]:
    """Where compile can gain: the kernels it calls unchanged, and the rest (fused elementwise work, the optimizer,
    EMA), each compiled vs eager; with the bound the kernels' share puts on any compiled speedup."""
    eager, compiled = kernel_times(preset, batch, False), kernel_times(preset, batch, True)
    share = eager[0] / sum(eager)
    return [Row(f"step {preset} b{batch}: conv/matmul/attention kernels, ms", compiled[0], eager[0], "ms",
                f"{share:.0%} of eager; compiled/eager ≤ {1 / share:.2f}× if all else vanished", lower_is_better=True),
            Row(f"step {preset} b{batch}: everything else, ms", compiled[1], eager[1], "ms", "what compile fuses",
                lower_is_better=True)]


def model_call_row(preset: str, batch: int, rounds: int, calls: int) -> Row:
    """The samplers' model call (ε̂ and x̂_0 of a v-prediction conditional model), compiled vs eager."""
    torch.manual_seed(0)
    model = DiffusionModel(UNet(UNetConfig.preset(preset, num_classes=10)), "linear", 1000, prediction="v").eval()
    compiled = torch.compile(model.denoise, fullgraph=True, dynamic=False)
    cfg = model.config
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    t, y = torch.randint(0, 1000, (batch,)), torch.randint(0, 11, (batch,))
    with torch.no_grad():
        compiled(x, t, y)
        seconds = interleaved({"eager": lambda: timed(lambda: model.denoise(x, t, y), CPU, calls, warmup=1),
                               "compiled": lambda: timed(lambda: compiled(x, t, y), CPU, calls, warmup=1)}, rounds)
    return Row(f"model call {preset} b{batch}: compiled vs eager", batch / seconds["compiled"],
               batch / seconds["eager"], "img/s", "reported")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the small preset only, fewer rounds")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rounds = 3 if args.quick else 5
    peak = matmul_peak(CPU, 2048, torch.float32)
    rows = step_rows("small", 64, rounds, 5, peak) + kernel_rows("small", 64) + [model_call_row("small", 64, rounds, 10)]
    if not args.quick:
        rows += step_rows("cifar10", 8, 3, 2, None) + [model_call_row("cifar10", 8, 3, 3)]
    emit(rows, args.json, f"torch.compile on the CPU, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
