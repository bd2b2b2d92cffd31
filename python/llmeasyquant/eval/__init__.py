"""Evaluation: perplexity, memory, speed."""

from .memory import model_memory
from .perplexity import PerplexityResult, perplexity
from .speed import SpeedResult, throughput

__all__ = ["PerplexityResult", "SpeedResult", "model_memory", "perplexity", "throughput"]
