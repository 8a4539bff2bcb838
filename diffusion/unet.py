"""The DDPM U-Net (Ho et al. 2020, Appendix B): a PixelCNN++-style U-Net with ResBlocks, GroupNorm, a sinusoidal
time embedding added in every ResBlock, and single-head self-attention at chosen resolutions.

The default `UNetConfig` is the paper's CIFAR-10 model (35.7M parameters at 32×32×3).
Called as `model(x_t, t) -> eps_hat`, x_t: [B, C, H, W] float, t: [B] int64 in original timestep units. With
`learn_variance` the output has 2C channels, read by `diffusion.parameterization.model_prediction`. With
`num_classes` = K the model is class-conditional, `model(x_t, t, y)` with y: [B] int64 in [0, K]: a learned label
embedding (K + 1 rows, row K the "null" class of classifier-free guidance) is added to the time embedding;
y = None means the null class for every image.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from diffusion.labels import check_labels, null_labels

PRESETS: dict[str, dict] = {
    # The paper's CIFAR-10 model.
    "cifar10": dict(image_size=32, in_channels=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,)),
    # The embedded 8×8 digits on CPU (its size and speed: benchmarks/RESULTS.md).
    "small": dict(image_size=8, in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(4,),
                  dropout=0.1, norm_groups=8),
    # For tests: a few thousand parameters' worth of compute per image.
    "tiny": dict(image_size=8, in_channels=1, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                 dropout=0.0, norm_groups=4),
}


@dataclass(frozen=True)
class UNetConfig:
    image_size: int = 32
    in_channels: int = 3
    out_channels: int | None = None  # defaults to in_channels (ε has the image's shape)
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    norm_groups: int = 32
    learn_variance: bool = False  # doubles the output: the prediction, then the variance values (eq. 15, Improved DDPM)
    num_classes: int | None = None  # class-conditional with this many classes (+1 null class); None = unconditional
    # Layout options of other DDPM ports (diffusers' UNet2DModel names); the defaults are the DDPM paper's code.
    downsample_padding: int = 1  # 1: stride-2 conv padded 1 on every side; 0: padded right/bottom only (TF "SAME")
    norm_eps: float = 1e-5  # every GroupNorm's ε
    freq_shift: int = 1  # time embedding frequencies exp(−ln(10⁴) k / (half − freq_shift))
    flip_sin_to_cos: bool = False  # time embedding [cos, sin] instead of [sin, cos]

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
        if self.image_size % 2 ** (len(self.ch_mult) - 1):
            raise ValueError(f"image_size {self.image_size} is not divisible by 2^{len(self.ch_mult) - 1} (ch_mult levels)")
        if self.downsample_padding not in (0, 1):
            raise ValueError(f"downsample_padding must be 0 or 1, got {self.downsample_padding}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be a positive class count or None, got {self.num_classes}")
        for width in {self.ch * m for m in self.ch_mult}:
            if width % self.norm_groups:
                raise ValueError(f"channel width {width} is not divisible by norm_groups={self.norm_groups}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "UNetConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown U-Net preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict) -> "UNetConfig":
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown UNetConfig fields: {sorted(unknown)}")
        return cls(**values)

    @property
    def output_channels(self) -> int:
        """C_out = out_channels (or in_channels), twice that with learn_variance."""
        return (self.out_channels or self.in_channels) * (2 if self.learn_variance else 1)

    def to_dict(self) -> dict:
        values = asdict(self)
        values["ch_mult"] = list(self.ch_mult)
        values["attn_resolutions"] = list(self.attn_resolutions)
        return values


def timestep_embedding(t: torch.Tensor, dim: int, freq_shift: int = 1, flip_sin_to_cos: bool = False) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Vaswani et al. / DDPM): t [B] → [B, dim] float32."""
    half = dim // 2
    exponent = torch.arange(half, device=t.device, dtype=torch.float32) / (half - freq_shift)
    args = t.float()[:, None] * torch.exp(-math.log(10000.0) * exponent)[None]
    sin, cos = torch.sin(args), torch.cos(args)
    return torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=1)


def _zero(module: nn.Module) -> nn.Module:
    """Zero-initialise the last layer of a residual branch (DDPM's init_scale=0)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GN → SiLU → conv3 → (+ dense(temb)) → GN → SiLU → dropout → conv3, plus a 1×1 shortcut when widths differ."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float, groups: int, eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H·W positions, with a residual connection."""

    def __init__(self, ch: int, groups: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj_out = _zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).permute(1, 0, 3, 2).contiguous()  # (3, B, HW, C)
        q, k, v = qkv.unbind(0)  # each contiguous (B, HW, C): the fused SDPA kernels need a unit last stride
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, HW, C)
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, ch: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x if self.padding else F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """ResBlocks (each optionally followed by attention) at one resolution, then an optional resampler."""

    def __init__(self, blocks: list[ResBlock], attns: list[nn.Module], resample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList(attns)
        self.resample = resample


class UNet(nn.Module):
    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = config
        cfg = config
        ch, groups, eps, temb_ch = cfg.ch, cfg.norm_groups, cfg.norm_eps, 4 * cfg.ch
        self.temb = nn.Sequential(nn.Linear(ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        if cfg.num_classes is not None:  # row num_classes is the null class
            self.label_emb = nn.Embedding(cfg.num_classes + 1, temb_ch)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        def attn_or_id(width: int, res: int) -> nn.Module:
            return AttnBlock(width, groups, eps) if res in cfg.attn_resolutions else nn.Identity()

        skip_widths, width, res = [ch], ch, cfg.image_size
        self.down = nn.ModuleList()
        for level, mult in enumerate(cfg.ch_mult):
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(width, ch * mult, temb_ch, cfg.dropout, groups, eps))
                width = ch * mult
                attns.append(attn_or_id(width, res))
                skip_widths.append(width)
            last = level == len(cfg.ch_mult) - 1
            self.down.append(Level(blocks, attns, None if last else Downsample(width, cfg.downsample_padding)))
            if not last:
                skip_widths.append(width)
                res //= 2

        self.mid1 = ResBlock(width, width, temb_ch, cfg.dropout, groups, eps)
        self.mid_attn = AttnBlock(width, groups, eps)
        self.mid2 = ResBlock(width, width, temb_ch, cfg.dropout, groups, eps)

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.ch_mult))):
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock(width + skip_widths.pop(), ch * mult, temb_ch, cfg.dropout, groups, eps))
                width = ch * mult
                attns.append(attn_or_id(width, res))
            self.up.append(Level(blocks, attns, Upsample(width) if level > 0 else None))
            if level > 0:
                res *= 2

        self.norm_out = nn.GroupNorm(groups, width, eps)
        self.conv_out = _zero(nn.Conv2d(width, cfg.output_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, C, H, W], t: [B] int64, y: [B] int64 class labels (num_classes = null) or None (all null)
        → [B, config.output_channels, H, W] (ε̂, then the variance values if learned)."""
        assert x.ndim == 4 and t.shape == (x.shape[0],), f"expected x [B,C,H,W] and t [B], got {x.shape}, {t.shape}"
        temb = self.temb(timestep_embedding(t, self.config.ch, self.config.freq_shift,
                                                  self.config.flip_sin_to_cos).to(x.dtype))
        if self.config.num_classes is not None:
            temb = temb + self.label_emb(null_labels(self.config.num_classes, x.shape[0], x.device) if y is None
                                         else check_labels(y, self.config.num_classes, x.shape[0])).to(temb.dtype)
        elif y is not None:
            raise ValueError("class labels given to an unconditional model (UNetConfig.num_classes is None)")
        h = self.conv_in(x)
        skips = [h]
        for level in self.down:
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(h, temb))
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, temb)), temb)
        for level in self.up:
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(torch.cat([h, skips.pop()], dim=1), temb))
            if level.resample is not None:
                h = level.resample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
