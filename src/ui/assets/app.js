// volt-operator web view. Hand-written, no dependencies, embedded in the operator binary.
// The bearer token lives in this tab's sessionStorage and goes in an Authorization header on
// every request (the live stream too: it is read with fetch, not EventSource), so no cookie
// is set and no other site can act with it.
"use strict";

const TOKEN_KEY = "volt-token";
// Step phases and their colours (the browser test checks these pixels).
const COLOURS = {
  None: "#eef0f3", Pending: "#d0d4da", Running: "#3b82f6", Retrying: "#f59e0b", Waiting: "#a855f7",
  Succeeded: "#22c55e", Failed: "#ef4444", Skipped: "#9ca3af", Cancelled: "#6b7280",
};
const RUN_COLOURS = {
  Pending: "#d0d4da", Queued: "#d0d4da", Running: "#3b82f6", Suspended: "#f59e0b",
  Succeeded: "#22c55e", Failed: "#ef4444", Cancelled: "#6b7280",
};
const COL_W = 190, NODE_W = 160, NODE_H = 34, ROW_H = 46, PAD = 20;

const $ = (sel, root = document) => root.querySelector(sel);
const main = () => $("#main");
let current = null; // the open page: {stop()}
// Decisions sent from this page, by run and step, so that a live re-render keeps saying so.
const sent = new Map();

function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
function token() { return sessionStorage.getItem(TOKEN_KEY); }

class AuthError extends Error {}

async function api(path, options = {}) {
  const headers = Object.assign({ Authorization: "Bearer " + token() }, options.headers || {});
  const res = await fetch(path, Object.assign({}, options, { headers }));
  let body = null;
  try { body = await res.json(); } catch (_) { /* not JSON */ }
  if (res.status === 401) throw new AuthError((body && body.error) || "sign in");
  if (!res.ok) throw new Error((body && body.error) || res.status + " " + res.statusText);
  return body;
}

function fmtDuration(s) {
  if (s == null) return "";
  if (s < 60) return s.toFixed(1) + "s";
  if (s < 3600) return Math.floor(s / 60) + "m" + String(Math.floor(s % 60)).padStart(2, "0") + "s";
  return Math.floor(s / 3600) + "h" + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + "m";
}
function fmtAge(iso) {
  if (!iso) return "";
  return fmtDuration((Date.now() - Date.parse(iso)) / 1000);
}
// Colours by class (app.css): the page's Content-Security-Policy allows no inline style.
function phaseBadge(phase) {
  return `<span class="phase p-${esc(phase)}">${esc(phase)}</span>`;
}

// ---------------------------------------------------------------------------------------
// Sign-in

function showLogin(message) {
  stop();
  $("#who").textContent = "";
  $("#logout").hidden = true;
  main().innerHTML = `
    <form class="login" id="login">
      <h1>Sign in</h1>
      <p>Paste a bearer token the cluster accepts (for example <code>kubectl create token NAME</code>).
      You see the runs <code>kubectl</code> would show you.</p>
      <textarea id="token" autocomplete="off" spellcheck="false" placeholder="eyJhbGciOi…" required></textarea>
      <button type="submit" id="login-submit">Sign in</button>
      <p class="error" id="login-error">${esc(message || "")}</p>
    </form>`;
  $("#login").addEventListener("submit", async ev => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("#token").value.trim());
    route();
  });
}

function signOut() {
  sessionStorage.removeItem(TOKEN_KEY);
  location.hash = "#/";
  showLogin("");
}

function stop() {
  if (current) current.stop();
  current = null;
}

async function route() {
  stop();
  if (!token()) return showLogin("");
  try {
    const me = await api("/ui/api/whoami");
    $("#who").textContent = me.user;
    $("#logout").hidden = false;
  } catch (e) {
    sessionStorage.removeItem(TOKEN_KEY);
    return showLogin(e.message);
  }
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  if (parts[0] === "runs" && parts.length >= 3) return runPage(parts[1], parts[2]);
  return listPage();
}

function failed(e) {
  if (e instanceof AuthError) { sessionStorage.removeItem(TOKEN_KEY); return showLogin(e.message); }
  main().insertAdjacentHTML("afterbegin", `<p class="error" id="page-error">${esc(e.message)}</p>`);
}

// ---------------------------------------------------------------------------------------
// The run list

function listPage() {
  const q = new URLSearchParams(location.hash.split("?")[1] || "");
  main().innerHTML = `
    <div class="filters">
      <label>Namespace <select id="f-ns"><option value="">all I may list</option></select></label>
      <label>Phase <select id="f-phase"><option value="">any</option>
        ${Object.keys(RUN_COLOURS).map(p => `<option>${p}</option>`).join("")}</select></label>
      <label>Workflow <input id="f-wf" size="16" value="${esc(q.get("workflow") || "")}"></label>
      <span class="muted" id="count"></span>
    </div>
    <table id="runs"><thead><tr><th>Namespace</th><th>Run</th><th>Workflow</th><th>Phase</th>
      <th>Progress</th><th>Age</th><th>Duration</th><th>Tokens</th><th>Cost</th></tr></thead><tbody></tbody></table>`;
  $("#f-ns").value = q.get("namespace") || "";
  $("#f-phase").value = q.get("phase") || "";
  let timer = null, stopped = false;
  const load = async () => {
    const params = new URLSearchParams({
      namespace: $("#f-ns").value, phase: $("#f-phase").value, workflow: $("#f-wf").value,
    });
    try {
      const body = await api("/ui/api/runs?" + params);
      if (stopped) return;
      const sel = $("#f-ns"), chosen = sel.value;
      const known = new Set([...sel.options].map(o => o.value));
      for (const ns of body.namespaces) if (!known.has(ns)) sel.add(new Option(ns, ns));
      sel.value = chosen;
      $("#count").textContent = body.total + " runs" + (body.synced ? "" : " (still listing)");
      $("#runs tbody").innerHTML = body.runs.map(r => `
        <tr data-run="${esc(r.namespace + "/" + r.name)}">
          <td>${esc(r.namespace)}</td>
          <td><a href="#/runs/${encodeURIComponent(r.namespace)}/${encodeURIComponent(r.name)}">${esc(r.name)}</a>
            ${r.parent ? `<span class="muted">(child of ${esc(r.parent)})</span>` : ""}</td>
          <td>${esc(r.workflow)}</td><td class="run-phase">${phaseBadge(r.phase)}</td><td>${esc(r.progress)}</td>
          <td>${fmtAge(r.created)}</td><td>${fmtDuration(r.durationSeconds)}</td>
          <td class="num">${r.inputTokens + r.outputTokens}</td><td class="num">${r.cost ? r.cost.toFixed(4) : ""}</td>
        </tr>`).join("");
    } catch (e) { if (!stopped) failed(e); }
    if (!stopped) timer = setTimeout(load, 5000);
  };
  for (const id of ["#f-ns", "#f-phase", "#f-wf"]) $(id).addEventListener("change", () => { clearTimeout(timer); load(); });
  current = { stop() { stopped = true; clearTimeout(timer); } };
  load();
}

// ---------------------------------------------------------------------------------------
// The run page: the DAG as SVG, coloured by phase, updated from the live stream

function layout(nodes) {
  // Columns by depth (longest path from a root); finally steps after everything; the steps of
  // a loop in rows under it, inside a dashed box.
  const byKey = new Map(nodes.map(n => [n.key, n]));
  const depth = new Map();
  const depthOf = (n, seen = new Set()) => {
    if (depth.has(n.key)) return depth.get(n.key);
    if (seen.has(n.key)) return 0;
    seen.add(n.key);
    let d = 0;
    for (const k of n.deps) { const dep = byKey.get(k); if (dep) d = Math.max(d, depthOf(dep, seen) + 1); }
    depth.set(n.key, d);
    return d;
  };
  const top = nodes.filter(n => !n.parent && !n.finally);
  let maxDepth = 0;
  for (const n of top) maxDepth = Math.max(maxDepth, depthOf(n));
  const inner = new Map();
  for (const n of nodes) if (n.parent) { if (!inner.has(n.parent)) inner.set(n.parent, []); inner.get(n.parent).push(n); }
  const rows = []; // next free row per column
  const pos = new Map();
  const place = (n, col) => {
    const row = rows[col] || 0;
    pos.set(n.key, { x: PAD + col * COL_W, y: PAD + row * ROW_H });
    const kids = inner.get(n.key) || [];
    kids.forEach((k, i) => pos.set(k.key, { x: PAD + col * COL_W + 12, y: PAD + (row + 1 + i) * ROW_H, w: NODE_W - 12 }));
    rows[col] = row + 1 + kids.length + (kids.length ? 0.4 : 0);
  };
  for (const n of top) place(n, depth.get(n.key));
  for (const n of nodes.filter(n => n.finally)) place(n, maxDepth + 1);
  const cols = Math.max(1, rows.length);
  const height = PAD * 2 + Math.max(1, ...rows.map(r => r || 0)) * ROW_H;
  return { pos, inner, width: PAD * 2 + cols * COL_W, height };
}

function nodeLabel(n, st) {
  let label = n.id;
  if (st && st.items) label += `  ×${st.items[1]} (${st.items[0]} done)`;
  if (st && st.iteration && n.kind === "loop") label += `  ↻${st.iteration}`;
  return label.length > 26 ? label.slice(0, 25) + "…" : label;
}

function drawDag(page) {
  const { pos, inner, width, height } = layout(page.nodes);
  const parts = [`<svg id="dag" xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}">`];
  // Loop boxes, then edges in one path, then nodes.
  for (const [loopKey, kids] of inner) {
    const p = pos.get(loopKey);
    if (!p) continue;
    parts.push(`<rect class="group" x="${p.x - 6}" y="${p.y - 6}" width="${NODE_W + 12}" height="${(kids.length + 1) * ROW_H}" rx="8"/>`);
  }
  let d = "";
  for (const n of page.nodes) {
    const to = pos.get(n.key);
    if (!to) continue;
    for (const k of n.deps) {
      const from = pos.get(k);
      if (!from) continue;
      const x1 = from.x + (from.w || NODE_W), y1 = from.y + NODE_H / 2, x2 = to.x, y2 = to.y + NODE_H / 2;
      d += `M${x1} ${y1}C${x1 + 20} ${y1} ${x2 - 20} ${y2} ${x2} ${y2}`;
    }
  }
  parts.push(`<path class="edges" d="${d}"/>`);
  for (const n of page.nodes) {
    const p = pos.get(n.key);
    if (!p) continue;
    const st = page.states[n.key];
    const fill = COLOURS[st ? st.phase : "None"];
    const w = p.w || NODE_W;
    const stack = n.fanOut ? `<rect x="4" y="-4" width="${w}" height="${NODE_H}" rx="6" fill="${fill}" class="stack" stroke="#57606a"/>` : "";
    parts.push(`<g class="node" data-key="${esc(n.key)}" data-kind="${esc(n.kind)}" transform="translate(${p.x},${p.y})">${stack}` +
      `<rect class="box" width="${w}" height="${NODE_H}" rx="6" fill="${fill}"/>` +
      `<text x="8" y="21">${esc(nodeLabel(n, st))}</text><title>${esc(n.key)} (${esc(n.kind)})</title></g>`);
  }
  parts.push("</svg>");
  return parts.join("");
}

function paint(page, changed) {
  const svg = $("#dag");
  if (!svg) return;
  // The node elements by key, found once per drawing.
  if (!page.elements || page.elements.svg !== svg) {
    page.elements = { svg, byKey: new Map([...svg.querySelectorAll("g.node")].map(g => [g.dataset.key, g])) };
    page.byKey = new Map(page.nodes.map(n => [n.key, n]));
  }
  const nodes = page.byKey;
  for (const [key, st] of Object.entries(changed)) {
    page.states[key] = st;
    const g = page.elements.byKey.get(key);
    if (!g) continue;
    const fill = COLOURS[st.phase] || COLOURS.None;
    for (const r of g.querySelectorAll("rect")) r.setAttribute("fill", fill);
    const n = nodes.get(key);
    if (n) g.querySelector("text").textContent = nodeLabel(n, st);
  }
}

function runHead(r) {
  return `<div class="runhead" id="runhead" data-phase="${esc(r.phase)}">
    <h1>${esc(r.namespace)}/${esc(r.name)}</h1> ${phaseBadge(r.phase)}
    <span>workflow <b>${esc(r.workflow)}</b></span><span>progress <b id="progress">${esc(r.progress)}</b></span>
    <span>duration ${fmtDuration(r.durationSeconds)}</span>
    <span>tokens ${r.inputTokens + r.outputTokens}</span>${r.cost ? `<span>cost ${r.cost.toFixed(4)}</span>` : ""}
    ${r.parent ? `<a href="#/runs/${encodeURIComponent(r.namespace)}/${encodeURIComponent(r.parent)}">parent run ${esc(r.parent)}</a>` : ""}
    ${r.message ? `<span class="muted">${esc(r.message)}</span>` : ""}</div>`;
}

function runPage(ns, name) {
  const t0 = performance.now();
  main().innerHTML = `<p class="muted">Loading ${esc(ns)}/${esc(name)}…</p>`;
  const controller = new AbortController();
  let page = null, selected = null;
  current = { stop() { controller.abort(); } };
  const base = `/ui/api/runs/${encodeURIComponent(ns)}/${encodeURIComponent(name)}`;

  const render = () => {
    const tPage = performance.now();
    main().innerHTML = runHead(page.run) +
      `<div class="legend">${Object.keys(COLOURS).map(p => `<span class="p-${p}">${p === "None" ? "not started" : p}</span>`).join("")}</div>` +
      `<div class="layout"><div class="dagbox">${drawDag(page)}</div><aside id="panel" hidden></aside></div>`;
    $("#dag").addEventListener("click", ev => {
      const g = ev.target.closest("g.node");
      if (g) openStep(g.dataset.key);
    });
    // The time to the first full picture, and of drawing it alone (docs/benchmarks.md).
    window.voltRenderMs = performance.now() - t0;
    window.voltDrawMs = performance.now() - tPage;
    document.body.dataset.rendered = "true";
  };

  const openStep = async (key, itemRow = null) => {
    selected = key;
    for (const g of document.querySelectorAll("g.node.selected")) g.classList.remove("selected");
    const g = $(`g.node[data-key="${CSS.escape(key)}"]`);
    if (g) g.classList.add("selected");
    const st = page.states[key];
    const node = page.nodes.find(n => n.key === key);
    const panel = $("#panel");
    panel.hidden = false;
    if (!st) { panel.innerHTML = `<h2>${esc(key)}</h2><p class="muted">Not started.</p>`; return; }
    panel.innerHTML = `<h2>${esc(key)}</h2><p class="muted">Loading…</p>`;
    try {
      const rowKey = itemRow || st.row;
      const s = await api(`${base}/steps/${encodeURIComponent(rowKey)}`);
      if (selected !== key) return;
      const r = s.row;
      const items = st.items ? `<dt>items</dt><dd>${st.items[0]} of ${st.items[1]} done</dd>` : "";
      const child = st.child ? `<dt>child run</dt><dd><a href="#/runs/${encodeURIComponent(ns)}/${encodeURIComponent(st.child)}">${esc(st.child)}</a></dd>` : "";
      const fan = node && node.fanOut ? `<p class="muted">Items: ${Object.keys(page.steps).filter(k => k.startsWith(st.row + "[")).slice(0, 200).map(k =>
        `<a href="#" data-row="${esc(k)}" class="item">${esc(k)}</a>`).join(" ")}</p>` : "";
      panel.innerHTML = `<h2>${esc(s.key)} ${phaseBadge(r.phase)}</h2>
        <dl><dt>kind</dt><dd>${esc(s.kind || node?.kind || "")}</dd><dt>attempts</dt><dd>${r.attempts || 0}</dd>
        <dt>started</dt><dd>${esc(r.startedAt || "")}</dd><dt>finished</dt><dd>${esc(r.finishedAt || "")}</dd>
        ${r.retryAt ? `<dt>next retry</dt><dd>${esc(r.retryAt)}</dd>` : ""}
        ${r.agent ? `<dt>agent</dt><dd>${esc(r.agent)} ${esc(r.replica || "")}</dd>` : ""}
        ${r.pod ? `<dt>pod</dt><dd>${esc(r.pod)}</dd>` : ""}
        ${r.tokens ? `<dt>tokens</dt><dd>${r.tokens.prompt} in, ${r.tokens.completion} out</dd>` : ""}
        ${r.cached ? `<dt>cache</dt><dd>hit</dd>` : ""}${items}${child}
        ${s.decision ? `<dt>decision</dt><dd>${esc(s.decision.decision)} by ${esc(s.decision.by || "?")} ${esc(s.decision.comment || "")}</dd>` : ""}
        </dl>
        ${r.phase === "Waiting" ? `<div class="decide"><input id="comment" placeholder="comment" size="24">
          <button class="approve" id="approve">Approve</button><button class="reject" id="reject">Reject</button></div>` : ""}
        ${sent.has(`${base}/${rowKey}`) ? `<p id="decided">${sent.get(`${base}/${rowKey}`)}.</p>` : ""}
        ${r.message ? `<h3>Message</h3><pre>${esc(r.message)}</pre>` : ""}
        ${s.output != null ? `<h3>Output${s.kind === "http" ? " (response body)" : ""}</h3><pre id="output">${esc(s.output)}</pre>` : ""}
        ${s.transcript ? `<h3>Transcript</h3><pre id="transcript">${esc(s.transcript)}</pre>` : ""}
        ${s.log != null ? `<h3>Pod log</h3><pre id="log">${esc(s.log)}</pre>` : ""}
        ${Object.entries(s.errors || {}).map(([k, v]) => `<p class="error">${esc(k)}: ${esc(v)}</p>`).join("")}${fan}`;
      for (const a of panel.querySelectorAll("a.item")) a.addEventListener("click", ev => {
        ev.preventDefault();
        openStep(key, a.dataset.row);
      });
      for (const [id, decision] of [["#approve", "Approve"], ["#reject", "Reject"]]) {
        const b = $(id, panel);
        if (b) b.addEventListener("click", async () => {
          b.disabled = true;
          try {
            await api(`${base}/decisions`, {
              method: "POST", headers: { "Content-Type": "application/json" },
              body: JSON.stringify({ step: rowKey, decision, comment: $("#comment", panel).value }),
            });
            const said = decision === "Approve" ? "Approved" : "Rejected";
            sent.set(`${base}/${rowKey}`, said);
            if (!$("#decided", panel)) panel.insertAdjacentHTML("beforeend", `<p id="decided">${said}.</p>`);
          } catch (e) { panel.insertAdjacentHTML("beforeend", `<p class="error" id="decide-error">${esc(e.message)}</p>`); b.disabled = false; }
        });
      }
    } catch (e) {
      if (e instanceof AuthError) return failed(e);
      panel.innerHTML = `<h2>${esc(key)}</h2><p class="error">${esc(e.message)}</p>`;
    }
  };

  const onEvent = (name, data) => {
    if (name === "page") { page = data; render(); return; }
    if (!page) return;
    if (name === "states") {
      const t = performance.now();
      page.run = data.run;
      const head = $("#runhead");
      if (head) head.outerHTML = runHead(data.run);
      for (const [k, v] of Object.entries(data.steps || {})) page.steps[k] = v;
      paint(page, data.states);
      // How long each update took the page (docs/benchmarks.md).
      (window.voltPaintMs = window.voltPaintMs || []).push(performance.now() - t);
      if (selected && data.states[selected]) openStep(selected);
    } else if (name === "gone") {
      main().insertAdjacentHTML("afterbegin", `<p class="error">The run was deleted.</p>`);
    } else if (name === "denied") {
      main().insertAdjacentHTML("afterbegin", `<p class="error">${esc(data.error)}</p>`);
    }
  };

  (async () => {
    try {
      const res = await fetch(`${base}/stream`, { headers: { Authorization: "Bearer " + token() }, signal: controller.signal });
      if (!res.ok) {
        let msg = res.status + " " + res.statusText;
        try { msg = (await res.json()).error || msg; } catch (_) { /* not JSON */ }
        if (res.status === 401) throw new AuthError(msg);
        main().innerHTML = `<p class="error" id="page-error">${esc(msg)}</p>`;
        return;
      }
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          const chunk = buf.slice(0, i);
          buf = buf.slice(i + 2);
          let ev = "message", data = "";
          for (const line of chunk.split("\n")) {
            if (line.startsWith("event:")) ev = line.slice(6).trim();
            else if (line.startsWith("data:")) data += line.slice(5).replace(/^ /, "");
          }
          if (data) onEvent(ev, JSON.parse(data));
        }
      }
    } catch (e) {
      if (e.name === "AbortError") return;
      failed(e);
    }
  })();
}

window.addEventListener("hashchange", route);
document.addEventListener("DOMContentLoaded", () => {
  $("#logout").addEventListener("click", signOut);
  route();
});
