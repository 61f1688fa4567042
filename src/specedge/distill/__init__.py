"""`specedge distill`: train a small draft model for a target by knowledge distillation."""

from specedge.distill.run import DistillConfig, run_distill

__all__ = ["DistillConfig", "run_distill"]
