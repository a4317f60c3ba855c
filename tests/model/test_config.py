"""Config validation: every field's type and range, with a ValueError that names the field and what was expected."""

from __future__ import annotations

import dataclasses

import pytest

from fastnca import build_model
from fastnca.config import Config, get_preset, parse_value, preset_names


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(state_channels="32"), r"state_channels: expected an integer.*got '32'"),
        (dict(state_channels=32.0), r"state_channels: expected an integer.*got 32\.0"),
        (dict(state_channels=True), r"state_channels: expected an integer.*got True"),
        (dict(doubling="no"), r"doubling: expected True or False.*got 'no'"),
        (dict(bias="false"), r"bias: expected True or False.*got 'false'"),
        (dict(bias=1), r"bias: expected True or False.*got 1"),
        (dict(out_bias="yes"), r"out_bias: expected True, False or None.*got 'yes'"),
        (dict(log_every=0), r"log_every: expected an integer >= 1.*got 0"),
        (dict(enc_first_padding=-20), r"enc_first_padding: expected an integer >= 0.*got -20"),
        (dict(lr="1e-3"), r"lr: expected a number.*got '1e-3'"),
        (dict(lr=float("inf")), r"lr: expected a finite positive number.*got inf"),
        (dict(beta=float("nan")), r"beta: expected a finite number >= 0.*got nan"),
        (dict(p_update=True), r"p_update: expected a number.*got True"),
        (dict(checkpoint=5), r"checkpoint: expected a string.*got 5"),
        (dict(dataset=None), r"dataset: expected a string.*got None"),
        (dict(eval_every=-1), r"eval_every: expected an integer >= 0.*got -1"),
        (dict(ckpt_every=-1), r"ckpt_every: expected an integer >= 0.*got -1"),
        (dict(eval_batches=-2), r"eval_batches: expected an integer >= 0.*got -2"),
        (dict(seed=-1), r"seed: expected an integer in 0\.\.4294967295.*got -1"),
        (dict(seed=2**70), r"seed: expected an integer in 0\.\.4294967295.*got 1180591620717411303424"),
        (dict(device=""), r"device: expected a device name.*got ''"),
        (dict(damage_size=40), r"damage_size: expected an integer in 0\.\.32.*got 40"),
    ],
)
def test_wrong_types_and_ranges_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_model("mnist-doubling", **overrides)


def test_nondoubling_image_size_zero_is_refused():
    with pytest.raises(ValueError, match=r"image_size: expected an integer >= 1"):
        get_preset("mnist-nondoubling", image_size=0, grid_size=0)


def test_an_image_too_small_for_the_encoder_is_refused():
    # 2 + 2 * 1 - 4 = 0: the first 5x5 conv would leave no pixels
    with pytest.raises(ValueError, match=r"enc_first_padding: expected image_size \+ 2 \* enc_first_padding >= 5"):
        get_preset("mnist-nondoubling", image_size=2, grid_size=2, enc_first_padding=1)


@pytest.mark.parametrize("field", Config.keys())
def test_every_field_refuses_a_value_of_the_wrong_type(field):
    with pytest.raises(ValueError, match=rf"^{field}: expected "):
        Config(**{field: object()})


def test_whole_numbers_are_accepted_for_float_fields_and_stored_as_floats():
    cfg = Config(lr=1, beta=0, grad_clip=2)
    assert (cfg.lr, cfg.beta, cfg.grad_clip) == (1.0, 0.0, 2.0)
    assert all(isinstance(v, float) for v in (cfg.lr, cfg.beta, cfg.grad_clip)), "expected floats after coercion"


def test_validate_catches_a_field_changed_after_construction():
    cfg = Config()
    cfg.n_blocks = "4"
    with pytest.raises(ValueError, match="n_blocks: expected an integer"):
        cfg.validate()


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_round_trips_through_parse_value(preset):
    """``--set key=value`` parses each field's printed value back into a valid Config."""
    cfg = get_preset(preset)
    parsed = {f.name: parse_value(f.name, str(getattr(cfg, f.name))) for f in dataclasses.fields(cfg)}
    assert Config(**parsed) == cfg


def test_parse_value_gives_real_bools_and_ints():
    assert parse_value("doubling", "no") is False and parse_value("bias", "true") is True
    assert parse_value("out_bias", "none") is None
    assert parse_value("state_channels", "32") == 32 and parse_value("lr", "1e-3") == 1e-3
    with pytest.raises(ValueError, match="doubling: expected"):
        parse_value("doubling", "maybe")
