"""Local sound-device outputs through PortAudio (sounddevice). The callback runs on PortAudio's thread."""

from __future__ import annotations

from typing import Any

import numpy as np

from wavecast.streaming.engine import Engine, Stream

BLOCK_FRAMES = 480  # samples per callback: one model frame, 10 ms at 48 kHz


class DeviceError(Exception):
    """A device that cannot be found or opened; the message says what to do next."""


def _sounddevice() -> Any:
    try:
        import sounddevice
    except OSError as e:  # raised when the PortAudio library itself is missing
        raise DeviceError(f"PortAudio is missing ({e}); install it: apt-get install libportaudio2") from None
    return sounddevice


def list_outputs() -> list[dict]:
    sd = _sounddevice()
    default = sd.default.device[1]
    return [
        {"index": i, "name": d["name"], "channels": d["max_output_channels"],
         "default_samplerate": d["default_samplerate"], "default": i == default}
        for i, d in enumerate(sd.query_devices()) if d["max_output_channels"] > 0
    ]


class DeviceOutput:
    """Plays one stream on one output device until closed."""

    def __init__(self, stream: Stream, engine: Engine, device: int | str | None) -> None:
        sd = _sounddevice()
        self.stream = stream
        self.engine = engine
        try:
            info = sd.query_devices(device, "output")
        except (ValueError, sd.PortAudioError):
            names = "; ".join(f"{d['index']}: {d['name']}" for d in list_outputs())
            if not names:
                raise DeviceError("this machine has no sound output that PortAudio can open; check the sound "
                                  "card or ALSA's configuration ('wavecast devices' lists outputs)") from None
            what = "there is no default output device" if device is None else f"no output device is '{device}'"
            raise DeviceError(f"{what}; name one of these by index or name: {names}") from None
        self.device = {"index": info["index"], "name": info["name"]}
        self.channels = min(2, info["max_output_channels"])
        self._block = np.zeros(BLOCK_FRAMES * 4, np.float32)
        self.reader = stream.listen()
        try:
            self._out = sd.OutputStream(
                samplerate=stream.manifest.sample_rate, blocksize=BLOCK_FRAMES, device=info["index"],
                channels=self.channels, dtype="float32", callback=self._callback,
            )
            self._out.start()
        except sd.PortAudioError as e:
            stream.unlisten(self.reader)
            raise DeviceError(f"cannot open output '{self.device['name']}' (PortAudio: {e}); pick another output "
                              "('wavecast devices' lists them)") from None

    def _callback(self, outdata: np.ndarray, frames: int, time: Any, status: Any) -> None:
        block = self._block[:frames] if frames <= len(self._block) else np.zeros(frames, np.float32)
        self.reader.read(block)
        self.engine.notify()
        outdata[:] = block[:, None]

    def info(self) -> dict:
        return {**self.device, "channels": self.channels, "underruns": self.reader.underruns}

    def close(self) -> None:
        self._out.stop()
        self._out.close()
        self.stream.unlisten(self.reader)
