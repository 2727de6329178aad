// The jaxserve dashboard: reads the server's event stream (dashboard/events: one `history`
// event, then one `summary` a second) and draws it with uPlot. With --api-key the key is
// asked for once and kept in sessionStorage; the stream carries it as ?api_key= because
// an EventSource cannot send headers. window.jaxserveDashboard holds what was received.
"use strict";

const KEY_STORAGE = "jaxserve-api-key";
const MAX_SECONDS = 300;  // summaries kept for the time charts
const MAX_STEPS = 64;  // steps kept for the batch composition chart
const COLORS = { free: "#e5e7eb", cached: "#93c5fd", used: "#2563eb", shared: "#f59e0b",
                 prefill: "#7c3aed", decode: "#10b981", padding: "#d1d5db" };
const BLOCK_COLORS = [COLORS.free, COLORS.cached, COLORS.used, COLORS.shared];

const state = { summaries: [], steps: [], charts: {}, source: null };
window.jaxserveDashboard = state;

const $ = (id) => document.getElementById(id);

function fmt(value, digits = 0) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

function big(value) {  // tile numbers: decimals only while small
  return fmt(value, value !== null && value !== undefined && Math.abs(value) < 100 ? 1 : 0);
}

function tick(value) {  // axis labels: 1.5k rather than 1,500
  return Math.abs(value) >= 1000 ? +(value / 1000).toFixed(1) + "k" : String(+value.toFixed(2));
}

function clock(seconds) {
  return new Date(seconds * 1000).toLocaleTimeString([], { hour12: false });
}

function pct(value) {
  return value === null || value === undefined ? "–" : (100 * value).toFixed(1) + " %";
}

// -- access ---------------------------------------------------------------------------------
async function start() {
  const key = sessionStorage.getItem(KEY_STORAGE) || "";
  const headers = key ? { Authorization: "Bearer " + key } : {};
  let response;
  try {
    response = await fetch("v1/models", { headers });
  } catch (error) {
    $("status").textContent = "server unreachable";
    setTimeout(start, 2000);
    return;
  }
  if (response.status === 401) {
    $("login").hidden = false;
    $("main").hidden = true;
    $("login-error").textContent = key ? "wrong key" : "";
    return;
  }
  const models = await response.json();
  $("model").textContent = models.data && models.data.length ? models.data[0].id : "";
  $("login").hidden = true;
  $("main").hidden = false;
  connect(key);
}

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_STORAGE, $("key").value);
  start();
});

function connect(key) {
  const url = "dashboard/events" + (key ? "?api_key=" + encodeURIComponent(key) : "");
  const source = new EventSource(url);
  state.source = source;
  source.onopen = () => { $("status").textContent = "live"; };
  source.onerror = () => { $("status").textContent = "reconnecting…"; };
  source.onmessage = (message) => {
    const event = JSON.parse(message.data);
    if (event.type === "history") {
      state.summaries = event.summaries.slice(-MAX_SECONDS);
      state.steps = [];
    } else {
      state.summaries.push(event);
      state.summaries.splice(0, state.summaries.length - MAX_SECONDS);
      state.steps.push(...event.batch);
      state.steps.splice(0, state.steps.length - MAX_STEPS);
      showTiles(event);
      drawBlockMap(event.block_map);
    }
    drawCharts();
  };
}

// -- tiles and block map ----------------------------------------------------------------------
function showTiles(s) {
  const kv = s.kv, prefix = s.prefix_cache, lat = s.latency_ms;
  $("tok-prompt").textContent = fmt(s.tokens_per_s.prompt);
  $("tok-gen").textContent = fmt(s.tokens_per_s.generated);
  $("hit-rate").textContent = pct(prefix.hit_rate);
  $("hit-rate-total").textContent = prefix.total_queries
    ? pct(prefix.total_hits / prefix.total_queries) : "–";
  $("kv-used").textContent = kv.used + " / " + kv.num_blocks;
  $("requests").textContent = s.requests.running + " / " + s.requests.waiting;
  $("preempted").textContent = s.requests.total_preempted;
  $("ttft").textContent = big(lat.ttft.p50) + " / " + big(lat.ttft.p99);
  $("tpot").textContent = big(lat.tpot.p50) + " / " + big(lat.tpot.p99);
  $("steps").textContent = fmt(s.num_steps / s.seconds) + " · " + fmt(s.step_ms.host, 1)
    + " / " + fmt(s.step_ms.device_wait, 1);
  $("compilations").textContent = s.compilations;
}

function drawBlockMap(map) {
  const canvas = $("block-map");
  const width = canvas.parentElement.clientWidth - 4;
  if (width > 0 && canvas.width !== width) canvas.width = width;
  const ctx = canvas.getContext("2d");
  const cells = map.cells, n = cells.length;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!n) return;
  // the largest square cells that fit every block
  let size = Math.floor(Math.sqrt((canvas.width * canvas.height) / n));
  while (size > 1 && Math.floor(canvas.width / size) * Math.floor(canvas.height / size) < n) size--;
  const cols = Math.max(1, Math.floor(canvas.width / size));
  const gap = size > 4 ? 1 : 0;
  for (let i = 0; i < n; i++) {
    ctx.fillStyle = BLOCK_COLORS[cells.charCodeAt(i) - 48];
    ctx.fillRect((i % cols) * size, Math.floor(i / cols) * size, size - gap, size - gap);
  }
  $("block-map-note").textContent = map.blocks_per_cell > 1
    ? "(" + n + " cells of " + map.blocks_per_cell + " blocks: each shows its busiest)"
    : "(" + n + " blocks)";
}

// -- charts -----------------------------------------------------------------------------------
// series: [label, color, filled?, y scale ("y" unless named: a second scale gets the
// right-hand axis)]
function chart(id, series, { bars = false, time = true, yRange = null } = {}) {
  if (state.charts[id]) return state.charts[id];
  const el = $(id);
  const scales = [...new Set(series.map(([, , , scale]) => scale || "y"))];
  const opts = {
    width: Math.max(300, el.clientWidth), height: 200,
    scales: { x: { time }, y: yRange ? { range: yRange } : {} },
    legend: { live: false },
    series: [{}, ...series.map(([label, color, fill, scale]) => ({
      label, stroke: color, fill: fill ? color : undefined, width: 1.5, scale: scale || "y",
      paths: bars ? uPlot.paths.bars({ size: [0.8, 40] }) : undefined,
      points: { show: !bars, size: 4 },
    }))],
    axes: [
      time ? { space: 70, incrs: [1, 2, 5, 10, 15, 30, 60, 120, 300],
               values: (u, ticks) => ticks.map(clock) } : {},
      ...scales.map((scale, i) => ({ scale, side: i ? 1 : 3, size: 50, grid: { show: !i },
                                     values: (u, ticks) => ticks.map(tick) })),
    ],
  };
  const data = [[], ...series.map(() => [])];
  state.charts[id] = new uPlot(opts, data, el);
  return state.charts[id];
}

// A stacked chart is drawn as running sums, the total first: each later series covers the
// part of the one before that is not its own.
function stacked(parts) {
  const sums = [];
  let total = parts.reduce((a, b) => a + b, 0);
  for (const part of parts) { sums.push(total); total -= part; }
  return sums;
}

function drawCharts() {
  const s = state.summaries;
  const t = s.map((x) => x.time);
  const column = (f) => s.map(f);

  const kv = s.map((x) => stacked([x.kv.free, x.kv.cached, x.kv.used]));
  chart("chart-kv", [["free", COLORS.free, true], ["cached, reusable", COLORS.cached, true],
                     ["in use", COLORS.used, true]])
    .setData([t, ...[0, 1, 2].map((i) => kv.map((row) => row[i]))]);

  chart("chart-tokens", [["prompt", COLORS.prefill], ["generated", COLORS.decode]])
    .setData([t, column((x) => x.tokens_per_s.prompt), column((x) => x.tokens_per_s.generated)]);

  const steps = state.steps.map(([p, d, pad]) => stacked([pad, d, p]));
  chart("chart-batch", [["padding", COLORS.padding, true], ["decode", COLORS.decode, true],
                        ["prefill", COLORS.prefill, true]], { bars: true, time: false })
    .setData([steps.map((_, i) => i), ...[0, 1, 2].map((i) => steps.map((row) => row[i]))]);

  chart("chart-prefix", [["hit rate", COLORS.used]], { yRange: [0, 1] })
    .setData([t, column((x) => x.prefix_cache.hit_rate)]);

  chart("chart-requests", [["running", COLORS.used], ["waiting", COLORS.shared],
                           ["preempted", "#b91c1c"]])
    .setData([t, column((x) => x.requests.running), column((x) => x.requests.waiting),
              column((x) => x.requests.preempted)]);

  const lat = s.filter((x) => x.latency_ms);  // history summaries carry no latencies
  chart("chart-latency", [["TTFT p50 (left)", "#0ea5e9"], ["TTFT p99 (left)", "#0369a1"],
                          ["TPOT p50 (right)", "#22c55e", false, "tpot"],
                          ["TPOT p99 (right)", "#15803d", false, "tpot"]])
    .setData([lat.map((x) => x.time), ...[["ttft", "p50"], ["ttft", "p99"], ["tpot", "p50"],
              ["tpot", "p99"]].map(([k, p]) => lat.map((x) => x.latency_ms[k][p]))]);
}

start();
