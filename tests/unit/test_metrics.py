"""Metrics: counts on the request path, Prometheus text over HTTP from the Trio responder."""

from __future__ import annotations

import trio

from nbd_uring.server.metrics import COMMANDS, Collector, Stats, serve_metrics


def sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in:\n{text}")


async def test_scrape_shows_what_was_counted() -> None:
    stats = Stats("disk")
    for _ in range(3):
        stats.started()
        stats.finished(COMMANDS.index("read"), 4096, 0, 0.0002)
    stats.started()
    stats.finished(COMMANDS.index("write"), 512, 5, 0.02)
    stats.started()
    stats.connections = 2
    collector = Collector({"disk": stats}, deferred_errors=lambda name: 1)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_metrics, "127.0.0.1", 0, collector)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        response = b""
        while chunk := await stream.receive_some(65536):
            response += chunk
        bad = await trio.open_tcp_stream("127.0.0.1", port)
        await bad.send_all(b"GET / HTTP/1.0\r\n\r\n")
        not_found = await bad.receive_some(100)
        nursery.cancel_scope.cancel()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK")
    text = body.decode()
    assert sample(text, 'nbd_uring_requests_total{command="read",export="disk"}') == 3
    assert sample(text, 'nbd_uring_bytes_total{command="read",export="disk"}') == 3 * 4096
    assert sample(text, 'nbd_uring_request_errors_total{command="write",export="disk"}') == 1
    assert sample(text, 'nbd_uring_bytes_total{command="write",export="disk"}') == 0
    assert sample(
        text, 'nbd_uring_request_latency_seconds_bucket{command="read",export="disk",le="0.00025"}'
    ) == 3
    assert sample(text, 'nbd_uring_requests_in_flight{export="disk"}') == 1
    assert sample(text, 'nbd_uring_connections{export="disk"}') == 2
    assert sample(text, 'nbd_uring_deferred_write_errors_total{export="disk"}') == 1
    assert not_found.startswith(b"HTTP/1.0 404")
