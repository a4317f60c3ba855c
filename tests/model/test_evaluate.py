"""Checkpoint reading and the IWAE evaluation loop (fastnca/evaluate.py): messages for files that are not
checkpoints, the time estimate before a long first batch, and which step-count estimator ran."""

from __future__ import annotations

import pytest
import torch

from fastnca.checkpoints import read_checkpoint
from fastnca.evaluate import evaluate_iwae
from fastnca.vae import build_model


class _NotAContainer:
    pass


@pytest.mark.parametrize(
    "content, pattern",
    [
        (bytes(range(256)) * 8, "is not a checkpoint file"),
        (b'{"step": 1, "split": "train"}\n', "is not a checkpoint file"),
        (None, "holds Python objects other than tensors"),
    ],
)
def test_a_file_that_is_not_a_checkpoint_is_named_without_unsafe_advice(tmp_path, content, pattern):
    """torch's own message for these advises weights_only=False, which would run the file's code: never shown."""
    path = tmp_path / "checkpoint.pt"
    if content is None:
        torch.save({"model": _NotAContainer(), "config": {}}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=pattern) as err:
        read_checkpoint(path)
    text = str(err.value)
    assert "weights_only set to False" not in text and "Re-running" not in text, text
    assert "fastnca train" in text, f"expected the message to say what a checkpoint is, got {text}"


def test_a_truncated_checkpoint_is_called_damaged(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": {"w": torch.zeros(1000)}, "config": {}}, path)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(ValueError, match="damaged or truncated|not a checkpoint file"):
        read_checkpoint(path)


def test_a_long_first_batch_is_estimated_before_it_runs():
    """With k = 1000 one batch is several chunks of grids: the estimate comes before the batch, not after it."""
    model = build_model("small", state_channels=8, hidden_channels=8, enc_channels=4, steps_per_stage=1)
    events = []
    real = model.iwae

    def iwae(x, k, **kw):
        events.append(("iwae", x.shape[0], k))
        return real(x, k, **kw)

    model.iwae = iwae
    images = torch.zeros(4, 1, 32, 32, dtype=torch.uint8)
    evaluate_iwae(model, images, k=1000, batch_size=2, on_first_batch=lambda s, n: events.append(("estimate", s, n)))
    kinds = [e[0] for e in events]
    first_batch = next(i for i, e in enumerate(events) if e[:2] == ("iwae", 2))
    assert kinds.index("estimate") < first_batch, f"expected the estimate before the first batch: {events}"
    estimate = next(e for e in events if e[0] == "estimate")
    assert estimate[1] > 0 and estimate[2] == 2, estimate
    assert events[0] == ("iwae", 1, 256), "expected the probe to be one chunk of 256 grids of one image"
    assert kinds.count("estimate") == 1


def test_the_result_says_which_step_count_estimator_ran():
    model = build_model("mnist-nondoubling", state_channels=8, hidden_channels=8, enc_channels=4, min_steps=2,
                        max_steps=4)
    images = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    assert evaluate_iwae(model, images, k=2, batch_size=4)["iwae_steps"] == "image", "the paper presets' default"
    assert evaluate_iwae(model, images, k=2, batch_size=4, steps="sample")["iwae_steps"] == "sample"
    doubling = build_model("small", state_channels=8, hidden_channels=8, enc_channels=4, steps_per_stage=1)
    assert "iwae_steps" not in evaluate_iwae(doubling, torch.zeros(2, 1, 32, 32, dtype=torch.uint8), k=1,
                                             batch_size=2), "a doubling model has no random T"
