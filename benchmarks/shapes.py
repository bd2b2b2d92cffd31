"""Layer shapes (N = out_features, K = in_features) used by the benchmarks (PERF.md)."""

LLAMA_7B = [(4096, 4096), (11008, 4096), (4096, 11008)]
GPT2_SMALL = [(2304, 768), (3072, 768), (768, 3072)]
SMOLLM2_135M = [(576, 576), (1536, 576), (576, 1536)]
TOKENS = [1, 16, 128, 2048]

CPU_SHAPES = {
    "llama": LLAMA_7B,
    "gpt2": GPT2_SMALL,
    "all": LLAMA_7B + GPT2_SMALL,
    "quick": [(256, 384)],
}
