// The dock: controls and events for the overlay's stream, for an OBS custom dock or any tab. Every change goes
// over HTTP (PATCH /v1/streams/{id}, POST /v1/streams/{id}/events); the API's own words appear next to the control
// it refused. Now-playing comes from polling the stream every POLL_MS. window.wavecast exposes its state and a log
// of the requests it sent.

import { api, creation, findByName, makeLog, params, sleep, target } from "./client.js";

const $ = (id) => document.getElementById(id);
const bound = target();
const log = makeLog();
const wc = { state: "starting", stream: null, log, events: null, models: null };
window.wavecast = wc;

const POLL_MS = 200;
const THROTTLE_MS = 100; // at most one PATCH of controls per THROTTLE_MS; the latest value wins
const HELD_MS = 1500; // a control the user just moved is not overwritten by a poll meanwhile
const TONICS = ["C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B"];
const MODES = ["major", "minor", "dorian", "mixolydian", "lydian", "phrygian", "locrian"];
const REGISTERS = ["low", "mid", "high"];
const SLIDERS = ["volume", "tempo", "density", "temperature"];

function setState(state) {
  wc.state = state;
  $("waiting").hidden = state !== "waiting" && state !== "ended";
  $("create").hidden = state !== "waiting";
  $("panel").hidden = state !== "ready";
  if (state === "waiting") $("waiting-text").textContent = `waiting for the overlay (${bound.name})…`;
  if (state === "ended") $("waiting-text").textContent = "stream ended";
}

function showError(field, message) {
  const element = $(`error-${field}`);
  if (element) element.textContent = message || "";
}

// One API call, logged with Date.now() and its outcome; a refusal is shown next to `field`.
async function call(method, path, body, field) {
  const entry = log.add("request", { method, path, body });
  try {
    const result = await api(method, path, body);
    entry.status = "ok";
    if (field) showError(field, "");
    return result;
  } catch (e) {
    entry.status = e.status;
    entry.code = e.code;
    if (field) showError(field, e.message);
    throw e;
  }
}

const streamPath = () => `/v1/streams/${encodeURIComponent(wc.stream.id)}`;

// -- controls, throttled --------------------------------------------------------------------------------
const pending = {};
const touched = {}; // control -> Date.now() of the user's last change
let flushTimer = null;
let lastFlush = 0;

function setControl(name, value) {
  pending[name] = value;
  touched[name] = Date.now();
  if (flushTimer) return;
  flushTimer = setTimeout(flush, Math.max(0, lastFlush + THROTTLE_MS - Date.now()));
}

async function flush() {
  flushTimer = null;
  lastFlush = Date.now();
  const controls = { ...pending };
  for (const name of Object.keys(controls)) delete pending[name];
  if (!wc.stream) return;
  try {
    showStream(await call("PATCH", streamPath(), { controls }));
    for (const name of Object.keys(controls)) showError(name, "");
  } catch (e) {
    for (const name of Object.keys(controls)) showError(name, e.message);
  }
}

async function patch(body, field) {
  try {
    showStream(await call("PATCH", streamPath(), body, field));
  } catch {
    // shown next to the control
  }
}

async function sendEvent(event, field) {
  try {
    const result = await call("POST", `${streamPath()}/events`, event, field);
    if (result && result.stream) showStream(result.stream);
  } catch {
    // shown next to the button
  }
}

// -- the page -------------------------------------------------------------------------------------------
function options(select, values, labels = values) {
  select.replaceChildren(...values.map((value, i) => new Option(labels[i], value)));
}

function outputText(name, value) {
  if (name === "volume") return `${Math.round(value)} dB`;
  if (name === "tempo") return `${Math.round(value)}`;
  return Number(value).toFixed(2);
}

function build() {
  options($("tonic"), TONICS);
  options($("mode"), MODES);
  options($("register"), REGISTERS);
  for (const name of SLIDERS) {
    const input = $(name);
    input.addEventListener("input", () => {
      input.nextElementSibling.textContent = outputText(name, input.value);
      setControl(name, Number(input.value));
    });
  }
  $("register").addEventListener("change", () => setControl("register", $("register").value));
  const scale = () => setControl("scale", `${$("tonic").value} ${$("mode").value}`);
  $("tonic").addEventListener("change", scale);
  $("mode").addEventListener("change", scale);
  $("model").addEventListener("change", () => {
    touched.model = Date.now();
    patch({ model: $("model").value }, "model");
  });
  $("composer").addEventListener("change", () => {
    touched.composer = Date.now();
    if ($("composer").value) patch({ composer: $("composer").value }, "composer");
  });
  for (const action of ["play", "pause", "reset"]) {
    $(action).addEventListener("click", () => patch({ action }, "action"));
  }
  $("duck").addEventListener("click", () => sendEvent(
    { type: "duck", db: Number($("duck-db").value), seconds: Number($("duck-seconds").value) }, "duck"));
  $("create").addEventListener("click", async () => {
    try {
      await call("POST", "/v1/streams", creation(bound.name), "create");
    } catch {
      // shown under the button; a 409 means the overlay made it meanwhile, which the next poll finds
    }
  });
}

// What the daemon offers: instruments and composers (and the composer's control ranges), stings and moods.
async function loadChoices() {
  if (!wc.models) {
    const { models } = await call("GET", "/v1/models");
    wc.models = models;
    const instruments = models.filter((m) => m.kind === "instrument").map((m) => m.name);
    options($("model"), instruments);
    const composers = models.filter((m) => m.kind === "composer").map((m) => m.name);
    options($("composer"), ["", ...composers], ["none (plain instrument)", ...composers]);
    const composer = models.find((m) => m.kind === "composer");
    for (const control of (composer && composer.controls) || []) {
      const input = SLIDERS.includes(control.name) && $(control.name);
      if (input && typeof control.min === "number") {
        input.min = control.min;
        input.max = control.max;
      }
    }
  }
  if (!wc.events) {
    try {
      wc.events = await call("GET", "/v1/events", undefined, "sting");
    } catch {
      return; // shown in the stings section; tried again at the next attach
    }
    const button = (kind, item) => {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = item.name;
      b.title = item.description || "";
      b.dataset[kind] = item.name;
      b.addEventListener("click", () => sendEvent({ type: kind, name: item.name }, kind));
      return b;
    };
    $("stings").replaceChildren(...(wc.events.stings || []).map((s) => button("sting", s)));
    $("moods").replaceChildren(...(wc.events.moods || []).map((m) => button("mood", m)));
  }
}

function held(name) {
  return Date.now() - (touched[name] || 0) < HELD_MS || name in pending;
}

function showStream(stream) {
  if (!stream || !stream.id) return;
  wc.stream = stream;
  $("who").textContent = `${stream.name || stream.id} · ${stream.model} v${stream.version}`;
  if (!held("model")) $("model").value = stream.model.split("@")[0];
  if (!held("composer")) $("composer").value = stream.composer || "";
  const controls = stream.controls || {};
  for (const name of SLIDERS) {
    if (name in controls && !held(name)) {
      $(name).value = controls[name];
      $(name).nextElementSibling.textContent = outputText(name, controls[name]);
    }
  }
  if (typeof controls.scale === "string" && !held("scale")) {
    const [tonic, mode] = controls.scale.split(" ");
    $("tonic").value = tonic;
    $("mode").value = mode;
  }
  if (controls.register && !held("register")) $("register").value = controls.register;
  const np = stream.now_playing;
  if (!np) {
    $("note").textContent = stream.model;
    $("meta").textContent = stream.composer ? "" : "plain instrument";
    return;
  }
  const note = np.note;
  $("play").classList.toggle("primary", np.state === "playing");
  $("pause").classList.toggle("primary", np.state === "paused");
  $("note").textContent = np.state === "paused" ? "paused" : note ? note.note : "…";
  $("meta").textContent = [np.key, `${Math.round(np.tempo)} bpm`, note ? `bar ${note.bar}` : ""]
    .filter(Boolean).join(" · ");
}

// Finds the stream (bound or by name), then polls it; back to waiting if a named stream goes away.
async function main() {
  build();
  setState("starting");
  for (;;) {
    try {
      await loadChoices();
      const stream = bound.id ? await api("GET", `/v1/streams/${encodeURIComponent(bound.id)}`)
        : await findByName(bound.name);
      if (!stream) {
        setState("waiting");
        await sleep(1000);
        continue;
      }
      showStream(stream);
      setState("ready");
      for (;;) {
        await sleep(POLL_MS);
        showStream(await api("GET", streamPath()));
      }
    } catch (e) {
      if (e.status === 404 && bound.id) {
        setState("ended");
        return;
      }
      if (e.status === 404 || e.status === 0) {
        // the stream went away (a named one comes back), or the daemon is restarting
        wc.stream = null;
        setState(bound.id ? "starting" : "waiting");
        if (e.status === 0) $("waiting-text").textContent = "the daemon does not answer; retrying…";
      }
      await sleep(1000);
    }
  }
}

main();
