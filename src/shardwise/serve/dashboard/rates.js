// The Rates view: the numbers /metrics exports, as small time series (uPlot) and headline
// figures, and the failures and recoveries as events.

import { clock, el, ms, percent, rate } from "./format.js";

const KEEP = 600; // points per series: ten minutes at one state a second
const series = { t: [], gen: [], prompt: [], running: [], waiting: [], ttft50: [], ttft99: [], tpot50: [], tpot99: [], kv: [] };
let charts = null;
let last = null; // the previous state's time and counters: rates are their differences

function makeCharts() {
  const size = { width: 460, height: 170 };
  const line = (label, stroke) => ({ label, stroke, width: 2, spanGaps: true });
  const chart = (id, lines) => new uPlot({ ...size, series: [{}, ...lines], axes: [{}, { size: 50 }] },
    [[], ...lines.map(() => [])], document.getElementById(id));
  return {
    tokens: chart("chart-tokens", [line("generated", "#4e79a7"), line("prompt", "#f28e2b")]),
    requests: chart("chart-requests", [line("running", "#59a14f"), line("waiting", "#e15759")]),
    latency: chart("chart-latency", [line("TTFT p50", "#4e79a7"), line("TTFT p99", "#a0cbe8"),
      line("TPOT p50", "#f28e2b"), line("TPOT p99", "#ffbe7d")]),
    kv: chart("chart-kv", [line("KV reserved", "#b07aa1")]),
  };
}

export function renderRates(state) {
  charts = charts || makeCharts();
  const m = state.metrics;
  const gen = m.generation_tokens_total, prompt = m.prompt_tokens_total;
  const dt = last ? state.time - last.time : 0;
  const genRate = dt > 0 ? (gen - last.gen) / dt : null;
  const promptRate = dt > 0 ? (prompt - last.prompt) / dt : null;
  last = { time: state.time, gen, prompt };

  const ttft = m.time_to_first_token_seconds, tpot = m.time_per_output_token_seconds;
  const toMs = (v) => (v == null ? null : v * 1e3);
  push({ t: state.time, gen: genRate, prompt: promptRate, running: m.num_requests_running,
    waiting: m.num_requests_waiting, ttft50: toMs(ttft.p50), ttft99: toMs(ttft.p99), tpot50: toMs(tpot.p50),
    tpot99: toMs(tpot.p99), kv: m.kv_cache_usage_perc * 100 });
  charts.tokens.setData([series.t, series.gen, series.prompt]);
  charts.requests.setData([series.t, series.running, series.waiting]);
  charts.latency.setData([series.t, series.ttft50, series.ttft99, series.tpot50, series.tpot99]);
  charts.kv.setData([series.t, series.kv]);

  const finished = Object.values(m.request_success_total || {}).reduce((a, b) => a + b, 0);
  const kpis = [
    ["generated", rate(genRate), "kpi-tokens"],
    ["running", String(m.num_requests_running), "kpi-running"],
    ["waiting", String(m.num_requests_waiting), "kpi-waiting"],
    ["KV reserved", percent(m.kv_cache_usage_perc), "kpi-kv"],
    ["prefix cache hits / blocks", `${percent(m.prefix_cache_hit_rate)} / ${m.prefix_cache_blocks}`, "kpi-prefix"],
    ["TTFT p50 / p99", `${ms(ttft.p50)} / ${ms(ttft.p99)}`, "kpi-ttft"],
    ["TPOT p50 / p99", `${ms(tpot.p50)} / ${ms(tpot.p99)}`, "kpi-tpot"],
    ["requests done", String(finished), "kpi-done"],
    ["stages lost / recovered", `${m.stage_failures_total} / ${m.stage_recoveries_total}`, "kpi-recoveries"],
    ["re-plans (a node drifted)", String(m.replans_total), "kpi-replans"],
  ];
  document.getElementById("kpis").replaceChildren(...kpis.map(([label, value, id]) => {
    const box = el("div");
    box.append(el("span", label), el("b", value, { id }));
    return box;
  }));
  renderEvents(state);
}

function push(point) {
  for (const [k, v] of Object.entries(point)) {
    series[k].push(v);
    if (series[k].length > KEEP) series[k].shift();
  }
}

function renderEvents(state) {
  const events = [...state.events];
  if (state.failure) events.push({ time: state.time, kind: "engine stopped", message: state.failure });
  const list = document.getElementById("events");
  if (!events.length) return;
  list.replaceChildren(...events.reverse().map((e) => {
    const item = el("li", "", { class: `event ${e.kind.replace(/\s+/g, "-")}` });
    item.append(el("time", clock(e.time)), el("b", e.kind), el("span", e.message));
    return item;
  }));
}
