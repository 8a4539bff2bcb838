"""A trained network packaged with what sampling needs: the U-Net config, the noise schedule, what the network
predicts, its classes and the image spec.

On disk a model is a directory (`save_pretrained(dir)` / `DiffusionModel.from_pretrained(dir)`): `config.json`
(U-Net config, schedule, prediction type, zero terminal SNR, classes, image shape, training provenance) and
`model.safetensors` (the weights). Loading reads JSON and raw tensors only, never a pickle; an unknown config key, a
missing or extra tensor, or a tensor of the wrong shape is a ValueError naming it.
`model(x_t, t, y=None)` is always ε̂ (whatever the network predicts: eps, v or x0), so every
ε-sampler works unchanged; `model.denoise(x_t, t, y)` gives ε̂, x̂_0 and the learned-variance values
(`diffusion.samplers.base.Denoised`); `model.nll_bpd(x0)` is the ELBO with the model's own Σ_θ; `model.schedule()`
rebuilds the training schedule (zero-terminal-SNR rescaled if trained so).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from diffusion.samplers.base import Denoised
from diffusion.losses import nll_bpd
from diffusion.parameterization import check_prediction, model_prediction, split_output
from diffusion.schedule import NoiseSchedule, build_schedule
from diffusion.unet import UNet, UNetConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "raydiff.diffusion_model"
FORMAT_VERSION = 1
MLFLOW_ARTIFACT = "diffusion_model"  # the key of this directory among an MLflow pyfunc model's artifacts
CONFIG_KEYS = ("format", "format_version", "unet", "schedule", "num_timesteps", "prediction", "zero_terminal_snr",
               "class_names", "image_shape", "metadata")


class DiffusionModel(nn.Module):
    class_names: tuple[str, ...] | None = None

    def __init__(self, unet: UNet, schedule: str = "linear", num_timesteps: int = 1000, metadata: dict | None = None,
                 prediction: str = "eps", zero_terminal_snr: bool = False, class_names=None):
        super().__init__()
        check_prediction(prediction)
        self.unet = unet
        self.schedule_name = schedule
        self.num_timesteps = num_timesteps
        self.prediction = prediction
        self.zero_terminal_snr = zero_terminal_snr
        if class_names is not None:
            if unet.config.num_classes is None or len(class_names) != unet.config.num_classes:
                raise ValueError(f"{len(class_names)} class names for a model with num_classes="
                                 f"{unet.config.num_classes}")
            self.class_names = tuple(str(name) for name in class_names)
        self.metadata = dict(metadata or {})
        self._schedule = self._build_schedule()  # fails now, not at sampling time, on an unknown schedule

    def _build_schedule(self) -> NoiseSchedule:
        return build_schedule(self.schedule_name, self.num_timesteps, self.zero_terminal_snr)

    def schedule(self) -> NoiseSchedule:
        return self._schedule

    @property
    def learn_variance(self) -> bool:
        return self.unet.config.learn_variance

    @property
    def num_classes(self) -> int | None:
        return self.unet.config.num_classes

    def denoise(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> Denoised:
        """x: [B, C, H, W], t: [B] int64 original timesteps, y: [B] int64 labels or None → ε̂, x̂_0 (None for an
        ε-prediction model), v_Σ (None without a learned variance)."""
        output = self.unet(x, t) if y is None else self.unet(x, t, y)
        pred, var_values = split_output(output, self.learn_variance)
        if self.prediction == "eps":  # samplers derive x̂_0 from ε̂ themselves, exactly as for any ε-model
            return Denoised(pred, None, var_values)
        parts = model_prediction(self.schedule(), x, t, pred, self.prediction)
        return Denoised(parts.eps, parts.x0, var_values)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, C, H, W], t: [B] int64 (original timesteps), y: [B] int64 or None → ε̂: [B, C, H, W]."""
        if self.prediction == "eps" and not self.learn_variance:
            return self.unet(x, t) if y is None else self.unet(x, t, y)
        return self.denoise(x, t, y).eps

    def nll_bpd(self, x0: torch.Tensor, generator: torch.Generator | None = None, progress=None) -> dict:
        """The full ELBO in bits/dim (diffusion.losses.nll_bpd) read through this model's prediction type and
        learned Σ_θ; a conditional model is scored unconditionally (null class). x0: [B, C, H, W] in [−1, 1]."""
        return nll_bpd(self.unet, self.schedule(), x0, generator=generator, progress=progress,
                       prediction=self.prediction, learn_variance=self.learn_variance)

    @property
    def config(self) -> UNetConfig:
        return self.unet.config

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images this model generates."""
        c = self.unet.config
        return (c.in_channels, c.image_size, c.image_size)

    def describe(self) -> dict:
        """JSON-ready summary: U-Net config, schedule, parameterization, classes, image shape, training metadata."""
        return {"unet": self.config.to_dict(), "schedule": self.schedule_name, "num_timesteps": self.num_timesteps,
                "zero_terminal_snr": self.zero_terminal_snr, "prediction": self.prediction,
                "learn_variance": self.learn_variance, "num_classes": self.num_classes,
                "class_names": list(self.class_names) if self.class_names else None,
                "image_shape": list(self.image_shape), **self.metadata}

    def config_dict(self) -> dict:
        """The content of config.json (keys CONFIG_KEYS)."""
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "unet": self.config.to_dict(),
                "schedule": self.schedule_name, "num_timesteps": self.num_timesteps, "prediction": self.prediction,
                "zero_terminal_snr": self.zero_terminal_snr,
                "class_names": list(self.class_names) if self.class_names else None,
                "image_shape": list(self.image_shape), "metadata": self.metadata}

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write config.json and model.safetensors into `directory` (created if needed) → the directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps(self.config_dict(), indent=2) + "\n")
        tensors = {name: value.detach().cpu().contiguous() for name, value in self.unet.state_dict().items()}
        save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT})
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: torch.device | str = "cpu") -> "DiffusionModel":
        """The model saved in `directory`, in eval mode on `device`. Raises FileNotFoundError for a missing file and
        ValueError naming the key or tensor for an unknown/missing config key or a missing, extra or misshapen
        tensor."""
        directory = Path(directory)
        config = read_config(directory / CONFIG_FILE)
        try:
            unet_config = UNetConfig.from_dict(config["unet"])
        except (TypeError, ValueError) as error:
            raise ValueError(f"{directory / CONFIG_FILE}: key 'unet': {error}") from None
        with torch.device("meta"):  # no random init: every parameter comes from the file
            unet = UNet(unet_config)
        unet.load_state_dict(read_weights(directory / WEIGHTS_FILE, unet.state_dict(), device), assign=True)
        model = cls(unet, config["schedule"], config["num_timesteps"], config["metadata"], config["prediction"],
                    config["zero_terminal_snr"], config["class_names"])
        if list(model.image_shape) != list(config["image_shape"]):
            raise ValueError(f"{directory / CONFIG_FILE}: image_shape {config['image_shape']} does not match the "
                             f"U-Net config's {list(model.image_shape)}")
        return model.eval()


def read_config(path: Path) -> dict:
    """config.json as a dict with exactly CONFIG_KEYS (an unknown or missing key is a ValueError naming it)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model config (a model directory holds {CONFIG_FILE} and "
                                f"{WEIGHTS_FILE})")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a JSON model config: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    unknown, missing = sorted(set(config) - set(CONFIG_KEYS)), sorted(set(CONFIG_KEYS) - set(config))
    if unknown or missing:
        raise ValueError(f"{path}: unknown config keys {unknown}, missing config keys {missing}")
    if config["format"] != FORMAT or config["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{path}: format {config['format']!r} version {config['format_version']!r}, expected "
                         f"{FORMAT!r} version {FORMAT_VERSION}")
    return config


def read_weights(path: Path, expected: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, checked name by name and shape by shape against `expected`."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    try:
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {error}") from None
    unknown, missing = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
    if unknown or missing:
        raise ValueError(f"{path}: unexpected tensors {unknown[:5]}, missing tensors {missing[:5]}")
    for name, value in tensors.items():
        want = expected[name]
        if value.shape != want.shape or value.dtype != want.dtype:
            raise ValueError(f"{path}: tensor {name!r} is {value.dtype} {tuple(value.shape)}, the config needs "
                             f"{want.dtype} {tuple(want.shape)}")
    return tensors


def fetch_logged_model(model_uri: str, download: Callable[[str, str], str], tmp: str | Path) -> Path:
    """The model directory of the logged model at `model_uri`, fetched into `tmp` with `download(uri, dst) -> local
    path` (MLflow's download_artifacts): only `artifacts/MLFLOW_ARTIFACT`, not the pyfunc's other files. When that
    part cannot be fetched, the whole model is, and `logged_model_directory` names what it holds instead."""
    try:
        directory = Path(download(f"{model_uri.rstrip('/')}/artifacts/{MLFLOW_ARTIFACT}", str(Path(tmp) / "part")))
    except Exception:  # noqa: BLE001 — no such part: say what the model is instead
        directory = None
    if directory is not None and (directory / CONFIG_FILE).is_file():
        return directory
    return logged_model_directory(download(model_uri, str(Path(tmp) / "whole")), model_uri)


def logged_model_directory(root: str | Path, source: str) -> Path:
    """The model directory inside a downloaded MLflow model (`root`/artifacts/MLFLOW_ARTIFACT). Raises ValueError
    naming `source` when there is none (e.g. a pickled model of another flavour): nothing else in it is read."""
    root = Path(root)
    directory = root / "artifacts" / MLFLOW_ARTIFACT
    if not (directory / CONFIG_FILE).is_file():
        found = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())[:10]
        raise ValueError(f"{source} is not a raydiff model: it has no artifacts/{MLFLOW_ARTIFACT}/{CONFIG_FILE} "
                         f"(it holds {found}); raydiff loads only safetensors model directories, never pickles")
    return directory
