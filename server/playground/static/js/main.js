// The playground's entry point: the server's info (and its random-weights warning), the bearer
// token form when auth is on, and the tabs (Ask, CLIP-blind pair, Server, Reports).
import { ApiError, forgetToken, getJSON, hasToken, onAuthNeeded, setToken } from "./api.js";
import { askTab } from "./ask.js";
import { $, $$, clear, fill, h } from "./dom.js";
import { pairTab } from "./pair.js";
import { reportsTab } from "./reports.js";
import { serverTab } from "./server.js";

let info = null;
let server = null;

async function getInfo(fresh = false) {
  if (!info || fresh) info = await getJSON("/v1/mofserve/info");
  return info;
}

function showStatus(text, problem = false) {
  const status = $("#server-status");
  status.textContent = text;
  status.classList.toggle("problem", problem);
}

function showWarning(current) {
  const banner = $("#weights-warning");
  if (current && current.random_weights) {
    banner.textContent = `WARNING: RANDOM WEIGHTS — profile ${current.profile} has seeded random weights: ` +
      "answers, option scores and similarities are not meaningful.";
    banner.hidden = false;
  } else {
    banner.hidden = true;
  }
}

function showAuth(message) {
  const panel = $("#auth-panel");
  panel.hidden = false;
  $("#auth-message").textContent = message || "This server needs a bearer token. It is kept in this tab only " +
    "and sent in the Authorization header, never in a URL.";
  $("#token").focus();
}

function selectTab(name, focus = false) {
  for (const tab of $$("[role=tab]")) {
    const on = tab.dataset.tab === name;
    tab.setAttribute("aria-selected", String(on));
    tab.tabIndex = on ? 0 : -1;
    $(`#panel-${tab.dataset.tab}`).hidden = !on;
    if (on && focus) tab.focus();
  }
  if (name === "server") server?.shown();
  else server?.hidden();
}

function wireTabs() {
  const tabs = $$("[role=tab]");
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => selectTab(tab.dataset.tab));
    tab.addEventListener("keydown", (event) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
      if (step) {
        event.preventDefault();
        selectTab(tabs[(i + step + tabs.length) % tabs.length].dataset.tab, true);
      } else if (event.key === "Home" || event.key === "End") {
        event.preventDefault();
        selectTab(tabs[event.key === "Home" ? 0 : tabs.length - 1].dataset.tab, true);
      }
    });
  });
}

function build(current) {
  askTab($("#panel-ask"), current);
  pairTab($("#panel-pair"), current);
  server = serverTab($("#panel-server"), current, { getInfo });
  reportsTab($("#panel-reports"));
  const selected = $("[role=tab][aria-selected=true]");
  selectTab(selected ? selected.dataset.tab : "ask");
}

async function start() {
  try {
    const current = await getInfo(true);
    $("#auth-panel").hidden = true;
    showWarning(current);
    showStatus(`profile ${current.profile} · ${current.ready ? "ready" : "not ready"}` +
      `${current.auth ? " · auth on" : ""}`, !current.ready);
    $("#forget-token").hidden = !hasToken();
    build(current);
    document.body.dataset.ready = "true";
  } catch (error) {
    const words = error instanceof ApiError ? error.words : String(error);
    showStatus(error.status === 401 ? "token needed" : "server not reachable", true);
    if (error.status === 401) showAuth(hasToken() ? `The token was refused: ${error.message}` : null);
    else fill($("#start-problem"), h("p", { class: "error", role: "alert", text: words }));
    if (!document.body.dataset.ready) build(null); // the Reports tab works without the server
  }
}

function wireAuth() {
  $("#auth-form").addEventListener("submit", (event) => {
    event.preventDefault();
    setToken($("#token").value, $("#remember-token").checked);
    $("#token").value = "";
    clear($("#start-problem"));
    start();
  });
  $("#forget-token").addEventListener("click", () => {
    forgetToken();
    $("#forget-token").hidden = true;
    start();
  });
  onAuthNeeded(() => showAuth(hasToken() ? "The server refused the token; enter it again." : null));
}

// A file dropped outside a drop zone must not replace the page with the file.
for (const type of ["dragover", "drop"]) {
  document.addEventListener(type, (event) => {
    if (!event.target.closest?.(".drop-zone")) event.preventDefault();
  });
}

wireTabs();
wireAuth();
start();
