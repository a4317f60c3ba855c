"""Which generator draws the update masks: the caller's, whenever it draws on the state's device type.

``torch.Generator("cuda").device`` is ``cuda`` (no index) while CUDA tensors are on ``cuda:0``; comparing the two
devices for equality sent the masks of seeded GPU calls to the global generator (on an H100, 2026-11-28, seeded
eager IWAE runs differed by 0.8-1.6 %). On the CPU a stand-in whose device carries an index (``cpu:0``, which never
equals a CPU tensor's ``cpu``) takes the index-less CUDA generator's place.
"""

from types import SimpleNamespace

import pytest
import torch

import fastnca.nca
from fastnca import build_model
from fastnca.rng import generator_on


@pytest.fixture
def drawn_with(monkeypatch) -> list:
    """The generator every draw_masks call received (the masks themselves come from the CPU's global one)."""
    seen = []
    real = fastnca.nca.draw_masks

    def record(*args, generator=None, **kwargs):
        seen.append(generator)
        return real(*args, generator=None, **kwargs)

    monkeypatch.setattr(fastnca.nca, "draw_masks", record)
    return seen


def indexed_stand_in() -> SimpleNamespace:
    return SimpleNamespace(device=torch.device("cpu", 0))


def test_generator_on_compares_device_types_not_indices():
    cuda = SimpleNamespace(device=torch.device("cuda"))  # what torch.Generator("cuda") reports
    assert generator_on(cuda, torch.device("cuda", 0)) is cuda, "an index-less CUDA generator draws on cuda:0"
    assert generator_on(cuda, "cuda:1") is cuda
    assert generator_on(cuda, torch.device("cpu")) is None, "a CUDA generator cannot draw CPU tensors"
    cpu = torch.Generator()
    assert generator_on(cpu, torch.device("cpu")) is cpu
    assert generator_on(cpu, torch.device("cuda", 0)) is None, "CPU generator, CUDA state: the global one draws"
    assert generator_on(None, torch.device("cpu")) is None


def test_nca_forward_draws_the_masks_with_the_callers_generator(drawn_with):
    model = build_model("small", p_update=0.5, backend="torch")
    gen = indexed_stand_in()
    model.nca(torch.zeros(2, model.latent_size), generator=gen)
    assert drawn_with == [gen], f"expected the masks drawn with the caller's generator, got {drawn_with}"


def test_decode_with_pool_states_draws_the_masks_with_the_callers_generator(drawn_with):
    model = build_model("mnist-nondoubling", state_channels=8, hidden_channels=8, p_update=0.5, backend="torch")
    side = model.nca.grid_size
    gen = indexed_stand_in()
    model.decode(torch.zeros(3, model.latent_size), num_steps=1, generator=gen,
                 start_states=torch.zeros(1, 8, side, side))
    assert drawn_with == [gen], f"expected the masks drawn with the caller's generator, got {drawn_with}"


@pytest.mark.gpu
def test_an_index_less_cuda_generator_repeats_the_masks_whatever_the_global_generator_did():
    model = build_model("small", p_update=0.5, device="cuda").cuda().eval()
    with torch.no_grad():
        model.nca.update_net.out.weight.normal_(0, 0.05)
    z = torch.randn(4, model.latent_size, device="cuda")
    outs = []
    for global_seed in (1, 2):
        torch.cuda.manual_seed(global_seed)
        with torch.no_grad():
            outs.append(model.nca(z, generator=torch.Generator("cuda").manual_seed(0)))
    assert torch.equal(outs[0], outs[1]), "the masks came from the global generator, not from the seeded one"
