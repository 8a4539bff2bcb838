"""`distill_loop_per_worker`: the progressive-distillation loop each Ray Train worker runs (diffusion.distill).

Round r trains a student of N_r = teacher_steps / 2^(r+1) DDIM steps to match two steps of its teacher: the trained
model in round 0, the previous round's EMA student after that. Each student starts from its teacher's weights and
predicts v. Rank 0 logs to MLflow (loss per interval, a sample grid at the end of each round) and writes checkpoints
(round, step, student, EMA, optimizer, the current teacher), so a killed run resumes where it stopped.
"""

from __future__ import annotations

import copy
import itertools
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import ray.train
import ray.train.torch
import torch
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from diffusion.distill import distillation_grid, distillation_loss, teacher_targets
from diffusion.ema import EMA
from diffusion.packaged import DiffusionModel
from diffusion.parameterization import model_prediction
from diffusion.process import predict_x0, q_sample
from diffusion.samplers import sample
from diffusion.samplers.guidance import denoise
from pipelines.distill.config import DistillConfig
from pipelines.evaluate.grid import save_grid
from pipelines.modelstore import load_model
from pipelines.tracking import use_tracking_uri
from pipelines.train.checkpoint import load_state, save_state, step_seed
from pipelines.train.loop import batches_per_epoch, conditioning_labels


@dataclass
class Distiller:
    """One worker's distillation state: the frozen teacher, the student (its unet trained through `model`, DDP),
    its EMA and optimizer, and the position (round, step within it, epoch, batch within the epoch)."""

    cfg: DistillConfig
    device: torch.device
    teacher: DiffusionModel
    student: DiffusionModel
    model: torch.nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    round_index: int = 0
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0

    @property
    def student_steps(self) -> int:
        return self.cfg.rounds[self.round_index]

    def state(self) -> dict:
        return {"student": self.student.unet.state_dict(), "teacher": self.teacher.unet.state_dict(),
                "teacher_prediction": self.teacher.prediction, "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "round_index": self.round_index, "step": self.step,
                "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def restore(self, state: dict) -> None:
        self.teacher.unet.load_state_dict(state["teacher"])
        self.teacher.prediction = state["teacher_prediction"]
        self.student.unet.load_state_dict(state["student"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.round_index, self.step = int(state["round_index"]), int(state["step"])
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])

    def next_round(self) -> None:
        """The EMA student becomes the teacher; the new student starts from it with a fresh optimizer and EMA."""
        self.teacher.unet.load_state_dict(self.ema.averaged.state_dict())
        self.teacher.prediction = "v"
        self.student.unet.load_state_dict(self.ema.averaged.state_dict())
        self.ema = EMA(self.student.unet, self.cfg.ema_decay, warmup=False)
        self.optimizer = torch.optim.AdamW(self.student.unet.parameters(), lr=self.cfg.lr)
        self.round_index, self.step = self.round_index + 1, 0


def build_distiller(cfg: DistillConfig, base: DiffusionModel, device: torch.device) -> Distiller:
    """Teacher = the trained model (frozen), student = a v-predicting copy; restored from Ray Train's checkpoint."""
    teacher = base.to(device).eval().requires_grad_(False)
    student = DiffusionModel(copy.deepcopy(base.unet).requires_grad_(True), base.schedule_name, base.num_timesteps,
                             prediction="v", zero_terminal_snr=base.zero_terminal_snr,
                             class_names=base.class_names).to(device)
    model = ray.train.torch.prepare_model(student.unet, move_to_device=False)
    distiller = Distiller(cfg, device, teacher, student, model, EMA(student.unet, cfg.ema_decay, warmup=False),
                          torch.optim.AdamW(student.unet.parameters(), lr=cfg.lr))
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            distiller.restore(load_state(directory, map_location=device))
    return distiller


def teacher_x0(teacher: DiffusionModel, y: torch.Tensor | None, guidance_scale: float):
    """(z, schedule indices t) → the teacher's x̂_0, guided at `guidance_scale` for a conditional teacher."""
    sched = teacher.schedule()

    def x0_of(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = denoise(teacher, z, t, y, guidance_scale if y is not None else 1.0)
        return out.x0 if out.x0 is not None else predict_x0(sched, z, t, out.eps)

    return x0_of


def distill_step(ds: Distiller, images: torch.Tensor, labels: torch.Tensor, source: str) -> torch.Tensor:
    """One optimizer step of the current round on a batch; → the loss (a device scalar)."""
    sched, n = ds.student.schedule(), ds.student_steps
    x0 = images.to(ds.device, non_blocking=True)
    y = conditioning_labels(labels, ds.student.num_classes, source)
    y = None if y is None else y.to(ds.device, non_blocking=True)
    k = torch.randint(0, n, (x0.shape[0],), device=ds.device)
    t = torch.as_tensor(distillation_grid(sched.num_timesteps, n)[0], device=ds.device)[k]
    z_t = q_sample(sched, x0, t, torch.randn_like(x0))
    target = teacher_targets(teacher_x0(ds.teacher, y, ds.cfg.guidance_scale), sched, n, z_t, k)
    out = ds.model(z_t, t) if y is None else ds.model(z_t, t, y)
    x0_student = model_prediction(sched, z_t, t, out, "v", ds.student.learn_variance).x0
    loss = distillation_loss(x0_student, target, sched, t).mean()
    ds.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(ds.student.unet.parameters(), ds.cfg.grad_clip)
    ds.optimizer.step()
    ds.ema.update(ds.student.unet)
    ds.step, ds.batch_in_epoch = ds.step + 1, ds.batch_in_epoch + 1
    return loss.detach()


def batches(ds: Distiller, epoch_images) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches from the current data position on, epoch after epoch."""
    while True:
        for batch in itertools.islice(epoch_images(ds.epoch), ds.batch_in_epoch, None):
            yield batch
        ds.epoch, ds.batch_in_epoch = ds.epoch + 1, 0


def report(ds: Distiller, rank: int, metrics: dict) -> None:
    """Every rank reports; rank 0 attaches the checkpoint."""
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as directory:
        save_state(directory, ds.state())
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


@torch.no_grad()
def round_grid(ds: Distiller, client: MlflowClient, run_id: str, labels: torch.Tensor | None) -> None:
    """The EMA student's samples at its step count (the `distilled` sampler) as an MLflow artifact."""
    student = DiffusionModel(ds.ema.averaged, ds.student.schedule_name, ds.student.num_timesteps, prediction="v",
                             zero_terminal_snr=ds.student.zero_terminal_snr).to(ds.device).eval()
    shape = (ds.cfg.sample_grid, *student.image_shape)
    y = None if labels is None else labels.to(ds.device)
    images = sample(student, student.schedule(), shape, "distilled", ds.student_steps, y=y,
                    generator=torch.Generator(device=ds.device).manual_seed(ds.cfg.seed))
    with tempfile.TemporaryDirectory() as directory:
        path = save_grid(images.cpu(), Path(directory) / f"distilled-{ds.student_steps}_round{ds.round_index + 1}.png",
                         nrow=max(1, int(ds.cfg.sample_grid**0.5)), scale=4)
        client.log_artifact(run_id, str(path), "samples")


def round_scorer(cfg: DistillConfig, loop_config: dict, device: torch.device):
    """FID/KID against the test split with the evaluate stage's digits feature net (its floor printed once), or
    None without a test split or with num_fid_samples 0."""
    if not loop_config.get("test_uri") or not cfg.num_fid_samples:
        return None
    from pipelines.evaluate.config import EvaluateConfig
    from pipelines.evaluate.features import build_feature_extractor
    from pipelines.evaluate.stage import EvaluateResult, make_scorer
    from pipelines.ingest.reader import load_split_tensor
    from pipelines.storage import localize

    test_images, _ = load_split_tensor(localize(loop_config["test_uri"]))
    train_images, train_labels = load_split_tensor(localize(loop_config["train_uri"]))
    config = EvaluateConfig(num_fid_samples=cfg.num_fid_samples, seed=cfg.seed)
    extract = build_feature_extractor(config, train_images, train_labels, device)
    return make_scorer(config, extract, test_images, train_images, EvaluateResult(metrics={}))


def score_round(ds: Distiller, scorer, client: MlflowClient, run_id: str) -> None:
    """FID and KID of the EMA student at its step count (balanced class labels for a conditional student)."""
    from pipelines.evaluate.sampling import balanced_labels, generate_samples, parse_sampler

    student = DiffusionModel(ds.ema.averaged, ds.student.schedule_name, ds.student.num_timesteps, prediction="v",
                             zero_terminal_snr=ds.student.zero_terminal_snr).to(ds.device).eval()
    n, classes = ds.cfg.num_fid_samples, ds.student.num_classes
    samples = generate_samples(student, parse_sampler(f"distilled-{ds.student_steps}"), n, min(n, 256), ds.cfg.seed,
                               labels=None if classes is None else balanced_labels(n, classes))
    fid, kid, _ = scorer(samples.images)
    print(f"[raydiff distill] round {ds.round_index + 1}: {ds.student_steps}-step student FID {fid:.2f} KID "
          f"{kid:.4f} (floor {scorer.floor.fid:.2f}), {samples.samples_per_s:.0f} samples/s", flush=True)
    now, step = int(time.time() * 1000), ds.student_steps
    client.log_batch(run_id, metrics=[Metric("fid", fid, now, step), Metric("kid", kid, now, step),
                                      Metric("samples_per_s", samples.samples_per_s, now, step)])


def grid_labels(ds: Distiller) -> torch.Tensor | None:
    if ds.student.num_classes is None:
        return None
    return torch.arange(ds.cfg.sample_grid) % ds.student.num_classes


def run_round(ds: Distiller, data: Iterator, rank: int, source: str, client: MlflowClient | None, run_id: str) -> None:
    """Train the current round's student to the end of the round, logging and checkpointing as it goes."""
    cfg, total, start, losses = ds.cfg, len(ds.cfg.rounds), time.perf_counter(), []
    while ds.step < cfg.steps_per_round:
        torch.manual_seed(step_seed(cfg.seed, rank, ds.round_index * cfg.steps_per_round + ds.step))
        losses.append(distill_step(ds, *next(data), source))
        last = ds.step == cfg.steps_per_round
        if ds.step % cfg.log_every == 0 or last:
            loss = float(torch.stack(losses).mean())
            if client is not None:
                global_step = ds.round_index * cfg.steps_per_round + ds.step
                print(f"[raydiff distill] round {ds.round_index + 1}/{total} ({ds.student_steps} steps) step "
                      f"{ds.step}/{cfg.steps_per_round} loss {loss:.4f} "
                      f"{len(losses) * cfg.batch_size / (time.perf_counter() - start):.0f} img/s", flush=True)
                now = int(time.time() * 1000)
                client.log_batch(run_id, metrics=[Metric("loss", loss, now, global_step),
                                                  Metric("student_steps", ds.student_steps, now, global_step)])
            losses, start = [], time.perf_counter()
        if ds.step % cfg.checkpoint_every == 0 and not last:
            report(ds, rank, {"round": ds.round_index, "step": ds.step})


def distill_loop_per_worker(loop_config: dict) -> None:
    cfg = DistillConfig.model_validate(loop_config["distill"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)
    with use_tracking_uri(loop_config["tracking_uri"]):
        base = load_model(loop_config["teacher_uri"], device)
    ds = build_distiller(cfg, base, device)
    run_id, source = loop_config["mlflow_run_id"], loop_config["train_uri"]
    client = MlflowClient(loop_config["tracking_uri"]) if rank == 0 else None
    if client is not None:
        position = ds.round_index * cfg.steps_per_round + ds.step
        client.log_metric(run_id, "start_step", position, step=position)
    data = batches(ds, batches_per_epoch(cfg, source, rank, world, cfg.batch_size // world))
    scorer = round_scorer(cfg, loop_config, device) if client is not None else None
    ds.model.train()
    while True:
        run_round(ds, data, rank, source, client, run_id)
        if client is not None:
            round_grid(ds, client, run_id, grid_labels(ds))
            if scorer is not None:
                score_round(ds, scorer, client, run_id)
        done = ds.round_index == len(cfg.rounds) - 1
        if not done:
            ds.next_round()
        report(ds, rank, {"round": ds.round_index, "step": ds.step, "done": done})
        if done:
            return
