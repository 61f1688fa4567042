"""Bearer credentials: the secrets a caller must present, read from files, checked in constant
time.

A *bearer key* is a secret sent as `Authorization: Bearer KEY` (an HTTP header, or gRPC call
metadata of that name). `BearerKeys` holds the accepted ones: the gRPC token of `--auth-token`
(edges to the server) or the API keys of `--api-key-file` (users to an HTTP API). A key file
holds one key per line (several let a key be rotated without a restart of the clients); blank
lines and lines starting with `#` are skipped. `accepts` compares SHA-256 digests with
`hmac.compare_digest` against every key, so neither the time taken nor an early exit tells a
caller how much of a guess was right, or how long the key is.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from pathlib import Path

BEARER = "bearer"


class BearerKeys:
    """The accepted bearer keys (at least one)."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = tuple(_digest(key.encode()) for key in keys)
        assert self._digests, "BearerKeys needs at least one key"

    def accepts(self, authorization: str | bytes | None) -> bool:
        """Whether an `Authorization` value is `Bearer KEY` (any case of the scheme) with one
        of the keys. Every key is compared, in constant time."""
        if authorization is None:
            return False
        if isinstance(authorization, bytes):
            authorization = authorization.decode("latin-1")
        scheme, _, given = authorization.strip().partition(" ")
        given_digest = _digest(given.strip().encode("latin-1", "replace"))
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(given_digest, digest)
        return matched and scheme.lower() == BEARER


def read_key_file(path: str | Path) -> list[str]:
    """The keys of a key file (one per line; blank lines and `#` comments skipped). Raises
    OSError when it cannot be read and ValueError when it holds no key."""
    lines = Path(path).read_text().splitlines()
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise ValueError(f"{path} holds no key: put one key per line")
    return keys


def _digest(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()
