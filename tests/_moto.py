"""A moto S3 server on a loopback port that can go down and come back (moto keeps its state in
module-level backends, so a restarted server serves the same buckets). Shared by
tests/test_s3_outage.py and bench/chaos.py."""
from __future__ import annotations

import socket


class Moto:
    """A ThreadedMotoServer on a fixed loopback port that can go down and come back."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None
        self.start()

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()  # werkzeug closes the listening socket: connections are refused
            self.server = None

    @property
    def up(self) -> bool:
        return self.server is not None
