"""The evaluate stage: bits/dim on held-out images, then for every sampler M seeded samples, their wall time and
their FID and KID against the test images, written as a table, plots and sample grids; for a class-conditional
model also a classifier-free guidance sweep (M samples balanced over the classes per guidance scale: FID, KID and
class accuracy, a table, a plot and a grid with a row per class). The floor every FID/KID is read against is real
TRAIN images the feature network never saw (the digits net's hold-out) against the same test images.

`run_evaluate` returns metrics and artifact paths and touches neither MLflow nor Ray; `KIND`, the pipeline stage,
loads the trained model from MLflow (its safetensors directory, never a pickle) and the splits from the ingest
stage, and logs what run_evaluate returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipelines.evaluate.bpd import evaluate_bpd, plot_vb_per_t, select_images, write_vb_per_t_csv
from pipelines.evaluate.config import EvaluateConfig
from pipelines.evaluate.features import FeatureExtractor, build_feature_extractor, load_digits_net
from pipelines.evaluate.frechet import fid_from_features
from pipelines.evaluate.grid import save_class_grid, save_grid
from pipelines.evaluate.guidance import (Reference, class_accuracy, plot_guidance, predict_labels, scale_tag,
                                         write_guidance_csv, write_guidance_markdown)
from pipelines.evaluate.kid import kid_from_features, unit_rms
from pipelines.evaluate.sampling import SamplerRun, balanced_labels, check_steps, generate_samples, parse_sampler
from pipelines.evaluate.table import plot_fid_vs_model_calls, write_table_csv, write_table_markdown
from pipelines.stage import StageContext, StageKind, StageResult
from pipelines.tracking import use_tracking_uri

GRID_IMAGES = 64
GRID_PER_CLASS = 10  # columns of the per-class grids


@dataclass
class EvaluateResult:
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)  # all inside output_dir
    table: list[dict] = field(default_factory=list)  # one row per sampler, see pipelines.evaluate.table
    guidance: list[dict] = field(default_factory=list)  # one row per guidance scale, see pipelines.evaluate.guidance


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
    train_labels [M] int64 (for the digits feature net and classifier; a conditional model with K classes needs
    labels spanning exactly 0..K−1). Writes into output_dir: bpd_per_t.{csv,png}, sampler_table.{csv,md},
    fid_vs_model_calls.png, samples_<sampler>.png, and for the guidance sweep guidance_table.{csv,md}, guidance.png,
    samples_guided_s<s>.png (a row per class).
    Metrics: test_bpd, test_{prior,vb,decoder}_bpd, test_bpd_stderr, test_bpd_num_images; the floor
    fid_heldout_vs_test, kid_heldout_vs_test, kid_heldout_vs_test_stderr; the sample counts fid_num_samples,
    fid_num_test_images, fid_num_heldout_images; per sampler fid_<s>, kid_<s>, kid_<s>_stderr, samples_per_s_<s>,
    sample_seconds_<s>; fid_net_val_accuracy for "digits"; per guidance scale (tag s2, s2.5, …) fid_guided_<tag>,
    kid_guided_<tag>, kid_guided_<tag>_stderr, class_accuracy_<tag>, samples_per_s_guided_<tag>,
    sample_seconds_guided_<tag>, then class_accuracy_best, guidance_scale_best (the most accurate s, the smallest on a
    tie) and classifier_val_accuracy.
    """
    specs = [parse_sampler(s) for s in config.samplers]
    _check_inputs(model, test_images, train_images, train_labels)
    for spec in specs:
        check_steps(spec, model.num_timesteps)
    guide_spec = _guidance_plan(config, model, train_labels)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    needs_digits = config.fid_feature_net == "digits" or guide_spec is not None
    digits = load_digits_net(config, train_images, train_labels) if needs_digits else None
    extract = build_feature_extractor(config, train_images, train_labels, device, digits)
    result = EvaluateResult(metrics=dict(extract.metrics))
    model.eval()
    _score_bpd(config, model, test_images, output_dir, progress, result)
    scorer = make_scorer(config, extract, test_images, train_images, result)
    for spec in specs:
        _score_sampler(config, model, spec, scorer, output_dir, progress, result)
    result.artifacts += [write_table_csv(result.table, output_dir / "sampler_table.csv"),
                         write_table_markdown(result.table, output_dir / "sampler_table.md", scorer.floor.fid,
                                              scorer.floor.num_images),
                         plot_fid_vs_model_calls(result.table, output_dir / "fid_vs_model_calls.png", scorer.floor.fid)]
    if guide_spec is None:
        if model_num_classes(model) is None:
            print("[raydiff evaluate] unconditional model: no guidance sweep", flush=True)
        return result
    _guidance_sweep(config, model, guide_spec, scorer, digits, output_dir, progress, result)
    return result


@dataclass
class Scorer:
    """FID and KID of image sets against the test images' features, and the floor they are read against."""

    extract: FeatureExtractor
    test_features: np.ndarray
    feature_scale: float  # one fixed feature scale for every KID against the test set
    floor: Reference
    seed: int

    def __call__(self, images: torch.Tensor) -> tuple[float, float, float]:
        """images [N, C, H, W] in [−1, 1] → (FID, KID, KID stderr) against the test images."""
        features = self.extract(images)
        kid = kid_from_features(features, self.test_features, seed=self.seed, scale=self.feature_scale)
        return fid_from_features(features, self.test_features), kid.mean, kid.stderr


def _score_bpd(config: EvaluateConfig, model, test_images: torch.Tensor, output_dir: Path, progress: bool,
               result: EvaluateResult) -> None:
    """The test ELBO in bits/dim on a seeded subset: metrics test_*bpd*, bpd_per_t.{csv,png}."""
    subset = select_images(test_images, config.bpd_batches * config.bpd_batch_size, config.seed)
    num_batches = math.ceil(subset.shape[0] / config.bpd_batch_size)
    with tqdm(total=num_batches * model.num_timesteps, desc="bits/dim", disable=not progress) as bar:
        bpd = evaluate_bpd(model, subset, config.bpd_batch_size, config.seed, bar.update)
    result.metrics.update(bpd.metrics("test"))
    print(f"[raydiff evaluate] test ELBO {result.metrics['test_bpd']:.3f} bits/dim on {subset.shape[0]} images",
          flush=True)
    result.artifacts += [write_vb_per_t_csv(bpd, output_dir / "bpd_per_t.csv"),
                         plot_vb_per_t(bpd, output_dir / "bpd_per_t.png")]


def make_scorer(config: EvaluateConfig, extract: FeatureExtractor, test_images: torch.Tensor,
            train_images: torch.Tensor, result: EvaluateResult) -> Scorer:
    """Test features and the floor: real TRAIN images the feature net never saw against the test images."""
    test_features = extract(test_images)
    unseen = train_images if extract.unseen is None else train_images[extract.unseen]
    reference = select_images(unseen, config.num_fid_samples, config.seed)
    reference_features = extract(reference)
    scale = unit_rms(test_features)
    reference_kid = kid_from_features(reference_features, test_features, seed=config.seed, scale=scale)
    floor = Reference("floor: real images the feature net never saw", fid_from_features(reference_features,
                      test_features), reference_kid.mean, reference_kid.stderr, reference.shape[0])
    result.metrics.update({"fid_heldout_vs_test": floor.fid, "kid_heldout_vs_test": floor.kid,
                           "kid_heldout_vs_test_stderr": floor.kid_stderr, "fid_num_samples": config.num_fid_samples,
                           "fid_num_test_images": test_images.shape[0], "fid_num_heldout_images": floor.num_images})
    print(f"[raydiff evaluate] floor: {floor.num_images} held-out real images vs {test_images.shape[0]} test images: "
          f"FID {floor.fid:.2f}, KID {floor.kid:.4f} ± {floor.kid_stderr:.4f}", flush=True)
    return Scorer(extract, test_features, scale, floor, config.seed)


def _grid_scale(model) -> int:
    return max(1, 64 // model.image_shape[-1])


def _score_sampler(config: EvaluateConfig, model, spec: SamplerRun, scorer: Scorer, output_dir: Path,
                   progress: bool, result: EvaluateResult) -> None:
    """M seeded samples from one sampler: a table row, metrics fid_/kid_/samples_per_s_<s>, a grid."""
    calls = math.ceil(config.num_fid_samples / config.sample_batch_size) * spec.model_calls
    with tqdm(total=calls, desc=spec.name, disable=not progress) as bar:
        samples = generate_samples(model, spec, config.num_fid_samples, config.sample_batch_size, config.seed,
                                   bar.update)
    fid, kid, kid_stderr = scorer(samples.images)
    result.table.append({"sampler": spec.name, "kind": spec.kind, "steps": spec.steps,
                         "model_calls": spec.model_calls, "num_samples": config.num_fid_samples,
                         "num_ref_images": scorer.test_features.shape[0], "seconds": samples.seconds,
                         "samples_per_s": samples.samples_per_s, "fid": fid, "kid": kid,
                         "kid_stderr": kid_stderr, "feature_net": scorer.extract.name})
    print(f"[raydiff evaluate] {spec.name}: FID {fid:.2f} (floor {scorer.floor.fid:.2f}), KID "
          f"{kid:.4f} ± {kid_stderr:.4f}, {samples.samples_per_s:.1f} samples/s", flush=True)
    result.metrics.update({f"fid_{spec.name}": fid, f"kid_{spec.name}": kid, f"kid_{spec.name}_stderr": kid_stderr,
                           f"samples_per_s_{spec.name}": samples.samples_per_s,
                           f"sample_seconds_{spec.name}": samples.seconds})
    result.artifacts.append(save_grid(samples.images[:GRID_IMAGES], output_dir / f"samples_{spec.name}.png",
                                      nrow=8, scale=_grid_scale(model)))


def _guidance_sweep(config: EvaluateConfig, model, guide_spec: SamplerRun, scorer: Scorer, digits,
                    output_dir: Path, progress: bool, result: EvaluateResult) -> None:
    """Per guidance scale M class-balanced samples (FID, KID, class accuracy, a grid per class), then the best
    scale and the guidance table and plot."""
    references = [scorer.floor]
    unconditional = next((row for row in result.table if row["sampler"] == guide_spec.name), None)
    if unconditional is not None:
        references.append(Reference(f"unconditional (null class), {guide_spec.name}", unconditional["fid"],
                                    unconditional["kid"], unconditional["kid_stderr"], unconditional["num_samples"]))
    num_classes = model_num_classes(model)
    names = list(getattr(model, "class_names", None) or [str(k) for k in range(num_classes)])
    labels = balanced_labels(config.num_fid_samples, num_classes)
    for guidance_scale in config.guidance_scales:
        _score_guidance_scale(config, model, guide_spec, guidance_scale, labels, names, scorer, digits, output_dir,
                              progress, result)
    best = max(result.guidance, key=lambda row: (row["class_accuracy"], -row["guidance_scale"]))
    result.metrics.update({"class_accuracy_best": best["class_accuracy"],
                           "guidance_scale_best": best["guidance_scale"],
                           "classifier_val_accuracy": digits.val_accuracy})
    result.artifacts += [write_guidance_csv(result.guidance, output_dir / "guidance_table.csv"),
                         write_guidance_markdown(result.guidance, output_dir / "guidance_table.md", names, references,
                                                 digits.val_accuracy),
                         plot_guidance(result.guidance, output_dir / "guidance.png", references, digits.val_accuracy)]


def _score_guidance_scale(config: EvaluateConfig, model, guide_spec: SamplerRun, guidance_scale: float,
                          labels: torch.Tensor, names: list[str], scorer: Scorer, digits, output_dir: Path,
                          progress: bool, result: EvaluateResult) -> None:
    """One guidance scale: a guidance table row, metrics *_guided_<tag> and class_accuracy_<tag>, a class grid."""
    tag = scale_tag(guidance_scale)
    calls = math.ceil(config.num_fid_samples / config.sample_batch_size) * guide_spec.model_calls
    with tqdm(total=calls, desc=f"{guide_spec.name} {tag}", disable=not progress) as bar:
        samples = generate_samples(model, guide_spec, config.num_fid_samples, config.sample_batch_size,
                                   config.seed, bar.update, labels=labels, guidance_scale=guidance_scale)
    fid, kid, kid_stderr = scorer(samples.images)
    predicted = predict_labels(digits.net, samples.images, config.sample_batch_size, scorer.extract.device)
    accuracy, per_class = class_accuracy(predicted, labels, len(names))
    result.guidance.append({"guidance_scale": guidance_scale, "sampler": guide_spec.name,
                            "model_calls": guide_spec.model_calls, "num_samples": config.num_fid_samples,
                            "num_ref_images": scorer.test_features.shape[0], "seconds": samples.seconds,
                            "samples_per_s": samples.samples_per_s, "fid": fid, "kid": kid,
                            "kid_stderr": kid_stderr, "class_accuracy": accuracy,
                            "per_class_accuracy": per_class, "feature_net": scorer.extract.name})
    print(f"[raydiff evaluate] {guide_spec.name} guidance s = {guidance_scale:g}: FID {fid:.2f}, KID "
          f"{kid:.4f} ± {kid_stderr:.4f}, class accuracy {100 * accuracy:.1f}%", flush=True)
    result.metrics.update({f"fid_guided_{tag}": fid, f"kid_guided_{tag}": kid,
                           f"kid_guided_{tag}_stderr": kid_stderr, f"class_accuracy_{tag}": accuracy,
                           f"samples_per_s_guided_{tag}": samples.samples_per_s,
                           f"sample_seconds_guided_{tag}": samples.seconds})
    result.artifacts.append(save_class_grid(samples.images, labels, names, output_dir / f"samples_guided_{tag}.png",
                                            GRID_PER_CLASS, scale=_grid_scale(model)))


def model_num_classes(model) -> int | None:
    """K for a class-conditional DiffusionModel, None when unconditional (or a model without the attribute)."""
    return getattr(model, "num_classes", None)


def _guidance_plan(config: EvaluateConfig, model, train_labels: torch.Tensor) -> SamplerRun | None:
    """The guidance sweep's sampler, or None when there is no sweep (an unconditional model, or guidance_scales []).
    Raises ValueError for guidance settings an unconditional model cannot honour, a sampler that asks for more steps
    than the model has, and train labels that do not span exactly the model's classes (the classifier that scores
    class accuracy learns its classes from them)."""
    num_classes = model_num_classes(model)
    if num_classes is None:
        if config.guidance_scales and not config.guidance_is_default:
            raise ValueError(f"guidance_scales={config.guidance_scales} / guidance_sampler="
                             f"{config.guidance_sampler!r} ask for a classifier-free guidance sweep, but the model is "
                             "unconditional (trained without num_classes); remove them or set guidance_scales: []")
        return None
    if not config.guidance_scales:
        return None
    spec = parse_sampler(config.guidance_sampler)
    check_steps(spec, model.num_timesteps)
    low, high = int(train_labels.min()), int(train_labels.max())
    if low < 0 or high != num_classes - 1:
        raise ValueError(f"train_labels span [{low}, {high}] but the model has {num_classes} classes: class accuracy "
                         f"needs labels in [0, {num_classes - 1}] covering the last class (the classifier learns its "
                         "classes from them)")
    return spec


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
    from pipelines.ingest.reader import load_split_tensor
    from pipelines.modelstore import load_model

    splits = ctx.inputs["data"].values["splits"]
    if "test" not in splits:
        raise ValueError(f"evaluate needs a 'test' split; the ingest stage produced {sorted(splits)}")
    model_uri = ctx.inputs["model"].values["model_uri"]
    test_images, _ = load_split_tensor(ctx.localize(splits["test"]))
    train_images, train_labels = load_split_tensor(ctx.localize(splits["train"]))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with use_tracking_uri(ctx.tracking_uri):
        model = load_model(model_uri, device)
    result = run_evaluate(ctx.params, model, test_images, train_images, train_labels, ctx.output_dir, progress=False)
    ctx.log_artifacts(result.artifacts)
    ctx.mlflow().log_dict(ctx.run_id, result.table, "sampler_table.json")
    if result.guidance:
        ctx.mlflow().log_dict(ctx.run_id, result.guidance, "guidance_table.json")
    samples = sorted(p for p in result.artifacts if p.name.startswith("samples_"))
    return StageResult(
        values={"metrics": result.metrics, "model_uri": model_uri, "samples_dir": ctx.output_uri,
                "samples": [ctx.uri_of(p) for p in samples]},
        metrics=result.metrics,
    )


KIND = StageKind(name="evaluate", params="pipelines.evaluate.config:EvaluateConfig", run=run,
                 inputs={"model": ("train", "sweep", "distill"), "data": ("ingest",)}, version="1",
                 resources={"num_cpus": 1})
