"""The retriever a server process serves, swapped for a new build without failing a request.

A reload loads the config and the build it names into a new ``Retriever`` in the background
(warm-up included) while the old one keeps serving; the swap is one assignment under a lock.
Requests that started on the old retriever finish on it: each request holds its generation
(``use``), and the old retriever is closed only once the last of them has left, so a source is
never closed under a running query. One store outlives every generation: live history and
counters are not lost on reload.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from retrieval.artifacts import resolve_build
from retrieval.config import RetrievalConfig, load_config
from retrieval.errors import RetrievalError
from retrieval.metrics import MetricsSink
from retrieval.online.retriever import Retriever, make_store
from retrieval.store import Store

__all__ = ["Generation", "NotReady", "RetrieverHolder"]

logger = logging.getLogger("retrieval.serve")

_RETIRE_WAIT_S = 30.0  # longest an old build waits for its requests before it is closed anyway


class NotReady(RetrievalError):
    """No retriever is loaded yet (or the server is shutting down)."""


class Generation:
    """One loaded retriever and how many requests are on it."""

    def __init__(self, retriever: Retriever, number: int) -> None:
        self.retriever = retriever
        self.number = number
        self.in_flight = 0
        self.loaded_at = time.time()


class RetrieverHolder:
    """Loads, serves and reloads the retriever for ``config_path``."""

    def __init__(
        self,
        config_path: str | Path,
        *,
        metrics: MetricsSink | None = None,
        watch_s: float = 2.0,
    ) -> None:
        self.config_path = Path(config_path)
        self.config: RetrievalConfig = load_config(self.config_path)
        self.metrics = metrics
        self.store: Store = make_store(self.config)
        self.last_error: str | None = None
        self.reloads = 0
        self._current: Generation | None = None
        self._lock = threading.Condition()
        self._reload_lock = threading.Lock()
        self._again = False
        self._closing = False
        self._watch_s = watch_s
        self._stop = threading.Event()

    # -- lifecycle ----------------------------------------------------------------------------

    def load(self) -> None:
        """The first load, on the caller's thread (readiness waits for it and its warm-up)."""
        self._swap(self._new_retriever(self.config))
        _freeze_heap()
        if self._watch_s > 0:
            threading.Thread(target=self._watch, name="build-watch", daemon=True).start()

    def close(self, timeout_s: float = 10.0) -> None:
        """Refuse new requests, wait for those in flight, then close the retriever and store."""
        self._stop.set()
        with self._lock:
            self._closing = True
            gen, self._current = self._current, None
        if gen is not None:
            self._retire(gen, timeout_s)
        self.store.close()

    @property
    def ready(self) -> bool:
        return self._current is not None and not self._closing

    @property
    def current(self) -> Generation | None:
        return self._current

    @contextlib.contextmanager
    def use(self) -> Iterator[Retriever]:
        """The current retriever for one request; the generation stays open until it returns."""
        with self._lock:
            gen = self._current
            if gen is None or self._closing:
                raise NotReady("not ready: the build is still loading, or the server is stopping")
            gen.in_flight += 1
        try:
            yield gen.retriever
        finally:
            with self._lock:
                gen.in_flight -= 1
                if gen.in_flight == 0:
                    self._lock.notify_all()

    # -- reload -------------------------------------------------------------------------------

    def reload(self) -> bool:
        """Load the config and its build again and swap them in; False (the old build keeps
        serving, ``last_error`` says why) when the new one does not load. A reload asked for
        while one runs is run once more after it, so the newest build always wins."""
        if not self._reload_lock.acquire(blocking=False):
            self._again = True
            return True
        try:
            ok = True
            while True:
                self._again = False
                ok = self._reload_once()
                if not self._again or self._stop.is_set():
                    return ok
        finally:
            self._reload_lock.release()

    def reload_in_background(self) -> None:
        threading.Thread(target=self.reload, name="reload", daemon=True).start()

    def _reload_once(self) -> bool:
        started = time.monotonic()
        gc.unfreeze()  # the old build's objects become collectable again once it is closed
        try:
            config = load_config(self.config_path)
            if config.store != self.config.store:
                logger.warning(
                    "the store section changed; it applies at the next restart, not on reload"
                )
            retriever = self._new_retriever(config)
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            logger.error("reload failed; still serving the previous build: %s", self.last_error)
            return False
        if self._stop.is_set():
            retriever.close()
            return False
        self.config = config
        old = self._swap(retriever)
        self.last_error = None
        self.reloads += 1
        logger.info(
            "reloaded build %s in %.1f s",
            retriever.build,
            time.monotonic() - started,
            extra={"build": str(retriever.build), "generation": self.reloads},
        )
        if old is not None:
            self._retire(old, _RETIRE_WAIT_S)
        _freeze_heap()
        return True

    def _new_retriever(self, config: RetrievalConfig) -> Retriever:
        return Retriever(config, store=self.store, metrics=self.metrics)

    def _swap(self, retriever: Retriever) -> Generation | None:
        with self._lock:
            if self._closing:  # a reload that finished after the stop began
                retriever.close()
                return None
            old = self._current
            number = 0 if old is None else old.number + 1
            self._current = Generation(retriever, number)
            return old

    def _retire(self, gen: Generation, timeout_s: float) -> None:
        """Close ``gen`` once its last request has left (or after ``timeout_s``)."""
        end = time.monotonic() + timeout_s
        with self._lock:
            while gen.in_flight > 0 and time.monotonic() < end:
                self._lock.wait(timeout=max(0.0, end - time.monotonic()))
            if gen.in_flight:
                logger.warning(
                    "%d requests still on build %s after %.0f s; closing it anyway",
                    gen.in_flight,
                    gen.retriever.build,
                    timeout_s,
                )
        gen.retriever.close()

    def _watch(self) -> None:
        """Reload when the config's ``artifacts`` link points at another build (once per
        target: a build that fails to load is not retried until the link moves again)."""
        tried: Path | None = None
        while not self._stop.wait(self._watch_s):
            gen = self._current
            artifacts = self.config.artifacts
            if gen is None or artifacts is None:
                continue
            try:
                now = resolve_build(self.config.resolve_path(artifacts))
            except OSError:
                continue
            built = gen.retriever.build
            if built is not None and now not in (built, tried) and now.exists():
                tried = now
                logger.info("artifacts now point at %s: reloading", now)
                self.reload()


def _freeze_heap() -> None:
    """Move everything loaded so far out of the collector's sight (``gc.freeze``): a full
    collection then walks only what requests allocate, not the hundreds of thousands of
    objects the libraries and the build hold, so it cannot stall a blend for tens of ms."""
    gc.collect()
    gc.freeze()
