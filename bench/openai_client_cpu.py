"""Where a teacher call's client CPU goes: the openai SDK used four ways, then mapd's provider and
dispatcher on top. Against the local test server at 100 ms per call:

    python bench/openai_client_cpu.py [--calls 400] [--rounds 5] [--concurrency 16]

Each line is the client's CPU time per call (median over the rounds; the variants alternate within
each round, so a busy machine slows them alike) with ``--concurrency`` calls in flight through one
warm client: ``chat.completions.create`` or ``client.post("/chat/completions", cast_to=object)``
(plain JSON in and out), each on the SDK's default httpx2 transport and on its aiohttp transport;
then mapd's ``OpenAIProvider.complete`` (post + aiohttp, plus tenacity and reply checks) and
``Dispatcher.complete`` (plus cache, budget, statistics and progress bar). The client runs in a process of its
own, as it would against a remote endpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tests.openai_server

from tests.openai_server import FakeOpenAIServer  # noqa: E402

SDK_WAYS = ("create, httpx2", "create, aiohttp", "post, httpx2", "post, aiohttp")
MAPD_WAYS = ("OpenAIProvider.complete", "Dispatcher.complete")


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Ann has {i} pens and buys 7 more, then gives {i} away. How many now? " * 3}]


async def sdk_calls(way: str, url: str, numbers: range, concurrency: int) -> float:
    import httpx2
    import openai

    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    http = (openai.DefaultAioHttpClient if "aiohttp" in way else openai.DefaultAsyncHttpxClient)(limits=limits)
    client = openai.AsyncOpenAI(base_url=url, api_key="not-needed", max_retries=0, http_client=http)
    slots = asyncio.Semaphore(concurrency)
    settings = {"model": "m", "temperature": 0.8, "top_p": 1.0, "max_tokens": 512}

    async def one(i: int) -> str:
        async with slots:
            if way.startswith("create"):
                reply = await client.chat.completions.create(messages=messages(i), **settings)
                return reply.choices[0].message.content
            reply = await client.post("/chat/completions", body={"messages": messages(i), **settings}, cast_to=object)
            return reply["choices"][0]["message"]["content"]

    await asyncio.gather(*(one(i) for i in range(numbers.start - concurrency, numbers.start)))  # open the pool
    began = time.process_time()
    await asyncio.gather(*(one(i) for i in numbers))
    cpu = time.process_time() - began
    await client.close()
    return cpu


def mapd_calls(way: str, url: str, numbers: range, concurrency: int) -> float:
    from mapd.config import TeacherConfig
    from mapd.llm import Call, CallCache, CallKey, Dispatcher
    from mapd.llm.openai_provider import OpenAIProvider

    def call(i: int) -> Call:
        return Call(CallKey("bench", str(i), "t"), messages(i))

    teacher = TeacherConfig(name="t", model="m", base_url=url, max_concurrency=concurrency)
    warm = range(numbers.start - concurrency, numbers.start)
    if way == "OpenAIProvider.complete":
        async def provider_calls() -> float:
            provider = OpenAIProvider(teacher, "not-needed")
            slots = asyncio.Semaphore(concurrency)

            async def one(i: int) -> None:
                async with slots:
                    assert (await provider.complete(call(i))).text

            await asyncio.gather(*(one(i) for i in warm))
            began = time.process_time()
            await asyncio.gather(*(one(i) for i in numbers))
            cpu = time.process_time() - began
            await provider.aclose()
            return cpu

        return asyncio.run(provider_calls())
    with tempfile.TemporaryDirectory() as tmp, CallCache(Path(tmp) / "cache.sqlite") as cache, \
            Dispatcher([teacher], cache) as dispatcher:
        dispatcher.complete_all([call(i) for i in warm], "warm up")
        began = time.process_time()
        assert all(r.text for r in dispatcher.complete_all([call(i) for i in numbers], "measured").values())
        return time.process_time() - began


def client(url: str, calls: int, rounds: int, concurrency: int) -> None:
    """Runs in the client process: every way once per round, then prints the medians."""
    import mapd.llm.dispatch  # noqa: F401 (imports outside the measurement)

    cpu: dict[str, list[float]] = {way: [] for way in SDK_WAYS + MAPD_WAYS}
    for number, way in enumerate(list(cpu) * rounds):
        numbers = range((number + 1) * 100_000, (number + 1) * 100_000 + calls)  # fresh prompts: no cache hits
        seconds = (asyncio.run(sdk_calls(way, url, numbers, concurrency)) if way in SDK_WAYS
                   else mapd_calls(way, url, numbers, concurrency))
        cpu[way].append(seconds)
    for way, seconds in cpu.items():
        per_call = [s / calls * 1000 for s in seconds]
        print(f"{way:25s} {statistics.median(per_call):5.2f} ms CPU a call "
              f"(rounds: {', '.join(f'{x:.2f}' for x in per_call)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=400, help="Calls per way and round.")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=16, help="Calls in flight.")
    parser.add_argument("--client", help=argparse.SUPPRESS)  # the server's URL: run as the client process
    args = parser.parse_args()
    if args.client:
        return client(args.client, args.calls, args.rounds, args.concurrency)
    with FakeOpenAIServer(latency_s=0.1) as server:
        print(f"{args.calls} calls per way and round, {args.concurrency} in flight, server latency 100 ms")
        subprocess.run([sys.executable, __file__, "--client", server.base_url, "--calls", str(args.calls),
                        "--rounds", str(args.rounds), "--concurrency", str(args.concurrency)],
                       check=True, stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
