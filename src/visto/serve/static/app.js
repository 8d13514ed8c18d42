// The visto page: pick or drop an image, chat about it with streamed answers (boxes in the
// answer drawn on the image), and search the index by text. Plain JS over the same
// OpenAI-compatible API any client uses; nothing here is page-only on the server.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { chatModel: null, embedModel: null, image: null, imageSent: false, history: [] };

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
}

// ---- image --------------------------------------------------------------------------

function useFile(file) {
  if (!file || !file.type.startsWith("image/")) return;
  const reader = new FileReader();
  reader.onload = () => {
    state.image = reader.result;  // a data: URL, sent as an image_url part
    state.imageSent = false;
    $("preview").src = state.image;
    $("stage").hidden = false;
    $("drop-hint").hidden = true;
    drawBoxes([]);
  };
  reader.readAsDataURL(file);
}

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
  $("send").disabled = true;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(),
      body: JSON.stringify({ model: state.chatModel.id, messages: state.history, stream: true,
                             ...settings() }),
    });
    if (!r.ok) throw new Error(await errorText(r));
    let boxes = [];
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
          if (choice.finish_reason) boxes = choice.boxes || [];
        }
      }
    }
    answer.dataset.done = "true";
    state.history.push({ role: "assistant", content: answer.textContent });
    if (state.image) drawBoxes(boxes);
  } catch (e) {
    answer.remove();
    addMessage("error", String(e.message || e));
    state.history.pop();
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
