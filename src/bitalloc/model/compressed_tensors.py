"""Reading a compressed-tensors checkpoint (what ``bitalloc export --to
compressed-tensors`` and llm-compressor write) as a dense float model.

Every quantized layer is decompressed by the ``compressed-tensors`` package
itself (its compressor for the folder's format, with the config group's
scheme), so the weights are exactly what that library reconstructs. This
path does not go through transformers' compressed-tensors loader, which at
the versions pinned here cannot read the packed zero points of asymmetric
schemes (it works for symmetric ones, and the suite checks that it gives the
same logits)."""

from __future__ import annotations

import json
from pathlib import Path

from bitalloc.errors import BitallocError

QUANT_METHOD = "compressed-tensors"
COMPRESSED_KEYS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")


def compressed_config(folder: str | Path) -> dict | None:
    """The folder's ``quantization_config`` when it is a compressed-tensors checkpoint, else None."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    q = config.get("quantization_config") if isinstance(config, dict) else None
    return q if isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD else None


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise BitallocError(f"{folder} holds a compressed-tensors config but no .safetensors file.")
    return files


def load_compressed_tensors(folder: str | Path, torch_dtype):
    """A dense model of ``torch_dtype`` with every compressed layer decompressed; refuses a checkpoint
    that misses or adds tensors."""
    import torch
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    qconfig = QuantizationConfig.model_validate(compressed_config(folder))
    compressor = BaseCompressor.load_from_registry(qconfig.format)
    config = AutoConfig.from_pretrained(str(folder))
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a dense model: the layers are decompressed below
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    tensors: dict = {}
    for f in _safetensors_files(folder):
        tensors.update(load_file(str(f)))
    modules = dict(model.named_modules())
    dense: dict = {}
    for group in qconfig.config_groups.values():
        for target in group.targets:
            if target not in modules:
                raise BitallocError(f"The compressed-tensors config of {folder} targets {target!r}, which this "
                                    "architecture has no module for (only exact module names are read here).")
            state = {k: tensors.pop(f"{target}.{k}") for k in COMPRESSED_KEYS if f"{target}.{k}" in tensors}
            if "weight_scale" in state:  # dequantized in the model's type, as transformers' loader does
                state["weight_scale"] = state["weight_scale"].to(torch_dtype)
            if "weight_packed" not in state:
                raise BitallocError(f"{folder} lacks {target}.weight_packed, which its config group compresses.")
            dense[f"{target}.weight"] = compressor.decompress(state, group)["weight"].to(torch_dtype)
    dense.update({k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in tensors.items()})
    result = model.load_state_dict(dense, strict=False)
    missing = [k for k in result.missing_keys if k not in _tied_keys(model)]
    if missing or result.unexpected_keys:
        name = (missing or result.unexpected_keys)[0]
        raise BitallocError(f"The checkpoint {folder} {'lacks' if missing else 'holds an unknown tensor'} {name!r}. "
                            "Export it again.")
    with torch.no_grad():
        model.tie_weights()
    model.eval()
    return model


def _tied_keys(model) -> set[str]:
    """Parameter names that share storage with an earlier one (a tied output matrix)."""
    seen, tied = {}, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.data_ptr() in seen:
            tied.add(name)
        seen.setdefault(p.data_ptr(), name)
    return tied
