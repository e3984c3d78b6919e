"""Progress on long work: a live bar on a terminal, plain lines in a log.

When stderr is a terminal, a tqdm bar redraws in place. When it is not (a CI log,
``nohup``, ``make demo > log 2>&1``), carriage-return redraws would fill the log with
an unreadable wall, so :class:`PlainProgress` prints one line every ~10 % of the work or
30 s (count, rate, ETA and the shown values) and a summary line at the end.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TypeVar

from tqdm.auto import tqdm

__all__ = ["PlainProgress", "progress_bar", "track"]

T = TypeVar("T")


class PlainProgress:
    """Progress for logs nobody watches live: one plain line every ~10 % of ``total`` or
    ``every_s`` seconds (count, rate, ETA, the shown values), and a summary at the end."""

    def __init__(self, total: int, initial: int, desc: str, stream: Any = None,
                 every_s: float = 30.0, unit: str = "step") -> None:
        self.total, self.n, self.desc, self.unit = total, initial, desc, unit
        self.stream = stream or sys.stderr
        self.every_s, self.start_n = every_s, initial
        self.t0 = self.t_last = time.monotonic()
        self.next_n = initial + max(1, total // 10)
        self.postfix: Mapping[str, Any] = {}

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.n >= self.next_n or now - self.t_last >= self.every_s or self.n == self.total:
            self._line(now)
            self.t_last = now
            self.next_n = self.n + max(1, self.total // 10)

    def set_postfix(self, postfix: Mapping[str, Any], refresh: bool = False) -> None:
        self.postfix = postfix

    def _line(self, now: float) -> None:
        done = self.n - self.start_n
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - self.n) / rate if rate > 0 else math.inf
        shown = " ".join(f"{k}={v}" for k, v in self.postfix.items())
        eta_s = f"{eta:.0f}s" if math.isfinite(eta) else "?"
        pct = 100 * self.n // max(self.total, 1)
        print(f"{self.desc}: {self.unit} {self.n}/{self.total} ({pct}%) {rate:.2f} "
              f"{self.unit}/s ETA {eta_s} {shown}".rstrip(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.n == self.start_n or self.n != self.total:
            return
        elapsed = time.monotonic() - self.t0
        plural = self.unit + ("es" if self.unit.endswith(("s", "ch", "sh", "x")) else "s")
        print(f"{self.desc}: done, {self.n - self.start_n} {plural} in {elapsed:.1f}s",
              file=self.stream, flush=True)


def progress_bar(total: int, *, initial: int = 0, desc: str = "", enabled: bool = True,
                 unit: str = "step", stream: Any = None) -> Any:
    """A live tqdm bar on a terminal; plain progress lines when the stream (stderr) is
    not a terminal (a CI log, ``nohup``, ``> log 2>&1``); nothing when not ``enabled``.
    Both have ``update(n)``, ``set_postfix(dict)`` and ``close()``."""
    stream = stream or sys.stderr
    if enabled and not _isatty(stream):
        return PlainProgress(total, initial, desc, stream, unit=unit)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled,
                dynamic_ncols=True, leave=True, file=stream)


def track(items: Iterable[T], total: int, *, desc: str = "", enabled: bool = True,
          unit: str = "it") -> Iterator[T]:
    """``items`` with a :func:`progress_bar` advanced once per item."""
    bar = progress_bar(total, desc=desc, enabled=enabled, unit=unit)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
