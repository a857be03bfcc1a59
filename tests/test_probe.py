"""Waiting for a server: free ports, HTTP statuses, polling until ready, giving up when the server is gone."""

import http.server
import socket
import threading

import pytest

from fastcache.serving.probe import free_port, status, wait_ready, wait_until


@pytest.fixture
def warming():
    """A server whose /ready answers 503 twice, then 200."""
    answers = iter([503, 503])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(next(answers, 200) if self.path == "/ready" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_a_free_port_can_be_bound():
    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))


def test_status_is_the_answer_or_none_while_nothing_listens(warming):
    assert status(f"{warming}/health") == 404
    assert status(f"http://127.0.0.1:{free_port()}/ready", timeout=2) is None


def test_wait_ready_polls_until_200(warming):
    wait_ready(warming, 30, poll=0.01)
    assert status(f"{warming}/ready") == 200


def test_waiting_gives_up_when_the_server_is_gone_or_time_is_up():
    with pytest.raises(RuntimeError, match="stopped before it was ready"):
        wait_ready(f"http://127.0.0.1:{free_port()}", 30, alive=lambda: False)
    with pytest.raises(TimeoutError, match="nothing did not happen within 0.05 s"):
        wait_until(lambda: None, 0.05, "nothing", poll=0.01)
    assert wait_until(lambda: 7, 1, "a number") == 7
