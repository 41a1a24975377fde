// Shared by the overlay and the dock: the query parameters, API calls (with the token, if the page has one),
// finding or creating the stream a page is about, and small helpers. No dependencies, no build step.

export const params = new URLSearchParams(location.search);
const token = params.get("token");

// Parameters that are not stream controls; any other parameter of the overlay is sent as a control.
const NOT_CONTROLS = new Set(["stream", "name", "model", "composer", "seed", "token", "fg", "accent", "bg", "size",
  "show", "visual", "janus", "mountpoint"]);
export const DEFAULT_NAME = "overlay";
const NAME = /^[a-z0-9][a-z0-9_-]{0,63}$/;

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status; // 0: the daemon did not answer
    this.code = code;
  }
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// One API call: JSON in and out; a non-2xx answer or no answer at all throws an ApiError with the API's words.
export async function api(method, path, body, { timeout = 8000 } = {}) {
  const headers = {};
  if (token) headers.Authorization = `Bearer ${token}`;
  const init = { method, headers, cache: "no-store", signal: AbortSignal.timeout(timeout) };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json"; // the daemon parses only JSON bodies (a CSRF guard)
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch {
    throw new ApiError(0, "unreachable", "the daemon does not answer");
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    // an empty or non-JSON body: reported below by status
  }
  if (!response.ok) {
    const error = (data && data.error) || {};
    throw new ApiError(response.status, error.code || `http_${response.status}`,
      error.message || `${response.status} ${response.statusText}`);
  }
  return data;
}

// What the page is about: a stream id (bound), or a stream name (found, or made from the parameters).
export function target() {
  const id = params.get("stream");
  if (id) return { id };
  const name = (params.get("name") || DEFAULT_NAME).toLowerCase();
  return { name: NAME.test(name) ? name : DEFAULT_NAME };
}

// The live stream called `name`, or null. Filtered here too, in case a daemon ignores ?name=.
export async function findByName(name) {
  const list = await api("GET", `/v1/streams?name=${encodeURIComponent(name)}`);
  return (list.streams || []).find((s) => s.name === name && s.state !== "failed") || null;
}

// The body of POST /v1/streams that the query parameters describe (model, composer, seed, controls).
export function creation(name) {
  const body = { model: params.get("model") || "violin", name };
  const composer = params.get("composer") ?? "folk";
  if (composer && composer !== "none") body.composer = composer;
  const seed = params.get("seed");
  if (seed !== null && /^[0-9]{1,18}$/.test(seed)) body.seed = Number(seed);
  const controls = {};
  for (const [key, value] of params) {
    if (NOT_CONTROLS.has(key)) continue;
    // numbers as numbers ("120"), everything else as text ("A minor", "high", "3/4")
    controls[key] = value.trim() !== "" && Number.isFinite(Number(value)) ? Number(value) : value;
  }
  if (Object.keys(controls).length) body.controls = controls;
  return body;
}

// The stream called `name`: the live one, else a new one made from the parameters. A 409 means another page
// made it meanwhile: that one is used.
export async function findOrCreate(name) {
  const found = await findByName(name);
  if (found) return found;
  try {
    return await api("POST", "/v1/streams", creation(name));
  } catch (e) {
    if (e.status !== 409) throw e;
    const other = await findByName(name);
    if (!other) throw e;
    return other;
  }
}

// "AI-generated music · violin v1 · folk v1 · seed 7 · watermarked" (the last part when the stream's provenance
// says it carries the daemon's watermark)
export function credit(stream) {
  const parts = ["AI-generated music", `${stream.model} v${stream.version}`];
  if (stream.composer) parts.push(`${stream.composer} v${stream.composer_version}`);
  parts.push(`seed ${stream.seed}`);
  if (stream.provenance?.watermark.on) parts.push("watermarked");
  return parts.join(" · ");
}

// A log that keeps the last `max` entries, each stamped with Date.now(); add() returns the entry it made.
export function makeLog(max = 4000) {
  const log = [];
  log.add = (type, fields = {}) => {
    const entry = { t: Date.now(), type, ...fields };
    log.push(entry);
    if (log.length > max) log.splice(0, log.length - max);
    return entry;
  };
  return log;
}
