"""The evaluate stage: bits/dim on held-out images, then for every sampler M seeded samples, their wall time and
their FID against the held-out images, written as a table, plots and sample grids.

`run_evaluate` returns metrics and artifact paths and touches neither MLflow nor Ray; `KIND`, the pipeline stage,
loads the trained model from MLflow and the splits from the ingest stage, and logs what run_evaluate returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from pipelines.evaluate.bpd import evaluate_bpd, plot_vb_per_t, select_images, write_vb_per_t_csv
from pipelines.evaluate.config import EvaluateConfig
from pipelines.evaluate.features import build_feature_extractor
from pipelines.evaluate.frechet import fid_from_features
from pipelines.evaluate.kid import kid_from_features, unit_rms
from pipelines.evaluate.grid import save_grid
from pipelines.evaluate.sampling import check_steps, generate_samples, parse_sampler
from pipelines.evaluate.table import plot_fid_vs_model_calls, write_table_csv, write_table_markdown
from pipelines.stage import StageContext, StageKind, StageResult
from pipelines.tracking import use_tracking_uri

GRID_IMAGES = 64


@dataclass
class EvaluateResult:
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)  # all inside output_dir
    table: list[dict] = field(default_factory=list)  # one row per sampler, see pipelines.evaluate.table


def run_evaluate(
    config: EvaluateConfig,
    model: torch.nn.Module,
    test_images: torch.Tensor,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    output_dir: Path,
    progress: bool = True,
) -> EvaluateResult:
    """Evaluate a DiffusionModel (pass the EMA weights) on its device; the model is left in eval mode.

    test_images [N, C, H, W] and train_images [M, C, H, W] in [−1, 1] with (C, H, W) = model.image_shape,
    train_labels [M] int64 (for the digits feature net). Writes into output_dir:
    bpd_per_t.{csv,png}, sampler_table.{csv,md}, fid_vs_model_calls.png, samples_<sampler>.png.
    Metrics: test_bpd, test_{prior,vb,decoder}_bpd, test_bpd_stderr, test_bpd_num_images, fid_train_vs_test,
    kid_train_vs_test, and per sampler fid_<s>, kid_<s>, samples_per_s_<s>, sample_seconds_<s> (plus fid_net_val_accuracy for "digits").
    """
    specs = [parse_sampler(s) for s in config.samplers]
    _check_inputs(model, test_images, train_images, train_labels)
    for spec in specs:
        check_steps(spec, model.num_timesteps)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    extract = build_feature_extractor(config, train_images, train_labels, device)
    result = EvaluateResult(metrics=dict(extract.metrics))
    model.eval()

    subset = select_images(test_images, config.bpd_batches * config.bpd_batch_size, config.seed)
    num_batches = math.ceil(subset.shape[0] / config.bpd_batch_size)
    with tqdm(total=num_batches * model.num_timesteps, desc="bits/dim", disable=not progress) as bar:
        bpd = evaluate_bpd(model, subset, config.bpd_batch_size, config.seed, bar.update)
    result.metrics.update(bpd.metrics("test"))
    print(f"[raydiff evaluate] test ELBO {result.metrics['test_bpd']:.3f} bits/dim on {subset.shape[0]} images",
          flush=True)
    result.artifacts += [write_vb_per_t_csv(bpd, output_dir / "bpd_per_t.csv"),
                         plot_vb_per_t(bpd, output_dir / "bpd_per_t.png")]

    test_features = extract(test_images)
    reference = select_images(train_images, config.num_fid_samples, config.seed)
    reference_features = extract(reference)
    reference_fid = fid_from_features(reference_features, test_features)
    result.metrics["fid_train_vs_test"] = reference_fid
    feature_scale = unit_rms(test_features)  # one fixed feature scale for every KID against the test set
    result.metrics["kid_train_vs_test"] = kid_from_features(reference_features, test_features, seed=config.seed,
                                                            scale=feature_scale).mean

    scale = max(1, 64 // model.image_shape[-1])
    for spec in specs:
        calls = math.ceil(config.num_fid_samples / config.sample_batch_size) * spec.model_calls
        with tqdm(total=calls, desc=spec.name, disable=not progress) as bar:
            samples = generate_samples(model, spec, config.num_fid_samples, config.sample_batch_size, config.seed,
                                       bar.update)
        sample_features = extract(samples.images)
        fid = fid_from_features(sample_features, test_features)
        kid = kid_from_features(sample_features, test_features, seed=config.seed, scale=feature_scale)
        result.table.append({"sampler": spec.name, "kind": spec.kind, "steps": spec.steps,
                             "model_calls": spec.model_calls,
                             "num_samples": config.num_fid_samples, "seconds": samples.seconds,
                             "samples_per_s": samples.samples_per_s, "fid": fid, "kid": kid.mean,
                             "kid_std": kid.std, "feature_net": extract.name})
        print(f"[raydiff evaluate] {spec.name}: FID {fid:.2f} (train vs test {reference_fid:.2f}), KID "
              f"{kid.mean:.4f} ± {kid.std:.4f}, "
              f"{samples.samples_per_s:.1f} samples/s", flush=True)
        result.metrics.update({f"fid_{spec.name}": fid, f"kid_{spec.name}": kid.mean,
                               f"samples_per_s_{spec.name}": samples.samples_per_s,
                               f"sample_seconds_{spec.name}": samples.seconds})
        result.artifacts.append(save_grid(samples.images[:GRID_IMAGES], output_dir / f"samples_{spec.name}.png",
                                          nrow=8, scale=scale))

    result.artifacts += [write_table_csv(result.table, output_dir / "sampler_table.csv"),
                         write_table_markdown(result.table, output_dir / "sampler_table.md", reference_fid),
                         plot_fid_vs_model_calls(result.table, output_dir / "fid_vs_model_calls.png", reference_fid)]
    return result


def _check_inputs(model, test_images: torch.Tensor, train_images: torch.Tensor, train_labels: torch.Tensor) -> None:
    shape = tuple(model.image_shape)
    for name, images in (("test_images", test_images), ("train_images", train_images)):
        if images.ndim != 4 or tuple(images.shape[1:]) != shape or images.shape[0] < 2:
            raise ValueError(f"{name} must be [N >= 2, {', '.join(map(str, shape))}] to match the model, "
                             f"got {tuple(images.shape)}")
        low, high = float(images.min()), float(images.max())
        if low < -1.0 - 1e-4 or high > 1.0 + 1e-4:
            raise ValueError(f"{name} must lie in [-1, 1], got values in [{low:.3g}, {high:.3g}]")
    if train_labels.shape != (train_images.shape[0],) or train_labels.dtype != torch.int64:
        raise ValueError(f"train_labels must be int64 [{train_images.shape[0]}], "
                         f"got {train_labels.dtype} {tuple(train_labels.shape)}")


def run(ctx: StageContext) -> StageResult:
    import mlflow.pytorch

    from pipelines.ingest.reader import load_split_tensor

    splits = ctx.inputs["data"].values["splits"]
    if "test" not in splits:
        raise ValueError(f"evaluate needs a 'test' split; the ingest stage produced {sorted(splits)}")
    model_uri = ctx.inputs["model"].values["model_uri"]
    test_images, _ = load_split_tensor(ctx.localize(splits["test"]))
    train_images, train_labels = load_split_tensor(ctx.localize(splits["train"]))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with use_tracking_uri(ctx.tracking_uri):
        model = mlflow.pytorch.load_model(model_uri, map_location=device).to(device)
    result = run_evaluate(ctx.params, model, test_images, train_images, train_labels, ctx.output_dir, progress=False)
    ctx.log_artifacts(result.artifacts)
    ctx.mlflow().log_dict(ctx.run_id, result.table, "sampler_table.json")
    samples = sorted(p for p in result.artifacts if p.name.startswith("samples_"))
    return StageResult(
        values={"metrics": result.metrics, "model_uri": model_uri, "samples_dir": ctx.output_uri,
                "samples": [ctx.uri_of(p) for p in samples]},
        metrics=result.metrics,
    )


KIND = StageKind(name="evaluate", params="pipelines.evaluate.config:EvaluateConfig", run=run,
                 inputs={"model": ("train", "sweep"), "data": ("ingest",)}, code=("pipelines.evaluate", "diffusion"),
                 resources={"num_cpus": 1})
