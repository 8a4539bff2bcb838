"""Training throughput, each number against a baseline measured in the same run:

1. U-Net forward+backward img/s: ours vs diffusers.UNet2DModel of identical configuration (target ≥ 1.0×).
2. Training loop img/s: our Ray Train loop (1 worker) vs a bare single-process PyTorch loop, same model,
   batch, loss, optimizer and EMA (target ≥ 0.9×); and 2 workers vs 1 (scaling on CPU).
3. With a GPU: img/s and MFU of the 35.7M CIFAR-10 model in bf16 (target ≥ 10,000 img/s on one H100).

    python -m benchmarks.train_throughput [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.report import Row, emit, interleaved, throughput
from diffusion.ema import EMA
from diffusion.losses import l_simple
from diffusion.schedule import NoiseSchedule
from diffusion.unet import UNet, UNetConfig


def diffusers_twin(cfg: UNetConfig) -> torch.nn.Module:
    """diffusers.UNet2DModel with the same channels, depth, attention resolutions, groups and dropout."""
    from diffusers import UNet2DModel

    res, down, up = cfg.image_size, [], []
    for _ in cfg.ch_mult:
        down.append("AttnDownBlock2D" if res in cfg.attn_resolutions else "DownBlock2D")
        res //= 2
    up = [b.replace("Down", "Up") for b in reversed(down)]
    return UNet2DModel(sample_size=cfg.image_size, in_channels=cfg.in_channels, out_channels=cfg.in_channels,
                       block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult), layers_per_block=cfg.num_res_blocks,
                       down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=cfg.norm_groups,
                       dropout=cfg.dropout)


def fwd_bwd_rate(model: torch.nn.Module, cfg: UNetConfig, batch: int, steps: int, unwrap=lambda out: out) -> float:
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    t = torch.randint(0, 1000, (batch,))

    def step():
        model.zero_grad(set_to_none=True)
        unwrap(model(x, t)).square().mean().backward()

    return throughput(step, batch, steps, warmup=1)


def unet_rows(quick: bool) -> list[Row]:
    rows = []
    # (preset, batch, steps per measurement, interleaved rounds): the small model's 5 s rounds are cheap to repeat.
    cases = [("small", 64, 8, 3)] if quick else [("small", 128, 10, 7), ("cifar10", 8, 3, 3)]
    for preset, batch, steps, rounds in cases:
        cfg = UNetConfig.preset(preset)
        ours, theirs = UNet(cfg).train(), diffusers_twin(cfg).train()
        rates = interleaved({
            "ours": lambda: fwd_bwd_rate(ours, cfg, batch, steps),
            "diffusers": lambda: fwd_bwd_rate(theirs, cfg, batch, steps, unwrap=lambda o: o.sample),
        }, rounds=rounds)
        rows.append(Row(f"U-Net fwd+bwd '{preset}' {cfg.image_size}px b{batch} vs diffusers", rates["ours"],
                        rates["diffusers"], "img/s", "≥ 1.0x"))
    return rows


def bare_loop_rate(cfg: UNetConfig, images: torch.Tensor, batch: int, steps: int, threads: int) -> float:
    """The same step as the Ray Train loop (L_simple, AdamW, clip, EMA) in one process over in-memory images."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = UNet(cfg).to(memory_format=torch.channels_last)
    ema = EMA(model, 0.999)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.0)
    sched = NoiseSchedule.linear()
    perm = torch.randperm(images.shape[0])
    position = [0]

    def step():
        idx = perm[position[0]:position[0] + batch]
        position[0] = (position[0] + batch) % (images.shape[0] - batch)
        loss = l_simple(model, sched, images[idx].contiguous(memory_format=torch.channels_last))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model)

    return throughput(step, batch, steps, warmup=3)


def ray_loop_rate(train_dir: Path, workers: int, batch: int, steps: int, cpus_per_worker: float, log_every: int) -> float:
    """Steady-state img/s of run_training, from its logged images_per_s (the first interval, with start-up, dropped)."""
    from mlflow.tracking import MlflowClient

    from pipelines.train.config import TrainConfig
    from pipelines.train.stage import run_training

    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlruns.db"
        config = TrainConfig.model_validate({
            "model": {"preset": "small"}, "steps": steps, "batch_size": batch, "workers": workers,
            "cpus_per_worker": cpus_per_worker, "log_every": log_every, "checkpoint_every": steps,
            "eval_every": 0, "sample_grid": 4, "sample_ddpm_steps": 2, "sample_ddim_steps": 2, "warmup_steps": 10})
        result = run_training(config, train_dir, None, Path(tmp) / "out", uri, "bench", "bench")
        history = MlflowClient(uri).get_metric_history(result.run_id, "images_per_s")
    return statistics.median(m.value for m in sorted(history, key=lambda m: m.step)[1:])


def loop_rows(quick: bool) -> list[Row]:
    import ray

    from pipelines.ingest.config import IngestConfig
    from pipelines.ingest.reader import load_split_tensor
    from pipelines.ingest.stage import run_ingest

    batch, steps, log_every = 64, (60 if quick else 200), 10
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            ingest = run_ingest(IngestConfig(), tmp, progress=False)
            train_dir = ingest.splits["train"]
            images, _ = load_split_tensor(train_dir)
            cfg = UNetConfig.preset("small", image_size=images.shape[-1], in_channels=images.shape[1])
            # Interleaved: a Ray Train run leaves its controller actors behind, which slows every later measurement.
            rates = interleaved({
                "bare": lambda: bare_loop_rate(cfg, images, batch, steps // 2, threads=2),
                "one": lambda: ray_loop_rate(train_dir, 1, batch, steps, cpus_per_worker=2, log_every=log_every),
                "two": lambda: ray_loop_rate(train_dir, 2, batch, steps, cpus_per_worker=1, log_every=log_every),
            }, rounds=1 if quick else 2)
    finally:
        ray.shutdown()
    return [
        Row("training loop: Ray Train 1 worker (2 threads) vs bare PyTorch loop", rates["one"], rates["bare"], "img/s",
            "≥ 0.9x"),
        Row("training loop: Ray Train 2 workers (1 thread each) vs bare PyTorch loop", rates["two"], rates["bare"],
            "img/s", "≥ 0.9x"),
        Row("training loop: Ray Train 2 workers vs 1 worker (2 cores)", rates["two"], rates["one"], "img/s", "scaling"),
    ]


def gpu_rows(steps: int = 30) -> list[Row]:
    """img/s and MFU of the CIFAR-10 model, bf16 autocast, channels-last, fused AdamW, batch 128 per step."""
    device = torch.device("cuda")
    cfg = UNetConfig()
    model = UNet(cfg).to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, fused=True)
    sched = NoiseSchedule.linear()
    batch = 128
    x0 = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(model)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = l_simple(compiled, sched, x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    rate = batch * steps / (time.perf_counter() - start)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            l_simple(model, sched, x0).backward()
    flops_per_image = counter.get_total_flops() / batch
    peak = 989e12  # H100 SXM dense bf16
    return [Row("GPU CIFAR-10 35.7M U-Net bf16 train img/s (MFU in unit column)", rate, None,
                f"MFU {rate * flops_per_image / peak:.1%}", "≥ 10,000 img/s on H100")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, about two minutes")
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--only", choices=["unet", "loop", "gpu"], help="run one section")
    args = parser.parse_args()
    rows: list[Row] = []
    if args.only in (None, "unet"):
        rows += unet_rows(args.quick)
    if args.only in (None, "loop"):
        rows += loop_rows(args.quick)
    if args.only in (None, "gpu") and torch.cuda.is_available():
        rows += gpu_rows()
    emit(rows, args.json, "training throughput")


if __name__ == "__main__":
    main()
