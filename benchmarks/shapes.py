"""Layer shapes (N = out_features, K = in_features) used by the benchmarks (PERF.md);
defined once in llmeasyquant.bench."""

from llmeasyquant.bench import CPU_SHAPES, GPT2_SMALL, LLAMA_7B, SMOLLM2_135M, TOKENS  # noqa: F401
