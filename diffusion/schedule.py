"""Noise schedules β_1..β_T and every derived quantity, computed once in float64 (Ho et al. 2020, §2).

Index convention: array index i ∈ [0, T−1] holds step t = i + 1 of the paper, so index 0 is the first noising
step. `timesteps[i]` is the ORIGINAL index the model is conditioned on; it differs from `i` only after `respace`.

Precision: the arrays are built in float64; per-step math on a batch runs in `work_dtype` (float32, or float64 for a
float64 batch), reading each array from a tensor copy made once per device and dtype (`NoiseSchedule.table`), so a
training step or a sampler call copies nothing from the host and promotes no batch to float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

Spacing = Literal["linspace", "leading", "trailing", "quadratic"]


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    a.setflags(write=False)
    return a


def _reciprocal(abar: np.ndarray) -> np.ndarray:
    """1/ᾱ, inf where ᾱ = 0 (the last step of a zero-terminal-SNR schedule), without a divide warning."""
    with np.errstate(divide="ignore"):
        return 1.0 / abar


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """All per-step arrays have shape [T] and dtype float64 (read-only).

    betas                          β_t
    alphas                         α_t = 1 − β_t
    alphas_cumprod                 ᾱ_t = Π_{s≤t} α_s
    alphas_cumprod_prev            ᾱ_{t−1}, with ᾱ_0 = 1 at index 0
    posterior_variance             β̃_t = (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · β_t            (eq. 7)
    posterior_log_variance_clipped log β̃_t with index 0 (where β̃ = 0) replaced by β̃ at index 1
    posterior_mean_coef1           √ᾱ_{t−1} β_t / (1 − ᾱ_t)         (multiplies x_0, eq. 7)
    posterior_mean_coef2           √α_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t)   (multiplies x_t, eq. 7)
    log_betas                      log β_t
    log_one_minus_alphas_cumprod   log(1 − ᾱ_t), the log-variance of q(x_t | x_0)
    signal_to_noise                SNR_t = ᾱ_t / (1 − ᾱ_t)
    timesteps                      int64 original step indices the model sees
    """

    betas: np.ndarray
    timesteps: np.ndarray = field(default=None)  # type: ignore[assignment]
    alphas: np.ndarray = field(init=False)
    alphas_cumprod: np.ndarray = field(init=False)
    alphas_cumprod_prev: np.ndarray = field(init=False)
    sqrt_alphas_cumprod: np.ndarray = field(init=False)
    sqrt_one_minus_alphas_cumprod: np.ndarray = field(init=False)
    sqrt_recip_alphas_cumprod: np.ndarray = field(init=False)
    sqrt_recipm1_alphas_cumprod: np.ndarray = field(init=False)
    posterior_variance: np.ndarray = field(init=False)
    posterior_log_variance_clipped: np.ndarray = field(init=False)
    posterior_mean_coef1: np.ndarray = field(init=False)
    posterior_mean_coef2: np.ndarray = field(init=False)
    log_betas: np.ndarray = field(init=False)
    log_one_minus_alphas_cumprod: np.ndarray = field(init=False)
    signal_to_noise: np.ndarray = field(init=False)
    _tables: dict = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        betas = np.asarray(self.betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not np.all((betas > 0) & (betas <= 1)):
            raise ValueError("betas must lie in (0, 1]")
        timesteps = np.arange(betas.size) if self.timesteps is None else np.asarray(self.timesteps)
        if timesteps.shape != betas.shape:
            raise ValueError(f"timesteps shape {timesteps.shape} != betas shape {betas.shape}")
        if np.any(np.diff(timesteps) <= 0):
            raise ValueError("timesteps must be strictly increasing")
        alphas = 1.0 - betas
        abar = np.cumprod(alphas)
        abar_prev = np.append(1.0, abar[:-1])
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        log_var_clipped = np.log(np.append(post_var[1], post_var[1:])) if betas.size > 1 else np.log(betas)
        values = {
            "betas": betas,
            "timesteps": timesteps.astype(np.int64),
            "alphas": alphas,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas_cumprod": np.sqrt(abar),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - abar),
            "sqrt_recip_alphas_cumprod": np.sqrt(_reciprocal(abar)),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(_reciprocal(abar) - 1.0),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": log_var_clipped,
            "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
            "log_betas": np.log(betas),
            "log_one_minus_alphas_cumprod": np.log(1.0 - abar),
            "signal_to_noise": abar / (1.0 - abar),
        }
        for name, value in values.items():
            object.__setattr__(self, name, _frozen(value) if value.dtype == np.float64 else value)
        self.timesteps.setflags(write=False)

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.size)

    @classmethod
    def from_betas(cls, betas) -> "NoiseSchedule":
        return cls(betas=np.asarray(betas, dtype=np.float64))

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "NoiseSchedule":
        """The DDPM schedule: β linear from beta_start to beta_end (Ho et al. §4)."""
        return cls.from_betas(np.linspace(beta_start, beta_end, T, dtype=np.float64))

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> "NoiseSchedule":
        """Nichol & Dhariwal (2021) eq. 17: ᾱ(t) = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s) · π/2), β clipped."""
        f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
        betas = [min(1 - f(i + 1) / f(i), max_beta) for i in range(T)]
        return cls.from_betas(betas)

    @classmethod
    def from_name(cls, name: str, T: int) -> "NoiseSchedule":
        if name == "linear":
            # Scale so that any T keeps the paper's T=1000 endpoints of ᾱ (as in improved-diffusion).
            scale = 1000 / T
            return cls.linear(T, 1e-4 * scale, 0.02 * scale)
        if name == "cosine":
            return cls.cosine(T)
        raise ValueError(f"unknown schedule {name!r}; expected 'linear' or 'cosine'")

    def respace(self, timesteps) -> "NoiseSchedule":
        """The schedule restricted to increasing indices τ (of THIS schedule): β'_i = 1 − ᾱ_{τ_i} / ᾱ_{τ_{i−1}}.

        ᾱ at the kept steps is reproduced exactly; `timesteps` of the result holds the original indices.
        """
        tau = np.asarray(timesteps, dtype=np.int64)
        if tau.ndim != 1 or tau.size == 0:
            raise ValueError("respace needs a non-empty 1-D list of timesteps")
        if tau[0] < 0 or tau[-1] >= self.num_timesteps or np.any(np.diff(tau) <= 0):
            raise ValueError(f"timesteps must be strictly increasing within [0, {self.num_timesteps - 1}]")
        abar = self.alphas_cumprod[tau]
        abar_prev = np.append(1.0, abar[:-1])
        return NoiseSchedule(betas=1.0 - abar / abar_prev, timesteps=self.timesteps[tau])

    def __getstate__(self) -> dict:
        return {name: value for name, value in self.__dict__.items() if name != "_tables"}  # no device tensors

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _tables={})

    def table(self, name: str, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        """Array `name` as a [T] tensor of `dtype` on `device`: cast from float64 on the host and copied once per
        (name, device, dtype); later calls return the same tensor."""
        key = (name, torch.device(device), dtype)
        tensor = self._tables.get(key)
        if tensor is None:
            tensor = torch.from_numpy(np.array(getattr(self, name))).to(dtype).to(key[1])
            self._tables[key] = tensor
        return tensor

    def prepare(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> "NoiseSchedule":
        """Build every array's tensor on `device` now (before torch.compile traces code that reads them)."""
        for name, value in vars(self).items():
            if isinstance(value, np.ndarray):
                self.table(name, device, torch.long if name == "timesteps" else dtype)
        return self

    def to_tensor(self, name: str, t: torch.Tensor, ndim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Gather array `name` at integer indices t: [B] and reshape to [B, 1, ..., 1] (ndim dims) for broadcasting."""
        return self.table(name, t.device, dtype)[t].reshape(-1, *([1] * (ndim - 1)))


def spaced_timesteps(T: int, n: int, kind: Spacing = "linspace") -> np.ndarray:
    """n increasing indices in [0, T−1] to sample on. Samplers always end with a step to ᾱ_prev = 1 (see `respace`).

    linspace  round(linspace(0, T−1, n))                                (improved-diffusion)
    leading   0, c, 2c, … with c = T // n                               (DDIM paper, diffusers "leading")
    trailing  round(arange(T, 0, −T/n)) − 1, reversed                   (diffusers "trailing", starts at T−1)
    quadratic round(linspace(0, √(0.8 T), n)²), early collisions bumped up by one   (DDIM paper, CIFAR-10 appendix)
    """
    if not 1 <= n <= T:
        raise ValueError(f"number of steps must be in [1, {T}], got {n}")
    if kind == "linspace":
        steps = np.round(np.linspace(0, T - 1, n)).astype(np.int64)
    elif kind == "leading":
        steps = np.arange(n, dtype=np.int64) * (T // n)
    elif kind == "trailing":
        steps = np.round(np.arange(T, 0, -T / n)).astype(np.int64)[::-1] - 1
    elif kind == "quadratic":
        steps = np.round(np.linspace(0, math.sqrt(T * 0.8), n) ** 2).astype(np.int64)
        for k in range(1, n):  # near 0 the squares are closer than 1 apart
            steps[k] = max(steps[k], steps[k - 1] + 1)
    else:
        raise ValueError(f"unknown spacing {kind!r}; expected linspace, leading, trailing or quadratic")
    steps = np.unique(steps)
    if steps.size != n:
        raise ValueError(f"spacing {kind!r} gives duplicate steps for T={T}, n={n}")
    return steps


def logsnr_timesteps(sched: NoiseSchedule, n: int) -> np.ndarray:
    """n increasing indices of `sched` nearest to n points uniform in log-SNR λ = log(√ᾱ / √(1 − ᾱ)) between index
    0 and index T−1 (DPM-Solver's time grid for pixel-space models, Lu et al. 2022); where λ changes faster than
    one index per grid point (near t = 0) neighbours are pushed apart to keep the indices distinct."""
    T = sched.num_timesteps
    if not 1 <= n <= T:
        raise ValueError(f"number of steps must be in [1, {T}], got {n}")
    lam = np.array([log_snr(float(abar)) for abar in sched.alphas_cumprod])  # decreasing in the index
    targets = np.linspace(lam[0], lam[-1], n)
    steps = np.abs(lam[None, :] - targets[:, None]).argmin(axis=1).astype(np.int64)
    for k in range(1, n):
        steps[k] = max(steps[k], steps[k - 1] + 1)
    steps[-1] = min(steps[-1], T - 1)
    for k in range(n - 2, -1, -1):
        steps[k] = min(steps[k], steps[k + 1] - 1)
    return steps


def work_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype per-step math on x runs in: float64 for a float64 x, float32 for every other (bf16, fp16, fp32)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def snr(sched: NoiseSchedule, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """SNR_t = ᾱ_t / (1 − ᾱ_t) at schedule indices t: [B] int64 → [B] in `dtype`."""
    return sched.to_tensor("signal_to_noise", t, 1, dtype)


def log_snr(abar: float) -> float:
    """λ = log(√ᾱ / √(1 − ᾱ)); +∞ at ᾱ = 1, −∞ at ᾱ = 0 (zero terminal SNR: the first step is then first order)."""
    if abar <= 0.0:
        return -math.inf
    return math.inf if abar >= 1.0 else 0.5 * math.log(abar / (1.0 - abar))


def rescale_zero_terminal_snr(sched: NoiseSchedule) -> NoiseSchedule:
    """Shift and scale √ᾱ so that ᾱ at the last index is 0 and ᾱ at index 0 is unchanged (Lin et al. 2024, Alg. 1):

        √ᾱ'_t = (√ᾱ_t − √ᾱ_{T−1}) · √ᾱ_0 / (√ᾱ_0 − √ᾱ_{T−1}),   β'_t = 1 − ᾱ'_t / ᾱ'_{t−1}  (so β'_{T−1} = 1)

    Apply it to the full schedule before any respacing. The last step then has SNR 0: q(x_T | x_0) = N(0, I), ε̂ says
    nothing about x_0 there, so train with prediction "v" and sample with a spacing that includes T−1 ("trailing").
    """
    if sched.timesteps[-1] != sched.num_timesteps - 1:
        raise ValueError("rescale the full schedule, then respace it")
    sqrt_abar = np.sqrt(sched.alphas_cumprod)
    first, last = sqrt_abar[0], sqrt_abar[-1]
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    abar = sqrt_abar**2
    betas = 1.0 - np.append(abar[0], abar[1:] / abar[:-1])
    with np.errstate(divide="ignore"):  # 1/ᾱ at the last index is inf
        return NoiseSchedule.from_betas(betas)


def build_schedule(name: str, num_timesteps: int, zero_terminal_snr: bool = False) -> NoiseSchedule:
    """The training schedule by name ("linear" | "cosine"), zero-terminal-SNR rescaled when asked."""
    sched = NoiseSchedule.from_name(name, num_timesteps)
    return rescale_zero_terminal_snr(sched) if zero_terminal_snr else sched
