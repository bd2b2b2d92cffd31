"""Evaluation: perplexity, memory, speed."""

from .memory import model_memory
from .perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "model_memory", "perplexity"]
