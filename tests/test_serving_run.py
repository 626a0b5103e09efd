"""engine.Run, the hand-off from a generation's worker thread to the event loop: no event is lost
or reordered, however the worker's puts and the loop's waits interleave, and the server's request
timeout still ends a wait (one timer per run, cancelled when the generation ends)."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest

from orlik.serving.engine import Event, RequestTimeout, Run


def _producer(run: Run, n: int, seed: int) -> threading.Thread:
    rng = random.Random(seed)

    def work() -> None:
        for i in range(n):
            if rng.random() < 0.3:
                time.sleep(rng.random() * 0.002)  # sometimes slower than the loop, sometimes faster
            run.put(Event(text=f"{i},", completion_tokens=i + 1))
        run.put(None)

    return threading.Thread(target=work)


@pytest.mark.parametrize("interval", [0.0, 0.001])
def test_every_event_arrives_once_in_order(interval: float) -> None:
    async def main() -> tuple[str, Run]:
        run = Run(asyncio.get_running_loop(), time.monotonic() + 60, 60)
        th = _producer(run, 2000, seed=int(interval * 1000))
        th.start()
        text = []
        while (ev := await run.next_merged(interval)) is not None:
            text.append(ev.text)
            if random.random() < 0.1:
                await asyncio.sleep(0)  # the loop falls behind now and then: events merge
        th.join()
        return "".join(text), run

    text, run = asyncio.run(main())
    assert text == "".join(f"{i}," for i in range(2000))
    assert run._timer is None or run._timer.cancelled()  # no deadline timer outlives the generation


def test_request_timeout_ends_the_wait_and_cancels_the_worker() -> None:
    async def main() -> tuple[Run, float]:
        run = Run(asyncio.get_running_loop(), time.monotonic() + 0.3, 0.3)
        run.put(Event(text="a"))
        first = await run.next()
        assert first is not None and first.text == "a"
        t0 = time.monotonic()
        with pytest.raises(RequestTimeout, match=r"0\.3 s timeout"):
            await run.next()
        return run, time.monotonic() - t0

    run, waited = asyncio.run(main())
    assert run.cancel.is_set()
    assert waited < 5.0


def test_worker_error_is_raised_in_the_loop() -> None:
    async def main() -> None:
        run = Run(asyncio.get_running_loop(), time.monotonic() + 60, 60)
        threading.Thread(target=lambda: (run.put(Event(text="x")), run.put(ValueError("boom")))).start()
        assert (await run.next()) is not None
        with pytest.raises(ValueError, match="boom"):
            while True:
                await run.next()

    asyncio.run(main())
