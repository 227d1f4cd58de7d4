"""Prometheus metrics: cheap counting on the request path, formatting only when scraped.

The request path adds to plain integers and bucket lists (no locks, no label lookups); a custom
prometheus_client collector turns them into metric families when ``/metrics`` is fetched. The
endpoint is a small Trio HTTP responder, so no extra thread touches the counters.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterator
from typing import Any

import trio

log = logging.getLogger("nbd_uring.metrics")

COMMANDS = ("read", "write", "disc", "flush", "trim", "cache", "write_zeroes", "block_status")
LATENCY_BUCKETS_S = (
    25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3,
    250e-3, 500e-3, 1.0, 2.5, 5.0, 10.0,
)


class CommandStats:
    __slots__ = ("bytes", "count", "errors", "latency_buckets", "latency_sum")

    def __init__(self) -> None:
        self.count = 0
        self.errors = 0
        self.bytes = 0
        self.latency_sum = 0.0
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS_S) + 1)


class Stats:
    """Everything counted for one export."""

    def __init__(self, export: str) -> None:
        self.export = export
        self.commands = [CommandStats() for _ in COMMANDS]
        self.in_flight = 0
        self.connections = 0
        self.connections_total = 0
        self.flushes_waiting = 0

    def started(self) -> None:
        self.in_flight += 1

    def finished(self, command: int, nbytes: int, error: int, seconds: float) -> None:
        self.in_flight -= 1
        if not 0 <= command < len(COMMANDS):
            return
        stats = self.commands[command]
        stats.count += 1
        if error:
            stats.errors += 1
        else:
            stats.bytes += nbytes
        stats.latency_sum += seconds
        stats.latency_buckets[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1


class Collector:
    """A prometheus_client collector over the Stats of every export."""

    def __init__(self, stats: dict[str, Stats], deferred_errors: Any = None) -> None:
        self.stats = stats
        self.deferred_errors = deferred_errors

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        requests = CounterMetricFamily(
            "nbd_uring_requests", "Requests completed", labels=["export", "command"]
        )
        errors = CounterMetricFamily(
            "nbd_uring_request_errors", "Requests answered with an error",
            labels=["export", "command"],
        )
        transferred = CounterMetricFamily(
            "nbd_uring_bytes", "Bytes read or written by successful requests",
            labels=["export", "command"],
        )
        latency = HistogramMetricFamily(
            "nbd_uring_request_latency_seconds",
            "From request received to reply queued", labels=["export", "command"],
        )
        in_flight = GaugeMetricFamily(
            "nbd_uring_requests_in_flight", "Requests received and not yet answered",
            labels=["export"],
        )
        connections = GaugeMetricFamily(
            "nbd_uring_connections", "Open client connections", labels=["export"]
        )
        connections_total = CounterMetricFamily(
            "nbd_uring_connections", "Client connections accepted", labels=["export"]
        )
        flush_waits = GaugeMetricFamily(
            "nbd_uring_flushes_waiting",
            "FLUSH requests waiting for earlier writes and their fdatasync",
            labels=["export"],
        )
        deferred = CounterMetricFamily(
            "nbd_uring_deferred_write_errors",
            "Write-back errors of writes already replied to", labels=["export"],
        )
        for name, s in self.stats.items():
            for command, c in zip(COMMANDS, s.commands, strict=True):
                if not c.count:
                    continue
                labels = [name, command]
                requests.add_metric(labels, c.count)
                errors.add_metric(labels, c.errors)
                transferred.add_metric(labels, c.bytes)
                cumulative, buckets = 0, []
                for bound, n in zip(
                    (*map(str, LATENCY_BUCKETS_S), "+Inf"), c.latency_buckets, strict=True
                ):
                    cumulative += n
                    buckets.append((bound, cumulative))
                latency.add_metric(labels, buckets, c.latency_sum)
            in_flight.add_metric([name], s.in_flight)
            connections.add_metric([name], s.connections)
            connections_total.add_metric([name], s.connections_total)
            flush_waits.add_metric([name], s.flushes_waiting)
            if self.deferred_errors is not None:
                deferred.add_metric([name], self.deferred_errors(name))
        yield from (requests, errors, transferred, latency, in_flight, connections,
                    connections_total, flush_waits, deferred)


async def serve_metrics(
    host: str,
    port: int,
    collector: Collector,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer ``GET /metrics`` (and nothing else) on ``host:port``."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(collector)
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])

    async def handle(stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(10):
                request = b""
                while b"\r\n\r\n" not in request and len(request) < 8192:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    request += chunk
                line = request.split(b"\r\n", 1)[0].split()
                if len(line) >= 2 and line[0] == b"GET" and line[1].split(b"?")[0] == b"/metrics":
                    body = generate_latest(registry)
                    head = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                else:
                    body = b"only GET /metrics is served here\n"
                    head = b"HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\n"
                await stream.send_all(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()

    await trio.serve_listeners(handle, listeners)
