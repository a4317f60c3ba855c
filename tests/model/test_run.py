"""The run's settings (fastnca/run.py): the one place that decides backend, arithmetic and rollout plan."""

import json

import pytest
import torch

import fastnca
from fastnca.config import Config, get_preset
from fastnca.nca import NCA
from fastnca.run import RunSettings, conv_allows_tf32, resolve_backend, resolve_run

CUDA, CPU = torch.device("cuda"), torch.device("cpu")  # devices as names: nothing is allocated on them


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device of compute capability 9.0 as far as the resolution can tell (no tensor goes there)."""
    capability = [(9, 0)]

    def get_device_capability(device=None):
        assert torch.device(device).type == "cuda", f"asked the capability of {device}"
        return capability[0]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", get_device_capability)
    return capability


@pytest.fixture
def cudnn_tf32(monkeypatch):
    """Set PyTorch's cuDNN TF32 flag for fp32 convolutions (new API where the release has it) for one test."""

    def set_flag(on: bool) -> None:
        conv = getattr(torch.backends.cudnn, "conv", None)
        if conv is not None and hasattr(conv, "fp32_precision"):
            monkeypatch.setattr(conv, "fp32_precision", "tf32" if on else "ieee")
        else:  # pragma: no cover - releases before the fp32_precision API
            monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", on)

    return set_flag


def test_auto_backend_picks_the_reference_on_the_cpu():
    assert resolve_backend("auto", CPU) == "torch"
    assert resolve_backend("triton", CPU) == "triton", "an explicit backend is kept"


@pytest.mark.parametrize("capability, expected", [((7, 5), "torch"), ((8, 0), "triton"), ((8, 6), "triton"),
                                                  ((9, 0), "triton")])
def test_auto_backend_takes_the_fused_kernels_from_compute_capability_8(fake_gpu, capability, expected):
    pytest.importorskip("triton")
    fake_gpu[0] = capability
    got = resolve_backend("auto", CUDA)
    assert got == expected, f"compute capability {capability}: expected {expected!r}, got {got!r}"
    assert resolve_backend("triton", CUDA) == "triton", "an explicit backend is kept"
    assert resolve_backend("auto", CPU) == "torch", "the CPU of a GPU machine: the reference"


def test_fp32_follows_pytorchs_cudnn_tf32_flag_on_a_gpu(fake_gpu, cudnn_tf32):
    pytest.importorskip("triton")
    cfg = get_preset("mnist-doubling")
    assert cfg.precision == "fp32" and cfg.backend == "auto", "the presets' defaults changed: revisit this test"
    cudnn_tf32(True)
    run = resolve_run(cfg, CUDA)
    assert (run.backend, run.arithmetic, run.input_precision) == ("triton", "tf32", "tf32"), (
        f"expected the default fp32 model to take TF32 tensor cores on a GPU as cuDNN does, got {run}")
    cudnn_tf32(False)
    run = resolve_run(cfg, CUDA)
    assert (run.arithmetic, run.input_precision) == ("fp32-ieee", "ieee"), "the flag off: IEEE fp32, as cuDNN"
    assert run.state_dtype == torch.float32


@pytest.mark.parametrize("flag", [True, False])
def test_explicit_precisions_do_not_follow_the_flag(fake_gpu, cudnn_tf32, flag):
    cudnn_tf32(flag)
    cfg = get_preset("mnist-doubling", backend="triton")
    got = {p: resolve_run(cfg.replace(precision=p), CUDA) for p in ("tf32", "fp32-ieee", "bf16")}
    assert got["tf32"].arithmetic == "tf32" and got["tf32"].input_precision == "tf32"
    assert got["fp32-ieee"].arithmetic == "fp32-ieee" and got["fp32-ieee"].input_precision == "ieee"
    assert got["bf16"].arithmetic == "bf16" and got["bf16"].state_dtype == torch.bfloat16


def test_the_cpu_computes_ieee_fp32_and_the_reference_follows_the_flag(fake_gpu, cudnn_tf32):
    cudnn_tf32(True)
    assert resolve_run(get_preset("small"), CPU).arithmetic == "fp32-ieee", "no TF32 on the CPU"
    ref = resolve_run(get_preset("small", backend="torch", precision="fp32-ieee"), CUDA)
    assert ref.arithmetic == "tf32", "the reference's convolutions are cuDNN's: its flag decides what ran"


def test_conv_allows_tf32_reads_the_inherited_new_api(monkeypatch):
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is None or not hasattr(conv, "fp32_precision"):
        pytest.skip("this PyTorch release has only torch.backends.cudnn.allow_tf32")
    monkeypatch.setattr(conv, "fp32_precision", "none")
    monkeypatch.setattr(torch.backends.cudnn, "fp32_precision", "none")
    monkeypatch.setattr(torch.backends, "fp32_precision", "tf32")
    assert conv_allows_tf32(), "'none' inherits from cudnn, then from the global setting"
    monkeypatch.setattr(torch.backends, "fp32_precision", "ieee")
    assert not conv_allows_tf32()


def test_settings_follow_the_module_to_another_device():
    nca = NCA(16, 16, 1, backend="triton")
    assert nca.settings.device == CPU and nca.settings.backend == "triton"
    same = nca.settings
    nca.to(torch.float64)
    assert nca.settings is same, "a dtype move keeps the settings"
    nca.to("meta")
    assert nca.settings.device.type == "meta" and nca.settings.backend == "triton", nca.settings
    auto = NCA(16, 16, 1).to("meta")
    assert auto.settings.backend == "torch" and auto.settings.backend_source == "capability"


def test_a_measured_backend_survives_a_move_within_the_device_type(fake_gpu):
    pytest.importorskip("triton")
    cfg = get_preset("small")
    run = resolve_run(cfg, torch.device("cuda:0"), backend="torch", backend_source="measured")
    assert run.backend == "torch" and run.backend_source == "measured"
    moved = run.moved_to(torch.device("cuda:1"))
    assert moved.backend == "torch" and moved.backend_source == "measured", "another GPU keeps the measurement"
    assert run.moved_to(CPU).backend == "torch" and run.moved_to(CPU).backend_source == "capability"
    assert run.moved_to(torch.device("cuda:0")) is run


def test_vnca_reads_its_decoders_settings_and_the_trainer_passes_its_own():
    model = fastnca.build_model("small")
    assert model.settings is model.nca.settings
    run = resolve_run(model.config.replace(backend="torch", precision="bf16"), CPU)
    built = fastnca.VNCA(model.config.replace(backend="torch", precision="bf16"), settings=run)
    assert built.settings is run and built.nca.state_dtype == torch.bfloat16


def test_configure_points_a_model_at_other_settings():
    nca = NCA(16, 16, 1, backend="torch", checkpoint="none")
    new = nca.configure(backend="triton", precision="tf32", checkpoint="segments=2")
    assert nca.settings is new and (new.backend, new.arithmetic, new.checkpoint) == ("triton", "tf32", "segments=2")
    assert nca.plan(10).segment == 2
    with pytest.raises(ValueError, match="precision"):
        nca.configure(precision="fp16")
    with pytest.raises(ValueError, match="unknown setting"):
        nca.settings.replace(device="cuda")


def test_requests_outside_the_documented_values_name_the_setting():
    with pytest.raises(ValueError, match="precision: expected one of fp32, tf32, fp32-ieee, bf16"):
        Config(precision="ieee")
    with pytest.raises(ValueError, match="backend"):
        NCA(8, 8, 1, backend="cuda")
    with pytest.raises(ValueError, match="checkpoint"):
        NCA(8, 8, 1, checkpoint="segments=0")
    with pytest.raises(ValueError, match="checkpoint"):
        Config(checkpoint="every")
    assert Config(precision="fp32-ieee").precision == "fp32-ieee"


def test_the_record_is_json_and_says_what_ran():
    run = resolve_run(get_preset("small", precision="bf16"), CPU)
    rec = json.loads(json.dumps(run.record()))
    assert rec == {"device": "cpu", "backend": "torch", "backend_source": "capability", "precision": "bf16",
                   "arithmetic": "bf16", "checkpoint": "auto", "wgrad": "per-step"}
    assert "PyTorch reference on cpu, bf16 dots" in run.describe()
    assert isinstance(run, RunSettings)


def test_the_weight_gradient_design_reaches_the_rollout_plan():
    """``wgrad`` and ``wgrad_batch_mib`` go from the config (or the NCA's arguments) through the run settings into
    every rollout plan, and ``replace`` / ``configure`` point a model at the other design; per-step by default."""
    from fastnca.nca import nca_from_config

    cfg = get_preset("small")
    assert resolve_run(cfg, CPU).plan(4).wgrad == "per-step"
    run = resolve_run(cfg.replace(wgrad="batched", wgrad_batch_mib=3), CPU)
    plan = run.plan(4)
    assert (plan.wgrad, plan.wgrad_batch_bytes) == ("batched", 3 * 2**20)
    assert run.replace(wgrad="batched-cublas").plan(4).wgrad == "batched-cublas"
    nca = nca_from_config(cfg.replace(wgrad="batched"))
    assert nca.plan(4).wgrad == "batched"
    nca.configure(wgrad="per-step")
    assert nca.plan(4).wgrad == "per-step"
    with pytest.raises(ValueError, match="wgrad"):
        Config(wgrad="fused")
    with pytest.raises(ValueError, match="wgrad_batch_mib"):
        Config(wgrad_batch_mib=0)
