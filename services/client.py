"""A small Python client for the raydiff HTTP API.

    client = SamplerClient("http://127.0.0.1:8000")
    result = client.samples(sampler="ddim", steps=50, num_images=16, seed=0)
    result.save_grid("grid.png"); result.images  # uint8 [N, H, W, C]
    client.samples(num_images=8, class_labels="seven", guidance_scale=3.0)  # a class-conditional model
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import requests
from PIL import Image

from services import codec


# Class labels of a request: one class index or name for all images, or a sequence of one per image.
Labels = int | str | Sequence[int | str] | None


class APIError(RuntimeError):
    """A non-2xx answer; `status` is the HTTP status and `message` the server's message (naming the field)."""

    def __init__(self, status: int, message: str, body: Any = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message, self.body = status, message, body


def _png_to_array(data: str) -> np.ndarray:
    """base64 PNG → uint8 [H, W, C]."""
    with Image.open(io.BytesIO(base64.b64decode(data))) as image:
        pixels = np.asarray(image)
    return pixels[..., None] if pixels.ndim == 2 else pixels


@dataclass
class SampleResult:
    response: dict

    @property
    def format(self) -> str:
        return self.response["format"]

    @property
    def seed(self) -> int:
        return self.response["seed"]

    @property
    def images(self) -> np.ndarray:
        """uint8 [N, H, W, C] (png, npy); for grid, the grid itself as [1, H, W, C]."""
        if self.format == "npy":
            return codec.to_uint8(self.array)
        return np.stack([_png_to_array(item) for item in self.response["images"]])

    @property
    def array(self) -> np.ndarray:
        """npy format only: the float32 samples [N, C, H, W] in [−1, 1]."""
        if self.format != "npy":
            raise ValueError(f"float samples come only with format='npy', this result is {self.format!r}")
        return codec.load_npy(base64.b64decode(self.response["images"][0]))

    def png_bytes(self) -> list[bytes]:
        if self.format == "npy":
            raise ValueError("format='npy' has no PNGs")
        return [base64.b64decode(item) for item in self.response["images"]]

    def save_grid(self, path: str | Path, nrow: int | None = None) -> Path:
        """Write a PNG grid of the samples (the server's grid as is, else one built here)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.format == "grid":
            path.write_bytes(self.png_bytes()[0])
        else:
            u = self.images.astype(np.float32) / 127.5 - 1.0  # back to [−1, 1] for the grid helper, [N, C, H, W]
            path.write_bytes(codec.grid_png(u.transpose(0, 3, 1, 2), nrow))
        return path


class SamplerClient:
    def __init__(self, url: str, timeout: float = 600.0, session: requests.Session | None = None):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = session or requests.Session()

    def _request(self, method: str, path: str, **kwargs) -> dict | list:
        response = self.session.request(method, self.url + path, timeout=kwargs.pop("timeout", self.timeout), **kwargs)
        if not response.ok:
            try:
                body = response.json()
                message = body.get("message") or str(body.get("detail"))
            except ValueError:
                body, message = response.text, response.text[:500]
            raise APIError(response.status_code, message, body)
        return response.json()

    def healthy(self) -> bool:
        try:
            return self.session.get(self.url + "/healthz", timeout=10).status_code == 200
        except requests.RequestException:
            return False

    def ready(self) -> bool:
        try:
            return self.session.get(self.url + "/readyz", timeout=30).status_code == 200
        except requests.RequestException:
            return False

    def models(self) -> list[dict]:
        return self._request("GET", "/v1/models")

    @staticmethod
    def samples_body(sampler: str = "ddim", steps: int | None = None, num_images: int = 1, seed: int | None = None,
                     eta: float = 0.0, format: str = "png", clip_denoised: bool = True,
                     nrow: int | None = None, class_labels: Labels = None, guidance_scale: float | None = None,
                     **options) -> dict:
        """The request body; `options` are further sampler options by request field (variance, spacing, ...),
        None meaning the sampler's default. A class-conditional model takes `class_labels` (a class index or name
        for all images, or a list of one per image) and a classifier-free `guidance_scale` (1: none)."""
        body: dict[str, Any] = {"sampler": sampler, "num_images": num_images, "format": format,
                                "clip_denoised": clip_denoised}
        if class_labels is not None:
            body["class_labels"] = [class_labels] if isinstance(class_labels, (int, str)) else list(class_labels)
        for key, value in (("steps", steps), ("seed", seed), ("nrow", nrow), ("guidance_scale", guidance_scale),
                           *options.items()):
            if value is not None:
                body[key] = value
        if eta:
            body["eta"] = float(eta)
        return body

    def samples(self, sampler: str = "ddim", steps: int | None = None, num_images: int = 1, seed: int | None = None,
                eta: float = 0.0, format: str = "png", clip_denoised: bool = True,
                nrow: int | None = None, class_labels: Labels = None, guidance_scale: float | None = None,
                **options) -> SampleResult:
        """POST /v1/samples with any registered sampler and its options (see `samples_body`). steps None: the
        sampler's default; seed None: random; class_labels None: unconditional."""
        body = self.samples_body(sampler, steps, num_images, seed, eta, format, clip_denoised, nrow, class_labels,
                                 guidance_scale, **options)
        return SampleResult(self._request("POST", "/v1/samples", json=body))

    def samples_stream(self, progress=None, **kwargs) -> SampleResult:
        """Like `samples` (same keyword arguments) through /v1/samples/stream; `progress(step, of)` is called
        after each step."""
        body = self.samples_body(**kwargs)
        with self.session.post(self.url + "/v1/samples/stream", json=body, stream=True, timeout=self.timeout) as r:
            if not r.ok:
                payload = r.json()
                raise APIError(r.status_code, payload.get("message", str(payload)), payload)
            for line in r.iter_lines():
                if not line:
                    continue
                event = json.loads(line)
                if event["event"] == "progress" and progress is not None:
                    progress(event["step"], event["of"])
                elif event["event"] == "result":
                    event.pop("event")
                    return SampleResult(event)
                elif event["event"] == "error":
                    raise APIError(r.status_code, event["message"], event)
        raise APIError(r.status_code, "stream ended without a result")

    @staticmethod
    def _encode(image) -> str:
        """A path, PNG/JPEG bytes, a PIL image or a uint8 array [H, W] / [H, W, C] → base64 PNG."""
        if isinstance(image, (str, Path)):
            return base64.b64encode(Path(image).read_bytes()).decode()
        if isinstance(image, bytes):
            return base64.b64encode(image).decode()
        if isinstance(image, np.ndarray):
            array = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
            image = Image.fromarray(array.astype(np.uint8))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    def likelihood(self, images: list, seed: int = 0) -> dict:
        """ELBO bits/dim per image ({bits_per_dim: [...], mean_bits_per_dim, ...})."""
        return self._request("POST", "/v1/likelihood", json={"images": [self._encode(i) for i in images], "seed": seed})

    def interpolate(self, image_a, image_b, num_points: int = 8, steps: int = 50, format: str = "grid",
                    clip_denoised: bool = False) -> SampleResult:
        body = {"images": [self._encode(image_a), self._encode(image_b)], "num_points": num_points, "steps": steps,
                "format": format, "clip_denoised": clip_denoised}
        return SampleResult(self._request("POST", "/v1/interpolate", json=body))
