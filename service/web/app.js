// The page talks only to this server: /v1/models once, then per image /v1/predict,
// /v1/preprocess and /v1/feature-maps (one PNG per conv layer). No build step, no libraries.
"use strict";

const state = { classes: [], layers: [], ready: null };
const queue = [];
let active = 0;
const CONCURRENT_IMAGES = 2; // enough to overlap uploads, few enough not to swamp a small server

const $ = (selector, root = document) => root.querySelector(selector);

function percent(p) {
  if (p >= 0.9995) return "100%";
  if (p > 0 && p < 0.001) return "<0.1%";
  return `${(p * 100).toFixed(1)}%`;
}

// The API answers every error as {"error": "..."}; anything else (a proxy's page) still gets a line.
async function errorOf(response) {
  try {
    const body = await response.json();
    if (body && typeof body.error === "string") return body.error;
  } catch (_) { /* not JSON */ }
  return `${response.status} ${response.statusText || "error"}`;
}

async function post(path, file) {
  const form = new FormData();
  form.append("file", file, file.name);
  const response = await fetch(path, { method: "POST", body: form });
  if (!response.ok) throw new Error(await errorOf(response));
  return response;
}

async function loadModel() {
  const info = $("#model-info");
  for (let attempt = 0; ; attempt++) {
    try {
      const response = await fetch("/v1/models");
      if (!response.ok) throw new Error(await errorOf(response));
      const model = (await response.json()).models[0];
      state.classes = model.classes;
      state.layers = model.outputs.filter((o) => o.kind === "feature_map");
      const accuracy = model.metrics && model.metrics.test_accuracy;
      info.textContent = `Model ${model.name}, version ${model.version}` +
        (typeof accuracy === "number" ? ` · test accuracy ${percent(accuracy)}` : "");
      return;
    } catch (error) {
      // 503 while the model loads: keep trying for a while, and say so.
      info.textContent = `Model not available yet (${error.message}); retrying…`;
      if (attempt >= 30) throw error;
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  }
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

function showError(card, message) {
  card.dataset.state = "error";
  card.setAttribute("aria-busy", "false");
  $(".verdict", card).hidden = true;
  $(".result-body", card).hidden = true;
  $(".maps", card).hidden = true;
  const error = $(".error", card);
  error.textContent = `Rejected: ${message}`;
  error.hidden = false;
}

async function setImage(img, response) {
  const url = URL.createObjectURL(await response.blob());
  await new Promise((resolve, reject) => {
    img.onload = resolve;
    img.onerror = () => reject(new Error("the image could not be displayed"));
    img.src = url;
  });
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
  const grid = $(".map-grid", card);
  state.layers.forEach((layer) => {
    const [, height, width, channels] = layer.shape;
    const figure = document.createElement("figure");
    figure.className = "map";
    const img = document.createElement("img");
    img.className = "fmap";
    img.dataset.layer = layer.name;
    img.alt = `Feature maps of layer ${layer.name}: ${channels} channels of ${height}×${width}`;
    const caption = document.createElement("figcaption");
    caption.innerHTML = "<strong></strong> <span></span>";
    caption.firstChild.textContent = layer.name;
    caption.lastChild.textContent = `${channels} channels · ${height}×${width}`;
    figure.append(img, caption);
    grid.append(figure);
  });
  $("#results").prepend(card);
  return card;
}

async function classify(file) {
  const card = newCard(file);
  try {
    const result = await (await post("/v1/predict?top_k=10", file)).json();
    showPrediction(card, result);
    const input = $(".model-input", card);
    input.alt = `The 28×28 input the model saw for ${file.name}`;
    const pictures = [post("/v1/preprocess", file).then((r) => setImage(input, r))];
    card.querySelectorAll(".fmap").forEach((img) => {
      const path = `/v1/feature-maps?format=png&layer=${encodeURIComponent(img.dataset.layer)}`;
      pictures.push(post(path, file).then((r) => setImage(img, r)));
    });
    await Promise.all(pictures);
    card.dataset.state = "done";
    card.setAttribute("aria-busy", "false");
  } catch (error) {
    showError(card, error.message);
  }
}

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
