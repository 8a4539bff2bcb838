"""One model call for a batch of images, each with its own timestep, class label and guidance scale.

Classifier-free guidance (Ho & Salimans 2021) in the diffusers convention:

    ε̂ = ε(x, t, ∅) + s · (ε(x, t, y) − ε(x, t, ∅))      s = 1: plain conditional sampling, no extra work

Rows with s ≠ 1 are evaluated twice in the SAME forward pass (once with their label, once with the null class), so a
batch that mixes labels and scales still costs one call of at most 2B images. x̂_0 (when the model gives it) is
guided the same way, and a learned variance comes from the conditional branch (as in GLIDE / improved-diffusion).

`denoise` works with any ε-model `model(x, t)`; a model with a `denoise(x, t, y)` method (diffusion.packaged.
DiffusionModel) supplies x̂_0 and its variance values too, read through its prediction type.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffusion.unet import null_labels


@dataclass(frozen=True)
class Denoised:
    """What a sampler step needs from one model call, per image.

    eps         ε̂ [B, C, H, W]
    x0          x̂_0 [B, C, H, W] unclipped, or None (samplers then compute it from ε̂; needed where ᾱ_t = 0)
    var_values  the learned-variance channels v_Σ [B, C, H, W] (eq. 15 of Improved DDPM), or None (fixed variance)
    """

    eps: torch.Tensor
    x0: torch.Tensor | None = None
    var_values: torch.Tensor | None = None

    @staticmethod
    def cat(parts: list["Denoised"]) -> "Denoised":
        """Row-wise concatenation of `parts` (all with the same fields present)."""
        return Denoised(*(None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts])
                          for name in ("eps", "x0", "var_values")))

    def split(self, sizes: list[int]) -> list["Denoised"]:
        """Consecutive row groups of `sizes` (summing to B)."""
        parts = [field.split(sizes) if field is not None else [None] * len(sizes)
                 for field in (self.eps, self.x0, self.var_values)]
        return [Denoised(*group) for group in zip(*parts)]


def num_classes_of(model: torch.nn.Module) -> int | None:
    """The class count of a conditional model (its `num_classes` or its config's), None when unconditional."""
    if hasattr(model, "num_classes"):
        return model.num_classes
    config = getattr(model, "config", None)
    return getattr(config, "num_classes", None)


def _call(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> Denoised:
    if hasattr(model, "denoise"):
        return model.denoise(x, t, y)
    eps = model(x, t) if y is None else model(x, t, y)
    assert eps.shape == x.shape, f"model output {tuple(eps.shape)} != input {tuple(x.shape)}"
    return Denoised(eps.to(x.dtype))


def check_conditioning(model: torch.nn.Module, y, guidance_scale) -> None:
    """Labels (y: a tensor or sequence, or None) or a guidance scale ≠ 1 on an unconditional model are a ValueError
    that says so."""
    if num_classes_of(model) is not None:
        return
    if y is not None:
        raise ValueError("class labels given, but the model is unconditional (trained without num_classes)")
    scales = torch.as_tensor(guidance_scale, dtype=torch.float64)
    if bool((scales != 1.0).any()):
        raise ValueError(f"guidance_scale {guidance_scale} needs a class-conditional model; this one is "
                         "unconditional (use 1)")


def drop_labels(y: torch.Tensor, num_classes: int, p_uncond: float, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """Training labels for classifier-free guidance: each of y: [B] int64 replaced by the null class (num_classes)
    with probability p_uncond, independently. → [B] int64 (a new tensor)."""
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p_uncond
    return torch.where(drop, torch.full_like(y, num_classes), y)


def denoise(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
            guidance_scale: float | torch.Tensor = 1.0) -> Denoised:
    """ε̂ (and x̂_0, v_Σ where the model gives them) at x: [B, C, H, W], t: [B] int64 (original timesteps),
    y: [B] int64 labels (the model's num_classes = null class) or None, guidance_scale: a float or [B] per image.
    One forward pass of B + (number of rows with s ≠ 1) images."""
    check_conditioning(model, y, guidance_scale)
    batch = x.shape[0]
    scale = torch.as_tensor(guidance_scale, dtype=x.dtype, device=x.device).expand(batch)
    guided = (scale != 1.0).nonzero().flatten()
    if guided.numel() == 0:
        return _call(model, x, t, y)
    num_classes = num_classes_of(model)
    labels = null_labels(num_classes, batch, x.device) if y is None else y
    out = _call(model, torch.cat([x, x[guided]]), torch.cat([t, t[guided]]),
                torch.cat([labels, null_labels(num_classes, guided.numel(), x.device)]))
    s = scale[guided].reshape(-1, *([1] * (x.ndim - 1)))

    def guide(values: torch.Tensor | None) -> torch.Tensor | None:
        if values is None:
            return None
        result = values[:batch].clone()
        cond, uncond = values[guided], values[batch:]
        result[guided] = uncond + s * (cond - uncond)
        return result

    var_values = None if out.var_values is None else out.var_values[:batch]
    return Denoised(guide(out.eps), guide(out.x0), var_values)
