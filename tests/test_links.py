"""The drill's link cutters really cut and really heal."""

from __future__ import annotations

import socket
import threading
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer

import httpx
import pytest

from events.kafka import KafkaSettings, ensure_topics, make_producer
from openkcm.links import KafkaLink, TcpLink


def test_tcp_link_cuts_and_heals() -> None:
    class Hello(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"hi")

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    link = TcpLink("127.0.0.1", server.server_address[1]).start()
    try:
        assert httpx.get(link.url, timeout=5).text == "hi"
        link.cut()
        with pytest.raises(httpx.HTTPError):
            httpx.get(link.url, timeout=2)
        link.heal()
        assert httpx.get(link.url, timeout=5).text == "hi"
    finally:
        link.close()
        server.shutdown()


async def test_kafka_link_cuts_and_heals(fresh_broker, tmp_path) -> None:
    link = KafkaLink(fresh_broker.bootstrap, tmp_path / "proxy.log").start()
    topic = f"t.{uuid.uuid4().hex[:6]}"
    await ensure_topics(KafkaSettings(fresh_broker.bootstrap), [topic])
    try:
        producer = make_producer(KafkaSettings(link.bootstrap))
        await producer.start()
        meta = await producer.send_and_wait(topic, b"x", partition=0)
        assert meta.offset == 0
        await producer.stop()
        link.cut()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", link.port), timeout=1).close()
        link.heal()
        producer = make_producer(KafkaSettings(link.bootstrap))
        await producer.start()
        assert (await producer.send_and_wait(topic, b"y", partition=0)).offset == 1
        await producer.stop()
    finally:
        link.cut()
