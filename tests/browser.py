"""Playwright helpers for the browser tests: Debian's chromium, headless, with the flags WebRTC on loopback needs,
and a record of every request a page makes.

Chromium is the system's (`apt-get install chromium`); Playwright only drives it (`executable_path`), so nothing
is downloaded (never `playwright install`). Audio: headless Chromium plays the page's <audio> element without a
sound device (it falls back to a fake output), and the page's AnalyserNode, fed by a MediaStreamAudioSourceNode of
the same remote stream, sees the samples; nothing else is needed (the element even plays muted: Playwright starts
headless chromium with --mute-audio, which silences the output, not what Web Audio analyses).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from playwright.sync_api import Browser, Page, Playwright, sync_playwright

# --allow-loopback-in-peer-connection: offer 127.0.0.1 candidates; without WebRtcHideLocalIpsWithMdns disabled,
# Chromium in a loopback-only namespace gathers no ICE candidate at all.
CHROMIUM_ARGS = ["--no-sandbox", "--allow-loopback-in-peer-connection",
                 "--disable-features=WebRtcHideLocalIpsWithMdns", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
AUTOPLAY = "--autoplay-policy=no-user-gesture-required"
# A normal tab's policy: audio waits for a click. Headless chromium would otherwise allow it without the flag.
NO_AUTOPLAY = "--autoplay-policy=document-user-activation-required"


def chromium_path() -> str:
    path = shutil.which("chromium")
    if path is None:
        raise RuntimeError("the browser tests need Debian's chromium: apt-get install chromium fonts-dejavu-core "
                           "(.ci/run installs it as root); Playwright drives it, nothing is downloaded")
    return path


@contextmanager
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as p:
        yield p


def launch(p: Playwright, autoplay: bool = True) -> Browser:
    """Headless chromium; without `autoplay`, a page may not play audio before a click (a normal tab).

    Playwright mutes headless chromium (--mute-audio), and muted media may always autoplay: the no-autoplay browser
    is launched without it, so that it behaves as a tab with sound would."""
    return p.chromium.launch(executable_path=chromium_path(), headless=True,
                             args=[*CHROMIUM_ARGS, AUTOPLAY if autoplay else NO_AUTOPLAY],
                             ignore_default_args=[] if autoplay else ["--mute-audio"])


@dataclass
class Recorded:
    """A page and what it did: every URL it requested, its console errors and uncaught exceptions."""

    page: Page
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    navigations: list[str] = field(default_factory=list)
    jitter_ms: float | None = None  # the page's jitter buffer when a test last looked

    def hosts(self) -> set[str]:
        """host:port of every request but data: and blob: URLs (which never leave the page)."""
        return {urlsplit(u).netloc for u in self.requests if urlsplit(u).scheme not in ("data", "blob")}

    def js(self, expression: str, arg: object = None) -> object:
        return self.page.evaluate(expression, arg)

    def wait(self, expression: str, timeout: float = 10, arg: object = None) -> object:
        """Wait until the JS expression is truthy (`arg` is `arg` there); its value. Made a function: the pages'
        Content-Security-Policy forbids eval, which Playwright would use for a bare expression."""
        return self.page.wait_for_function(f"(arg) => ({expression})", arg=arg, timeout=timeout * 1000,
                                           polling=50).json_value()


# Headless chromium 156 lets media play without a click even with the policy above and without --mute-audio (measured:
# audio.play() resolves; navigator.userActivation even says the page was clicked), so a test of the blocked case also
# makes play() refuse as a normal tab does, with the same NotAllowedError, until the page gets a real (trusted) click.
REFUSE_AUTOPLAY = """
let clicked = false;
addEventListener("pointerdown", (e) => { if (e.isTrusted) clicked = true; }, true);
const play = HTMLMediaElement.prototype.play;
HTMLMediaElement.prototype.play = function () {
  if (!clicked) {
    return Promise.reject(new DOMException("play() failed because the user didn't interact with the document first.",
                                           "NotAllowedError"));
  }
  return play.call(this);
};
"""


def open_page(browser: Browser, url: str, width: int = 800, height: int = 200, init_script: str | None = None
              ) -> Recorded:
    page = browser.new_page(viewport={"width": width, "height": height})
    if init_script:
        page.add_init_script(init_script)
    rec = Recorded(page)
    page.on("request", lambda r: rec.requests.append(r.url))
    page.on("pageerror", lambda e: rec.errors.append(f"uncaught: {e}"))
    page.on("console", lambda m: rec.errors.append(f"console: {m.text}") if m.type == "error" else None)
    page.on("framenavigated", lambda f: rec.navigations.append(f.url) if f == page.main_frame else None)
    page.goto(url)
    return rec


# The overlay's level, pitch and now-playing every `every` ms for `ms` ms, taken in the page (a round trip from the test
# per sample is too slow on a loaded machine), stamped with the page's clock.
SAMPLES = """async ([ms, every]) => {
  const out = [], end = Date.now() + ms;
  while (Date.now() < end) {
    out.push({t: Date.now(), db: wavecast.level(), hz: wavecast.pitch(), np: wavecast.nowPlaying});
    await new Promise((resolve) => setTimeout(resolve, every));
  }
  return out;
}"""


def sample(rec: Recorded, seconds: float, every: float = 0.05) -> list[dict]:
    """The overlay's level (dBFS), pitch (Hz or None) and last now_playing every `every` s for `seconds`."""
    return rec.js(SAMPLES, [seconds * 1000, every * 1000])


def history(rec: Recorded) -> list[dict]:
    """The overlay's log without the notes and telemetry: its states, peer states, drops and connections (what a
    failure message needs)."""
    return rec.js("wavecast.log.filter(e => !['now_playing', 'telemetry'].includes(e.type))")


# -- the screenshots in docs/img: `python3 -m tests.browser docs/img` (inside a loopback-only namespace, as the tests)
def game_background(width: int, height: int):
    """A dusk sky over dark hills: a stand-in for a game, under the transparent overlay."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height))
    d = ImageDraw.Draw(img)
    for y in range(height):
        k = y / height
        d.line([(0, y), (width, y)], fill=(int(28 + 40 * k), int(30 + 18 * k), int(62 - 20 * k)))
    w, h = width, height
    d.polygon([(0, h), (0, h * 0.55), (w * 0.2, h * 0.4), (w * 0.45, h * 0.62), (w * 0.7, h * 0.35), (w, h * 0.58),
               (w, h)], fill=(20, 26, 34))
    d.polygon([(0, h), (0, h * 0.8), (w * 0.3, h * 0.7), (w * 0.6, h * 0.85), (w, h * 0.72), (w, h)], fill=(12, 15, 20))
    for i in range(40):
        x, y = (i * 197) % w, (i * 53) % int(h * 0.45)
        d.ellipse([x, y, x + 2, y + 2], fill=(220, 220, 240))
    return img


def screenshots(out: str) -> None:
    """overlay.png (800x200, over a game-like background) and dock.png (400x700) from a real daemon and chromium."""
    import io
    import tempfile
    import time
    from pathlib import Path

    from PIL import Image

    from tests.conftest import start_server, stop_server

    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(Path(tmp))
        try:
            with playwright() as p:
                browser = launch(p)
                dock = open_page(browser, f"{server.url}/dock?name=overlay", 400, 700)
                view = open_page(browser, f"{server.url}/overlay?seed=11&tempo=108&scale=D%20dorian")
                dock.wait("wavecast.state === 'ready'", timeout=20)
                time.sleep(4)
                view.wait("wavecast.level() > -30 && wavecast.nowPlaying && wavecast.nowPlaying.note.midi", timeout=10)
                shot = Image.open(io.BytesIO(view.page.screenshot(omit_background=True))).convert("RGBA")
                scene = Image.alpha_composite(game_background(*shot.size).convert("RGBA"), shot)
                scene.convert("RGB").save(Path(out) / "overlay.png", optimize=True)
                dock.page.screenshot(path=str(Path(out) / "dock.png"))
                browser.close()
        finally:
            stop_server(server)


if __name__ == "__main__":
    import sys

    screenshots(sys.argv[1] if len(sys.argv) > 1 else "docs/img")
