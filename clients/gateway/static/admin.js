// The admin console: polls /admin/api/snapshot and renders it; posts operator actions.
// Fast on hundreds of actors: each panel is one innerHTML assignment per refresh (skipped
// when its HTML did not change), and one delegated click listener serves every button.
"use strict";

const REFRESH_MS = 1500;
const CHART_COLOURS = ["#2f6fde", "#e67e22", "#1e8449", "#8e44ad", "#c0392b", "#16a085", "#7f8c8d"];
const $ = (id) => document.getElementById(id);
const rendered = new Map(); // panel id -> the HTML it shows
let snapshot = null;
let lastOk = 0;

function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
const fixed = (v, digits = 2) => (v == null ? "" : Number(v).toFixed(digits));
function bytes(n) {
  if (!n) return "0";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}
const pct = (part, whole) => (whole ? `${((100 * part) / whole).toFixed(1)}%` : "–");
const clock = (t) => new Date(t * 1000).toLocaleTimeString();

function setPanel(id, html) {
  if (rendered.get(id) === html) return;
  rendered.set(id, html);
  $(id).innerHTML = html;
}

// headers: [label, numeric?]; rows: HTML strings of <tr>.
function table(headers, rows, empty = "none") {
  if (!rows.length) return `<p class="muted">${esc(empty)}</p>`;
  const head = headers.map(([label, num]) => `<th${num ? ' class="num"' : ""}>${esc(label)}</th>`).join("");
  return `<table><thead><tr>${head}</tr></thead><tbody>${rows.join("")}</tbody></table>`;
}
const td = (v, num = false) => `<td${num ? ' class="num"' : ""}>${esc(v)}</td>`;
const button = (label, action, target, cls = "") =>
  `<button type="button" class="${cls}" data-action="${esc(action)}" data-target="${esc(target)}">${esc(label)}</button>`;

// ---------------------------------------------------------------- panels

function throughput(history, seconds) {
  // images completed per minute over the last `seconds`, from the first and last sample in it
  if (history.length < 2) return null;
  const last = history[history.length - 1];
  const first = history.find((s) => last.t - s.t <= seconds) || history[0];
  if (last.t <= first.t) return null;
  let done = 0;
  for (const [wf, counts] of Object.entries(last.workflows)) done += counts[0] - ((first.workflows[wf] || [0])[0]);
  return (60 * done) / (last.t - first.t);
}

function renderSummary(s, snap) {
  const queued = s.models.reduce((a, m) => a + m.queue_depth, 0);
  const pending = s.models.reduce((a, m) => a + m.pending_s, 0);
  const completed = s.workflows.reduce((a, w) => a + w.completed, 0);
  const met = s.workflows.reduce((a, w) => a + w.slo_met, 0);
  const rate = throughput(snap.history, 60);
  const draining = s.actors.filter((a) => a.state === "draining").length;
  const cards = [
    ["actors", `${s.actors.length}${draining ? ` (${draining} draining)` : ""}`],
    ["hosts", s.agents.length],
    ["queued tasks", queued],
    ["pending device-s", fixed(pending, 1)],
    ["images / min (last min)", rate == null ? "–" : fixed(rate, 1)],
    ["SLO attained", pct(met, completed)],
    ["requests in flight here", Object.values(snap.gateway.runs_in_flight).reduce((a, n) => a + n, 0)],
    ["admission", s.settings.admission ? `on (${s.settings.admission_bound || "max"})` : "off"],
    ["CFG split", s.settings.cfg_split || "–"],
    ["serving", s.settings.serving || "micro"],
  ];
  setPanel("summary", cards.map(([label, value]) => `<div class="card"><b>${esc(value)}</b><span>${esc(label)}</span></div>`).join(""));
}

function polyline(points, tmin, tmax, vmax, colour) {
  const xs = (t) => (1000 * (t - tmin)) / Math.max(1e-9, tmax - tmin);
  const ys = (v) => 118 - (110 * v) / Math.max(1e-9, vmax);
  const path = points.map(([t, v]) => `${xs(t).toFixed(1)},${ys(v).toFixed(1)}`).join(" ");
  return `<polyline fill="none" stroke="${colour}" stroke-width="2" vector-effect="non-scaling-stroke" points="${path}"/>`;
}

function chart(title, series, unit) {
  // series: [[name, [[t, v], ...]], ...]; the ones that stayed at zero are left out
  series = series.filter(([, pts]) => pts.some((p) => p[1] > 0));
  const all = series.flatMap(([, pts]) => pts);
  if (all.length < 2) return `<div class="chart"><b>${esc(title)}</b><p class="muted">nothing yet in the last minutes</p></div>`;
  const tmin = Math.min(...all.map((p) => p[0])), tmax = Math.max(...all.map((p) => p[0]));
  const vmax = Math.max(1e-9, ...all.map((p) => p[1]));
  const lines = series.map(([, pts], i) => polyline(pts, tmin, tmax, vmax, CHART_COLOURS[i % CHART_COLOURS.length]));
  const legend = series.map(([name, pts], i) =>
    `<span><i class="c${i % CHART_COLOURS.length}"></i>${esc(name)} ${fixed(pts.length ? pts[pts.length - 1][1] : 0, 2)}</span>`);
  return `<div class="chart"><b>${esc(title)}</b> <span class="muted">max ${fixed(vmax, 2)} ${esc(unit)}, ${Math.round(tmax - tmin)} s</span>
    <svg viewBox="0 0 1000 120" preserveAspectRatio="none">${lines.join("")}</svg><div class="legend">${legend.join("")}</div></div>`;
}

function renderCharts(history) {
  const workflows = new Set(), models = new Set();
  history.forEach((s) => { Object.keys(s.workflows).forEach((w) => workflows.add(w)); Object.keys(s.models).forEach((m) => models.add(m)); });
  const rate = [...workflows].map((wf) => [wf, history.slice(1).map((s, i) => {
    const prev = history[i];
    const dt = s.t - prev.t;
    return [s.t, dt > 0 ? (60 * (((s.workflows[wf] || [0])[0]) - ((prev.workflows[wf] || [0])[0]))) / dt : 0];
  })]);
  const pending = [...models].map((m) => [m, history.map((s) => [s.t, (s.models[m] || [0, 0])[1]])]);
  const depth = [...models].map((m) => [m, history.map((s) => [s.t, (s.models[m] || [0])[0]])]);
  setPanel("charts", chart("images / min by workflow", rate, "/min") + chart("pending device-seconds by model", pending, "s")
    + chart("queue depth by model", depth, "tasks"));
}

function renderModels(s) {
  const bounds = s.replica_bounds || {};
  const targets = (s.plan && s.plan.targets) || {};
  const rows = s.models.map((m) => {
    const b = bounds[m.model] || {};
    return `<tr>${td(m.model)}${td(m.actors, true)}${td(targets[m.model] ?? "", true)}${td(b.min ?? "", true)}${td(b.max ?? "", true)}`
      + `${td(m.queue_depth, true)}${td(fixed(m.ready_s), true)}${td(fixed(m.pending_s), true)}${td(fixed(m.arrival_rate), true)}`
      + `${td(fixed(m.service_s, 3), true)}${td(fixed(m.oldest_wait_s), true)}${td(m.min_slack_s == null ? "" : fixed(m.min_slack_s), true)}`
      + `${td(m.tasks_done, true)}${td(m.batches ? fixed(m.tasks_done / m.batches, 1) : "", true)}</tr>`;
  });
  setPanel("models", table([["model"], ["actors", 1], ["target", 1], ["min", 1], ["max", 1], ["queue depth", 1], ["ready s", 1],
    ["pending s", 1], ["arrivals/s", 1], ["service s", 1], ["oldest wait s", 1], ["least slack s", 1], ["tasks done", 1],
    ["tasks/batch", 1]], rows, "no models yet"));
  setPanel("model-names", s.models.map((m) => `<option value="${esc(m.model)}">`).join(""));
}

function renderWorkflows(s) {
  const paused = new Set(s.paused_workflows || []);
  const workflows = s.workflows.slice().sort((a, b) => b.submitted - a.submitted || a.workflow.localeCompare(b.workflow));
  const rows = workflows.map((w) => {
    const isPaused = paused.has(w.workflow) || w.paused;
    const action = isPaused ? button("Resume", "resume", w.workflow) : button("Pause", "pause", w.workflow, "danger");
    const attained = w.completed ? w.slo_met / w.completed : null;
    const cls = attained == null ? "" : attained >= 0.9 ? "ok" : "bad";
    return `<tr>${td(w.workflow)}${td(isPaused ? "paused" : "admitting")}${td(w.submitted, true)}${td(w.completed, true)}`
      + `<td class="num ${cls}">${esc(pct(w.slo_met, w.completed))}</td>${td(w.rejected, true)}${td(w.failed, true)}`
      + `${td(w.slo_s ? fixed(w.slo_s) : "", true)}${td(w.solo_s ? fixed(w.solo_s) : "", true)}${td(w.latency_mode, true)}<td>${action}</td></tr>`;
  });
  setPanel("workflows", table([["workflow"], ["admission"], ["submitted", 1], ["completed", 1], ["SLO attained", 1],
    ["rejected", 1], ["failed", 1], ["SLO s", 1], ["solo s", 1], ["split-CFG runs", 1], ["action"]], rows, "no workflow has run yet"));
}

function actorRow(a) {
  const t = a.telemetry || {};
  const state = a.stopping ? "stopping" : a.state;
  const actions = a.stopping ? ""
    : (a.state === "draining" ? button("Undrain", "undrain", a.actor_id) : button("Drain", "drain", a.actor_id))
      + " " + button("Stop", "stop", a.actor_id, "danger");
  return `<tr class="${a.stopping ? "stopping" : a.state === "draining" ? "draining" : ""}" data-actor="${esc(a.actor_id)}">`
    + `${td(a.actor_id)}${td(a.model)}${td(a.host)}${td(a.device)}<td class="state-${esc(a.state)}">${esc(state)}</td>`
    + `${td(a.in_flight, true)}${td(a.credits, true)}${td(a.max_batch_rows_seen, true)}${td(a.batches, true)}${td(a.tasks, true)}`
    + `${td(a.held_tensors, true)}${td(bytes(t.memory_used_bytes), true)}${td(fixed(t.busy_s, 1), true)}${td(a.backend)}<td>${actions}</td></tr>`;
}

function renderActors(s) {
  const filter = $("actor-filter").value.trim().toLowerCase();
  const actors = s.actors.filter((a) => !filter
    || [a.actor_id, a.model, a.host, a.device, a.state].some((v) => String(v).toLowerCase().includes(filter)));
  actors.sort((a, b) => a.model.localeCompare(b.model) || a.actor_id.localeCompare(b.actor_id));
  setPanel("actors", table([["actor"], ["model"], ["host"], ["device"], ["state"], ["in flight", 1], ["credits", 1],
    ["max batch", 1], ["batches", 1], ["tasks", 1], ["held", 1], ["memory", 1], ["busy s", 1], ["backend"], ["actions"]],
  actors.map(actorRow), filter ? "no actor matches" : "no actors"));
}

function renderHosts(s) {
  const perDevice = new Map();
  s.actors.forEach((a) => {
    const key = `${a.host}|${a.device}`;
    perDevice.set(key, (perDevice.get(key) || []).concat(a.model));
  });
  const rows = [];
  s.agents.forEach((g) => g.devices.forEach((d) => {
    const models = perDevice.get(`${g.host}|${d.device}`) || [];
    rows.push(`<tr>${td(g.host)}${td(g.agent_id)}${td(d.device)}${td(d.kind)}${td(d.name)}${td(bytes(d.memory_bytes), true)}`
      + `${td(bytes(d.free_bytes), true)}${td(pct(d.memory_bytes - d.free_bytes, d.memory_bytes), true)}${td(models.length, true)}`
      + `${td([...new Set(models)].join(", "))}</tr>`);
  }));
  setPanel("hosts", table([["host"], ["agent"], ["device"], ["kind"], ["name"], ["memory", 1], ["free", 1], ["used", 1],
    ["actors", 1], ["models"]], rows, "no node agent"));
}

function renderGroups(s) {
  const split = s.settings.cfg_split || "never";
  const rows = s.workflows.filter((w) => w.latency_mode).map((w) =>
    `<tr>${td(w.workflow)}${td(w.latency_mode, true)}${td(pct(w.latency_mode, w.submitted), true)}</tr>`);
  const rule = { never: "CFG branches always run as one batch-2 call (throughput mode)",
    always: "every CFG step runs its two branches on two actors (latency mode)",
    auto: "a CFG request splits over two actors while enough of its base model's actors are idle" }[split] || "";
  setPanel("groups", `<p>cfg_split = <b>${esc(split)}</b>: ${esc(rule)}</p>`
    + table([["workflow"], ["requests run split", 1], ["of submitted", 1]], rows, "no request has run split yet"));
}

function renderScheduler(s) {
  const plan = s.plan;
  if (!plan) { setPanel("scheduler", '<p class="muted">no scheduler has posted a plan (replicas are fixed)</p>'); return; }
  const targets = Object.entries(plan.targets || {}).map(([m, n]) => `${m}: ${n}`).join(", ");
  const progress = (plan.in_progress || []).map((c) => `<li>${esc(c)}</li>`).join("");
  const decisions = (plan.decisions || []).slice().reverse().map((d) => `<li>${esc(d)}</li>`).join("");
  setPanel("scheduler", `<p><b>targets</b> ${esc(targets || "none")}</p>`
    + (progress ? `<p><b>in progress</b></p><ul class="log">${progress}</ul>` : "")
    + `<p><b>recent decisions</b> (newest first)</p>${decisions ? `<ul class="log">${decisions}</ul>` : '<p class="muted">none yet</p>'}`);
}

function renderOutcomes(s, snap) {
  const offset = snap.time - s.time; // broker clock -> wall clock
  const broker = (s.recent_outcomes || []).map((o) => ({ time: o.time + offset, source: "broker", kind: o.kind,
    what: o.workflow, code: o.code, message: o.message, field: o.field, id: o.request_id }));
  const gateway = (snap.gateway.recent_errors || []).map((e) => ({ time: e.time, source: "gateway", kind: `HTTP ${e.status}`,
    what: e.path, code: e.code, message: e.message, field: e.field, id: e.key ? `key ${e.key}` : "" }));
  const rows = broker.concat(gateway).sort((a, b) => b.time - a.time).slice(0, 60).map((o) =>
    `<tr>${td(clock(o.time))}${td(o.source)}<td class="bad">${esc(o.kind)}</td>${td(o.what)}${td(o.code)}${td(o.field)}`
    + `<td class="wrap">${esc(o.message)}</td>${td(o.id)}</tr>`);
  setPanel("outcomes", table([["time"], ["source"], ["kind"], ["workflow / path"], ["reason"], ["field"], ["message"], ["request / key"]],
    rows, "none recently"));
}

function render() {
  if (!snapshot) return;
  const s = snapshot.stats;
  renderSummary(s, snapshot);
  renderCharts(snapshot.history);
  renderModels(s);
  renderWorkflows(s);
  renderActors(s);
  renderHosts(s);
  renderGroups(s);
  renderScheduler(s);
  renderOutcomes(s, snapshot);
}

// ---------------------------------------------------------------- polling and actions

async function refresh() {
  try {
    const response = await fetch("/admin/api/snapshot", { credentials: "same-origin", cache: "no-store" });
    if (response.status === 401 || response.status === 403) { window.location = "/admin/login"; return; }
    const body = await response.json();
    if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
    snapshot = body;
    lastOk = Date.now();
    $("status").textContent = `broker ${body.broker} · ${new Date().toLocaleTimeString()} · as ${body.gateway.key}`;
    $("status").classList.remove("stale");
    render();
  } catch (err) {
    $("status").textContent = `no fresh data (${err.message}); last at ${lastOk ? new Date(lastOk).toLocaleTimeString() : "never"}`;
    $("status").classList.add("stale");
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

function toast(message, error = false) {
  const el = $("toast");
  el.textContent = message;
  el.className = `show${error ? " error" : ""}`;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { el.className = ""; }, 4000);
}

async function post(path, body) {
  const response = await fetch(path, { method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/json" }, body: JSON.stringify(body || {}) });
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) {
    const e = answer.error || {};
    throw new Error(`${e.message || response.statusText}${e.field ? ` (field ${e.field})` : ""}`);
  }
  return answer;
}

const ACTIONS = {
  drain: (id) => post(`/admin/api/actors/${encodeURIComponent(id)}/drain`),
  undrain: (id) => post(`/admin/api/actors/${encodeURIComponent(id)}/undrain`),
  stop: (id) => (confirm(`Stop actor ${id}? It drains, then its agent stops it.`) ? post(`/admin/api/actors/${encodeURIComponent(id)}/stop`) : null),
  pause: (wf) => post(`/admin/api/workflows/${encodeURIComponent(wf)}/pause`),
  resume: (wf) => post(`/admin/api/workflows/${encodeURIComponent(wf)}/resume`),
};

document.addEventListener("click", async (event) => {
  const target = event.target.closest("button[data-action]");
  if (!target) return;
  const { action, target: id } = target.dataset;
  target.disabled = true;
  try {
    const answer = await ACTIONS[action](id);
    if (answer) toast(answer.message || `${action} ${id}: done`);
  } catch (err) {
    toast(`${action} ${id}: ${err.message}`, true);
  } finally {
    target.disabled = false;
  }
});

$("replicas-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target;
  const bound = (name) => (form.elements[name].value === "" ? null : Number(form.elements[name].value));
  const model = form.elements.model.value.trim();
  try {
    const answer = await post(`/admin/api/models/${encodeURIComponent(model)}/replicas`, { min: bound("min"), max: bound("max") });
    toast(answer.message || `replicas of ${model} set`);
  } catch (err) {
    toast(`replicas of ${model}: ${err.message}`, true);
  }
});

$("actor-filter").addEventListener("input", () => { if (snapshot) renderActors(snapshot.stats); });

refresh();
