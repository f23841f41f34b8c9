"""The worker loop's one place of waiting: the execution pool's pipes and the dispatch inbox."""

from __future__ import annotations

import selectors
from collections.abc import Sequence


class Waiter:
    """Waits on the pool's pipes and the inbox with one epoll selector, built anew only when
    that set changes (a slot was replaced); ``multiprocessing.connection.wait`` would build
    and fill a selector at every turn of the loop."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._watched: list[object] = []

    def wait(self, objects: Sequence[object], timeout: float) -> list[object]:
        """The objects ready to read, after at most ``timeout`` seconds."""
        if len(objects) != len(self._watched) or any(a is not b for a, b in zip(objects, self._watched)):
            self._selector.close()
            self._selector = selectors.DefaultSelector()
            for obj in objects:
                self._selector.register(obj, selectors.EVENT_READ)  # type: ignore[arg-type]
            self._watched = list(objects)
        return [key.fileobj for key, _ in self._selector.select(timeout)]

    def close(self) -> None:
        """Release the selector."""
        self._selector.close()
