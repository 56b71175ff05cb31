"""The server's thread → event loop handoff: every item arrives, in order, and a burst put while
the loop is busy costs one wake-up of the loop, also across the requests of one loop (the narrow
mechanism; the API tests stream through it)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from jupyter_llm.server.handoff import Handoff


def counting(loop: asyncio.AbstractEventLoop) -> list[int]:
    """Count the loop's call_soon_threadsafe (each one writes to its self-pipe)."""
    calls = [0]
    original = loop.call_soon_threadsafe

    def counted(*args: Any, **kw: Any) -> Any:
        calls[0] += 1
        return original(*args, **kw)

    loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
    return calls


def test_items_from_a_thread_arrive_in_order_with_one_wake_up_per_burst() -> None:
    async def main() -> tuple[list[int], list[int], int]:
        loop = asyncio.get_running_loop()
        calls = counting(loop)
        first, second = Handoff(loop), Handoff(loop)
        burst = threading.Event()

        def produce() -> None:  # as one decode step's chunks for two requests
            for i in range(500):
                first.put(i)
                second.put(-i)
            burst.set()

        thread = threading.Thread(target=produce)
        thread.start()
        burst.wait(10)  # the loop is blocked (busy) while the whole burst is put
        got_first = [await first.get() for _ in range(500)]
        got_second = [await second.get() for _ in range(500)]
        thread.join()
        await asyncio.sleep(0.01)  # the pending wake-up runs
        return got_first, got_second, calls[0]

    got_first, got_second, wakes = asyncio.run(main())
    assert got_first == list(range(500)) and got_second == [-i for i in range(500)]
    assert wakes == 1  # the first put's; every other one found it pending


def test_a_get_waits_for_the_next_put() -> None:
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        handoff = Handoff(loop)
        later = threading.Timer(0.05, handoff.put, args=("late",))
        later.start()
        first = await asyncio.wait_for(handoff.get(), 10)
        handoff.put("next")
        return [first, await asyncio.wait_for(handoff.get(), 10)]

    assert asyncio.run(main()) == ["late", "next"]
