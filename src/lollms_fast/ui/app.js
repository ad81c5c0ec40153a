// lollms_fast web UI: discussions, streaming chat, settings. Plain JS, no build step.
"use strict";

const $ = (sel) => document.querySelector(sel);

const state = {
  discussions: [],
  current: null,          // current discussion id
  messages: [],           // rows of the current discussion, as load_discussion returns them
  generating: false,
  streamTarget: null,     // {aiId, el} of the answer being streamed
};

// ------------------------------------------------------------------ HTTP helpers

async function api(path, { method = "GET", body, query } = {}) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(query || {})) url.searchParams.set(k, v);
  const init = { method, credentials: "same-origin", headers: {} };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  let resp = await fetch(url, init);
  if (resp.status === 401 && askForKey()) resp = await fetch(url, init);
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error(data.error || `${resp.status} ${resp.statusText}`);
  return data;
}

// A server started with an API key refuses the API without it. The key is kept in a cookie
// (same-site only), which fetch and the Socket.IO handshake both send.
function askForKey() {
  const key = prompt("This server needs its API key");
  if (!key) return false;
  document.cookie = `lollms_api_key=${encodeURIComponent(key.trim())}; path=/; SameSite=Strict`;
  return true;
}

function toast(text, isError = false) {
  const el = $("#toast");
  el.textContent = text;
  el.className = isError ? "show error" : "show";
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { el.className = ""; }, 3500);
}

async function guarded(fn) {
  try { return await fn(); } catch (e) { toast(e.message, true); return undefined; }
}

// ------------------------------------------------------------------ discussions sidebar

async function refreshDiscussions() {
  state.discussions = await api("/list_discussions");
  const list = $("#discussions");
  list.replaceChildren();
  for (const d of [...state.discussions].reverse()) {
    const li = document.createElement("li");
    li.dataset.id = d.id;
    li.className = d.id === state.current ? "active" : "";
    const title = document.createElement("span");
    title.className = "title";
    title.textContent = d.title && d.title !== "untitled" ? d.title : "New discussion";
    title.onclick = () => guarded(() => openDiscussion(d.id));
    const rename = button("✎", "Rename", () => guarded(() => renameDiscussion(d)));
    const del = button("✕", "Delete", () => guarded(() => deleteDiscussion(d)));
    li.append(title, rename, del);
    list.append(li);
  }
}

function button(label, title, onclick, cls = "icon") {
  const b = document.createElement("button");
  b.type = "button";
  b.className = cls;
  b.textContent = label;
  b.title = title;
  b.setAttribute("aria-label", title);
  b.onclick = onclick;
  return b;
}

async function newDiscussion() {
  const created = await api("/new_discussion");
  await refreshDiscussions();
  await openDiscussion(created.id);
}

async function openDiscussion(id) {
  state.messages = await api("/load_discussion", { method: "POST", body: { id } });
  state.current = id;
  localStorage.setItem("lollms_fast.current", String(id));
  renderMessages();
  for (const li of document.querySelectorAll("#discussions li")) {
    li.className = Number(li.dataset.id) === id ? "active" : "";
  }
  closeSidebarOnPhone();
}

async function renameDiscussion(d) {
  const title = prompt("New title", d.title || "");
  if (title === null || !title.trim()) return;
  await api("/edit_title", { method: "POST", body: { id: d.id, title: title.trim() } });
  await refreshDiscussions();
}

async function deleteDiscussion(d) {
  if (!confirm(`Delete "${d.title || "New discussion"}"?`)) return;
  await api("/delete_discussion", { method: "POST", body: { id: d.id } });
  if (state.current === d.id) {
    state.current = null;
    state.messages = [];
    renderMessages();
  }
  await refreshDiscussions();
}

async function exportAll() {
  const data = await api("/export");
  const blob = new Blob([JSON.stringify(data, null, 2)], { type: "application/json" });
  const a = document.createElement("a");
  const stamp = new Date().toISOString().replace(/[-:]/g, "").replace("T", ".").slice(0, 15);
  a.href = URL.createObjectURL(blob);
  a.download = `discussions_export_${stamp}.json`;
  a.click();
  URL.revokeObjectURL(a.href);
}

async function importFile(file) {
  const jArray = JSON.parse(await file.text());
  const res = await api("/import_multiple_discussions", { method: "POST", body: { jArray } });
  toast(`Imported ${res.ids ? res.ids.length : 0} discussion(s)`);
  await refreshDiscussions();
}

// ------------------------------------------------------------------ messages

// The branch shown: from the newest message up through its parents.
function visibleBranch() {
  const byId = new Map(state.messages.map((m) => [m.id, m]));
  const shown = [];
  let node = state.messages.length ? state.messages[state.messages.length - 1] : null;
  const seen = new Set();
  while (node && !seen.has(node.id)) {
    seen.add(node.id);
    shown.push(node);
    node = byId.get(node.parent);
  }
  return shown.reverse().filter((m) => m.type === 0);
}

function renderMessages() {
  const box = $("#messages");
  box.replaceChildren();
  if (state.current === null) {
    const hint = document.createElement("p");
    hint.className = "empty";
    hint.textContent = "Start a new discussion, or just type a message.";
    box.append(hint);
    return;
  }
  for (const m of visibleBranch()) box.append(messageElement(m));
  box.scrollTop = box.scrollHeight;
}

function messageElement(m) {
  const el = document.createElement("article");
  el.className = "msg " + (m.sender === "user" ? "user" : "ai");
  el.dataset.id = m.id;
  const head = document.createElement("header");
  const who = document.createElement("strong");
  who.textContent = m.sender;
  const rank = document.createElement("span");
  rank.className = "rank";
  rank.textContent = m.rank ? `${m.rank > 0 ? "+" : ""}${m.rank}` : "";
  const actions = document.createElement("span");
  actions.className = "actions";
  actions.append(
    button("▲", "Rank up", () => guarded(() => rankMessage(m, "up"))),
    button("▼", "Rank down", () => guarded(() => rankMessage(m, "down"))),
    button("✎", "Edit", () => editMessage(m, el)),
  );
  if (m.sender !== "user") {
    actions.append(button("↻", "Regenerate", () => guarded(() => regenerate(m))));
  }
  actions.append(button("✕", "Delete message", () => guarded(() => deleteMessage(m))));
  head.append(who, rank, actions);
  const body = document.createElement("div");
  body.className = "body";
  body.innerHTML = renderMarkdown(m.content);
  el.append(head, body);
  return el;
}

async function rankMessage(m, dir) {
  const res = await api(`/message_rank_${dir}`, { query: { id: m.id } });
  m.rank = res.new_rank;
  renderMessages();
}

function editMessage(m, el) {
  const body = el.querySelector(".body");
  const area = document.createElement("textarea");
  area.value = m.content;
  area.rows = Math.min(12, m.content.split("\n").length + 1);
  const save = button("Save", "Save", () => guarded(async () => {
    await api("/update_message", { query: { id: m.id, message: area.value } });
    m.content = area.value;
    renderMessages();
  }), "small");
  const cancel = button("Cancel", "Cancel", () => renderMessages(), "small");
  body.replaceChildren(area, save, cancel);
  area.focus();
}

async function deleteMessage(m) {
  if (!confirm("Delete this message?")) return;
  await api("/delete_message", { query: { id: m.id } });
  state.messages = state.messages.filter((x) => x.id !== m.id);
  renderMessages();
}

async function regenerate(aiMessage) {
  if (state.generating) return;
  const parent = state.messages.find((x) => x.id === aiMessage.parent);
  startGenerating();
  socket.emit("generate_msg_from", { id: aiMessage.parent, prompt: parent ? parent.content : "" });
}

// ------------------------------------------------------------------ generation

// Opened after the first HTTP call, so the session cookie it shares already exists.
let socket = null;

function startGenerating() {
  state.generating = true;
  $("#send").hidden = true;
  $("#stop").hidden = false;
}

function stopGenerating() {
  state.generating = false;
  state.streamTarget = null;
  $("#send").hidden = false;
  $("#stop").hidden = true;
}

async function send() {
  const input = $("#prompt");
  const text = input.value.trim();
  if (!text || state.generating) return;
  if (state.current === null) {
    await newDiscussion();
  }
  input.value = "";
  autoGrow(input);
  startGenerating();
  socket.emit("generate_msg", { prompt: text });
}

let renderPending = false;
function scheduleRender() {
  if (renderPending) return;
  renderPending = true;
  requestAnimationFrame(() => {
    renderPending = false;
    const target = state.streamTarget;
    if (!target) return;
    const box = $("#messages");
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    target.el.innerHTML = renderMarkdown(target.msg.content);
    if (atBottom) box.scrollTop = box.scrollHeight;
  });
}

function connectSocket() {
  socket = new MiniSocket({ stream: "delta" });
  socket.on("infos", (data) => {
    if (data.status !== "generation_started") {
      stopGenerating();
      toast(data.message || data.error || `Generation refused: ${data.status}`, true);
      return;
    }
    if (data.discussion_id !== state.current) {
      state.current = data.discussion_id;
      state.messages = [];
      refreshDiscussions();
    }
    const userId = data.user_message_id;
    if (!state.messages.some((m) => m.id === userId)) {
      const last = state.messages[state.messages.length - 1];
      state.messages.push({ id: userId, sender: "user", content: data.message, type: 0, rank: 0,
                            parent: last ? last.id : -1 });
    }
    const ai = { id: data.ai_message_id, sender: data.bot, content: "", type: 0, rank: 0,
                 parent: userId };
    state.messages.push(ai);
    renderMessages();
    state.streamTarget = { msg: ai, el: document.querySelector(`.msg[data-id="${ai.id}"] .body`) };
    state.streamTarget.el.classList.add("streaming");
    maybeTitle(data.message);
  });

  socket.on("message", (data) => {
    const target = state.streamTarget;
    if (!target || data.ai_message_id !== target.msg.id) return;
    target.msg.content += data.data;          // delta mode: only the new text
    scheduleRender();
  });

  socket.on("final", (data) => {
    const target = state.streamTarget;
    if (target && data.ai_message_id === target.msg.id) {
      target.msg.content = data.data;
      target.el.classList.remove("streaming");
      target.el.innerHTML = renderMarkdown(data.data);
    }
    if (data.finish_reason === "error") toast("Generation failed", true);
    stopGenerating();
  });

  socket.on("disconnect", () => { $("#status").textContent = "offline"; });
  socket.on("connect", () => { $("#status").textContent = ""; });
  socket.on("connect_error", (e) => toast(e.message || "Socket connection refused", true));
}

async function maybeTitle(firstPrompt) {
  const d = state.discussions.find((x) => x.id === state.current);
  if (d && (!d.title || d.title === "untitled") && firstPrompt) {
    await guarded(() => api("/edit_title", {
      method: "POST", body: { id: d.id, title: firstPrompt.slice(0, 60) },
    }));
    await refreshDiscussions();
  }
}

function stop() {
  socket.emit("stop_gen");
}

function autoGrow(el) {
  el.style.height = "auto";
  el.style.height = Math.min(el.scrollHeight, 200) + "px";
  el.style.overflowY = el.scrollHeight > 200 ? "auto" : "hidden";
}

// ------------------------------------------------------------------ settings

const PARAMS = [
  ["temperature", "Temperature", 0, 2, 0.05],
  ["top_k", "Top k", 0, 200, 1],
  ["top_p", "Top p", 0, 1, 0.01],
  ["repeat_penalty", "Repeat penalty", 0.5, 2, 0.05],
  ["repeat_last_n", "Repeat window", 0, 512, 1],
  ["n_predict", "Max answer tokens", 1, 4096, 1],
  ["seed", "Seed (-1 random)", -1, 2147483647, 1],
];

async function fillSelect(sel, values, current) {
  sel.replaceChildren();
  for (const v of values) {
    const opt = document.createElement("option");
    opt.value = v;
    opt.textContent = v;
    opt.selected = v === current;
    sel.append(opt);
  }
}

async function loadSettings() {
  const cfg = await api("/get_config");
  const lang = $("#set-language");
  const cat = $("#set-category");
  const pers = $("#set-personality");
  await fillSelect(lang, await api("/list_personalities_languages"), cfg.personality_language);
  await fillSelect(cat, await api("/list_personalities_categories",
    { query: { language: lang.value } }), cfg.personality_category);
  await fillSelect(pers, await api("/list_personalities",
    { query: { language: lang.value, category: cat.value } }), cfg.personality);
  await fillSelect($("#set-model"), await api("/list_models"), cfg.model);
  $("#set-override").checked = !!cfg.override_personality_model_parameters;
  const box = $("#params");
  box.replaceChildren();
  for (const [key, label, min, max, step] of PARAMS) {
    const row = document.createElement("label");
    row.textContent = label;
    const input = document.createElement("input");
    input.type = "number";
    Object.assign(input, { min, max, step, value: cfg[key], name: key });
    row.append(input);
    box.append(row);
  }
}

async function onLanguageChange() {
  const lang = $("#set-language").value;
  await fillSelect($("#set-category"), await api("/list_personalities_categories",
    { query: { language: lang } }), null);
  await onCategoryChange();
}

async function onCategoryChange() {
  await fillSelect($("#set-personality"), await api("/list_personalities", {
    query: { language: $("#set-language").value, category: $("#set-category").value },
  }), null);
}

async function saveSettings() {
  const changes = [
    ["personality_language", $("#set-language").value],
    ["personality_category", $("#set-category").value],
    ["personality", $("#set-personality").value],
    ["override_personality_model_parameters", $("#set-override").checked],
  ];
  for (const input of document.querySelectorAll("#params input")) {
    changes.push([input.name, Number(input.value)]);
  }
  for (const [name, value] of changes) {
    const res = await api("/update_setting", {
      method: "POST", body: { setting_name: name, setting_value: value },
    });
    if (!res.status) throw new Error(`${name}: ${res.error || "refused"}`);
  }
  const model = $("#set-model").value;
  const cfg = await api("/get_config");
  if (model && model !== cfg.model) {
    const res = await api("/set_model", { method: "POST", body: { model } });
    if (res.status !== "succeeded") throw new Error(res.error || "model switch failed");
  }
  await api("/save_settings", { method: "POST", body: {} });
  toast("Settings saved");
}

// ------------------------------------------------------------------ views and start-up

const VIEWS = { "/settings": "settings", "/help": "help" };

function showView(path) {
  const view = VIEWS[path.replace(/\/$/, "")] || "chat";
  for (const section of document.querySelectorAll("main > section")) {
    section.hidden = section.id !== `view-${view}`;
  }
  if (view === "settings") guarded(loadSettings);
}

function navigate(path) {
  history.pushState({}, "", path);
  showView(path);
}

function closeSidebarOnPhone() {
  document.body.classList.remove("sidebar-open");
}

function wire() {
  $("#new").onclick = () => guarded(newDiscussion);
  $("#export").onclick = () => guarded(exportAll);
  $("#import").onclick = () => $("#import-file").click();
  $("#import-file").onchange = (e) => {
    const file = e.target.files[0];
    if (file) guarded(() => importFile(file));
    e.target.value = "";
  };
  $("#send").onclick = () => guarded(send);
  $("#stop").onclick = stop;
  const input = $("#prompt");
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      guarded(send);
    }
  });
  input.addEventListener("input", () => autoGrow(input));
  for (const a of document.querySelectorAll("a[data-nav]")) {
    a.onclick = (e) => { e.preventDefault(); navigate(a.getAttribute("href")); };
  }
  $("#menu").onclick = () => document.body.classList.toggle("sidebar-open");
  $("#set-language").onchange = () => guarded(onLanguageChange);
  $("#set-category").onchange = () => guarded(onCategoryChange);
  $("#save-settings").onclick = () => guarded(saveSettings);
  window.onpopstate = () => showView(location.pathname);
}

async function start() {
  wire();
  showView(location.pathname);
  // the first HTTP call that touches the session sets its cookie; the socket opened after it
  // sends that cookie, so the page and the socket share one current discussion
  const status = await guarded(() => api("/get_generation_status"));
  await guarded(refreshDiscussions);
  connectSocket();
  if (status && status.status) toast("A generation is still running for this browser");
  const remembered = Number(localStorage.getItem("lollms_fast.current"));
  if (remembered && state.discussions.some((d) => d.id === remembered)) {
    await guarded(() => openDiscussion(remembered));
  } else {
    renderMessages();
  }
}

start();
