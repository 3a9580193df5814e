// The dashboard's entry: asks for the API key when the server wants one, switches views, and
// polls the server's state once a second for the Cluster and Rates views.

import { ApiError, apiKey, getJSON, setApiKey } from "./api.js";
import { setupChat } from "./chat.js";
import { renderCluster } from "./cluster.js";
import { setupEstimate } from "./estimate.js";
import { renderRates } from "./rates.js";

const POLL_MS = 1000;
let polling = null;
let formsReady = false;

function show(view) {
  if (!document.getElementById(`view-${view}`)) view = "cluster";
  for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== `view-${view}`;
  for (const button of document.querySelectorAll("nav button")) button.classList.toggle("active", button.dataset.view === view);
  history.replaceState(null, "", `#${view}`);
}

function status(text, kind) {
  const pill = document.getElementById("status");
  pill.textContent = text;
  pill.className = `pill ${kind}`;
}

function notice(text) {
  const p = document.getElementById("notice");
  p.textContent = text || "";
  p.hidden = !text;
}

function askForKey(why) {
  clearInterval(polling);
  status("API key needed", "warn");
  notice(why);
  document.getElementById("key-form").hidden = false;
  document.getElementById("key").focus();
}

// ok, recovering (a stage was lost and is not yet replaced) or stopped
function health(state) {
  if (state.failure || !state.running) return ["engine stopped", "error"];
  const last = state.events[state.events.length - 1];
  if (last && last.kind === "stage lost") return ["recovering", "warn"];
  return state.stale ? ["stages not answering", "warn"] : ["serving", "ok"];
}

async function poll() {
  try {
    const state = await getJSON("/v1/dashboard/state");
    document.getElementById("model").textContent = `· ${state.model}`;
    status(...health(state));
    notice("");
    renderCluster(state);
    renderRates(state);
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) return askForKey("The API key was refused: type the server's --api-key.");
    status("unreachable", "error");
    notice(`Cannot reach the server: ${e.message}`);
  }
}

async function start() {
  try {
    const catalog = await getJSON("/v1/dashboard/catalog");
    document.getElementById("key-form").hidden = true;
    if (!formsReady) {
      setupEstimate(catalog);
      setupChat(catalog.served);
      formsReady = true;
    }
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) return askForKey("The API key was refused: type the server's --api-key.");
    status("unreachable", "error");
    return notice(`Cannot reach the server: ${e.message}`);
  }
  clearInterval(polling);
  await poll();
  polling = setInterval(poll, POLL_MS);
}

document.querySelectorAll("nav button").forEach((b) => b.addEventListener("click", () => show(b.dataset.view)));
show(location.hash.slice(1));
document.getElementById("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  setApiKey(document.getElementById("key").value.trim());
  start();
});

const { api_key_required: needsKey } = await (await fetch("/health")).json();
if (needsKey && !apiKey()) askForKey("This server needs its API key to show its state.");
else start();
