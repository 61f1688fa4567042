"""Typed errors raised at the package's boundaries, each with an actionable message."""


class SpecEdgeError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero."""


class ModelLoadError(SpecEdgeError):
    """A model name, file or architecture could not be loaded."""


class TokenizerMismatchError(SpecEdgeError):
    """Draft and target do not share a tokenizer."""


class InvalidRequestError(SpecEdgeError):
    """A generation request (prompt, parameters, tree) is invalid."""


class CapacityError(SpecEdgeError):
    """No free KV slot or context room for the request."""


class ServiceUnavailableError(SpecEdgeError):
    """The request cannot be served now (server unreachable, full or shutting down); retry."""
