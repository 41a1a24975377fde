"""Hot swap: the daemon follows the store while it plays.

Every POLL_SECONDS a task reads, off the event loop, which version of each loaded or followed model is
current (a publish makes the new version current, a rollback an older one). When a model that streams
follow has a new current version, that version is checked (the store's gate on its manifest, then the
checksum and graph contract as it loads), warmed on each following stream's own controls, and each of
those streams moves to it with a crossfade (`Engine.swap`); streams pinned to a version (`name@N`) stay.
A version that fails a check is refused once, logged with the reason, and not tried again; its streams
stay where they are. Versions that are not current and that no stream uses any more are unloaded.

Composers are not swapped: a composed stream's instrument follows its model, its composer stays the one
it started with (a new stream gets the new composer).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from wavecast.daemon.api import ApiError
from wavecast.models.store import Entry, gate
from wavecast.streaming.engine import EngineSaturated, Stream, Throttled, describe
from wavecast.streaming.model import ModelError

if TYPE_CHECKING:
    from wavecast.daemon.service import Daemon

log = logging.getLogger("wavecast.swap")
POLL_SECONDS = 1.0


class Follower:
    """The polling task and what it has refused: {(name, version): reason}."""

    def __init__(self, daemon: Daemon, every: float = POLL_SECONDS) -> None:
        self.daemon = daemon
        self.every = every
        self.refused: dict[tuple[str, int], str] = {}
        self._task: asyncio.Task | None = None
        self._errors = Throttled(log)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="wavecast-follow-store")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            try:
                await self.check()
            except Exception as e:  # a store being rewritten under us, say: following goes on next time
                self._errors.error("poll", "following the model store failed: %s; trying again every %.0f s",
                                   describe(e), self.every)

    async def check(self) -> None:
        """One poll: move following streams to their model's current version, unload what nobody uses."""
        engine = self.daemon.engine
        streams = [s for s in list(engine.streams.values()) if s.failure is None]
        followed = {s.manifest.name for s in streams if s.follows}
        names = followed | {name for name, _ in list(engine.groups)} | {name for name, _ in list(engine.composers)}
        current = await asyncio.get_running_loop().run_in_executor(None, self._current, names)
        for name in sorted(followed):
            entry = current.get(name)
            if entry is None or entry.manifest.kind != "instrument":
                continue
            movers = [s for s in streams if s.follows and s.moving is None and s.manifest.name == name
                      and s.manifest.version != entry.manifest.version]
            if movers:
                await self._move(entry, movers)
        self._unload(current)

    def _current(self, names: set[str]) -> dict[str, Entry]:
        """The current version of each of `names` that the store has (blocking: reads the store)."""
        store = self.daemon.store
        models = store.models()
        return {n: models[n][store.current(n, models[n])] for n in names if n in models}

    async def _move(self, entry: Entry, streams: list[Stream]) -> None:
        name, version = entry.manifest.name, entry.manifest.version
        if (name, version) in self.refused:
            return
        problems = gate(entry.manifest.verification, entry.manifest.kind)
        if problems:
            self._refuse(name, version, "it does not pass the store's gate: " + "; ".join(problems))
            return
        try:
            group = await self.daemon.group(f"{name}@{version}")  # checksum and graph contract checked here
        except ApiError as e:  # the model's own words where it is unusable (the API's add "see the log")
            self._refuse(name, version, str(e.__context__) if isinstance(e.__context__, ModelError) else e.message)
            return
        loop = asyncio.get_running_loop()
        for stream in streams:
            if stream.id not in self.daemon.engine.streams:
                continue
            try:
                states = await loop.run_in_executor(None, self.daemon.engine.warm, stream, group)
                self.daemon.engine.swap(stream, group, states)
            except EngineSaturated as e:  # tried again next poll
                log.warning("stream %s stays on version %d of '%s' for now: %s", stream.id, stream.manifest.version,
                            name, e)
            except Exception as e:  # the new version cannot play this stream: it is refused for all
                self._refuse(name, version, str(e))
                return

    def _refuse(self, name: str, version: int, reason: str) -> None:
        self.refused[(name, version)] = reason
        log.error("version %d of model '%s' refused: %s; streams following '%s' stay on the version they play "
                  "(publish a new version or roll back to make another current)", version, name, reason, name)

    def _unload(self, current: dict[str, Entry]) -> None:
        """Ask the engine to unload each version that is not current and that no stream uses (it checks
        again on its own thread, where streams are released)."""
        engine = self.daemon.engine
        for loaded in (engine.groups, engine.composers):
            for (name, version), group in list(loaded.items()):
                entry = current.get(name)
                if entry is not None and entry.manifest.version == version:
                    continue
                if len(group.pool.free) == group.pool.capacity:
                    engine.remove_model(group)
