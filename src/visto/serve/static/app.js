// The visto page: pick or drop an image, chat about it with streamed answers (boxes in the
// answer drawn on the image; the server's tool calls listed, their masks and boxes drawn, and
// an answer that quotes a tool's result marked so), and search the index by text. Plain JS over the same OpenAI-compatible API any client uses;
// nothing here is page-only on the server.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { chatModel: null, embedModel: null, image: null, imageSent: false, history: [],
                imageName: "", masks: [], toolBoxes: [] };  // masks, boxes: the last answer's tools

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value || localStorage.getItem("visto-key") || "";
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function errorText(response) {
  try { return (await response.json()).error.message; } catch (e) { return response.statusText; }
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

// ---- models -------------------------------------------------------------------------

async function loadModels() {
  const r = await fetch("/v1/models", { headers: headers() });
  if (!r.ok) { $("models").textContent = "models: " + (await errorText(r)); return; }
  const models = (await r.json()).data;
  state.chatModel = models.find((m) => m.kind === "chat") || null;
  state.embedModel = models.find((m) => m.kind === "embedding") || null;
  $("models").textContent = models.map((m) => `${m.id} (${m.kind})`).join(", ") || "no models";
  $("chat-panel").hidden = !state.chatModel;
  $("search-panel").hidden = !(state.embedModel && state.embedModel.search);
  // The server's own tools (--tools): the model may call them (auto), must, or must not, or
  // must call the one named.
  const tools = (state.chatModel && state.chatModel.tools) || [];
  const select = $("tool-choice");
  select.querySelectorAll("option[data-tool]").forEach((o) => o.remove());
  for (const name of tools) {
    const option = new Option("tools: call " + name, name);
    option.dataset.tool = "true";
    select.add(option);
  }
  select.hidden = tools.length === 0;
}

// ---- image --------------------------------------------------------------------------

function imageError(text) {
  $("image-error").textContent = text;
  $("image-error").hidden = !text;
}

function useFile(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) {
    imageError(`${file.name} is not an image (${file.type || "unknown type"}): choose a PNG, ` +
               "JPEG or WebP file");
    return;
  }
  const reader = new FileReader();
  reader.onerror = () => imageError(`could not read ${file.name}: ${reader.error}`);
  reader.onload = () => {
    imageError("");
    state.image = reader.result;  // a data: URL, sent as an image_url part
    state.imageName = file.name;
    state.imageSent = false;
    $("preview").src = state.image;
    $("stage").hidden = false;
    $("drop-hint").hidden = true;
  };
  reader.readAsDataURL(file);
}

$("preview").addEventListener("load", () => { clearToolOverlay(); drawBoxes([]); });
$("preview").addEventListener("error", () => {
  // An image the browser cannot decode is not sent: the server could not read it either.
  if (!state.image) return;
  imageError(`${state.imageName} could not be decoded as an image (corrupt, or a format ` +
             "the browser does not read): choose another file");
  state.image = null;
  $("stage").hidden = true;
  $("drop-hint").hidden = false;
});

// Boxes are [x1, y1, x2, y2] in 0..999 of the image (visto's convention), scaled here to
// the size the image is shown at.
function drawBoxes(boxes) {
  const img = $("preview"), canvas = $("boxes");
  canvas.width = img.clientWidth;
  canvas.height = img.clientHeight;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.lineWidth = 2;
  ctx.strokeStyle = "#ff00ff";
  for (const [x1, y1, x2, y2] of boxes) {
    const sx = canvas.width / 1000, sy = canvas.height / 1000;
    ctx.strokeRect(x1 * sx, y1 * sy, (x2 - x1) * sx, (y2 - y1) * sy);
  }
  canvas.dataset.boxes = JSON.stringify(boxes);
}

// ---- tool calls ---------------------------------------------------------------------

// What a run's result says, in one line: an error, a mask's size, the objects found, the
// text read, or (any other tool) its JSON, cut short.
function toolSummary(run) {
  const r = run.result;
  if (!run.ok) return "error: " + (r && r.error ? r.error : JSON.stringify(r));
  if (r && typeof r.found === "boolean" && typeof r.fraction === "number") {
    return r.found ? `mask of ${r.pixels} pixels (${(100 * r.fraction).toFixed(1)}% of the image)`
                   : "nothing found";
  }
  if (r && Array.isArray(r.objects)) {
    const scores = r.objects.slice(0, 3).filter((o) => typeof o.score === "number")
      .map((o) => o.score.toFixed(2)).join(", ");
    return `${r.objects.length} object(s) found` + (scores ? ` (scores ${scores})` : "");
  }
  if (r && typeof r.text === "string") return r.text ? `read: ${r.text}` : "no text found";
  const text = JSON.stringify(r);
  return text.length > 200 ? text.slice(0, 200) + "…" : text;
}

function showToolRun(run, before) {
  const div = document.createElement("div");
  div.className = "msg tool" + (run.ok ? "" : " error");
  div.dataset.ok = String(run.ok);
  const line = (cls, text) => {
    const span = document.createElement("span");
    span.className = cls;
    span.textContent = text;
    div.appendChild(span);
  };
  line("name", run.name);
  line("args", run.arguments);
  line("result", toolSummary(run));
  $("log").insertBefore(div, before);
  return div;
}

// Under an answer that quotes tool results: its words are the results' words, the server
// allowed no others (visto serve --quote-results; the choice's `quoted`).
function showQuoted(answer) {
  const note = document.createElement("div");
  note.className = "quoted";
  note.textContent = "quoted from the tool result: every word of this answer is the tool's";
  answer.after(note);
  return note;
}

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the mask PNG could not be decoded"));
    img.src = url;
  });
}

// A run's mask (a mask.png file: white inside) and boxes (`objects` with a `box` in 0..999)
// are kept for the overlay, whichever tool returned them.
async function addToolOverlay(run, div) {
  if (!run.ok) return;
  if (run.files && run.files["mask.png"]) {
    try {
      state.masks.push(await loadImage(run.files["mask.png"]));
    } catch (e) {
      div.querySelector(".result").textContent += " (" + e.message + ")";
    }
  }
  if (run.result && Array.isArray(run.result.objects)) {
    for (const o of run.result.objects) if (Array.isArray(o.box)) state.toolBoxes.push(o.box);
  }
}

function clearToolOverlay() {
  state.masks = [];
  state.toolBoxes = [];
  drawToolOverlay();
}

// Masks are tinted see-through cyan, pixel for pixel at the size the image is shown at;
// boxes are drawn in orange.
function drawToolOverlay() {
  const img = $("preview"), canvas = $("overlay");
  canvas.width = img.clientWidth;
  canvas.height = img.clientHeight;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  for (const mask of state.masks) {
    const tint = document.createElement("canvas");
    tint.width = canvas.width;
    tint.height = canvas.height;
    const tctx = tint.getContext("2d");
    tctx.imageSmoothingEnabled = false;
    tctx.drawImage(mask, 0, 0, tint.width, tint.height);
    const px = tctx.getImageData(0, 0, tint.width, tint.height);
    for (let i = 0; i < px.data.length; i += 4) {
      const inside = px.data[i] > 127;
      px.data.set([0, 200, 255, inside ? 128 : 0], i);
    }
    tctx.putImageData(px, 0, 0);
    ctx.drawImage(tint, 0, 0);
  }
  ctx.lineWidth = 2;
  ctx.strokeStyle = "#ff9900";
  const sx = canvas.width / 1000, sy = canvas.height / 1000;
  for (const [x1, y1, x2, y2] of state.toolBoxes) {
    ctx.strokeRect(x1 * sx, y1 * sy, (x2 - x1) * sx, (y2 - y1) * sy);
  }
  canvas.dataset.masks = String(state.masks.length);
  canvas.dataset.boxes = JSON.stringify(state.toolBoxes);
}

// ---- chat ---------------------------------------------------------------------------

function settings() {
  // Optional settings from the URL: ?temperature=0.8&seed=3&max_tokens=64, and
  // &schema={...} to have every answer follow a JSON schema (grammar-constrained).
  const q = new URLSearchParams(location.search), out = {};
  for (const name of ["temperature", "seed", "max_tokens"]) {
    if (q.has(name)) out[name] = Number(q.get(name));
  }
  if (q.has("schema")) {
    out.response_format = { type: "json_schema",
                            json_schema: { name: "answer", schema: JSON.parse(q.get("schema")) } };
  }
  const choice = $("tool-choice");
  if (!choice.hidden) {
    out.tool_choice = ["auto", "required", "none"].includes(choice.value) ? choice.value
      : { type: "function", function: { name: choice.value } };
  }
  return out;
}

async function send(text) {
  const content = [];
  if (state.image && !state.imageSent) {
    content.push({ type: "image_url", image_url: { url: state.image } });
    state.imageSent = true;
  }
  content.push({ type: "text", text });
  state.history.push({ role: "user", content });
  addMessage("user", text);
  const answer = addMessage("assistant", "");
  if (state.image) clearToolOverlay();
  let runs = 0;
  $("send").disabled = true;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(),
      body: JSON.stringify({ model: state.chatModel.id, messages: state.history, stream: true,
                             ...settings() }),
    });
    if (!r.ok) throw new Error(await errorText(r));
    let boxes = [], quoted = false;
    const reader = r.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ") || event === "data: [DONE]") continue;
        const data = JSON.parse(event.slice(6));
        if (data.error) throw new Error(data.error.message);
        for (const choice of data.choices || []) {
          if (choice.delta && choice.delta.content) answer.textContent += choice.delta.content;
          // The server ran its own tools: list each call before the answer that follows it.
          for (const run of choice.tool_runs || []) {
            runs += 1;
            await addToolOverlay(run, showToolRun(run, answer));
            if (state.image) drawToolOverlay();
          }
          if (choice.finish_reason) {
            boxes = choice.boxes || [];
            quoted = choice.quoted === true;  // visto's extension, on the last chunk
          }
        }
      }
    }
    // An answer decoded as a quote of the tools' results (--quote-results) says so under it.
    answer.dataset.quoted = String(quoted);
    if (quoted) showQuoted(answer);
    answer.dataset.done = "true";
    answer.dataset.toolRuns = String(runs);
    state.history.push({ role: "assistant", content: answer.textContent });
    if (state.image) drawBoxes(boxes);
  } catch (e) {
    answer.remove();
    addMessage("error", String(e.message || e));
    state.history.pop();
    if (content[0].type === "image_url") state.imageSent = false;  // not seen: send it again
  } finally {
    $("send").disabled = false;
  }
}

// ---- search -------------------------------------------------------------------------

async function search(query) {
  const results = $("results");
  results.textContent = "searching…";
  const r = await fetch("/v1/search", {
    method: "POST", headers: headers(),
    body: JSON.stringify({ query, k: 8, thumbnails: true }),
  });
  if (!r.ok) { results.textContent = await errorText(r); return; }
  results.textContent = "";
  for (const hit of (await r.json()).data) {
    const card = document.createElement("figure");
    card.className = "hit";
    const img = document.createElement("img");
    if (hit.thumbnail) img.src = hit.thumbnail;
    img.alt = hit.path;
    const caption = document.createElement("figcaption");
    const about = hit.metadata.caption || hit.metadata.file || hit.path.split("/").pop();
    caption.textContent = `${hit.rank}. ${hit.score.toFixed(3)} ${about}`;
    card.append(img, caption);
    results.appendChild(card);
  }
}

// ---- wiring -------------------------------------------------------------------------

$("file").addEventListener("change", (e) => useFile(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  useFile(e.dataTransfer.files[0]);
});
$("chat-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || !state.chatModel) return;
  $("prompt").value = "";
  send(text);
});
$("search-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const q = $("query").value.trim();
  if (q) search(q);
});
$("api-key").addEventListener("change", () => {
  localStorage.setItem("visto-key", $("api-key").value);
  loadModels();
});
loadModels();
