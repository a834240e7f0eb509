"""The sandbox bank in a process of its own, with what the benchmark needs to read from it.

``python -m bench.sandbox_process --port N`` serves ``kontod.sandbox.Sandbox`` on loopback, plus
two routes of the benchmark's own: ``GET /bench/stats`` (requests answered, the most answered
at once, and the process's own CPU seconds) and ``POST /bench/reset?latency=S`` (counters back
to 0, the latency of every answer set to ``S`` seconds). In a process of its own the sandbox
has a core to itself rather than sharing the event loop of the job it answers, and its CPU time
shows whether it, and not kontod, was the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal
import sys

from aiohttp import web

from kontod.demo.sandbox import Sandbox


class MeasuredSandbox(Sandbox):
    """The sandbox bank with the benchmark's two routes beside the Powens API."""

    def app(self) -> web.Application:
        app = super().app()
        app.router.add_get("/bench/stats", self._stats)
        app.router.add_post("/bench/reset", self._reset)
        return app

    async def _stats(self, _: web.Request) -> web.Response:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return web.json_response(
            {
                "requests": sum(self.requests.values()),
                "max_in_flight": self.max_in_flight,
                "cpu_seconds": usage.ru_utime + usage.ru_stime,
            }
        )

    async def _reset(self, request: web.Request) -> web.Response:
        self.requests.clear()
        self.requests_by_token.clear()
        self.arrivals.clear()
        self.max_in_flight = 0
        self.default.latency = float(request.query.get("latency", self.default.latency))
        return web.json_response({"latency": self.default.latency})


async def _main(port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with MeasuredSandbox().serve("127.0.0.1", port) as base_url:
        print(base_url, flush=True)
        await stop.wait()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sandbox_process")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    asyncio.run(_main(parser.parse_args().port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
