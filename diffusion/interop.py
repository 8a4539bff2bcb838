"""Two-way conversion between a `DiffusionModel` and a diffusers `UNet2DModel` of the DDPM architecture (the layout
of the paper's converted checkpoints, e.g. `google/ddpm-cifar10-32`) with its `DDPMScheduler` config.

    model = from_diffusers(unet2d, scheduler.config)      # → DiffusionModel, ε identical to float32 precision
    unet2d, scheduler = to_diffusers(model)                # → (UNet2DModel, DDPMScheduler)

The networks are the same function, parameter for parameter: our ResBlock is diffusers' ResnetBlock2D, our
single-head AttnBlock (a 1×1 qkv conv) is diffusers' Attention with heads = 1 (three linear maps), our levels are its
down/up blocks. Options without a counterpart here are refused with an error naming the option. diffusers is an
optional dependency (the `interop` extra), imported only when these functions are called.
"""

from __future__ import annotations

import math

import torch

from diffusion.packaged import DiffusionModel
from diffusion.unet import UNet, UNetConfig

PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
# diffusers UNet2DModel options that must hold these values for the DDPM layout (anything else cannot be mapped).
REQUIRED_UNET = {"center_input_sample": False, "time_embedding_type": "positional", "time_embedding_dim": None,
                 "mid_block_type": "UNetMidBlock2D", "mid_block_scale_factor": 1, "downsample_type": "conv",
                 "upsample_type": "conv", "act_fn": "silu", "attention_head_dim": None, "attn_norm_num_groups": None,
                 "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
                 "num_class_embeds": None}
REQUIRED_SCHEDULER = {"trained_betas": None}


class UnsupportedOption(ValueError):
    """A diffusers option (or a raydiff model feature) that has no counterpart on the other side."""


def _refuse(option: str, value, wanted) -> None:
    raise UnsupportedOption(f"cannot map {option}={value!r}: the DDPM layout needs {option}={wanted!r}")


def _unet_config(config) -> UNetConfig:
    """diffusers UNet2DModel config → UNetConfig (raises UnsupportedOption naming what cannot be mapped)."""
    for option, wanted in REQUIRED_UNET.items():
        if config.get(option, wanted) != wanted:
            _refuse(option, config[option], wanted)
    widths = list(config["block_out_channels"])
    ch = widths[0]
    if any(width % ch for width in widths):
        _refuse("block_out_channels", widths, "multiples of the first width")
    size = config["sample_size"]
    size = size if isinstance(size, int) else (size[0] if size[0] == size[1] else _refuse("sample_size", size, "square"))
    down_attn = [kind == "AttnDownBlock2D" for kind in config["down_block_types"]]
    for option, kinds, plain, attn in (("down_block_types", config["down_block_types"], "DownBlock2D", "AttnDownBlock2D"),
                                       ("up_block_types", config["up_block_types"], "UpBlock2D", "AttnUpBlock2D")):
        if any(kind not in (plain, attn) for kind in kinds) or len(kinds) != len(widths):
            _refuse(option, kinds, f"{len(widths)} of {plain}/{attn}")
    if [kind == "AttnUpBlock2D" for kind in config["up_block_types"]] != down_attn[::-1]:
        _refuse("up_block_types", config["up_block_types"], "attention at the resolutions of down_block_types")
    in_ch, out_ch = config["in_channels"], config["out_channels"]
    if out_ch not in (in_ch, 2 * in_ch):
        _refuse("out_channels", out_ch, f"{in_ch} or {2 * in_ch} (learned variance)")
    return UNetConfig(image_size=size, in_channels=in_ch, ch=ch, ch_mult=tuple(w // ch for w in widths),
                      num_res_blocks=config["layers_per_block"],
                      attn_resolutions=tuple(size // 2 ** level for level, attn in enumerate(down_attn) if attn),
                      dropout=config["dropout"], norm_groups=config["norm_num_groups"], learn_variance=out_ch != in_ch,
                      downsample_padding=config["downsample_padding"], norm_eps=config["norm_eps"],
                      freq_shift=config["freq_shift"], flip_sin_to_cos=config["flip_sin_to_cos"])


def _schedule(scheduler_config, learn_variance: bool) -> dict:
    """DDPMScheduler config → DiffusionModel keyword arguments (schedule, num_timesteps, prediction, zero SNR)."""
    for option, wanted in REQUIRED_SCHEDULER.items():
        if scheduler_config.get(option, wanted) != wanted:
            _refuse(option, scheduler_config[option], wanted)
    T = scheduler_config.get("num_train_timesteps", 1000)
    kind = scheduler_config.get("beta_schedule", "linear")
    if kind == "linear":
        scale = 1000 / T  # diffusion.schedule.NoiseSchedule.from_name("linear", T)
        for option, wanted in (("beta_start", 1e-4 * scale), ("beta_end", 0.02 * scale)):
            if not math.isclose(scheduler_config.get(option, wanted), wanted, rel_tol=1e-6):
                _refuse(option, scheduler_config[option], wanted)
    elif kind != "squaredcos_cap_v2":
        _refuse("beta_schedule", kind, "linear or squaredcos_cap_v2")
    prediction = scheduler_config.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        _refuse("prediction_type", prediction, sorted(PREDICTIONS))
    variance = scheduler_config.get("variance_type", "fixed_small")
    if (variance == "learned_range") != learn_variance:
        _refuse("variance_type", variance, "learned_range exactly when out_channels is twice in_channels")
    return {"schedule": "linear" if kind == "linear" else "cosine", "num_timesteps": T,
            "prediction": PREDICTIONS[prediction],
            "zero_terminal_snr": bool(scheduler_config.get("rescale_betas_zero_snr", False))}


def _renames(config: UNetConfig) -> dict[str, str]:
    """Our module prefix → diffusers' module prefix, for every block of the network."""
    names = {"temb.0": "time_embedding.linear_1", "temb.2": "time_embedding.linear_2", "conv_in": "conv_in",
             "norm_out": "conv_norm_out", "conv_out": "conv_out", "mid1": "mid_block.resnets.0",
             "mid_attn": "mid_block.attentions.0", "mid2": "mid_block.resnets.1"}
    levels = len(config.ch_mult)
    for level in range(levels):
        for i in range(config.num_res_blocks):
            names[f"down.{level}.blocks.{i}"] = f"down_blocks.{level}.resnets.{i}"
            names[f"down.{level}.attns.{i}"] = f"down_blocks.{level}.attentions.{i}"
        names[f"down.{level}.resample"] = f"down_blocks.{level}.downsamplers.0"
        for i in range(config.num_res_blocks + 1):
            names[f"up.{level}.blocks.{i}"] = f"up_blocks.{level}.resnets.{i}"
            names[f"up.{level}.attns.{i}"] = f"up_blocks.{level}.attentions.{i}"
        names[f"up.{level}.resample"] = f"up_blocks.{level}.upsamplers.0"
    return names


LEAVES = {"temb_proj": "time_emb_proj", "shortcut": "conv_shortcut", "norm": "group_norm", "proj_out": "to_out.0"}


def _name_map(config: UNetConfig, names) -> dict[str, list[str]]:
    """Our parameter name → diffusers' name(s); an attention's qkv conv maps to to_q, to_k and to_v."""
    renames, mapping = _renames(config), {}
    for name in names:
        module, kind = name.rsplit(".", 1)
        if module in renames:  # a top-level layer (conv_in, temb.0, …)
            mapping[name] = [f"{renames[module]}.{kind}"]
            continue
        module, leaf = module.rsplit(".", 1)
        if leaf == "qkv":
            mapping[name] = [f"{renames[module]}.{part}.{kind}" for part in ("to_q", "to_k", "to_v")]
        else:
            mapping[name] = [f"{renames[module]}.{LEAVES.get(leaf, leaf)}.{kind}"]
    return mapping


def _convert(source: dict, target: dict, mapping: dict[str, list[str]], to_diffusers: bool) -> dict:
    """Tensors of `source` in `target`'s names and shapes (a 1×1 conv ↔ a linear map is a reshape; qkv splits
    along its output channels into q, k, v)."""
    out = {}
    for ours, theirs in mapping.items():
        if to_diffusers:
            for name, part in zip(theirs, source[ours].chunk(len(theirs), dim=0)):
                out[name] = part.reshape(target[name].shape).clone()
        else:
            out[ours] = torch.cat([source[name] for name in theirs], dim=0).reshape(target[ours].shape).clone()
    return out


def from_diffusers(unet2d, scheduler_config) -> DiffusionModel:
    """A diffusers UNet2DModel of the DDPM layout and its scheduler's config (dict or FrozenDict) → an equivalent
    DiffusionModel in eval mode. Raises UnsupportedOption naming an option that cannot be mapped."""
    config = _unet_config(dict(unet2d.config))
    unet = UNet(config)
    ours = unet.state_dict()
    theirs = unet2d.state_dict()
    mapping = _name_map(config, ours)
    expected = {name for names in mapping.values() for name in names}
    if expected != set(theirs):
        raise UnsupportedOption(f"UNet2DModel parameters do not match the DDPM layout: unexpected "
                                f"{sorted(set(theirs) - expected)[:5]}, missing {sorted(expected - set(theirs))[:5]}")
    unet.load_state_dict(_convert(theirs, ours, mapping, to_diffusers=False))
    kwargs = _schedule(dict(scheduler_config), config.learn_variance)
    return DiffusionModel(unet, metadata={"source": "diffusers"}, **kwargs).eval()


def to_diffusers(model: DiffusionModel):
    """A DiffusionModel → (diffusers UNet2DModel, DDPMScheduler) computing the same ε. Raises UnsupportedOption for
    what diffusers' DDPM layout cannot express (a class-conditional model)."""
    from diffusers import DDPMScheduler, UNet2DModel

    config = model.config
    if config.num_classes is not None:
        _refuse("num_classes", config.num_classes, None)
    attn = [config.image_size // 2 ** level in config.attn_resolutions for level in range(len(config.ch_mult))]
    unet2d = UNet2DModel(
        sample_size=config.image_size, in_channels=config.in_channels, out_channels=config.output_channels,
        block_out_channels=tuple(config.ch * m for m in config.ch_mult), layers_per_block=config.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in attn[::-1]),
        dropout=config.dropout, norm_num_groups=config.norm_groups, norm_eps=config.norm_eps,
        downsample_padding=config.downsample_padding, freq_shift=config.freq_shift,
        flip_sin_to_cos=config.flip_sin_to_cos, attention_head_dim=None)
    theirs = unet2d.state_dict()
    ours = model.unet.state_dict()
    unet2d.load_state_dict(_convert(ours, theirs, _name_map(config, ours), to_diffusers=True))
    betas = model.schedule().betas
    schedule = ({"beta_schedule": "linear", "beta_start": float(betas[0]), "beta_end": float(betas[-1])}
                if model.schedule_name == "linear" else {"beta_schedule": "squaredcos_cap_v2"})
    scheduler = DDPMScheduler(num_train_timesteps=model.num_timesteps, **schedule,
                              prediction_type={v: k for k, v in PREDICTIONS.items()}[model.prediction],
                              variance_type="learned_range" if config.learn_variance else "fixed_small",
                              rescale_betas_zero_snr=model.zero_terminal_snr)
    return unet2d.eval(), scheduler


def load_diffusers_dir(directory) -> DiffusionModel:
    """A local diffusers DDPM directory (a pipeline with unet/ and scheduler/, as on the hub) → DiffusionModel.
    Weights are read from safetensors only (a directory with only pickled .bin weights is refused by diffusers)."""
    from diffusers import DDPMScheduler, UNet2DModel

    unet2d = UNet2DModel.from_pretrained(directory, subfolder="unet", use_safetensors=True)
    return from_diffusers(unet2d, DDPMScheduler.load_config(directory, subfolder="scheduler"))


def save_diffusers_dir(model: DiffusionModel, directory) -> None:
    """Write `model` as a diffusers DDPMPipeline directory (safetensors) that DDPMPipeline.from_pretrained loads."""
    from diffusers import DDPMPipeline

    unet2d, scheduler = to_diffusers(model)
    DDPMPipeline(unet=unet2d, scheduler=scheduler).save_pretrained(directory, safe_serialization=True)
