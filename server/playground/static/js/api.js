// The page's one way to the server: same-origin fetches of the public API, each carrying the
// bearer token (when one is set) in the Authorization header. The token lives in memory, and in
// sessionStorage (this tab only) when the user asks; never in a URL.

const TOKEN_KEY = "mofserve.token";
let token = sessionStorage.getItem(TOKEN_KEY) || "";
const authListeners = [];

export function hasToken() {
  return token !== "";
}

export function setToken(value, remember) {
  token = (value || "").trim();
  if (remember && token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
}

export function forgetToken() {
  setToken("", false);
}

// Called with the ApiError of every 401, so that the page can ask for the token.
export function onAuthNeeded(listener) {
  authListeners.push(listener);
}

const STATUS_WORDS = {
  400: "The server refused the request",
  401: "The server needs a valid bearer token",
  404: "Not found",
  405: "Method not allowed",
  413: "Too large for the server",
  415: "Unsupported content type",
  429: "The server is busy",
  500: "The server failed",
  503: "The server is unavailable (Triton may be restarting)",
  504: "The request ran out of time",
};

export class ApiError extends Error {
  constructor(status, message, { code = null, param = null, retryAfter = null } = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.param = param;
    this.retryAfter = retryAfter;
  }

  // The error in words, as the page shows it: what happened, the server's own message, what to do.
  get words() {
    const head = this.status ? `${STATUS_WORDS[this.status] || "The request failed"} (HTTP ${this.status}` +
      `${this.code ? `, ${this.code}` : ""})` : "Could not reach the server";
    const message = String(this.message).trim();
    const parts = [`${head}: ${message}${/[.!?]$/.test(message) ? "" : "."}`];
    if (this.param) parts.push(`Field: ${this.param}.`);
    if (this.status === 429 || this.status === 503) {
      parts.push(`Try again in ${this.retryAfter || 1} s.`);
    } else if (this.status === 401) {
      parts.push("Enter the server's token above.");
    } else if (this.status === 413) {
      parts.push("Pick a smaller image (see the limits on the Server tab).");
    }
    return parts.join(" ");
  }
}

async function errorFrom(response) {
  const retryAfter = Number(response.headers.get("Retry-After")) || null;
  let text = "";
  try {
    text = await response.text();
  } catch (e) {
    text = "";
  }
  let message = text.trim().slice(0, 400) || response.statusText || "no message";
  let code = null;
  let param = null;
  try {
    const body = JSON.parse(text);
    if (body && body.error) {
      message = body.error.message || message;
      code = body.error.code || null;
      param = body.error.param || null;
    }
  } catch (e) {
    // not JSON (a proxy's page): the text itself
  }
  const error = new ApiError(response.status, message, { code, param, retryAfter });
  if (response.status === 401) authListeners.forEach((listener) => listener(error));
  return error;
}

function headers(extra = {}) {
  const all = { ...extra };
  if (token) all.Authorization = `Bearer ${token}`;
  return all;
}

async function send(path, options) {
  let response;
  try {
    response = await fetch(path, { ...options, headers: headers(options.headers), cache: "no-store" });
  } catch (error) {
    throw new ApiError(0, String(error.message || error));
  }
  if (!response.ok) throw await errorFrom(response);
  return response;
}

export async function getJSON(path) {
  return (await send(path, { method: "GET" })).json();
}

export async function getText(path) {
  return (await send(path, { method: "GET" })).text();
}

export async function postJSON(path, body, signal) {
  const response = await send(path, {
    method: "POST", body: JSON.stringify(body), headers: { "Content-Type": "application/json" }, signal,
  });
  return response.json();
}

// A chat completion, streamed: onDelta(text) for each piece of the answer as the model writes it;
// resolves with {content, finish_reason, mofserve, usage}. A server that answers without streaming
// (JSON) is read whole. An error before the stream starts keeps its HTTP status; one after it
// arrives as an SSE "error" event, thrown as an ApiError with the status of its code.
export async function chatStream(body, onDelta, signal) {
  const response = await send("/v1/chat/completions", {
    method: "POST",
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
    headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
    signal,
  });
  const type = response.headers.get("Content-Type") || "";
  if (!type.includes("text/event-stream")) {
    const whole = await response.json();
    const choice = whole.choices[0];
    onDelta(choice.message.content || "");
    return { content: choice.message.content || "", finish_reason: choice.finish_reason, mofserve: whole.mofserve,
      usage: whole.usage };
  }
  const result = { content: "", finish_reason: null, mofserve: null, usage: null };
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let done = false;
  while (!done) {
    const chunk = await reader.read();
    if (chunk.done) break;
    buffer += decoder.decode(chunk.value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message";
      const data = [];
      for (const line of event.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      const payload = data.join("\n");
      if (payload === "[DONE]") {
        done = true;
        break;
      }
      if (!payload) continue;
      const parsed = JSON.parse(payload);
      if (name === "error") {
        const e = parsed.error || {};
        const status = { deadline_exceeded: 504, unavailable: 503, resource_exhausted: 429 }[e.code] || 500;
        throw new ApiError(status, e.message || "the stream failed", { code: e.code, param: e.param });
      }
      if (parsed.usage) result.usage = parsed.usage;
      for (const choice of parsed.choices || []) {
        const text = choice.delta && choice.delta.content;
        if (text) {
          result.content += text;
          onDelta(text);
        }
        if (choice.finish_reason) result.finish_reason = choice.finish_reason;
      }
      if (parsed.mofserve) result.mofserve = parsed.mofserve;
    }
  }
  if (!done && !result.mofserve) throw new ApiError(0, "the answer's stream ended before the answer was complete");
  return result;
}
