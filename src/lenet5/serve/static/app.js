// The draw-a-digit page: strokes on a canvas, a debounced POST of the canvas as PNG to
// /v1/predict?maps=true, and the answer drawn as bars, the 28x28 input and every layer's maps.
// The classes (and what to draw) come from /v1/model: digits for MNIST, clothes for Fashion-MNIST...
"use strict";

const canvas = document.getElementById("canvas");
const ctx = canvas.getContext("2d");
const statusLine = document.getElementById("status");
const digitOut = document.getElementById("digit");
const confidenceOut = document.getElementById("confidence");
const bars = document.getElementById("bars");
const prepared = document.getElementById("prepared");
const mapsOut = document.getElementById("maps");
const DEBOUNCE_MS = 120;

let drawing = false, inked = false, timer = null, inFlight = null, pending = false;
let classes = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];

function resetCanvas() {
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.strokeStyle = "#000";
  ctx.lineWidth = 18;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
}

function buildBars() {
  bars.innerHTML = "";
  bars.style.setProperty("--name-width", `${Math.max(1.2, 0.62 * Math.max(...classes.map((c) => c.length)))}em`);
  classes.forEach((name) => {
    const li = document.createElement("li");
    li.innerHTML = '<span class="name"></span><span class="track"><span class="fill"></span></span><span class="pct">0%</span>';
    li.querySelector(".name").textContent = name;  // text, never markup: names come from the checkpoint
    li.setAttribute("aria-label", `${name}: 0 percent`);
    bars.appendChild(li);
  });
}

function point(event) {
  const rect = canvas.getBoundingClientRect();
  return [(event.clientX - rect.left) * canvas.width / rect.width,
          (event.clientY - rect.top) * canvas.height / rect.height];
}

canvas.addEventListener("pointerdown", (event) => {
  drawing = true;
  canvas.setPointerCapture(event.pointerId);
  const [x, y] = point(event);
  ctx.beginPath();
  ctx.moveTo(x, y);
  ctx.lineTo(x + 0.01, y);
  ctx.stroke();
  inked = true;
  schedule();
});
canvas.addEventListener("pointermove", (event) => {
  if (!drawing) return;
  const [x, y] = point(event);
  ctx.lineTo(x, y);
  ctx.stroke();
  schedule();
});
for (const type of ["pointerup", "pointercancel", "pointerleave"]) {
  canvas.addEventListener(type, () => { if (drawing) { drawing = false; schedule(); } });
}

function schedule() {
  clearTimeout(timer);
  timer = setTimeout(predict, DEBOUNCE_MS);
}

async function predict() {
  if (!inked) return;
  if (inFlight) { pending = true; return; }  // one request at a time; the latest drawing wins
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  statusLine.textContent = "thinking...";
  inFlight = fetch("/v1/predict?maps=true", { method: "POST", headers: { "Content-Type": "image/png" }, body: blob })
    .then(async (response) => {
      const body = await response.json();
      if (!response.ok) throw new Error(body.error || response.statusText);
      if (inked) show(body);
      statusLine.textContent = `${body.model}, ${body.inference_ms.toFixed(1)} ms`;
    })
    .catch((error) => { statusLine.textContent = `error: ${error.message}`; })
    .finally(() => {
      inFlight = null;
      if (pending) { pending = false; predict(); }
    });
}

function show(result) {
  digitOut.textContent = result.label ?? String(result.digit);
  confidenceOut.textContent = `${(100 * result.confidence).toFixed(1)}% sure`
    + (result.unsure ? " (unsure: this may not be what the model knows)" : "");
  bars.querySelectorAll("li").forEach((li, d) => {
    const p = result.probabilities[d];
    li.querySelector(".fill").style.width = `${(100 * p).toFixed(1)}%`;
    li.querySelector(".pct").textContent = `${(100 * p).toFixed(0)}%`;
    li.classList.toggle("top", d === result.digit);
    li.setAttribute("aria-label", `${classes[d]}: ${(100 * p).toFixed(0)} percent`);
  });
  prepared.src = result.prepared;
  mapsOut.innerHTML = "";
  for (const layer of result.maps || []) {
    const div = document.createElement("div");
    div.className = "layer";
    const title = document.createElement("h3");
    title.innerHTML = `${layer.name} <span>${layer.shape.join("&times;")}</span>`;
    const img = document.createElement("img");
    img.src = layer.png;
    img.alt = `activations of layer ${layer.name}`;
    img.dataset.layer = layer.name;
    // Small maps drawn large: a few screen pixels per activation.
    img.onload = () => { img.style.width = `${Math.min(img.naturalWidth * (img.naturalWidth < 120 ? 8 : 4), 1000)}px`; };
    div.append(title, img);
    mapsOut.appendChild(div);
  }
}

function clearAll() {
  resetCanvas();
  inked = false;
  clearTimeout(timer);
  digitOut.textContent = "?";
  confidenceOut.textContent = "";
  statusLine.textContent = "cleared";
  prepared.removeAttribute("src");
  buildBars();
  mapsOut.innerHTML = '<p class="muted">Draw a digit to see every layer\'s activations.</p>';
}

document.getElementById("clear").addEventListener("click", clearAll);
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" || event.key === "Delete") clearAll();
});

fetch("/v1/model").then((r) => r.json()).then((m) => {
  const title = m.dataset_title || "MNIST";
  document.getElementById("model").textContent =
    `${m.name}: ${m.parameters.toLocaleString()} parameters, trained on ${title}` +
    (m.metrics && m.metrics.test_acc ? `, ${(100 * m.metrics.test_acc).toFixed(2)}% on its test set` : "");
  if (m.classes && m.classes.length) { classes = m.classes; buildBars(); }
  if (m.noun) {
    const heading = `Draw ${m.noun}`;
    document.querySelector("h1").textContent = heading;
    if (m.noun !== "a digit") document.getElementById("draw-label").textContent = "Your drawing";
    document.title = `lenet5: ${heading.toLowerCase()}`;
    bars.setAttribute("aria-label", "Probability of each class");
  }
}).catch(() => { document.getElementById("model").textContent = "model information unavailable"; });

resetCanvas();
buildBars();
