"""One model call for a batch of images, each with its own timestep, class label and guidance scale.

Classifier-free guidance (Ho & Salimans 2021) in the diffusers convention:

    ε̂ = ε(x, t, ∅) + s · (ε(x, t, y) − ε(x, t, ∅))      s = 1: plain conditional sampling, no extra work

Rows with s ≠ 1 are evaluated twice in the SAME forward pass (once with their label, once with the null class), so a
batch that mixes labels and scales still costs one call of at most 2B images. x̂_0 (when the model gives it) is
guided the same way, and a learned variance comes from the conditional branch (as in GLIDE / improved-diffusion).

`denoise` works with any ε-model `model(x, t)`; a model with a `denoise(x, t, y)` method (diffusion.packaged.
DiffusionModel) supplies x̂_0 and its variance values too, read through its prediction type. Labels are checked by
diffusion.labels.
"""

from __future__ import annotations

import torch

from diffusion.labels import check_conditioning, null_labels, num_classes_of
from diffusion.samplers.base import Denoised


def _call(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> Denoised:
    if hasattr(model, "denoise"):
        return model.denoise(x, t, y)
    eps = model(x, t) if y is None else model(x, t, y)
    assert eps.shape == x.shape, f"model output {tuple(eps.shape)} != input {tuple(x.shape)}"
    return Denoised(eps.to(x.dtype))


def denoise(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
            guidance_scale: float | torch.Tensor = 1.0) -> Denoised:
    """ε̂ (and x̂_0, v_Σ where the model gives them) at x: [B, C, H, W], t: [B] int64 (original timesteps),
    y: [B] int64 labels (the model's num_classes = null class) or None, guidance_scale: a float or [B] per image,
    on the host (a float, a list or a CPU tensor: which rows are guided decides the batch's shape, so reading it from
    the device would be a sync every call). One forward pass of B + (number of rows with s ≠ 1) images."""
    check_conditioning(model, y, guidance_scale)
    batch = x.shape[0]
    scale = torch.as_tensor(guidance_scale, dtype=torch.float32, device="cpu").expand(batch)
    guided_rows = (scale != 1.0).nonzero().flatten()
    if guided_rows.numel() == 0:
        return _call(model, x, t, y)
    guided = guided_rows.to(x.device)
    num_classes = num_classes_of(model)
    labels = null_labels(num_classes, batch, x.device) if y is None else y
    out = _call(model, torch.cat([x, x[guided]]), torch.cat([t, t[guided]]),
                torch.cat([labels, null_labels(num_classes, guided.numel(), x.device)]))
    s = scale[guided_rows].to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))

    def guide(values: torch.Tensor | None) -> torch.Tensor | None:
        if values is None:
            return None
        result = values[:batch].clone()
        cond, uncond = values[guided], values[batch:]
        result[guided] = uncond + s * (cond - uncond)
        return result

    var_values = None if out.var_values is None else out.var_values[:batch]
    return Denoised(guide(out.eps), guide(out.x0), var_values)
