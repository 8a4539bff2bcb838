"""One command for an accelerator: the training step and the samplers of the CIFAR-10 U-Net (35.7M parameters, 32×32)
eager vs torch.compile and fp32 vs bf16, against a matmul peak measured in the same run. Needs only diffusion/,
services/engine.py and torch (no Ray, MLflow or network), prints a table and writes JSON.

    python -m benchmarks.gpu_check [--device cuda] [--json gpu_check.json]
    python -m benchmarks.gpu_check --device cpu --tiny          # the tiny U-Net, a few steps: what CI runs

Rows: matmul peak (fp32, bf16); training img/s, achieved FLOP/s and MFU (against the same-precision peak), peak memory,
for eager/compiled × fp32/bf16; the bf16 loss against the fp32 loss on the same batch (target within 2%); samples/s
of ddim-50 and dpmpp-2m-20; the serving engine's img/s on a mix of requests (continuous batching).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffusion.ema import EMA
from diffusion.packaged import DiffusionModel
from diffusion.samplers import sample
from diffusion.schedule import build_schedule
from diffusion.training import StepOptions, TrainingStep, loss_terms
from diffusion.unet import UNet, UNetConfig, count_parameters


@dataclass(frozen=True)
class Sizes:
    preset: str
    batch: int
    steps: int
    matmul: int
    sample_batch: int
    sample_steps: dict
    requests: int

    @classmethod
    def of(cls, tiny: bool) -> "Sizes":
        if tiny:
            return cls("tiny", 8, 3, 512, 4, {"ddim": 5, "dpmpp-2m": 4}, 4)
        return cls("cifar10", 128, 30, 8192, 256, {"ddim": 50, "dpmpp-2m": 20}, 32)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Seconds per call of fn after `warmup` calls, the device synchronized around the timed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def matmul_peak(device: torch.device, n: int, dtype: torch.dtype) -> float:
    """FLOP/s of an n×n matmul in `dtype` (the MFU denominator)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / timed(lambda: a @ b, device, repeats=5)


def make_step(preset: str, batch: int, device: torch.device, bf16: bool, compile: bool,
              num_classes: int | None = None) -> tuple[TrainingStep, torch.Tensor, torch.Tensor | None]:
    """A training step of the `preset` U-Net (channels-last) and a batch for it: (step, x0, labels or None)."""
    torch.manual_seed(0)
    unet = UNet(UNetConfig.preset(preset, num_classes=num_classes)).to(device=device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=device.type == "cuda")
    step = TrainingStep(unet, build_schedule("linear", 1000), optimizer, EMA(unet, 0.9999),
                        StepOptions(bf16=bf16, p_uncond=0.1 if num_classes else 0.0), compile=compile)
    cfg = unet.config
    x0 = torch.rand(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device) * 2 - 1
    y = None if num_classes is None else torch.randint(0, num_classes, (batch,), device=device)
    return step, x0.contiguous(memory_format=torch.channels_last), y


def step_flops(step: TrainingStep, x0: torch.Tensor, y: torch.Tensor | None = None) -> int:
    """FLOPs of one eager step (forward and backward), counted by torch's FLOP counter."""
    with FlopCounterMode(display=False) as counter:
        step(x0, y)
    return counter.get_total_flops()


def train_rows(sizes: Sizes, device: torch.device, peaks: dict[str, float]) -> list[dict]:
    rows, flops = [], None
    for precision in ("fp32", "bf16"):
        for mode in ("eager", "compiled"):
            step, x0, _ = make_step(sizes.preset, sizes.batch, device, precision == "bf16", mode == "compiled")
            flops = flops or step_flops(step, x0)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            compile_start = time.perf_counter()
            step(x0)
            synchronize(device)
            first_s = time.perf_counter() - compile_start
            seconds = timed(lambda: step(x0), device, sizes.steps)
            memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            rows.append({"what": f"train {mode} {precision}", "img_per_s": sizes.batch / seconds,
                         "flop_per_s": flops / seconds, "mfu": flops / seconds / peaks[precision],
                         "peak_memory_gib": memory, "first_step_s": first_s})
    return rows


def bf16_loss_gap(sizes: Sizes, device: torch.device) -> dict:
    """The loss of one batch (same weights, t and ε) in fp32 and under bf16 autocast."""
    step, x0, _ = make_step(sizes.preset, sizes.batch, device, bf16=False, compile=False)
    t = torch.randint(0, 1000, (x0.shape[0],), device=device, generator=None)
    noise = torch.randn_like(x0)
    with torch.no_grad():
        fp32 = loss_terms(step.model, step.sched, step.options, x0, None, t, noise, None)["loss"].mean()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            bf16 = loss_terms(step.model, step.sched, step.options, x0, None, t, noise, None)["loss"].mean()
    gap = abs(float(bf16) - float(fp32)) / float(fp32)
    return {"what": "bf16 loss vs fp32 (same batch)", "fp32": float(fp32), "bf16": float(bf16), "relative_gap": gap,
            "target": 0.02, "ok": gap <= 0.02}


def sampling_rows(sizes: Sizes, device: torch.device) -> list[dict]:
    model = DiffusionModel(UNet(UNetConfig.preset(sizes.preset)), "linear", 1000).to(device).eval()
    shape = (sizes.sample_batch, *model.image_shape)
    rows = []
    for sampler, steps in sizes.sample_steps.items():
        for precision in ("fp32", "bf16"):
            autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

            def run():
                with autocast:
                    sample(model, model.schedule(), shape, sampler, steps=steps,
                           generator=torch.Generator(device).manual_seed(0))

            seconds = timed(run, device, repeats=1, warmup=1)
            rows.append({"what": f"sample {sampler}-{steps} {precision}", "samples_per_s": shape[0] / seconds})
    return rows


def engine_row(sizes: Sizes, device: torch.device) -> dict:
    """The serving engine on a mix of requests (samplers, step counts, sizes) stepped together to completion."""
    from services.engine import Engine, SampleJob

    engine = Engine(DiffusionModel(UNet(UNetConfig.preset(sizes.preset)), "linear", 1000), device)
    mix = [("ddim", sizes.sample_steps["ddim"]), ("dpmpp-2m", sizes.sample_steps["dpmpp-2m"]),
           ("ddpm", 2 * sizes.sample_steps["ddim"])]
    jobs = [SampleJob(*mix[k % len(mix)], num_images=1 + k % 4, seed=k) for k in range(sizes.requests)]
    start = time.perf_counter()
    trajectories = [engine.start(job) for job in jobs]
    while not all(tr.done for tr in trajectories):
        engine.tick(trajectories)
    synchronize(device)
    images = sum(job.num_images for job in jobs)
    return {"what": f"engine, {len(jobs)} mixed requests", "img_per_s": images / (time.perf_counter() - start)}


def table(result: dict) -> str:
    lines = [f"device {result['device']}, U-Net {result['preset']} ({result['parameters_m']:.1f}M parameters), "
             f"matmul peak fp32 {result['peak']['fp32'] / 1e12:.2f} TFLOP/s, bf16 {result['peak']['bf16'] / 1e12:.2f}"]
    for row in result["train"]:
        memory = f"{row['peak_memory_gib']:.1f} GiB" if row["peak_memory_gib"] is not None else "-"
        lines.append(f"{row['what']:<24} {row['img_per_s']:>10,.0f} img/s {row['flop_per_s'] / 1e12:>8.2f} TFLOP/s "
                     f"MFU {row['mfu']:>6.1%}  memory {memory}  first step {row['first_step_s']:.1f}s")
    gap = result["bf16_loss"]
    lines.append(f"bf16 loss {gap['bf16']:.5f} vs fp32 {gap['fp32']:.5f}: {gap['relative_gap']:.2%} "
                 f"({'within' if gap['ok'] else 'OUTSIDE'} 2%)")
    lines += [f"{row['what']:<24} {row['samples_per_s']:>10,.1f} samples/s" for row in result["sampling"]]
    lines.append(f"{result['engine']['what']:<24} {result['engine']['img_per_s']:>10,.1f} img/s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="the tiny U-Net and a few steps (a smoke run)")
    parser.add_argument("--json", default="gpu_check.json", help="where to write the results")
    args = parser.parse_args()
    device, sizes = torch.device(args.device), Sizes.of(args.tiny)
    peaks = {name: matmul_peak(device, sizes.matmul, dtype)
             for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    result = {"device": str(torch.cuda.get_device_name(device) if device.type == "cuda" else device),
              "preset": sizes.preset, "parameters_m": count_parameters(UNet(UNetConfig.preset(sizes.preset))) / 1e6,
              "torch": torch.__version__, "peak": peaks, "train": train_rows(sizes, device, peaks),
              "bf16_loss": bf16_loss_gap(sizes, device), "sampling": sampling_rows(sizes, device),
              "engine": engine_row(sizes, device)}
    print(table(result))
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
