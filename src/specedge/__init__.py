"""SpecEdge: speculative decoding split between edge drafters and a batched verification server."""

from pathlib import Path

__version__ = "0.1.0"

# Data shipped with the package: the bundled draft model, the Spec-Bench prompts.
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
