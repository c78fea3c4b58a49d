"""The denoising UNet of Stable Diffusion (Rombach et al., 2022, sec. 3.3 and appendix).

A convolutional UNet (Ronneberger et al., 2015) over latents, predicting the noise epsilon added at
timestep t, conditioned on the text through cross-attention "spatial transformers" at the three
highest resolutions and in the middle. latents (B, 4, h, w), timesteps (B,) or scalar, and a
`Conditioning`: context (B, 77, 768) -> noise prediction (B, 4, h, w). The inpainting model takes
the mask and the masked image's latents as 5 more input channels (`Conditioning.concat`); SDXL adds
a global vector to the timestep embedding through `label_emb` (`Conditioning.vector`). Parameter
names follow `model.diffusion_model.` of the CompVis checkpoint, whose input_blocks / middle_block /
output_blocks layout is kept as is.

What SD 2.x and SDXL change is configuration (`UNetConfig`): the transformer depth per level, heads
of 64 channels instead of a head count, Linear instead of 1x1-conv `proj_in`/`proj_out`, `label_emb`.

DeepCache (Ma et al., CVPR 2024) is built in: adjacent denoising steps change the deep features of the
UNet little, so a step may reuse the up path's features from the last full step and compute only the
shallow branch around one skip connection (`DeepCache`). Token merging (`sd.token_merging`) is too;
both travel in one `Speedups`.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sd.attention import Attention, group_norm
from sd.checkpointing import call
from sd.conditioning import Conditioning
from sd.token_merging import TokenMerge, TokenMerging


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (0, 1, 2)  # levels with cross-attention (and the middle block)
    num_heads: int = 8
    head_channels: int | None = None  # heads of this many channels instead of `num_heads` (SD 2.x, SDXL: 64)
    context_dim: int = 768
    transformer_depth: int | tuple[int, ...] = 1  # blocks per spatial transformer: one for all, or one per level
    transformer_depth_middle: int | None = None  # the middle block's; None: the largest of the levels'
    linear_proj: bool = False  # proj_in/proj_out as Linear layers (SD 2.x, SDXL) instead of 1x1 convolutions
    adm_in_channels: int | None = None  # width of the vector `label_emb` adds to the time embedding (SDXL: 2816)
    max_period: float = 10000.0
    res_eps: float = 1e-5
    transformer_norm_eps: float = 1e-6
    norm_groups: int = 32  # GroupNorm groups (10 channels per group at SD v1's 320)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    def depth(self, level: int) -> int:
        """Transformer blocks in each spatial transformer of `level`."""
        return self.transformer_depth if isinstance(self.transformer_depth, int) else self.transformer_depth[level]

    @property
    def middle_depth(self) -> int:
        if self.transformer_depth_middle is not None:
            return self.transformer_depth_middle
        return max(self.depth(level) for level in range(len(self.channel_mult)))

    def heads(self, channels: int) -> int:
        """Attention heads of a transformer `channels` wide."""
        return channels // self.head_channels if self.head_channels else self.num_heads


def frequencies(dim: int, max_period: float, device: torch.device) -> torch.Tensor:
    """The dim/2 frequencies of the sinusoidal timestep embedding, from 1 down to ~1/max_period."""
    half = dim // 2
    return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=device) / half)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float) -> torch.Tensor:
    """Sinusoidal embedding of timesteps (B,) -> (B, dim), cosines first (as in the CompVis code)."""
    args = t.float()[:, None] * frequencies(dim, max_period, t.device)[None]  # (B, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, add the projected time embedding, GroupNorm -> SiLU -> conv, skip."""

    def __init__(self, cin: int, cout: int, cfg: UNetConfig):
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(cin, cfg.res_eps, cfg.norm_groups), nn.SiLU(),
                                       nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(cfg.time_embed_dim, cout))
        self.out_layers = nn.Sequential(group_norm(cout, cfg.res_eps, cfg.norm_groups), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(cout, cout, 3, padding=1))
        self.skip_connection = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)  # (B, cout, h, w)
        h = h + self.emb_layers(emb)[:, :, None, None]  # + (B, cout, 1, 1)
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(Attention):
    """Multi-head attention from image tokens to `context` (self-attention when context is None)."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context  # (B, M, context_dim)
        out = self.attend(self.to_q(x), self.to_k(context), self.to_v(context), self.heads)
        return self.to_out(out)  # (B, N, dim)


class GEGLU(nn.Module):
    """Gated GELU (Shazeer, 2020): one projection to twice the width, half of it gating the other."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)  # 2 x (B, N, inner)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Dropout(0.0), nn.Linear(mult * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text, feed-forward; each pre-LayerNorm and residual."""

    def __init__(self, dim: int, cfg: UNetConfig):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, cfg.heads(dim))
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, cfg.context_dim, cfg.heads(dim))
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, merge: TokenMerge | None = None) -> torch.Tensor:
        """With `merge`, self-attention runs over the merged tokens (token merging)."""
        h = self.norm1(x)  # (B, hw, C)
        x = x + (merge.unmerge(self.attn1(merge.merge(h))) if merge is not None else self.attn1(h))  # (B, hw, C)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm and a projection in (a 1x1 conv, or a Linear layer on the tokens), `depth` transformer
    blocks over the h*w positions, a projection out, residual. `downsample`: how many times smaller its grid is
    than that of the UNet's highest-resolution transformers (token merging's bound): the latents' grid in SD 1.x
    and 2.x, half of it in SDXL, which has no attention at its first level."""

    def __init__(self, channels: int, cfg: UNetConfig, downsample: int, depth: int):
        super().__init__()
        self.downsample = downsample
        self.linear_proj = cfg.linear_proj
        self.norm = group_norm(channels, cfg.transformer_norm_eps, cfg.norm_groups)
        self.proj_in = nn.Linear(channels, channels) if cfg.linear_proj else nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(BasicTransformerBlock(channels, cfg) for _ in range(depth))
        self.proj_out = nn.Linear(channels, channels) if cfg.linear_proj else nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                token_merging: TokenMerging | None = None) -> torch.Tensor:
        h, w = x.shape[-2:]
        merges = token_merging is not None and self.downsample <= token_merging.max_downsample
        y = self.norm(x)  # (B, C, h, w)
        y = self.proj_in(tokens(y)) if self.linear_proj else tokens(self.proj_in(y))  # (B, hw, C)
        for block in self.transformer_blocks:
            y = block(y, context, token_merging.matching(y, h, w) if merges else None)
        y = grid(self.proj_out(y), h, w) if self.linear_proj else self.proj_out(grid(y, h, w))  # (B, C, h, w)
        return x + y


def tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, hw, C), positions in raster order."""
    return x.flatten(2).transpose(1, 2)


def grid(y: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, hw, C) -> (B, C, h, w): the inverse of `tokens`."""
    return y.transpose(1, 2).reshape(y.shape[0], y.shape[2], h, w)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)  # (B, C, h/2, w/2)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        """Nearest-neighbour upsampling to `size`, the skip's (2h, 2w), or one less where a downsampler
        rounded an odd size up; then a 3x3 conv."""
        return self.conv(F.interpolate(x, size=size, mode="nearest"))  # (B, C, ~2h, ~2w)


class TimestepSequential(nn.Sequential):
    """A sequence of layers, each given what it needs: ResBlocks the time embedding, transformers the
    text (and token merging), upsamplers the size of the skip connection they lead to."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, skip_size: torch.Size | None = None,
                token_merging: TokenMerging | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, token_merging)
            elif isinstance(layer, Upsample):
                x = layer(x, skip_size)
            else:
                x = layer(x)
        return x


@dataclass
class DeepCache:
    """What a denoising run reuses between UNet calls. `branch` b names the skip connection the shallow
    branch ends at: input_blocks[0..b] and output_blocks[-(b+1):] run, and the up path's features
    entering output_blocks[-(b+1)] come from the last full call (b = 0: only the outermost blocks run,
    the paper's default). `reuse` says whether the next call is a shallow one."""

    interval: int = 3  # a full call every `interval` steps (the paper's uniform schedule), shallow ones between
    branch: int = 0
    reuse: bool = False
    features: torch.Tensor | None = None  # (B, C, h', w') from the last full call


@dataclass(frozen=True)
class Speedups:
    """Approximations a UNet call may take to run faster; None: that one is off."""

    deep_cache: DeepCache | None = None  # the state of a DeepCache run (this call is full or shallow)
    token_merging: TokenMerging | None = None  # merge tokens before self-attention (`sd.token_merging`)


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = cfg
        ch, temb = cfg.model_channels, cfg.time_embed_dim
        self.time_embed = nn.Sequential(nn.Linear(ch, temb), nn.SiLU(), nn.Linear(temb, temb))
        # SDXL's vector conditioning, embedded like the timestep (CompVis keys label_emb.0.0 / label_emb.0.2)
        self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(cfg.adm_in_channels, temb), nn.SiLU(),
                                                     nn.Linear(temb, temb))) if cfg.adm_in_channels else None

        # Down path: after the input conv, each level has res blocks (with attention on attention_levels)
        # and, except the last, a downsampler. Every entry's output is kept as a skip for the up path.
        self.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        cur = ch
        last = len(cfg.channel_mult) - 1
        top = min(cfg.attention_levels, default=last)  # the level of the highest-resolution transformers
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(cur, mult * ch, cfg)]
                cur = mult * ch
                if level in cfg.attention_levels:
                    layers.append(SpatialTransformer(cur, cfg, 2 ** (level - top), cfg.depth(level)))
                self.input_blocks.append(TimestepSequential(*layers))
                skip_channels.append(cur)
            if level != last:
                self.input_blocks.append(TimestepSequential(Downsample(cur)))
                skip_channels.append(cur)

        self.middle_block = TimestepSequential(ResBlock(cur, cur, cfg),
                                               SpatialTransformer(cur, cfg, 2 ** (last - top), cfg.middle_depth),
                                               ResBlock(cur, cur, cfg))

        # Up path: mirror image, one more res block per level, each consuming one skip connection.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(cur + skip_channels.pop(), mult * ch, cfg)]
                cur = mult * ch
                if level in cfg.attention_levels:
                    layers.append(SpatialTransformer(cur, cfg, 2 ** (level - top), cfg.depth(level)))
                if level != 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(cur))
                self.output_blocks.append(TimestepSequential(*layers))

        self.out = nn.Sequential(group_norm(ch, cfg.res_eps, cfg.norm_groups), nn.SiLU(),
                                 nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor | float, cond: Conditioning | torch.Tensor, *,
                speedups: Speedups | None = None) -> torch.Tensor:
        """`cond`: what the UNet is conditioned on, or its context tensor alone (`Conditioning(context)`);
        `speedups`: DeepCache and token merging, when a run uses them."""
        cond = cond if isinstance(cond, Conditioning) else Conditioning(cond)
        speedups = speedups or Speedups()
        deep_cache, token_merging = speedups.deep_cache, speedups.token_merging
        context = cond.context  # (B, 77, 768)
        if cond.concat is not None:
            latents = torch.cat([latents, cond.concat], dim=1)  # (B, 4 + c, h, w)
        t = torch.as_tensor(timesteps, device=latents.device).reshape(-1).expand(latents.shape[0])  # (B,)
        t_emb = timestep_embedding(t, self.config.model_channels, self.config.max_period).to(latents.dtype)
        emb = self.time_embed(t_emb)  # (B, 1280)
        if (cond.vector is None) != (self.label_emb is None):
            raise ValueError(f"this UNet (adm_in_channels={self.config.adm_in_channels}) takes "
                             f"{'a' if self.label_emb is not None else 'no'} conditioning vector, and the "
                             f"Conditioning has {'none' if cond.vector is None else 'one'}")
        if cond.vector is not None:
            emb = emb + self.label_emb(cond.vector)  # + (B, 1280)

        shallow = deep_cache is not None and deep_cache.reuse and deep_cache.features is not None
        down = self.input_blocks[: deep_cache.branch + 1] if shallow else self.input_blocks
        h, skips = latents, []
        for block in down:
            h = call(self, block, h, emb, context, token_merging=token_merging)
            skips.append(h)
        up = list(self.output_blocks)
        if shallow:
            h, up = deep_cache.features, up[-(deep_cache.branch + 1):]
        else:
            h = call(self, self.middle_block, h, emb, context, token_merging=token_merging)  # (B, 1280, h/8, w/8)
        for i, block in enumerate(up):
            if deep_cache is not None and not shallow and i == len(up) - 1 - deep_cache.branch:
                deep_cache.features = h  # the deep features the next shallow calls reuse
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, h', w')
            h = call(self, block, h, emb, context, skips[-1].shape[-2:] if skips else None, token_merging)
        return self.out(h)  # (B, 4, h, w)
