"""The speculative-decoding core: tree topology, sampling, verification, context lookup, the
batched model runner, the draft and target engines, the generation protocol and the one round
loop. No network, no HTTP: edge, server and the local command all build on this package."""
