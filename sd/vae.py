"""The variational autoencoder of Stable Diffusion v1 (AutoencoderKL, Rombach et al., 2022, sec. 3.1).

The encoder maps an image in [-1, 1] (B, 3, H, W) to a diagonal Gaussian over latents
(B, 4, H/8, W/8), returned as (mean, logvar); the decoder maps latents back to an image. Both are
stacks of GroupNorm residual blocks with one single-head self-attention block in the middle. The
latent scale factor (0.18215) belongs to the pipeline, not to this module.
Parameter names follow the `first_stage_model.` part of the CompVis checkpoint.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sd.attention import Attention, group_norm


@dataclass(frozen=True)
class VAEConfig:
    image_channels: int = 3
    latent_channels: int = 4
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2  # per encoder level; the decoder has one more
    eps: float = 1e-6
    norm_groups: int = 32  # GroupNorm groups; SD v1's 32 keep 4 channels per group at 128 channels
    logvar_range: tuple[float, float] = (-30.0, 20.0)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, plus a (1x1-projected when channels change) skip."""

    def __init__(self, cin: int, cout: int, cfg: VAEConfig):
        super().__init__()
        self.norm1 = group_norm(cin, cfg.eps, cfg.norm_groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = group_norm(cout, cfg.eps, cfg.norm_groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, cout, H, W)
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(Attention):
    """Single-head self-attention over all H*W positions; q, k, v and the output are 1x1 convs."""

    def __init__(self, channels: int, cfg: VAEConfig):
        super().__init__()
        self.norm = group_norm(channels, cfg.eps, cfg.norm_groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (conv(y).flatten(2).transpose(1, 2) for conv in (self.q, self.k, self.v))  # (B, HW, C)
        out = self.attend(q, k, v, heads=1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)  # (B, C, H, W)


class MidBlock(nn.Module):
    def __init__(self, channels: int, cfg: VAEConfig):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, cfg)
        self.attn_1 = AttnBlock(channels, cfg)
        self.block_2 = ResnetBlock(channels, channels, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding right and bottom by one (asymmetric, as trained)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class Level(nn.Module):
    """One resolution level: residual blocks, then an optional down- or upsampler."""

    def __init__(self, cin: int, cout: int, blocks: int, cfg: VAEConfig, resample: type[nn.Module] | None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout, cfg) for i in range(blocks))
        if resample is not None:
            setattr(self, resample.__name__.lower(), resample(cout))
        self.resample = resample.__name__.lower() if resample is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return getattr(self, self.resample)(x) if self.resample else x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]  # [128, 256, 512, 512]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(cfg.image_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList(
            Level(widths[max(i - 1, 0)], w, cfg.num_res_blocks, cfg, Downsample if i < last else None)
            for i, w in enumerate(widths))
        self.mid = MidBlock(widths[-1], cfg)
        self.norm_out = group_norm(widths[-1], cfg.eps, cfg.norm_groups)
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, 128, H, W)
        for level in self.down:
            h = level(h)  # (B, 512, H/8, W/8) after the last level
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 8, H/8, W/8)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1], cfg)
        # up[i] works at the resolution of encoder level i; they run from the last level to the first.
        self.up = nn.ModuleList(
            Level(widths[min(i + 1, len(widths) - 1)], w, cfg.num_res_blocks + 1, cfg, Upsample if i > 0 else None)
            for i, w in enumerate(widths))
        self.norm_out = group_norm(widths[0], cfg.eps, cfg.norm_groups)
        self.conv_out = nn.Conv2d(widths[0], cfg.image_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # (B, 512, h, w)
        for level in reversed(self.up):
            h = level(h)  # (B, 128, 8h, 8w) after the last level
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, 8h, 8w)


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image in [-1, 1] (B, 3, H, W) -> (mean, logvar), each (B, 4, H/8, W/8), unscaled."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)  # 2 x (B, 4, H/8, W/8)
        return mean, logvar.clamp(*self.config.logvar_range)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, 4, h, w) -> image (B, 3, 8h, 8w), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def decode_tiled(self, z: torch.Tensor, tile: int = 64, overlap: int = 16) -> torch.Tensor:
        """`decode` in overlapping tiles of tile x tile latents, cross-faded where they overlap, so memory
        stays that of one tile whatever the image size. Not identical to `decode`: the mid-block
        attention sees one tile at a time, and the cross-fade hides the seams."""
        b, _, h, w = z.shape
        if h <= tile and w <= tile:
            return self.decode(z)
        f = 2 ** (len(self.config.channel_mult) - 1)  # image pixels per latent pixel
        out = torch.zeros(b, self.config.image_channels, h * f, w * f, dtype=z.dtype, device=z.device)
        weight = torch.zeros(1, 1, h * f, w * f, dtype=z.dtype, device=z.device)
        for y in tile_starts(h, tile, overlap):
            for x in tile_starts(w, tile, overlap):
                piece = self.decode(z[:, :, y:y + tile, x:x + tile])  # (B, 3, f*th, f*tw)
                ramp = crossfade(piece.shape[2], overlap * f, z)[:, None] * crossfade(piece.shape[3], overlap * f, z)
                out[:, :, y * f:y * f + piece.shape[2], x * f:x * f + piece.shape[3]] += piece * ramp
                weight[:, :, y * f:y * f + piece.shape[2], x * f:x * f + piece.shape[3]] += ramp
        return out / weight  # (B, 3, 8h, 8w)


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Offsets of tiles of length `tile` that cover [0, size), neighbours overlapping by >= `overlap`."""
    starts = list(range(0, max(size - tile, 0) + 1, tile - overlap))
    return starts if starts[-1] + tile >= size else starts + [size - tile]


def crossfade(length: int, ramp: int, like: torch.Tensor) -> torch.Tensor:
    """Weights (length,) rising linearly over `ramp` samples at both ends, 1 in between, never 0."""
    i = torch.arange(length, dtype=like.dtype, device=like.device)
    return torch.minimum((i + 1) / (ramp + 1), (length - i) / (ramp + 1)).clamp(max=1.0)
