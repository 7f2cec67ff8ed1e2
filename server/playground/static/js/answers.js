// Asking in several fusion modes at once and showing each answer: the mode picker, the answer
// cards (streamed text, chosen option, option-score bars, a per-stage timing bar) and the order in
// which modes run so that each encoder sees a new image once (the server's Compare does the same).
import { ApiError, chatStream } from "./api.js";
import { clear, fill, fmt, h, ms, printable, uid } from "./dom.js";

const MODE_NAMES = {
  clip: "CLIP only (LLaVA-1.5)",
  dinov2: "DINOv2 only",
  additive: "A-MoF (additive)",
  interleaved: "I-MoF (interleaved)",
};

export function modeName(mode) {
  return MODE_NAMES[mode] || mode;
}

// "(a) Left (b) Right" or a JSON list -> [{letter, text}] (what the server letters them).
export function parseOptions(text) {
  const raw = (text || "").trim();
  if (!raw) return [];
  if (raw.startsWith("[")) {
    try {
      return JSON.parse(raw).map((t, i) => ({ letter: String.fromCharCode(97 + i), text: String(t) }));
    } catch (e) {
      return [];
    }
  }
  const found = [];
  const pattern = /\(([a-zA-Z])\)\s*([^]*?)(?=\s*\([a-zA-Z]\)|$)/g;
  let match;
  while ((match = pattern.exec(raw)) !== null) found.push({ letter: match[1].toLowerCase(), text: match[2].trim() });
  return found;
}

// The modes to run (checkboxes), A-MoF's alpha (slider) and the answer length.
export function modePicker(info, { checked = null, prefix = "ask" } = {}) {
  const models = info?.models || ["clip", "dinov2", "additive", "interleaved"].map((mode) => ({
    id: `mofserve-${mode}`, mode, takes_alpha: mode === "additive", encoders: [],
  }));
  const boxes = models.map((model) => {
    const id = uid(`${prefix}-mode`);
    const box = h("input", { type: "checkbox", id, value: model.mode, name: `${prefix}-modes`,
      checked: checked === null || checked.includes(model.mode) });
    return { model, box, label: h("label", { for: id, class: "check" }, box, ` ${modeName(model.mode)}`) };
  });
  const alphaId = uid(`${prefix}-alpha`);
  const defaultAlpha = info?.default_alpha ?? 0.5;
  const alpha = h("input", { type: "range", id: alphaId, min: "0", max: "1", step: "0.05",
    value: String(defaultAlpha), name: `${prefix}-alpha` });
  const alphaOut = h("output", { for: alphaId, text: Number(defaultAlpha).toFixed(2) });
  alpha.addEventListener("input", () => { alphaOut.textContent = Number(alpha.value).toFixed(2); });
  const tokensId = uid(`${prefix}-tokens`);
  const maxNew = info?.limits?.max_new_tokens ?? 512;
  const tokens = h("input", { type: "number", id: tokensId, min: "1", max: String(maxNew), value: "16",
    name: `${prefix}-max-tokens`, inputmode: "numeric" });
  const alphaRow = h("div", { class: "field inline" },
    h("label", { for: alphaId, text: "A-MoF alpha (DINOv2 share)" }), alpha, alphaOut);
  const syncAlpha = () => {
    const on = boxes.some((b) => b.model.takes_alpha && b.box.checked);
    alpha.disabled = !on;
    alphaRow.classList.toggle("muted", !on);
  };
  boxes.forEach((b) => b.box.addEventListener("change", syncAlpha));
  syncAlpha();
  const element = h("div", { class: "mode-picker" },
    h("fieldset", { class: "modes" }, h("legend", { text: "Fusion modes" }), boxes.map((b) => b.label)),
    alphaRow,
    h("div", { class: "field inline" }, h("label", { for: tokensId, text: "Max tokens" }), tokens));
  return {
    element,
    selected: () => boxes.filter((b) => b.box.checked).map((b) => b.model),
    alpha: () => Number(alpha.value),
    maxTokens: () => Math.max(1, Math.min(maxNew, Math.round(Number(tokens.value) || 16))),
  };
}

// ---- feature-cache labels -----------------------------------------------------------------------------
// The encoders keep each image's features in an LRU cache (cpu and gpu-torch targets), so the
// second time an encoder gets an image its reported time is only the lookup. The page marks an
// encoder "feature cache" when this tab has already had the same image through that encoder (the
// first mode of an answer set computes, the others find the features; the similarity call encodes
// both images first). The milliseconds shown are the server's either way.
const encoded = new Set();

export function encoderState(digestKey, encoder, timed) {
  if (!timed) return "not timed";
  const key = `${digestKey}|${encoder}`;
  if (encoded.has(key)) return "cache";
  encoded.add(key);
  return "computed";
}

// Images the server has just encoded outside the answers (the similarity call runs both encoders).
export function noteEncoded(digestKey, encoders) {
  encoders.forEach((encoder) => encoded.add(`${digestKey}|${encoder}`));
}

// Indices to run first so that each encoder needed runs once for the image: one mode that uses
// every needed encoder, else one CLIP-only and one DINOv2-only mode (as the server's Compare).
export function coveringWave(models) {
  const needed = new Set(models.flatMap((m) => encodersOf(m)));
  const full = models.findIndex((m) => encodersOf(m).length === needed.size);
  if (full >= 0) return [full];
  return [...needed].sort().map((e) => models.findIndex((m) => encodersOf(m).length === 1 && encodersOf(m)[0] === e));
}

export function encodersOf(model) {
  if (model.encoders && model.encoders.length) return model.encoders;
  return { clip: ["clip"], dinov2: ["dinov2"] }[model.mode] || ["clip", "dinov2"];
}

// ---- one answer -----------------------------------------------------------------------------------------

const STAGES = [
  ["preprocess_ms", "preprocess"],
  ["encoders_ms", "encoders"],
  ["fusion_ms", "fusion"],
  ["llm_queue_ms", "LM queue"],
  ["prefill_ms", "prefill"],
  ["decode_ms", "decode"],
];

export class AnswerCard {
  constructor(model, { compact = false, caption = null } = {}) {
    this.model = model;
    this.status = h("span", { class: "status", text: "waiting" });
    this.text = h("p", { class: "answer-text", "aria-live": "polite" });
    this.details = h("div", { class: "answer-details" });
    this.element = h("article", { class: `answer-card${compact ? " compact" : ""}`, dataset: { mode: model.mode } },
      h("header", {}, h("h3", {}, modeName(model.mode), caption ? h("span", { class: "caption", text: caption }) : null),
        this.status),
      this.text, this.details);
    this.result = null;
  }

  streaming() {
    this.status.textContent = "answering…";
    this.element.classList.add("busy");
  }

  append(piece) {
    this.text.textContent += printable(piece);
  }

  fail(error) {
    this.element.classList.remove("busy");
    this.element.classList.add("failed");
    this.status.textContent = "error";
    fill(this.details, h("p", { class: "error", role: "alert",
      text: error instanceof ApiError ? error.words : `The page failed: ${error.message || error}` }));
  }

  finish(result, { options, scaleMs }) {
    this.result = result;
    this.element.classList.remove("busy");
    this.element.classList.add("done");
    const m = result.mofserve || {};
    if (!this.text.textContent) this.text.textContent = printable(result.content) || "(empty answer)";
    const reason = result.finish_reason === "length" ? "stopped at max tokens" : "finished";
    this.status.textContent = `${reason} · ${ms(m.timings?.total_ms)}`;
    clear(this.details);
    if (m.alpha !== null && m.alpha !== undefined) {
      this.details.append(h("p", { class: "meta", text: `alpha ${Number(m.alpha).toFixed(2)}` }));
    }
    if (m.option_scores && m.option_scores.length) this.details.append(optionBars(m, options));
    this.timing = h("div", { class: "timing-holder" });
    this.details.append(this.timing);
    this.renderTimings(scaleMs);
    if (result.usage) {
      this.details.append(h("p", { class: "meta", text: `${result.usage.prompt_tokens} prompt tokens (visual ` +
        `included), ${result.usage.completion_tokens} written` }));
    }
  }

  // Decides, once, whether each encoder answered from the feature cache (call in the order the
  // modes ran: the first answer for an image is the one that computed its features).
  settleEncoders(image, info) {
    if (!this.result || this.encoderStates) return;
    const timed = info?.encoder_timings !== false;
    this.encoderStates = Object.fromEntries(encodersOf(this.model).map((e) => [e,
      image ? encoderState(image.digest, e, timed) : "computed"]));
  }

  renderTimings(scaleMs) {
    if (!this.result || !this.timing) return;
    fill(this.timing, timingBar(this.result.mofserve?.timings || {}, this.model, scaleMs,
      this.encoderStates || null));
  }
}

function softmax(scores) {
  const top = Math.max(...scores);
  const e = scores.map((s) => Math.exp(s - top));
  const sum = e.reduce((a, b) => a + b, 0);
  return e.map((v) => v / sum);
}

function optionBars(m, options) {
  const probs = softmax(m.option_scores);
  const chosen = m.chosen_option;
  const chosenText = options.find((o) => o.letter === chosen);
  const list = h("ul", { class: "option-bars", "aria-label": "option scores" });
  m.option_scores.forEach((score, i) => {
    const letter = String.fromCharCode(97 + i);
    const option = options.find((o) => o.letter === letter);
    const bar = h("span", { class: "bar" });
    bar.style.width = `${(probs[i] * 100).toFixed(1)}%`;
    list.append(h("li", { class: letter === chosen ? "chosen" : "" },
      h("span", { class: "option-label", text: `(${letter}) ${option ? option.text : ""}` }),
      h("span", { class: "bar-track" }, bar),
      h("span", { class: "option-value", text: `${(probs[i] * 100).toFixed(0)}% · ${fmt(score, 2)}` })));
  });
  return h("div", { class: "options" },
    h("p", { class: "chosen-option" }, "Chosen option: ",
      h("strong", { text: chosen ? `(${chosen}) ${chosenText ? chosenText.text : ""}` : "none" })),
    list,
    h("p", { class: "hint", text: "bars: softmax of the mean log-probability of each option (the number)" }));
}

function timingBar(t, model, scaleMs, states) {
  const total = t.total_ms || 0;
  const scale = Math.max(scaleMs || total, 1e-6);
  const track = h("div", { class: "timing-bar", role: "img" });
  const legend = h("ul", { class: "timing-legend" });
  let used = 0;
  const words = [];
  for (const [key, name] of STAGES) {
    const value = t[key] || 0;
    if (value <= 0 && key !== "encoders_ms") continue;
    let label = name;
    let cls = `seg seg-${key.replace("_ms", "")}`;
    if (key === "encoders_ms") {
      const parts = encodersOf(model).map((e) => ({ e, v: t[`${e}_ms`], state: states ? states[e] : "" }));
      const cached = parts.length && parts.every((p) => p.state === "cache");
      if (cached) cls += " cached";
      label = parts.map((p) => `${p.e === "clip" ? "CLIP" : "DINOv2"} ${p.state === "not timed" ? "not timed"
        : ms(p.v)}${p.state === "cache" ? " (feature cache)" : ""}`).join(", ");
      if (value <= 0 && !parts.length) continue;
    }
    used += value;
    const seg = h("span", { class: cls, title: `${label}: ${ms(value)}` });
    seg.style.width = `${Math.max(0.5, (value / scale) * 100)}%`;
    track.append(seg);
    legend.append(h("li", {}, h("span", { class: `${cls} key` }),
      key === "encoders_ms" ? `encoders: ${label}` : `${label} ${ms(value)}`));
    words.push(`${label} ${ms(value)}`);
  }
  const other = Math.max(0, total - used);
  if (other > 0) {
    const seg = h("span", { class: "seg seg-other" });
    seg.style.width = `${(other / scale) * 100}%`;
    track.append(seg);
    legend.append(h("li", {}, h("span", { class: "seg seg-other key" }), `front-end and transfers ${ms(other)}`));
  }
  track.setAttribute("aria-label", `stage timings, total ${ms(total)}: ${words.join("; ")}`);
  return h("div", { class: "timings" }, h("p", { class: "meta", text: `time to first token ` +
    `${ms(t.time_to_first_token_ms)}, total ${ms(total)}` }), track, legend);
}

// ---- several modes --------------------------------------------------------------------------------------

export function chatBody(model, { image, question, options, alpha, maxTokens }) {
  const body = {
    model: model.id,
    messages: [{ role: "user", content: [
      { type: "image_url", image_url: { url: image.dataUrl } },
      { type: "text", text: question },
    ] }],
    max_tokens: maxTokens,
  };
  if (options && options.trim()) body.options = options.trim();
  if (model.takes_alpha) body.alpha = alpha;
  return body;
}

// Asks every model about the image, the covering wave first (later modes start once it has its
// first token: the encoders have run and cached the image's features by then). Returns the
// cards' results (null for a failed mode).
export async function runModes(models, request, cards, info, signal) {
  const options = parseOptions(request.options);
  const first = coveringWave(models);
  let release;
  const firstDone = new Promise((resolve) => { release = resolve; });
  let waiting = first.length;
  const oneDone = () => {
    waiting -= 1;
    if (waiting <= 0) release();
  };
  const rescale = () => {
    const totals = cards.filter((c) => c.result).map((c) => c.result.mofserve?.timings?.total_ms || 0);
    const scale = Math.max(...totals, 1);
    cards.forEach((c) => c.renderTimings(scale));
  };
  const run = async (i) => {
    const card = cards[i];
    card.streaming();
    let signalled = false;
    const mark = () => {
      if (!signalled && first.includes(i)) {
        signalled = true;
        oneDone();
      }
    };
    try {
      const result = await chatStream(chatBody(models[i], request), (text) => {
        mark();
        card.append(text);
      }, signal);
      mark();
      card.finish(result, { options, scaleMs: result.mofserve?.timings?.total_ms });
      rescale();
      return result;
    } catch (error) {
      mark();
      card.fail(error);
      return null;
    }
  };
  const results = new Array(models.length).fill(null);
  const firstRuns = first.map(async (i) => { results[i] = await run(i); });
  await firstDone;
  const rest = models.map((_, i) => i).filter((i) => !first.includes(i)).map(async (i) => { results[i] = await run(i); });
  await Promise.all([...firstRuns, ...rest]);
  [...first, ...models.map((_, i) => i).filter((i) => !first.includes(i))]
    .forEach((i) => cards[i].settleEncoders(request.image, info));
  rescale();
  return results;
}
