"""OpenAIChat against a real HTTP server on loopback: every reply in flight at once,
answers back in the order asked, progress as they finish."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tuneshield import OpenAIChat
from tuneshield._backends import GenerationConfig

_REQUESTS = 10
# Long enough for a loaded CI machine to send every request; a client that holds
# fewer than all of them at once waits this long and then fails the assertion.
_ALL_ARRIVED_TIMEOUT_S = 10.0


def _answer(handler: BaseHTTPRequestHandler, content: str) -> None:
    """A chat completion whose one choice says ``content``."""
    payload = json.dumps({"choices": [{"message": {"content": content}}]}).encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    handler.wfile.write(payload)


class _Completions(BaseHTTPRequestHandler):
    """Answers a chat completion with its seed once every request has arrived (or
    the wait runs out); later seeds answer sooner, so replies finish out of order.
    Records the most requests it held at once."""

    lock = threading.Lock()
    all_arrived = threading.Event()
    in_flight = 0
    most_in_flight = 0

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = type(self)
        with cls.lock:
            cls.in_flight += 1
            cls.most_in_flight = max(cls.most_in_flight, cls.in_flight)
            if cls.in_flight == _REQUESTS:
                cls.all_arrived.set()
        # Waiting for all of them, not sleeping a fixed time, keeps the test from
        # depending on how fast the machine sends them.
        cls.all_arrived.wait(_ALL_ARRIVED_TIMEOUT_S)
        time.sleep(0.05 * (_REQUESTS - body["seed"] % _REQUESTS))
        with cls.lock:
            cls.in_flight -= 1
        _answer(self, f" seed {body['seed']} ")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture()
def server_url() -> Iterator[str]:
    # The handler's counters and event live on the class: each server starts them afresh,
    # or a second use in one process would find the event already set.
    _Completions.in_flight = _Completions.most_in_flight = 0
    _Completions.all_arrived.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Completions)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def test_generate_keeps_every_request_in_flight_and_the_order_of_the_rows(
    server_url: str,
) -> None:
    chat = OpenAIChat(server_url, "chat-v0000", concurrency=_REQUESTS)
    seen: list[int] = []
    try:
        replies = chat.generate(
            [[{"role": "user", "content": f"hi {i}"}] for i in range(_REQUESTS)],
            GenerationConfig(max_new_tokens=8, seed=100),
            progress=seen.append,
        )
    finally:
        chat.close()
    assert replies == [f"seed {100 + i}" for i in range(_REQUESTS)]
    assert seen == list(range(1, _REQUESTS + 1))
    # All ten were held at once: no batch boundary drained the server.
    assert _Completions.most_in_flight == _REQUESTS


class _Slow(BaseHTTPRequestHandler):
    """Answers every chat completion after a pause, counting the requests it got."""

    lock = threading.Lock()
    arrived = 0
    pause_s = 0.2

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        with type(self).lock:
            type(self).arrived += 1
        time.sleep(self.pause_s)
        _answer(self, "ok")

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_stop_while_waiting_drops_the_requests_not_sent_yet() -> None:
    """A SIGTERM or Ctrl-C raises in the waiting thread (here: from the progress callback,
    the same thread): the call ends with it, and of the 40 queued requests only those
    already in flight reach the server. Before, leaving the pool sent every one of them,
    a round's whole healing, before the stop went on."""
    _Slow.arrived = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    chat = OpenAIChat(f"http://127.0.0.1:{server.server_address[1]}/v1", "chat", concurrency=2)

    def stop(done: int) -> None:
        raise KeyboardInterrupt

    try:
        with pytest.raises(KeyboardInterrupt):
            chat.generate(
                [[{"role": "user", "content": f"hi {i}"}] for i in range(40)],
                GenerationConfig(max_new_tokens=8),
                progress=stop,
            )
        # The requests in flight when the stop came, and at most as many that a loaded
        # machine sent before the pool saw it, may still arrive and finish.
        time.sleep(3 * _Slow.pause_s)
        assert _Slow.arrived < 10
    finally:
        chat.close()
        server.shutdown()
        server.server_close()
