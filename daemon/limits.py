"""`Limits`: what one daemon takes at most. Each is a `wavecast serve` flag and a /metrics gauge; this module
stays free of heavy imports, as the CLI reads it to build its flags."""

from __future__ import annotations

from dataclasses import dataclass

from wavecast.streaming.engine import MAX_STREAMS


@dataclass(frozen=True)
class Limits:
    """What one daemon takes at most; each is a `wavecast serve` flag, exported in /metrics."""

    max_streams: int = MAX_STREAMS
    max_peers: int = 256  # WebRTC peer connections, all streams together
    max_peers_per_stream: int = 64
    max_devices: int = 8  # streams playing on sound devices at once
    max_models: int = 16  # model versions loaded at once, instruments and composers together
    stream_rate: float = 10.0  # stream creations a second per client address
    stream_burst: int = 40
    message_rate: float = 100.0  # data-channel messages a second per peer
    message_burst: int = 200
    max_jobs: int = 16  # training jobs queued and running together
    job_concurrency: int = 1  # training jobs that run at once, each a worker process
