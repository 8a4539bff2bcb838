"""How far a model's held-out bound could fall by changing only its reverse-process variance Σ, its mean kept.

For each term of the bound (every t, one noise draw per image, as the evaluate stage scores it) the model's mean
is fixed and Σ is chosen in turn:

    model          the model's own Σ: fixed β̃_t, or its learned Σ_θ (eq. 15 of Improved DDPM)
    fixed β̃        Σ = β̃_t (the fixed "small" variance)
    best per t     the one σ_t² that minimizes the term over all images and pixels
    best per level one σ² per (t, level of the model's own x̂_0 in 34 bins): a variance head that reads only t and
                   the pixel's predicted value could at most reach this
    best per pixel σ² per pixel, knowing x_0 (an oracle no model can be: the floor of any diagonal Σ)

The last three are fitted on the very images they score, so they are lower limits, not achievable bounds. "free"
rows let σ² take any value; "eq. 15" rows keep it in eq. 15's interval [β̃_t, β_t] (the network's variance
channel is not clamped, so a learned Σ_θ can leave it). For a KL term the optimum has a closed form: with e² the
squared error of the mean, KL(N(μ̃, β̃) ‖ N(μ, σ²)) is convex in log σ² with its minimum at σ² = β̃ + mean(e²) over
the pixels sharing σ² (clamped to the interval when there is one); the decoder term L_0 is minimized over a grid.

    python -m benchmarks.variance_headroom --model-uri runs:/<train run>/model --tracking-uri sqlite:///mlruns.db
        [--num-images 128] [--json PATH]

Images: the test split of the pipeline that trained the model (see benchmarks.sampling_quality), or --splits DIR.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from diffusion.losses import LN2, discretized_gaussian_log_likelihood, normal_kl, prior_bpd
from diffusion.parameterization import log_variance_from_frac, model_prediction
from diffusion.process import model_timesteps, q_posterior, q_sample

LEVELS = 34  # bins of x̂_0 over [−1 − 1/16, 1 + 1/16]: two per grey level of the 17-level digits
DECODER_GRID = torch.linspace(-16.0, 0.0, 161)  # log σ² candidates for the free decoder optimum
ROWS = ("model", "fixed β̃", "best per t (eq. 15)", "best per level (eq. 15)", "best per pixel (eq. 15)",
        "best per t (free)", "best per level (free)", "best per pixel (free)")


def level_bins(x0_hat: torch.Tensor, levels: int = LEVELS) -> torch.Tensor:
    """The bin of each predicted pixel value: [B, C, H, W] float → [B, C, H, W] int64 in [0, levels)."""
    edge = 1.0 + 1.0 / 16.0
    return ((x0_hat.clamp(-edge, edge) + edge) / (2 * edge) * (levels - 1)).round().long()


def group_mean(values: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Mean of `values` within each group, broadcast back: [...] float, [...] int64 → [...]."""
    flat, idx = values.flatten().double(), groups.flatten()
    sums = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, idx, flat)
    counts = torch.bincount(idx, minlength=num_groups).clamp(min=1)
    return (sums / counts)[groups].to(values.dtype)


def best_kl_log_variances(true_mean, true_logvar, mean, lo, hi, levels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Optimal log σ² for the KL term per row of ROWS (closed form σ² = β̃ + mean e² over the pixels sharing it).

    true_mean, mean, levels: [B, C, H, W]; true_logvar, lo, hi: [B, 1, 1, 1] (log β̃_t and eq. 15's interval).
    """
    e2 = (true_mean - mean) ** 2
    beta_tilde = torch.exp(true_logvar)
    free = {"t": torch.log(beta_tilde + e2.mean()).expand_as(mean),
            "level": torch.log(beta_tilde + group_mean(e2, levels, LEVELS)),
            "pixel": torch.log(beta_tilde + e2)}
    out = {}
    for name, logvar in free.items():
        out[f"best per {name} (free)"] = logvar
        out[f"best per {name} (eq. 15)"] = torch.maximum(torch.minimum(logvar, hi), lo)
    return out


def best_decoder_nll(x0: torch.Tensor, mean: torch.Tensor, lo: float, hi: float, levels: torch.Tensor
                     ) -> dict[str, float]:
    """min over a log σ² grid of the decoder's −log p(x_0 | x_1) in bits/dim per row of ROWS (the optimum rows)."""
    in_interval = torch.linspace(lo, hi, 41)
    grid = torch.cat([in_interval, DECODER_GRID])  # the first 41 values are eq. 15's, all of them the free ones
    every = torch.stack([-discretized_gaussian_log_likelihood(x0, mean, torch.full_like(x0, 0.5 * float(v))) / LN2
                         for v in grid]).double()  # [G, B, C, H, W]
    out = {}
    for scope, nll in {"eq. 15": every[:in_interval.numel()], "free": every}.items():
        per_level = torch.stack([torch.zeros(LEVELS, dtype=torch.float64).index_add_(0, levels.flatten(), g.flatten())
                                 for g in nll])  # [G, LEVELS] sums
        out[f"best per t ({scope})"] = float(nll.mean(dim=(1, 2, 3, 4)).min())
        out[f"best per level ({scope})"] = float(per_level.min(dim=0).values.sum() / x0.numel())
        out[f"best per pixel ({scope})"] = float(nll.min(dim=0).values.mean())
    return out


@torch.no_grad()
def variance_headroom(model: torch.nn.Module, x0: torch.Tensor, seed: int = 0) -> dict[str, np.ndarray]:
    """The bound's per-t terms under each row of ROWS for a DiffusionModel on images [N, C, H, W] in [−1, 1].

    Returns {row: [T] float64 bits/dim} (index 0 holds L_0) and "prior" ([1], L_T). All N images go through the
    network at once, one noise draw per image and t from a generator seeded with `seed`.
    """
    sched = model.schedule()
    generator = torch.Generator().manual_seed(seed)
    num_steps = sched.num_timesteps
    terms = {row: np.zeros(num_steps) for row in ROWS}
    for i in reversed(range(num_steps)):
        t = torch.full((x0.shape[0],), i, dtype=torch.long)
        x_t = q_sample(sched, x0, t, torch.randn(x0.shape, generator=generator))
        pred = model_prediction(sched, x_t, t, model.unet(x_t, model_timesteps(sched, t)), model.prediction,
                                model.learn_variance)
        mean, _, _ = q_posterior(sched, pred.x0, x_t, t)
        true_mean, _, true_logvar = q_posterior(sched, x0, x_t, t)
        ends = torch.ones(x0.shape[0], 1, 1, 1)
        small, large = (log_variance_from_frac(sched, t, v) for v in (-ends, ends))  # eq. 15 at frac 0 and 1
        lo, hi = torch.minimum(small, large), torch.maximum(small, large)
        own = small.expand_as(mean) if pred.log_variance is None else pred.log_variance
        levels = level_bins(pred.x0)
        if i > 0:
            logvars = {"model": own, "fixed β̃": small.expand_as(mean),
                       **best_kl_log_variances(true_mean, true_logvar, mean, lo, hi, levels)}
            for row, logvar in logvars.items():
                terms[row][i] = float(normal_kl(true_mean, true_logvar, mean, logvar).double().mean() / LN2)
        else:
            def nll(logvar: torch.Tensor) -> float:
                return float((-discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar) / LN2).double().mean())

            terms["model"][0], terms["fixed β̃"][0] = nll(own), nll(small.expand_as(mean))
            for row, value in best_decoder_nll(x0, mean, float(lo.min()), float(hi.max()), levels).items():
                terms[row][0] = value
    terms["prior"] = np.array([float(prior_bpd(sched, x0).double().mean())])
    return terms


def summary(terms: dict[str, np.ndarray]) -> list[dict]:
    """A row per Σ choice: the total bound and its L_0, L_1..L_10, L_11..L_50 and remaining KL terms."""
    prior = float(terms["prior"][0])
    return [{"variance": row, "total_bpd": prior + float(v.sum()), "L_0": float(v[0]), "L_1-10": float(v[1:11].sum()),
             "L_11-50": float(v[11:51].sum()), "L_51+": float(v[51:].sum()), "L_T": prior}
            for row, v in terms.items() if row != "prior"]


def main(argv: list[str] | None = None) -> None:
    from benchmarks.sampling_quality import load_data, load_model
    from pipelines.evaluate.bpd import select_images

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-uri", required=True, help="MLflow model URI or local MLflow model directory")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for runs:/ and models:/ URIs")
    p.add_argument("--splits", type=Path, help="an ingest stage's output holding train/ and test/")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=128, help="test images scored (the evaluate stage's subset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)

    model = load_model(args.model_uri, args.tracking_uri, "cpu")
    _, _, test_x, source = load_data(args, model.image_shape[-1], model)
    images = select_images(test_x, args.num_images, args.seed).float()
    print(f"{args.model_uri}: {images.shape[0]} test images from {source}", flush=True)
    rows = summary(variance_headroom(model, images, args.seed))
    base = rows[0]["total_bpd"]
    print("| Σ | bits/dim | Δ vs model | L_0 | L_1..L_10 | L_11..L_50 | L_51+ |\n|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['variance']} | {row['total_bpd']:.3f} | {row['total_bpd'] - base:+.3f} | {row['L_0']:.3f} | "
              f"{row['L_1-10']:.3f} | {row['L_11-50']:.3f} | {row['L_51+']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model_uri": args.model_uri, "test_data": source,
                                               "num_images": images.shape[0], "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
