"""What rank 0 measures during training and sends to MLflow: ELBO parts on held-out data with the per-t plot
(via pipelines.evaluate.bpd), DDPM/DDIM sample grids, and process memory."""

from __future__ import annotations

import resource
from pathlib import Path

import torch

from diffusion.packaged import DiffusionModel
from diffusion.samplers import sample
from pipelines.evaluate.bpd import evaluate_bpd, plot_vb_per_t
from pipelines.evaluate.grid import save_grid


def heldout_elbo(model: DiffusionModel, images: torch.Tensor, batch_size: int, plot_path: Path,
                 seed: int = 0) -> dict[str, float]:
    """Mean ELBO parts (bits/dim) over images [N, C, H, W] in [−1, 1] as `val_*` metrics; writes the per-t plot."""
    result = evaluate_bpd(model, images, batch_size, seed)
    plot_vb_per_t(result, plot_path)
    return result.metrics(prefix="val")


@torch.no_grad()
def sample_grids(model: DiffusionModel, num_images: int, ddpm_steps: int | None, ddim_steps: int, directory: Path,
                 tag: str, seed: int = 0) -> list[Path]:
    """DDPM (all T steps when ddpm_steps is None) and DDIM sample grids from the same seed; returns the PNG paths."""
    device = next(model.parameters()).device
    sched, shape = model.schedule(), (num_images, *model.image_shape)
    nrow = max(1, int(num_images**0.5))
    paths = []
    for sampler, steps in (("ddpm", ddpm_steps), ("ddim", ddim_steps)):
        images = sample(model, sched, shape, sampler, steps, generator=torch.Generator(device=device).manual_seed(seed))
        name = f"{sampler}-{steps or sched.num_timesteps}"
        paths.append(save_grid(images.cpu(), directory / f"{name}_{tag}.png", nrow=nrow, scale=4))
    return paths


def memory_metrics(device: torch.device) -> dict[str, float]:
    """Peak resident memory of this process (MB) and peak CUDA memory allocated (MB) when on a GPU."""
    metrics = {"cpu_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        metrics["gpu_peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return metrics
