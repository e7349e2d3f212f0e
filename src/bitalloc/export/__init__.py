"""Export targets: one module per file format a runtime loads.

- ``export.gguf`` — a llama.cpp GGUF file with one GGUF type per tensor,
  requantized by ggml itself from a GGUF source.
"""
