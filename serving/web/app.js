// orlik web chat: streams /v1/chat/completions over SSE, keeps the conversation, shows tokens/s.
// Plain JS, no dependencies, nothing loaded from outside this server.
"use strict";

const $ = (id) => document.getElementById(id);
const log = $("log"), input = $("input"), statusLine = $("status");
const modelSel = $("model"), keyInput = $("api-key");
let history = [];
let controller = null;

keyInput.value = localStorage.getItem("orlik-api-key") || "";
keyInput.addEventListener("change", () => { localStorage.setItem("orlik-api-key", keyInput.value); loadModels(); });

function headers() {
  const h = { "Content-Type": "application/json" };
  if (keyInput.value) h["Authorization"] = "Bearer " + keyInput.value;
  return h;
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.appendChild(body);
  log.appendChild(div);
  log.scrollTop = log.scrollHeight;
  return div;
}

async function errorText(resp) {
  try {
    const j = await resp.json();
    return (j.error && j.error.message) || JSON.stringify(j);
  } catch (e) {
    return resp.status + " " + resp.statusText;
  }
}

async function loadModels() {
  statusLine.textContent = "loading models…";
  try {
    const resp = await fetch("/v1/models", { headers: headers() });
    if (!resp.ok) { statusLine.textContent = "models: " + await errorText(resp); return; }
    const data = (await resp.json()).data;
    const keep = modelSel.value;
    modelSel.innerHTML = "";
    for (const m of data) {
      const opt = document.createElement("option");
      opt.value = m.id;
      opt.textContent = m.id + (m.format ? " (" + m.format + ")" : "");
      modelSel.appendChild(opt);
    }
    if (keep) modelSel.value = keep;
    statusLine.textContent = data.length + " model(s) served";
  } catch (e) {
    statusLine.textContent = "cannot reach the server: " + e;
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function send(text) {
  history.push({ role: "user", content: text });
  bubble("user", text);
  const reply = bubble("assistant", "");
  const body = reply.querySelector(".text");
  const meta = document.createElement("span");
  meta.className = "meta";
  reply.appendChild(meta);
  controller = new AbortController();
  setBusy(true);
  const t0 = performance.now();
  let tFirst = null, tLast = null, chunks = 0, usage = null, finish = null, content = "";
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({
        model: modelSel.value, messages: history, stream: true, stream_options: { include_usage: true },
        temperature: parseFloat($("temperature").value), max_tokens: parseInt($("max-tokens").value, 10),
      }),
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const j = JSON.parse(data);
          if (j.error) throw new Error(j.error.message);
          if (j.usage) usage = j.usage;
          const choice = j.choices && j.choices[0];
          if (!choice) continue;
          if (choice.finish_reason) finish = choice.finish_reason;
          const delta = choice.delta && choice.delta.content;
          if (delta) {
            const now = performance.now();
            if (tFirst === null) tFirst = now;
            tLast = now;
            chunks += 1;
            content += delta;
            body.textContent = content;
            log.scrollTop = log.scrollHeight;
          }
        }
      }
    }
    history.push({ role: "assistant", content: content });
    const n = usage ? usage.completion_tokens : chunks;
    // Decode speed: tokens after the first over the time they took (the first one carries the prompt).
    const secs = tFirst !== null && tLast > tFirst ? (tLast - tFirst) / 1000 : (performance.now() - t0) / 1000;
    const rate = n > 1 && tLast > tFirst ? (n - 1) / secs : n / secs;
    meta.textContent = n + " tokens · " + rate.toFixed(1) + " tok/s · " + (finish || "stopped");
    reply.dataset.done = "true";
  } catch (e) {
    if (e.name === "AbortError") {
      history.push({ role: "assistant", content: content });
      meta.textContent = "stopped";
      reply.dataset.done = "true";
    } else {
      reply.className = "msg error";
      body.textContent = (content ? content + "\n" : "") + "error: " + e.message;
      reply.dataset.done = "error";
      history.pop();
    }
  } finally {
    controller = null;
    setBusy(false);
  }
}

$("form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = input.value.trim();
  if (!text || controller) return;
  input.value = "";
  send(text);
});
input.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("form").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("clear").addEventListener("click", () => { history = []; log.innerHTML = ""; });
loadModels();
