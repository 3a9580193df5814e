// The Cluster view: the running plan drawn as a pipeline (which layers where), each stage's
// memory, KV and step times, and (with a cluster file) a live chart of each stage's predicted
// against measured step time, updated with every state the server sends.

import { bytes, el, ms, percent, row } from "./format.js";

const COLOURS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f"];
const KEEP = 600; // chart points: ten minutes at one state a second
let previous = null; // the last state's stages and time: busy shares are differences of the two
let drift = null; // the chart of predicted vs measured step times, and its data; made anew for a new plan

export function renderCluster(state) {
  const stages = state.stages;
  const layers = stages.reduce((n, s) => n + (s.layers[1] - s.layers[0]), 0) || 1;
  const pipeline = document.getElementById("pipeline");
  pipeline.replaceChildren(
    ...stages.map((s, i) => {
      const box = el("div", "", { class: "stage", "data-layers": `${s.layers[0]}-${s.layers[1]}` });
      box.style.flexGrow = String(s.layers[1] - s.layers[0]);
      box.style.background = COLOURS[i % COLOURS.length];
      box.append(el("b", `stage ${i}`), el("span", `layers ${s.layers[0]}–${s.layers[1] - 1}`),
        el("span", `${s.device} · ${shortNode(s.node)}`));
      return box;
    }),
  );
  pipeline.title = `${layers} layers in ${stages.length} stage(s)`;

  const stale = document.getElementById("stale");
  stale.hidden = !state.stale;
  stale.textContent = state.stale || "";

  const body = document.querySelector("#stages tbody");
  body.replaceChildren(
    ...stages.map((s, i) => {
      const before = previous && previous.stages[i] && previous.stages[i].pid === s.pid ? previous.stages[i] : null;
      const elapsed = before ? state.stages_time - previous.time : 0;
      const busy = before && elapsed > 0 ? (s.busy_s - before.busy_s) / elapsed : null;
      const used = s.memory_used_bytes;
      const meter = el("td");
      meter.append(el("meter", "", { min: 0, max: s.memory_total_bytes, value: s.memory_total_bytes - s.memory_available_bytes }),
        el("span", ` ${bytes(used)} / ${bytes(s.memory_available_bytes)} free of ${bytes(s.memory_total_bytes)}`));
      const tr = row([
        String(i), s.device, shortNode(s.node), String(s.pid), `${s.layers[0]}–${s.layers[1] - 1}`,
        bytes(s.weight_bytes), `${bytes(s.kv_pool_bytes)} (${s.kv_blocks_in_use} blocks, ${s.sequences} seqs)`,
        meter, String(s.steps), `${ms(s.steps ? s.busy_s / s.steps : null)} / ${ms(s.last_step_s)}`, percent(busy),
        s.predicted_s == null ? "–" : `${ms(s.predicted_s)} / ${ms(s.measured_s)}`,
      ]);
      tr.dataset.layers = `${s.layers[0]}-${s.layers[1]}`;
      return tr;
    }),
  );
  if (state.stages_time) previous = { stages, time: state.stages_time };
  renderDrift(state);
}

function renderDrift(state) {
  const timed = state.stages.filter((s) => s.predicted_s != null);
  document.getElementById("drift").hidden = !timed.length;
  if (!timed.length || !state.stages_time) return;
  const layout = state.stages.map((s) => `${s.layers}@${s.node}`).join(" ");
  if (!drift || drift.layout !== layout) {
    const target = document.getElementById("chart-drift");
    target.replaceChildren();
    const lines = timed.flatMap((_, i) => {
      const stroke = COLOURS[i % COLOURS.length];
      return [{ label: `stage ${i} predicted`, stroke, dash: [6, 4], width: 2, spanGaps: true },
        { label: `stage ${i} measured`, stroke, width: 2, spanGaps: true }];
    });
    drift = { layout, data: [[], ...lines.map(() => [])] };
    drift.chart = new uPlot({ width: 720, height: 200, series: [{}, ...lines], axes: [{}, { size: 50 }] },
      drift.data, target);
  }
  if (drift.data[0].at(-1) === state.stages_time) return;
  const values = [state.stages_time, ...timed.flatMap((s) => [s.predicted_s * 1e3, s.measured_s * 1e3])];
  values.forEach((v, k) => {
    drift.data[k].push(v);
    if (drift.data[k].length > KEEP) drift.data[k].shift();
  });
  drift.chart.setData(drift.data);
}

function shortNode(node) {
  return node && node.length > 12 ? `${node.slice(0, 8)}…` : node;
}
