"""Rank 0's log in the step's log, as a stream.

:class:`LogFollower` reads one pod's container log with ``follow=True`` in a thread. When the
stream ends while the job runs (the kubelet rotated the file, the container restarted, the
connection dropped) it reconnects with ``since_seconds`` and ``timestamps=True`` and skips what it
already printed, by timestamp. :class:`Collapser` turns carriage-return progress (tqdm) into one
line every ``progress_every`` seconds instead of one per update.
"""

from __future__ import annotations

import codecs
import math
import threading
import time
from collections.abc import Callable, Iterable


class Collapser:
    """Complete lines through, ``\\r`` updates at most one per ``every`` seconds (the latest)."""

    def __init__(self, emit: Callable[[str], None], every: float = 30.0, clock=time.monotonic):
        self.emit, self.every, self.clock = emit, every, clock
        self.pending = ""  # the line being written
        self.last_progress = -math.inf

    def feed(self, text: str) -> None:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            segments = [s for s in line.split("\r") if s.strip()]
            self.emit(segments[-1] if segments else "")  # a bar's final state, or a plain line
        if "\r" in self.pending:
            done, _, self.pending = self.pending.rpartition("\r")
            segments = [s for s in done.split("\r") if s.strip()]
            if segments and (now := self.clock()) - self.last_progress >= self.every:
                self.emit(segments[-1])
                self.last_progress = now
            self.pending = "\r" + self.pending  # the update being written, still incomplete

    def flush(self) -> None:
        segments = [s for s in self.pending.split("\r") if s.strip()]
        if segments:
            self.emit(segments[-1])
        self.pending = ""


def split_timestamp(line: str) -> tuple[str, str]:
    """``2026-12-02T10:00:00.123456789Z text`` (``timestamps=True``) -> (stamp, text)."""
    stamp, sep, text = line.partition(" ")
    if sep and stamp[:4].isdigit() and "T" in stamp:
        return stamp, text
    return "", line


def _since_seconds(last_seen_wall: float | None, now: float) -> int | None:
    if last_seen_wall is None:
        return None
    return max(1, math.ceil(now - last_seen_wall) + 1)


class LogFollower:
    """Follow one container's log until :meth:`stop`; each reconnect starts ``since`` the last
    line printed (a few seconds' overlap, dropped by timestamp)."""

    def __init__(
        self,
        open_stream: Callable[[int | None], Iterable[bytes]],
        emit: Callable[[str], None],
        progress_every: float = 30.0,
        reconnect_seconds: float = 2.0,
    ):
        self.open_stream = open_stream  # since_seconds -> chunks of the log with timestamps
        self.collapser = Collapser(emit, progress_every)
        self.reconnect_seconds = reconnect_seconds
        self.last_stamp = ""  # RFC 3339 with nanoseconds: ordered as strings in one zone
        self.last_seen_wall: float | None = None
        self.reconnects = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reset()

    def start(self) -> LogFollower:
        self._thread = threading.Thread(target=self.run, daemon=True, name="log-follower")
        self._thread.start()
        return self

    def stop(self, seconds: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(seconds)
        self.collapser.flush()

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                stream = self.open_stream(_since_seconds(self.last_seen_wall, time.time()))
                for chunk in stream:
                    self._feed(chunk)
                    if self._stop.is_set():
                        break
            except Exception:  # not started yet, rotated, restarting, dropped: again
                pass
            finally:
                self._reset()  # a line cut by the disconnect comes again, whole
            if not self._stop.wait(self.reconnect_seconds):
                self.reconnects += 1

    def _reset(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._text, self._at_start, self._stamp, self._skip = "", True, "", False
        self.collapser.pending = ""

    def _feed(self, chunk: bytes) -> None:
        self._text += self._decoder.decode(chunk)
        while self._text:
            if self._at_start:  # a line begins with its timestamp and a space
                space, newline = self._text.find(" "), self._text.find("\n")
                if space < 0 and newline < 0:
                    return  # the timestamp is still arriving
                if space >= 0 and (newline < 0 or space < newline):
                    stamp, text = split_timestamp(self._text)
                    if stamp:
                        self._stamp, self._text = stamp, text
                        self._skip = stamp <= self.last_stamp  # printed before a reconnect
                self._at_start = False
            newline = self._text.find("\n")
            piece = self._text if newline < 0 else self._text[: newline + 1]
            self._text = "" if newline < 0 else self._text[newline + 1 :]
            if not self._skip:
                self.collapser.feed(piece)
                self.last_seen_wall = time.time()
            if newline >= 0:
                self.last_stamp = max(self.last_stamp, self._stamp)
                self._at_start, self._skip = True, False


def pod_log_stream(core, namespace: str, pod: str, container: str):
    """``open_stream`` for :class:`LogFollower` from a ``CoreV1Api``."""

    def open_stream(since_seconds: int | None) -> Iterable[bytes]:
        kwargs = {"since_seconds": since_seconds} if since_seconds else {}
        response = core.read_namespaced_pod_log(
            pod, namespace, container=container, follow=True, timestamps=True,
            _preload_content=False, **kwargs,
        )  # fmt: skip
        try:
            yield from response.stream(4096, decode_content=True)
        finally:
            response.release_conn()

    return open_stream
