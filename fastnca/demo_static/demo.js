// fastnca demo page: drives the server's /api endpoints (fastnca/demo.py) and animates the frames they stream.
"use strict";

const $ = (id) => document.getElementById(id);
const HOLD = 6; // the damaged frame stays this many frame times, so the damage is seen before the regrowth

const sample = $("sample");
let info = null;
let frameMs = 80;
let generation = 0; // bumped by every new rollout request: frames of older ones are dropped
let controller = null; // aborts the fetch of the rollout being streamed
const queue = []; // frames received and not shown yet: {gen, item, img (a promise), recon}
let playing = false;
let current = null; // the frame on the canvas: {img, side}
let ready = null; // the finished rollout that can be damaged: {rollout, side}
let mask = null; // Uint8Array(side * side): the cells painted so far
let painting = false;
let lastCell = null; // the pointer's last position in cells, while painting
let interpImages = [];
let interpolatedOnce = false;

// ------------------------------------------------------------------------------------------- helpers
function showMessage(text) {
  const box = $("message");
  box.textContent = text;
  box.hidden = false;
}

function clearMessage() {
  $("message").hidden = true;
  $("message").textContent = "";
}

async function failure(res) {
  let text = `${res.status} ${res.statusText}`;
  try {
    const body = await res.json();
    if (body.error) text = body.error;
  } catch (e) { /* not JSON: keep the status line */ }
  return new Error(text);
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("a frame from the server could not be decoded"));
    img.src = src;
  });
}

function draw(canvas, img) {
  const c = canvas.getContext("2d");
  c.imageSmoothingEnabled = false;
  c.clearRect(0, 0, canvas.width, canvas.height);
  c.drawImage(img, 0, 0, canvas.width, canvas.height);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Reads a newline-delimited JSON response as it arrives and hands each item to onItem.
async function readStream(res, onItem) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let nl;
    while ((nl = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      if (line.trim()) onItem(JSON.parse(line));
    }
  }
}

// ------------------------------------------------------------------------------------------- model header
function addRow(dl, term, text, cls) {
  const dt = document.createElement("dt");
  dt.textContent = term;
  const dd = document.createElement("dd");
  dd.textContent = text;
  if (cls) dd.className = cls;
  dl.append(dt, dd);
  return dd;
}

function showInfo() {
  const dl = $("model");
  dl.replaceChildren();
  addRow(dl, "checkpoint", `${info.checkpoint}: ${info.step} training steps (of ${info.iterations} planned)`);
  const preset = addRow(dl, "preset", info.preset_text);
  preset.title = "the closest preset and the fields where this run's config differs (checkpoints store the config)";
  addRow(dl, "model", `${info.model_text}; ${info.rollout_text}; on ${info.device}, ${info.backend}`);
  addRow(dl, "test", info.test_text);
  addRow(dl, "damage", info.damage_note, info.damage_trained ? "" : "warn");
  const note = $("damage-note");
  note.textContent = info.damage_trained ? "" : "Not trained with damage: regrowth is not expected.";
  note.className = info.damage_trained ? "note" : "note warn";
  $("grey-note").textContent = info.grey_note;
  $("invert-row").hidden = !info.binary;
  const brush = $("brush");
  brush.max = String(Math.max(1, Math.floor(info.side / 4)));
  brush.value = String(Math.max(1, Math.round(info.side / 10)));
  showBrush();
  $("interp-t").max = String(info.interpolation_points - 1);
}

function showBrush() {
  const r = Number($("brush").value);
  $("brush-label").textContent = `radius ${r} cell${r > 1 ? "s" : ""}`;
}

// ------------------------------------------------------------------------------------------- rollouts
function timeline(total, doublings) {
  const bar = $("timeline");
  bar.replaceChildren();
  for (let t = 0; t <= total; t++) {
    const tick = document.createElement("span");
    if (doublings && t > 0 && info.schedule[t - 1]) tick.className = "dbl";
    bar.append(tick);
  }
}

function markTimeline(step) {
  const ticks = $("timeline").children;
  for (let t = 0; t < ticks.length; t++) {
    ticks[t].classList.toggle("past", t < step);
    ticks[t].classList.toggle("cur", t === step);
  }
}

function showStatus(item) {
  const grid = `grid ${item.side}×${item.side}`;
  if (item.phase === "grow") {
    $("step").textContent = `step ${item.step} / ${item.total}`;
    $("event").textContent = item.doubled ? "doubled" : "";
  } else if (item.phase === "damaged") {
    $("step").textContent = `regrowth +0 / ${item.total}`;
    $("event").textContent = `damaged: ${item.cells} cells zeroed`;
  } else {
    $("step").textContent = `regrowth +${item.step} / ${item.total}`;
    $("event").textContent = "";
  }
  $("grid").textContent = grid;
  if (item.step === 0) timeline(item.total, item.phase === "grow");
  markTimeline(item.step);
}

async function show(entry) {
  const item = entry.item;
  if (item.kind === "frame") {
    const img = await entry.img;
    if (entry.gen !== generation) return false;
    draw(sample, img);
    if (entry.recon) draw($("recon"), img);
    current = { img, side: item.side };
    showStatus(item);
    sample.dataset.phase = item.phase;
    sample.dataset.step = String(item.step);
    sample.dataset.rollout = item.rollout;
    return true;
  }
  if (item.kind === "input") {
    const img = await entry.img;
    if (entry.gen !== generation) return false;
    draw($("input"), img);
    $("input").dataset.ready = "1";
    for (const id of ["interp-a-kind", "interp-b-kind"]) $(id).options[1].disabled = false;
    $("interp-b-kind").dataset.image = item.image_id;
    $("interp-a-kind").dataset.image = item.image_id;
    $("recon-caption").textContent = `the reconstruction of ${item.name} (posterior mean), grown on the left`;
    return false;
  }
  if (item.kind === "done") {
    if (entry.gen !== generation) return false;
    ready = { rollout: item.rollout, side: item.side };
    sample.dataset.phase = "done";
    $("event").textContent = item.phase === "grow" ? "grown: paint to damage" : "regrown";
    if (entry.recon) $("recon").dataset.ready = "1";
    if (!interpolatedOnce) {
      interpolatedOnce = true;
      interpolate();
    }
    return false;
  }
  if (item.kind === "error") {
    if (entry.gen === generation) showMessage(item.error);
    return false;
  }
  return false;
}

async function play() {
  if (playing) return;
  playing = true;
  try {
    while (queue.length) {
      const entry = queue.shift();
      if (entry.gen !== generation) continue;
      let shown = false;
      try {
        shown = await show(entry);
      } catch (err) {
        showMessage(err.message);
      }
      if (shown) await sleep(entry.item.phase === "damaged" ? frameMs * HOLD : frameMs);
    }
  } finally {
    playing = false;
  }
}

// Starts a rollout request; its frames are queued as they arrive and shown at most one per frameMs.
async function rollout(url, options, { recon = false } = {}) {
  if (controller) controller.abort();
  controller = new AbortController();
  const gen = ++generation;
  queue.length = 0;
  ready = null;
  mask = null;
  clearMessage();
  sample.dataset.phase = "waiting";
  try {
    const res = await fetch(url, { ...options, signal: controller.signal });
    if (!res.ok) throw await failure(res);
    await readStream(res, (item) => {
      const img = item.image ? loadImage(item.image) : null;
      if (img) img.catch(() => {}); // reported when shown
      queue.push({ gen, item, img, recon });
      play();
    });
  } catch (err) {
    if (err.name === "AbortError" || gen !== generation) return;
    showMessage(err.message);
    sample.dataset.phase = ready ? "done" : "error";
  }
}

function grow() {
  return rollout(`api/grow?seed=${encodeURIComponent($("seed").value)}`, {});
}

function newSample() {
  $("seed").value = String(Math.floor(Math.random() * 2 ** 31));
  return grow();
}

// ------------------------------------------------------------------------------------------- painting damage
function cellAt(event) {
  const rect = sample.getBoundingClientRect();
  const x = ((event.clientX - rect.left) / rect.width) * ready.side;
  const y = ((event.clientY - rect.top) / rect.height) * ready.side;
  return [x, y];
}

function paintDisc(x, y) {
  const side = ready.side;
  const r = Number($("brush").value);
  for (let row = Math.max(0, Math.floor(y - r)); row < Math.min(side, Math.ceil(y + r)); row++) {
    for (let col = Math.max(0, Math.floor(x - r)); col < Math.min(side, Math.ceil(x + r)); col++) {
      const dx = col + 0.5 - x;
      const dy = row + 0.5 - y;
      if (dx * dx + dy * dy <= r * r) mask[row * side + col] = 1;
    }
  }
}

// Paints the brush along the segment from the last pointer position, so a fast stroke leaves no gaps.
function paintAt(event, first) {
  const [x, y] = cellAt(event);
  const [x0, y0] = first ? [x, y] : lastCell;
  const n = Math.max(1, Math.ceil(2 * Math.hypot(x - x0, y - y0)));
  for (let i = 1; i <= n; i++) paintDisc(x0 + ((x - x0) * i) / n, y0 + ((y - y0) * i) / n);
  lastCell = [x, y];
  drawMask();
}

function drawMask() {
  draw(sample, current.img);
  const c = sample.getContext("2d");
  const cell = sample.width / ready.side;
  c.fillStyle = "rgba(220, 40, 40, 0.6)";
  for (let i = 0; i < mask.length; i++) {
    if (mask[i]) c.fillRect((i % ready.side) * cell, Math.floor(i / ready.side) * cell, cell, cell);
  }
}

sample.addEventListener("pointerdown", (event) => {
  if (!ready || !current) {
    $("event").textContent = "wait for the rollout to finish, then paint";
    return;
  }
  painting = true;
  mask = new Uint8Array(ready.side * ready.side);
  sample.setPointerCapture(event.pointerId);
  paintAt(event, true);
});

sample.addEventListener("pointermove", (event) => {
  if (painting) paintAt(event, false);
});

function endPaint() {
  if (!painting) return;
  painting = false;
  if (!mask || !mask.some((v) => v)) return;
  const cells = Array.from(mask).join("");
  sample.dataset.cells = cells; // the painted cells, row-major ('1': zeroed), as sent
  const body = JSON.stringify({ rollout: ready.rollout, cells });
  rollout("api/damage", { method: "POST", headers: { "Content-Type": "application/json" }, body });
}

sample.addEventListener("pointerup", endPaint);
sample.addEventListener("pointercancel", endPaint);

// ------------------------------------------------------------------------------------------- encoding
function encode(file) {
  if (!file) return;
  const params = new URLSearchParams({
    name: file.name || "image",
    invert: $("invert").checked ? "1" : "0",
    seed: $("seed").value,
  });
  $("input").dataset.ready = "0";
  $("recon").dataset.ready = "0";
  return rollout(`api/encode?${params}`, { method: "POST", body: file }, { recon: true });
}

$("file").addEventListener("change", () => encode($("file").files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (event) => {
  event.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  encode(event.dataTransfer.files[0]);
});
// a file dropped beside the zone must not make the browser leave the page to open it
document.addEventListener("dragover", (event) => event.preventDefault());
document.addEventListener("drop", (event) => event.preventDefault());

// ------------------------------------------------------------------------------------------- interpolation
function endPoint(which) {
  const kind = $(`interp-${which}-kind`);
  if (kind.value === "image") return { image: kind.dataset.image };
  return { seed: $(`interp-${which}`).value };
}

// Every point from a to b as thumbnails, the one on the big canvas framed.
function drawStrip(current) {
  const strip = $("interp-strip");
  const c = strip.getContext("2d");
  const n = interpImages.length;
  const size = Math.floor((strip.width - 2 * (n + 1)) / n);
  strip.width = n * size + 2 * (n + 1);
  strip.height = size + 4;
  c.imageSmoothingEnabled = false;
  c.fillStyle = "#fff";
  c.fillRect(0, 0, strip.width, strip.height);
  interpImages.forEach((img, i) => {
    const x = 2 + i * (size + 2);
    if (i === current) {
      c.fillStyle = "#d33";
      c.fillRect(x - 2, 0, size + 4, size + 4);
    }
    c.drawImage(img, x, 2, size, size);
  });
}

function showInterpolation() {
  const i = Number($("interp-t").value);
  const canvas = $("interp");
  if (!interpImages.length) return;
  draw(canvas, interpImages[i]);
  drawStrip(i);
  canvas.dataset.index = String(i);
  $("interp-label").textContent = `t = ${(i / (interpImages.length - 1)).toFixed(3)}`;
}

async function interpolate() {
  const canvas = $("interp");
  canvas.dataset.ready = "0";
  try {
    const body = JSON.stringify({ a: endPoint("a"), b: endPoint("b"), method: $("interp-method").value });
    const res = await fetch("api/interpolate", {
      method: "POST", headers: { "Content-Type": "application/json" }, body,
    });
    if (!res.ok) throw await failure(res);
    const out = await res.json();
    interpImages = await Promise.all(out.images.map(loadImage));
    showInterpolation();
    canvas.dataset.ready = "1";
  } catch (err) {
    showMessage(err.message);
  }
}

// ------------------------------------------------------------------------------------------- start
$("grow").addEventListener("click", grow);
$("new-sample").addEventListener("click", newSample);
$("seed").addEventListener("keydown", (event) => {
  if (event.key === "Enter") grow();
});
$("brush").addEventListener("input", showBrush);
$("interpolate").addEventListener("click", interpolate);
for (const id of ["interp-a-kind", "interp-b-kind", "interp-a", "interp-b", "interp-method"]) {
  $(id).addEventListener("change", interpolate);
}
$("interp-t").addEventListener("input", showInterpolation);

(async () => {
  try {
    const res = await fetch("api/info");
    if (!res.ok) throw await failure(res);
    info = await res.json();
    frameMs = info.frame_ms;
    showInfo();
    grow();
  } catch (err) {
    showMessage(`the model's description could not be read: ${err.message}`);
  }
})();
