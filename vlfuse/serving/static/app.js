// vlfuse web page: plain JavaScript, no external assets. Talks to the same /v1 API as any other client.
"use strict";

const $ = (id) => document.getElementById(id);
let photo = null;            // the picked File
let tagging = false;         // whether the service tags photos (/v1/models says so)
const thumbUrls = [];        // object URLs to revoke on the next search

// -- API key ---------------------------------------------------------------------------------------
// Asked for only when the service refuses a request for want of one (401), kept for this tab's session
// (sessionStorage), and the refused request is then sent again with it.
const KEY_STORE = "vlfuse-api-key";
let apiKey = sessionStorage.getItem(KEY_STORE) || "";
let keyPrompt = null;  // while the dialog is open: requests refused meanwhile wait for the same answer

function authHeaders() {
  return apiKey ? { "Authorization": "Bearer " + apiKey } : {};
}

// Open the key dialog (once, however many requests were refused) -> true once a key is given, false if the
// user closes it. ``refused`` is the key the service just turned down ("" when the request carried none).
function askForKey(refused) {
  if (keyPrompt) return keyPrompt;
  const dialog = $("key-dialog");
  const input = $("api-key");
  const message = $("key-message");
  $("key-btn").hidden = false;  // the service uses keys: let the user change theirs later
  message.textContent = refused ? "The service did not accept that key. Check it and enter it again." : "";
  message.hidden = !refused;
  input.value = refused || apiKey;
  keyPrompt = new Promise((resolve) => {
    const done = (given) => {
      $("key-form").removeEventListener("submit", onSubmit);
      $("key-cancel").removeEventListener("click", onCancel);
      dialog.removeEventListener("cancel", onCancel);
      if (dialog.open) dialog.close();
      keyPrompt = null;
      resolve(given);
    };
    const onSubmit = () => {
      apiKey = input.value.trim();
      sessionStorage.setItem(KEY_STORE, apiKey);
      done(true);
    };
    const onCancel = (e) => { e.preventDefault(); done(false); };
    $("key-form").addEventListener("submit", onSubmit);
    $("key-cancel").addEventListener("click", onCancel);
    dialog.addEventListener("cancel", onCancel);  // Escape
  });
  dialog.showModal();
  input.select();
  return keyPrompt;
}

class KeyNeeded extends Error {}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

// fetch + JSON (or text: ``read``), turning the service's {"error": {code, message}} into a thrown Error. A 401
// asks for the key and sends the request again with it.
async function api(path, options = {}, read = (resp) => resp.json()) {
  let asked = false;
  for (;;) {
    const sent = apiKey;
    const resp = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
    if (resp.status === 401) {
      if (apiKey !== sent) continue;  // another request got a new key meanwhile: use it
      if (await askForKey(sent)) { asked = true; continue; }
      throw new KeyNeeded("This service needs an API key: click “API key” at the top to enter one.");
    }
    if (!resp.ok) {
      const err = (await resp.json().catch(() => ({}))).error || {};
      throw new Error(`${resp.status} ${err.code || "error"}: ${err.message || resp.statusText}`);
    }
    const body = await read(resp).catch(() => ({}));
    if (asked && path !== "/v1/models") loadModels();  // the status line may still say that a key is needed
    return body;
  }
}

// Each panel shows only the answer to its latest request: a slower, older response (say the caption for the
// previous photo, or for the old beam width) that arrives late is dropped instead of overwriting the new one.
const latest = {};
function startRequest(panel) { latest[panel] = (latest[panel] || 0) + 1; return latest[panel]; }
function isStale(panel, ticket) { return latest[panel] !== ticket; }

async function loadModels() {
  try {
    const info = await api("/v1/models");
    tagging = Boolean(info.models.tagging && info.models.tagging.loaded);
    showCaptionLanguages(info.models.caption);
    const parts = Object.entries(info.models).map(([task, m]) => `${task}: ${m.loaded ? "ready" : "not loaded"}`);
    $("models-status").textContent = parts.join(" · ");
    showError("");
  } catch (e) {
    // no key given yet is not an error the user made: say so in the status line, not in the red box
    $("models-status").textContent = e instanceof KeyNeeded ? "An API key is needed to use this service." : "";
    showError(e instanceof KeyNeeded ? "" : e.message);
  }
}

$("key-btn").addEventListener("click", async () => {
  if (await askForKey("")) loadModels();  // checks the key at once: a wrong one reopens the dialog
});

// -- photo: pick or drop --------------------------------------------------------------------------
function setPhoto(file) {
  if (!file) return;
  photo = file;
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("caption-btn").disabled = false;
  $("ask-btn").disabled = false;
  $("search-photo-btn").disabled = false;
  $("answer").textContent = "";
  captionPhoto();
  tagPhoto();
}

$("file-input").addEventListener("change", (e) => setPhoto(e.target.files[0]));
const zone = $("drop-zone");
zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
zone.addEventListener("dragleave", () => zone.classList.remove("over"));
zone.addEventListener("drop", (e) => {
  e.preventDefault();
  zone.classList.remove("over");
  setPhoto(e.dataTransfer.files[0]);
});
zone.addEventListener("keydown", (e) => { if (e.key === "Enter") $("file-input").click(); });

// the languages the service captions in (/v1/models), offered in the language switch
const LANGUAGE_NAMES = { en: "English", zh: "中文 (Chinese)" };
function showCaptionLanguages(caption) {
  const select = $("caption-lang");
  const langs = caption && caption.loaded ? Object.keys(caption.langs || {}) : [];
  const chosen = select.value;
  select.replaceChildren(...langs.map((lang) => {
    const option = document.createElement("option");
    option.value = lang;
    option.textContent = LANGUAGE_NAMES[lang] || lang;
    return option;
  }));
  select.value = langs.includes(chosen) ? chosen : (caption && caption.lang) || "";
  select.disabled = langs.length < 2;
}

async function captionPhoto() {
  if (!photo) return;
  const form = new FormData();
  form.append("image", photo);
  if ($("beam").value) form.append("beam", $("beam").value);  // empty: the model's own decoding
  if ($("caption-lang").value) form.append("lang", $("caption-lang").value);
  $("caption").textContent = "Captioning…";
  const ticket = startRequest("caption");
  try {
    const r = await api("/v1/caption", { method: "POST", body: form });
    if (isStale("caption", ticket)) return;
    $("caption").textContent = r.caption;
    $("caption").lang = r.lang;  // so the browser picks a font that has the language's characters
    $("caption").title = `score ${r.score.toFixed(3)}, beam ${r.beam}`;
    showError("");
  } catch (e) {
    if (isStale("caption", ticket)) return;
    $("caption").textContent = "";
    showError(e.message);
  }
}
$("caption-btn").addEventListener("click", captionPhoto);

// -- tags: the concepts the backbone's classifier sees, only those that reach the service's threshold ----------
async function tagPhoto() {
  $("tags").textContent = "";
  if (!photo || !tagging) return;
  const form = new FormData();
  form.append("image", photo);
  const ticket = startRequest("tags");
  try {
    const r = await api("/v1/tags", { method: "POST", body: form });
    if (isStale("tags", ticket)) return;
    const shown = r.concepts.map((c) => `${c.name} (${c.word}) ${(100 * c.probability).toFixed(0)}%`);
    $("tags").textContent = shown.length ? "Tags: " + shown.join(", ")
                                         : `Tags: no concept at or above ${r.threshold.toFixed(2)}`;
  } catch (e) {
    if (isStale("tags", ticket)) return;
    showError(e.message);
  }
}
$("beam").addEventListener("change", captionPhoto);
$("caption-lang").addEventListener("change", captionPhoto);

// -- question -------------------------------------------------------------------------------------
async function askQuestion() {
  const question = $("question").value.trim();
  if (!photo || !question) return;
  const form = new FormData();
  form.append("image", photo);
  form.append("question", question);
  $("answer").textContent = "Thinking…";
  const ticket = startRequest("answer");
  try {
    const r = await api("/v1/vqa", { method: "POST", body: form });
    if (isStale("answer", ticket)) return;
    const answer = $("answer");
    answer.textContent = "";
    const main = document.createElement("strong");
    main.className = "answer-text";
    main.textContent = r.answer;
    answer.append(main, ` (${(100 * r.probability).toFixed(1)}%)`);
    if (!r.sure) {  // the model says it should not be trusted here: say so before anything else
      const doubt = document.createElement("span");
      doubt.className = "doubt";
      doubt.textContent = ` — not sure: ${r.doubt}`;
      answer.append(doubt);
    }
    const others = r.top.slice(1).map((t) => `${t.answer} ${(100 * t.probability).toFixed(1)}%`).join(", ");
    if (others) {
      const small = document.createElement("span");
      small.className = "others";
      small.textContent = " — also: " + others;
      answer.append(small);
    }
    showError("");
  } catch (e) {
    if (isStale("answer", ticket)) return;
    $("answer").textContent = "";
    showError(e.message);
  }
}
$("ask-btn").addEventListener("click", askQuestion);
$("question").addEventListener("keydown", (e) => { if (e.key === "Enter") askQuestion(); });

// -- search ---------------------------------------------------------------------------------------
async function showHits(result) {
  thumbUrls.splice(0).forEach((u) => URL.revokeObjectURL(u));
  const grid = $("hits");
  grid.textContent = "";
  $("search-status").textContent = `${result.hits.length} hit(s)`;
  for (const hit of result.hits) {
    const fig = document.createElement("figure");
    fig.className = "hit";
    const img = document.createElement("img");
    img.alt = hit.path;
    img.title = hit.path;
    const cap = document.createElement("figcaption");
    cap.textContent = hit.score.toFixed(3);
    fig.append(img, cap);
    grid.append(fig);
    // thumbnails need the API key, so fetch them and show them as object URLs
    fetch(hit.thumbnail, { headers: authHeaders() })
      .then((r) => (r.ok ? r.blob() : Promise.reject(new Error(r.status))))
      .then((blob) => { const u = URL.createObjectURL(blob); thumbUrls.push(u); img.src = u; })
      .catch(() => { img.alt = "(no thumbnail)"; });
  }
}

async function search(body, headers) {
  $("search-status").textContent = "Searching…";
  const ticket = startRequest("search");
  try {
    const result = await api("/v1/search", { method: "POST", body, headers });
    if (isStale("search", ticket)) return;
    showHits(result);
    showError("");
  } catch (e) {
    if (isStale("search", ticket)) return;
    $("search-status").textContent = "";
    $("hits").textContent = "";
    showError(e.message);
  }
}

$("search-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("search-text").value.trim();
  if (!text) return;
  search(JSON.stringify({ text, k: Number($("search-k").value) }), { "Content-Type": "application/json" });
});
$("search-photo-btn").addEventListener("click", () => {
  if (!photo) return;
  const form = new FormData();
  form.append("image", photo);
  form.append("k", $("search-k").value);
  search(form, {});
});

// -- video: subtitles that describe each shot, played as the clip's text track ----------------------------------
const videoUrls = [];  // the clip's and its track's object URLs, revoked when another clip is picked

function clockTime(seconds) {
  const m = Math.floor(seconds / 60), s = Math.floor(seconds % 60);
  return `${m}:${String(s).padStart(2, "0")}`;
}

function listCues(track) {
  const list = $("cue-list");
  list.textContent = "";
  for (const cue of track.cues) {
    const item = document.createElement("li");
    const time = document.createElement("span");
    time.className = "time";
    time.textContent = clockTime(cue.startTime);
    item.append(time, cue.text.replace(/\n/g, " "));
    item.addEventListener("click", () => { $("video").currentTime = cue.startTime; });
    list.append(item);
  }
  track.addEventListener("cuechange", () => {  // the cue on screen is highlighted in the list
    const active = new Set([...(track.activeCues || [])]);
    [...track.cues].forEach((cue, i) => list.children[i].classList.toggle("active", active.has(cue)));
  });
}

async function subtitleVideo(file) {
  if (!file) return;
  videoUrls.splice(0).forEach((u) => URL.revokeObjectURL(u));
  const video = $("video");
  video.querySelectorAll("track").forEach((t) => t.remove());
  video.src = URL.createObjectURL(file);
  videoUrls.push(video.src);
  video.hidden = false;
  $("cue-list").textContent = "";
  $("vtt-link").hidden = true;
  $("video-status").textContent = `Finding the shots of ${file.name} and describing them…`;
  const form = new FormData();
  form.append("video", file);
  form.append("format", "vtt");
  const ticket = startRequest("video");
  try {
    const vtt = await api("/v1/subtitle", { method: "POST", body: form }, (resp) => resp.text());
    if (isStale("video", ticket)) return;
    const url = URL.createObjectURL(new Blob([vtt], { type: "text/vtt" }));
    videoUrls.push(url);
    const track = document.createElement("track");
    track.kind = "captions";  // shown on the picture (a "descriptions" track is for screen readers, not shown)
    track.label = "Shot descriptions";
    track.srclang = "en";
    track.src = url;
    track.default = true;
    track.addEventListener("load", () => {
      listCues(track.track);
      $("video-status").textContent = `${track.track.cues.length} subtitle(s) for ${file.name}`;
    });
    video.append(track);
    track.track.mode = "showing";
    $("vtt-link").href = url;
    $("vtt-link").download = file.name.replace(/\.[^.]*$/, "") + ".vtt";
    $("vtt-link").hidden = false;
    showError("");
  } catch (e) {
    if (isStale("video", ticket)) return;
    $("video-status").textContent = "";
    showError(e.message);
  }
}
$("video-input").addEventListener("change", (e) => subtitleVideo(e.target.files[0]));

loadModels();
