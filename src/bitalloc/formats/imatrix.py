"""llama.cpp's importance matrix ("imatrix"): maths, writer and reader.

The importance of input column j of a linear layer is the mean, over the
calibration tokens, of that column's squared activation, E[x_j²]; ggml's
quantizers weigh each weight's rounding error by it.

File format. Checked against the llama.cpp vendored in llama-cpp-python
0.3.36 (llama.cpp commit 0c1e570, ggml 0.25.3): ``llama-quantize --imatrix``
reads a file through ``common_imatrix_load`` (common/imatrix-loader.cpp),
which tries GGUF first and falls back to the legacy binary ``.dat``;
``llama-imatrix`` writes GGUF by default. We write the GGUF form:

- keys ``general.type = "imatrix"``, ``imatrix.datasets`` (strings),
  ``imatrix.chunk_count`` and ``imatrix.chunk_size`` (u32); llama-quantize
  refuses a GGUF imatrix that lacks any of the last three;
- per weight ``<gguf name>.in_sum2``: F32, ggml shape (n_in, n_mat), numpy
  (n_mat, n_in), the sum over tokens of x²; ``<gguf name>.counts``: F32,
  (n_mat, 1), the tokens seen. n_mat is 1 except for fused expert tensors.

llama-quantize divides the two (``in_sum2 / counts``, 1 where a count is 0)
and flattens the result; ``Imatrix.vectors()`` does the same.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from bitalloc.errors import BitallocError
from bitalloc.fileio import write_atomic

_SUMS, _COUNTS = ".in_sum2", ".counts"
_KEY_TYPE, _KEY_DATASETS = "general.type", "imatrix.datasets"
_KEY_CHUNK_COUNT, _KEY_CHUNK_SIZE = "imatrix.chunk_count", "imatrix.chunk_size"


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor; torch is not imported here
        x = x.detach().double().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def importance_vectors(sq_sums: Mapping[str, Any], token_counts: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Σ x² per input column (n_in,) or (n_mat, n_in) and tokens seen -> E[x²], float32.

    ``sq_sums`` may equally be the diagonals of unnormalised Gram matrices XᵀX.
    Where no token was seen the importance is 1, as in llama-quantize.
    """
    out = {}
    for name, sums in sq_sums.items():
        S = _numpy(sums)  # (n_in,) or (n_mat, n_in)
        n = _numpy(token_counts[name]).reshape(-1, *([1] * (S.ndim - 1)))  # (n_mat, 1) or (1,)
        mean = np.divide(S, n, out=np.ones_like(S), where=n > 0)
        out[name] = mean.astype(np.float32)
    return out


def squared_sums_from_hessians(hessians: Mapping[str, Any], token_counts: Mapping[str, int]) -> dict[str, np.ndarray]:
    """bitalloc.calib.grams's H = 2 XᵀX / n (n_in, n_in) per module -> Σ x² per input column (n_in,)."""
    out = {}
    for name, H in hessians.items():
        diag = np.diagonal(_numpy(H))  # (n_in,)
        out[name] = diag / 2.0 * float(token_counts[name])
    return out


def gguf_tensor_names(modules: Sequence[str], name_map: Mapping[str, str]) -> dict[str, str]:
    """Module name (HF) -> GGUF weight name, e.g. ``blk.0.attn_q.weight``.

    ``name_map`` is keyed by module name or by ``<module>.weight``; a value
    without the ``.weight`` suffix gets it (imatrix entries name weights).
    """
    out = {}
    for module in modules:
        gguf_name = name_map.get(module, name_map.get(f"{module}.weight"))
        if gguf_name is None:
            raise BitallocError(f"No GGUF tensor name is given for module {module!r}; add it to the name map "
                                "(e.g. from gguf.get_tensor_name_map(arch, n_blocks)).")
        out[module] = gguf_name if gguf_name.endswith(".weight") else f"{gguf_name}.weight"
    if len(set(out.values())) != len(out):
        raise BitallocError("Two modules map to the same GGUF tensor name; check the name map.")
    return out


@dataclass
class Imatrix:
    """An imatrix file's contents, keyed by GGUF weight name."""

    sums: dict[str, np.ndarray]    # name -> (n_mat, n_in) Σ x² over tokens
    counts: dict[str, np.ndarray]  # name -> (n_mat,) tokens seen
    datasets: tuple[str, ...] = ()
    chunk_count: int = 0
    chunk_size: int = 0

    def vectors(self) -> dict[str, np.ndarray]:
        """What llama-quantize hands ggml: E[x²] flattened to (n_mat * n_in,), float32."""
        return {name: v.reshape(-1) for name, v in importance_vectors(self.sums, self.counts).items()}


def _entries(sq_sums: Mapping[str, Any], token_counts: Mapping[str, Any],
             names: Mapping[str, str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Validated (in_sum2 (n_mat, n_in), counts (n_mat, 1)) float32 per GGUF name."""
    entries = {}
    for module, sums in sq_sums.items():
        S = np.atleast_2d(_numpy(sums))  # (n_mat, n_in)
        n = _numpy(token_counts[module]).reshape(-1, 1)  # (n_mat, 1)
        if S.ndim != 2 or n.shape[0] != S.shape[0]:
            raise BitallocError(f"The squared sums of {module!r} must be (n_in,) or (n_mat, n_in) with one token "
                                f"count per matrix. Got sums {S.shape} and counts {n.shape[0]} instead.")
        if not (np.all(np.isfinite(S)) and np.all(S >= 0) and np.all(n >= 0)):
            raise BitallocError(f"The squared sums and token counts of {module!r} must be finite and non-negative.")
        entries[names[module]] = (S.astype(np.float32), n.astype(np.float32))
    return entries


def write_imatrix(path: str | os.PathLike, sq_sums: Mapping[str, Any], token_counts: Mapping[str, Any], *,
                  name_map: Mapping[str, str], datasets: Sequence[str], chunk_count: int,
                  chunk_size: int) -> Path:
    """Write a GGUF imatrix that ``llama-quantize --imatrix`` reads; atomic.

    ``sq_sums``: module name -> Σ x² per input column over the calibration
    tokens; ``token_counts``: module name -> tokens seen; ``name_map``: module
    -> GGUF name; ``datasets``: names of the calibration texts (at least one);
    ``chunk_count`` windows of ``chunk_size`` tokens were run.
    """
    import gguf

    if not datasets or chunk_count < 0 or chunk_size < 0:
        raise BitallocError("An imatrix needs at least one dataset name and non-negative chunk_count and "
                            "chunk_size (llama-quantize refuses one without them). "
                            f"Got {list(datasets)}, {chunk_count}, {chunk_size} instead.")
    if set(sq_sums) != set(token_counts):
        raise BitallocError("The squared sums and the token counts must name the same modules.")
    entries = _entries(sq_sums, token_counts, gguf_tensor_names(list(sq_sums), name_map))

    def _write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch="imatrix")
        writer.add_string(_KEY_TYPE, "imatrix")
        writer.add_array(_KEY_DATASETS, [str(d) for d in datasets])
        writer.add_uint32(_KEY_CHUNK_COUNT, int(chunk_count))
        writer.add_uint32(_KEY_CHUNK_SIZE, int(chunk_size))
        for name in sorted(entries):
            S, n = entries[name]
            writer.add_tensor(name + _SUMS, S)   # (n_mat, n_in)
            writer.add_tensor(name + _COUNTS, n)  # (n_mat, 1)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return write_atomic(path, _write)


def _field_value(reader: Any, key: str) -> Any:
    f = reader.get_field(key)
    return None if f is None else f.contents()


def read_imatrix(path: str | os.PathLike) -> Imatrix:
    """Read a GGUF imatrix (ours or llama-imatrix's) with the checks llama-quantize makes."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise BitallocError(f"{path} is not a readable GGUF imatrix ({e}). Legacy .dat files are not read; "
                            "convert one with llama-imatrix --in-file old.dat -o new.gguf.") from e
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    sums, counts = {}, {}
    for tname, data in tensors.items():
        if not tname.endswith(_SUMS):
            continue
        name = tname[: -len(_SUMS)]
        if name + _COUNTS not in tensors:
            raise BitallocError(f"{path}: {name} has sums but no counts.")
        n = tensors[name + _COUNTS].reshape(-1)  # (n_mat,)
        sums[name] = data.reshape(n.size, -1)    # (n_mat, n_in)
        counts[name] = np.rint(n)
    missing = [k for k in (_KEY_DATASETS, _KEY_CHUNK_COUNT, _KEY_CHUNK_SIZE) if reader.get_field(k) is None]
    if missing or not sums:
        raise BitallocError(f"{path} is not a complete imatrix: missing {missing or 'entries'}.")
    return Imatrix(sums, counts, tuple(_field_value(reader, _KEY_DATASETS)),
                   int(_field_value(reader, _KEY_CHUNK_COUNT)), int(_field_value(reader, _KEY_CHUNK_SIZE)))
