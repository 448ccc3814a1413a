"""Rollback for ADD: every step registers its undo; on failure they run in reverse order."""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger("pycni")


class UndoStack:
    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], object]]] = []

    def push(self, what: str, undo: Callable[[], object]) -> None:
        self._steps.append((what, undo))

    def unwind(self) -> None:
        while self._steps:
            what, undo = self._steps.pop()
            try:
                undo()
                log.info("rolled back: %s", what)
            except Exception:  # keep unwinding: one stuck step must not strand the others
                log.exception("rollback of %s failed", what)
