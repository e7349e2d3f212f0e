"""Weights read lazily, one tensor at a time: a model larger than memory.

A ``WeightSource`` gives each parameter of the model as transformers would
load it (float32, the model's parameter names and layout), read from disk
only when asked: the shards of a safetensors checkpoint (``safe_open``, one
shard mapped at a time) or a GGUF file (memory-mapped; each tensor
dequantized by gguf-py and renamed and re-laid-out by transformers' own GGUF
tensor processors, so the values are those ``from_pretrained`` gives). The
model itself is a skeleton on the meta device: its architecture, names and
shapes without weights, from the config alone.

``skeleton`` + ``WeightSource`` is what the streamed stages read (``api.stream``):
the unit walk, the content identity, the data-free error table and the RTN
quantized folder, with one tensor (an expert layer: one fused parameter)
resident at a time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from bitalloc.errors import BitallocError
from bitalloc.model.archs import arch_for
from bitalloc.model.loading import ModelSource, check_source
from bitalloc.model.units import Unit, disk_key, expert_units, unit_view


class WeightSource:
    """The parameters of one checkpoint, read on demand as float32 tensors
    under the model's own parameter names."""

    label: str

    def keys(self) -> frozenset[str]:  # the checkpoint's tensor names
        raise NotImplementedError

    def read(self, key: str) -> torch.Tensor:  # one stored tensor, float32, a fresh copy
        raise NotImplementedError

    def close(self) -> None:
        pass

    # ---- shared -----------------------------------------------------------
    def bind(self, model) -> "WeightSource":
        """Check that the checkpoint holds every parameter of ``model`` (a
        skeleton) at its shape, as transformers would refuse to load it
        otherwise; remember the shapes and the family's per-expert keys."""
        self._shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        self._spec = arch_for(getattr(model.config, "model_type", "") or "")
        keys = self.keys()
        self._renamed = {n: k for n, k in renamed_keys(model, keys).items() if n in self._shapes and n not in keys}
        for name, shape in self._shapes.items():
            if name not in keys and name not in self._renamed and not self._expert_keys(name, shape):
                raise BitallocError(f"The checkpoint {self.label} lacks the tensor {name!r} that its config calls for "
                                    "(or stores it under a name bitalloc cannot stream). It is damaged or belongs to "
                                    "another architecture; load it without --stream to let transformers convert it.")
        return self

    def _expert_keys(self, name: str, shape: tuple[int, ...]) -> list[tuple[Unit, str]] | None:
        """A fused (E, out, in) expert parameter stored one tensor per expert
        (and per gate/up half) on disk: its slices and their keys, or None."""
        if self._spec is None or len(shape) != 3:
            return None
        pairs = [(u, disk_key(u, self._spec)) for u in expert_units(name, shape)]
        keys = self.keys()
        return pairs if all(k is not None and k in keys for _, k in pairs) else None

    def parameter(self, name: str) -> torch.Tensor:
        """The whole parameter ``name`` as the model holds it (float32)."""
        shape = self._shapes[name]
        if name in self.keys() or name in self._renamed:
            t = self.read(self._renamed.get(name, name))
        else:
            t = torch.empty(shape, dtype=torch.float32)
            for unit, key in self._expert_keys(name, shape):
                unit_view(t, unit).copy_(self.read(key))
        if tuple(t.shape) != shape:
            raise BitallocError(f"The checkpoint {self.label} holds {name!r} as {list(t.shape)}, but its config "
                                f"gives {list(shape)}. It is damaged or belongs to another architecture.")
        return t

    def weight(self, unit: Unit) -> torch.Tensor:
        """The unit's (out, in) float32 weight, as ``units.get_weight`` gives it from a loaded model."""
        key = disk_key(unit, self._spec) if self._spec is not None and unit.index is not None else None
        if key is not None and key in self.keys() and unit.param not in self.keys():
            W = self.read(key)
        else:
            W = unit_view(self.parameter(unit.param), unit)
        W = W.t() if unit.transposed else W
        if tuple(W.shape) != unit.shape:
            raise BitallocError(f"The checkpoint {self.label} holds {unit.name!r} as {list(W.shape)}, but its config "
                                f"gives {list(unit.shape)}. It is damaged or belongs to another architecture.")
        return W.clone(memory_format=torch.contiguous_format) if W._base is not None else W.contiguous()

    def named_parameters(self, names) -> Iterator[tuple[str, torch.Tensor]]:
        for name in names:
            yield name, self.parameter(name)


def renamed_keys(model, keys) -> dict[str, str]:
    """Parameter name -> checkpoint key for the keys transformers renames
    while loading (e.g. Mixtral's ``block_sparse_moe.gate`` -> ``mlp.gate``),
    by transformers' own conversion table; keys it merges (per-expert
    tensors into a fused parameter) are left to ``disk_key``."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    transforms = get_model_conversion_mapping(model)
    if not transforms:
        return {}
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = model.state_dict()
    out = {}
    for key in keys:
        name, merged = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        if merged is None and name != key:
            out[name] = key
    return out


class SafetensorsSource(WeightSource):
    """A folder of ``*.safetensors`` shards (with or without the index file);
    at most one shard is mapped at a time."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder, self.label = Path(folder), str(folder)
        self._open = safe_open
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
            self._where = {k: self.folder / f for k, f in weight_map.items()}
        else:
            self._where = {}
            for f in sorted(self.folder.glob("*.safetensors")):
                with safe_open(str(f), framework="pt") as h:
                    self._where.update({k: f for k in h.keys()})
        self._keys = frozenset(self._where)
        if not self._where:
            raise BitallocError(f"The folder {self.label!r} holds no .safetensors weights; streaming reads safetensors "
                                "shards or a GGUF file. Convert .bin weights with save_pretrained(safe_serialization=True).")
        self._file: Path | None = None
        self._handle = None

    def keys(self) -> frozenset[str]:
        return self._keys

    def read(self, key: str) -> torch.Tensor:
        f = self._where[key]
        if f != self._file:
            self.close()
            self._handle, self._file = self._open(str(f), framework="pt"), f
        return self._handle.get_tensor(key).to(torch.float32)

    def close(self) -> None:
        self._handle, self._file = None, None


class GGUFSource(WeightSource):
    """A GGUF file, memory-mapped; each tensor dequantized by gguf-py and
    converted by transformers' tensor processor for the file's architecture
    (the tensor table from bitalloc's header reader: gguf-py's reader takes
    seconds to parse the vocabulary)."""

    def __init__(self, path: str | Path, model):
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        from bitalloc.model.gguf_header import read_gguf_header

        self.label = str(path)
        header = read_gguf_header(path)
        processor_class = TENSOR_PROCESSORS.get(header.architecture, TensorProcessor)
        if processor_class.__name__ not in _ONE_TO_ONE:
            raise BitallocError(f"The GGUF file {self.label!r} ({header.architecture}) stores tensors that "
                                "transformers merges while loading (experts); bitalloc cannot stream it. Drop "
                                "--stream, or stream the safetensors checkpoint instead.")
        # the processors read head counts from the config: the skeleton's, which transformers built from this file
        self._processor = processor_class(config=model.config.to_dict())
        self._data = np.memmap(path, mode="r")
        hf_names = gguf_names(model, self._processor)  # gguf name -> model parameter name
        self._tensors = {hf_names[t.name]: t for t in header.tensors if t.name in hf_names}
        self._keys = frozenset(self._tensors)

    def keys(self) -> frozenset[str]:
        return self._keys

    def read(self, key: str) -> torch.Tensor:
        from gguf import GGMLQuantizationType, dequantize

        info = self._tensors[key]
        kind = GGMLQuantizationType(info.type_id)
        data = _typed(self._data[info.offset:info.offset + info.n_bytes], kind, info.shape)
        if data.ndim == 2 and data.shape[0] > _ROWS:  # row by row block: gguf-py's temporaries stay small
            weights = np.empty(tuple(reversed(info.shape)), dtype=np.float32)
            for at in range(0, data.shape[0], _ROWS):
                weights[at:at + _ROWS] = dequantize(data[at:at + _ROWS], kind)
        else:
            weights = dequantize(data, kind)
        out = self._processor.process(weights=weights, name=info.name, tensor_key_mapping={},
                                      parsed_parameters={}).weights
        if not (out.dtype == np.float32 and out.flags.owndata and out.flags.writeable):
            out = np.array(out, dtype=np.float32)  # a view of the mapped file, or a reordered view: copied
        return torch.from_numpy(out)


_ROWS = 4096  # rows of a large GGUF tensor dequantized at a time


def _typed(raw: np.ndarray, kind, shape: tuple[int, ...]) -> np.ndarray:
    """A tensor's bytes as gguf-py's reader presents them to ``dequantize``:
    plain types as their numpy dtype, block types as rows of bytes."""
    from gguf import GGMLQuantizationType as T
    from gguf import quant_shape_to_byte_shape

    dims = tuple(reversed(shape))
    plain = {T.F32: np.float32, T.F16: np.float16, T.F64: np.float64, T.I8: np.int8, T.I16: np.int16,
             T.I32: np.int32, T.I64: np.int64}
    if kind in plain:
        return raw.view(plain[kind]).reshape(dims)
    return raw.reshape(quant_shape_to_byte_shape(dims, kind))


def gguf_names(model, processor) -> dict[str, str]:
    """transformers' GGUF name -> parameter name map for ``model``; gguf-py's
    tensor name table built once instead of once per submodule (seconds on a
    real model)."""
    import functools

    import gguf
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        return get_gguf_hf_weights_map(model, processor)
    finally:
        gguf.get_tensor_name_map = original


# transformers' GGUF processors that turn one file tensor into one model tensor
_ONE_TO_ONE = {"TensorProcessor", "LlamaTensorProcessor", "Gemma2TensorProcessor", "NemotronTensorProcessor",
               "GPT2TensorProcessor", "BloomTensorProcessor", "Lfm2TensorProcessor"}


def skeleton(source: ModelSource):
    """The model's architecture on the meta device (parameters and buffers
    without storage), from its config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from bitalloc.model.loading import _one_line, _quiet_load_report

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        with _quiet_load_report():
            config = AutoConfig.from_pretrained(source.path, **kwargs)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BitallocError(f"Could not build the architecture of {source.label} from its config: {_one_line(e)}. "
                            "Check the config.json (or the GGUF metadata), or upgrade transformers.") from e
    model.tie_weights()  # from_pretrained ties them too; on the meta device from_config does not
    return model.eval()


def check_streamable_source(source: ModelSource) -> None:
    """A local checkpoint whose files can be read (headers only)."""
    if source.kind == "hub":
        raise BitallocError(f"--stream reads local files; {source.path!r} is a hub id. Download it first "
                            "(huggingface-cli download) and pass the folder.")
    check_source(source)


def open_source(source: ModelSource, model) -> WeightSource:
    """The lazy reader of ``source``'s weights, checked against the skeleton ``model`` (the files' headers were
    checked before the skeleton was built: ``check_streamable_source``)."""
    if source.gguf_file:
        return GGUFSource(Path(source.path) / source.gguf_file, model).bind(model)
    return SafetensorsSource(source.path).bind(model)


def streamed_inventory(model, weights: WeightSource, *, embeddings: bool = False, progress=None):
    """The unit walk over the skeleton, with the content identity computed
    from the streamed weights, one parameter at a time (the same identity
    ``find_units`` gives the loaded model)."""
    from bitalloc.model.units import content_identity_of, find_units, model_identity

    names = sorted(n for n, _ in model.named_parameters())
    shown = progress(names, desc="reading weights (identity)", unit="tensor") if progress else names
    content = content_identity_of(model_identity(model), weights.named_parameters(shown))
    return find_units(model, embeddings=embeddings, content_id=content)
