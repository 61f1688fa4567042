"""The wire codec of protocol version 2: acceptance estimates travel as one byte per node
(order-preserving, a 32-node round well under 1 KB), the verified count comes back, and
estimates that break the selection's preconditions decode as malformed."""

from __future__ import annotations

from specedge.core.sampling import SamplingParams
from specedge.rpc import specedge_pb2 as pb
from specedge.rpc.codec import (
    MalformedMessage,
    OpenSession,
    TreeVerified,
    VerifyTree,
    decode_edge,
    decode_server,
    dequantize_estimates,
    encode_edge,
    encode_server,
    quantize_estimates,
)


def test_estimates_round_trip_within_one_level_and_keep_their_order() -> None:
    estimates = (1.0, 0.93, 0.5, 0.5, 0.21, 0.004, 0.0)
    tree = VerifyTree(7, list(range(7)), [-1, 0, 1, 0, 3, 4, 2], estimates)
    decoded = decode_edge(encode_edge(tree))
    assert isinstance(decoded, VerifyTree)
    assert decoded.tokens == tree.tokens and decoded.parents == tree.parents
    assert all(abs(a - b) <= 0.5 / 255 for a, b in zip(decoded.estimates, estimates, strict=True))
    assert list(decoded.estimates) == sorted(decoded.estimates, reverse=True)
    assert dequantize_estimates(quantize_estimates(estimates)) == decoded.estimates


def test_a_32_node_round_stays_under_1_kb() -> None:
    tokens = [49000 + i for i in range(32)]  # large ids: the widest varints
    parents = [-1] + [i // 2 for i in range(31)]
    estimates = tuple(0.99**i for i in range(32))
    message = encode_edge(VerifyTree(123456, tokens, parents, estimates))
    assert message.ByteSize() < 1024
    assert len(message.tree.estimates) == 32


def test_estimates_that_rise_or_miscount_are_malformed() -> None:
    rising = pb.EdgeMessage(
        tree=pb.Tree(round=1, tokens=[5, 6], parents=[-1, 0], estimates=b"\x10\x20")
    )
    short = pb.EdgeMessage(tree=pb.Tree(round=1, tokens=[5, 6], parents=[-1, 0], estimates=b"\x10"))
    assert isinstance(decode_edge(rising), MalformedMessage)
    assert isinstance(decode_edge(short), MalformedMessage)
    none_sent = decode_edge(pb.EdgeMessage(tree=pb.Tree(round=1, tokens=[5], parents=[-1])))
    assert isinstance(none_sent, VerifyTree) and none_sent.estimates == ()


def test_verified_count_round_trips() -> None:
    reply = TreeVerified(3, [4, 5, 6], 2, None, num_verified=9)
    assert decode_server(encode_server(reply)) == reply


def test_a_version_1_open_still_decodes() -> None:
    message = encode_edge(OpenSession([1, 2], SamplingParams(), 8, protocol_version=1))
    decoded = decode_edge(message)
    assert isinstance(decoded, OpenSession) and decoded.protocol_version == 1
