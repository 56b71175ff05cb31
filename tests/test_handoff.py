"""The server's thread → event loop handoff: every item arrives, in order, and a burst put while
the loop is busy costs one wake-up (the narrow mechanism; the API tests stream through it)."""

from __future__ import annotations

import asyncio
import threading

from jupyter_llm.server.handoff import Handoff


def test_items_from_a_thread_arrive_in_order_with_fewer_wake_ups_than_items() -> None:
    async def main() -> tuple[list[int], int]:
        loop = asyncio.get_running_loop()
        handoff = Handoff(loop)
        wakes = 0
        wake = handoff._wake

        def counted() -> None:
            nonlocal wakes
            wakes += 1
            wake()

        handoff._wake = counted  # type: ignore[method-assign]
        burst = threading.Event()

        def produce() -> None:
            for i in range(1000):
                handoff.put(i)
            burst.set()

        thread = threading.Thread(target=produce)
        thread.start()
        burst.wait(10)  # the loop is blocked (busy) while the whole burst is put
        got = [await handoff.get() for _ in range(1000)]
        thread.join()
        await asyncio.sleep(0.01)  # the pending wake-up runs
        return got, wakes

    got, wakes = asyncio.run(main())
    assert got == list(range(1000))
    assert wakes == 1  # the first put's; the others found it pending


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
