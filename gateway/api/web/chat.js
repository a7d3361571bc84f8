// gateway's built-in chat page. Plain browser JavaScript, no build step, no dependencies.
//
// The conversation lives here (`turns`); with "keep on the server" set and the server
// offering /v1/sessions, it is also a server-side session (the server pins its KV cache and
// reverts on request) and each turn sends only the new message. Anything wrong with the session
// (expired, a new system prompt) drops it and the page goes on without one, sending the whole
// history to /v1/chat/completions. Stopped or failed answers stay on screen but out of the
// history, as the server's sessions record only complete replies.
//
// Model output is never parsed as HTML: markdown is rendered by building DOM nodes whose text
// is set with textContent, and the page's CSP requires Trusted Types with no policy, so any
// string assignment to innerHTML would throw.
"use strict";

const SETTINGS_KEY = "gateway.chat.settings";
const KEY_KEY = "gateway.chat.apiKey";
const DEFAULTS = { system: "", temperature: 0.7, top_p: 1, max_tokens: "", model: "", session: true };
const $ = (id) => document.getElementById(id);

const state = {
  settings: loadSettings(),
  apiKey: sessionStorage.getItem(KEY_KEY) || localStorage.getItem(KEY_KEY) || "",
  turns: [],            // {user, reply, status: streaming|done|stopped|error, note, kept}
  session: null,        // {id, system} while the conversation is a server-side session
  sessionsOffered: true,
  controller: null,     // the AbortController of the answer being streamed
  retryAfterKey: null,  // what to do once the user has entered a key
};

// ---------------------------------------------------------------- settings and key

function loadSettings() {
  try {
    return { ...DEFAULTS, ...JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}") };
  } catch (_) {
    return { ...DEFAULTS };
  }
}

function saveSettings() {
  localStorage.setItem(SETTINGS_KEY, JSON.stringify(state.settings));
}

function bindSettings() {
  const fields = { system: "set-system", temperature: "set-temperature", top_p: "set-top-p",
                   max_tokens: "set-max-tokens" };
  for (const [key, id] of Object.entries(fields)) {
    $(id).value = state.settings[key];
    $(id).addEventListener("input", () => { state.settings[key] = $(id).value; saveSettings(); });
  }
  $("set-session").checked = !!state.settings.session;
  $("set-session").addEventListener("change", () => {
    state.settings.session = $("set-session").checked;
    saveSettings();
    showMode();
  });
  $("settings-btn").addEventListener("click", () => $("settings-dialog").showModal());
  $("settings-close").addEventListener("click", () => $("settings-dialog").close());
  $("model").addEventListener("change", () => { state.settings.model = $("model").value; saveSettings(); });
}

function askForKey(reason, retry) {
  state.retryAfterKey = retry || null;
  $("key-reason").textContent = reason;
  $("key-input").value = "";
  if (!$("key-dialog").open) $("key-dialog").showModal();
  $("key-input").focus();
}

function bindKeyDialog() {
  const save = () => {
    state.apiKey = $("key-input").value.trim();
    sessionStorage.setItem(KEY_KEY, state.apiKey);
    if ($("key-remember").checked) localStorage.setItem(KEY_KEY, state.apiKey);
    else localStorage.removeItem(KEY_KEY);
    $("key-dialog").close();
    const retry = state.retryAfterKey;
    state.retryAfterKey = null;
    if (retry) retry();
    else if (!$("model").options.length) loadModels();   // e.g. a key entered after a refused answer
  };
  $("key-save").addEventListener("click", save);
  $("key-input").addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); save(); } });
  $("key-cancel").addEventListener("click", () => { state.retryAfterKey = null; $("key-dialog").close(); });
  $("key-btn").addEventListener("click", () => askForKey("API key sent as a bearer token.", loadModels));
}

// ---------------------------------------------------------------- talking to the server

class HttpError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (state.apiKey) h.Authorization = "Bearer " + state.apiKey;
  return h;
}

async function errorOf(response) {
  let message = response.statusText || "request failed";
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON: keep the status text */ }
  return new HttpError(response.status, `${response.status}: ${message}`);
}

async function api(method, path, body) {
  const response = await fetch(path, { method, headers: headers(body !== undefined),
                                       body: body === undefined ? undefined : JSON.stringify(body) });
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

function keyProblem(err, retry) {
  if (!(err instanceof HttpError) || err.status !== 401) return false;
  askForKey(state.apiKey ? "The server rejected this API key." : "This server needs an API key.", retry);
  return true;
}

async function loadModels() {
  try {
    const models = (await api("GET", "/v1/models")).data.map((m) => m.id);
    const select = $("model");
    select.replaceChildren(...models.map((id) => new Option(id, id)));
    if (models.includes(state.settings.model)) select.value = state.settings.model;
    state.settings.model = select.value;
    showError("");
  } catch (err) {
    if (!keyProblem(err, loadModels)) showError("Cannot list the models: " + err.message);
  }
}

// Server-Sent Events from a fetch body: yields each `data:` payload, parsed, until [DONE].
async function* sse(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

function samplingFields() {
  const s = state.settings, body = { stream: true, stream_options: { include_usage: true } };
  if (s.model) body.model = s.model;
  if (s.temperature !== "" && !isNaN(+s.temperature)) body.temperature = +s.temperature;
  if (s.top_p !== "" && !isNaN(+s.top_p)) body.top_p = +s.top_p;
  if (s.max_tokens !== "" && +s.max_tokens > 0) body.max_tokens = Math.floor(+s.max_tokens);
  return body;
}

function historyMessages() {
  const out = state.settings.system ? [{ role: "system", content: state.settings.system }] : [];
  for (const t of state.turns) {
    if (t.kept) out.push({ role: "user", content: t.user }, { role: "assistant", content: t.reply });
  }
  return out;
}

// The session this turn should go to, or null: created on the first turn, dropped when the
// system prompt changed under it.
async function sessionForTurn() {
  if (!state.settings.session || !state.sessionsOffered) return null;
  if (state.session && state.session.system !== state.settings.system) dropSession();
  if (state.session) return state.session;
  if (state.turns.some((t) => t.kept)) return null;   // history the server never saw
  const system = state.settings.system;
  try {
    const created = await api("POST", "/v1/sessions", system ? { system } : {});
    state.session = { id: created.id, system };
  } catch (err) {
    if (err instanceof HttpError && (err.status === 404 || err.status === 405)) state.sessionsOffered = false;
    else throw err;
  }
  showMode();
  return state.session;
}

function dropSession() {
  const session = state.session;
  state.session = null;
  showMode();
  if (session) {   // frees its pinned KV blocks now rather than at the server's TTL
    fetch(`/v1/sessions/${session.id}`, { method: "DELETE", headers: headers(false), keepalive: true })
      .catch(() => {});
  }
}

async function openStream(turn, signal) {
  const session = await sessionForTurn();
  const body = samplingFields();
  let path = "/v1/chat/completions";
  if (session) {
    path = `/v1/sessions/${session.id}/chat`;
    body.messages = [{ role: "user", content: turn.user }];
  } else {
    body.messages = historyMessages().concat([{ role: "user", content: turn.user }]);
  }
  const response = await fetch(path, { method: "POST", headers: headers(true), body: JSON.stringify(body), signal });
  if (response.status === 404 && session) {   // expired or deleted: go on without it
    state.session = null;
    showMode();
    return openStream(turn, signal);
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

// ---------------------------------------------------------------- one answer

async function answer(turn) {
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  const t0 = performance.now();
  let first = null, last = null, usage = null;
  try {
    const response = await openStream(turn, controller.signal);
    for await (const frame of sse(response)) {
      if (frame.error) throw new Error(frame.error.message || "the server ended the answer with an error");
      if (frame.usage) usage = frame.usage;
      const choice = (frame.choices || [])[0];
      const text = choice && choice.delta && choice.delta.content;
      if (text) {
        last = performance.now();
        if (first === null) first = last;
        turn.reply += text;
        scheduleRender(turn);
      }
      if (choice && choice.finish_reason) turn.finish = choice.finish_reason;
    }
    turn.status = "done";
    turn.kept = true;
    turn.note = turn.finish === "length" ? "stopped at max tokens" : "";
  } catch (err) {
    if (controller.signal.aborted) {
      turn.status = "stopped";
      turn.note = "stopped; not kept in the history";
    } else {
      turn.status = "error";
      turn.note = err.message;
      if (!keyProblem(err, null)) showError(err.message);
    }
  } finally {
    state.controller = null;
    setBusy(false);
    showStats(t0, first, last, usage, turn);
    renderTurns();
  }
}

function showStats(t0, first, last, usage, turn) {
  if (first === null) {
    $("stats").textContent = turn.status === "done" ? "no tokens in the last answer" : "";
    return;
  }
  const tokens = usage ? usage.completion_tokens : null;
  const parts = [`TTFT ${Math.round(first - t0)} ms`];
  if (tokens !== null && tokens > 1 && last > first) {
    parts.push(`${((tokens - 1) / ((last - first) / 1000)).toFixed(1)} tok/s`);
  }
  if (tokens !== null) parts.push(`${tokens} tokens`);
  if (usage) parts.push(`prompt ${usage.prompt_tokens}`);
  $("stats").textContent = parts.join(" \u00b7 ");
}

function send(text) {
  text = text.trim();
  if (!text || state.controller) return false;
  showError("");
  const turn = { user: text, reply: "", status: "streaming", note: "", kept: false };
  state.turns.push(turn);
  renderTurns();
  answer(turn);
  return true;
}

// Keeps turns 0..n-1. On a session that is POST /v1/sessions/{id}/revert with the index the
// server knows the turn by (it never recorded stopped or failed answers).
async function revertTo(n) {
  if (state.controller) return;
  const keptBefore = state.turns.slice(0, n).filter((t) => t.kept).length;
  const keptAll = state.turns.filter((t) => t.kept).length;
  if (state.session && keptBefore < keptAll) {
    try {
      await api("POST", `/v1/sessions/${state.session.id}/revert`, { turn: keptBefore });
    } catch (err) {
      if (err instanceof HttpError && err.status === 404) { state.session = null; showMode(); }
      else { if (!keyProblem(err, () => revertTo(n))) showError("Revert failed: " + err.message); return; }
    }
  }
  const removed = state.turns.splice(n);
  renderTurns();
  return removed;
}

async function regenerate() {
  const n = state.turns.length - 1;
  if (n < 0 || state.controller) return;
  const removed = await revertTo(n);
  if (removed && removed.length) send(removed[0].user);
}

function clearConversation() {
  if (state.controller) state.controller.abort();
  dropSession();
  state.turns = [];
  $("stats").textContent = "";
  showError("");
  renderTurns();
}

// ---------------------------------------------------------------- the view

function setBusy(busy) {
  document.body.dataset.state = busy ? "streaming" : "idle";
  $("send").disabled = busy;
  $("stop").hidden = !busy;
  $("clear").disabled = false;
  $("regen").disabled = busy || state.turns.length === 0;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function showMode() {
  const fresh = !state.turns.some((t) => t.kept);
  const wanted = state.settings.session && state.sessionsOffered;
  $("mode").textContent = state.session || (wanted && fresh) ? "server session"
    : wanted ? "history sent with each message (a session from the next conversation)"
    : "history sent with each message";
}

function button(label, title, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = "small";
  b.textContent = label;
  b.title = title;
  b.addEventListener("click", onClick);
  return b;
}

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

function copyText(text, b) {
  const done = () => { b.textContent = "Copied"; setTimeout(() => { b.textContent = "Copy"; }, 1200); };
  const fallback = () => {   // no clipboard API outside secure contexts
    const area = el("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
    done();
  };
  if (navigator.clipboard && window.isSecureContext) navigator.clipboard.writeText(text).then(done, fallback);
  else fallback();
}

function turnView(turn, i) {
  const view = el("section", "turn");
  view.dataset.turn = i;
  const user = el("div", "msg user");
  const meta = el("div", "meta");
  meta.append(el("span", "turn-no", `#${i + 1}`), el("span", "spacer"),
              button("Revert here", `remove this turn and everything after it (keep turns 1..${i})`, async () => {
                const removed = await revertTo(i);
                if (removed && removed.length) $("input").value = removed[0].user;
              }));
  user.append(meta, el("div", "text", turn.user));
  const reply = el("div", "msg assistant");
  reply.dataset.status = turn.status;
  const rmeta = el("div", "meta");
  rmeta.append(el("span", "status", turn.note || (turn.status === "streaming" ? "answering..." : "")),
               el("span", "spacer"), button("Copy", "copy this answer as markdown", (e) => copyText(turn.reply, e.target)));
  const body = el("div", "body");
  body.append(renderMarkdown(turn.reply));
  reply.append(rmeta, body);
  turn.body = body;
  view.append(user, reply);
  return view;
}

function renderTurns() {
  const log = $("log");
  if (!state.turns.length) {
    log.replaceChildren(el("p", "empty", "Ask something. Settings holds the system prompt and sampling."));
  } else {
    log.replaceChildren(...state.turns.map(turnView));
  }
  log.scrollTop = log.scrollHeight;
  showMode();
  $("regen").disabled = !!state.controller || state.turns.length === 0;
}

// One re-render of the streaming answer per animation frame, however many tokens arrived.
let pending = null;
function scheduleRender(turn) {
  if (pending) return;
  pending = requestAnimationFrame(() => {
    pending = null;
    if (!turn.body) return;
    const log = $("log");
    const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
    turn.body.replaceChildren(renderMarkdown(turn.reply));
    if (atBottom) log.scrollTop = log.scrollHeight;
  });
}

// ---------------------------------------------------------------- markdown to DOM nodes

const INLINE = new RegExp([
  "(`+)([\\s\\S]*?[^`])\\1(?!`)",                   // 1,2: code span
  "\\*\\*(?=\\S)([\\s\\S]*?\\S)\\*\\*",              // 3: strong
  "(?<!\\w)__(?=\\S)([\\s\\S]*?\\S)__(?!\\w)",      // 4: strong; never inside a word (snake__case)
  "\\*(?=[^\\s*])([^*]*?[^\\s*])\\*",                // 5: emphasis
  "\\[([^\\]\\n]+)\\]\\(([^)\\s]+)\\)",              // 6,7: link
  "(https?:\\/\\/[^\\s<>()\\[\\]]*[^\\s<>()\\[\\].,;:!?'\"])",   // 8: bare URL
].join("|"), "g");

function safeUrl(url) {
  try {
    const u = new URL(url, location.href);
    return ["http:", "https:", "mailto:"].includes(u.protocol) ? u.href : null;
  } catch (_) {
    return null;
  }
}

function link(text, url) {
  const a = el("a", "", text);
  a.href = url;
  a.target = "_blank";
  a.rel = "noopener noreferrer";
  return a;
}

function inline(text) {
  const frag = document.createDocumentFragment();
  let at = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > at) frag.append(text.slice(at, m.index));
    if (m[2] !== undefined) frag.append(el("code", "", m[2]));
    else if (m[3] !== undefined || m[4] !== undefined) { const s = el("strong"); s.append(inline(m[3] ?? m[4])); frag.append(s); }
    else if (m[5] !== undefined) { const e = el("em"); e.append(inline(m[5])); frag.append(e); }
    else if (m[6] !== undefined) { const url = safeUrl(m[7]); frag.append(url ? link(m[6], url) : m[0]); }
    else if (m[8] !== undefined) frag.append(link(m[8], m[8]));
    at = m.index + m[0].length;
  }
  if (at < text.length) frag.append(text.slice(at));
  return frag;
}

function paragraph(lines) {
  const p = el("p");
  lines.forEach((line, i) => { if (i) p.append(el("br")); p.append(inline(line)); });
  return p;
}

const FENCE = /^\s{0,3}(```+|~~~+)\s*([\w+#.-]*)/;
const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;
const ITEM = /^\s{0,3}([-*+]|\d{1,9}[.)])\s+(.*)$/;
const QUOTE = /^\s{0,3}>\s?(.*)$/;

// Blocks: fenced code (an unclosed fence runs to the end, as while streaming), headings,
// rules, block quotes, lists (flat), paragraphs. Every piece of text becomes a text node.
function renderMarkdown(source) {
  const frag = document.createDocumentFragment();
  const lines = source.replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if ((m = FENCE.exec(line))) {
      const close = new RegExp("^\\s{0,3}" + m[1][0] + "{" + m[1].length + ",}\\s*$");
      const code = [];
      for (i++; i < lines.length && !close.test(lines[i]); i++) code.push(lines[i]);
      i++;
      const pre = el("pre"), c = el("code", m[2] ? "language-" + m[2] : "", code.join("\n"));
      pre.append(c);
      frag.append(pre);
    } else if ((m = HEADING.exec(line))) {
      const h = el("h" + Math.min(6, m[1].length + 2));   // h3..h6: answers sit under the page's own headings
      h.append(inline(m[2]));
      frag.append(h);
      i++;
    } else if (RULE.test(line)) {
      frag.append(el("hr"));
      i++;
    } else if (QUOTE.test(line)) {
      const quoted = [];
      for (; i < lines.length && (m = QUOTE.exec(lines[i])); i++) quoted.push(m[1]);
      const q = el("blockquote");
      q.append(renderMarkdown(quoted.join("\n")));
      frag.append(q);
    } else if ((m = ITEM.exec(line))) {
      const ordered = /\d/.test(m[1][0]);
      const list = el(ordered ? "ol" : "ul");
      if (ordered && parseInt(m[1], 10) !== 1) list.start = parseInt(m[1], 10);
      for (; i < lines.length && (m = ITEM.exec(lines[i])) && /\d/.test(m[1][0]) === ordered; i++) {
        const li = el("li");
        li.append(inline(m[2]));
        list.append(li);
      }
      frag.append(list);
    } else if (!line.trim()) {
      i++;
    } else {
      const para = [];
      for (; i < lines.length && lines[i].trim() && !FENCE.test(lines[i]) && !HEADING.test(lines[i])
             && !ITEM.test(lines[i]) && !QUOTE.test(lines[i]); i++) para.push(lines[i]);
      if (!para.length) { para.push(line); i++; }
      frag.append(paragraph(para));
    }
  }
  return frag;
}

// ---------------------------------------------------------------- start

function init() {
  bindSettings();
  bindKeyDialog();
  $("send").addEventListener("click", () => { if (send($("input").value)) $("input").value = ""; });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("send").click(); }
  });
  $("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  $("regen").addEventListener("click", regenerate);
  $("clear").addEventListener("click", clearConversation);
  window.addEventListener("pagehide", dropSession);
  showMode();
  renderTurns();
  setBusy(false);
  loadModels();
}

init();
