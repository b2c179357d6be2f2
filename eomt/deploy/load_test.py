"""Load on the HTTP service (`tools/benchmark_serve.py`): concurrent clients on one event loop,
bounded in requests and time, and the in-process `Predictor` on the same images to compare."""

import asyncio
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np


@dataclass
class LoadResult:
    """What a phase of load saw: per-request latencies (s) of the answered, status counts."""

    seconds: float
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    timeouts: int = 0
    failures: int = 0  # connection errors and other transport failures

    @property
    def answered(self) -> int:
        return self.statuses.get(200, 0)

    def row(self) -> dict:
        latency_ms = np.array(self.latencies) * 1000 if self.latencies else np.zeros(1)
        p50, p95, p99 = np.percentile(latency_ms, [50, 95, 99]).round(1).tolist()
        errors = sum(n for status, n in self.statuses.items() if status not in (200, 503))
        return {
            "requests": sum(self.statuses.values()) + self.timeouts + self.failures,
            "ok": self.answered,
            "503": self.statuses.get(503, 0),
            "errors": errors + self.failures,
            "timeouts": self.timeouts,
            "images_per_s": round(self.answered / self.seconds, 2),
            "p50_ms": p50,
            "p95_ms": p95,
            "p99_ms": p99,
        }


async def _load(url, bodies, clients, max_requests, max_seconds, timeout, on_request):
    result = LoadResult(seconds=0.0)
    issued = 0
    deadline = time.perf_counter() + max_seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(session: httpx.AsyncClient) -> None:
        nonlocal issued
        while issued < max_requests and time.perf_counter() < deadline:
            body = bodies[issued % len(bodies)]
            issued += 1
            started = time.perf_counter()
            try:
                answer = await session.post(url, content=body, timeout=timeout)
            except httpx.TimeoutException:
                result.timeouts += 1
                continue
            except httpx.TransportError:
                result.failures += 1
                continue
            result.statuses[answer.status_code] = result.statuses.get(answer.status_code, 0) + 1
            if answer.status_code == 200:
                result.latencies.append(time.perf_counter() - started)
            if on_request is not None:
                on_request(issued)

    started = time.perf_counter()
    async with httpx.AsyncClient(limits=limits) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    result.seconds = time.perf_counter() - started
    return result


def run_load(
    url: str,
    bodies: list[bytes],
    clients: int,
    max_requests: int,
    max_seconds: float,
    timeout: float = 30.0,
    on_request=None,
) -> LoadResult:
    """`clients` concurrent clients POST the bodies in turn until `max_requests` are sent or
    `max_seconds` pass; `on_request(number sent)` runs after each answer."""
    return asyncio.run(_load(url, bodies, clients, max_requests, max_seconds, timeout, on_request))


def in_process(predictor, paths: list[Path], batch_size: int, task: str, rounds: int) -> dict:
    """The Predictor reading and predicting the same files in batches: images per second and
    the per-batch latency percentiles (a batch's images wait for the whole batch)."""
    batches = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    predictor.predict(batches[0], task)  # warm-up
    latencies = []
    started = time.perf_counter()
    for _ in range(rounds):
        for batch in batches:
            begun = time.perf_counter()
            predictor.predict(batch, task)
            latencies.append(time.perf_counter() - begun)
    seconds = time.perf_counter() - started
    p50, p95, p99 = (np.percentile(latencies, [50, 95, 99]) * 1000).round(1).tolist()
    return {
        "requests": rounds * len(paths),
        "ok": rounds * len(paths),
        "images_per_s": round(rounds * len(paths) / seconds, 2),
        "p50_ms": p50,
        "p95_ms": p95,
        "p99_ms": p99,
    }


def free_port() -> int:
    """A TCP port of 127.0.0.1 free now (for a server started next)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def resident_mib(pid: int) -> float:
    """The process's resident memory (VmRSS) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class ServerProcess:
    """tools/serve.py in a subprocess on 127.0.0.1:`port`, waited for until /health answers."""

    def __init__(self, arguments: list[str], port: int, log: Path, start_timeout: float = 300):
        repo = Path(__file__).resolve().parents[2]
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(log, "w")
        command = [sys.executable, str(repo / "tools" / "serve.py"), "--port", str(port)]
        self.process = subprocess.Popen(
            command + arguments, stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.time() + start_timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}); see {log}")
            try:
                if httpx.get(f"{self.url}/health").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"the server did not answer /health in {start_timeout} s; see {log}")

    def stop(self) -> int:
        self.process.terminate()
        try:
            return self.process.wait(timeout=60)
        finally:
            self.process.kill()
            self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
