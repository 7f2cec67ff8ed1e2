// The Reports tab: an MMVP evaluation's report (mofserve eval mmvp: report.json, answers.csv and
// the images) and a mining run's pairs (mofserve mine: pairs.csv, summary.json and the images),
// read from files the user chooses. Everything stays in the browser: nothing is sent anywhere.
import { clear, fill, fmt, h, printable, uid } from "./dom.js";

const IMAGE = /\.(jpe?g|png|webp|gif|bmp|tiff?)$/i;
const MAX_ROWS = 300;

// RFC 4180 CSV (quoted fields, doubled quotes, newlines inside quotes) -> array of objects.
export function parseCSV(text) {
  const rows = [];
  let row = [];
  let field = "";
  let quoted = false;
  for (let i = 0; i < text.length; i += 1) {
    const c = text[i];
    if (quoted) {
      if (c === '"' && text[i + 1] === '"') {
        field += '"';
        i += 1;
      } else if (c === '"') quoted = false;
      else field += c;
    } else if (c === '"') quoted = true;
    else if (c === ",") {
      row.push(field);
      field = "";
    } else if (c === "\n" || c === "\r") {
      if (c === "\r" && text[i + 1] === "\n") i += 1;
      row.push(field);
      rows.push(row);
      row = [];
      field = "";
    } else field += c;
  }
  if (field || row.length) {
    row.push(field);
    rows.push(row);
  }
  const [header, ...body] = rows.filter((r) => r.length > 1 || r[0] !== "");
  if (!header) return [];
  return body.map((r) => Object.fromEntries(header.map((name, i) => [name.replace(/^\ufeff/, ""), r[i] ?? ""])));
}

function readText(file) {
  return file.text();
}

function thumb(file, alt) {
  if (!file) return h("span", { class: "no-thumb", text: "image not chosen" });
  return h("img", { class: "thumb", src: URL.createObjectURL(file), alt, loading: "lazy" });
}

// The chosen file a report's path names (the longest matching tail of its path).
export function findImage(images, path) {
  const wanted = String(path).replace(/\\/g, "/");
  let best = null;
  let bestLength = -1;
  for (const file of images) {
    const rel = (file.webkitRelativePath || file.name).replace(/\\/g, "/");
    const candidates = [rel, file.name];
    for (const tail of candidates) {
      if ((wanted === tail || wanted.endsWith(`/${tail}`)) && tail.length > bestLength) {
        best = file;
        bestLength = tail.length;
      }
    }
  }
  return best;
}

function pct(value) {
  return value === null || value === undefined ? "–" : `${Number(value).toFixed(1)}%`;
}

function yes(value) {
  return value === "True" || value === "true" || value === true;
}

function filePicker(label, hint, onFiles) {
  const id = uid("report-files");
  const dirId = uid("report-folder");
  const files = h("input", { type: "file", id, multiple: true, name: id });
  const folder = h("input", { type: "file", id: dirId, multiple: true, webkitdirectory: true, name: dirId });
  const chosen = [];
  const take = (list) => {
    chosen.push(...Array.from(list));
    onFiles(chosen.slice());
  };
  files.addEventListener("change", () => take(files.files));
  folder.addEventListener("change", () => take(folder.files));
  const reset = h("button", { type: "button", text: "Clear" });
  reset.addEventListener("click", () => {
    chosen.length = 0;
    files.value = "";
    folder.value = "";
    onFiles([]);
  });
  return h("div", { class: "report-picker" },
    h("div", { class: "field" }, h("label", { for: id, text: label }), files),
    h("div", { class: "field" }, h("label", { for: dirId, text: "…and/or a folder of images" }), folder),
    h("p", { class: "hint", text: hint }), reset);
}

async function showMMVP(root, files) {
  const report = files.find((f) => f.name === "report.json");
  const answers = files.find((f) => f.name === "answers.csv");
  const images = files.filter((f) => IMAGE.test(f.name));
  clear(root);
  if (!files.length) return;
  if (!report && !answers) {
    root.append(h("p", { class: "error", role: "alert", text: "Choose the evaluation's report.json and/or " +
      "answers.csv (from the --out folder of mofserve eval mmvp)." }));
    return;
  }
  let data = null;
  if (report) {
    try {
      data = JSON.parse(await readText(report));
    } catch (error) {
      root.append(h("p", { class: "error", role: "alert", text: `report.json is not valid JSON: ${error.message}` }));
    }
  }
  if (data) {
    if (data.benchmark !== "MMVP" || !data.scores) {
      root.append(h("p", { class: "error", role: "alert",
        text: "report.json is not an MMVP report of mofserve eval mmvp (no benchmark: MMVP / scores)." }));
    } else {
      (data.warnings || []).forEach((w) => root.append(h("p", { class: "warning-inline", role: "alert", text: w })));
      const sets = data.labels?.sets || ["raw"];
      const rules = Object.keys(data.grading || { generated: 1, likelihood: 1 });
      root.append(h("p", { class: "meta", text: `created ${data.created}; ${data.dataset?.questions} questions, ` +
        `${data.dataset?.pairs} pairs; server profile ${data.server?.provenance?.profile ?? "?"}` }));
      root.append(h("table", { class: "report-table scores", "aria-label": "pair accuracy per mode" },
        h("caption", { text: "MMVP pair accuracy per mode (question accuracy in brackets)" }),
        h("thead", {}, h("tr", {}, h("th", { scope: "col", text: "mode" }),
          sets.flatMap((s) => rules.map((r) => h("th", { scope: "col", text: `${r}${sets.length > 1 ? ` (${s})` : ""}` }))),
          h("th", { scope: "col", text: "paper" }))),
        h("tbody", {}, (data.modes || []).map((mode) => h("tr", { dataset: { mode: mode.key } },
          h("th", { scope: "row", text: mode.key }),
          sets.flatMap((s) => rules.map((r) => {
            const score = data.scores[s]?.[mode.key]?.[r];
            return h("td", { text: score ? `${pct(score.pair_accuracy)} (${pct(score.question_accuracy)})` : "–" });
          })),
          h("td", { text: mode.paper_counterpart ? `${mode.paper_counterpart.model}: ` +
            `${pct(mode.paper_counterpart.pair_accuracy)}` : "–" }))))));
    }
  }
  if (answers) {
    const rows = parseCSV(await readText(answers));
    if (!rows.length || !("index" in rows[0]) || !("mode" in rows[0])) {
      root.append(h("p", { class: "error", role: "alert", text: "answers.csv has no index / mode columns: is it " +
        "the answers.csv of mofserve eval mmvp?" }));
      return;
    }
    const modes = [...new Set(rows.map((r) => r.mode))];
    const byIndex = new Map();
    for (const r of rows) {
      if (!byIndex.has(r.index)) byIndex.set(r.index, { first: r, modes: {} });
      byIndex.get(r.index).modes[r.mode] = r;
    }
    const items = [...byIndex.values()].slice(0, MAX_ROWS);
    const imageFor = (index) => images.find((f) => f.name.replace(/\.[^.]+$/, "") === String(index));
    root.append(h("table", { class: "report-table questions", "aria-label": "answers per question" },
      h("caption", { text: `Answers per question (${byIndex.size} questions${byIndex.size > MAX_ROWS
        ? `, first ${MAX_ROWS} shown` : ""}); ✓ = right by the generated answer, (letter) = chosen option` }),
      h("thead", {}, h("tr", {}, ["#", "pair", "image", "question", "correct"].map((t) => h("th", { scope: "col", text: t })),
        modes.map((m) => h("th", { scope: "col", text: m })))),
      h("tbody", {}, items.map(({ first, modes: answered }) => h("tr", {},
        h("td", { text: first.index }), h("td", { text: first.pair }),
        h("td", {}, thumb(imageFor(first.index), `image ${first.index}`)),
        h("td", {}, h("span", { text: first.question }), h("br"), h("small", { text: first.options })),
        h("td", { text: first.correct }),
        modes.map((m) => {
          const r = answered[m];
          if (!r) return h("td", { text: "–" });
          if (r.error) return h("td", { class: "wrong", text: `failed: ${r.error}` });
          const ok = yes(r.generated_correct);
          return h("td", { class: ok ? "right" : "wrong" },
            h("span", { text: `${ok ? "✓" : "✗"} ${printable(r.answer).slice(0, 80)}` }), h("br"),
            h("small", { text: `parsed ${r.parsed_letter || "–"}, chosen (${r.likelihood_letter || "–"})` +
              `${yes(r.likelihood_correct) ? " ✓" : ""}` }));
        }))))));
  }
}

async function showMining(root, files) {
  const pairsFile = files.find((f) => f.name === "pairs.csv");
  const summaryFile = files.find((f) => f.name === "summary.json");
  const images = files.filter((f) => IMAGE.test(f.name));
  clear(root);
  if (!files.length) return;
  if (!pairsFile) {
    root.append(h("p", { class: "error", role: "alert", text: "Choose the run's pairs.csv (from the --out folder " +
      "of mofserve mine), with summary.json and the images if you have them." }));
    return;
  }
  if (summaryFile) {
    try {
      const s = JSON.parse(await readText(summaryFile));
      if (s.random_weights_note) root.append(h("p", { class: "warning-inline", role: "alert", text: s.random_weights_note }));
      root.append(h("p", { class: "meta", text: `${s.images?.usable ?? "?"} images, ${s.pairs?.clip_blind ?? "?"} ` +
        `CLIP-blind pairs at CLIP > ${s.thresholds?.clip_cosine_gt} and DINOv2 < ${s.thresholds?.dino_cosine_lt}` +
        `${s.pairs?.truncated ? " (truncated)" : ""}; server profile ${s.server?.profile ?? "?"}` }));
    } catch (error) {
      root.append(h("p", { class: "error", role: "alert", text: `summary.json is not valid JSON: ${error.message}` }));
    }
  }
  const pairs = parseCSV(await readText(pairsFile));
  if (pairs.length && !("path_a" in pairs[0])) {
    root.append(h("p", { class: "error", role: "alert", text: "pairs.csv has no path_a / path_b columns." }));
    return;
  }
  const shown = pairs.slice(0, MAX_ROWS);
  root.append(h("table", { class: "report-table pairs", "aria-label": "mined pairs" },
    h("caption", { text: `${pairs.length} pairs, largest CLIP − DINOv2 gap first${pairs.length > MAX_ROWS
      ? ` (first ${MAX_ROWS} shown)` : ""}` }),
    h("thead", {}, h("tr", {}, ["A", "B", "CLIP cosine", "DINOv2 cosine", "gap"].map((t) => h("th", { scope: "col", text: t })))),
    h("tbody", {}, shown.map((p) => h("tr", {},
      h("td", {}, thumb(findImage(images, p.path_a), p.path_a), h("small", { text: p.path_a })),
      h("td", {}, thumb(findImage(images, p.path_b), p.path_b), h("small", { text: p.path_b })),
      h("td", { class: "number", text: fmt(Number(p.clip_cosine), 4) }),
      h("td", { class: "number", text: fmt(Number(p.dino_cosine), 4) }),
      h("td", { class: "number", text: fmt(Number(p.gap), 4) }))))));
  if (!pairs.length) root.append(h("p", { class: "hint", text: "No pair met the thresholds." }));
}

export function reportsTab(root) {
  const mmvp = h("div", { class: "report-view", dataset: { report: "mmvp" } });
  const mining = h("div", { class: "report-view", dataset: { report: "mining" } });
  fill(root, h("h2", { text: "Reports" }),
    h("p", { class: "hint", text: "Open results from files you choose; they are read in this page only, " +
      "nothing is uploaded or written on the server." }),
    h("section", { "aria-labelledby": "mmvp-heading" }, h("h3", { id: "mmvp-heading", text: "MMVP evaluation" }),
      filePicker("report.json, answers.csv and the MMVP images", "From mofserve eval mmvp --out FOLDER; images are " +
        "matched by their number (1.jpg answers question 1).", (files) => showMMVP(mmvp, files)), mmvp),
    h("section", { "aria-labelledby": "mining-heading" }, h("h3", { id: "mining-heading", text: "CLIP-blind mining run" }),
      filePicker("pairs.csv, summary.json and the images", "From mofserve mine --out FOLDER; images are matched by " +
        "the end of their path in pairs.csv.", (files) => showMining(mining, files)), mining));
}
