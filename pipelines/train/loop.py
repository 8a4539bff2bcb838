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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from diffusion.ema import EMA
from diffusion.objectives import ImportanceSampler
from diffusion.packaged import DiffusionModel, build_schedule
from diffusion.schedule import NoiseSchedule
from diffusion.training import StepOptions, TrainingStep
from diffusion.unet import UNet, UNetConfig
from pipelines.storage import localize
from pipelines.train.checkpoint import load_state, save_state, step_seed
from pipelines.train.config import TrainConfig
from pipelines.train.monitor import heldout_elbo, memory_metrics, sample_grids


def batches_per_epoch(cfg, train_uri: str, rank: int, world: int,
                      batch: int) -> Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """epoch → this worker's (images [batch, C, H, W] float32 in [−1, 1], labels [batch] int64, −1 = unknown) for
    that epoch, a disjoint subset per rank.

    The webdataset loader reads the split localized on this worker's own node (downloaded once per node when the
    split lives in remote storage). One loader serves every epoch, so its decoded-shard cache lasts the whole run.
    `cfg` is any stage config with `loader`, `loader_cache_mb` and `seed` (the train and distill stages')."""
    if cfg.loader == "webdataset":
        from pipelines.ingest.reader import WebDatasetBatches, shard_urls

        loader = WebDatasetBatches(shard_urls(localize(train_uri)), batch, seed=cfg.seed, rank=rank, world_size=world,
                                   drop_last=True, cache_mb=cfg.loader_cache_mb)

        def webdataset_epoch(epoch: int) -> Iterator[torch.Tensor]:
            loader.set_epoch(epoch)
            return iter(loader)

        return webdataset_epoch
    shard = ray.train.get_dataset_shard("train")
    return lambda epoch: ((b["image"], b["label"]) for b in shard.iter_torch_batches(
        batch_size=batch, drop_last=True, local_shuffle_buffer_size=4 * batch, local_shuffle_seed=cfg.seed + epoch))


def _all_reduce_mean(tensor: torch.Tensor) -> list[float]:
    """The mean over ranks of a float64 vector (the one host sync of a logging interval)."""
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


def conditioning_labels(labels: torch.Tensor, num_classes: int | None, source: str) -> torch.Tensor | None:
    """The labels of a conditional model's batch, checked on the host before they move to the device (so the model
    need not read them there); None when unconditional. Unknown (−1) or out-of-range labels in the shards are an
    error naming the split."""
    if num_classes is None:
        return None
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"a class-conditional model (num_classes={num_classes}) needs labels in [0, "
                         f"{num_classes - 1}] in {source}; got {sorted(set(labels.tolist()))[:10]} (−1 = no label)")
    return labels


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


@dataclass
class Trainer:
    """One worker's training state: the network, its DDP wrapper, EMA, optimizer, LR schedule, the importance sampler of
    t (objective l_vlb) and the position in the data (step, epoch, batch within the epoch)."""

    cfg: TrainConfig
    unet_config: UNetConfig
    device: torch.device
    unet: UNet
    model: torch.nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LambdaLR
    t_sampler: ImportanceSampler | None
    step_fn: TrainingStep
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0

    def state(self, class_names: list[str] | None) -> dict:
        """Everything a checkpoint holds (tensors, numbers, strings: loadable with weights_only=True)."""
        return {"model": self.unet.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.optimizer.state_dict(),
                "lr_schedule": self.lr_schedule.state_dict(), "step": self.step, "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch, "train_config": self.cfg.model_dump(mode="json"),
                "unet_config": self.unet_config.to_dict(), "class_names": class_names,
                **({"t_sampler": self.t_sampler.state_dict()} if self.t_sampler is not None else {})}

    def restore(self, state: dict) -> None:
        self.unet.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        if self.t_sampler is not None and "t_sampler" in state:
            self.t_sampler.load_state_dict(state["t_sampler"])


def memory_format(cfg: TrainConfig) -> torch.memory_format:
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


def step_options(cfg: TrainConfig, device: torch.device, learn_variance: bool) -> StepOptions:
    use_bf16 = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device.type == "cuda")
    return StepOptions(objective=cfg.objective, prediction=cfg.model.prediction, learn_variance=learn_variance,
                       loss_weighting=cfg.loss_weighting, snr_gamma=cfg.snr_gamma, p_uncond=cfg.p_uncond,
                       grad_clip=cfg.grad_clip, bf16=use_bf16)


def build_trainer(cfg: TrainConfig, unet_config: UNetConfig, sched: NoiseSchedule) -> Trainer:
    """A fresh Trainer on this worker's device (identical initial weights on every rank), restored from Ray Train's
    latest checkpoint when the run is resumed."""
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)
    unet = UNet(unet_config).to(device=device, memory_format=memory_format(cfg))
    model = ray.train.torch.prepare_model(unet, move_to_device=False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")
    warmup = max(cfg.warmup_steps, 1)
    ema = EMA(unet, cfg.ema_decay, cfg.ema.warmup)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    t_sampler = ImportanceSampler(sched.num_timesteps) if cfg.objective == "l_vlb" else None
    compile_step = cfg.compile is True or (cfg.compile == "auto" and device.type == "cuda")
    step_fn = TrainingStep(unet, sched, optimizer, ema, step_options(cfg, device, unet_config.learn_variance),
                           lr_schedule, model, t_sampler, compile=compile_step, gather=_all_gather)
    trainer = Trainer(cfg, unet_config, device, unet, model, ema, optimizer, lr_schedule, t_sampler, step_fn)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trainer.restore(load_state(directory, map_location=device))
    return trainer


def train_step(tr: Trainer, images: torch.Tensor, labels: torch.Tensor, rank: int, source: str) -> dict[str, torch.Tensor]:
    """One optimizer step on a batch (diffusion.training), seeded by (seed, rank, step); returns device metrics."""
    torch.manual_seed(step_seed(tr.cfg.seed, rank, tr.step))
    x0 = images.to(tr.device, non_blocking=True).contiguous(memory_format=memory_format(tr.cfg))
    y = conditioning_labels(labels, tr.unet_config.num_classes, source)
    metrics = tr.step_fn(x0, None if y is None else y.to(tr.device, non_blocking=True))
    tr.step, tr.batch_in_epoch = tr.step + 1, tr.batch_in_epoch + 1
    return metrics


def evaluate_and_log(tr: Trainer, client: MlflowClient, run_id: str, val_images: torch.Tensor | None,
                     class_names: list[str] | None) -> dict[str, float]:
    """ELBO on held-out images and sample grids, with the EMA weights; artifacts go straight to MLflow."""
    cfg, metrics = tr.cfg, {}
    ema_model = DiffusionModel(tr.ema.averaged, cfg.schedule.name, cfg.schedule.num_timesteps,
                               prediction=cfg.model.prediction, zero_terminal_snr=cfg.schedule.zero_terminal_snr,
                               class_names=class_names)
    with tempfile.TemporaryDirectory() as directory:
        out_dir = Path(directory)
        if val_images is not None and val_images.shape[0] > 0:
            plot = out_dir / f"vb_per_t_step{tr.step}.png"
            metrics = heldout_elbo(ema_model, val_images, cfg.eval_batch_size, plot, seed=cfg.seed)
            client.log_artifact(run_id, str(plot), "elbo")
        for path in sample_grids(ema_model, cfg.sample_grid, cfg.sample_ddpm_steps, cfg.sample_ddim_steps,
                                 out_dir, f"step{tr.step}", seed=cfg.seed):
            client.log_artifact(run_id, str(path), "samples")
    return metrics


def report_checkpoint(tr: Trainer, rank: int, metrics: dict[str, float], class_names: list[str] | None) -> float:
    """Every rank reports; rank 0 alone attaches the checkpoint (Ray Train uploads it to the run's storage).
    Returns the seconds the report took (on rank 0: saving and uploading the checkpoint)."""
    start = time.perf_counter()
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return time.perf_counter() - start
    with tempfile.TemporaryDirectory() as directory:
        save_state(directory, tr.state(class_names))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
    return time.perf_counter() - start


class IntervalMetrics:
    """Step metrics summed on the device (no host sync per step), averaged over ranks every `log_every` steps."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.steps, self.start = 0, time.perf_counter()

    def add(self, values: dict[str, torch.Tensor]) -> None:
        self.sums = {name: self.sums.get(name, 0.0) + value.double() for name, value in values.items()}
        self.steps += 1

    def reduce(self, tr: Trainer) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start
        means = dict(zip(self.sums, _all_reduce_mean(torch.stack(list(self.sums.values())) / self.steps)))
        metrics = {**{("loss_vb_bpd" if k == "vb" else k): v for k, v in means.items()},
                   "lr": tr.lr_schedule.get_last_lr()[0], "images_per_s": self.steps * tr.cfg.batch_size / elapsed,
                   "epoch": tr.epoch, **memory_metrics(tr.device)}
        self.__init__()
        return metrics


def _validation_images(loop_config: dict, cfg: TrainConfig, rank: int) -> torch.Tensor | None:
    if rank != 0 or not loop_config.get("val_uri"):
        return None
    from pipelines.ingest.reader import load_split_tensor

    return load_split_tensor(localize(loop_config["val_uri"]), limit=cfg.eval_batches * cfg.eval_batch_size)[0]


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = TrainConfig.model_validate(loop_config["train"])
    unet_config = UNetConfig.from_dict(loop_config["unet"])
    run_id, class_names, source = loop_config["mlflow_run_id"], loop_config.get("class_names"), loop_config["train_uri"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    sched = build_schedule(cfg.schedule.name, cfg.schedule.num_timesteps, cfg.schedule.zero_terminal_snr)
    tr = build_trainer(cfg, unet_config, sched)
    placements = worker_placements(world)  # a collective: every rank takes part
    client = MlflowClient(loop_config["tracking_uri"]) if rank == 0 else None
    if client is not None:
        client.log_metric(run_id, "start_step", tr.step, step=tr.step)
        client.log_batch(run_id, tags=placement_tags(placements))
        print(f"[raydiff train] rank 0 of {world} starting at step {tr.step}/{cfg.steps} on {tr.device}", flush=True)
    val_images = _validation_images(loop_config, cfg, rank)
    epoch_images = batches_per_epoch(cfg, source, rank, world, cfg.batch_size // world)
    interval = IntervalMetrics()
    monitor = node_system_metrics(cfg, run_id, loop_config["tracking_uri"], ctx.get_local_rank())
    tr.model.train()
    try:
        while tr.step < cfg.steps:
            consumed_any = False
            for images, labels in itertools.islice(epoch_images(tr.epoch), tr.batch_in_epoch, None):
                consumed_any = True
                interval.add(train_step(tr, images, labels, rank, source))
                _after_step(tr, interval, client, run_id, rank, val_images, class_names)
                if tr.step >= cfg.steps:
                    break
            else:
                if not consumed_any and tr.batch_in_epoch == 0:
                    raise RuntimeError(f"worker {rank} got no full batch of {cfg.batch_size // world} images from "
                                       f"{source}: use a smaller batch_size or fewer workers")
                tr.epoch, tr.batch_in_epoch = tr.epoch + 1, 0
    finally:
        if monitor is not None:
            monitor.finish()


def _after_step(tr: Trainer, interval: IntervalMetrics, client: MlflowClient | None, run_id: str, rank: int,
                val_images: torch.Tensor | None, class_names: list[str] | None) -> None:
    """Log every `log_every` steps, evaluate every `eval_every`, checkpoint every `checkpoint_every`; all at the end."""
    cfg, step, last = tr.cfg, tr.step, tr.step == tr.cfg.steps
    metrics: dict[str, float] = {}
    if step % cfg.log_every == 0 or step % cfg.checkpoint_every == 0 or last:
        tr.step_fn.flush_t_sampler()
    if step % cfg.log_every == 0 or last:
        metrics = interval.reduce(tr)
        if client is not None:
            print(f"[raydiff train] step {step}/{cfg.steps} loss {metrics['loss']:.4f} "
                  f"{metrics['images_per_s']:.0f} img/s", flush=True)
    if client is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or last):
        tr.model.eval()
        metrics.update(evaluate_and_log(tr, client, run_id, val_images, class_names))
        tr.model.train()
    if client is not None and metrics:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])
    if step % cfg.checkpoint_every == 0 or last:
        seconds = report_checkpoint(tr, rank, {"step": step, **metrics}, class_names)
        if client is not None:
            client.log_metric(run_id, "checkpoint_seconds", seconds, step=step)


def node_system_metrics(cfg: TrainConfig, run_id: str, tracking_uri: str, local_rank: int):
    """MLflow system metrics (CPU, memory, disk, network; GPU where a monitor library is present) of this worker's
    node, one series per node (`system/<node>/…`), logged by the node's first worker; None when turned off."""
    if local_rank != 0 or not cfg.system_metrics_interval_s:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    node = ray.get_runtime_context().get_node_id()[:8]
    monitor = SystemMetricsMonitor(run_id, sampling_interval=cfg.system_metrics_interval_s, resume_logging=True,
                                   node_id=f"node-{node}", tracking_uri=tracking_uri)
    monitor.start()
    return monitor
