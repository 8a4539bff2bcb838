"""`train_loop_per_worker`: the training loop each Ray Train worker runs (Ho et al. 2020, Alg. 1), with the
objective, prediction type, learned variance and loss weighting of the config (diffusion.objectives), and label
dropout for a class-conditional model (classifier-free guidance).

Rank 0 alone logs to MLflow and writes checkpoints; every rank calls `ray.train.report` at checkpoint steps.
Checkpoints hold model, EMA, optimizer, LR schedule, the importance sampler of t (objective l_vlb), step and
data position; per-step seeds are derived from
(seed, rank, step), so a resumed run continues with the draws an uninterrupted one would have made.
"""

from __future__ import annotations

import itertools
import json
import socket
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Iterator

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from diffusion.ema import EMA
from diffusion.guidance import drop_labels
from diffusion.objectives import ImportanceSampler, training_losses
from diffusion.packaged import DiffusionModel, build_schedule
from diffusion.unet import UNet, UNetConfig
from pipelines.train.checkpoint import load_state, save_state, step_seed
from pipelines.train.config import TrainConfig
from pipelines.train.monitor import heldout_elbo, memory_metrics, sample_grids


def batches_per_epoch(cfg: TrainConfig, train_dir: str, rank: int, world: int,
                      batch: int) -> Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """epoch → this worker's (images [batch, C, H, W] float32 in [−1, 1], labels [batch] int64, −1 = unknown) for
    that epoch, a disjoint subset per rank.

    One loader serves every epoch, so the webdataset loader's decoded-shard cache lasts the whole run."""
    if cfg.loader == "webdataset":
        from pipelines.ingest.reader import WebDatasetBatches, shard_urls

        loader = WebDatasetBatches(shard_urls(train_dir), batch, seed=cfg.seed, rank=rank, world_size=world,
                                   drop_last=True, cache_mb=cfg.loader_cache_mb)

        def webdataset_epoch(epoch: int) -> Iterator[torch.Tensor]:
            loader.set_epoch(epoch)
            return iter(loader)

        return webdataset_epoch
    shard = ray.train.get_dataset_shard("train")
    return lambda epoch: ((b["image"], b["label"]) for b in shard.iter_torch_batches(
        batch_size=batch, drop_last=True, local_shuffle_buffer_size=4 * batch, local_shuffle_seed=cfg.seed + epoch))


def _all_reduce_mean(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor.tolist()


def _all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's tensor [n, ...] (same shape on each), concatenated in rank order: [world · n, ...]."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts)


def conditioning_labels(labels: torch.Tensor, num_classes: int | None, p_uncond: float,
                        source: str) -> torch.Tensor | None:
    """The labels a conditional model trains on (null class with probability p_uncond); None when unconditional.
    Unknown (−1) or out-of-range labels in the shards are an error naming the split."""
    if num_classes is None:
        return None
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"a class-conditional model (num_classes={num_classes}) needs labels in [0, "
                         f"{num_classes - 1}] in {source}; got {sorted(set(labels.tolist()))[:10]} (−1 = no label)")
    return drop_labels(labels, num_classes, p_uncond)


def worker_placements(world: int) -> list[dict[str, str]]:
    """Where each rank runs, indexed by rank: Ray node id, hostname and node IP (gathered over the process group)."""
    here = {"node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname(),
            "ip": ray.util.get_node_ip_address()}
    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return [here]
    placements: list = [None] * world
    dist.all_gather_object(placements, here)
    return placements


def placement_tags(placements: list[dict[str, str]]) -> list[RunTag]:
    """MLflow tags naming the Ray nodes the workers ran on (per rank); a resumed run's tags show its last attempt."""
    node_ids = [p["node_id"] for p in placements]
    return [RunTag("raydiff.worker_nodes", json.dumps(node_ids)),
            RunTag("raydiff.worker_hosts", json.dumps([f"{p['hostname']}/{p['ip']}" for p in placements])),
            RunTag("raydiff.num_nodes", str(len(set(node_ids))))]


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = TrainConfig.model_validate(loop_config["train"])
    unet_config = UNetConfig.from_dict(loop_config["unet"])
    run_id, tracking_uri = loop_config["mlflow_run_id"], loop_config["tracking_uri"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    per_worker_batch = cfg.batch_size // world
    sched = build_schedule(cfg.schedule.name, cfg.schedule.num_timesteps, cfg.schedule.zero_terminal_snr)
    class_names = loop_config.get("class_names")
    t_sampler = ImportanceSampler(sched.num_timesteps) if cfg.objective == "l_vlb" else None
    use_bf16 = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device.type == "cuda")
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    unet = UNet(unet_config).to(device=device, memory_format=memory_format)
    ema = EMA(unet, cfg.ema_decay, cfg.ema.warmup)
    model = ray.train.torch.prepare_model(unet, move_to_device=False)
    if cfg.compile:
        model = torch.compile(model)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")
    warmup = max(cfg.warmup_steps, 1)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))

    step, epoch, batch_in_epoch = 0, 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_state(directory, map_location=device)
        unet.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
        step, epoch, batch_in_epoch = int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"])
        if t_sampler is not None and "t_sampler" in state:
            t_sampler.load_state_dict(state["t_sampler"])

    placements = worker_placements(world)  # a collective: every rank takes part
    client = MlflowClient(tracking_uri) if rank == 0 else None
    if client is not None:
        client.log_metric(run_id, "start_step", step, step=step)
        client.log_batch(run_id, tags=placement_tags(placements))
        print(f"[raydiff train] rank 0 of {world} starting at step {step}/{cfg.steps} on {device}", flush=True)
    val_images = None
    if rank == 0 and loop_config.get("val_dir"):
        from pipelines.ingest.reader import load_split_tensor

        val_images, _ = load_split_tensor(loop_config["val_dir"], limit=cfg.eval_batches * cfg.eval_batch_size)

    def evaluate_and_log(tag_step: int) -> dict[str, float]:
        """ELBO on held-out images and sample grids, with the EMA weights; artifacts go straight to MLflow."""
        metrics: dict[str, float] = {}
        ema_model = DiffusionModel(ema.averaged, cfg.schedule.name, cfg.schedule.num_timesteps,
                                   prediction=cfg.model.prediction, zero_terminal_snr=cfg.schedule.zero_terminal_snr,
                                   class_names=class_names)
        with tempfile.TemporaryDirectory() as directory:
            out_dir = Path(directory)
            if val_images is not None and val_images.shape[0] > 0:
                plot = out_dir / f"vb_per_t_step{tag_step}.png"
                metrics = heldout_elbo(ema_model, val_images, cfg.eval_batch_size, plot, seed=cfg.seed)
                client.log_artifact(run_id, str(plot), "elbo")
            for path in sample_grids(ema_model, cfg.sample_grid, cfg.sample_ddpm_steps, cfg.sample_ddim_steps,
                                     out_dir, f"step{tag_step}", seed=cfg.seed):
                client.log_artifact(run_id, str(path), "samples")
        return metrics

    def report_checkpoint(metrics: dict[str, float]) -> None:
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as directory:
            save_state(directory, {
                "model": unet.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_schedule": lr_schedule.state_dict(), "step": step, "epoch": epoch,
                "batch_in_epoch": batch_in_epoch, "train_config": cfg.model_dump(mode="json"),
                "unet_config": unet_config.to_dict(), "class_names": class_names,
                **({"t_sampler": t_sampler.state_dict()} if t_sampler is not None else {}),
            })
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))

    epoch_images = batches_per_epoch(cfg, loop_config["train_dir"], rank, world, per_worker_batch)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    sums, interval_steps, interval_start = {}, 0, time.perf_counter()
    model.train()
    while step < cfg.steps:
        batches = itertools.islice(epoch_images(epoch), batch_in_epoch, None)
        consumed_any = False
        for images, labels in batches:
            consumed_any = True
            torch.manual_seed(step_seed(cfg.seed, rank, step))
            x0 = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            y = conditioning_labels(labels, unet_config.num_classes, cfg.p_uncond, loop_config["train_dir"])
            y = None if y is None else y.to(device, non_blocking=True)
            t, weights = t_sampler.sample(x0.shape[0], device=device) if t_sampler is not None else (None, None)
            with autocast:
                terms = training_losses(lambda x_t, t_in: model(x_t, t_in, y) if y is not None else model(x_t, t_in),
                                        sched, x0, t, weights=weights, objective=cfg.objective,
                                        prediction=cfg.model.prediction, learn_variance=unet_config.learn_variance,
                                        loss_weighting=cfg.loss_weighting, snr_gamma=cfg.snr_gamma)
                loss = terms["loss"].mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
            optimizer.step()
            lr_schedule.step()
            ema.update(unet)
            if t_sampler is not None:  # every rank sees every rank's (t, L_t), so their p_t stay equal
                t_sampler.update(_all_gather(t), _all_gather(terms["vb"].detach().double()).cpu())
            step, batch_in_epoch = step + 1, batch_in_epoch + 1
            interval_steps += 1
            step_values = {"loss": loss.item(), "grad_norm": grad_norm.item(),
                           **{name: terms[name].mean().item() for name in ("mse", "vb") if name in terms}}
            sums = {name: sums.get(name, 0.0) + value for name, value in step_values.items()}

            metrics: dict[str, float] = {}
            if step % cfg.log_every == 0 or step == cfg.steps:
                elapsed = time.perf_counter() - interval_start
                means = dict(zip(sums, _all_reduce_mean([v / interval_steps for v in sums.values()], device)))
                metrics = {**{("loss_vb_bpd" if k == "vb" else k): v for k, v in means.items()},
                           "lr": lr_schedule.get_last_lr()[0],
                           "images_per_s": interval_steps * cfg.batch_size / elapsed, "epoch": epoch,
                           **memory_metrics(device)}
                sums, interval_steps, interval_start = {}, 0, time.perf_counter()
                if client is not None:
                    print(f"[raydiff train] step {step}/{cfg.steps} loss {means['loss']:.4f} "
                          f"{metrics['images_per_s']:.0f} img/s", flush=True)
            if client is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
                model.eval()
                metrics.update(evaluate_and_log(step))
                model.train()
            if client is not None and metrics:
                now = int(time.time() * 1000)
                client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                report_checkpoint({"step": step, **metrics})
            if step >= cfg.steps:
                break
        else:
            if not consumed_any and batch_in_epoch == 0:
                raise RuntimeError(f"worker {rank} got no full batch of {per_worker_batch} images from "
                                   f"{loop_config['train_dir']}: use a smaller batch_size or fewer workers")
            epoch, batch_in_epoch = epoch + 1, 0
