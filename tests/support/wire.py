"""The protobuf wire format, written by hand: edge messages as bytes that may hold what no
well-behaved edge can encode (negative or 64-bit values in 32-bit fields, wrong wire types,
truncated or unknown fields), for the gRPC fuzzer (`tests.support.fuzz_messages`). Field
numbers are those of `specedge.proto`."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

MASK64 = (1 << 64) - 1
VARINT, FIXED64, LENGTH = 0, 1, 2  # wire types


def varint(value: int) -> bytes:
    """`value` mod 2^64 as a varint (a negative one takes 10 bytes, as protobuf's int64)."""
    value &= MASK64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if not value:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def zigzag(value: int) -> int:
    return (value << 1) ^ (value >> 63)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def varint_field(number: int, value: int) -> bytes:
    return tag(number, VARINT) + varint(value)


def bytes_field(number: int, data: bytes) -> bytes:
    return tag(number, LENGTH) + varint(len(data)) + data


def double_field(number: int, value: float) -> bytes:
    return tag(number, FIXED64) + struct.pack("<d", value)


def packed(number: int, values: Iterable[int], signed: bool = False) -> bytes:
    return bytes_field(number, b"".join(varint(zigzag(v) if signed else v) for v in values))


# Field numbers of specedge.proto.
EDGE_OPEN, EDGE_TREE, EDGE_CLOSE, EDGE_RESUME = 1, 2, 3, 4


def open_bytes(
    *,
    prompt: Sequence[int],
    fingerprint: str,
    max_tokens: int,
    protocol_version: int = 2,
    temperature: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    seed: int | None = None,
    stop_token_ids: Sequence[int] = (),
    accepts_streaming: bool = False,
    start_streaming: bool = False,
) -> bytes:
    sampling = double_field(1, temperature) + double_field(2, top_p) + varint_field(3, top_k)
    if seed is not None:
        sampling += varint_field(4, seed)
    body = (
        varint_field(1, protocol_version)
        + bytes_field(2, fingerprint.encode())
        + packed(3, prompt)
        + bytes_field(4, sampling)
        + varint_field(5, max_tokens)
        + packed(6, stop_token_ids)
        + varint_field(7, accepts_streaming)
        + varint_field(8, start_streaming)
    )
    return bytes_field(EDGE_OPEN, body)


def tree_bytes(
    round_number: int, tokens: Sequence[int], parents: Sequence[int], estimates: bytes = b""
) -> bytes:
    body = varint_field(1, round_number) + packed(2, tokens) + packed(3, parents, signed=True)
    return bytes_field(EDGE_TREE, body + bytes_field(4, estimates))


CLOSE_BYTES = bytes_field(EDGE_CLOSE, b"")
RESUME_BYTES = bytes_field(EDGE_RESUME, b"")
