"""The VAE: parameter counts, bounds (ELBO, IWAE), presets, the baseline, and input checks."""

import math

import pytest
import torch

import fastnca
from fastnca.config import PRESETS, Config, get_preset, parse_value
from fastnca.likelihoods import bernoulli_log_prob


def _small(**overrides):
    model = fastnca.build_model("small", backend="torch", **overrides)
    with torch.no_grad():  # a non-trivial decoder: random output conv instead of the zero init
        model.nca.update_net.out.weight.normal_(0, 0.05)
    return model


def _binary(b=6, size=32):
    return (torch.rand(b, 1, size, size) < 0.3).float()


@pytest.mark.parametrize(
    "preset,total,nca",
    [("mnist-doubling", 6_585_088, 1_182_208), ("celeba-doubling", 9_732_416, 1_182_208),
     ("mnist-nondoubling", 5_042_304, None)],
)
def test_parameter_counts_equal_the_original_models(preset, total, nca):
    model = fastnca.build_model(preset, backend="torch")
    got = sum(p.numel() for p in model.parameters())
    assert got == total, f"{preset}: expected {total:,} parameters, got {got:,}"
    if nca is not None:
        assert sum(p.numel() for p in model.nca.parameters()) == nca


def test_every_preset_builds_and_has_the_papers_rollout():
    for name in PRESETS:
        cfg = get_preset(name)
        assert cfg.output_size == cfg.image_size, name
    assert len(get_preset("mnist-doubling").__class__.keys()) > 10
    model = fastnca.build_model("mnist-doubling")
    assert len(model.nca.schedule()) == 40
    assert len(fastnca.build_model("celeba-doubling").nca.schedule()) == 48
    cfg = get_preset("celeba-nondoubling-256")
    assert (cfg.state_channels, cfg.hidden_channels, cfg.n_blocks, cfg.min_steps, cfg.max_steps) == (256, 256, 4, 64,
                                                                                                      128)


def test_elbo_and_loss_shapes_and_consistency():
    model = _small()
    x = _binary()
    out = model(x, beta=2.0, generator=torch.Generator().manual_seed(0))
    assert out["elbo"].shape == out["recon"].shape == out["kl"].shape == (6,)
    assert torch.allclose(out["elbo"], out["recon"] - 2.0 * out["kl"])
    assert torch.allclose(out["loss"], -out["elbo"].mean())
    assert (out["kl"] >= 0).all()
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_iwae_with_one_sample_equals_the_one_sample_elbo_estimate():
    model = _small()
    x = _binary()
    got = model.iwae(x, 1, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        mu, log_sigma = model.encode(x)
        z = mu + log_sigma.exp() * torch.randn(mu.shape, generator=torch.Generator().manual_seed(7))
        recon = bernoulli_log_prob(x, model.decode(z))
        log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
        log_qz = torch.distributions.Normal(mu, log_sigma.exp()).log_prob(z).sum(1)
    want = recon + log_pz - log_qz
    assert torch.allclose(got, want, atol=1e-3), f"expected {want}, got {got}"


def test_iwae_is_at_least_the_elbo_on_average():
    model = _small()
    x = _binary(8)
    elbo = torch.stack([model.elbo(x).detach() for _ in range(8)]).mean()
    iwae = model.iwae(x, 32, chunk=8).mean()
    assert iwae >= elbo, f"expected IWAE(k=32) >= ELBO on average, got {iwae:.2f} < {elbo:.2f}"


def test_iwae_chunking_does_not_change_the_bound():
    model = _small()
    x = _binary(3)
    a = model.iwae(x, 12, chunk=12, generator=torch.Generator().manual_seed(1))
    b = model.iwae(x, 12, chunk=12, generator=torch.Generator().manual_seed(1))
    c = model.iwae(x, 12, chunk=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and c.shape == (3,)
    assert torch.allclose(a, c, rtol=1e-4), f"expected chunking to leave the bound unchanged: {a} vs {c}"


def test_analytic_kl_matches_monte_carlo():
    model = _small()
    mu, log_sigma = torch.randn(1, 32) * 0.5, torch.randn(1, 32) * 0.3
    z = mu + log_sigma.exp() * torch.randn(100_000, 32)
    mc = (torch.distributions.Normal(mu, log_sigma.exp()).log_prob(z) - torch.distributions.Normal(0, 1).log_prob(z))
    assert abs(mc.sum(1).mean().item() - model.kl(mu, log_sigma).item()) < 0.1


def test_dml_model_and_bits_per_dim():
    model = fastnca.build_model("celeba-doubling", backend="torch", state_channels=32, hidden_channels=32, n_blocks=1,
                                enc_channels=8, n_doublings=3, image_size=16, steps_per_stage=2)
    x = torch.randint(0, 256, (2, 3, 16, 16)).float() * 2 / 255 - 1
    out = model(x)
    assert out["recon"].shape == (2,) and torch.isfinite(out["loss"])
    assert math.isclose(model.bits_per_dim(torch.tensor(-16 * 16 * 3 * math.log(2))).item(), 1.0, rel_tol=1e-6)
    assert model.sample(2).shape == (2, 3, 16, 16)


def test_sample_and_growth_sequence():
    model = _small()
    imgs, seq = model.sample(3, return_states=True)
    assert imgs.shape == (3, 1, 32, 32) and len(seq) == 1 + len(model.nca.schedule())
    assert (imgs >= 0).all() and (imgs <= 1).all()


@pytest.mark.parametrize("preset,shape", [("mnist-doubling", (2, 1, 32, 32)), ("mnist-nondoubling", (2, 1, 28, 28)),
                                          ("celeba-doubling", (2, 3, 64, 64))])
def test_conv_vae_baseline_decodes_to_the_image_size(preset, shape):
    model = fastnca.ConvVAE(get_preset(preset))
    x = torch.zeros(shape) if shape[1] == 1 else torch.zeros(shape).uniform_(-1, 1)
    out = model(x)
    assert out["state"].shape[-2:] == shape[-2:] and torch.isfinite(out["loss"])


def test_bad_input_names_the_argument():
    model = _small()
    with pytest.raises(ValueError, match="x: expected shape"):
        model(torch.zeros(2, 32, 32))
    with pytest.raises(ValueError, match="x: expected shape"):
        model(torch.zeros(2, 3, 32, 32))
    with pytest.raises(TypeError, match="x: expected a floating-point"):
        model(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="k: expected an integer >= 1"):
        model.iwae(_binary(2), 0)
    with pytest.raises(ValueError, match="n_mix"):
        get_preset("celeba-doubling", n_mix=30)  # 300 channels > |z| = 256
    with pytest.raises(ValueError, match="preset"):
        fastnca.build_model("mnist-dubling")
    with pytest.raises(ValueError, match="unknown config key"):
        fastnca.build_model("small", hidden=3)
    with pytest.raises(ValueError, match="image_size"):
        Config(image_size=30)
    with pytest.raises(ValueError, match="lr: expected"):
        parse_value("lr", "fast")
    assert parse_value("bias", "false") is False and parse_value("lr", "3e-4") == 3e-4


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_images_of_any_float_dtype_are_converted_to_the_models(dtype):
    model, x = _small(), _binary(2)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    want = model(x, generator=g())["loss"]
    got = model(x.to(dtype), generator=g())["loss"]  # {0, 1} is exact in every float dtype
    assert got.dtype == torch.float32 and torch.allclose(got, want), f"expected the float32 loss {want}, got {got}"
    assert model.iwae(x.to(dtype), k=2, generator=g()).shape == (2,)


@pytest.mark.parametrize("value", [0.5, -1.0, 2.0, float("nan")])
def test_bernoulli_images_outside_0_1_are_refused(value):
    model, x = _small(), _binary(2)
    x[1, 0, 3, 4] = value
    with pytest.raises(ValueError, match=r"x: expected binary images with values in \{0, 1\}"):
        model(x)
    with pytest.raises(ValueError, match=r"x: expected binary images"):
        model.iwae(x, k=2)


@pytest.mark.parametrize("value", [1.5, -1.01, 255.0, float("nan")])
def test_dml_images_outside_minus1_1_are_refused(value):
    model = fastnca.build_model("celeba-doubling", backend="torch", state_channels=32, hidden_channels=32, n_blocks=1,
                                enc_channels=8, n_doublings=3, image_size=16, steps_per_stage=2)
    x = torch.randint(0, 256, (2, 3, 16, 16)).float() * 2 / 255 - 1
    model(x)  # the data domain itself is fine
    x[0, 2, 5, 5] = value
    with pytest.raises(ValueError, match=r"x: expected images in \[-1, 1\]"):
        model(x)


# ---------------------------------------------------------------------------------------------- API checks
def _tiny(preset: str = "small", **kw):
    return fastnca.build_model(preset, state_channels=8, hidden_channels=8, enc_channels=4, **kw)


def test_an_empty_batch_is_refused_instead_of_a_nan_loss():
    with pytest.raises(ValueError, match=r"x: expected a batch of at least one image, got shape \(0, 1, 32, 32\)"):
        _tiny(steps_per_stage=1)(torch.zeros(0, 1, 32, 32))


@pytest.mark.parametrize(
    "call, pattern",
    [
        (lambda m, x: m(x, beta=float("nan")), r"beta: expected a finite number >= 0.*nan"),
        (lambda m, x: m(x, beta=-1.0), r"beta: expected a finite number >= 0.*-1"),
        (lambda m, x: m.iwae(x, k=True), r"k: expected an integer >= 1.*True"),
        (lambda m, x: m.iwae(x, k=2, chunk=True), r"chunk: expected an integer >= 1.*True"),
        (lambda m, x: m.iwae(x, k=2, steps="cell"), r"steps: expected one of \('image', 'sample'\)"),
        (lambda m, x: m.sample(-1), r"n: expected an integer >= 1.*-1"),
        (lambda m, x: m.sample(-1, return_states=True), r"n: expected an integer >= 1.*-1"),
    ],
)
def test_bad_api_arguments_are_named(call, pattern):
    model = _tiny(steps_per_stage=1)
    with pytest.raises(ValueError, match=pattern):
        call(model, torch.zeros(2, 1, 32, 32))


# ---------------------------------------------------------------------------------------------- IWAE's T
def _record_steps(model):
    """Wrap the decoder so each call's per-row step counts are recorded: list of (B,) tensors."""
    seen, decode = [], model.decode

    def recording(z, **kw):
        seen.append(kw.get("num_steps"))
        return decode(z, **kw)

    model.decode = recording
    return seen


def test_iwae_per_image_shares_one_T_over_all_samples_of_an_image():
    """The authors' test: one image at a time, k samples, one T per forward call."""
    model = _tiny("mnist-nondoubling", min_steps=2, max_steps=9, p_update=1.0)
    seen = _record_steps(model)
    b, k = 3, 10
    model.iwae(torch.zeros(b, 1, 28, 28), k=k, chunk=4, generator=torch.Generator().manual_seed(0))
    rows = torch.cat([t.view(-1, b) for t in seen])  # (k, B): sample-major chunks
    assert rows.shape == (k, b) and ((2 <= rows) & (rows <= 9)).all(), rows
    assert (rows == rows[0]).all(), f"expected every sample of an image to share its T, got {rows.T.tolist()}"


def test_iwae_per_sample_draws_T_with_each_z():
    model = _tiny("mnist-nondoubling", min_steps=2, max_steps=9, p_update=1.0)
    seen = _record_steps(model)
    b, k = 3, 10
    model.iwae(torch.zeros(b, 1, 28, 28), k=k, chunk=4, generator=torch.Generator().manual_seed(0), steps="sample")
    rows = torch.cat([t.view(-1, b) for t in seen])
    assert rows.shape == (k, b) and ((2 <= rows) & (rows <= 9)).all(), rows
    assert all(len(set(col.tolist())) > 1 for col in rows.T), f"expected T to vary over samples: {rows.T.tolist()}"


def test_iwae_step_counts_follow_the_generator_and_the_uniform_range():
    model = _tiny("mnist-nondoubling", min_steps=32, max_steps=64)
    t1 = model.nca.draw_num_steps(20_000, torch.Generator().manual_seed(5))
    t2 = model.nca.draw_num_steps(20_000, torch.Generator().manual_seed(5))
    assert torch.equal(t1, t2), "expected the draws to repeat for a seeded generator"
    counts = torch.bincount(t1 - 32, minlength=33)
    assert counts.numel() == 33 and counts.min() > 0.8 * 20_000 / 33, f"expected U{{32..64}}, got {counts.tolist()}"


def test_a_doubling_model_has_no_T_to_draw():
    assert _tiny(steps_per_stage=1).draw_iwae_steps(4, None, torch.device("cpu")) is None
