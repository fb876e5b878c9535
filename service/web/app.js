// The page talks only to this server: /v1/models once, then one request per image,
// POST /v1/predict?top_k=10&feature_maps=true&input=true, from whose answer it draws the model input
// and every conv layer's channels on canvases. No build step, no libraries.
"use strict";

const state = { classes: [], layers: [], ready: null, explanations: [], oodThreshold: null };
const queue = [];
let active = 0;
const CONCURRENT_IMAGES = 2; // enough to overlap uploads, few enough not to swamp a small server
const PREDICT = "/v1/predict?top_k=10&feature_maps=true&input=true";
// The overlays beside each prediction, one request per method the model offers (GET /v1/models: explanations).
const EXPLAIN = "/v1/explain?format=png&method=";
const METHOD_NAMES = { gradcam: "Grad-CAM", layercam: "LayerCAM", occlusion: "Occlusion" };
const KEY_STORAGE = "fashion-serve.api-key"; // sessionStorage: this tab only, gone when it closes

const $ = (selector, root = document) => root.querySelector(selector);

function percent(p) {
  if (p >= 0.9995) return "100%";
  if (p > 0 && p < 0.001) return "<0.1%";
  return `${(p * 100).toFixed(1)}%`;
}

// ---------------------------------------------------------------------------------------- API key

const keyWaiters = [];

function storedKey() {
  try {
    return sessionStorage.getItem(KEY_STORAGE) || "";
  } catch (_) {
    return ""; // storage disabled: the key lives in memory only
  }
}

let memoryKey = "";
function currentKey() { return storedKey() || memoryKey; }

function rememberKey(key) {
  memoryKey = key;
  try {
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
  } catch (_) { /* memory only */ }
}

// The service wants a key (401): show the field, say why, and wait until one is entered.
function askForKey(message) {
  const form = $("#key-form");
  form.hidden = false;
  $("#key-note").textContent = message;
  $("#forget-key").hidden = !currentKey();
  $("#api-key").focus();
  return new Promise((resolve) => keyWaiters.push(resolve));
}

function setUpKeyForm() {
  const form = $("#key-form");
  if (currentKey()) {
    form.hidden = false;
    $("#api-key").value = currentKey();
    $("#forget-key").hidden = false;
    $("#key-note").textContent = "Using the key entered earlier in this tab.";
  }
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("#api-key").value.trim();
    if (!key) return;
    rememberKey(key);
    $("#forget-key").hidden = false;
    $("#key-note").textContent = "Checking the key…";
    keyWaiters.splice(0).forEach((resolve) => resolve());
  });
  $("#forget-key").addEventListener("click", () => {
    rememberKey("");
    $("#api-key").value = "";
    $("#forget-key").hidden = true;
    $("#key-note").textContent = "Key forgotten. The service will ask again if it needs one.";
  });
}

class KeyRefused extends Error {}

// fetch, with the key when there is one; a 401 shows the key field and throws.
async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = currentKey();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    const message = await errorOf(response);
    const note = key ? "The service refused this key: enter the right one." : "This service needs an API key.";
    askForKey(note);
    throw new KeyRefused(message);
  }
  if (!response.ok) throw new Error(await errorOf(response));
  return response;
}

// The API answers every error as {"error": "..."}; anything else (a proxy's page) still gets a line.
async function errorOf(response) {
  try {
    const body = await response.json();
    if (body && typeof body.error === "string") return body.error;
  } catch (_) { /* not JSON */ }
  return `${response.status} ${response.statusText || "error"}`;
}

// ------------------------------------------------------------------------------------------ model

async function loadModel() {
  const info = $("#model-info");
  for (let attempt = 0; ; attempt++) {
    try {
      const response = await api("/v1/models");
      const model = (await response.json()).models[0];
      state.classes = model.classes;
      state.layers = model.outputs.filter((o) => o.kind === "feature_map");
      state.explanations = model.explanations || [];
      state.oodThreshold = model.out_of_distribution ? model.out_of_distribution.threshold : null;
      const accuracy = model.metrics && model.metrics.test_accuracy;
      info.textContent = `Model ${model.name}, version ${model.version}` +
        (typeof accuracy === "number" ? ` · test accuracy ${percent(accuracy)}` : "");
      if (currentKey()) $("#key-note").textContent = "Key accepted; kept for this tab only.";
      return;
    } catch (error) {
      if (error instanceof KeyRefused) {
        info.textContent = "Waiting for an API key…";
        await new Promise((resolve) => keyWaiters.push(resolve));
        attempt = -1;
        continue;
      }
      // 503 while the model loads: keep trying for a while, and say so.
      info.textContent = `Model not available yet (${error.message}); retrying…`;
      if (attempt >= 30) throw error;
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  }
}

// ---------------------------------------------------------------------------------------- drawing

// values: a Float32Array of height*width; drawn min-max normalised (a constant channel is black),
// as the server's own /v1/feature-maps PNGs are.
function drawGray(canvas, values, width, height) {
  canvas.width = width;
  canvas.height = height;
  let low = Infinity;
  let high = -Infinity;
  for (const v of values) {
    if (v < low) low = v;
    if (v > high) high = v;
  }
  const span = high > low ? high - low : 1;
  const context = canvas.getContext("2d");
  const image = context.createImageData(width, height);
  values.forEach((v, i) => {
    const level = Math.round(((Number.isFinite(v) ? v : low) - low) / span * 255);
    image.data.set([level, level, level, 255], i * 4);
  });
  context.putImageData(image, 0, 0);
  return { low, high };
}

// [height][width][channels] nested lists -> one Float32Array per channel.
function channelsOf(data, height, width, channels) {
  const planes = Array.from({ length: channels }, () => new Float32Array(height * width));
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const cell = data[y][x];
      for (let c = 0; c < channels; c++) planes[c][y * width + x] = cell[c];
    }
  }
  return planes;
}

function buildBars(list) {
  list.replaceChildren();
  state.classes.forEach((name) => {
    const item = document.createElement("li");
    item.className = "bar";
    const label = document.createElement("span");
    label.className = "bar-label";
    label.textContent = name;
    const track = document.createElement("span");
    track.className = "bar-track";
    track.setAttribute("aria-hidden", "true");
    const fill = document.createElement("span");
    fill.className = "bar-fill";
    track.append(fill);
    const value = document.createElement("span");
    value.className = "bar-value";
    value.textContent = "–";
    item.append(label, track, value);
    list.append(item);
  });
}

function showPrediction(card, result) {
  const best = result.class_id;
  $(".label", card).textContent = result.label;
  $(".confidence", card).textContent = `${percent(result.probabilities[best])} confident`;
  const bars = card.querySelectorAll(".bar");
  result.probabilities.forEach((p, i) => {
    const bar = bars[i];
    // CSSOM writes are allowed under the page's Content-Security-Policy; style="" attributes are not.
    $(".bar-fill", bar).style.width = `${Math.max(0, Math.min(1, p)) * 100}%`;
    $(".bar-value", bar).textContent = percent(p);
    bar.classList.toggle("top", i === best);
    if (i === best) bar.setAttribute("aria-current", "true");
  });
}

function showInput(card, input, name) {
  const [height, width] = input.shape;
  const canvas = $(".model-input", card);
  const values = new Float32Array(height * width);
  input.data.forEach((row, y) => row.forEach((cell, x) => { values[y * width + x] = cell[0]; }));
  // The input is already in [0, 1]: drawn as it is, not stretched.
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  const image = context.createImageData(width, height);
  values.forEach((v, i) => {
    const level = Math.round(Math.max(0, Math.min(1, v)) * 255);
    image.data.set([level, level, level, 255], i * 4);
  });
  context.putImageData(image, 0, 0);
  canvas.setAttribute("aria-label", `The ${width}×${height} input the model saw for ${name}`);
  canvas.dataset.drawn = "true";
}

// The model's out-of-distribution flag (in_distribution false): say plainly that the label is a guess.
function showOodNotice(card, result) {
  if (typeof result.in_distribution !== "boolean") return; // a model without an OOD score
  card.dataset.inDistribution = String(result.in_distribution);
  if (result.in_distribution) return;
  const notice = $(".ood-notice", card);
  const threshold = state.oodThreshold;
  const limit = threshold === null ? "" : `, above the ${threshold.toFixed(1)} that 95% of real garments stay under`;
  notice.textContent = "This does not look like a garment. It is unlike every image the model was trained on " +
    `(out-of-distribution score ${result.ood_score.toFixed(1)}${limit}), so “${result.label}” is only a guess.`;
  notice.hidden = false;
}

// Each explanation as the server draws it (a heat map over the model input); a failure leaves the prediction.
async function showExplanations(card, file) {
  for (const figure of card.querySelectorAll(".explain-figure")) {
    const method = figure.dataset.method;
    if (!state.explanations.includes(method)) continue;
    try {
      const form = new FormData();
      form.append("file", file, file.name);
      const response = await api(EXPLAIN + method, { method: "POST", body: form });
      const image = $(".explanation", figure);
      image.src = URL.createObjectURL(await response.blob());
      image.alt = `${METHOD_NAMES[method]} heat map of class ${response.headers.get("X-Explained-Class")} ` +
        `over the model input of ${file.name}: brighter is more important`;
      figure.hidden = false;
      $(".explanations", card).hidden = false;
    } catch (_) { /* the prediction stands without its explanation */ }
  }
}

function zoomTo(card, tile) {
  card.querySelectorAll(".tile.selected").forEach((t) => {
    t.classList.remove("selected");
    t.setAttribute("aria-pressed", "false");
  });
  tile.classList.add("selected");
  tile.setAttribute("aria-pressed", "true");
  const zoom = $(".zoom", card);
  const { layer, channel, channels } = tile.dataset;
  const plane = tile.plane;
  const [height, width] = tile.size;
  const canvas = $(".zoom-canvas", zoom);
  const { low, high } = drawGray(canvas, plane, width, height);
  canvas.setAttribute("aria-label", `${layer}, channel ${channel}, enlarged`);
  zoom.dataset.layer = layer;
  zoom.dataset.channel = channel;
  $(".zoom-caption", zoom).textContent =
    `${layer} · channel ${channel} (of 0–${channels - 1}) · ${width}×${height} · ` +
    `activation ${low.toFixed(2)} to ${high.toFixed(2)}`;
  zoom.hidden = false;
}

function showFeatureMaps(card, maps) {
  const grid = $(".map-grid", card);
  grid.replaceChildren();
  state.layers.forEach((layer) => {
    const fmap = maps[layer.name];
    if (!fmap) return;
    const [height, width, channels] = fmap.shape;
    const section = document.createElement("section");
    section.className = "layer";
    section.dataset.layer = layer.name;
    const title = document.createElement("h4");
    title.innerHTML = "<strong></strong> <span></span>";
    title.firstChild.textContent = layer.name;
    title.lastChild.textContent = `${channels} channels · ${height}×${width}`;
    const tiles = document.createElement("div");
    tiles.className = "tiles";
    channelsOf(fmap.data, height, width, channels).forEach((plane, channel) => {
      const tile = document.createElement("button");
      tile.type = "button";
      tile.className = "tile";
      tile.dataset.layer = layer.name;
      tile.dataset.channel = String(channel);
      tile.dataset.channels = String(channels);
      tile.title = `${layer.name}, channel ${channel}`;
      tile.setAttribute("aria-label", `${layer.name}, channel ${channel}: enlarge`);
      tile.setAttribute("aria-pressed", "false");
      tile.plane = plane;
      tile.size = [height, width];
      const canvas = document.createElement("canvas");
      drawGray(canvas, plane, width, height);
      tile.append(canvas);
      tile.addEventListener("click", () => zoomTo(card, tile));
      tiles.append(tile);
    });
    section.append(title, tiles);
    grid.append(section);
  });
}

function showError(card, message) {
  card.dataset.state = "error";
  card.setAttribute("aria-busy", "false");
  $(".verdict", card).hidden = true;
  $(".result-body", card).hidden = true;
  const error = $(".error", card);
  error.textContent = `Rejected: ${message}`;
  error.hidden = false;
}

function newCard(file) {
  const card = $("#result-template").content.firstElementChild.cloneNode(true);
  card.dataset.file = file.name;
  $(".file-name", card).textContent = file.name || "pasted image";
  const original = $(".original", card);
  original.alt = `Uploaded image ${file.name}`;
  // The browser may not display every accepted format (TIFF): then only the model input is shown.
  original.onerror = () => { $(".original-figure", card).hidden = true; };
  // A small original (a data set image) is enlarged: show its pixels crisp, as the model input is.
  original.onload = () => original.classList.toggle("pixelated", original.naturalWidth <= 70);
  original.src = URL.createObjectURL(file);
  buildBars($(".bars", card));
  $(".zoom-close", card).addEventListener("click", () => {
    $(".zoom", card).hidden = true;
    card.querySelectorAll(".tile.selected").forEach((t) => {
      t.classList.remove("selected");
      t.setAttribute("aria-pressed", "false");
    });
  });
  $("#results").prepend(card);
  return card;
}

async function classify(file) {
  const card = newCard(file);
  try {
    const form = new FormData();
    form.append("file", file, file.name);
    let response;
    for (;;) {
      try {
        response = await api(PREDICT, { method: "POST", body: form });
        break;
      } catch (error) {
        if (!(error instanceof KeyRefused)) throw error;
        await new Promise((resolve) => keyWaiters.push(resolve)); // the same upload, once there is a key
      }
    }
    const result = await response.json();
    showPrediction(card, result);
    showInput(card, result.input, file.name);
    showFeatureMaps(card, result.feature_maps || {});
    showOodNotice(card, result);
    await showExplanations(card, file);
    card.dataset.state = "done";
    card.setAttribute("aria-busy", "false");
  } catch (error) {
    showError(card, error.message);
  }
}

// ------------------------------------------------------------------------------------------ queue

function updateStatus() {
  const waiting = queue.length + active;
  const done = document.querySelectorAll('.result[data-state="done"]').length;
  const failed = document.querySelectorAll('.result[data-state="error"]').length;
  const parts = [];
  if (waiting) parts.push(`Classifying ${waiting} image${waiting === 1 ? "" : "s"}…`);
  if (done) parts.push(`${done} classified`);
  if (failed) parts.push(`${failed} rejected`);
  $("#status").textContent = parts.join(" · ");
  $("#clear").hidden = waiting > 0 || done + failed === 0;
}

function pump() {
  while (active < CONCURRENT_IMAGES && queue.length) {
    const file = queue.shift();
    active++;
    classify(file).finally(() => {
      active--;
      updateStatus();
      pump();
    });
  }
  updateStatus();
}

async function addFiles(files) {
  const list = Array.from(files || []);
  if (!list.length) return;
  try {
    await state.ready;
  } catch (error) {
    $("#status").textContent = `The model is not available: ${error.message}`;
    return;
  }
  queue.push(...list);
  pump();
}

function setUp() {
  const drop = $("#drop");
  const input = $("#files");
  setUpKeyForm();
  $("#choose").addEventListener("click", () => input.click());
  input.addEventListener("change", () => {
    addFiles(input.files);
    input.value = ""; // choosing the same file again still fires "change"
  });
  // Dropping anywhere must not make the browser navigate away to the file.
  ["dragover", "drop"].forEach((type) => window.addEventListener(type, (event) => event.preventDefault()));
  ["dragenter", "dragover"].forEach((type) => drop.addEventListener(type, () => drop.classList.add("over")));
  ["dragleave", "drop"].forEach((type) => drop.addEventListener(type, () => drop.classList.remove("over")));
  window.addEventListener("drop", (event) => addFiles(event.dataTransfer && event.dataTransfer.files));
  window.addEventListener("paste", (event) => {
    const files = Array.from(event.clipboardData ? event.clipboardData.files : []);
    if (files.length) addFiles(files);
  });
  $("#clear").addEventListener("click", () => {
    $("#results").querySelectorAll("img").forEach((img) => {
      if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
    });
    $("#results").replaceChildren();
    updateStatus();
    $("#choose").focus();
  });
  state.ready = loadModel();
  state.ready.catch((error) => { $("#model-info").textContent = `Model not available: ${error.message}`; });
}

document.addEventListener("DOMContentLoaded", setUp);
