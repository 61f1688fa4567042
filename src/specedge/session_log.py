"""One structured log line per session end, on the edge and the server alike.

`log_session_end` writes `session_end` and `key=value` pairs at INFO (a value with spaces or
quotes is a JSON string), always these keys first: `role` (edge, server-api: a generation of an
HTTP API; edge-session: an edge's session on the server), `session` (the server's session id,
shared by the edge's and the server's lines of one session; "-" when none was opened),
`prompt_tokens`, `completion_tokens`, `rounds`, `seconds`, `outcome` (finished, closed,
cancelled, refused, failed, evicted), `finish_reason` and `error` ("-" when none), then any
extra counters the caller adds. A call refused for its bearer token never becomes a session
(`rpc.security.TokenAuth` counts and logs it).

Logs carry counts, ids, times and reasons, never prompt or completion text: no logger in the
package is given request text (error messages name token ids and sizes at most).
"""

from __future__ import annotations

import json
import logging


def log_session_end(
    logger: logging.Logger,
    *,
    role: str,
    session: str,
    prompt_tokens: int,
    completion_tokens: int,
    rounds: int,
    seconds: float,
    outcome: str,
    finish_reason: str | None,
    error: BaseException | str | None = None,
    **extra: object,
) -> None:
    if isinstance(error, BaseException):
        error = f"{type(error).__name__}: {error}"
    fields: dict[str, object] = {
        "role": role,
        "session": session or "-",
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "rounds": rounds,
        "seconds": seconds,
        "outcome": outcome,
        "finish_reason": finish_reason or "-",
        "error": error or "-",
        **extra,
    }
    logger.info("session_end %s", " ".join(f"{key}={_value(v)}" for key, v in fields.items()))


def _value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    text = str(value)
    if not text or any(c.isspace() or c in "\"='" for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text
