"""An asyncio event loop on a virtual clock, for replaying timed events exactly.

``loop.time()`` returns virtual seconds; whenever the loop would sleep until
its next timer, the clock jumps straight to that timer instead. Real
callbacks, real ``call_at`` and real tasks run unchanged.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class _JumpingSelector(selectors.DefaultSelector):
    def __init__(self, loop: VirtualTimeLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[Any]:
        if timeout is not None and timeout > 0:
            self._loop.advance_to_next_timer()
        return super().select(0)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self._virtual_now = 0.0
        super().__init__(_JumpingSelector(self))

    def time(self) -> float:
        return self._virtual_now

    def advance_to_next_timer(self) -> None:
        scheduled = self._scheduled  # type: ignore[attr-defined]
        if scheduled:
            self._virtual_now = max(self._virtual_now, scheduled[0].when())


def run_virtual(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``main()`` to completion on a fresh :class:`VirtualTimeLoop` (starting at 0 s).

    For tests of timing rules: ``asyncio.sleep(0.35)`` then lands exactly
    0.35 virtual seconds later, however busy the machine is, so a check can
    sit a millisecond either side of a boundary instead of a wide margin
    against real sleeps.
    """
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
