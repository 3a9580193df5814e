// The Cluster view: the running plan drawn as a pipeline (which layers where), and each
// stage's memory, KV and step times, updated with every state the server sends.

import { bytes, el, ms, percent, row } from "./format.js";

const COLOURS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f"];
let previous = null; // the last state's stages and time: busy shares are differences of the two

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
      ]);
      tr.dataset.layers = `${s.layers[0]}-${s.layers[1]}`;
      return tr;
    }),
  );
  if (state.stages_time) previous = { stages, time: state.stages_time };
}

function shortNode(node) {
  return node && node.length > 12 ? `${node.slice(0, 8)}…` : node;
}
