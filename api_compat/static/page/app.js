// sdengine's page: a plain-JS client of the server's webui routes (/sdapi/v1/..., /controlnet/...), as any
// client calls them. No build step, no dependencies. The API key (if the server wants one) is kept in
// localStorage and sent as X-API-Key; /docs and /redoc read the same entry.
"use strict";

const KEY = "sdengine.apiKey";
const $ = (id) => document.getElementById(id);
const state = { mode: "txt2img", busy: false, initImage: null, maskDrawn: false, cnImage: null, results: 0 };

class ApiFailure extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || (body && body.detail) || `HTTP ${status}`);
    this.status = status;
    this.body = body || {};
  }
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = localStorage.getItem(KEY);
  if (key) h["X-API-Key"] = key;
  return h;
}

async function api(method, path, body) {
  const r = await fetch(path, { method, headers: headers(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  if (r.status === 401) { askKey(localStorage.getItem(KEY) ? "The stored API key was refused." : null); }
  if (!r.ok) throw new ApiFailure(r.status, data);
  return data;
}

// ------------------------------------------------------------------------------------------ the API key
function askKey(why) {
  const dlg = $("key-dialog");
  if (why) $("key-reason").textContent = why + " Enter this server's API key (sdengine serve --api-key).";
  $("server-status").textContent = "needs an API key";
  if (!dlg.open) dlg.showModal();
}

function setupKey() {
  $("key-form").addEventListener("submit", () => {
    localStorage.setItem(KEY, $("api-key").value.trim());
    $("api-key").value = "";
    loadListings();
  });
  $("key-forget").addEventListener("click", () => { localStorage.removeItem(KEY); $("key-dialog").close(); });
  $("key-change").addEventListener("click", () => $("key-dialog").showModal());
}

// ------------------------------------------------------------------------------------------- listings
function fill(select, items, keep) {
  const old = select.value;
  while (select.options.length > keep) select.remove(keep);
  for (const [value, text] of items) select.add(new Option(text, value));
  if ([...select.options].some((o) => o.value === old)) select.value = old;
}

async function listing(path, fallback) {
  try { return await api("GET", path); } catch (e) { if (e.status === 401) throw e; return fallback; }
}

async function loadListings() {
  try {
    const models = await api("GET", "/sdapi/v1/sd-models");
    $("server-status").textContent = "loading the lists…";
    fill($("model"), models.map((m) => [m.title, m.model_name]), 1);
  } catch (e) {
    if (e.status !== 401) $("server-status").textContent = "the server did not answer: " + e.message;
    return;
  }
  const [samplers, schedulers, loras, embeddings, cnModels, cnModules] = await Promise.all([
    listing("/sdapi/v1/samplers", []), listing("/sdapi/v1/schedulers", []), listing("/sdapi/v1/loras", []),
    listing("/sdapi/v1/embeddings", { loaded: {} }), listing("/controlnet/model_list", { model_list: [] }),
    listing("/controlnet/module_list", { module_list: [] })]);
  fill($("sampler"), samplers.map((s) => [s.name, s.name]), 0);
  if (!$("sampler").dataset.init) { $("sampler").value = "Euler a"; $("sampler").dataset.init = "1"; }
  fill($("scheduler"), schedulers.map((s) => [s.label, s.label]), 0);
  fill($("lora"), loras.map((l) => [l.name, l.alias && l.alias !== l.name ? `${l.name} (${l.alias})` : l.name]), 0);
  fill($("embedding"), Object.keys(embeddings.loaded || {}).map((n) => [n, n]), 0);
  fill($("cn-model"), [["None", "None"], ...(cnModels.model_list || []).map((m) => [m, m])], 0);
  const runs = (m) => !((cnModules.module_detail || {})[m] || {}).sdengine_unavailable;  // listed, not run here
  fill($("cn-module"), (cnModules.module_list || []).filter(runs).map((m) => [m, m]), 0);
  if ((cnModels.model_list || []).length) $("cn-model").value = cnModels.model_list[0];
  if ((cnModules.module_list || []).includes("canny") && !$("cn-module").dataset.init) {
    $("cn-module").value = "canny"; $("cn-module").dataset.init = "1";
  }
  $("server-status").textContent = "ready";  // every list filled (the tests wait for this)
}

function insertIntoPrompt(text) {
  const p = $("prompt");
  p.value = p.value.trim() ? `${p.value.trim()} ${text}` : text;
}

// ------------------------------------------------------------------------------------------------ images
function readImage(file) {  // -> {dataUrl, b64, width, height}
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onerror = () => reject(reader.error);
    reader.onload = () => {
      const img = new Image();
      img.onload = () => resolve({ dataUrl: reader.result, b64: String(reader.result).split(",")[1],
        width: img.naturalWidth, height: img.naturalHeight, img });
      img.onerror = () => reject(new Error("not an image the browser can read"));
      img.src = reader.result;
    };
    reader.readAsDataURL(file);
  });
}

function setupImg2img() {
  const canvas = $("mask-canvas");
  const ctx = canvas.getContext("2d");
  $("init-image").addEventListener("change", async (ev) => {
    if (!ev.target.files[0]) return;
    state.initImage = await readImage(ev.target.files[0]);
    $("init-preview").src = state.initImage.dataUrl;
    canvas.width = state.initImage.width;
    canvas.height = state.initImage.height;
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    state.maskDrawn = false;
    $("mask-stage").hidden = false;
    $("width").value = state.initImage.width - (state.initImage.width % 8);
    $("height").value = state.initImage.height - (state.initImage.height % 8);
  });
  $("mask-file").addEventListener("change", async (ev) => {
    if (!ev.target.files[0] || !state.initImage) return;
    const mask = await readImage(ev.target.files[0]);
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.drawImage(mask.img, 0, 0, canvas.width, canvas.height);
    state.maskDrawn = true;
  });
  $("mask-clear").addEventListener("click", () => { ctx.clearRect(0, 0, canvas.width, canvas.height); state.maskDrawn = false; });
  let last = null;  // the previous point of the stroke being drawn (null: not drawing)
  const point = (ev) => {
    const box = canvas.getBoundingClientRect();
    return [(ev.clientX - box.left) * canvas.width / box.width, (ev.clientY - box.top) * canvas.height / box.height];
  };
  const stroke = (ev) => {  // a round-capped line from the previous point: no gaps between pointer events
    const [x, y] = point(ev);
    const from = last || [x, y];
    ctx.strokeStyle = "#fff";
    ctx.lineCap = "round";
    ctx.lineWidth = Number($("brush").value) * canvas.width / Math.max(1, canvas.getBoundingClientRect().width);
    ctx.beginPath();
    ctx.moveTo(from[0], from[1]);
    ctx.lineTo(x + 0.01, y);
    ctx.stroke();
    last = [x, y];
    state.maskDrawn = true;
  };
  canvas.addEventListener("pointerdown", (ev) => { last = null; canvas.setPointerCapture(ev.pointerId); stroke(ev); });
  canvas.addEventListener("pointermove", (ev) => { if (last) stroke(ev); });
  canvas.addEventListener("pointerup", () => { last = null; });
}

function maskB64() {  // the drawn mask as a black-and-white PNG (white: repaint)
  const src = $("mask-canvas");
  const out = document.createElement("canvas");
  out.width = src.width;
  out.height = src.height;
  const ctx = out.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.drawImage(src, 0, 0);
  return out.toDataURL("image/png").split(",")[1];
}

function setupControlNet() {
  $("cn-image").addEventListener("change", async (ev) => {
    if (!ev.target.files[0]) return;
    state.cnImage = await readImage(ev.target.files[0]);
    $("cn-input").src = state.cnImage.dataUrl;
    $("cn-input").hidden = false;
    $("cn-enabled").checked = true;
  });
  $("cn-detect").addEventListener("click", async () => {
    $("cn-error").textContent = "";
    if (!state.cnImage) { $("cn-error").textContent = "choose a control image first"; return; }
    try {
      const r = await api("POST", "/controlnet/detect", { controlnet_module: $("cn-module").value,
        controlnet_input_images: [state.cnImage.b64] });
      $("cn-map").src = "data:image/png;base64," + r.images[0];
      $("cn-map").hidden = false;
    } catch (e) {
      $("cn-error").textContent = errorText(e);
    }
  });
}

// ---------------------------------------------------------------------------------------------- request
function num(id) { return Number($(id).value); }

function payload() {
  const body = { prompt: $("prompt").value, negative_prompt: $("negative_prompt").value, steps: num("steps"),
    cfg_scale: num("cfg_scale"), width: num("width"), height: num("height"), seed: num("seed"),
    batch_size: num("batch_size"), sampler_name: $("sampler").value, scheduler: $("scheduler").value,
    override_settings: { live_previews_enable: true, show_progress_every_n_steps: 1 } };
  if ($("model").value) body.override_settings.sd_model_checkpoint = $("model").value;
  if (state.mode === "img2img") {
    body.init_images = state.initImage ? [state.initImage.b64] : [];
    body.denoising_strength = num("denoising_strength");
    if (state.maskDrawn) body.mask = maskB64();
  }
  if ($("cn-enabled").checked) {
    body.alwayson_scripts = { controlnet: { args: [{ enabled: true, image: state.cnImage ? state.cnImage.b64 : null,
      module: $("cn-module").value, model: $("cn-model").value, weight: num("cn-weight") }] } };
  }
  return body;
}

function applyParameters(req, seed) {  // "reuse parameters": the request of a result, with that image's seed
  $("prompt").value = req.prompt || "";
  $("negative_prompt").value = req.negative_prompt || "";
  for (const k of ["steps", "cfg_scale", "width", "height", "batch_size"]) if (req[k] !== undefined) $(k).value = req[k];
  $("seed").value = seed;
  if (req.sampler_name) $("sampler").value = req.sampler_name;
  if (req.scheduler) $("scheduler").value = req.scheduler;
  $("model").value = (req.override_settings || {}).sd_model_checkpoint || "";
  setMode(req.init_images ? "img2img" : "txt2img");
  window.scrollTo(0, 0);
}

// ------------------------------------------------------------------------------------------------ errors
function errorText(e) {
  const err = (e.body && e.body.error) || {};
  return (err.message || e.message) + (err.allowed ? ` (allowed: ${err.allowed})` : "");
}

function clearErrors() {
  for (const f of document.querySelectorAll("[data-field]")) {
    f.classList.remove("has-error");
    const span = f.querySelector(".err");
    if (span) span.textContent = "";
  }
  $("error").textContent = "";
}

function fieldElement(field) {  // the form field whose data-field is the longest prefix of the error's field
  let best = null;
  for (const f of document.querySelectorAll("[data-field]")) {
    const name = f.dataset.field;
    if ((field === name || field.startsWith(name + ".") || field.startsWith(name + "[")) &&
        (!best || name.length > best.dataset.field.length)) best = f;
  }
  return best && !best.closest("[hidden]") ? best : null;
}

function showError(e) {
  const problems = (e.body && e.body.errors) || [(e.body && e.body.error) || { message: e.message }];
  const general = [];
  for (const p of problems) {
    const text = (p.message || "") + (p.allowed ? ` (allowed: ${p.allowed})` : "");
    const f = p.field ? fieldElement(p.field) : null;
    if (f) {
      f.classList.add("has-error");
      const span = f.querySelector(".err");
      span.textContent = span.textContent ? `${span.textContent}; ${text}` : text;
    } else {
      general.push(p.field ? `${p.field}: ${text}` : text);
    }
  }
  $("error").textContent = general.join("\n");
}

// ----------------------------------------------------------------------------------- generate, progress
function setProgress(fraction, text) {
  $("progress-bar").style.width = `${Math.round(Math.max(0, Math.min(1, fraction)) * 100)}%`;
  $("progress-text").textContent = text;
}

async function pollProgress(token) {
  while (state.busy && state.token === token) {
    try {
      const p = await api("GET", "/sdapi/v1/progress");
      if (state.token !== token || !state.busy) break;
      const s = p.state || {};
      if (p.progress > 0) {
        const bar = $("progress");
        bar.dataset.seen = String(Number(bar.dataset.seen) + 1);
        bar.dataset.last = String(p.progress);
        setProgress(p.progress, `step ${s.sampling_step}/${s.sampling_steps}` +
          (p.eta_relative ? `, about ${p.eta_relative.toFixed(1)} s left` : ""));
      } else if (p.textinfo) {
        $("progress-text").textContent = p.textinfo;
      }
      if (p.current_image) {
        $("preview").src = "data:image/png;base64," + p.current_image;
        $("preview").hidden = false;
      }
    } catch (e) { /* a missed poll is not an error of the task */ }
    await new Promise((r) => setTimeout(r, 200));
  }
}

async function generate(ev) {
  ev.preventDefault();
  if (state.busy) return;
  clearErrors();
  const body = payload();
  const token = (state.token || 0) + 1;
  Object.assign(state, { busy: true, token });
  $("generate").disabled = true;
  $("cancel").disabled = false;
  $("progress").dataset.seen = "0";
  setProgress(0, "submitted");
  const started = performance.now();
  pollProgress(token);
  try {
    const r = await api("POST", `/sdapi/v1/${state.mode}`, body);
    const info = JSON.parse(r.info || "{}");
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    setProgress(1, `done: ${r.images.length} image(s) in ${seconds} s` +
      (info.warnings && info.warnings.length ? ` (warnings: ${info.warnings.join("; ")})` : ""));
    addResults(r.images, info, body);
  } catch (e) {
    setProgress(0, e.status === 409 ? "cancelled" : "failed");
    if (e.status !== 409) showError(e);
  } finally {
    state.busy = false;
    $("preview").hidden = true;  // the live preview had its time: the results are in the gallery
    $("generate").disabled = false;
    $("cancel").disabled = true;
  }
}

function addResults(images, info, request) {
  const texts = info.infotexts || [];
  const seeds = info.all_seeds || [];
  const count = texts.length || images.length;
  // the answer appends ControlNet detected maps after the generated images: those carry no infotext
  images.forEach((b64, i) => {
    const card = document.createElement("div");
    card.className = "result";
    const url = "data:image/png;base64," + b64;
    const img = new Image();
    img.src = url;
    img.alt = texts[i] ? texts[i].split("\n")[0] : "detected map";
    card.append(img);
    const row = document.createElement("div");
    row.className = "row";
    const pre = document.createElement("pre");
    pre.className = "infotext";
    pre.hidden = true;
    pre.textContent = texts[i] || "ControlNet detected map";
    if (i < count) {
      const params = document.createElement("button");
      params.type = "button";
      params.className = "secondary params";
      params.textContent = "Parameters";
      params.addEventListener("click", () => { pre.hidden = !pre.hidden; });
      const reuse = document.createElement("button");
      reuse.type = "button";
      reuse.className = "secondary reuse";
      reuse.textContent = "Reuse";
      reuse.addEventListener("click", () => applyParameters(request, seeds[i] !== undefined ? seeds[i] : request.seed));
      row.append(params, reuse);
    }
    const link = document.createElement("a");
    link.href = url;
    link.className = "download";
    link.download = `sdengine-${++state.results}${seeds[i] !== undefined ? "-" + seeds[i] : ""}.png`;
    link.textContent = "PNG";
    row.append(link);
    card.append(row, pre);
    $("gallery").prepend(card);
  });
}

async function cancel() {
  $("cancel").disabled = true;
  try { await api("POST", "/sdapi/v1/interrupt"); } catch (e) { $("error").textContent = errorText(e); }
}

function setMode(mode) {
  state.mode = mode;
  for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t.dataset.mode === mode);
  $("img2img-box").hidden = mode !== "img2img";
}

// ------------------------------------------------------------------------------------------------- start
function start() {
  setupKey();
  setupImg2img();
  setupControlNet();
  for (const t of document.querySelectorAll(".tab")) t.addEventListener("click", () => setMode(t.dataset.mode));
  $("lora-add").addEventListener("click", () => {
    if ($("lora").value) insertIntoPrompt(`<lora:${$("lora").value}:${$("lora-weight").value || 1}>`);
  });
  $("embedding-add").addEventListener("click", () => { if ($("embedding").value) insertIntoPrompt($("embedding").value); });
  $("gen-form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", cancel);
  loadListings();
}

start();
