// Numbers as people read them.

export function bytes(n) {
  if (n == null) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (Math.abs(n) >= 1000 && i < units.length - 1) {
    n /= 1000;
    i++;
  }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function ms(seconds) {
  if (seconds == null) return "–";
  const v = seconds * 1e3;
  return `${v < 10 ? v.toFixed(2) : v.toFixed(1)} ms`;
}

export function rate(perSecond, unit = "tok/s") {
  if (perSecond == null) return "–";
  return `${perSecond < 100 ? perSecond.toFixed(1) : perSecond.toFixed(0)} ${unit}`;
}

export function percent(fraction) {
  return fraction == null ? "–" : `${(fraction * 100).toFixed(1)} %`;
}

export function clock(epochSeconds) {
  return new Date(epochSeconds * 1000).toLocaleTimeString();
}

// A table cell or any element from tag, text and attributes.
export function el(tag, text = "", attrs = {}) {
  const node = document.createElement(tag);
  node.textContent = text;
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

export function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) tr.append(c instanceof Node ? c : el("td", String(c)));
  return tr;
}
