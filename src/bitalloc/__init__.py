"""bitalloc: mixed-precision bit allocation for large language models.

The pipeline (see DESIGN.md): model -> units -> error table -> problem -> plan
-> quantized model -> report. Each stage is a function here and a command in
``bitalloc.cli``. Importing this package loads nothing heavy.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "plan", "quantize", "evaluate", "run"]


def __getattr__(name):
    # Lazy: `import bitalloc` must not import torch/transformers.
    if name in ("plan", "quantize", "evaluate", "run"):
        from bitalloc import api

        return getattr(api, name)
    raise AttributeError(name)
