// The overlay: plays a wavecast stream over WebRTC with the browser's own RTCPeerConnection, shows what it plays
// and draws an audio-reactive visual. Made for an OBS browser source (transparent, sized by the source); it
// reconnects by itself. With ?janus=URL&mountpoint=N it plays that Janus Streaming mountpoint instead, without
// asking the daemon anything. window.wavecast exposes its state and its audio analysis for tests and benches.

import { api, credit, findOrCreate, makeLog, params, sleep, target } from "./client.js";
import { Janus, JanusError } from "./janus.js";

const $ = (id) => document.getElementById(id);
const audio = $("audio");
const canvas = $("visual");
const bound = target(); // {id} (bound to one stream) or {name}
const show = new Set((params.get("show") || "nowplaying,visual,credit").split(",").map((s) => s.trim()));
const visualKind = params.get("visual") === "wave" ? "wave" : "spectrum";
const log = makeLog();
const levels = []; // {t, db}: level() sampled at every animation frame, the last MAX_LEVELS kept
const MAX_LEVELS = 20000;
const SILENCE_DB = -120;
const NO_SUCH_MOUNTPOINT = 455; // the Streaming plugin's error code
const throughJanus = janusSource(); // null: the daemon's stream; {url, id}; or {error} for bad parameters
let current = null; // the session playing now

const wc = {
  state: "starting", stream: null, mountpoint: null, nowPlaying: null, analyser: null, context: null, connects: 0,
  log, levels, level, pitch, spectrum, stats, pc: null,
};
window.wavecast = wc;

function setState(state, text = "") {
  if (wc.state !== state) log.add("state", { state, text });
  wc.state = state;
  // autoplay blocked: the one button and nothing else
  $("start").hidden = state !== "click";
  $("card").hidden = state === "click";
  $("status").textContent = text;
  $("status").hidden = !text;
}

// ?janus=URL&mountpoint=N: the mountpoint to play through Janus, null when neither is given, {error} when wrong.
function janusSource() {
  const [url, id] = [params.get("janus"), params.get("mountpoint")];
  if (url === null && id === null) return null;
  let parsed = null;
  try {
    parsed = new URL(url ?? "");
  } catch {
    // said below
  }
  if (!parsed || !["http:", "https:"].includes(parsed.protocol) || parsed.username || parsed.password) {
    return { error: "'janus' must be the http(s) URL of Janus's HTTP API, e.g. janus=http://HOST:8088/janus" };
  }
  if (!/^[1-9][0-9]*$/.test(id ?? "") || !Number.isSafeInteger(Number(id))) {
    return { error: "'mountpoint' must be the id of a Janus Streaming mountpoint, a whole number from 1, " +
      "e.g. mountpoint=42 (the id POST /v1/streams/ID/publish answered)" };
  }
  return { url: parsed.href, id: Number(id) };
}

// -- theme, from the query ------------------------------------------------------------------------------
function applyTheme() {
  const root = document.documentElement.style;
  for (const [param, variable] of [["fg", "--fg"], ["accent", "--accent"], ["bg", "--bg"]]) {
    const value = params.get(param);
    if (value && CSS.supports("color", value)) root.setProperty(variable, value);
  }
  const size = Number(params.get("size"));
  if (size >= 6 && size <= 200) root.setProperty("--size", `${size}px`);
  // what plays now comes over the daemon's data channel, which a Janus mountpoint does not carry
  $("nowplaying").hidden = !show.has("nowplaying") || throughJanus !== null;
  $("credit").hidden = !show.has("credit");
  canvas.hidden = !show.has("visual");
}

// -- audio analysis -------------------------------------------------------------------------------------
let timeBuffer = null;

function timeData() {
  if (!wc.analyser) return null;
  if (!timeBuffer || timeBuffer.length !== wc.analyser.fftSize) timeBuffer = new Float32Array(wc.analyser.fftSize);
  wc.analyser.getFloatTimeDomainData(timeBuffer);
  return timeBuffer;
}

// RMS of the latest time-domain window (2048 samples, ~43 ms), or of its last `ms` milliseconds, in dB full
// scale; SILENCE_DB for nothing.
function level(ms) {
  const x = timeData();
  if (!x) return SILENCE_DB;
  const n = ms > 0 ? Math.min(x.length, Math.max(1, Math.round((ms * wc.context.sampleRate) / 1000))) : x.length;
  let sum = 0;
  for (let i = x.length - n; i < x.length; i++) sum += x[i] * x[i];
  const rms = Math.sqrt(sum / n);
  return rms > 0 ? Math.max(SILENCE_DB, 20 * Math.log10(rms)) : SILENCE_DB;
}

// The fundamental of the latest window in Hz, or null (silence, or nothing periodic). McLeod's normalised square
// difference: the first peak within 90 % of the highest one, which keeps octave errors (the peak at twice the
// period) rare; parabolic interpolation around it.
function pitch() {
  const x = timeData();
  if (!x || level() < -70) return null;
  const rate = wc.context.sampleRate;
  const n = x.length;
  const maxLag = Math.min(Math.floor(rate / 40), n >> 1);
  const nsdf = new Float32Array(maxLag + 1);
  for (let tau = 0; tau <= maxLag; tau++) {
    let acf = 0;
    let energy = 0;
    for (let i = 0; i + tau < n; i++) {
      acf += x[i] * x[i + tau];
      energy += x[i] * x[i] + x[i + tau] * x[i + tau];
    }
    nsdf[tau] = energy > 0 ? (2 * acf) / energy : 0;
  }
  // the maximum of each positive lobe after the first zero crossing
  const peaks = [];
  let tau = 1;
  while (tau < maxLag && nsdf[tau] > 0) tau++;
  while (tau < maxLag) {
    while (tau < maxLag && nsdf[tau] <= 0) tau++;
    let best = tau;
    while (tau < maxLag && nsdf[tau] > 0) {
      if (nsdf[tau] > nsdf[best]) best = tau;
      tau++;
    }
    if (tau < maxLag) peaks.push(best);
  }
  if (!peaks.length) return null;
  const highest = Math.max(...peaks.map((p) => nsdf[p]));
  if (highest < 0.5) return null;
  const p = peaks.find((q) => nsdf[q] >= 0.9 * highest);
  const [a, b, c] = [nsdf[p - 1], nsdf[p], nsdf[p + 1]];
  const shift = a - 2 * b + c !== 0 ? (0.5 * (a - c)) / (a - 2 * b + c) : 0;
  return rate / (p + shift);
}

// The receiver's figures: jitter buffer delay (ms, average since the last call), samples concealed, packets lost.
let lastJitter = null;
async function stats() {
  if (!wc.pc) return null;
  for (const report of (await wc.pc.getStats()).values()) {
    if (report.type !== "inbound-rtp" || report.kind !== "audio") continue;
    const { jitterBufferDelay: delay = 0, jitterBufferEmittedCount: count = 0 } = report;
    const previous = lastJitter || { delay: 0, count: 0 };
    lastJitter = { delay, count };
    return {
      jitterBufferMs: count > previous.count ? (1000 * (delay - previous.delay)) / (count - previous.count) : null,
      jitterBufferTargetMs: report.jitterBufferTargetDelay && count ? (1000 * report.jitterBufferTargetDelay) / count
        : null,
      concealedSamples: report.concealedSamples, totalSamplesReceived: report.totalSamplesReceived,
      packetsLost: report.packetsLost, packetsReceived: report.packetsReceived, jitter: report.jitter,
    };
  }
  return null;
}

// The analyser's spectrum in dB, one value per bin (sampleRate / fftSize Hz apart).
function spectrum() {
  if (!wc.analyser) return [];
  const out = new Float32Array(wc.analyser.frequencyBinCount);
  wc.analyser.getFloatFrequencyData(out);
  return Array.from(out, (v) => (Number.isFinite(v) ? v : SILENCE_DB));
}

function audioGraph() {
  if (!wc.context) {
    const context = new AudioContext({ latencyHint: "interactive" });
    const analyser = context.createAnalyser();
    analyser.fftSize = 2048;
    analyser.smoothingTimeConstant = 0.7;
    analyser.minDecibels = -80; // the spectrum's bars: empty below this (the codec's noise floor), full at -20 dB
    analyser.maxDecibels = -20;
    // Not connected to the destination: the <audio> element plays the stream; the analyser only listens.
    wc.context = context;
    wc.analyser = analyser;
  }
  return wc.context;
}

// -- drawing, at the display's frame rate ----------------------------------------------------------------
let bytes = null;

function draw() {
  requestAnimationFrame(draw);
  if (wc.analyser) {
    levels.push({ t: Date.now(), db: level() });
    if (levels.length > MAX_LEVELS) levels.splice(0, levels.length - MAX_LEVELS);
  }
  if (canvas.hidden || $("card").hidden) return;
  const ratio = window.devicePixelRatio || 1;
  const width = Math.round(canvas.clientWidth * ratio);
  const height = Math.round(canvas.clientHeight * ratio);
  if (canvas.width !== width || canvas.height !== height) {
    canvas.width = width;
    canvas.height = height;
  }
  const g = canvas.getContext("2d");
  g.clearRect(0, 0, width, height);
  if (!wc.analyser || wc.state !== "playing") return;
  const accent = getComputedStyle(document.documentElement).getPropertyValue("--accent").trim() || "#7dd3fc";
  g.fillStyle = accent;
  g.strokeStyle = accent;
  if (visualKind === "wave") {
    const x = timeData();
    g.lineWidth = 2 * ratio;
    g.globalAlpha = 0.9;
    g.beginPath();
    for (let i = 0; i < x.length; i += 4) {
      const px = (i / (x.length - 1)) * width;
      const py = height / 2 - x[i] * height * 1.5;
      if (i === 0) g.moveTo(px, py);
      else g.lineTo(px, py);
    }
    g.stroke();
    return;
  }
  // spectrum: bars over log-spaced bands from 80 Hz to 10 kHz
  const bins = wc.analyser.frequencyBinCount;
  if (!bytes || bytes.length !== bins) bytes = new Uint8Array(bins);
  wc.analyser.getByteFrequencyData(bytes);
  const hzPerBin = wc.context.sampleRate / wc.analyser.fftSize;
  const bars = Math.max(8, Math.min(96, Math.floor(width / (10 * ratio))));
  const gap = Math.max(1, Math.round(2 * ratio));
  const barWidth = width / bars - gap;
  for (let b = 0; b < bars; b++) {
    const lo = Math.floor((80 * Math.pow(125, b / bars)) / hzPerBin);
    const hi = Math.max(lo + 1, Math.floor((80 * Math.pow(125, (b + 1) / bars)) / hzPerBin));
    let v = 0;
    for (let i = lo; i < hi && i < bins; i++) v = Math.max(v, bytes[i]);
    const h = Math.max(gap, (v / 255) * height);
    g.globalAlpha = 0.55 + 0.45 * (v / 255);
    g.beginPath();
    g.roundRect(b * (barWidth + gap), height - h, barWidth, h, Math.min(barWidth / 2, 3 * ratio));
    g.fill();
  }
  g.globalAlpha = 1;
}

// -- what is playing ------------------------------------------------------------------------------------
function showStream(stream) {
  wc.stream = stream;
  $("credit").textContent = credit(stream);
  $("credit").title = stream.provenance?.statement ?? "";
  if (!stream.composer) {
    $("note").textContent = stream.model;
    $("key").textContent = "";
    $("tempo").textContent = "";
    $("bar").textContent = "";
  } else if (stream.now_playing) {
    showNowPlaying(stream.now_playing);
  }
}

// A mountpoint through Janus: its description says what plays (a wavecast stream's says it is AI-generated).
function showMountpoint(info) {
  wc.mountpoint = info;
  $("credit").textContent = info.description || `Janus mountpoint ${info.id}`;
  $("credit").title = info.description || "";
}

function showNowPlaying(np) {
  const note = np.note;
  $("note").textContent = np.state === "paused" ? "paused" : note ? note.note : "…";
  $("note").classList.toggle("dim", np.state === "paused" || !note || note.midi === null);
  $("key").textContent = np.key || "";
  $("tempo").textContent = np.tempo ? `${Math.round(np.tempo)} bpm` : "";
  $("bar").textContent = note ? `bar ${note.bar}` : "";
}

// -- the connection -------------------------------------------------------------------------------------
async function resolveStream() {
  if (bound.id) return api("GET", `/v1/streams/${encodeURIComponent(bound.id)}`);
  return findOrCreate(bound.name);
}

// Resolves once ICE gathering is complete (aiortc takes no trickled candidates), or after `ms` with what we have.
function iceGathered(pc, ms) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      if (pc.iceGatheringState === "complete") resolve();
    };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, ms);
  });
}

// One connection: resolves with a session once audio and the data channel are up; session.closed resolves
// (with why) when it breaks. Throws (an ApiError, or an Error) if it cannot be made.
async function connect() {
  const stream = await resolveStream();
  showStream(stream);
  const pc = new RTCPeerConnection({ iceServers: [] });
  let drop;
  const session = { pc, source: null, timer: null, lastMessage: Date.now() };
  session.closed = new Promise((resolve) => {
    drop = (why) => {
      log.add("drop", { why });
      resolve(why);
    };
  });
  try {
    pc.addTransceiver("audio", { direction: "recvonly" });
    const channel = pc.createDataChannel("controls"); // before createOffer: the offer must carry SCTP
    session.channel = channel;
    const track = new Promise((resolve) => {
      pc.ontrack = (event) => resolve(event.streams[0] || new MediaStream([event.track]));
    });
    const open = new Promise((resolve) => channel.addEventListener("open", resolve, { once: true }));
    pc.onconnectionstatechange = () => {
      log.add("peer", { state: pc.connectionState });
      if (["failed", "disconnected", "closed"].includes(pc.connectionState)) drop(`peer ${pc.connectionState}`);
    };
    channel.onclose = () => drop("channel closed");
    channel.onmessage = (event) => {
      session.lastMessage = Date.now();
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        return;
      }
      log.add(message.type, message.type === "now_playing" ? { ...message } : { message });
      if (message.type === "now_playing") {
        wc.nowPlaying = message;
        showNowPlaying(message);
      } else if (message.type === "telemetry") {
        refresh(stream.id, session);
      } else if (message.type === "error" || message.type === "stream_failed") {
        drop(message.type === "error" ? message.error.code : "stream_failed");
      }
    };
    await pc.setLocalDescription(await pc.createOffer());
    await iceGathered(pc, 3000);
    const answer = await api("POST", `/v1/streams/${encodeURIComponent(stream.id)}/webrtc`,
      { type: "offer", sdp: pc.localDescription.sdp });
    await pc.setRemoteDescription(answer);
    const media = await Promise.race([Promise.all([track, open]).then(([m]) => m), session.closed,
      sleep(10000).then(() => "timeout")]);
    if (!(media instanceof MediaStream)) throw new Error(`no audio (${media})`);
    listen(session, media);
    // a peer that goes quiet (daemon killed, network gone) is dropped sooner than ICE would notice
    session.timer = setInterval(() => {
      if (Date.now() - session.lastMessage > 4000) drop("no message for 4 s");
    }, 1000);
    log.add("connected", { stream: stream.id });
    return session;
  } catch (e) {
    close(session);
    throw e;
  }
}

// Play `media` and let the analyser hear it: the same for the daemon's stream and a mountpoint through Janus.
function listen(session, media) {
  const context = audioGraph();
  audio.srcObject = media; // Chrome feeds Web Audio from a remote track only while a media element plays it
  session.source = context.createMediaStreamSource(media);
  session.source.connect(wc.analyser);
  wc.pc = session.pc;
  lastJitter = null;
  wc.connects += 1;
}

// One connection through Janus alone: a session with a handle on the Streaming plugin, the mountpoint's `info`
// (its description), `watch` (Janus's offer comes on the long poll), our answer with `start`. Resolves with a
// session as connect() does; throws a JanusError that says what is wrong (no Janus there, no such mountpoint).
async function connectJanus({ url, id }) {
  const janus = new Janus(url);
  const pc = new RTCPeerConnection({ iceServers: [] });
  let drop;
  const session = { pc, janus, source: null, timer: null };
  session.closed = new Promise((resolve) => {
    drop = (why) => {
      log.add("drop", { why });
      resolve(why);
    };
  });
  try {
    await janus.connect("janus.plugin.streaming");
    janus.onlost = (e) => drop(e.message);
    janus.onevent = (event) => {
      log.add("janus", { event: event.janus, reason: event.reason });
      if (event.janus === "hangup" || event.janus === "detached") drop(`Janus: ${event.reason || event.janus}`);
    };
    let info;
    try {
      info = (await janus.request({ request: "info", id })).data.info;
    } catch (e) {
      if (e.code !== NO_SUCH_MOUNTPOINT) throw e;
      throw new JanusError(`Janus at ${url} has no mountpoint ${id}: check 'mountpoint' (the id that POST ` +
        "/v1/streams/ID/publish answered), or publish the stream to it", e.code);
    }
    showMountpoint(info);
    const track = new Promise((resolve) => {
      pc.ontrack = (event) => resolve(event.streams[0] || new MediaStream([event.track]));
    });
    pc.onconnectionstatechange = () => {
      log.add("peer", { state: pc.connectionState });
      if (["failed", "disconnected", "closed"].includes(pc.connectionState)) drop(`peer ${pc.connectionState}`);
    };
    const { jsep: offer } = await janus.request({ request: "watch", id });
    if (!offer) throw new JanusError(`Janus at ${url} sent no offer for mountpoint ${id}`);
    await pc.setRemoteDescription(offer);
    await pc.setLocalDescription(await pc.createAnswer());
    await iceGathered(pc, 3000);
    await janus.request({ request: "start" }, { type: "answer", sdp: pc.localDescription.sdp, trickle: false });
    const media = await Promise.race([track, session.closed, sleep(10000).then(() => "timeout")]);
    if (!(media instanceof MediaStream)) throw new Error(`no audio (${media})`);
    listen(session, media);
    log.add("connected", { janus: url, mountpoint: id });
    return session;
  } catch (e) {
    close(session);
    throw e;
  }
}

let refreshedAt = 0;

// The stream object again now and then (a dock may switch the instrument: the credit follows).
async function refresh(id, session) {
  if (Date.now() - refreshedAt < 3000) return;
  refreshedAt = Date.now();
  try {
    const stream = await api("GET", `/v1/streams/${encodeURIComponent(id)}`);
    if (session.source) showStream(stream);
  } catch {
    // the data channel reports a stream that is gone
  }
}

function close(session) {
  clearInterval(session.timer);
  session.janus?.destroy();
  if (session.source) session.source.disconnect();
  session.source = null;
  try {
    session.pc.close();
  } catch {
    // already closed
  }
}

// Plays the element, or waits for a click where autoplay is not allowed.
async function play() {
  try {
    await audio.play();
    if (wc.context.state !== "running") await wc.context.resume();
    return;
  } catch (e) {
    if (e.name !== "NotAllowedError") throw e;
  }
  setState("click");
  await new Promise((resolve) => $("start").addEventListener("click", resolve, { once: true }));
  setState("starting");
  await wc.context.resume();
  await audio.play();
}

async function main() {
  applyTheme();
  requestAnimationFrame(draw);
  if (throughJanus?.error) {
    setState("error", throughJanus.error);
    return;
  }
  addEventListener("pagehide", () => current?.janus?.destroy());
  setState("starting", "connecting…");
  let delay = 250;
  for (;;) {
    let why;
    try {
      const session = await (throughJanus ? connectJanus(throughJanus) : connect());
      current = session;
      await play();
      setState("playing");
      delay = 250;
      why = await session.closed;
      close(session);
    } catch (e) {
      why = e;
    }
    if (bound.id && why && why.status === 404) {
      setState("ended", "stream ended");
      audio.srcObject = null;
      return;
    }
    if (why instanceof JanusError) {
      setState("error", why.message); // said until it plays: tried again meanwhile
    } else {
      const detail = why && why.status >= 400 && why.status !== 404 ? ` (${why.message})` : "";
      setState("reconnecting", `reconnecting…${detail}`);
    }
    await sleep(delay);
    delay = Math.min(2000, delay * 2);
  }
}

main();
