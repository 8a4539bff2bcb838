"""The import path `diffusion.guidance` of callers outside diffusion/ (the serving engine, the train loop, the model
package): classifier-free guidance lives in diffusion.samplers.guidance, the samplers' input type `Denoised` in
diffusion.samplers.base, label checks in diffusion.labels and label dropout (a training helper) in
diffusion.objectives. New code imports from those modules."""

from diffusion.labels import check_conditioning, num_classes_of
from diffusion.objectives import drop_labels
from diffusion.samplers.base import Denoised
from diffusion.samplers.guidance import denoise

__all__ = ["Denoised", "check_conditioning", "denoise", "drop_labels", "num_classes_of"]
