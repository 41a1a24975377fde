// A small client of Janus's HTTP API (https://janus.conf.meetecho.com/docs/rest.html), our own: a session with one
// handle on a plugin, requests to the plugin, the session's events from a long poll, a keepalive, and destroy. The
// overlay plays a Streaming-plugin mountpoint with it (overlay.js). No dependencies, no build step.

const KEEPALIVE_MS = 25000; // Janus ends a session after session_timeout (60 s by default) without a request
const REQUEST_TIMEOUT_MS = 5000; // a request, and an asynchronous request's event
const POLL_TIMEOUT_MS = 45000; // Janus answers a long poll within 30 s (a keepalive event when nothing happened)

export class JanusError extends Error {
  constructor(message, code = null) {
    super(message);
    this.code = code; // Janus's or the plugin's error code; null when Janus did not answer, or not as Janus
  }
}

let transactions = 0;
const transaction = () => `wc-${Date.now().toString(36)}-${(transactions += 1)}`;

export class Janus {
  constructor(url) {
    this.url = url.replace(/\/+$/, "");
    this.session = null;
    this.handle = null;
    this.pending = new Map(); // transaction -> {resolve, reject}: asynchronous requests waiting for their event
    this.poller = null; // the long poll's AbortController
    this.timer = null;
    this.onevent = () => {}; // every event that answers no request of ours (hangup, webrtcup, the plugin's own)
    this.onlost = () => {}; // the long poll failed (a JanusError): Janus went away, or ended the session
  }

  // Create a session, attach a handle to `plugin`, start the long poll and the keepalive.
  async connect(plugin) {
    this.session = (await this.post("", { janus: "create" })).data.id;
    this.handle = (await this.post(`/${this.session}`, { janus: "attach", plugin })).data.id;
    this.timer = setInterval(() => this.post(`/${this.session}`, { janus: "keepalive" }).catch(() => {}), KEEPALIVE_MS);
    this.poll();
  }

  // A request to the plugin: {data, jsep} of its answer, or of the event that answers it when the plugin answers
  // asynchronously (watch, start). The plugin's refusal throws a JanusError with its error code.
  async request(body, jsep) {
    const tx = transaction();
    const event = new Promise((resolve, reject) => {
      this.pending.set(tx, { resolve, reject });
      setTimeout(() => {
        if (this.pending.delete(tx)) reject(new JanusError(`Janus at ${this.url} did not answer '${body.request}'`));
      }, REQUEST_TIMEOUT_MS);
    });
    event.catch(() => {}); // awaited below only when the answer is asynchronous
    let answer;
    try {
      answer = await this.post(`/${this.session}/${this.handle}`, { janus: "message", body, jsep }, { tx });
    } catch (e) {
      this.pending.delete(tx);
      throw e;
    }
    if (answer.janus === "ack") answer = await event;
    else this.pending.delete(tx);
    const data = answer.plugindata?.data ?? {};
    if (data.error_code !== undefined) {
      throw new JanusError(`${data.error || "the plugin refused"} (Janus error ${data.error_code})`, data.error_code);
    }
    return { data, jsep: answer.jsep };
  }

  // End the session (Janus drops its handle and peer connection at once, not 60 s later). Safe to call on
  // `pagehide`: the request is sent with keepalive, so it outlives the page.
  destroy() {
    clearInterval(this.timer);
    this.poller?.abort();
    for (const { reject } of this.pending.values()) reject(new JanusError("the Janus session was closed"));
    this.pending.clear();
    const session = this.session;
    this.session = this.handle = null;
    if (session !== null) this.post(`/${session}`, { janus: "destroy" }, { keepalive: true }).catch(() => {});
  }

  async poll() {
    const session = this.session;
    while (this.session === session) {
      this.poller = new AbortController();
      let events;
      try {
        const signal = AbortSignal.any([this.poller.signal, AbortSignal.timeout(POLL_TIMEOUT_MS)]);
        const response = await fetch(`${this.url}/${session}?maxev=10&rid=${Date.now()}`, { cache: "no-store", signal });
        events = await this.read(response);
      } catch (e) {
        if (this.session === session) {
          this.onlost(e instanceof JanusError ? e : new JanusError(`lost Janus at ${this.url} (no answer)`));
        }
        return;
      }
      for (const event of Array.isArray(events) ? events : [events]) {
        const waiting = this.pending.get(event.transaction);
        if (waiting && event.janus === "event") {
          this.pending.delete(event.transaction);
          waiting.resolve(event);
        } else if (event.janus !== "keepalive") {
          this.onevent(event);
        }
      }
    }
  }

  // POST `body` with a transaction; Janus's answer, or a JanusError that says what is wrong.
  async post(path, body, { tx = transaction(), keepalive = false } = {}) {
    let response;
    try {
      response = await fetch(this.url + path, {
        method: "POST",
        body: JSON.stringify({ ...body, transaction: tx }),
        // text/plain makes it a simple request, without a CORS preflight; Janus reads the body as JSON anyway
        headers: { "Content-Type": "text/plain" },
        cache: "no-store",
        keepalive,
        signal: keepalive ? undefined : AbortSignal.timeout(REQUEST_TIMEOUT_MS),
      });
    } catch {
      throw new JanusError(`Janus does not answer at ${this.url}: check that Janus runs, that its HTTP transport ` +
        "listens there, and the 'janus' URL");
    }
    return this.read(response);
  }

  async read(response) {
    let answer = null;
    try {
      answer = await response.json();
    } catch {
      // not JSON: said below
    }
    if (!response.ok || !answer || typeof answer !== "object") {
      throw new JanusError(`${this.url} answers (HTTP ${response.status}), but not as Janus's HTTP API: check the ` +
        "'janus' URL (it ends with the HTTP transport's base_path, usually /janus)");
    }
    if (answer.janus === "error") {
      const { reason = "Janus refused", code = null } = answer.error ?? {};
      throw new JanusError(`${reason} (Janus error ${code})`, code);
    }
    return answer;
  }
}
