"""Test helpers, one owner per concept (the fixtures that use them live in tests/conftest.py):

- `models`: tiny random-weight models of every family, tiny tokenizers, plain causal reference
  forwards, the bundled SmolLM2 model.
- `trees`: draft trees: random ones for property tests, scripted ones for a fake edge.
- `reference`: ground truths: the local autoregressive target output, a fresh KV prefill.
- `servers`: the real server and edge in-process on loopback ports.
- `serve_process`: a real `specedge serve` process, to kill, drain or restart.
- `scripted_edge`: a scripted edge talking to a server over real gRPC.
- `observe`: HTTP GETs, /health, /metrics samples, waiting for a condition.
- `fake_openai`: a fake OpenAI-compatible streaming API for the benchmark client.
- `fuzz`: fuzzing real servers and edges: hypothesis settings, good sessions meanwhile, the
  fuzzed stacks, the schemathesis property of an HTTP request.
- `fuzz_messages`: fuzzed edge messages for the gRPC stream, what each must get, a call as bytes.
- `wire`: the protobuf wire format by hand, for messages no well-behaved edge can encode.
"""
