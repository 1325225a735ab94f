"""A unix socket in front of the real Docker daemon's, whose answers can be slowed down.

Pointed at by ``DOCKER_HOST=unix://<path>``, it relays every connection to the daemon's socket
byte for byte (as a daemon reached over TCP or SSH would be), so that a test can keep an
archive stream in flight long enough to stop the daemon in its middle. When the daemon goes
away its connections end, and new ones are closed at once, as a remote daemon's would.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHUNK = 64 * 1024


class DaemonRelay:
    """Serves ``path``, relaying to the daemon socket ``upstream``."""

    def __init__(self, upstream: Path, path: Path) -> None:
        self.upstream = upstream
        self.path = path
        #: Bytes per second from the daemon to the client (0: unthrottled); changeable live.
        self.bytes_per_second = 0
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def docker_host(self) -> str:
        """The DOCKER_HOST value that reaches the daemon through the relay."""
        return f"unix://{self.path}"

    def start(self) -> None:
        """Start listening."""
        self._listener.bind(str(self.path))
        self._listener.listen(64)
        self._listener.settimeout(0.2)
        self._thread.start()

    def stop(self) -> None:
        """Stop listening (connections in flight end with their ends)."""
        self._stopped.set()
        self._thread.join(10)
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _serve(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        client.settimeout(None)
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.connect(str(self.upstream))
        except OSError:
            # No daemon: the client sees its connection closed, as with a remote daemon.
            upstream.close()
            client.close()
            return
        threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
        self._pump(upstream, client, True)

    def _pump(self, source: socket.socket, sink: socket.socket, throttled: bool) -> None:
        try:
            while True:
                data = source.recv(CHUNK)
                if not data:
                    break
                sink.sendall(data)
                rate = self.bytes_per_second
                if throttled and rate:
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        finally:
            # Either end going away ends the connection on both sides.
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
                end.close()


@contextmanager
def daemon_relay(upstream: Path, path: Path) -> Iterator[DaemonRelay]:
    """A running relay for the duration of the block."""
    relay = DaemonRelay(upstream, path)
    relay.start()
    try:
        yield relay
    finally:
        relay.stop()
