"""The OpenAI-compatible HTTP API, shared by the edge and the server (imports neither)."""
