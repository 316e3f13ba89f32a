"""Run a function in a forked child process while this process goes on (POSIX).

The child sees this process's memory as it was at the fork (no copies, no
pickling of the arguments); only its return value travels back, pickled through
a pipe. A failing child reports the exception's type name only (a message could
quote header values), or the message of an exception the caller declared safe,
never a traceback on stderr. Where ``fork`` is unavailable
(not POSIX, or inside a daemonic process, e.g. a ``multiprocessing.Pool``
worker, which may not have children) :meth:`ForkedCall.start` returns None and
the caller does the work itself.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from typing import Any


class ForkedCallError(RuntimeError):
    """The child failed, died or did not answer in time (message without details)."""


def _child(send: Any, fn: Callable[..., Any], args: tuple,
           safe_errors: tuple[type[BaseException], ...]) -> None:
    try:
        value = fn(*args)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        send.send(("error", str(exc) if isinstance(exc, safe_errors) else
                   f"the child process failed ({type(exc).__name__})"))
        return
    send.send(("ok", value))


class ForkedCall:
    """``fn(*args)`` running in a forked child; :meth:`result` collects its value."""

    def __init__(self, process: Any, recv: Any) -> None:
        self._process = process
        self._recv = recv

    @classmethod
    def start(cls, fn: Callable[..., Any], *args: Any,
              safe_errors: tuple[type[BaseException], ...] = ()) -> ForkedCall | None:
        """Fork a child that computes ``fn(*args)``; None when this process cannot fork.

        The message of an exception of a ``safe_errors`` type (texts known to hold no
        identifiers) reaches :meth:`result`; of any other, its type name only.

        A fork costs the parent copy-on-write faults on every page it writes while
        the child lives that existed at the fork (a child alive during the envelope
        of a loaded 512×512×300 volume slows it by ≈ 0.15 s): fork before
        allocating much, and keep children short.
        """
        if not hasattr(os, "fork") or multiprocessing.current_process().daemon:
            return None
        ctx = multiprocessing.get_context("fork")
        recv, send = ctx.Pipe(duplex=False)
        process = ctx.Process(target=_child, args=(send, fn, args, safe_errors),
                              daemon=True)
        try:
            process.start()
        except OSError:  # no processes left, or the fork server cannot start
            recv.close()
            send.close()
            return None
        send.close()  # the child holds the writing end: EOF when it dies
        return cls(process, recv)

    def result(self, timeout_s: float = 600.0) -> Any:
        """The child's return value; :class:`ForkedCallError` when it failed (with the
        message ``start`` allows), died or took longer than ``timeout_s`` seconds. The
        child is gone afterwards."""
        try:
            if not self._recv.poll(timeout_s):
                raise ForkedCallError(f"the child process did not answer within {timeout_s:g} s")
            try:
                status, value = self._recv.recv()
            except (EOFError, OSError):
                raise ForkedCallError("the child process died") from None
            if status != "ok":
                raise ForkedCallError(value)
            self._process.join(timeout=5.0)  # it exits once it has answered
            return value
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Stop the child (if still running) and release the pipe."""
        if self._process.is_alive():
            self._process.terminate()
        self._process.join()
        self._recv.close()
