// quotaflow dashboard: asks the query API (same origin) with the signed-in token and draws
// each answer as a chart (Chart.js, shipped in the package) with an accessible table behind it.
// The view (time range, org, key, endpoint) lives in the URL, so a link reproduces it; the
// token lives in sessionStorage only (this tab, until sign-out), never in a URL.
"use strict";

const TOKEN_KEY = "quotaflow.token";
const REFRESH_S = 10;
const MAX_PARALLEL = 3; // below the API's default of 4 queries at once, so a refresh never queues behind itself
const TIMEFRAMES = ["1h", "24h", "7d", "30d"];
const LIMITS = { endpoints: 20, orgs: 50, api_keys: 50, denials: 50, alerts: 1000 };
const COLORS = { ok: "#1e6f3d", c3xx: "#4a535e", c4xx: "#0b57d0", err: "#b3261e", deny: "#8a4b00", p50: "#0b57d0", p95: "#7b2cbf", p99: "#b3261e", bar: "#0b57d0" };

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
const int = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
const dec = new Intl.NumberFormat("en-US", { maximumFractionDigits: 1, minimumFractionDigits: 1 });
const fmtNum = (v) => (v === null || v === undefined ? "" : Number(v).toLocaleString("en", { maximumFractionDigits: 3 }));
const fmtInt = (v) => (v === null || v === undefined ? "—" : int.format(v));
const fmtMs = (v) => (v === null || v === undefined || Number.isNaN(v) ? "—" : dec.format(v));
const fmtPct = (v) => (v === null || v === undefined ? "—" : (100 * v).toFixed(2) + "%");
const fmtBytes = (v) => {
  if (v === null || v === undefined) return "—";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (v >= 1000 && i < units.length - 1) { v /= 1000; i++; }
  return (i ? v.toFixed(1) : String(v)) + " " + units[i];
};

const state = { token: null, org: undefined, charts: {}, timer: null, paused: false, running: false, loads: 0, view: null };

// ---- the view, in the URL -----------------------------------------------------------------

function readView() {
  const p = new URLSearchParams(location.search);
  const view = { timeframe: "24h", from: "", to: "", org: "", api_key: "", endpoint: "" };
  if (p.get("from") && p.get("to")) {
    view.timeframe = "custom";
    view.from = p.get("from");
    view.to = p.get("to");
  } else if (TIMEFRAMES.includes(p.get("timeframe"))) {
    view.timeframe = p.get("timeframe");
  }
  for (const k of ["org", "api_key", "endpoint"]) view[k] = p.get(k) || "";
  return view;
}

function writeView(view, push) {
  const p = new URLSearchParams();
  if (view.timeframe === "custom") { p.set("from", view.from); p.set("to", view.to); } else p.set("timeframe", view.timeframe);
  for (const k of ["org", "api_key", "endpoint"]) if (view[k]) p.set(k, view[k]);
  const url = location.pathname + "?" + p.toString();
  if (url !== location.pathname + location.search) history[push ? "pushState" : "replaceState"](null, "", url);
}

// datetime-local values are read as UTC: "2025-01-31T10:00" <-> "2025-01-31T10:00:00Z"
const localToIso = (v) => (v ? v + (v.length === 16 ? ":00" : "") + "Z" : "");
const isoToLocal = (v) => (v ? v.replace(/Z$/, "").slice(0, 16) : "");

function viewFromForm() {
  const f = $("#filters");
  const view = { timeframe: f.timeframe.value, from: "", to: "", org: "", api_key: f.api_key.value.trim(), endpoint: f.endpoint.value.trim() };
  if (view.timeframe === "custom") { view.from = localToIso(f.from.value); view.to = localToIso(f.to.value); }
  if (state.org === null) view.org = f.org.value;
  return view;
}

function showView(view) {
  const f = $("#filters");
  f.timeframe.value = view.timeframe;
  f.from.value = isoToLocal(view.from);
  f.to.value = isoToLocal(view.to);
  f.api_key.value = view.api_key;
  f.endpoint.value = view.endpoint;
  if (state.org === null) {
    ensureOrgOption(view.org);
    f.org.value = view.org;
  }
  $$(".custom").forEach((el) => (el.hidden = view.timeframe !== "custom"));
}

function ensureOrgOption(org) {
  const select = $("#org");
  if (org && !$$("option", select).some((o) => o.value === org)) select.append(new Option(org, org));
}

// The query parameters of a question for the view.
function params(view, question) {
  const p = new URLSearchParams();
  if (question === "dead_letters") { // named timeframes only: a custom range reads the last 24 hours
    p.set("timeframe", ["1h", "24h", "7d", "30d"].includes(view.timeframe) ? view.timeframe : "24h");
    return p;
  }
  if (question === "limits") {
    if (view.org) p.set("org", view.org);
    if (view.api_key) p.set("api_key", view.api_key);
    return p;
  }
  if (view.timeframe === "custom") { p.set("from", view.from); p.set("to", view.to); } else p.set("timeframe", view.timeframe);
  if (view.org) p.set("org", view.org);
  if (view.api_key) p.set("api_key", view.api_key);
  if (view.endpoint) p.set("endpoint", view.endpoint);
  if (LIMITS[question]) p.set("limit", String(LIMITS[question]));
  return p;
}

// ---- talking to the API -------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

let active = 0;
const waiting = [];
async function slot(fn) {
  if (active >= MAX_PARALLEL) await new Promise((resolve) => waiting.push(resolve));
  active++;
  try { return await fn(); } finally { active--; const next = waiting.shift(); if (next) next(); }
}

async function request(path, token = state.token, attempt = 0) {
  const res = await slot(() => fetch(path, { headers: { Authorization: "Bearer " + token }, cache: "no-store" }));
  if (res.status === 503 && attempt < 2 && res.headers.get("retry-after")) {
    await new Promise((r) => setTimeout(r, 1000 * Number(res.headers.get("retry-after"))));
    return request(path, token, attempt + 1);
  }
  if (!res.ok) {
    let message = res.status + " " + res.statusText;
    try { message = (await res.json()).error || message; } catch (_) { /* not JSON */ }
    throw new ApiError(res.status, message);
  }
  return res;
}

const ask = async (question, view) => (await request(`/v1/${question}?${params(view, question)}`)).json();

// ---- tables and charts --------------------------------------------------------------------

function fillTable(table, columns, rows) {
  const head = document.createElement("tr");
  for (const c of columns) {
    const th = document.createElement("th");
    th.scope = "col";
    th.textContent = c.label;
    if (c.num) th.className = "num";
    head.append(th);
  }
  table.tHead.replaceChildren(head);
  const body = rows.map((r) => {
    const tr = document.createElement("tr");
    if (r.limited === true) tr.className = "limited";
    for (const c of columns) {
      const td = document.createElement("td");
      td.textContent = c.fmt ? c.fmt(r[c.key], r) : r[c.key] ?? "";
      td.dataset.col = c.key;
      if (c.num) td.className = "num";
      tr.append(td);
    }
    return tr;
  });
  if (!rows.length) {
    const tr = document.createElement("tr");
    const td = document.createElement("td");
    td.colSpan = columns.length;
    td.textContent = "No requests in this range";
    tr.append(td);
    body.push(tr);
  }
  table.tBodies[0].replaceChildren(...body);
}

function chart(id, type, labels, datasets, options = {}) {
  if (!window.Chart) return; // the tables carry everything
  const canvas = $(`#panel-${id} canvas`);
  const existing = state.charts[id];
  if (existing) {
    existing.data.labels = labels;
    existing.data.datasets = datasets;
    existing.update("none");
    return;
  }
  state.charts[id] = new window.Chart(canvas, {
    type,
    data: { labels, datasets },
    options: {
      animation: false, responsive: true, maintainAspectRatio: false, normalized: true,
      interaction: { mode: "index", intersect: false },
      plugins: { legend: { display: datasets.length > 1, position: "bottom" } },
      datasets: { bar: { maxBarThickness: 32 } },
      ...options,
    },
  });
}

const shortTime = (iso) => (iso.length > 16 ? iso.slice(5, 16).replace("T", " ") : iso);
const num = (label, key, fmt = fmtInt) => ({ label, key, num: true, fmt });

const PANELS = {
  summary(data) {
    const r = data.rows[0] || {};
    const tiles = [
      ["requests", "Requests", fmtInt], ["errors", "Server errors (5xx)", fmtInt], ["error_rate", "Error rate (5xx)", fmtPct],
      ["denials", "Denials (429)", fmtInt], ["p50_ms", "p50 ms", fmtMs], ["p95_ms", "p95 ms", fmtMs],
      ["p99_ms", "p99 ms", fmtMs], ["request_bytes", "Bytes in", fmtBytes], ["response_bytes", "Bytes out", fmtBytes],
    ];
    $("#panel-summary .tiles").replaceChildren(...tiles.map(([key, label, fmt]) => {
      const div = document.createElement("div");
      const dt = document.createElement("dt");
      const dd = document.createElement("dd");
      dt.textContent = label;
      dd.textContent = fmt(r[key]);
      dd.dataset.field = key;
      div.append(dt, dd);
      return div;
    }));
  },
  status_series(data) {
    const rows = data.rows;
    const classes = [["status_2xx", "2xx", "#1e6f3d"], ["status_3xx", "3xx", "#4a535e"], ["status_4xx", "4xx (not 429)", "#0b57d0"],
      ["status_429", "429 denied", "#8a4b00"], ["status_5xx", "5xx", "#b3261e"], ["status_1xx", "1xx", "#7b2cbf"]];
    fillTable($("#panel-volume table"), [{ label: "Bucket (UTC)", key: "bucket" }, num("Requests", "requests"),
      ...classes.map(([key, label]) => num(label, key))], rows);
    const labels = rows.map((r) => shortTime(r.bucket));
    chart("volume", "bar", labels, classes.filter(([key]) => key !== "status_1xx" || rows.some((r) => r[key]))
      .map(([key, label, color]) => ({ label, data: rows.map((r) => r[key]), backgroundColor: color, stack: "s" })),
      { scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true } } });
    // The error-rate panel is the same answer seen another way: server errors (5xx) per request.
    const rates = rows.map((r) => ({ ...r, rate: r.requests ? r.status_5xx / r.requests : null }));
    fillTable($("#panel-errors table"), [{ label: "Bucket (UTC)", key: "bucket" }, num("Requests", "requests"),
      num("5xx", "status_5xx"), num("Error rate", "rate", fmtPct)], rates);
    chart("errors", "line", labels, [{ label: "Error rate %", data: rates.map((r) => (r.rate === null ? null : 100 * r.rate)),
      borderColor: COLORS.err, backgroundColor: COLORS.err, pointRadius: rows.length > 30 ? 0 : 2, spanGaps: false }],
      { scales: { y: { beginAtZero: true, suggestedMax: 10, title: { display: true, text: "%" } } } });
  },
  latency(data) {
    const rows = data.rows;
    fillTable($("#panel-latency table"), [{ label: "Bucket (UTC)", key: "bucket" }, num("Requests", "requests"),
      num("p50", "p50_ms", fmtMs), num("p95", "p95_ms", fmtMs), num("p99", "p99_ms", fmtMs)], rows);
    chart("latency", "line", rows.map((r) => shortTime(r.bucket)), ["p50", "p95", "p99"].map((p) => ({
      label: p, data: rows.map((r) => r[p + "_ms"]), borderColor: COLORS[p], backgroundColor: COLORS[p], pointRadius: rows.length > 30 ? 0 : 2,
    })), { scales: { y: { beginAtZero: true, title: { display: true, text: "ms" } } } });
  },
  status(data) {
    const rows = data.rows;
    fillTable($("#panel-status table"), [{ label: "Class", key: "status_class" }, { label: "Status", key: "status" },
      num("Requests", "requests"), num("Share", "rate", fmtPct)], rows);
    const color = (s) => (s === 429 ? COLORS.deny : s >= 500 ? COLORS.err : s >= 400 ? COLORS.c4xx : s >= 300 ? COLORS.c3xx : COLORS.ok);
    chart("status", "bar", rows.map((r) => String(r.status)), [{ label: "Requests", data: rows.map((r) => r.requests),
      backgroundColor: rows.map((r) => color(r.status)) }], { scales: { y: { beginAtZero: true } } });
  },
  endpoints(data) {
    fillTable($("#panel-endpoints table"), [{ label: "Method", key: "method" }, { label: "Endpoint", key: "endpoint" },
      num("Requests", "requests"), num("5xx %", "error_rate", fmtPct), num("p95 ms", "p95_ms", fmtMs)], data.rows);
  },
  orgs(data) { ranking("orgs", "org_id", "Org", data.rows); },
  api_keys(data) { ranking("api_keys", "api_key_id", "API key", data.rows); },
  tiers(data) {
    const rows = data.rows.map((r) => ({ ...r, tier: r.tier || "(unknown)" }));
    fillTable($("#panel-tiers table"), [{ label: "Tier", key: "tier" }, num("Orgs", "orgs"), num("Requests", "requests"),
      num("5xx", "errors"), num("Denials", "denials")], rows);
    chart("tiers", "bar", rows.map((r) => r.tier), [{ label: "Requests", data: rows.map((r) => r.requests), backgroundColor: COLORS.bar }],
      { indexAxis: "y" });
  },
  denials(data) {
    fillTable($("#panel-denials table"), [{ label: "API key", key: "api_key_id" }, num("Denials", "denials"),
      num("Requests", "requests"), num("Denied", "denial_rate", fmtPct)], data.rows);
  },
  dead_letters(data) {
    $("#dead-letters-total").textContent = `${fmtInt(data.total)} dead letters ${data.from.slice(0, 16).replace("T", " ")} – `
      + `${data.to.slice(0, 16).replace("T", " ")} UTC` + (data.complete ? "" : " (the newest of them: too many to read back)");
    $("#panel-dead_letters").dataset.total = String(data.total);
    fillTable($("#dead-letters-by"), [{ label: "Stage", key: "stage" }, { label: "Field", key: "field" }, num("Records", "count")],
      data.by_reason);
    fillTable($("#dead-letters-recent"), [{ label: "At (UTC)", key: "at", fmt: (v) => v.slice(0, 19).replace("T", " ") },
      { label: "Stage", key: "stage" }, { label: "Reason", key: "reason" },
      { label: "From", key: "source_topic", fmt: (v, r) => (r.source_file ? `${r.source_file}:${r.source_file_offset}` : v ? `${v}/${r.source_partition}@${r.source_offset}` : "") }],
      data.rows.slice(0, 20));
  },
  alerts(data) {
    // Transitions only (delivery attempts are in the CSV), newest first; the answer is oldest first.
    const rows = data.rows.filter((r) => r.record === "transition").reverse();
    const latest = new Map();
    for (const r of [...rows].reverse()) latest.set(r.fingerprint, r);
    const firing = [...latest.values()].filter((r) => r.to_status === "firing").length;
    $("#alerts-firing").textContent = `${firing} firing now` + (data.rows.length >= LIMITS.alerts ? " (of the first " + LIMITS.alerts + " records)" : "");
    $("#panel-alerts").dataset.firing = String(firing);
    fillTable($("#panel-alerts table"), [{ label: "At (UTC)", key: "at", fmt: (v) => v.slice(0, 19).replace("T", " ") },
      { label: "Org", key: "org_id" }, { label: "API key", key: "api_key_id", fmt: (v) => v || "" },
      { label: "Rule", key: "rule_id" }, { label: "Type", key: "rule_type" }, { label: "Severity", key: "severity" },
      { label: "Transition", key: "kind", fmt: (v) => v }, { label: "Status", key: "to_status" },
      num("Value", "value", fmtNum), num("Threshold", "threshold", fmtNum)],
      rows.slice(0, 50));
  },
  limits(data) {
    const badge = $("#enforcement");
    badge.textContent = "Enforcement " + data.enforcement;
    badge.className = "badge " + data.enforcement;
    $("#limited-now").textContent = `${data.limited_now} limited now` + (data.complete ? "" : " (partial: too many keys to read at once)");
    $("#panel-limits").dataset.limitedNow = String(data.limited_now);
    fillTable($("#panel-limits table"), [{ label: "Org", key: "org_id" }, { label: "API key", key: "api_key_id", fmt: (v) => v ?? "(whole org)" },
      { label: "Tier", key: "tier" }, { label: "Window", key: "window" }, num("Limit", "limit"), num("Used", "used"),
      num("Remaining", "remaining"), { label: "Resets (UTC)", key: "reset", fmt: (v) => v.slice(11, 19) },
      { label: "Limited", key: "limited", fmt: (v) => (v ? "yes" : "no") }], data.rows.slice(0, 200));
  },
};

function ranking(id, key, label, rows) {
  fillTable($(`#panel-${id} table`), [{ label, key }, num("Requests", "requests"), num("5xx", "errors"),
    num("Denials", "denials"), num("Bytes out", "response_bytes", fmtBytes)], rows);
  const top = rows.slice(0, 12);
  chart(id, "bar", top.map((r) => r[key]), [{ label: "Requests", data: top.map((r) => r.requests), backgroundColor: COLORS.bar }],
    { indexAxis: "y" });
}

// ---- loading ------------------------------------------------------------------------------

const QUESTIONS = ["summary", "status_series", "latency", "status", "endpoints", "orgs", "tiers", "api_keys", "denials", "alerts"];

// Marks of the first load only (a refresh every 10 s would pile them up): when each answer
// came and when it was drawn, for bench/dashboard.py's breakdown of a load.
const mark = (name) => { if (state.loads === 0) performance.mark("qf:" + name); };

function draw(question, data) {
  PANELS[question](data);
  mark("drawn:" + question);
  $$(`.panel[data-question="${question}"]`).forEach((p) => { p.dataset.state = "ok"; p.querySelector(".problem")?.remove(); });
  return data;
}

function failPanel(question, err) {
  if (err.status === 401) throw err;
  $$(`.panel[data-question="${question}"]`).forEach((p) => {
    p.dataset.state = "error";
    let problem = p.querySelector(".problem");
    if (!problem) { problem = document.createElement("p"); problem.className = "problem"; p.append(problem); }
    problem.textContent = err.message;
  });
  return err;
}

async function loadPanel(question, view) {
  try {
    const data = await ask(question, view);
    mark("data:" + question);
    return draw(question, data);
  } catch (err) {
    return failPanel(question, err);
  }
}

// The query API's questions of the view in one request (/v1/panels): the server answers
// them one after another on its one engine handle, each on a line of its own as soon as it
// is done, and each is drawn while the next is computed.
async function loadQuestions(questions, view) {
  const p = params(view, "panels");
  p.set("questions", questions.map((q) => (LIMITS[q] ? `${q}:${LIMITS[q]}` : q)).join(","));
  const results = {};
  try {
    const res = await request(`/v1/panels?${p}`);
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      buf += value || "";
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const a = JSON.parse(buf.slice(0, nl));
        buf = buf.slice(nl + 1);
        mark("data:" + a.question);
        results[a.question] = a.error === undefined ? draw(a.question, a) : failPanel(a.question, new ApiError(a.status, a.error));
      }
      if (done) break;
    }
  } catch (err) {
    if (err.status === 401) throw err;
    // Refused as a whole (every panel says why), or cut short: the panels not answered say so.
    for (const q of questions) if (!(q in results)) results[q] = failPanel(q, err);
  }
  return questions.map((q) => results[q] ?? failPanel(q, new ApiError(0, "no answer came for this panel")));
}

async function refresh() {
  if (state.running) return;
  state.running = true;
  clearTimeout(state.timer);
  const view = state.view;
  const started = performance.now();
  mark("refresh");
  try {
    const operator = ["dead_letters"].filter(() => state.org === null); // operators' panels
    // Redis and Kafka beside ClickHouse, not after it; ClickHouse's questions in one request.
    const asked = ["limits", ...operator, ...QUESTIONS];
    const results = (await Promise.all([...["limits", ...operator].map((q) => loadPanel(q, view)),
      loadQuestions(QUESTIONS, view)])).flat();
    const failed = results.filter((r) => r instanceof Error);
    // A refused filter is refused by every question alike: say it once, at the top.
    $("#error").textContent = failed.length ? [...new Set(failed.map((e) => e.message))].join("; ") : "";
    const summary = results[asked.indexOf("summary")];
    const range = summary instanceof Error ? "" : `${summary.from} – ${summary.to} (${summary.source})`;
    state.loads++;
    document.body.dataset.loads = String(state.loads);
    document.body.dataset.loadMs = String(Math.round(performance.now() - started));
    // Navigation start to every panel drawn, on the first load (bench/dashboard.py reads it).
    if (state.loads === 1) document.body.dataset.renderedMs = String(Math.round(performance.now()));
    $("#status").textContent = `Updated ${new Date().toISOString().slice(11, 19)} UTC · ${range}` +
      (state.paused ? " · auto-refresh paused" : ` · refreshing every ${REFRESH_S} s`);
  } catch (err) {
    if (err.status === 401) { signOut("Your token is no longer accepted; sign in again."); return; }
    $("#error").textContent = err.message;
  } finally {
    state.running = false;
    schedule();
  }
}

function schedule() {
  clearTimeout(state.timer);
  if (!state.paused && state.token) state.timer = setTimeout(refresh, REFRESH_S * 1000);
}

// ---- sign-in ------------------------------------------------------------------------------

// The org the signed-in token has ("*": an operator's), kept beside the token: on a reload
// the panels are asked at once, beside the whoami check rather than after its round trip.
// Only what the page shows depends on it; what a token may read is the API's to decide.
const ORG_KEY = "quotaflow.org";

async function signIn(token, known = null) {
  const asked = request("/v1/whoami", token).then((res) => res.json());
  if (known === null) {
    const who = await asked;
    mark("signed-in");
    await enter(token, who.org);
    return;
  }
  const first = enter(token, known === "*" ? null : known);
  const who = await asked; // refused (401): the caller signs out
  mark("signed-in");
  await first;
  if ((who.org ?? "*") !== known) await enter(token, who.org); // the token's org changed meanwhile
}

async function enter(token, org) {
  state.token = token;
  state.org = org; // null: an operator, who picks the org
  sessionStorage.setItem(TOKEN_KEY, token);
  sessionStorage.setItem(ORG_KEY, org ?? "*");
  $("#who").textContent = org === null ? "Operator: every org" : "Org: " + org;
  $("#who").hidden = false;
  $("#signout").hidden = false;
  $("#signin").hidden = true;
  $("#board").hidden = false;
  $("#org-field").hidden = org !== null;
  $("#panel-sql").hidden = org !== null; // ad-hoc SQL is for operator tokens only
  $("#panel-dead_letters").hidden = org !== null; // so are dead letters: any org's records
  state.view = readView();
  if (org !== null) state.view.org = "";
  showView(state.view);
  writeView(state.view, false);
  await refresh();
  if (org === null) await loadOrgs(); // after the panels: the selector's list is not what one waits for
}

async function loadOrgs() {
  try {
    const data = await (await request("/v1/orgs?timeframe=30d&limit=1000")).json();
    for (const r of data.rows) ensureOrgOption(r.org_id);
    $("#org").value = state.view.org;
  } catch (_) { /* the selector keeps "All orgs" and what the URL named */ }
}

function signOut(message = "") {
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(ORG_KEY);
  clearTimeout(state.timer);
  state.token = null;
  for (const c of Object.values(state.charts)) c.destroy();
  state.charts = {};
  $("#board").hidden = true;
  $("#who").hidden = true;
  $("#signout").hidden = true;
  $("#signin").hidden = false;
  $("#signin-error").textContent = message;
  $("#token").value = "";
  $("#token").focus();
}

// Ad-hoc SQL (operators): POST /v1/sql; a table for JSON, a file for CSV and Parquet.
async function runSql() {
  const form = $("#sql-form");
  const format = form.format.value;
  $("#sql-error").textContent = "";
  $("#sql-summary").textContent = "Running…";
  try {
    const res = await fetch(`/v1/sql?format=${format}`, { method: "POST", body: form.sql.value,
      headers: { Authorization: "Bearer " + state.token, "Content-Type": "text/plain; charset=utf-8" } });
    if (!res.ok) {
      let message = res.status + " " + res.statusText;
      try { message = (await res.json()).error || message; } catch (_) { /* not JSON */ }
      throw new ApiError(res.status, message);
    }
    if (format === "json") {
      const data = await res.json();
      fillTable($("#sql-result"), data.meta.map((m) => ({ label: m.name, key: m.name })), data.data);
      $("#sql-summary").textContent = `${data.rows} rows in ${(data.statistics?.elapsed ?? 0).toFixed(3)} s`;
    } else {
      save(await res.blob(), `quotaflow-sql.${format}`);
      $("#sql-summary").textContent = "Downloaded.";
    }
  } catch (err) {
    $("#sql-summary").textContent = "";
    $("#sql-error").textContent = err.message;
  }
}

function save(blob, name) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10_000);
}

async function download(question) {
  const res = await request(`/v1/${question}.csv?${params(state.view, question)}`);
  save(await res.blob(), `quotaflow-${question}.csv`);
}

// ---- wiring -------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  mark("start");
  if (window.Chart) {
    window.Chart.defaults.font.family = getComputedStyle(document.body).fontFamily;
    window.Chart.defaults.color = "#1b1f24";
  } else {
    $$(".chart").forEach((c) => (c.hidden = true));
    $$("details").forEach((d) => (d.open = true));
  }
  $("#signin").addEventListener("submit", async (e) => {
    e.preventDefault();
    $("#signin-error").textContent = "";
    try {
      await signIn($("#token").value.trim());
    } catch (err) {
      $("#signin-error").textContent = err.status === 401 ? "This token is not accepted: " + err.message : err.message;
    }
  });
  $("#signout").addEventListener("click", () => signOut());
  $("#sql-form").addEventListener("submit", (e) => { e.preventDefault(); runSql(); });
  $("#filters").addEventListener("submit", (e) => {
    e.preventDefault();
    const view = viewFromForm();
    if (view.timeframe === "custom" && (!view.from || !view.to)) {
      $("#error").textContent = "A custom range needs both From and To.";
      return;
    }
    state.view = view;
    writeView(view, true);
    refresh();
  });
  $("#timeframe").addEventListener("change", (e) => {
    $$(".custom").forEach((el) => (el.hidden = e.target.value !== "custom"));
  });
  $("#refresh-toggle").addEventListener("click", (e) => {
    state.paused = !state.paused;
    e.target.setAttribute("aria-pressed", String(state.paused));
    e.target.textContent = state.paused ? "Resume auto-refresh" : "Pause auto-refresh";
    if (state.paused) clearTimeout(state.timer); else refresh();
  });
  for (const button of $$("button.csv")) {
    button.addEventListener("click", () => download(button.dataset.question).catch((err) => ($("#error").textContent = err.message)));
  }
  window.addEventListener("popstate", () => {
    if (!state.token) return;
    state.view = readView();
    if (state.org !== null) state.view.org = "";
    showView(state.view);
    refresh();
  });
  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) signIn(saved, sessionStorage.getItem(ORG_KEY)).catch(() => signOut("Sign in again."));
  else signOut();
});
