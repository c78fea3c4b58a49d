"""Attention settings (sliced, written out) and tiled VAE decoding: options that bound memory or show the
formula, each equal to the default path."""

import pytest
import torch
import torch.nn.functional as F

from sd import attention
from sd.clip import CLIPConfig, CLIPTextModel
from sd.vae import AutoencoderKL, VAEConfig


def test_sliced_attention_equals_full_attention():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 300, 64, generator=gen) for _ in range(3))
    full = attention.multi_head_attention(q, k, v, heads=4)
    sliced = attention.multi_head_attention(q, k, v, heads=4, query_slice=64)
    torch.testing.assert_close(sliced, full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_the_written_out_formula_equals_the_fused_kernel(causal):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 77, 64, generator=gen) for _ in range(3))
    fused = attention.multi_head_attention(q, k, v, heads=4, causal=causal)
    plain = attention.multi_head_attention(q, k, v, heads=4, causal=causal, fused=False)
    torch.testing.assert_close(plain, fused, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fused, attention.multi_head_attention(q, k, v, heads=4, causal=not causal))


def test_attention_settings_belong_to_one_model():
    torch.manual_seed(0)
    configured, other = (CLIPTextModel(CLIPConfig(width=64, layers=2, heads=2)) for _ in range(2))
    attention.configure_attention(configured, query_slice=8, fused=False)
    layers = [m for m in configured.modules() if isinstance(m, attention.Attention)]
    assert len(layers) == 2 and all(m.query_slice == 8 and not m.fused for m in layers)
    assert all(m.query_slice is None and m.fused for m in other.modules() if isinstance(m, attention.Attention))
    ids = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        written_out = configured(ids)
        attention.configure_attention(configured)
        torch.testing.assert_close(written_out, configured(ids), rtol=1e-5, atol=1e-5)


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
