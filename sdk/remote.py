"""A remote agent's CURVE keys: how the SDK reaches a kernel's tcp:// endpoint.

`$AGENTOS_CURVE` (or `sdk.connect(curve=...)`) holds three z85 keys separated by spaces: the
kernel's public key (`agentos agent add-key` prints it), then the client's public and secret
keys (`agentos agent keygen`). The kernel knows the client by its public key only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import zmq

ENV_CURVE = "AGENTOS_CURVE"


@dataclass(frozen=True)
class CurveKeys:
    server: str
    public: str
    secret: str

    @classmethod
    def parse(cls, text: str) -> CurveKeys:
        parts = text.split()
        if len(parts) != 3 or any(len(p) != 40 for p in parts):
            raise ValueError("want three 40-character z85 keys: SERVER PUBLIC SECRET")
        return cls(*parts)

    @classmethod
    def from_env(cls) -> CurveKeys | None:
        text = os.environ.get(ENV_CURVE)
        return cls.parse(text) if text else None

    def apply(self, sock: zmq.Socket) -> None:
        """Make `sock` a CURVE client of the kernel; before it connects."""
        sock.curve_serverkey = self.server.encode()
        sock.curve_publickey = self.public.encode()
        sock.curve_secretkey = self.secret.encode()


def keygen() -> tuple[str, str]:
    """A new client key pair (public, secret), z85."""
    public, secret = zmq.curve_keypair()
    return public.decode(), secret.decode()
