// The Estimate & plan view: the performance model (`shardwise estimate`) and the planner
// (`shardwise plan`) asked from a form, with the roofline of the first stage's operators and
// the DP plan beside the baselines' splits.

import { postJSON } from "./api.js";
import { bytes, el, ms, rate, row } from "./format.js";

let rooflineChart = null;

export function setupEstimate(catalog) {
  const models = catalog.models.includes(catalog.served) ? catalog.models : [catalog.served, ...catalog.models];
  for (const id of ["est-model", "plan-model"]) {
    const select = document.getElementById(id);
    select.replaceChildren(...models.map((m) => el("option", m, { value: m })));
    select.value = catalog.served;
  }
  document.getElementById("device-names").replaceChildren(
    ...Object.entries(catalog.devices).map(([name, d]) => el("option", `${d.kind}, ${d.memory_gb.toFixed(0)} GB`, { value: name })));
  document.getElementById("estimate-form").addEventListener("submit", (event) => {
    event.preventDefault();
    runEstimate();
  });
  document.getElementById("plan-form").addEventListener("submit", (event) => {
    event.preventDefault();
    runPlan();
  });
}

const number = (id) => Number(document.getElementById(id).value);

function shown(id, value, text) {
  const node = document.getElementById(id);
  node.textContent = text;
  node.dataset.value = String(value); // the exact number, for anyone comparing with the CLI's JSON
}

async function runEstimate() {
  const devices = document.getElementById("est-devices").value.split(",").map((d) => d.trim()).filter(Boolean);
  const body = {
    model: document.getElementById("est-model").value,
    batch: number("est-batch"), input: number("est-input"), output: number("est-output"), tp: number("est-tp"),
    quant: document.getElementById("est-quant").value || null,
    ...(devices.length > 1 ? { pp_devices: devices } : { device: devices[0] || null }),
  };
  const error = document.getElementById("est-error");
  const result = document.getElementById("est-result");
  try {
    const { estimate, roofline } = await postJSON("/v1/dashboard/estimate", body);
    error.hidden = true;
    shown("est-ttft", estimate.ttft_s, ms(estimate.ttft_s));
    shown("est-tpot", estimate.tpot_s, ms(estimate.tpot_s));
    shown("est-throughput", estimate.throughput_tok_s, rate(estimate.throughput_tok_s));
    shown("est-memory", estimate.memory.total, bytes(estimate.memory.total));
    document.querySelector("#est-stages tbody").replaceChildren(...estimate.stages.map((s, i) => row([
      String(i), s.devices > 1 ? `${s.devices} × ${s.device}` : s.device, `${s.layers[0]}–${s.layers[1] - 1}`,
      `${bytes(s.memory.total)} / ${bytes(s.capacity)}${s.fits ? "" : " (does not fit)"}`,
      ms(s.prefill_s), ms(s.decode_s),
    ])));
    result.hidden = false;
    drawRoofline(roofline);
  } catch (e) {
    error.textContent = e.message;
    error.hidden = false;
    result.hidden = true;
  }
}

function drawRoofline(line) {
  const xs = new Set();
  for (let e = -2; e <= 4; e += 0.1) xs.add(Number((10 ** e).toPrecision(6)));
  for (const p of line.points) xs.add(p.intensity);
  const x = [...xs].sort((a, b) => a - b);
  const at = (phase) => {
    const y = new Map(line.points.filter((p) => p.phase === phase).map((p) => [p.intensity, p.flops_per_s]));
    return x.map((v) => y.get(v) ?? null);
  };
  const data = [x, x.map((v) => Math.min(line.peak_flops, line.bandwidth * v)), at("prefill"), at("decode")];
  const dots = (label, colour) => ({ label, stroke: colour, fill: colour, width: 0, paths: () => null,
    points: { show: true, size: 8, fill: colour } });
  document.getElementById("roofline-title").textContent =
    `roofline of the first stage (${line.device}, ${line.dtype}): attained FLOP/s vs FLOP/byte`;
  rooflineChart?.destroy();
  rooflineChart = new uPlot({
    width: 760, height: 320,
    scales: { x: { time: false, distr: 3 }, y: { distr: 3 } },
    axes: [{ label: "operational intensity (FLOP/byte)" }, { size: 70, values: (u, ticks) => ticks.map((t) => (t == null ? "" : t.toExponential(0))) }],
    series: [{ label: "FLOP/byte" }, { label: "roofline", stroke: "#333", width: 2 }, dots("prefill ops", "#4e79a7"),
      dots("decode ops", "#e15759")],
  }, data, document.getElementById("chart-roofline"));
}

async function runPlan() {
  const body = {
    model: document.getElementById("plan-model").value,
    cluster: document.getElementById("plan-cluster").value,
    objective: document.getElementById("plan-objective").value,
    batch: number("plan-batch"), context: number("plan-context"),
  };
  const error = document.getElementById("plan-error");
  try {
    const summary = await postJSON("/v1/dashboard/plan", body);
    error.hidden = true;
    document.getElementById("plan-metric").textContent =
      summary.objective === "latency" ? "latency per token" : "bottleneck stage per step";
    const best = summary.dp.value;
    const rows = [["DP (shardwise)", summary.dp], ...Object.entries(summary.baselines)];
    document.querySelector("#plan-table tbody").replaceChildren(...rows.map(([name, r]) => row([
      name, r.layout, r.value == null ? "does not fit" : ms(r.value),
      r.value == null ? "–" : `${(r.value / best).toFixed(2)}×`,
    ])));
    document.getElementById("plan-result").hidden = false;
  } catch (e) {
    error.textContent = e.message;
    error.hidden = false;
  }
}
