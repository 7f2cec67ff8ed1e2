// The CLIP-blind pair tab: two images (or one and its mirror), how CLIP and DINOv2 each see them
// (pooled cosines, the verdict at the paper's thresholds, per-patch heat maps), and the chosen
// modes' answers to one question on both, scored as an MMVP pair when the correct options are given.
import { AnswerCard, modeName, modePicker, noteEncoded, parseOptions, runModes } from "./answers.js";
import { ApiError, postJSON } from "./api.js";
import { clear, fill, fmt, h, uid } from "./dom.js";
import { heatLegend, heatMap, imageSlot, mirror, testCard, wirePaste } from "./images.js";

function letterSelect(id, name) {
  return h("select", { id, name }, h("option", { value: "", text: "not given" }),
    ["a", "b", "c", "d"].map((l) => h("option", { value: l, text: `(${l})` })));
}

function cosineMeter(name, value, threshold, passes, sense) {
  const track = h("span", { class: "meter-track" });
  const fill = h("span", { class: `meter-fill ${passes ? "pass" : "fail"}` });
  fill.style.width = `${Math.max(0, Math.min(1, (value + 1) / 2)) * 100}%`;
  const mark = h("span", { class: "meter-mark", title: `threshold ${threshold}` });
  mark.style.left = `${((threshold + 1) / 2) * 100}%`;
  track.append(fill, mark);
  return h("div", { class: "meter", role: "img", "aria-label": `${name} cosine ${fmt(value, 3)}, ` +
      `threshold ${sense} ${threshold}: ${passes ? "met" : "not met"}` },
  h("span", { class: "meter-name", text: name }), track,
  h("span", { class: "meter-value", text: `${fmt(value, 3)} (${sense} ${threshold}: ${passes ? "yes" : "no"})` }));
}

export function pairTab(root, info) {
  const slotA = imageSlot({ label: "Image A", name: "pair-a" });
  const slotB = imageSlot({ label: "Image B", name: "pair-b" });
  const mirrorButton = h("button", { type: "button", text: "Mirror A into B" });
  const sample = h("button", { type: "button", text: "Use a drawn test card as A" });
  const qId = uid("pair-question");
  const oId = uid("pair-options");
  const aId = uid("pair-correct-a");
  const bId = uid("pair-correct-b");
  const question = h("textarea", { id: qId, rows: "2", name: "pair-question" },
    "Is the red disc on the left or the right of the card?");
  const options = h("input", { type: "text", id: oId, name: "pair-options", value: "(a) Left (b) Right",
    autocomplete: "off" });
  const correctA = letterSelect(aId, "pair-correct-a");
  const correctB = letterSelect(bId, "pair-correct-b");
  const picker = modePicker(info, { prefix: "pair" });
  const compare = h("button", { type: "submit", class: "primary", text: "Compare" });
  const problem = h("p", { class: "error", role: "alert", hidden: true });
  const similarity = h("section", { class: "similarity", "aria-label": "how each encoder sees the pair",
    "aria-live": "polite" });
  const answers = h("section", { class: "pair-answers", "aria-label": "answers on both images" });
  const form = h("form", { class: "pair-form", novalidate: true },
    h("div", { class: "pair-images" }, slotA.element, slotB.element),
    h("div", { class: "actions" }, sample, mirrorButton),
    h("div", { class: "pair-question" },
      h("div", { class: "field" }, h("label", { for: qId, text: "Question (asked about both images)" }), question),
      h("div", { class: "field" }, h("label", { for: oId, text: "Options (MMVP style)" }), options),
      h("div", { class: "field inline" }, h("label", { for: aId, text: "Correct option for A" }), correctA,
        h("label", { for: bId, text: "for B" }), correctB)),
    picker.element,
    h("div", { class: "actions" }, compare),
    problem);
  const t = info?.clip_blind_thresholds || { clip_cosine_gt: 0.95, dinov2_cosine_lt: 0.6 };
  fill(root, h("h2", { text: "CLIP-blind pair view" }),
    h("p", { class: "hint", text: `Two images are a CLIP-blind pair when CLIP sees them as the same (cosine > ` +
      `${t.clip_cosine_gt}) while DINOv2 tells them apart (cosine < ${t.dinov2_cosine_lt}). Try an image and ` +
      "its mirror." }),
    form, similarity, answers);

  wirePaste(root, (file) => (slotA.image && !slotB.image ? slotB : slotA).take(file));
  sample.addEventListener("click", async () => slotA.set(await testCard("left")));
  mirrorButton.addEventListener("click", async () => {
    problem.hidden = true;
    if (!slotA.image) {
      problem.textContent = "Pick image A first; B becomes its mirror.";
      problem.hidden = false;
      return;
    }
    slotB.set(await mirror(slotA.image));
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    problem.hidden = true;
    const models = picker.selected();
    const why = !slotA.image || !slotB.image ? "Pick both images (or image A and Mirror A into B)."
      : !question.value.trim() && models.length ? "Write a question, or uncheck every mode to compare only." : null;
    if (why) {
      problem.textContent = why;
      problem.hidden = false;
      return;
    }
    compare.disabled = true;
    clear(answers);
    fill(similarity, h("p", { class: "status", text: "Asking the encoders…" }));
    similarity.dataset.state = "running";
    answers.dataset.state = "";
    try {
      const [a, b] = await Promise.all([slotA.image.load(), slotB.image.load()]);
      try {
        const result = await postJSON("/v1/mofserve/similarity", { images: [a.dataUrl, b.dataUrl] });
        if (info?.encoder_timings !== false) [a, b].forEach((image) => noteEncoded(image.digest, ["clip", "dinov2"]));
        await showSimilarity(similarity, result, a, b, info);
        similarity.dataset.state = "done";
      } catch (error) {
        similarity.dataset.state = "failed";
        fill(similarity, h("p", { class: "error", role: "alert",
          text: error instanceof ApiError ? error.words : String(error.message || error) }));
      }
      if (models.length) {
        answers.dataset.state = "running";
        await showAnswers(answers, models, { a, b, question: question.value.trim(), options: options.value,
          correct: [correctA.value, correctB.value], alpha: picker.alpha(), maxTokens: picker.maxTokens() }, info);
        answers.dataset.state = "done";
      }
    } finally {
      compare.disabled = false;
    }
  });
}

async function showSimilarity(root, result, a, b, info) {
  const aspect = result.view?.aspect || info?.image?.aspect || "crop";
  const verdict = h("p", { class: `verdict ${result.clip_blind ? "blind" : "not-blind"}`, role: "status" },
    h("strong", { text: result.clip_blind ? "CLIP-blind pair" : "Not CLIP-blind" }), ` — ${result.verdict}`);
  const meters = h("div", { class: "meters" },
    cosineMeter("CLIP", result.clip.cosine, result.clip.threshold, result.clip.passes, ">"),
    cosineMeter("DINOv2", result.dinov2.cosine, result.dinov2.threshold, result.dinov2.passes, "<"));
  const maps = h("div", { class: "heat-maps" });
  for (const [key, name] of [["clip", "CLIP"], ["dinov2", "DINOv2"]]) {
    const grid = result[key].patch_cosines || [];
    const flat = grid.flat();
    const summary = `${name}: ${flat.length} patches, mean cosine ${fmt(result[key].patch_mean, 3)}, ` +
      `lowest ${fmt(flat.length ? Math.min(...flat) : null, 3)}`;
    const [ca, cb] = await Promise.all([
      heatMap(a, grid, aspect, `${name} per-patch similarity over image A. ${summary}`),
      heatMap(b, grid, aspect, `${name} per-patch similarity over image B. ${summary}`)]);
    maps.append(h("figure", { class: "heat-pair", dataset: { encoder: key } },
      h("h4", { text: `${name}: image A and image B` }),
      h("div", { class: "heat-row" }, ca, cb),
      h("figcaption", { text: summary })));
  }
  const random = result.random_weights ? h("p", { class: "warning-inline", text: result.notice ||
    "seeded random weights: these similarities are not meaningful" }) : null;
  fill(root, h("h3", { text: "How each encoder sees the pair" }), verdict, meters, random,
    h("h3", { text: "Per-patch similarity (patch i of A against patch i of B, over the square the encoders see)" }),
    maps, heatLegend());
}

async function showAnswers(root, models, request, info) {
  const options = parseOptions(request.options);
  const rows = models.map((m) => ({
    model: m,
    a: new AnswerCard(m, { compact: true, caption: "on A" }),
    b: new AnswerCard(m, { compact: true, caption: "on B" }),
    score: h("p", { class: "pair-score", text: "…" }),
  }));
  const summary = h("p", { class: "pair-summary", role: "status" });
  fill(root, h("h3", { text: "Answers on both images" }),
    rows.map((r) => h("div", { class: "pair-row", dataset: { mode: r.model.mode } },
      h("h4", { text: modeName(r.model.mode) }), h("div", { class: "pair-cards" }, r.a.element, r.b.element),
      r.score)), summary);
  const base = { question: request.question, options: request.options, alpha: request.alpha,
    maxTokens: request.maxTokens };
  const resultsA = await runModes(models, { ...base, image: request.a }, rows.map((r) => r.a), info);
  const resultsB = await runModes(models, { ...base, image: request.b }, rows.map((r) => r.b), info);
  const [ca, cb] = request.correct;
  const scored = ca && cb;
  let right = 0;
  let answered = 0;
  rows.forEach((row, i) => {
    const oa = resultsA[i]?.mofserve?.chosen_option;
    const ob = resultsB[i]?.mofserve?.chosen_option;
    if (!resultsA[i] || !resultsB[i]) {
      row.score.textContent = "pair not scored: an answer failed";
      return;
    }
    answered += 1;
    if (!scored) {
      row.score.textContent = `chose (${oa || "–"}) on A, (${ob || "–"}) on B`;
      return;
    }
    const ok = oa === ca && ob === cb;
    right += ok ? 1 : 0;
    row.score.textContent = `${ok ? "pair right" : "pair wrong"}: chose (${oa || "–"}) on A ` +
      `(${oa === ca ? "right" : "wrong"}), (${ob || "–"}) on B (${ob === cb ? "right" : "wrong"})`;
    row.score.classList.add(ok ? "right" : "wrong");
  });
  if (!options.length) {
    summary.textContent = "Give MMVP-style options to get a chosen option per answer.";
  } else if (scored) {
    summary.textContent = `MMVP pair score: ${right} of ${answered} modes answer both images right ` +
      "(the chosen option, i.e. the likelihood grading of mofserve eval mmvp).";
  } else {
    summary.textContent = "Give the correct option for A and for B to score the answers as an MMVP pair.";
  }
}
