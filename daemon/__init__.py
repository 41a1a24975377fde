"""The daemon: CLI, HTTP API, WebRTC peers, device outputs, the training workers."""

import wavecast.streaming  # noqa: F401  (first: it keeps BLAS on one thread before numpy is imported)
