// Images in the page: picked, dropped or pasted files, their previews, the data URLs the API
// takes, a mirror made in a canvas, and heat maps drawn over the square the encoders see.
import { h, uid } from "./dom.js";

export class PickedImage {
  constructor(blob, name) {
    this.blob = blob;
    this.name = name || "image";
    this.url = URL.createObjectURL(blob);
    this.dataUrl = null;
    this.digest = null;
  }

  async load() {
    if (this.dataUrl) return this;
    this.dataUrl = await new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error || new Error("cannot read the file"));
      reader.readAsDataURL(this.blob);
    });
    this.digest = digest(this.dataUrl);
    return this;
  }

  element() {
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => resolve(img);
      img.onerror = () => reject(new Error(`${this.name}: the browser cannot show this image`));
      img.src = this.url;
    });
  }
}

// Two FNV-1a hashes over the data URL: tells "the same image again" apart (feature-cache labels).
export function digest(text) {
  let a = 0x811c9dc5;
  let b = 0x01000193 ^ text.length;
  for (let i = 0; i < text.length; i += 1) {
    const c = text.charCodeAt(i);
    a = Math.imul(a ^ c, 0x01000193) >>> 0;
    b = Math.imul(b ^ c, 0x5bd1e995) >>> 0;
  }
  return `${a.toString(16)}-${b.toString(16)}-${text.length}`;
}

function checkImageFile(file) {
  if (!file) return null;
  if (file.type && !file.type.startsWith("image/")) {
    throw new Error(`${file.name}: not an image (its type is ${file.type}); pick a JPEG, PNG, WebP, GIF, BMP or TIFF`);
  }
  return new PickedImage(file, file.name || "pasted image");
}

// A drop zone: a label around a file input (so it is reachable and operable by keyboard), a
// preview and a line for problems. onPick(PickedImage) is called for each image chosen.
export function imageSlot({ label, hint = "Drop, paste or pick an image", onPick, name }) {
  const inputId = uid("file");
  const preview = h("img", { class: "preview", alt: "", hidden: true });
  const caption = h("span", { class: "slot-caption", text: hint });
  const problem = h("p", { class: "error", role: "alert", hidden: true });
  const input = h("input", { type: "file", id: inputId, accept: "image/*", class: "visually-hidden",
    name: name || inputId });
  const zone = h("label", { class: "drop-zone", for: inputId, dataset: { testid: name || "" } },
    h("span", { class: "slot-title", text: label }), preview, caption);
  const slot = h("div", { class: "image-slot" }, input, zone, problem);
  let current = null;

  function show(picked) {
    current = picked;
    preview.src = picked.url;
    preview.alt = `${label}: ${picked.name}`;
    preview.hidden = false;
    caption.textContent = picked.name;
    problem.hidden = true;
    onPick?.(picked);
  }

  function take(file) {
    try {
      const picked = checkImageFile(file);
      if (picked) show(picked);
    } catch (error) {
      problem.textContent = error.message;
      problem.hidden = false;
    }
  }

  input.addEventListener("change", () => take(input.files[0]));
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    take(event.dataTransfer.files[0]);
  });
  return { element: slot, input, get image() { return current; }, set: show, take };
}

// The first image on the clipboard of a paste event, or null.
export function pastedImage(event) {
  for (const item of event.clipboardData?.items || []) {
    if (item.kind === "file" && item.type.startsWith("image/")) return item.getAsFile();
  }
  return null;
}

function canvasBlob(canvas) {
  return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
}

// The image flipped left to right, as a PNG (a classic CLIP-blind candidate: orientation).
export async function mirror(picked) {
  const img = await picked.element();
  const canvas = h("canvas", { width: img.naturalWidth, height: img.naturalHeight });
  const ctx = canvas.getContext("2d");
  ctx.translate(img.naturalWidth, 0);
  ctx.scale(-1, 1);
  ctx.drawImage(img, 0, 0);
  const stem = picked.name.replace(/\.[^.]+$/, "");
  return new PickedImage(await canvasBlob(canvas), `${stem} (mirrored).png`);
}

// A drawn test card (a red disc on one side, a blue bar), for trying the page without a photo.
export async function testCard(side = "left") {
  const canvas = h("canvas", { width: 320, height: 240 });
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, 320, 240);
  ctx.fillStyle = "#dc1414";
  ctx.beginPath();
  ctx.arc(side === "left" ? 80 : 240, 110, 50, 0, 2 * Math.PI);
  ctx.fill();
  ctx.fillStyle = "#1414c8";
  ctx.fillRect(0, 205, 320, 35);
  return new PickedImage(await canvasBlob(canvas), `test card (disc ${side}).png`);
}

// The part of the image the encoders see, as the server's preprocessing makes it: the centre
// square ("crop", CLIP's processor) or the image padded to a square ("pad", LLaVA's expand2square).
export function encoderView(img, aspect) {
  const w = img.naturalWidth;
  const h2 = img.naturalHeight;
  if (aspect === "pad") {
    const side = Math.max(w, h2);
    return { sx: 0, sy: 0, sw: w, sh: h2, side, dx: Math.floor((side - w) / 2), dy: Math.floor((side - h2) / 2) };
  }
  const side = Math.min(w, h2);
  return { sx: Math.floor((w - side) / 2), sy: Math.floor((h2 - side) / 2), sw: side, sh: side, side, dx: 0, dy: 0 };
}

// Cosine -> colour: red (different) through amber to green (alike).
export function heatColour(value, alpha = 0.6) {
  const v = Math.max(-1, Math.min(1, value));
  const t = (v + 1) / 2; // 0: opposite, 0.5: orthogonal, 1: the same
  const hue = Math.round(Math.max(0, Math.min(1, (t - 0.5) * 2)) * 120);
  return `hsla(${hue}, 85%, 45%, ${alpha})`;
}

// An image of the encoders' square view with the per-patch cosine map laid over it.
export async function heatMap(picked, grid, aspect, label, size = 224) {
  const img = await picked.element();
  const canvas = h("canvas", { width: size, height: size, class: "heat", role: "img", "aria-label": label });
  const ctx = canvas.getContext("2d");
  const view = encoderView(img, aspect);
  const scale = size / view.side;
  ctx.fillStyle = "rgb(122,116,104)"; // CLIP's mean, the pad colour
  ctx.fillRect(0, 0, size, size);
  ctx.drawImage(img, view.sx, view.sy, view.sw, view.sh, view.dx * scale, view.dy * scale, view.sw * scale,
    view.sh * scale);
  const rows = grid.length;
  const cols = rows ? grid[0].length : 0;
  for (let r = 0; r < rows; r += 1) {
    for (let c = 0; c < cols; c += 1) {
      ctx.fillStyle = heatColour(grid[r][c]);
      const x0 = Math.round((c * size) / cols);
      const y0 = Math.round((r * size) / rows);
      ctx.fillRect(x0, y0, Math.round(((c + 1) * size) / cols) - x0, Math.round(((r + 1) * size) / rows) - y0);
    }
  }
  return canvas;
}

export function heatLegend() {
  const stops = [-1, -0.5, 0, 0.5, 1];
  return h("div", { class: "legend", "aria-hidden": "true" },
    h("span", { text: "different" }),
    h("span", { class: "legend-scale" }, stops.map((v) => {
      const swatch = h("span", { class: "swatch", text: v.toFixed(1) });
      swatch.style.background = heatColour(v, 1);
      return swatch;
    })),
    h("span", { text: "alike (per-patch cosine)" }));
}

export function wirePaste(root, handler) {
  document.addEventListener("paste", (event) => {
    if (root.hidden) return;
    const file = pastedImage(event);
    if (file) {
      event.preventDefault();
      handler(file);
    }
  });
}
