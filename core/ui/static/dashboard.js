// The jobs dashboard: polls the service's /ui/api (the same job views as the signed API) and draws
// a job's curves from its events. No framework, no build step; text goes in with textContent only.
"use strict";

const CSRF = document.querySelector('meta[name="csrf-token"]').content;
const FINAL = new Set(["succeeded", "failed", "cancelled"]);
const $ = (id) => document.getElementById(id);
let selected = null; // {id, lastSeq, train: {loss: [], accuracy: []}, evals: {loss: [], accuracy: []}, timer}
let listCursor = null, paged = false; // paged: "More" was pressed, so the list stops refreshing

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  if (response.status === 401) { window.location.assign("/ui"); throw new Error("logged out"); }
  const body = await response.json();
  if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
  return body;
}

function post(path) {
  return api(path, { method: "POST", headers: { "X-CSRF-Token": CSRF } });
}

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function when(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleString() : "";
}

// -- the jobs list ---------------------------------------------------------------------------
function listQuery(cursor) {
  const query = new URLSearchParams();
  const community = $("filter-community").value.trim();
  const status = $("filter-status").value;
  if (community) query.set("community", community);
  if (status) query.set("status", status);
  if (cursor) query.set("cursor", cursor);
  return query.toString();
}

async function loadJobs(append = false) {
  try {
    paged = append;
    const page = await api(`/ui/api/jobs?${listQuery(append ? listCursor : null)}`);
    const rows = $("jobs");
    if (!append) rows.replaceChildren();
    for (const job of page.jobs) {
      const row = el("tr");
      row.dataset.job = job.job_id;
      if (selected && selected.id === job.job_id) row.classList.add("selected");
      row.append(
        el("td", job.job_id.slice(0, 8)), el("td", job.community_id),
        el("td", job.status, `status status-${job.status}`), el("td", `${job.progress.percent}%`),
        el("td", when(job.created_at)),
      );
      row.addEventListener("click", () => { window.location.hash = `job=${job.job_id}`; });
      rows.append(row);
    }
    listCursor = page.next_cursor;
    $("more").hidden = !listCursor;
    $("list-error").textContent = "";
  } catch (err) {
    $("list-error").textContent = err.message;
  }
}

// -- one job ---------------------------------------------------------------------------------
function select(jobId) {
  if (selected) clearTimeout(selected.timer);
  selected = jobId && {
    id: jobId, lastSeq: 0, timer: null,
    train: { loss: [], accuracy: [] }, evals: { loss: [], accuracy: [] },
  };
  $("job").hidden = !selected;
  $("job-events").replaceChildren();
  showSamples([]);
  for (const row of $("jobs").children) row.classList.toggle("selected", row.dataset.job === jobId);
  if (selected) refreshJob(selected);
}

async function refreshJob(current) {
  let job = null;
  try {
    job = await api(`/ui/api/jobs/${current.id}`);
    if (current !== selected) return;
    showJob(job);
    await loadEvents(current);
    $("job-error").textContent = job.error ? `${job.error.type}: ${job.error.message}` : "";
  } catch (err) {
    $("job-error").textContent = err.message;
  }
  if (current === selected) {  // a finished job changes no more: poll it rarely
    current.timer = setTimeout(() => refreshJob(current), job && FINAL.has(job.status) ? 5000 : 1000);
  }
}

function showJob(job) {
  $("job-id").textContent = job.job_id;
  const status = $("job-status");
  status.textContent = job.status;
  status.className = `status status-${job.status}`;
  $("cancel").hidden = FINAL.has(job.status);
  const p = job.progress;
  $("job-bar").style.width = `${p.percent}%`;
  $("job-progress").textContent = `step ${p.step} of ${p.total_steps ?? "?"} (${p.percent}%)`
    + (p.eta_seconds != null && !FINAL.has(job.status) ? `, about ${Math.round(p.eta_seconds)} s left` : "");
  const facts = [
    ["community", job.community_id], ["model", job.model], ["loss", job.hyperparameters?.loss?.name],
    ["records", job.records], ["source", job.source], ["created", when(job.created_at)],
    ["finished", when(job.finished_at)], ["trained tokens", job.trained_tokens], ["suffix", job.suffix],
  ];
  for (const [name, value] of Object.entries(job.final_eval || {})) facts.push([name, value]);
  const list = $("job-facts");
  list.replaceChildren();
  for (const [name, value] of facts) {
    if (value === null || value === undefined || value === "") continue;
    list.append(el("dt", name), el("dd", typeof value === "number" ? +value.toFixed(4) : value));
  }
  const files = $("job-files");
  files.replaceChildren(...(job.result_files.length ? job.result_files.map((f) => el("li", f)) : [el("li", "none yet")]));
}

async function loadEvents(current) {
  for (;;) {
    const page = await api(`/ui/api/jobs/${current.id}/events?after=${current.lastSeq}`);
    if (current !== selected) return;
    for (const event of page.events) addEvent(current, event);
    const more = page.last_seq !== current.lastSeq && page.events.length === 1000;
    current.lastSeq = page.last_seq;
    if (!more) break;
  }
  drawChart($("chart-loss"), current.train.loss, current.evals.loss);
  drawChart($("chart-accuracy"), current.train.accuracy, current.evals.accuracy, [0, 1]);
}

function addEvent(current, event) {
  const d = event.data;
  if (event.kind === "progress" && d.metrics) {
    if (d.metrics.loss !== undefined) current.train.loss.push([d.step, d.metrics.loss]);
    const accuracy = d.metrics["rewards/accuracies"];
    if (accuracy !== undefined) current.train.accuracy.push([d.step, accuracy]);
  } else if (event.kind === "eval" && d.step !== undefined) {
    if (d["eval/loss"] !== undefined) current.evals.loss.push([d.step, d["eval/loss"]]);
    const accuracy = d["eval/rewards/accuracies"];
    if (accuracy !== undefined) current.evals.accuracy.push([d.step, accuracy]);
  } else if (event.kind === "samples" && Array.isArray(d.samples)) {
    showSamples(d.samples);
  }
  const summary = event.kind === "progress" ? `step ${d.step}/${d.total_steps}`
    : event.kind === "samples" ? `${d.samples?.length ?? 0} answers ${d.phase} training` : JSON.stringify(d);
  const item = el("li", `${new Date(event.ts * 1000).toLocaleTimeString()} ${event.kind} ${summary}`);
  item.dataset.kind = event.kind;
  $("job-events").append(item);
}

function showSamples(samples) {  // the latest samples event: the baseline's answers, then both
  const rows = samples.map((s) => {
    const row = el("tr");
    row.append(el("td", s.prompt ?? ""), el("td", s.before ?? ""), el("td", s.after ?? "(after training)"));
    return row;
  });
  $("samples-rows").replaceChildren(...rows);
  $("samples").hidden = rows.length === 0;
  $("samples-note").hidden = rows.length > 0;
}

// -- charts: an SVG polyline for training, dots for the held-out set -------------------------
const SVG = "http://www.w3.org/2000/svg";
const W = 320, H = 180, PAD = 28;

function svgEl(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function drawChart(svg, train, evals, fixedRange) {
  svg.replaceChildren();
  const points = train.concat(evals);
  if (!points.length) {
    svg.append(Object.assign(svgEl("text", { x: W / 2 - 30, y: H / 2 }), { textContent: "no data yet" }));
    return;
  }
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs, Math.min(...xs) + 1)];
  let [y0, y1] = fixedRange || [Math.min(...ys), Math.max(...ys)];
  if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
  const sx = (x) => PAD + ((x - x0) / (x1 - x0)) * (W - 2 * PAD);
  const sy = (y) => H - PAD - ((y - y0) / (y1 - y0)) * (H - 2 * PAD);
  svg.append(svgEl("line", { x1: PAD, y1: H - PAD, x2: W - PAD, y2: H - PAD, class: "axis" }));
  svg.append(svgEl("line", { x1: PAD, y1: PAD, x2: PAD, y2: H - PAD, class: "axis" }));
  const label = (x, y, text) => Object.assign(svgEl("text", { x, y }), { textContent: text });
  svg.append(label(2, PAD, +y1.toFixed(3)), label(2, H - PAD, +y0.toFixed(3)));
  svg.append(label(PAD, H - 8, `step ${x0}`), label(W - PAD - 40, H - 8, `step ${x1}`));
  if (train.length) {
    svg.append(svgEl("polyline", { class: "train", points: train.map(([x, y]) => `${sx(x)},${sy(y)}`).join(" ") }));
  }
  for (const [x, y] of evals) svg.append(svgEl("circle", { class: "eval", cx: sx(x), cy: sy(y), r: 3 }));
}

// -- wiring ------------------------------------------------------------------------------------
function fromHash() {
  const match = /^#job=([0-9a-f]{32})$/.exec(window.location.hash);
  select(match ? match[1] : null);
}

$("filters").addEventListener("submit", (event) => { event.preventDefault(); loadJobs(); });
$("more").addEventListener("click", () => loadJobs(true));
$("cancel").addEventListener("click", async () => {
  if (!selected) return;
  try {
    showJob(await post(`/ui/api/jobs/${selected.id}/cancel`));
  } catch (err) {
    $("job-error").textContent = err.message;
  }
  loadJobs();
});
$("logout").addEventListener("click", async () => {
  await fetch("/ui/logout", { method: "POST", headers: { "X-CSRF-Token": CSRF }, credentials: "same-origin" });
  window.location.assign("/ui");
});
window.addEventListener("hashchange", fromHash);
loadJobs();
fromHash();
setInterval(() => { if (!paged) loadJobs(); }, 3000); // a live list, unless paging through it
