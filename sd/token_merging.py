"""Token merging for Stable Diffusion (Bolya & Hoffman, 2023; ToMe: Bolya et al., 2023).

Neighbouring image tokens of a latent are often nearly the same. Before a transformer block's
self-attention, bipartite soft matching merges the r most redundant tokens into similar ones
(averaging them), attention runs over N - r tokens, and afterwards every merged token takes back
the output of the token it went into ("unmerging"), so the rest of the network sees all N. The
quadratic self-attention is where the highest-resolution blocks spend their time, so only those merge
by default (`max_downsample` 1), and only for self-attention, as `tomesd`'s defaults. "Highest-resolution"
means the UNet's finest transformers: at the latents' size in SD 1.x and 2.x, at half of it in SDXL (which
has no attention at its first level, so tomesd's bound, counted from the latents, would merge nothing there).

The destination set is one token per `stride` cell: its top-left one. tomesd can draw that token at
random instead; this project leaves randomness out, so a seed gives one image.
"""

from dataclasses import dataclass

import torch

MAX_RATIO = 0.75  # with 2x2 cells three tokens in four are sources: at most those can merge


@dataclass(frozen=True)
class TokenMerging:
    ratio: float = 0.5  # the share of a block's tokens merged away
    max_downsample: int = 1  # merge in blocks whose grid is at most this many times smaller than the finest's
    stride: tuple[int, int] = (2, 2)  # (rows, columns) of the cells that each give one destination token

    def matching(self, x: torch.Tensor, h: int, w: int) -> "TokenMerge":
        """The merge of `x` (B, h*w, C), tokens in raster order of an h x w grid."""
        return bipartite_soft_matching(x, h, w, self.stride, int(x.shape[1] * self.ratio))


@dataclass(frozen=True)
class TokenMerge:
    """One bipartite matching: token positions in the (B, N, C) sequence. Every source token either stays
    (`kept`) or is averaged into the destination token `into` (an index into `dst`)."""

    dst: torch.Tensor  # (n_dst,) positions of the destination tokens
    kept: torch.Tensor  # (B, n_src - r) positions of the sources left alone, most similar first
    merged: torch.Tensor  # (B, r) positions of the sources merged away
    into: torch.Tensor  # (B, r) which destination each merged source goes into

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N - r, C): the kept sources, then the destinations averaged with what merged into them."""
        c = x.shape[-1]
        dst = x[:, self.dst].scatter_reduce(1, channels(self.into, c), x.gather(1, channels(self.merged, c)),
                                            reduce="mean")  # (B, n_dst, C)
        return torch.cat([x.gather(1, channels(self.kept, c)), dst], dim=1)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """(B, N - r, C) -> (B, N, C): every token back at its position, merged ones with their destination's value."""
        b, _, c = y.shape
        kept, dst = y.split([self.kept.shape[1], len(self.dst)], dim=1)
        out = y.new_empty(b, self.kept.shape[1] + self.merged.shape[1] + len(self.dst), c)  # (B, N, C)
        out[:, self.dst] = dst
        out.scatter_(1, channels(self.kept, c), kept)
        return out.scatter_(1, channels(self.merged, c), dst.gather(1, channels(self.into, c)))


def channels(index: torch.Tensor, c: int) -> torch.Tensor:
    """Token indices (B, n) as gather/scatter indices over C channels: (B, n, C)."""
    return index[..., None].expand(-1, -1, c)


def bipartite_soft_matching(metric: torch.Tensor, h: int, w: int, stride: tuple[int, int], r: int) -> TokenMerge:
    """Merge r of the source tokens of `metric` (B, h*w, C) into destinations: the top-left token of each
    whole stride cell is a destination, all others are sources. Each source's most similar destination
    (cosine similarity) is its partner; the r sources closest to their partners merge. A grid with no
    whole cell (a side below the stride) merges nothing."""
    sy, sx = stride
    is_src = torch.ones(h, w, dtype=torch.bool, device=metric.device)
    is_src[: h // sy * sy: sy, : w // sx * sx: sx] = False  # a grid that does not divide keeps its rim as sources
    n_dst = (h // sy) * (w // sx)
    dst, src = is_src.flatten().int().argsort(stable=True).split([n_dst, h * w - n_dst])  # (n_dst,), (n_src,)
    r = min(r, len(src)) if n_dst else 0  # a grid smaller than one cell has no destination: nothing merges
    if r <= 0:
        none = src[None, :0].expand(len(metric), -1)  # (B, 0)
        return TokenMerge(dst=dst, kept=src[None].expand(len(metric), -1), merged=none, into=none)
    unit = metric / metric.norm(dim=-1, keepdim=True)  # (B, N, C)
    scores = unit[:, src] @ unit[:, dst].transpose(1, 2)  # (B, n_src, n_dst)
    best, partner = scores.max(dim=-1)  # (B, n_src)
    order = best.argsort(dim=-1, descending=True)  # (B, n_src): the most redundant sources first
    return TokenMerge(dst=dst, kept=src[order[:, r:]], merged=src[order[:, :r]],
                      into=partner.gather(1, order[:, :r]))
