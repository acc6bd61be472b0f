"""LoopMailbox: the engine thread's hand-off of outputs to an event loop."""

import asyncio
import threading

from tandem.engine.mailbox import LoopMailbox


def test_posts_before_the_loop_drains_share_one_wake_up_and_keep_their_order():
    async def main():
        loop = asyncio.get_running_loop()
        wakes = []
        real = loop.call_soon_threadsafe

        def counting(cb, *args):
            wakes.append(cb)
            return real(cb, *args)

        loop.call_soon_threadsafe = counting
        box, a, b = LoopMailbox(loop), asyncio.Queue(), asyncio.Queue()

        def engine():  # the loop is blocked in join() below: nothing drains meanwhile
            for i in range(5):
                box.post([(a, i), (b, -i)])

        thread = threading.Thread(target=engine)
        thread.start()
        thread.join()
        assert len(wakes) == 1
        await asyncio.sleep(0)
        assert [a.get_nowait() for _ in range(5)] == [0, 1, 2, 3, 4]
        assert [b.get_nowait() for _ in range(5)] == [0, -1, -2, -3, -4]
        box.post([(a, "next")])  # drained: the next post wakes the loop again
        assert len(wakes) == 2
        assert await a.get() == "next"

    asyncio.run(main())


def test_a_post_to_a_closed_loop_is_dropped_not_raised():
    loop = asyncio.new_event_loop()
    loop.close()
    LoopMailbox(loop).post([(None, "lost")])
