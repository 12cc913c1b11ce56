"use strict";
// The chat page: a conversation kept in localStorage, sent to /v1/chat/completions and read back as it
// streams (server-sent events from fetch), each reply rendered as Markdown built from escaped text only.

const $ = (id) => document.getElementById(id);
const STORE = "minillm.chat", KEY = "minillm.apiKey";
const SETTINGS = ["system", "temperature", "top_p", "max_tokens"];
let messages = [];      // {role: "user" | "assistant", content, tokens?, tokensPerSecond?, ttft?, note?}
let controller = null;  // the running request's, while a reply streams
let frame = 0;          // a pending redraw of the streaming reply

// ---- Markdown: every character of the model's text goes through escape(); the only tags are ours ----

const ENTITIES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
const escape = (text) => text.replace(/[&<>"']/g, (c) => ENTITIES[c]);
const FENCE = /^\s*```\s*([\w+-]*)/, LIST = /^\s*(?:[-*+]|\d+[.)])\s+/, HEADING = /^(#{1,6})\s+/;
const startsBlock = (line) => FENCE.test(line) || HEADING.test(line) || LIST.test(line);

function markdown(text) {
  const lines = text.replace(/\0/g, "").split("\n"), html = [];
  for (let i = 0; i < lines.length;) {
    const line = lines[i], fence = line.match(FENCE), heading = line.match(HEADING);
    if (fence) {  // a fence still open while the reply streams runs to the end
      const code = [];
      for (i++; i < lines.length && !/^\s*```\s*$/.test(lines[i]); i++) code.push(lines[i]);
      i++;
      html.push(`<pre><code${fence[1] ? ` class="language-${fence[1]}"` : ""}>${escape(code.join("\n"))}</code></pre>`);
    } else if (heading) {
      const level = heading[1].length;
      html.push(`<h${level}>${inline(line.slice(heading[0].length))}</h${level}>`);
      i++;
    } else if (LIST.test(line)) {
      const tag = /^\s*\d/.test(line) ? "ol" : "ul", items = [];
      while (i < lines.length && LIST.test(lines[i])) items.push(`<li>${inline(lines[i++].replace(LIST, ""))}</li>`);
      html.push(`<${tag}>${items.join("")}</${tag}>`);
    } else if (!line.trim()) {
      i++;
    } else {
      const paragraph = [];
      while (i < lines.length && lines[i].trim() && !startsBlock(lines[i])) paragraph.push(inline(lines[i++]));
      html.push(`<p>${paragraph.join("<br>")}</p>`);
    }
  }
  return html.join("");
}

function inline(text) {
  const spans = [];  // code spans set aside (as \0N\0) so that no other rule reaches inside them
  const marked = text.replace(/`([^`]+)`/g, (_, code) => `\0${spans.push(code) - 1}\0`);
  return escape(marked)
    .replace(/\*\*(?=\S)(.+?)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^\w*])\*(?=\S)([^*]+?)\*(?!\w)/g, "$1<em>$2</em>")
    .replace(/(^|\W)_(?=\S)([^_]+?)_(?!\w)/g, "$1<em>$2</em>")
    .replace(/\[([^\]]+)\]\((https?:\/\/[^\s()]+)\)/g, '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>')
    .replace(/\0(\d+)\0/g, (_, n) => `<code>${escape(spans[n])}</code>`);
}

// ---- The conversation, kept in localStorage with the settings ----

function load() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE)) || {};
    messages = (saved.messages || [])
      .filter((m) => ["user", "assistant"].includes(m.role) && typeof m.content === "string");
    for (const id of SETTINGS) if (typeof saved[id] === "string") $(id).value = saved[id];
  } catch {
    messages = [];  // unreadable: a new conversation
  }
}

function save() {
  const saved = { messages };
  for (const id of SETTINGS) saved[id] = $(id).value;
  localStorage.setItem(STORE, JSON.stringify(saved));
}

function element(message) {
  const box = document.createElement("div"), body = document.createElement("div");
  box.className = `message ${message.role}`;
  body.className = "body";
  if (message.role === "user") body.textContent = message.content;
  else body.innerHTML = markdown(message.content);  // escaped inside markdown()
  box.append(body);
  const stats = [message.tokens != null && `${message.tokens} tokens`,
                 message.tokensPerSecond != null && `${message.tokensPerSecond.toFixed(1)} tok/s`,
                 message.ttft != null && `TTFT ${Math.round(message.ttft)} ms`, message.note].filter(Boolean);
  if (message.role === "assistant" && stats.length) {
    const line = document.createElement("div");
    line.className = "stats";
    line.textContent = stats.join(" · ");
    box.append(line);
  }
  return box;
}

function render() {
  cancelAnimationFrame(frame);
  frame = 0;
  $("messages").replaceChildren(...messages.map(element));
  $("messages").scrollTop = $("messages").scrollHeight;
}

function renderReply() {  // at most once a frame while a reply streams
  frame ||= requestAnimationFrame(() => {
    frame = 0;
    $("messages").lastElementChild?.replaceWith(element(messages.at(-1)));
    $("messages").scrollTop = $("messages").scrollHeight;
  });
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

// ---- Talking to the server ----

function headers() {
  const key = localStorage.getItem(KEY);
  return { "Content-Type": "application/json", ...(key ? { Authorization: `Bearer ${key}` } : {}) };
}

async function failure(response) {  // the one line a refused request shows
  if (response.status === 401) {
    $("key-form").hidden = false;
    $("api-key").focus();
    return new Error("This server needs an API key: enter it on the left, then send again.");
  }
  let detail = response.statusText;
  try {
    detail = (await response.json()).error.message || detail;
  } catch {}
  return new Error(`Server error ${response.status}: ${detail}`);
}

async function* events(response) {  // the JSON of each `data:` line of a server-sent event stream
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  for (let buffer = "";;) {
    const { value, done } = await reader.read();
    if (done) return;
    const lines = (buffer + value).split("\n");
    buffer = lines.pop();
    for (const line of lines)
      if (line.startsWith("data: ") && line !== "data: [DONE]") yield JSON.parse(line.slice(6));
  }
}

function request() {
  const system = $("system").value.trim();
  const body = { messages: [...(system ? [{ role: "system", content: system }] : []),
                            ...messages.slice(0, -1).map(({ role, content }) => ({ role, content }))],
                 stream: true, stream_options: { include_usage: true } };
  for (const id of ["temperature", "top_p", "max_tokens"]) if ($(id).value !== "") body[id] = Number($(id).value);
  return body;
}

async function send(text) {
  const reply = { role: "assistant", content: "" };
  messages.push({ role: "user", content: text }, reply);
  showError("");
  save();
  render();
  controller = new AbortController();
  $("send").hidden = true;
  $("stop").hidden = false;
  const started = performance.now();
  let first = null, usage = null;
  try {
    const response = await fetch("/v1/chat/completions",
      { method: "POST", headers: headers(), body: JSON.stringify(request()), signal: controller.signal });
    if (!response.ok) throw await failure(response);
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(`Server error: ${chunk.error.message}`);
      usage = chunk.usage || usage;
      const delta = chunk.choices?.[0]?.delta ?? {};
      if (delta.content || delta.reasoning_content) first ??= performance.now();
      if (delta.content) {
        reply.content += delta.content;
        renderReply();
      }
    }
    if (!usage) throw new TypeError("the stream ended early");
    reply.tokens = usage.completion_tokens;
    if (first !== null) {
      const decoding = (performance.now() - first) / 1000;  // the time of the tokens after the first
      reply.ttft = first - started;
      if (reply.tokens > 1 && decoding > 0) reply.tokensPerSecond = (reply.tokens - 1) / decoding;
    }
  } catch (err) {
    if (first !== null) reply.ttft = first - started;
    if (err.name === "AbortError") reply.note = "stopped";
    else showError(err instanceof TypeError ? "Lost the connection to the server; the conversation is kept."
                                            : err.message);
    if (!reply.content && messages.at(-1) === reply) {  // nothing came back: the message returns to the box
      messages.splice(-2);
      $("prompt").value ||= text;
    } else if (err.name !== "AbortError") {
      reply.note = "interrupted";
    }
  } finally {
    controller = null;
    $("send").hidden = false;
    $("stop").hidden = true;
    save();
    render();
  }
}

async function showModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) throw await failure(response);
    $("model").textContent = (await response.json()).data[0].id;
    $("key-form").hidden = true;
    showError("");
  } catch (err) {
    showError(err instanceof TypeError ? "Cannot reach the server." : err.message);
  }
}

// ---- Wiring ----

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller?.abort());
$("new-chat").addEventListener("click", () => {
  controller?.abort();
  messages = [];
  showError("");
  save();
  render();
});
$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  localStorage.setItem(KEY, $("api-key").value.trim());
  showModel();
});
for (const id of SETTINGS) $(id).addEventListener("change", save);
load();
render();
showModel();
