"""SpecEdge: speculative decoding split between edge drafters and a batched verification server."""

__version__ = "0.1.0"
