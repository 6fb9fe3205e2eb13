"""A Faust worker under load whose stream is sought back again and again, for the
processor's seek race (issue 11, finding 6): `python -m tests.seek_storm worker --without-web`.

Environment: SEEK_MODE ("processor": processors.app.seek_stream; "faust": Faust's own
Consumer.seek, which calls the aiokafka consumer from outside its thread), SEEK_TOPIC,
SEEK_BOOTSTRAP, SEEK_COUNT, SEEK_DATADIR. Logs `done seeks=N events=M` once it has sought
SEEK_COUNT times while consuming, and exits 0; a crash of the worker exits non-zero.
"""

import asyncio
import os
import random

import faust
from faust.types import TP

from quotaflow.processors.app import seek_stream

MODE, TOPIC, COUNT = os.environ["SEEK_MODE"], os.environ["SEEK_TOPIC"], int(os.environ["SEEK_COUNT"])
app = faust.App(f"seek-storm-{MODE}-{os.getpid()}", broker=f"kafka://{os.environ['SEEK_BOOTSTRAP']}",
                store="memory://", web_enabled=False, consumer_auto_offset_reset="earliest",
                datadir=os.environ["SEEK_DATADIR"])
topic = app.topic(TOPIC, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
seen = {"events": 0, "seeks": 0}


@app.agent(topic)
async def consume(stream):
    async for batch in stream.take_events(2000, within=0.05):
        seen["events"] += len(batch)


@app.task
async def storm() -> None:
    while seen["seeks"] < COUNT:
        await asyncio.sleep(0.002)
        assigned = [tp for tp in app.consumer.assignment() if tp.topic == TOPIC]
        if not assigned or seen["events"] == 0:
            continue
        tp = random.choice(assigned)
        target = TP(tp.topic, tp.partition), random.randint(0, 5_000)
        if MODE == "processor":
            await seek_stream(app, *target)
        else:
            await app.consumer.seek(*target)
        seen["seeks"] += 1
    print(f"done seeks={seen['seeks']} events={seen['events']}", flush=True)
    os._exit(0)


if __name__ == "__main__":
    app.main()
