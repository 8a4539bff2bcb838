"""Profile of the slowest stage, training: one L_simple step of the 'small' U-Net on CPU under torch.profiler.

Convolutions (`aten::convolution_backward`, `aten::mkldnn_convolution`) take about 60% of the step in either
memory layout, so the layout is the lever: this benchmark times the channels-last (NHWC) step that training uses
against a contiguous (NCHW) step in the same run and records the top operators of each. An earlier measurement on
a loaded machine had suggested NCHW was faster on CPU; this same-run comparison showed the opposite, and training
keeps channels-last everywhere (`train.channels_last: true`).

    python -m benchmarks.profile_train [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.report import Row, emit, interleaved, throughput
from diffusion.losses import l_simple
from diffusion.schedule import NoiseSchedule
from diffusion.unet import UNet, UNetConfig

TOP_OPS = 6


def training_step(memory_format: torch.memory_format, batch: int):
    """A closure running one AdamW step of L_simple on random 8×8×1 images in `memory_format`."""
    torch.manual_seed(0)
    model = UNet(UNetConfig.preset("small")).to(memory_format=memory_format)
    x0 = torch.randn(batch, 1, 8, 8).contiguous(memory_format=memory_format)
    sched = NoiseSchedule.linear()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4)

    def step() -> None:
        loss = l_simple(model, sched, x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def top_operators(step, calls: int) -> list[dict]:
    """The TOP_OPS operators by self CPU time over `calls` steps: name, share of the step, ms per step."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "share": e.self_cpu_time_total / total, "ms_per_step": e.self_cpu_time_total / 1e3 / calls}
            for e in events[:TOP_OPS]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", help="write the rows and the profiles as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one Ray Train worker per core on the CPU default
    batch, steps = 32, (5 if args.quick else 20)
    steps_by_layout = {"channels_last": training_step(torch.channels_last, batch),
                       "contiguous": training_step(torch.contiguous_format, batch)}
    rates = interleaved({name: (lambda s=s: throughput(s, batch, steps)) for name, s in steps_by_layout.items()},
                        rounds=3)
    profiles = {name: top_operators(s, calls=steps // 2 or 1) for name, s in steps_by_layout.items()}
    for name, ops in profiles.items():
        print(f"\ntop operators, {name}:")
        for op in ops:
            print(f"  {op['op']:<48} {op['share']:6.1%} {op['ms_per_step']:8.2f} ms/step")
    rows = [Row("profile: train step channels-last (training's layout) vs NCHW, CPU 1 thread",
                rates["channels_last"], rates["contiguous"], "img/s", "≥ 1.0x")]
    emit(rows, args.json, "training profile")
    if args.json:
        data = json.loads(Path(args.json).read_text())
        Path(args.json).write_text(json.dumps({**data, "profiles": profiles}, indent=2))


if __name__ == "__main__":
    main()
