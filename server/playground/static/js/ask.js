// The Ask tab: one image, one question, the chosen fusion modes side by side.
import { AnswerCard, modePicker, runModes } from "./answers.js";
import { fill, h, uid } from "./dom.js";
import { imageSlot, testCard, wirePaste } from "./images.js";

export function askTab(root, info) {
  const slot = imageSlot({ label: "Image", name: "ask-image" });
  const questionId = uid("question");
  const optionsId = uid("options");
  const question = h("textarea", { id: questionId, rows: "2", name: "question", required: true },
    "Is the red disc on the left or the right of the card?");
  const options = h("input", { type: "text", id: optionsId, name: "options", value: "(a) Left (b) Right",
    placeholder: "(a) Left (b) Right", autocomplete: "off" });
  const picker = modePicker(info, { prefix: "ask" });
  const problem = h("p", { class: "error", role: "alert", hidden: true });
  const askButton = h("button", { type: "submit", class: "primary", text: "Ask" });
  const sample = h("button", { type: "button", text: "Use a drawn test card" });
  const results = h("section", { class: "answers", "aria-label": "answers by mode", "aria-live": "polite" });
  const form = h("form", { class: "ask-form", novalidate: true },
    h("div", { class: "column" }, slot.element, sample),
    h("div", { class: "column" },
      h("div", { class: "field" }, h("label", { for: questionId, text: "Question" }), question),
      h("div", { class: "field" }, h("label", { for: optionsId, text: "Options (MMVP style, optional)" }), options),
      picker.element,
      h("div", { class: "actions" }, askButton),
      problem));
  fill(root, h("h2", { text: "Ask in every fusion mode" }),
    h("p", { class: "hint", text: "Drop, paste or pick an image; each checked mode answers side by side, " +
      "token by token. The first mode computes the encoders' features; the others find them in the feature cache." }),
    form, results);

  wirePaste(root, (file) => slot.take(file));
  sample.addEventListener("click", async () => slot.set(await testCard("left")));

  let running = null;
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    problem.hidden = true;
    const models = picker.selected();
    const why = !slot.image ? "Pick an image first (drop, paste or choose a file)."
      : !question.value.trim() ? "Write a question about the image."
        : !models.length ? "Check at least one fusion mode." : null;
    if (why) {
      problem.textContent = why;
      problem.hidden = false;
      return;
    }
    // the previous answers are stale from now on (and a script waiting for "done" must not see them)
    results.dataset.state = "running";
    running?.abort();
    running = new AbortController();
    askButton.disabled = true;
    try {
      const image = await slot.image.load();
      const cards = models.map((m) => new AnswerCard(m));
      fill(results, cards.map((c) => c.element));
      results.dataset.state = "running";
      await runModes(models, { image, question: question.value.trim(), options: options.value, alpha: picker.alpha(),
        maxTokens: picker.maxTokens() }, cards, info, running.signal);
      results.dataset.state = "done";
    } catch (error) {
      problem.textContent = `The page could not ask: ${error.message || error}`;
      problem.hidden = false;
    } finally {
      askButton.disabled = false;
    }
  });
}
