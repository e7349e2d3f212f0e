"""Quantizers: how stored codes are chosen (RTN, GPTQ one-shot and sequential)."""
