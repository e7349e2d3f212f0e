"""GGUF export: a complete llama.cpp model file in which each tensor has the
GGUF type the plan gives it.

The source is a GGUF file (the embedded SmolLM2 is one). Work stays in the
GGUF layout: a planned tensor is read from the source, dequantized to float32
by gguf-py, quantized by ggml itself (``formats.gguf_types``) and written.
Q and K of Llama-family models keep llama.cpp's RoPE row order because they
never leave it (a row permutation does not change how a row quantizes).
Tensors the plan does not name, and tensors planned at their source type, are
copied byte for byte: requantizing an already quantized tensor to the same
type can only add error. Every metadata key and value is copied (tokenizer
included); ``general.file_type`` is relabelled (see ``_file_type``).

Streaming: gguf-py's ``GGUFWriter`` takes each tensor's name, shape, type and
byte count first (known before quantizing, from ggml's row size), writes the
header, the metadata and the tensor table, and then takes the data one tensor
at a time. The source is memory-mapped, so memory holds one tensor in float32
plus its quantized bytes, never the model.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from bitalloc.errors import BitallocError
from bitalloc.fileio import write_atomic
from bitalloc.formats import ggml
from bitalloc.formats.gguf_types import GGUF_TYPE_NAMES, GGUFType, parse_gguf_type
from bitalloc.model.loading import check_gguf

# general.file_type is one llama_ftype label for the whole file; llama.cpp
# reads it as a description only (every tensor carries its own type). K-quants
# have no plain label: the _M mix is used.
_FILE_TYPE_ALIASES = {"F32": "ALL_F32", "Q3_K": "MOSTLY_Q3_K_M", "Q4_K": "MOSTLY_Q4_K_M", "Q5_K": "MOSTLY_Q5_K_M"}


@dataclass(frozen=True)
class _TensorPlan:
    """What happens to one source tensor."""

    name: str
    shape: tuple[int, ...]  # numpy order, (out, in) for a matrix; rows run along the last axis
    source_type: str
    type_name: str
    quantize: bool  # False: the source bytes are copied unchanged
    nbytes: int  # predicted tensor data bytes (ggml's row size × rows)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _predicted_bytes(type_name: str, shape: tuple[int, ...]) -> int:
    if type_name in GGUF_TYPE_NAMES:
        return GGUFType(type_name).storage_bits(shape) // 8
    return math.prod(shape[:-1]) * ggml.row_size(type_name, shape[-1])  # F32, BF16, ...


def _open_source(source_path: str | os.PathLike):
    """The source as a memory-mapped GGUFReader; a clear error if it is not a GGUF file."""
    from gguf import GGUFEndian, GGUFReader

    path = Path(source_path)
    if not path.is_file():
        raise BitallocError(f"The source GGUF {str(path)!r} does not exist or is not a file.")
    try:  # parsing the metadata of a real model takes seconds: once, not again to check it
        reader = GGUFReader(str(path))
        size = path.stat().st_size
        if any(t.data_offset + t.n_bytes > size for t in reader.tensors):
            raise ValueError("a tensor runs past the end of the file")
    except Exception:  # gguf-py raises many kinds on damage; check_gguf names the problem
        check_gguf(path)
        raise BitallocError(f"The source GGUF {str(path)!r} cannot be read by gguf-py.") from None
    if reader.endianess != GGUFEndian.LITTLE:
        raise BitallocError(f"The source GGUF {str(path)!r} is big-endian; bitalloc exports little-endian "
                            "files only. Convert it with gguf-py's gguf_convert_endian first.")
    return reader


def _target_type(name: str, shape: tuple[int, ...], source_type: str, wanted: str) -> tuple[str, bool]:
    """(type name, quantize?) for one planned tensor, checked against its shape."""
    key = str(wanted).strip().upper()
    if key == source_type:
        return key, False
    try:
        gguf_type = parse_gguf_type(key)
    except BitallocError as e:
        raise BitallocError(f"Tensor {name!r}: {e}") from None
    if len(shape) < 2:
        raise BitallocError(f"Tensor {name!r} is 1-D (a norm or a bias, {shape[0]} values); llama.cpp keeps these "
                            f"at {source_type}. Leave it out of the plan instead of giving it {key}.")
    if not gguf_type.available(shape):
        raise BitallocError(f"Tensor {name!r} has rows of {shape[-1]} weights, but {key} stores rows in blocks of "
                            f"{gguf_type.block_size}: {shape[-1]} is not a multiple of {gguf_type.block_size}. "
                            f"{_fitting_types(shape[-1])}")
    return key, True


def _fitting_types(row: int) -> str:
    sizes = sorted({t.block_size for name, t in ggml.ggml_types().items() if name in GGUF_TYPE_NAMES})
    fits = [str(b) for b in sizes if b > 1 and row % b == 0]
    return f"Choose a type with blocks of {' or '.join(fits)} weights, or F16." if fits else "Only F16 fits it."


def _check_importance(plan: _TensorPlan, importance: Mapping[str, Any]) -> None:
    imp = importance.get(plan.name)
    if imp is None:
        if plan.quantize and GGUFType(plan.type_name).requires_importance:
            raise BitallocError(f"Tensor {plan.name!r}: ggml's {plan.type_name} needs an importance vector "
                                "(llama.cpp's imatrix); pass importance={name: mean squared input per column}, "
                                "or choose another type.")
        return
    if np.shape(imp) != (plan.shape[-1],):
        raise BitallocError(f"The importance of {plan.name!r} must have one value per input column, shape "
                            f"({plan.shape[-1]},). Got shape {tuple(np.shape(imp))} instead.")


def _plan_tensors(reader, tensor_types: Mapping[str, str], importance: Mapping[str, Any]) -> list[_TensorPlan]:
    """Every source tensor with its target type; all checks before any file is made."""
    names = [t.name for t in reader.tensors]
    unknown = sorted(set(tensor_types) - set(names)) + sorted(set(importance) - set(names))
    if unknown:
        raise BitallocError(f"The plan names {len(unknown)} tensor(s) the source GGUF does not have, e.g. "
                            f"{unknown[0]!r}. GGUF names look like 'blk.0.attn_q.weight'; map Hugging Face names "
                            "with hf_to_gguf_names.")
    plans = []
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists ne0 (the row length) first
        source_type = t.tensor_type.name
        type_name, quantize = _target_type(t.name, shape, source_type, tensor_types.get(t.name, source_type))
        nbytes = _predicted_bytes(type_name, shape) if quantize else int(t.n_bytes)
        plan = _TensorPlan(t.name, shape, source_type, type_name, quantize, nbytes)
        _check_importance(plan, importance)
        plans.append(plan)
    return plans


def _file_type(plans: list[_TensorPlan], source_value: int | None) -> int | None:
    """The llama_ftype of the type that holds most weights of the matrices."""
    from gguf import LlamaFileType

    numel: dict[str, int] = {}
    for p in plans:
        if len(p.shape) >= 2:
            numel[p.type_name] = numel.get(p.type_name, 0) + p.numel
    if not numel:
        return source_value
    dominant = max(sorted(numel), key=numel.__getitem__)
    label = _FILE_TYPE_ALIASES.get(dominant, f"MOSTLY_{dominant}")
    return int(LlamaFileType[label]) if label in LlamaFileType.__members__ else source_value


def _field_value(field) -> tuple[Any, Any, Any]:
    """(value, type, sub type) of a metadata field, as GGUFWriter.add_key_value takes them.
    Strings are copied as raw bytes, so text that is not valid UTF-8 survives."""
    from gguf import GGUFValueType

    vtype = field.types[0]
    if vtype == GGUFValueType.STRING:
        return bytes(field.parts[-1]), vtype, None
    if vtype != GGUFValueType.ARRAY:
        return field.contents(), vtype, None
    sub_type = GGUFValueType(int(field.parts[3][0]))  # parts: key length, key, type, item type, count, items
    if sub_type == GGUFValueType.ARRAY:
        raise BitallocError(f"The metadata key {field.name!r} is an array of arrays, which gguf-py cannot write.")
    if sub_type == GGUFValueType.STRING:
        return [bytes(field.parts[i]) for i in field.data], vtype, sub_type
    return field.contents(), vtype, sub_type


def _writer(path: str, arch: str):
    from gguf import GGUFValueType, GGUFWriter

    class _Writer(GGUFWriter):
        # gguf-py refuses to write an empty array, which a valid GGUF may hold
        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if vtype == GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
                head = self._pack("I", vtype) if add_vtype else b""
                return head + self._pack("I", sub_type) + self._pack("Q", 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type=sub_type)

    return _Writer(path, arch)


def _copy_metadata(reader, writer, file_type: int | None) -> None:
    from gguf import GGUFValueType, Keys

    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == Keys.General.ARCHITECTURE:
            continue  # the header's own counts, and the key GGUFWriter writes itself
        if field.name == Keys.General.ALIGNMENT:
            writer.add_custom_alignment(int(field.contents()))  # also aligns the data written
            continue
        if field.name == Keys.General.FILE_TYPE and file_type is not None:
            continue
        value, vtype, sub_type = _field_value(field)
        writer.add_key_value(field.name, value, vtype, sub_type=sub_type)
    if file_type is not None:
        writer.add_key_value(Keys.General.FILE_TYPE, file_type, GGUFValueType.UINT32)


def _tensor_data(plan: _TensorPlan, tensor, importance: Mapping[str, Any]) -> np.ndarray:
    """The bytes to write for one tensor: the source's, or ggml's quantization of it."""
    if not plan.quantize:
        return tensor.data
    from gguf.quants import dequantize

    W = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(plan.shape)  # (out, in)
    stored = GGUFType(plan.type_name).quantize(W, importance.get(plan.name))
    if stored.nbytes != plan.nbytes:
        raise BitallocError(f"ggml stored {stored.nbytes} bytes for {plan.name!r} as {plan.type_name} where "
                            f"{plan.nbytes} were predicted.")
    return np.frombuffer(stored.data, dtype=np.uint8)


def _add_tensor_info(writer, plan: _TensorPlan, tensor) -> None:
    from gguf import GGMLQuantizationType

    if not plan.quantize:
        writer.add_tensor_info(plan.name, tensor.data.shape, tensor.data.dtype, plan.nbytes,
                               raw_dtype=tensor.tensor_type)
        return
    rows = math.prod(plan.shape[:-1])
    byte_shape = (*plan.shape[:-1], plan.nbytes // rows)  # gguf-py turns bytes per row back into weights
    writer.add_tensor_info(plan.name, byte_shape, np.dtype(np.uint8), plan.nbytes,
                           raw_dtype=GGMLQuantizationType[plan.type_name])


def _write_file(path: str, reader, plans: list[_TensorPlan], importance: Mapping[str, Any],
                progress: Callable | None) -> dict[str, int]:
    """Write the file at ``path``; returns each tensor's data bytes as read back."""
    from gguf import Keys

    arch = reader.fields[Keys.General.ARCHITECTURE].contents() if Keys.General.ARCHITECTURE in reader.fields else ""
    source_ft = reader.fields.get(Keys.General.FILE_TYPE)
    writer = _writer(path, arch)
    try:
        _copy_metadata(reader, writer, _file_type(plans, None if source_ft is None else int(source_ft.contents())))
        for plan, tensor in zip(plans, reader.tensors):
            _add_tensor_info(writer, plan, tensor)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        pairs = list(zip(plans, reader.tensors))
        for plan, tensor in (progress(pairs, desc="writing GGUF", unit="tensor") if progress else pairs):
            writer.write_tensor_data(_tensor_data(plan, tensor, importance))
    finally:
        writer.close()
    return _verify(path, plans)


def _verify(path: str, plans: list[_TensorPlan]) -> dict[str, int]:
    """Read the new file back: the planned types, in order, at the predicted sizes."""
    from gguf import GGMLQuantizationType

    from bitalloc.model.gguf_header import read_gguf_header

    tensors = read_gguf_header(path).tensors
    got = [(t.name, GGMLQuantizationType(t.type_id).name, t.n_bytes) for t in tensors]
    want = [(p.name, p.type_name, p.nbytes) for p in plans]
    if got != want:
        bad = next(((g, w) for g, w in zip(got, want) if g != w), (len(got), len(want)))
        raise BitallocError(f"The written GGUF does not match its plan (written, planned): {bad}.")
    return {name: nbytes for name, _, nbytes in got}


def _check_out_path(out_path: Path, source_path: str | os.PathLike) -> None:
    if out_path.is_dir():
        raise BitallocError(f"The output {str(out_path)!r} is a folder; give a file path such as "
                            f"{str(out_path / 'model.gguf')!r}.")
    if out_path.exists() and out_path.resolve() == Path(source_path).resolve():
        raise BitallocError(f"The output {str(out_path)!r} is the source file; write the export elsewhere.")
    parent = out_path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise BitallocError(f"The output {str(out_path)!r} cannot be created: {str(parent)!r} is a file, "
                            "not a folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BitallocError(f"The output {str(out_path)!r} cannot be written: no write permission in "
                            f"{str(parent)!r}. Choose another path.")


def write_gguf(source_path: str | os.PathLike, out_path: str | os.PathLike, tensor_types: Mapping[str, str], *,
               importance: Mapping[str, np.ndarray] | None = None, progress: Callable | None = None) -> dict:
    """Write ``out_path``: the source GGUF with each tensor of ``tensor_types``
    (GGUF name -> type, e.g. ``{"blk.0.attn_q.weight": "Q8_0"}``) requantized
    by ggml from its float32 dequantization, with ``importance[name]`` (in,)
    when given. The file appears whole or not at all.

    Returns sizes: per tensor ``type``, ``source_type``, ``shape`` (numpy order),
    ``quantized`` (False: source bytes copied), ``data_bytes`` (read back from
    the file) and ``predicted_bytes`` (ggml's row size × rows, i.e.
    ``GGUFType.storage_bits / 8``); their totals ``tensor_data_bytes`` and
    ``predicted_tensor_data_bytes`` (equal, or this raises); ``file_bytes``
    (header, metadata, tensor table and alignment padding included)."""
    importance = dict(importance or {})
    out = Path(out_path)
    reader = _open_source(source_path)
    plans = _plan_tensors(reader, dict(tensor_types), importance)
    _check_out_path(out, source_path)
    written: dict[str, int] = {}

    def write(tmp: str) -> None:
        written.update(_write_file(tmp, reader, plans, importance, progress))

    try:
        write_atomic(out, write)
    except OSError as e:
        raise BitallocError(f"The output {str(out)!r} cannot be written: {e.strerror or e}.") from None
    return _report(out, plans, written)


def _report(out: Path, plans: list[_TensorPlan], written: Mapping[str, int]) -> dict:
    tensors = {p.name: {"type": p.type_name, "source_type": p.source_type, "shape": list(p.shape),
                        "quantized": p.quantize, "data_bytes": written[p.name], "predicted_bytes": p.nbytes}
               for p in plans}
    return {"path": str(out), "file_bytes": out.stat().st_size,
            "tensor_data_bytes": sum(written.values()),
            "predicted_tensor_data_bytes": sum(p.nbytes for p in plans),
            "tensors": tensors}


def tensor_type_recipe(tensor_types: Mapping[str, str]) -> str:
    """The plan as llama-quantize ``--tensor-type`` lines (its ``--tensor-type-file``
    takes them as they are): one ``name=type`` per line. llama-quantize reads
    the name as a regular expression searched anywhere in a tensor's name, so
    each is escaped and anchored: a bare ``output.weight`` would also match
    every ``blk.N.attn_output.weight``."""
    lines = []
    for name, type_name in tensor_types.items():
        pattern = "^" + str(name).replace(".", r"\.") + "$"
        lines.append(f"{pattern}={str(type_name).strip().lower()}")
    return "".join(line + "\n" for line in lines)


def hf_to_gguf_names(unit_names: Iterable[str], *, n_blocks: int, arch: str = "llama") -> dict[str, str]:
    """Hugging Face module names (bitalloc units, e.g. ``model.layers.3.self_attn.q_proj``,
    or parameter names ending in ``.weight``) -> GGUF tensor names
    (``blk.3.attn_q.weight``), by gguf-py's ``TensorNameMap`` for the GGUF
    architecture ``arch`` (``"llama"`` is ``MODEL_ARCH.LLAMA``, the table
    llama.cpp's converter uses for Llama, SmolLM2 and Mistral checkpoints);
    ``model.embed_tokens`` -> ``token_embd.weight``, ``lm_head`` -> ``output.weight``."""
    from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, get_tensor_name_map

    by_name = {v: k for k, v in MODEL_ARCH_NAMES.items()}
    if arch not in by_name:
        raise BitallocError(f"The 'arch' parameter of hf_to_gguf_names must be a GGUF architecture name such as "
                            f"'llama'. Got {arch!r} instead.")
    if n_blocks < 1:
        raise BitallocError(f"The 'n_blocks' parameter of hf_to_gguf_names must be at least 1. Got {n_blocks} instead.")
    name_map = get_tensor_name_map(MODEL_ARCH(by_name[arch]), n_blocks)
    out, missing = {}, []
    for unit in unit_names:
        key = unit if unit.endswith((".weight", ".bias")) else unit + ".weight"
        gguf_name = None if "[" in unit else name_map.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            missing.append(unit)
        else:
            out[unit] = gguf_name
    if missing:
        raise BitallocError(f"{len(missing)} unit(s) have no GGUF tensor name for architecture {arch!r} with "
                            f"{n_blocks} blocks, e.g. {missing[0]!r}. (An expert slice '[e]' is part of a fused GGUF "
                            "tensor and cannot take its own type.)")
    return out
