"""``fastnca demo``: the model side against the figures' rollouts, the HTTP streams, the CLI's errors, and the page
driven in a real headless Chromium (WebDriver) on a checkpoint trained here.

The browser test saves a screenshot of each view under pytest's tmp dir (``.../screenshots/``, the path is printed)
and, when ``FASTNCA_DEMO_SCREENSHOTS=DIR`` is set, also into DIR (how the README's docs/demo.png was made). It needs
Chromium and its WebDriver (Debian: ``apt-get install chromium chromium-driver``) and the selenium client
(``pip install -e '.[demo-test]'``); it skips, saying which is missing, only where they are not installed.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastnca.cli import main
from fastnca.config import get_preset
from fastnca.demo import INTERPOLATION_POINTS, Demo, DemoError, bind, closest_preset, last_test_result
from fastnca.figures import growth_sequence, image_from_file, regrowth_frames
from fastnca.vae import VNCA

ROOT = Path(__file__).resolve().parents[2]

# a doubling and a non-doubling model small enough for the CPU; p_update < 1 so that the update masks matter
TINY = dict(state_channels=12, hidden_channels=12, n_blocks=1, enc_channels=4, backend="torch")
CONFIGS = {
    "doubling": get_preset("small", **TINY, steps_per_stage=2, p_update=0.5),
    "nondoubling": get_preset("mnist-nondoubling", **TINY, min_steps=3, max_steps=5, damage_size=8),
}


def _model(name: str) -> VNCA:
    torch.manual_seed(1)
    model = VNCA(CONFIGS[name])
    with torch.no_grad():
        for p in model.parameters():  # the output conv starts at zero: every step would be the identity
            p.normal_(0, 0.2)
    return model.eval()


def _demo(name: str, tmp_path: Path) -> Demo:
    return Demo(_model(name), (tmp_path / "checkpoint.pt", {"step": 7}), frame_ms=0)


def _pixels(item: dict) -> np.ndarray:
    """A frame's PNG data URL -> ``(H, W)`` or ``(H, W, 3)`` uint8."""
    data = base64.b64decode(item["image"].split(",", 1)[1])
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im)


def _uint8(frame: torch.Tensor, side: int) -> np.ndarray:
    """A figures frame ``(1, C, S, S)`` in [0, 1] -> the cell grid's ``side`` (it is nearest-upsampled) as uint8."""
    step = frame.shape[-1] // side
    x = (frame[0, :, ::step, ::step].clamp(0, 1) * 255 + 0.5).to(torch.uint8)
    return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()


def _frames(items) -> tuple[list[dict], dict]:
    items = list(items)
    assert items[-1]["kind"] == "done", f"expected the stream to end with 'done', got {items[-1]['kind']!r}"
    return [i for i in items if i["kind"] == "frame"], items[-1]


# ---------------------------------------------------------------------------------------------- the model side
@pytest.mark.parametrize("name", list(CONFIGS))
def test_growth_frames_are_the_figures_growth_sequence(name, tmp_path, one_thread):
    demo = _demo(name, tmp_path)
    frames, done = _frames(demo.grow(5))
    ref, doubled = growth_sequence(demo.model, 1, generator=torch.Generator().manual_seed(5))
    assert len(frames) == len(ref), f"expected one frame per state ({len(ref)}), got {len(frames)}"
    assert [f["doubled"] for f in frames] == doubled
    assert [f["step"] for f in frames] == list(range(len(ref)))
    for f, r in zip(frames, ref):
        assert np.array_equal(_pixels(f), _uint8(r, f["side"])), f"step {f['step']}: expected the figures' frame"
    sides = [f["side"] for f in frames]
    if name == "doubling":
        assert sides[0] == 2 and sides[-1] == 32 and sorted(set(sides)) == [2, 4, 8, 16, 32]
    else:
        assert set(sides) == {28} and len(frames) == 1 + CONFIGS[name].max_steps
    assert done["rollout"] == frames[0]["rollout"] and done["side"] == sides[-1]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_painted_damage_regrows_as_the_regrowth_figure(name, tmp_path, one_thread):
    demo = _demo(name, tmp_path)
    _, done = _frames(demo.grow(3))
    side = done["side"]
    right_half = "".join("1" if col >= side // 2 else "0" for _ in range(side) for col in range(side))
    frames, _ = _frames(demo.regrow(done["rollout"], right_half))
    ref, titles = regrowth_frames(demo.model, 1, kind="half", generator=torch.Generator().manual_seed(3))
    expected_steps = CONFIGS[name].max_steps if name == "nondoubling" else CONFIGS[name].steps_per_stage
    assert len(frames) == 1 + expected_steps, f"expected the damaged frame and {expected_steps} regrowth steps"
    assert [f["phase"] for f in frames] == ["damaged"] + ["regrow"] * expected_steps
    assert frames[0]["cells"] == side * (side - side // 2)
    for f, r, title in zip(frames, ref[1:], titles[1:]):
        assert np.array_equal(_pixels(f), _uint8(r, side)), f"{title}: expected the figures' regrowth frame"
    damaged = _pixels(frames[0])
    assert (damaged[:, side // 2 :] == 128).all(), "expected zeroed cells to show mid-grey (p = 0.5)"
    # the regrown state is kept: damage again continues from it
    again, _ = _frames(demo.regrow(done["rollout"], right_half))
    assert np.array_equal(_pixels(again[0])[:, : side // 2], _pixels(frames[-1])[:, : side // 2])


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_an_uploaded_image_is_read_as_damage_image_reads_it(tmp_path, one_thread):
    demo = _demo("doubling", tmp_path)
    digit = np.zeros((40, 40), dtype=np.uint8)
    digit[8:32, 17:23] = 255  # a white stroke on black, resized to 32x32 by the reader
    path = tmp_path / "one.png"
    path.write_bytes(_png_bytes(digit))
    items = list(demo.encode(path.read_bytes(), "one.png"))
    assert items[0]["kind"] == "input" and items[0]["name"] == "one.png"
    expected = image_from_file(path, demo.config)[0, 0].numpy() * 255
    assert np.array_equal(_pixels(items[0]), expected), "expected the image exactly as `damage --image` reads it"
    frames, done = _frames(items[1:])
    assert len(frames) == 1 + len(demo.schedule) and done["side"] == 32
    inverted = list(demo.encode(_png_bytes(255 - digit), "dark.png", invert=True))
    assert np.array_equal(_pixels(inverted[0]), expected), "expected --invert's reading of dark strokes on light"
    with pytest.raises(DemoError, match=r"'notes.png' is not a readable image file"):
        demo.encode(b"plain text, not an image", "notes.png")
    with pytest.raises(DemoError, match=r"'empty.png': the file is empty"):
        demo.encode(b"", "empty.png")
    # the posterior mean is an interpolation end point
    out = demo.interpolate({"image": items[0]["image_id"]}, {"seed": 1})
    assert len(out["images"]) == INTERPOLATION_POINTS


@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_interpolation_runs_from_one_latent_to_the_other(method, tmp_path, one_thread):
    cfg = get_preset("small", **TINY, steps_per_stage=2)  # p_update = 1: a seed's rollout has no masks to draw
    torch.manual_seed(1)
    model = VNCA(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    demo = Demo(model, (tmp_path / "checkpoint.pt", {"step": 0}))
    out = demo.interpolate({"seed": 4}, {"seed": 9}, method)
    assert out["t"][0] == 0 and out["t"][-1] == 1 and len(out["images"]) == INTERPOLATION_POINTS
    ends = [_frames(demo.grow(s))[0][-1] for s in (4, 9)]
    for got, want, which in ((out["images"][0], ends[0], "a"), (out["images"][-1], ends[1], "b")):
        assert np.array_equal(_pixels({"image": got}), _pixels(want)), f"expected the end {which} to be its sample"
    assert not np.array_equal(_pixels({"image": out["images"][4]}), _pixels(ends[0])), "expected a point between"


def test_bad_requests_name_what_is_wrong(tmp_path):
    demo = _demo("doubling", tmp_path)
    for seed in ("abc", "-1", "1.5", str(2**63), ""):
        with pytest.raises(DemoError, match=r"seed: expected a whole number from 0 to"):
            demo.grow(seed)
    _, done = _frames(demo.grow(0))
    with pytest.raises(DemoError, match=r"rollout 'r999': no such grown sample"):
        demo.regrow("r999", "1" * 32 * 32)
    with pytest.raises(DemoError, match=r"cells: expected 1024 characters '0' or '1' .* got 10 characters"):
        demo.regrow(done["rollout"], "1" * 10)
    with pytest.raises(DemoError, match=r"cells: no cell painted"):
        demo.regrow(done["rollout"], "0" * 1024)
    with pytest.raises(DemoError, match=r"method: expected 'linear' or 'slerp'"):
        demo.interpolate({"seed": 0}, {"seed": 1}, "cubic")
    with pytest.raises(DemoError, match=r"b: no uploaded image 'i42'"):
        demo.interpolate({"seed": 0}, {"image": "i42"})
    with pytest.raises(DemoError, match=r"a: expected \{\"seed\": N\} or \{\"image\": id\}"):
        demo.interpolate(3, {"seed": 1})


def test_info_names_the_preset_the_test_result_and_whether_regrowth_is_expected(tmp_path):
    assert closest_preset(get_preset("mnist-nondoubling")) == ("mnist-nondoubling", {})
    assert closest_preset(get_preset("small", iterations=40, lr=3e-4)) == ("small", {"iterations": 40, "lr": 3e-4})
    rows = [
        {"step": 5, "split": "train", "loss": 1.0},
        {"step": 5, "split": "test", "iwae": -100.5, "bpd": 0.2, "k": 4, "n_images": 16},
        {"step": 9, "split": "test", "iwae": -90.25, "bpd": 0.18, "k": 4, "n_images": 16},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 12, "spl')
    assert last_test_result(tmp_path / "checkpoint.pt", 9)["iwae"] == -90.25
    assert last_test_result(tmp_path / "checkpoint.pt", 8)["iwae"] == -100.5, "expected no row after the step"
    assert last_test_result(tmp_path / "elsewhere" / "checkpoint.pt", 9) is None
    info = Demo(_model("nondoubling"), (tmp_path / "checkpoint.pt", {"step": 9})).info()
    assert info["preset"] == "mnist-nondoubling" and "state_channels=12" in info["preset_text"]
    assert info["test_text"].startswith("test log p(x) >= -90.25 nats") and "step 9" in info["test_text"]
    assert info["damage_trained"] and "regrow" in info["damage_note"]
    assert info["regrow_steps"] == 5 and info["schedule"] == [False] * 5 and not info["doubling"]
    info = _demo("doubling", tmp_path / "none").info()
    assert not info["damage_trained"] and "regrowth is not expected" in info["damage_note"]
    assert info["test"] is None and "no test evaluation" in info["test_text"]
    assert info["schedule"].count(True) == 4 and info["side"] == 32 and info["seed_side"] == 2


# ---------------------------------------------------------------------------------------------- HTTP
@pytest.fixture
def served(tmp_path):
    """A demo server on a free loopback port, in a thread; yields ``(port, demo)``."""
    server = bind("127.0.0.1", 0)
    server.demo = _demo("doubling", tmp_path)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], server.demo
    server.shutdown()
    server.server_close()


def _get(port: int, path: str, method: str = "GET", body: bytes | None = None, timeout: float = 60) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body)
        res = conn.getresponse()
        return res.status, json.loads(res.read())
    finally:
        conn.close()


def test_frames_are_streamed_as_computed_without_blocking_other_requests(served):
    port, demo = served
    release = threading.Event()
    run = demo.model.nca.iter_run

    def held(*args, **kwargs):  # the rollout stops after its first step until the test releases it
        steps = run(*args, **kwargs)
        yield next(steps)
        assert release.wait(20), "the test did not release the rollout"
        yield from steps

    demo.model.nca.iter_run = held
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # a response held back fails after 10 s
    try:
        conn.request("GET", "/api/grow?seed=2")
        res = conn.getresponse()
        assert res.status == 200 and res.getheader("Transfer-Encoding") == "chunked"
        first = [json.loads(res.readline()) for _ in range(2)]
        assert [f["step"] for f in first] == [0, 1], "expected the seed and step 1 while the rollout is held"
        status, info = _get(port, "/api/info", timeout=10)  # answered while the growth's thread is held
        assert status == 200 and info["side"] == 32
        release.set()
        rest = [json.loads(line) for line in res.read().splitlines() if line.strip()]
    finally:
        release.set()
        conn.close()
    assert [f["step"] for f in rest[:-1]] == list(range(2, 1 + len(demo.schedule))) and rest[-1]["kind"] == "done"


def test_http_errors_are_json_messages(served):
    port, _ = served
    assert _get(port, "/api/grow?seed=x") == (
        400,
        {"error": f"seed: expected a whole number from 0 to {2**63 - 1}, got 'x'"},
    )
    status, body = _get(port, "/api/encode?name=a.txt", "POST", b"not an image")
    assert status == 400 and "'a.txt' is not a readable image file" in body["error"]
    status, body = _get(port, "/api/damage", "POST", b"{not json")
    assert status == 400 and body["error"] == "the request is not valid JSON"
    assert _get(port, "/nowhere")[0] == 404 and _get(port, "/api/info", "POST", b"")[0] == 405
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/")
    page = conn.getresponse()
    assert page.status == 200 and b'<canvas id="sample"' in page.read()


# ---------------------------------------------------------------------------------------------- the CLI
def test_a_port_in_use_exits_2_with_a_message(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["demo", "--checkpoint", "anything", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"--port {port}: the port is in use" in err and "--port 0" in err, err


def test_a_missing_checkpoint_exits_2_before_serving(tmp_path, capsys):
    assert main(["demo", "--checkpoint", str(tmp_path / "nothing"), "--port", "0"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["demo", "--checkpoint", "x", "--port", "70000"]) == 2
    assert "--port: expected a TCP port in 0..65535" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the page in a browser
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def _browser_or_skip():
    """The Chromium binary and its WebDriver, or a skip saying what is missing and how to install it."""
    missing = []
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (pip install -e '.[demo-test]')")
    binary = next((p for p in map(shutil.which, BROWSERS) if p), None)
    if binary is None:
        missing.append("a Chromium binary (apt-get install chromium)")
    driver = shutil.which("chromedriver")
    if driver is None:
        missing.append("chromedriver (apt-get install chromium-driver)")
    if missing:
        pytest.skip("the browser test needs " + ", ".join(missing))
    return binary, driver


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """The small preset trained for 40 iterations on the CPU, with a test evaluation at the end."""
    out = tmp_path_factory.mktemp("demo") / "run"
    argv = ["train", "--preset", "small", "--out", str(out), "--no-progress", "--threads", "1"]
    for kv in ("iterations=40", "batch_size=8", "eval_batches=1", "eval_samples=2", "log_every=10"):
        argv += ["--set", kv]
    old = torch.get_num_threads()
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(old)
    return out


def _serve(run: Path) -> tuple[subprocess.Popen, str]:
    """``fastnca demo`` on a free port as a subprocess; its printed address."""
    cmd = [
        sys.executable,
        "-m",
        "fastnca",
        "demo",
        "--checkpoint",
        run.name,
        "--port",
        "0",
        "--threads",
        "1",
        "--frame-ms",
        "150",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=run.parent)
    line = proc.stdout.readline()  # blocks until the server prints its address (or exits)
    match = re.search(r"http://\S+", line)
    if not match:
        proc.kill()
        raise AssertionError(
            f"expected `fastnca demo` to print its address; got {line!r}, stderr {proc.communicate(timeout=30)[1]!r}"
        )
    return proc, match.group(0)


def _chrome(binary: str, driver: str, profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    # headless, and nothing that reaches out to the network (a closed network refuses those connections)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1100,900",
        "--force-device-scale-factor=1",
        "--force-color-profile=srgb",
    ):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")  # a fresh profile
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def _shot(element) -> np.ndarray:
    """An element's screenshot as ``(H, W)`` grey levels (float)."""
    with Image.open(io.BytesIO(element.screenshot_as_png)) as im:
        return np.asarray(im.convert("L"), dtype=np.float64)


def _expected_regrowth(run: Path, seed: int, cells: str) -> list[np.ndarray]:
    """The grown sample of ``seed``, its damaged frame and every regrowth frame, computed in this process on the
    CPU with one thread as the server computes them: ``(32, 32)`` grey levels each."""
    from fastnca.checkpoints import checkpoint_file, load_checkpoint

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, ckpt = load_checkpoint(run, "cpu")
        demo = Demo(model, (checkpoint_file(run), ckpt))
        grown, done = _frames(demo.grow(seed))
        regrowth, _ = _frames(demo.regrow(done["rollout"], cells))
    finally:
        torch.set_num_threads(old)
    return [_pixels(grown[-1]).astype(np.float64)] + [_pixels(f).astype(np.float64) for f in regrowth]


def _cells(shot: np.ndarray, side: int) -> np.ndarray:
    """The pixel at the centre of each of ``side`` x ``side`` cells of a canvas screenshot."""
    at = ((np.arange(side) + 0.5) * shot.shape[0] / side).astype(int)
    return shot[at][:, at]


def _wait(driver, condition, what: str, timeout: float = 60.0):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition())
    except Exception:
        message = driver.find_element("id", "message").text
        raise AssertionError(f"timed out after {timeout} s waiting for {what} (page message: {message!r})") from None


@pytest.mark.slow
@pytest.mark.data("mnist")
def test_the_page_grows_damages_regrows_interpolates_and_encodes_in_a_real_browser(trained_run, tmp_path):
    binary, driver_path = _browser_or_skip()
    from selenium.webdriver.common.action_chains import ActionChains

    shots = tmp_path / "screenshots"
    shots.mkdir()
    extra = os.environ.get("FASTNCA_DEMO_SCREENSHOTS")
    print(f"demo screenshots: {shots}")

    def save(driver, name: str) -> None:
        driver.save_screenshot(str(shots / name))
        if extra:
            Path(extra).mkdir(parents=True, exist_ok=True)
            shutil.copy(shots / name, Path(extra) / name)

    proc, url = _serve(trained_run)
    driver = _chrome(binary, driver_path, tmp_path / "chrome-profile")
    try:
        driver.get(url)
        by_id = lambda name: driver.find_element("id", name)  # noqa: E731
        canvas = by_id("sample")
        phase = lambda: canvas.get_attribute("data-phase")  # noqa: E731

        # the page grows seed 0 on load: the steps are shown one after another as they arrive, doublings included
        seen_steps, seen_grids = [], set()
        deadline = time.monotonic() + 60
        while phase() != "done" and time.monotonic() < deadline:
            step = int(canvas.get_attribute("data-step"))
            if step >= 0 and (not seen_steps or step != seen_steps[-1]):
                seen_steps.append(step)
                seen_grids.add(by_id("grid").text)
        assert phase() == "done", f"expected the first growth to finish, page message {by_id('message').text!r}"
        print(f"growth: steps seen while animating {seen_steps}")
        assert len(seen_steps) >= 5 and seen_steps == sorted(seen_steps), (
            f"expected the growth animated step by step (at 150 ms a frame), saw steps {seen_steps}"
        )
        assert len(seen_grids) >= 3, f"expected the grid to double while growing, saw {sorted(seen_grids)}"
        assert by_id("step").text == "step 20 / 20" and by_id("grid").text == "grid 32×32"
        header = by_id("model").text
        for words in (
            "small with batch_size=8, iterations=40",
            "40 training steps",
            "nats",
            "IWAE k=2",
            "not trained with damage",
            "regrowth is not expected",
        ):
            assert words in header, f"expected {words!r} in the model's description, got {header!r}"

        # a sample of seed 5
        seed = by_id("seed")
        seed.clear()
        seed.send_keys("5")
        by_id("grow").click()
        _wait(driver, lambda: phase() == "done" and canvas.get_attribute("data-rollout") != "r1", "seed 5's growth")
        save(driver, "1-growth.png")
        grown = _shot(canvas)

        # paint a stroke across the middle: the damaged frame shows those cells grey, then the regrowth changes them
        w = canvas.size["width"]
        chain = ActionChains(driver).move_to_element_with_offset(canvas, -w // 4, 0).click_and_hold()
        for _ in range(10):
            chain.move_by_offset(w // 20, 0)
        chain.release().perform()
        _wait(driver, lambda: phase() == "damaged", "the damaged frame")
        damaged = _shot(canvas)
        assert phase() == "damaged", "expected the damaged frame on screen while its screenshot was taken"
        save(driver, "2-damaged.png")
        regrowth = {}  # regrowth step -> the canvas's screenshot, for the frames the polling caught
        deadline = time.monotonic() + 60
        while phase() in ("damaged", "regrow") and time.monotonic() < deadline:
            step, shot = canvas.get_attribute("data-step"), _shot(canvas)
            if phase() == "regrow" and canvas.get_attribute("data-step") == step:
                regrowth[int(step)] = shot
        assert phase() == "done", f"expected the regrowth to finish, page message {by_id('message').text!r}"
        regrown = _shot(canvas)
        save(driver, "3-regrown.png")
        assert by_id("step").text == "regrowth +4 / 4"
        cells = canvas.get_attribute("data-cells")
        painted = np.array([c == "1" for c in cells]).reshape(32, 32)
        rows = np.nonzero(painted.any(1))[0]
        assert 0.05 < painted.mean() < 0.5 and rows.min() > 6 and rows.max() < 26, (
            f"expected a band of painted cells across the middle, got rows {rows.min()}..{rows.max()}"
        )

        # the page shows the model's frames: the same rollout computed here, cell for cell
        expected = _expected_regrowth(trained_run, 5, cells)
        assert np.array_equal(_cells(grown, 32), expected[0]), "expected the grown sample of seed 5"
        assert np.array_equal(_cells(damaged, 32), expected[1]), "expected the damaged frame"
        assert (_cells(damaged, 32)[painted] == 128).all(), "expected the zeroed cells mid-grey (p = 0.5)"
        assert np.array_equal(_cells(damaged, 32)[~painted], _cells(grown, 32)[~painted]), (
            "expected no change outside the painted cells"
        )
        for step, shot in regrowth.items():
            assert np.array_equal(_cells(shot, 32), expected[1 + step]), f"regrowth +{step}: expected its frame"
        assert np.array_equal(_cells(regrown, 32), expected[-1]), "expected the last regrowth frame"
        # the damaged cells change over the next frames (measured on the screenshots' pixels)
        region = np.kron(painted, np.ones((9, 9), dtype=bool))  # 288 px canvas, 9 px per cell
        changed = np.abs(regrown - damaged)[region].mean()
        assert changed > 2, f"expected the damaged cells to change over the regrowth, mean change {changed:.2f}"
        print(
            f"regrowth: painted cells differ from the grown image by {np.abs(damaged - grown)[region].mean():.1f} "
            f"grey levels when damaged, {np.abs(regrown - grown)[region].mean():.1f} after; changed by "
            f"{changed:.1f}; frames caught {sorted(regrowth)}"
        )

        # the interpolation: slider from a to b
        slider = by_id("interp-t")
        interp = by_id("interp")
        _wait(driver, lambda: interp.get_attribute("data-ready") == "1", "the interpolation images")
        start = _shot(interp)
        ActionChains(driver).drag_and_drop_by_offset(slider, slider.size["width"], 0).perform()
        _wait(driver, lambda: interp.get_attribute("data-index") == str(INTERPOLATION_POINTS - 1), "the slider at b")
        end = _shot(interp)
        assert by_id("interp-label").text == "t = 1.000"
        assert np.abs(end - start).mean() > 1, "expected the slider to show another image at its other end"
        save(driver, "4-interpolation.png")

        # upload a test digit: the page shows it as the model sees it, and grows its reconstruction
        from fastnca.data import load_mnist

        digit = load_mnist(image_size=32).test[3, 0].numpy() * 255
        path = tmp_path / "digit.png"
        Image.fromarray(digit.astype(np.uint8)).resize((64, 64), Image.Resampling.NEAREST).save(path)
        by_id("file").send_keys(str(path))
        _wait(
            driver,
            lambda: by_id("recon").get_attribute("data-ready") == "1" and phase() == "done",
            "the reconstruction of the uploaded digit",
        )
        assert np.array_equal(_cells(_shot(by_id("input")), 32), digit), "expected the digit shown cell for cell"
        recon = _cells(_shot(by_id("recon")), 32)
        assert np.array_equal(recon, _cells(_shot(canvas), 32)), "expected the reconstruction grown on the left"
        save(driver, "5-encoded.png")
        # the README's picture: damage on the reconstruction, as `fastnca damage --image` does
        ActionChains(driver).move_to_element_with_offset(canvas, w // 8, -w // 8).click_and_hold().move_by_offset(
            w // 4, w // 4
        ).release().perform()
        _wait(driver, lambda: phase() == "damaged", "the damaged reconstruction")
        save(driver, "demo.png")
        _wait(driver, lambda: phase() == "done", "the regrown reconstruction")

        # an unreadable file: a message in the page
        bad = tmp_path / "notes.png"
        bad.write_text("not an image")
        by_id("file").send_keys(str(bad))
        _wait(driver, lambda: by_id("message").is_displayed(), "the message about the unreadable file")
        assert "'notes.png' is not a readable image file" in by_id("message").text
        save(driver, "6-bad-image.png")
    finally:
        driver.quit()
        proc.terminate()
        proc.wait(timeout=30)
    for name in ("1-growth", "2-damaged", "3-regrown", "4-interpolation", "5-encoded", "demo", "6-bad-image"):
        assert (shots / f"{name}.png").stat().st_size > 0
