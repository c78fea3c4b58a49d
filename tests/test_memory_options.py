"""Options that bound memory for large images: sliced attention and tiled VAE decoding."""

import torch
import torch.nn.functional as F

from sd import attention
from sd.vae import AutoencoderKL, VAEConfig


def test_sliced_attention_equals_full_attention():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 300, 64, generator=gen) for _ in range(3))
    full = attention.multi_head_attention(q, k, v, heads=4)
    try:
        attention.set_attention_slicing(64)
        sliced = attention.multi_head_attention(q, k, v, heads=4)
    finally:
        attention.set_attention_slicing(None)
    torch.testing.assert_close(sliced, full, rtol=1e-5, atol=1e-6)


def test_tiled_decode_covers_and_blends_exactly(monkeypatch):
    """With a decoder that works pixel by pixel, tiling must not change anything: this checks that the
    tiles cover the image and that the cross-fade weights sum to one everywhere."""
    with torch.device("meta"):
        vae = AutoencoderKL(VAEConfig())
    monkeypatch.setattr(vae, "decode", lambda z: F.interpolate(z[:, :3] * 2 + z[:, 3:], scale_factor=8.0))
    z = torch.randn(1, 4, 45, 70, generator=torch.Generator().manual_seed(1))
    tiled = vae.decode_tiled(z, tile=24, overlap=6)
    torch.testing.assert_close(tiled, vae.decode(z), rtol=1e-5, atol=1e-5)


def test_tiled_decode_of_a_small_latent_is_decode():
    vae = AutoencoderKL(VAEConfig(base_channels=32, channel_mult=(1, 1, 1, 1))).eval()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(vae.decode_tiled(z, tile=8), vae.decode(z))
