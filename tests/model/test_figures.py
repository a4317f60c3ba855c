"""The paper's figures from a tiny trained run: every figure is drawn, with the expected size and layout, the
same for a seed, captioned; inpainting a user's image; the MNIST labels the t-SNE colours by."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastnca import figures
from fastnca.cli import main
from fastnca.config import get_preset
from fastnca.data import load_mnist
from fastnca.figures import (
    FIGURES,
    GIF_HEADER_H,
    HEADER_H,
    MNIST_TEST_CLASS_COUNTS,
    interpolate_latents,
    make_figures,
    mnist_test_labels,
)
from fastnca.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # bitwise comparisons, 2 shared cores

needs_data = pytest.mark.skipif(not os.environ.get("FASTNCA_DATA"), reason="FASTNCA_DATA not set")

# small preset: 2x2 seed, K=4 doublings of M=4 steps -> 32x32; shown at scale 2 (64 px) in labelled figures
SIDE, N_FRAMES, N_DOUBLINGS, M = 32, 21, 4, 4


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A small-preset checkpoint after 3 training steps (real MNIST), shared by this module's tests."""
    if not os.environ.get("FASTNCA_DATA"):
        pytest.skip("FASTNCA_DATA not set")
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("figures") / "run"
    cfg = get_preset("small", iterations=3, batch_size=8, eval_every=0, ckpt_every=0, log_every=1)
    Trainer(cfg, out, progress=False, final_outputs=False, log=lambda m: None).fit()
    return out


@pytest.fixture(scope="module")
def drawn(run_dir):
    """Every figure but the t-SNE, seed 0 (the t-SNE has its own test: it needs scikit-learn)."""
    out = run_dir / "figs-a"
    written, skipped = make_figures(run_dir, out, only=[n for n in FIGURES if n != "tsne"], seed=0, device="cpu")
    return out, written, skipped


def _size(path):
    with Image.open(path) as im:
        return im.size


def _pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _gif_frames(path):
    with Image.open(path) as im:
        return im.n_frames, im.size


def test_the_cli_lists_the_registry_and_refuses_unknown_names(capsys):
    assert main(["figures", "--list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == list(FIGURES), f"--list names the registry in drawing order, got {listed}"
    assert main(["figures", "--checkpoint", "nowhere", "--only", "samples", "growht"]) == 2
    assert "unknown figure(s) growht" in capsys.readouterr().err, "an unknown name is refused before any work"


def test_every_figure_is_written_with_a_caption(drawn):
    out, written, skipped = drawn
    assert skipped == {}, f"expected no figure skipped for an MNIST doubling run, got {skipped}"
    expected = {
        "samples": ["samples.png", "samples.txt"],
        "reconstructions": ["reconstructions.png", "reconstructions.txt"],
        "growth": ["growth.png", "growth.gif", "growth.txt"],
        "interpolation": [
            "interpolation_linear.png",
            "interpolation_linear.txt",
            "interpolation_slerp.png",
            "interpolation_slerp.txt",
        ],
        "damage": ["damage_half.png", "damage_half.txt", "damage_square.png", "damage_square.txt"],
        "regrowth": ["regrowth.png", "regrowth.gif", "regrowth.txt"],
    }
    assert {k: [p.name for p in v] for k, v in written.items()} == expected
    for files in written.values():
        for p in files:
            assert p.is_file() and p.stat().st_size > 0, p
    for caption in out.glob("*.txt"):
        text = caption.read_text()
        assert "step 3" in text and "seed 0" in text and "K=4" in text, (
            f"{caption.name}: expected step, seed, K in {text!r}"
        )
    for name in ("damage_half", "damage_square", "regrowth"):
        assert "zeroed" in (out / f"{name}.txt").read_text(), f"{name}: expected the caption to say what grey is"


def test_grid_figures_have_the_expected_pixel_size(drawn):
    out, _, _ = drawn
    assert _size(out / "samples.png") == (8 * (SIDE + 2) + 2,) * 2, "8x8 grid of 32 px images, 2 px padding"
    w, h = 64, 64  # scale 2
    assert _size(out / "reconstructions.png")[1] == 2 * (h + 2) + 2, "two rows: data, reconstruction"
    label_w = figures._text_width("reconstruction") + 8
    assert _size(out / "reconstructions.png")[0] == label_w + 16 * (w + 2), "16 columns after the labels"
    for method in ("linear", "slerp"):
        width, height = _size(out / f"interpolation_{method}.png")
        assert height == 4 * (h + 2) + 2, f"{method}: four pairs"
        assert width == figures._text_width(f"{method} 1") + 8 + 10 * (w + 2), f"{method}: a, 8 points, b"
    rows_damage = 1 + 2 * (N_DOUBLINGS + 1)  # samples, then damaged/recovered per stage
    for kind in ("half", "square"):
        assert _size(out / f"damage_{kind}.png")[1] == rows_damage * (h + 2) + 2 + figures.FOOTER_H, kind


def test_growth_picture_layout_steps_and_doublings(drawn):
    out, _, _ = drawn
    gap, sep = 1, 3
    width = N_FRAMES * SIDE + (N_FRAMES - 1 - N_DOUBLINGS) * gap + N_DOUBLINGS * sep + 2 * gap
    assert _size(out / "growth.png") == (width, HEADER_H + 8 * (SIDE + gap) + gap)
    px = _pixels(out / "growth.png")
    red = np.all(px == np.array(figures._SEPARATOR), axis=-1).all(axis=0)  # whole-height red columns
    starts = [x for x in range(1, px.shape[1]) if red[x] and not red[x - 1]]
    expected = [gap + (1 + (s + 1) * M) * (SIDE + gap) + s * (sep - gap) - gap for s in range(N_DOUBLINGS)]
    assert starts == expected, f"expected a red bar before steps 5, 9, 13, 17 at x={expected}, got {starts}"
    header = px[:HEADER_H]
    assert (header < 128).any(axis=-1).any(), "expected step numbers and grid sizes drawn in the header"
    n_frames, size = _gif_frames(out / "growth.gif")
    assert n_frames == N_FRAMES and size == (4 * (2 * SIDE + 2) + 2, 4 * (2 * SIDE + 2) + 2 + GIF_HEADER_H)


def test_regrowth_grid_and_gif(drawn):
    out, _, _ = drawn
    n_cols = 2 + M  # grown, damaged, +1..+M (a doubling model regrows for M steps)
    width, height = _size(out / "regrowth.png")
    assert height == HEADER_H + 8 * (64 + 2) + 2 + figures.FOOTER_H
    assert width == max(n_cols * (64 + 2) + 2, figures._text_width(figures.DAMAGE_NOTE) + 8)
    px = _pixels(out / "regrowth.png")
    damaged_col = px[HEADER_H + 2 : HEADER_H + 2 + 64, 2 + (64 + 2) + 40]  # right half of the 'damaged' column
    assert (damaged_col == 128).all(), "expected zeroed cells as flat grey (p = 0.5) in the damaged column"
    n_frames, _ = _gif_frames(out / "regrowth.gif")
    assert n_frames == 2 + M, "grown, damaged, then every regrowth step"


def test_figures_are_deterministic_for_a_seed(run_dir, drawn):
    out_a, _, _ = drawn
    out_b = run_dir / "figs-b"
    make_figures(run_dir, out_b, only=["growth", "damage", "samples"], seed=0, device="cpu")
    for name in ("growth.png", "growth.gif", "damage_square.png", "samples.png"):
        assert (out_a / name).read_bytes() == (out_b / name).read_bytes(), f"{name}: expected identical files"
    out_c = run_dir / "figs-c"
    make_figures(run_dir, out_c, only=["samples"], seed=1, device="cpu")
    assert not np.array_equal(_pixels(out_a / "samples.png"), _pixels(out_c / "samples.png")), "seed 1 vs 0"


def test_interpolation_ends_and_slerp_norm():
    a, b = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 3.0])
    for method in ("linear", "slerp"):
        z = interpolate_latents(a, b, 5, method)
        assert torch.allclose(z[0], a) and torch.allclose(z[-1], b), method
    lin, sph = interpolate_latents(a, b, 3, "linear"), interpolate_latents(a, b, 3, "slerp")
    assert torch.allclose(lin[1], torch.tensor([1.5, 1.5]))
    assert torch.allclose(sph.norm(dim=1), torch.full((3,), 3.0)), "slerp keeps the norm of equal-norm ends"


@needs_data
def test_mnist_labels_inferred_from_position_match_the_data():
    """The test split is sorted by class: around each inferred boundary between classes c and c+1, the split
    point that best separates images nearer to class c's mean from images nearer to c+1's lies within 5
    images of the boundary given by MNIST's class counts."""
    labels = mnist_test_labels(10000)
    assert torch.bincount(labels).tolist() == list(MNIST_TEST_CLASS_COUNTS)
    x = load_mnist(image_size=28).test.view(10000, -1).float().numpy()
    lab = labels.numpy()
    means = np.stack([x[lab == c].mean(0) for c in range(10)])
    for c, b in enumerate(np.cumsum(MNIST_TEST_CLASS_COUNTS)[:-1]):
        window = x[b - 150 : b + 150]
        nearer_next = ((window - means[c + 1]) ** 2).sum(1) < ((window - means[c]) ** 2).sum(1)
        scores = {}
        for off in range(-50, 51):
            s = 150 + off
            scores[off] = (~nearer_next[s - 100 : s]).sum() + nearer_next[s : s + 100].sum()
        best = max(scores, key=scores.get)
        assert abs(best) <= 5, f"boundary {c}|{c + 1}: expected the best split near image {b}, found {b + best}"
    with pytest.raises(ValueError, match="10,000"):
        mnist_test_labels(9999)


def test_tsne_figure(run_dir):
    pytest.importorskip("sklearn", reason="scikit-learn is not installed: the t-SNE figure is an optional extra")
    out = run_dir / "figs-tsne"
    written, skipped = make_figures(run_dir, out, only=["tsne"], seed=0, device="cpu", tsne_images=200)
    assert skipped == {}, skipped
    assert _size(out / "tsne.png") == (640 + 60, 640)
    px = _pixels(out / "tsne.png")
    colours = {tuple(c) for c in px[:, :640].reshape(-1, 3).tolist()}
    assert sum(tuple(p) in colours for p in figures._PALETTE) == 10, "expected dots of all ten classes"
    assert "inferred" in (out / "tsne.txt").read_text(), "expected the caption to say how labels were obtained"
    make_figures(run_dir, run_dir / "figs-tsne-2", only=["tsne"], seed=0, device="cpu", tsne_images=200)
    assert (out / "tsne.png").read_bytes() == (run_dir / "figs-tsne-2" / "tsne.png").read_bytes(), "same seed"


def test_tsne_is_skipped_with_a_message_without_scikit_learn(run_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)
    messages = []
    written, skipped = make_figures(run_dir, run_dir / "figs-nosk", only=["tsne"], device="cpu", log=messages.append)
    assert written == {} and "scikit-learn" in skipped["tsne"], skipped
    assert any("skipped tsne" in m for m in messages), messages


def test_figures_cli_default_folder_and_bad_name(run_dir, capsys):
    assert main(["figures", "--checkpoint", str(run_dir), "--only", "samples", "--device", "cpu"]) == 0
    assert (run_dir / "figures" / "samples.png").is_file(), "expected RUN/figures by default"
    assert main(["figures", "--checkpoint", str(run_dir), "--only", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert "nonsense" in err and "growth" in err, f"expected the bad name and the valid ones in: {err}"


def test_inpaint_user_image_with_mask(run_dir, tmp_path):
    digit = Image.new("L", (28, 28), 0)
    digit.paste(255, (10, 4, 18, 24))  # a white bar on black: a "1"
    digit.save(tmp_path / "digit.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # the left half of the grid
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "out"
    args = ["damage", "--checkpoint", str(run_dir), "--out", str(out), "--image", str(tmp_path / "digit.png")]
    assert main([*args, "--mask", str(tmp_path / "mask.png"), "--device", "cpu"]) == 0
    for name in ("inpaint.png", "inpaint.gif", "inpaint.txt"):
        assert (out / name).is_file(), name
    scale = 128 // SIDE
    px = _pixels(out / "inpaint.png")
    size = SIDE * scale
    damaged = px[HEADER_H + 2 : HEADER_H + 2 + size, 2 + 2 * (size + 2) : 2 + 2 * (size + 2) + size]
    assert (damaged[:, : size // 2] == 128).all(), "expected the masked (left) cells zeroed: flat grey"
    assert not (damaged[:, size // 2 :] == 128).all(), "expected the unmasked cells kept"
    n_frames, _ = _gif_frames(out / "inpaint.gif")
    assert n_frames == 2 + M
    assert main(["damage", "--checkpoint", str(run_dir), "--out", str(out), "--mask", "m.png"]) == 2


@needs_data
def test_nondoubling_run_figures(tmp_path):
    """A non-doubling model (figs. 9, 10): growth on the full grid, damage then max_steps of regrowth."""
    cfg = get_preset(
        "mnist-nondoubling",
        state_channels=8,
        hidden_channels=8,
        enc_channels=4,
        batch_size=8,
        min_steps=2,
        max_steps=3,
        pool_size=16,
        iterations=2,
        eval_every=0,
        ckpt_every=0,
        log_every=1,
    )
    run = tmp_path / "run"
    Trainer(cfg, run, progress=False, final_outputs=False, log=lambda m: None).fit()
    out = tmp_path / "figs"
    written, skipped = make_figures(run, out, only=["growth", "damage", "regrowth"], device="cpu")
    assert skipped == {} and set(written) == {"growth", "damage", "regrowth"}
    side, gap = 28, 1
    assert _size(out / "growth.png") == ((3 + 1) * (side + gap) + gap, HEADER_H + 8 * (side + gap) + gap)
    scale = 64 // side
    assert _size(out / "damage_half.png")[1] == 3 * (side * scale + 2) + 2 + figures.FOOTER_H, "3 rows"
    assert _gif_frames(out / "regrowth.gif")[0] == 2 + 3, "grown, damaged, max_steps steps of regrowth"
    assert "after 3 more steps" in (out / "damage_half.txt").read_text()
    assert "trained without damage" not in (out / "damage_half.txt").read_text(), "this model trained with damage"


def test_damage_captions_of_a_model_trained_without_damage_say_why_it_does_not_regrow(drawn, run_dir, tmp_path):
    """The quickstart (small preset) trains without pool or damage: its damage figures show no regrowth."""
    out = run_dir / "figs-a"
    for name in ("damage_half.txt", "damage_square.txt", "regrowth.txt"):
        text = (out / name).read_text()
        assert "trained without damage (pool_size=0), so it is not expected to regrow" in text, f"{name}: {text}"
    digit = tmp_path / "digit.png"
    Image.new("L", (28, 28), 0).save(digit)
    assert main(["damage", "--checkpoint", str(run_dir), "--out", str(tmp_path / "o"), "--image", str(digit)]) == 0
    assert "trained without damage" in (tmp_path / "o" / "inpaint.txt").read_text()


@needs_data
def test_experiment_runner_draws_the_figures(tmp_path):
    path = Path(__file__).resolve().parents[2] / "experiments" / "run.py"
    spec = importlib.util.spec_from_file_location("experiments_run", path)
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    out = tmp_path / "exp"
    args = ["--preset", "small", "--iterations", "2", "--eval-batches", "1", "--k", "2", "--no-record"]
    args += ["--set", "batch_size=8", "--set", "eval_every=0", "--threads", "1", "--out", str(out)]
    assert run.main([*args, "--figures", "samples", "growth"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["figures"] == ["growth", "samples"] and result["figures_skipped"] == {}, result
    for name in ("samples.png", "samples.txt", "growth.png", "growth.gif", "growth.txt"):
        assert (out / "figures" / name).is_file(), name


def test_figures_needing_test_images_are_skipped_without_data(run_dir, tmp_path):
    messages = []
    written, skipped = make_figures(
        run_dir, tmp_path / "figs", only=["samples", "reconstructions"], data_dir=tmp_path / "nowhere",
        device="cpu", log=messages.append,
    )  # fmt: skip
    assert list(written) == ["samples"], "figures drawn from the prior need no data"
    assert "nowhere" in skipped["reconstructions"], f"expected the missing folder named: {skipped}"
    assert any("skipped reconstructions" in m for m in messages), messages
