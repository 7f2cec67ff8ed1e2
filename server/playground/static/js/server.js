// The Server tab: what the server is (/v1/mofserve/info) and live figures from its metrics
// (/metrics, and /metrics/triton for the encoders' feature cache), refreshed while the tab is open.
import { ApiError, getJSON, getText } from "./api.js";
import { fill, fmt, h } from "./dom.js";

// Prometheus text -> [{name, labels, value}]
export function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)/.exec(line);
    if (!match) continue;
    const labels = {};
    const pattern = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
    let m;
    while ((m = pattern.exec(match[3] || "")) !== null) labels[m[1]] = m[2];
    samples.push({ name: match[1], labels, value: Number(match[4]) });
  }
  return samples;
}

// The q-quantile of a Prometheus histogram's cumulative buckets (linear within the bucket).
export function quantile(buckets, q) {
  const sorted = buckets.map((b) => ({ le: b.le === "+Inf" ? Infinity : Number(b.le), count: b.count }))
    .sort((x, y) => x.le - y.le);
  const total = sorted.length ? sorted[sorted.length - 1].count : 0;
  if (!total) return null;
  const rank = q * total;
  let prevLe = 0;
  let prevCount = 0;
  for (const b of sorted) {
    if (b.count >= rank) {
      if (b.le === Infinity) return prevLe;
      return prevLe + ((b.le - prevLe) * (rank - prevCount)) / Math.max(b.count - prevCount, 1e-9);
    }
    prevLe = b.le;
    prevCount = b.count;
  }
  return prevLe;
}

export function figures(frontend, triton) {
  const asks = new Set(["chat.completions", "Ask", "AskStream", "Compare"]);
  let requests = 0;
  let answered = 0;
  let failed = 0;
  const buckets = new Map();
  let inFlight = 0;
  for (const s of frontend) {
    if (s.name === "mofserve_requests_total") {
      requests += s.value;
      if (asks.has(s.labels.method)) {
        if (s.labels.status === "ok") answered += s.value;
        else failed += s.value;
      }
    } else if (s.name === "mofserve_request_seconds_bucket" && s.labels.method === "chat.completions") {
      buckets.set(s.labels.le, (buckets.get(s.labels.le) || 0) + s.value);
    } else if (s.name === "mofserve_in_flight_requests") {
      inFlight += s.value;
    }
  }
  const p50 = quantile([...buckets].map(([le, count]) => ({ le, count })), 0.5);
  let hits = 0;
  let lookups = 0;
  for (const s of triton || []) {
    if (s.name.startsWith("mofserve_encoder_cache")) {
      lookups += s.value;
      if (s.labels.result === "hit") hits += s.value;
    }
  }
  return { requests, answered, failed, inFlight, p50, hits, lookups,
    hitRate: triton && lookups ? hits / lookups : null };
}

function row(name, value) {
  return h("tr", {}, h("th", { scope: "row", text: name }), h("td", {}, value));
}

export function serverTab(root, info, { getInfo }) {
  const infoBox = h("section", { class: "server-info", "aria-label": "server" });
  const live = h("section", { class: "live", "aria-label": "live figures", "aria-live": "polite" });
  const refresh = h("button", { type: "button", text: "Refresh now" });
  fill(root, h("h2", { text: "Server" }), infoBox,
    h("h3", { text: "Live figures" }), h("div", { class: "actions" }, refresh), live);

  function showInfo(current) {
    const versions = Object.entries(current.versions || {});
    fill(infoBox,
      current.random_weights ? h("p", { class: "warning-inline", role: "alert",
        text: `WARNING: RANDOM WEIGHTS. ${current.notice}` }) : null,
      h("table", { class: "facts" }, h("tbody", {},
        row("profile", current.profile),
        row("weights", current.random_weights ? "seeded random weights (answers are not meaningful)" : "checkpoints"),
        row("ready", current.ready ? "yes" : "no (Triton is starting or restarting)"),
        row("target", current.target),
        row("mofserve", current.version),
        row("image the encoders see", current.image ? `${current.image.size} px square (${current.image.aspect}), ` +
          `${current.image.patch_grid}×${current.image.patch_grid} patches of ${current.image.patch_size} px` : "–"),
        row("modes", current.models.map((m) => m.id).join(", ")),
        row("A-MoF default alpha", fmt(current.default_alpha, 2)),
        row("auth", current.auth ? "bearer token" : "off"),
        row("limits", `images up to ${(current.limits.max_image_bytes / 1048576).toFixed(1)} MiB, ` +
          `${current.limits.max_new_tokens} new tokens, ${current.limits.max_question_chars} question characters`))),
      h("h3", { text: "Model versions" }),
      versions.length ? h("table", { class: "facts versions" }, h("tbody", {},
        versions.map(([name, digest]) => row(name, h("code", { text: digest })))))
        : h("p", { class: "hint", text: current.split_deployment ? "none reported: this front-end serves a Triton " +
          "it did not export (split deployment)" : "none reported" }));
  }

  async function update() {
    try {
      showInfo(await getInfo(true));
    } catch (error) {
      fill(infoBox, h("p", { class: "error", role: "alert",
        text: error instanceof ApiError ? error.words : String(error) }));
    }
    try {
      const frontend = parseMetrics(await getText("/metrics"));
      let triton = null;
      let tritonProblem = null;
      if (info?.routes?.triton_metrics) {
        try {
          triton = parseMetrics(await getText(info.routes.triton_metrics));
        } catch (error) {
          tritonProblem = error instanceof ApiError ? error.words : String(error);
        }
      }
      const f = figures(frontend, triton);
      const cacheText = f.hitRate === null
        ? (tritonProblem || (info?.encoder_timings === false ? "no feature cache on this target"
          : "no encoder lookups yet, or Triton's metrics are not relayed"))
        : `${(f.hitRate * 100).toFixed(0)}% (${f.hits} of ${f.lookups} encoder lookups)`;
      fill(live, h("table", { class: "facts figures" }, h("tbody", {},
        row("requests answered (all routes)", String(f.requests)),
        row("questions answered / failed", `${f.answered} / ${f.failed}`),
        row("p50 latency, chat completions", f.p50 === null ? "no requests yet" : `${(f.p50 * 1000).toFixed(0)} ms`),
        row("feature-cache hit rate", cacheText),
        row("in flight", String(f.inFlight)))),
      h("p", { class: "hint", text: `updated ${new Date().toLocaleTimeString()}; every 5 s while this tab is open` }));
    } catch (error) {
      fill(live, h("p", { class: "error", role: "alert",
        text: error instanceof ApiError ? error.words : String(error) }));
    }
  }

  refresh.addEventListener("click", update);
  let timer = null;
  return {
    shown() {
      update();
      clearInterval(timer);
      timer = setInterval(update, 5000);
    },
    hidden() {
      clearInterval(timer);
      timer = null;
    },
  };
}
