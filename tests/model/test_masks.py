"""The update-mask contract: a mask is boolean or holds only 0 and 1, on the reference and the fused backend.

Before the contract was enforced, a 0.5 mask scaled the update on the reference and counted as 1 in the fused
kernel, so the two backends silently disagreed.
"""

import pytest
import torch

from fastnca.kernels.nca_step import nca_step, nca_step_fwd
from fastnca.kernels.nca_step_bwd import nca_step_bwd
from fastnca.kernels.reference import UpdateWeights, check_step_inputs, nca_step_ref

C, H = 16, 16  # the fused kernel's smallest supported |z| and h


def _weights() -> UpdateWeights:
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    return UpdateWeights(r(H, C, 3, 3), r(H), ((r(H, H, 1, 1), r(H), r(H, H, 1, 1), r(H)),), r(C, H, 1, 1), r(C))


def _state() -> torch.Tensor:
    return torch.randn(2, C, 3, 4).contiguous(memory_format=torch.channels_last)


BAD_MASKS = {
    "half": lambda m: m.float() * 0.5,
    "two": lambda m: m.to(torch.int64) * 2,
    "minus_one": lambda m: -m.to(torch.int32),
    "nan": lambda m: torch.where(m, torch.tensor(float("nan")), torch.tensor(0.0)),
}
BACKENDS = {
    "reference": lambda s, w, m: nca_step_ref(s, w, m),
    "fused_fwd": lambda s, w, m: nca_step_fwd(s, w, m, False),
    "fused": lambda s, w, m: nca_step(s, w, m),
    "fused_bwd": lambda s, w, m: nca_step_bwd(s, w, m, False, torch.ones(2, C, 3, 4)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", BAD_MASKS)
def test_mask_values_other_than_0_and_1_are_refused_on_every_backend(backend, bad):
    state = _state()
    mask = BAD_MASKS[bad](torch.ones(2, 1, 3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask: expected values in \{0, 1\}"):
        BACKENDS[backend](state, _weights(), mask)


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int64, torch.float32, torch.bfloat16])
def test_valid_masks_of_every_dtype_give_the_same_step_on_both_backends(dtype):
    state, w = _state(), _weights()
    m = torch.rand(2, 1, 3, 4, generator=torch.Generator().manual_seed(1)) < 0.5
    mask = m.to(dtype)
    ref = nca_step_ref(state, w, m)
    for name, out in (("reference", nca_step_ref(state, w, mask)), ("fused", nca_step_fwd(state, w, mask, False))):
        assert torch.allclose(out, ref, atol=1e-5), f"{name} with a {dtype} 0/1 mask: expected the bool-mask step"
    assert torch.equal(ref[~m.expand_as(ref)], state[~m.expand_as(state)]), "expected masked-out cells unchanged"


def test_bool_masks_are_accepted_without_reading_their_values(monkeypatch):
    """The model's masks are bool: checking them must not cost a device-to-host sync per step."""
    mask = torch.ones(2, 1, 3, 4, dtype=torch.bool)

    def no_sync(*args, **kwargs):
        raise AssertionError("expected no value check (host sync) for a bool mask")

    monkeypatch.setattr(torch.Tensor, "any", no_sync)
    monkeypatch.setattr(torch.Tensor, "all", no_sync)
    check_step_inputs(_state(), _weights(), mask, False)
