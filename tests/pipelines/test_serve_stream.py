"""The endpoint's plumbing between the decode thread and a request: its inbox, and a streamed answer's end."""

from __future__ import annotations

import asyncio
import gc
import threading
import time

from cache_aug.batching import Sequence
from cache_aug.engine import ChoiceEvent
from cache_aug.sampling import SamplingParams
from pipelines.serve import _Inbox, _Stream


def _seqs(n: int = 2) -> list[Sequence]:
    return [Sequence(None, [1], SamplingParams(max_tokens=1), lambda e: False, lambda r, e: None) for _ in range(n)]


def test_the_inbox_delivers_every_event_in_order_with_fewer_wakeups_than_events():
    async def main():
        loop = asyncio.get_running_loop()
        inbox = _Inbox(loop)
        wakeups = [0]
        real = inbox._wake

        def counted():
            wakeups[0] += 1
            real()

        inbox._wake = counted
        n = 5000

        def producer():
            for i in range(n):
                inbox.put(ChoiceEvent(i))
                if i % 97 == 0:
                    time.sleep(0.001)  # lets the consumer catch up now and then: takes race with puts

        threading.Thread(target=producer).start()
        got = []
        while len(got) < n:
            got += [e.index for e in await asyncio.wait_for(inbox.take(), timeout=10)]
        return got, wakeups[0]

    got, wakeups = asyncio.run(main())
    assert got == list(range(5000))
    assert wakeups < 5000


def test_a_streamed_answer_cancels_its_sequences_however_it_ends():
    async def body():
        yield "data: x\n\n"

    async def receive():
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def sent(msg):
        return None

    async def gone(msg):
        raise OSError("client went away")

    scope = {"type": "http", "asgi": {"spec_version": "2.4"}}
    for send in (sent, gone):  # sent in full; the client gone mid-stream
        seqs = _seqs()
        try:
            asyncio.run(_Stream(body(), seqs)(scope, receive, send))
        except Exception as e:  # noqa: BLE001 - Starlette's task group raises it as a group
            assert send is gone, e
        assert all(s.cancelled for s in seqs), send.__name__

    seqs = _seqs()  # never sent: the client left before the response started
    stream = _Stream(body(), seqs)
    assert not any(s.cancelled for s in seqs)
    del stream
    gc.collect()
    assert all(s.cancelled for s in seqs)
