"""asyncio with thousands of tasks in flight: ``asyncio.wrap_future`` and
``loop.run_in_executor`` over 5000 tiny tasks gathered at once, on each
ironpool backend and on the stdlib executor it stands in for, interleaved
in one session (median of 5 rounds, tasks/s).
Run: .venv/bin/python benches/asyncio_inflight.py"""

import asyncio
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import ironpool

N = 5000
ROUNDS = 5


async def gather(pool, how):
    loop = asyncio.get_running_loop()
    began = time.perf_counter()
    if how == "wrap_future":
        await asyncio.gather(*[asyncio.wrap_future(pool.submit(abs, -i)) for i in range(N)])
    else:
        await asyncio.gather(*[loop.run_in_executor(pool, abs, -i) for i in range(N)])
    return N / (time.perf_counter() - began)


def main():
    makers = {
        "ironpool processes": lambda: ironpool.Pool(2),
        "ProcessPoolExecutor": lambda: ProcessPoolExecutor(2),
        "ironpool threads": lambda: ironpool.Pool(2, backend="threads"),
        "ThreadPoolExecutor": lambda: ThreadPoolExecutor(2),
    }
    pools = {name: make() for name, make in makers.items()}
    rates: dict[tuple[str, str], list[float]] = {}
    for pool in pools.values():
        asyncio.run(gather(pool, "wrap_future"))  # warm up: workers started
    for _ in range(ROUNDS):
        for name, pool in pools.items():
            for how in ("wrap_future", "run_in_executor"):
                rates.setdefault((name, how), []).append(asyncio.run(gather(pool, how)))
    for (name, how), got in rates.items():
        print(f"{name:20} {how:16} {statistics.median(got):8.0f} tasks/s")
    for pool in pools.values():
        pool.shutdown()


if __name__ == "__main__":
    main()
