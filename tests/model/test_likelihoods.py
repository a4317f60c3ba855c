"""Likelihoods: normalisation, agreement with torch.distributions, and input checks."""

import pytest
import torch

from fastnca.likelihoods import (
    bernoulli_log_prob,
    bernoulli_mean,
    bernoulli_sample,
    dml_log_prob,
    dml_mean,
    dml_sample,
)


def _all_colours_of_one_pixel() -> torch.Tensor:
    """Every (r, g, b) value on the 256-level grid: (256**3, 3, 1, 1) in [-1, 1]."""
    levels = torch.arange(256, dtype=torch.float32) * 2 / 255 - 1
    r, g, b = torch.meshgrid(levels, levels, levels, indexing="ij")
    return torch.stack([r.flatten(), g.flatten(), b.flatten()], dim=1)[:, :, None, None]


@pytest.mark.parametrize("n_mix", [1, 3])
def test_dml_sums_to_one_over_all_256_values_of_a_pixel(n_mix):
    params = torch.randn(1, 10 * n_mix + 5, 1, 1)  # extra channels must be ignored
    params[:, n_mix:] *= 0.5
    x = _all_colours_of_one_pixel()
    total = 0.0
    for chunk in x.split(256 * 256):
        total += dml_log_prob(chunk, params.expand(chunk.shape[0], -1, -1, -1), n_mix).double().exp().sum().item()
    assert abs(total - 1.0) < 2e-3, f"expected the 256**3 probabilities of one pixel to sum to 1, got {total}"


def test_dml_mean_and_sample_are_in_range_and_quantised():
    params = torch.randn(2, 20, 5, 6)
    mean = dml_mean(params, 2)
    sample = dml_sample(params, 2, generator=torch.Generator().manual_seed(0))
    assert mean.shape == sample.shape == (2, 3, 5, 6)
    assert mean.min() >= -1 and mean.max() <= 1
    k = (sample + 1) * 127.5
    assert torch.allclose(k, k.round(), atol=1e-4), "expected samples on the 256-level grid"


def test_dml_sample_follows_the_component_mean():
    params = torch.zeros(4000, 10, 1, 1)
    params[:, 1], params[:, 4], params[:, 7] = 0.5, -0.2, 0.1  # r, g, b means (layout: per colour m, s, c)
    params[:, 2], params[:, 5], params[:, 8] = -4, -4, -4  # small log-scales
    s = dml_sample(params, 1, generator=torch.Generator().manual_seed(1))
    got = s.mean(0).flatten()
    assert torch.allclose(got, torch.tensor([0.5, -0.2, 0.1]), atol=0.02), f"expected means (0.5, -0.2, 0.1), got {got}"


def test_bernoulli_agrees_with_torch_distributions():
    logits = torch.randn(3, 1, 7, 5) * 3
    x = (torch.rand(3, 1, 7, 5) < 0.4).float()
    ref = torch.distributions.Bernoulli(logits=logits).log_prob(x).flatten(1).sum(1)
    got = bernoulli_log_prob(x, logits)
    assert got.shape == (3,)
    assert torch.allclose(got, ref, atol=1e-5), f"expected {ref}, got {got}"


def test_bernoulli_reads_channel_zero_of_a_state():
    state = torch.randn(2, 8, 4, 4)
    x = (torch.rand(2, 1, 4, 4) < 0.5).float()
    assert torch.allclose(bernoulli_log_prob(x, state), bernoulli_log_prob(x, state[:, :1]))
    assert torch.allclose(bernoulli_mean(state[:, :1]), torch.sigmoid(state[:, :1]))
    s = bernoulli_sample(torch.full((1, 1, 100, 100), 2.0), generator=torch.Generator().manual_seed(0))
    assert abs(s.mean().item() - torch.sigmoid(torch.tensor(2.0)).item()) < 0.02


def test_likelihood_bad_input_names_the_argument():
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="n_mix"):
        dml_log_prob(x, torch.zeros(2, 15, 4, 4), 2)  # needs 20 channels
    with pytest.raises(ValueError, match="n_mix"):
        dml_log_prob(x, torch.zeros(2, 30, 4, 4), 0)
    with pytest.raises(ValueError, match="rank"):
        dml_log_prob(x[0], torch.zeros(2, 10, 4, 4), 1)
    with pytest.raises(TypeError, match="x"):
        bernoulli_log_prob(torch.zeros(2, 1, 4, 4, dtype=torch.long), torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="spatial"):
        bernoulli_log_prob(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 5, 4))
