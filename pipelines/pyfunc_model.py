"""The MLflow models-from-code file of a raydiff model (`pipelines.modelstore.log_model` logs it): MLflow copies
this file into the model and runs it at load time, so nothing in the logged model is a pickle. The weights are the
`diffusion_model` artifact, a `DiffusionModel.save_pretrained` directory.

`mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"num_samples": [n]}), params={...})` → float32 images
[n, C, H, W] in [−1, 1]. Params: sampler (a diffusion.samplers name), steps, seed, labels (n class indices for a
conditional model; [] for the null class) and guidance (classifier-free guidance scale, 1 = plain conditional).
"""

from __future__ import annotations

import mlflow
import numpy as np
import torch

from diffusion.packaged import MLFLOW_ARTIFACT, DiffusionModel
from diffusion.samplers import sample


class DiffusionPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.model = DiffusionModel.from_pretrained(context.artifacts[MLFLOW_ARTIFACT])

    def predict(self, context, model_input, params: dict | None = None) -> np.ndarray:
        params = params or {}
        count = int(np.asarray(model_input["num_samples"]).sum())
        labels = list(params.get("labels") or [])
        if labels and len(labels) != count:
            raise ValueError(f"params.labels has {len(labels)} entries for num_samples={count}")
        y = torch.tensor(labels, dtype=torch.long) if labels else None
        generator = torch.Generator().manual_seed(int(params.get("seed", 0)))
        with torch.no_grad():
            images = sample(self.model, self.model.schedule(), (count, *self.model.image_shape),
                            sampler=str(params.get("sampler", "ddim")), steps=int(params.get("steps", 50)),
                            generator=generator, y=y, guidance_scale=float(params.get("guidance", 1.0)))
        return images.clamp(-1, 1).numpy().astype(np.float32)


mlflow.models.set_model(DiffusionPyfunc())
