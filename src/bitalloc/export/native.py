"""The native export target: a quantized model saved as a folder that
transformers-style code reloads bit for bit: ``model.safetensors`` with the
bit-packed codes, fp16 scales and zeros of every unit and the kept tensors at
``keep_bits``; ``plan.json``; the config and tokenizer; and ``bitalloc.json``,
written last, with every other file's sha256 and size. Loading checks the
manifest, the stored tensors against the plan (shapes, dtypes, finiteness)
and the architecture before a weight is used."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from bitalloc.errors import BitallocError
from bitalloc.fileio import dumps_json, file_digest, read_json, replace_dir_atomic
from bitalloc.formats import parse_option
from bitalloc.formats.affine import QuantOption
from bitalloc.formats.affine_rtn import (
    PackedWeight,
    QuantizedWeight,
    dequantize,
    group_bits_of,
    packed_weight,
    unpack_weight_codes,
)
from bitalloc.model.units import (
    Inventory,
    Unit,
    get_weight,
    set_weight,
)
from bitalloc.plan import Plan
from bitalloc.quantizers.apply import keep_dtype
from bitalloc.schema import check_header, need

SAVED_FORMAT = "bitalloc.quantized"


SAVED_VERSION = 1


def _unit_record(unit: Unit, qw: QuantizedWeight | PackedWeight) -> dict:
    return {"param": unit.param, "shape": list(unit.shape), "index": unit.index, "transposed": unit.transposed,
            **({"rows": list(unit.rows)} if unit.rows else {}),
            "option": qw.option.name, "column_bits": None if qw.column_bits is None else list(qw.column_bits)}


MANIFEST = "bitalloc.json"  # written last; lists every other file with its sha256


def save_quantized(out_dir: str, model, tokenizer, inventory: Inventory, plan: Plan,
                   stored: dict[str, QuantizedWeight | PackedWeight], kept_tensor=None) -> Path:
    """Write the folder atomically (a temporary folder, then an atomic swap);
    the same inputs give the same bytes in every file. ``kept_tensor(name)``
    reads a kept parameter where ``model`` holds none (a streamed skeleton)."""
    from safetensors.torch import save_file

    kept_tensor = kept_tensor or (lambda name: model.get_parameter(name).detach())

    tensors: dict[str, torch.Tensor] = {}
    for unit in inventory.units:
        qw = packed_weight(stored[unit.name])  # a streamed model's units come packed
        tensors[f"{unit.name}.qweight"] = torch.from_numpy(qw.packed)
        tensors[f"{unit.name}.scales"] = qw.scales.contiguous()
        if qw.zeros is not None:
            tensors[f"{unit.name}.zeros"] = qw.zeros.contiguous()
    dtype = keep_dtype(plan.keep_bits)
    for kept in inventory.kept:
        tensors[kept.name] = kept_tensor(kept.name).to(dtype).contiguous()
    meta = {
        "format": SAVED_FORMAT,
        "version": SAVED_VERSION,
        "model_identity": inventory.identity,
        "model_content": inventory.content_id,
        "units": {u.name: _unit_record(u, stored[u.name]) for u in inventory.units},
        "kept": [k.name for k in inventory.kept],
    }

    def fill(tmp: Path) -> None:
        # one metadata key: safetensors writes a metadata map in no fixed order
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "plan.json").write_text(dumps_json(plan.to_dict(inventory)))
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # a GGUF source's marker; these weights are plain floats
        config.pop("_name_or_path", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True, default=str) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        files = {p.name: {"sha256": file_digest(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(dumps_json({**meta, "files": files}))

    return replace_dir_atomic(out_dir, fill)


def read_manifest(folder: str) -> dict:
    """The folder's bitalloc.json, checked, and every file it lists verified
    against its recorded size and sha256."""
    path = Path(folder)
    if not path.is_dir():
        raise BitallocError(f"--quantized {folder!r} is not a folder. Pass a folder written by `bitalloc quantize`.")
    if not (path / MANIFEST).is_file():
        raise BitallocError(f"{folder!r} is not a complete bitalloc quantized folder (no {MANIFEST}; an interrupted "
                            "save leaves none). Make it again with `bitalloc quantize`.")
    where = f"{folder}/{MANIFEST}"
    meta = check_header(read_json(path / MANIFEST, "quantized folder manifest"), SAVED_FORMAT, SAVED_VERSION, where,
                        "quantized folder manifest")
    files = need(meta, "files", "object", where)
    for key, kind in (("units", "object"), ("kept", "list")):
        need(meta, key, kind, where)
    for name in ("model.safetensors", "plan.json", "config.json"):
        if name not in files:
            raise BitallocError(f"{where} does not list {name}; the folder is damaged. Quantize again.")
    for name, rec in files.items():
        f = path / name
        if not f.is_file():
            raise BitallocError(f"{folder!r} lacks {name}, which its {MANIFEST} lists. The folder is damaged; quantize "
                                "again.")
        if not isinstance(rec, dict) or f.stat().st_size != rec.get("bytes") or file_digest(f) != rec.get("sha256"):
            raise BitallocError(f"{name} in {folder!r} does not match the sha256 recorded when it was written: the file "
                                "was changed or damaged. Quantize again.")
    return meta


def load_quantized(folder: str):
    """(model, tokenizer, plan) from a folder written by ``save_quantized``,
    every file verified first; unit weights are dequantized from the codes."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    meta = read_manifest(folder)
    path = Path(folder)
    the_plan = Plan.load(str(path / "plan.json"))
    try:
        config = AutoConfig.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_file(str(path / "model.safetensors"))
        check_stored_tensors(folder, tensors, meta, the_plan, model)
        with torch.no_grad():
            for name in meta["kept"]:
                p = model.get_parameter(name)
                p.copy_(tensors[name].to(p.dtype))
            for uname, rec in meta["units"].items():
                set_weight(model, _record_unit(uname, rec), dequantize(_stored_weight(tensors, uname, rec)))
    except (KeyError, ValueError, TypeError, AttributeError, RuntimeError) as e:
        raise BitallocError(f"{folder!r} does not hold the tensors its manifest describes ({e.__class__.__name__}: "
                            f"{e}). Quantize again.") from None
    model.tie_weights()
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path)) if (path / "tokenizer_config.json").is_file() else None
    return model, tokenizer, the_plan


def check_stored_tensors(folder: str, tensors: dict[str, torch.Tensor], meta: dict, plan: Plan, model) -> None:
    """Every tensor of the folder is what its plan says, before any is used:
    the manifest's units are the plan's, each at the plan's option and the
    model's shape; packed codes of exactly the bytes that option needs; fp16
    scales (and zeros, exactly when asymmetric) of one per group, all finite;
    kept tensors of the model's shapes at the plan's precision, finite; and
    nothing else. (The sha256 in bitalloc.json only proves the files were not
    changed after they were listed, not that they match the plan.)"""
    def refuse(what: str) -> None:
        raise BitallocError(f"{folder!r} holds {what}. The folder does not match its plan; quantize again.")

    units = meta["units"]
    if set(units) != set(plan.assignment):
        extra = sorted(set(units) ^ set(plan.assignment))
        refuse(f"units its plan.json does not assign, or misses some it does (e.g. {extra[0]})")
    expected = set(meta["kept"])
    for uname, rec in units.items():
        option = plan.assignment[uname]
        if rec.get("option") != option.name:
            refuse(f"{uname} at {rec.get('option')!r} where plan.json says {option.name}")
        unit = _record_unit(uname, rec)
        if tuple(get_weight(model, unit).shape) != unit.shape:
            refuse(f"{uname} of shape {list(unit.shape)}, but the model's is {list(get_weight(model, unit).shape)}")
        bits = None if rec.get("column_bits") is None else tuple(rec["column_bits"])
        for key, want in _stored_shapes(unit.shape, option, bits, plan.allow_ragged).items():
            name = f"{uname}.{key}"
            expected.add(name)
            t = tensors.get(name)
            if t is None:
                refuse(f"no tensor {name}, which {option.name} stores")
            if (t.dtype, tuple(t.shape)) != want:
                refuse(f"{name} as {str(t.dtype).replace('torch.', '')} {list(t.shape)}; {option.name} on "
                       f"{list(unit.shape)} stores {str(want[0]).replace('torch.', '')} {list(want[1])}")
            if key != "qweight" and not bool(torch.isfinite(t).all()):
                refuse(f"non-finite values (NaN or infinity) in {name}")
    for name in meta["kept"]:
        t, p = tensors.get(name), model.get_parameter(name)
        if t is None or tuple(t.shape) != tuple(p.shape) or t.dtype != keep_dtype(plan.keep_bits):
            refuse(f"{name} as {None if t is None else (str(t.dtype), list(t.shape))}, where the model keeps "
                   f"{list(p.shape)} at {plan.keep_bits} bits")
        if not bool(torch.isfinite(t).all()):
            refuse(f"non-finite values (NaN or infinity) in {name}")
    if set(tensors) - expected:
        refuse(f"tensors its plan does not describe (e.g. {sorted(set(tensors) - expected)[0]})")


def _stored_shapes(shape: tuple[int, int], option: QuantOption, column_bits, allow_ragged: bool) -> dict:
    """(dtype, shape) of each tensor one unit stores, from the option's
    definition: codes packed bit by bit, LSB first (a mixed option one stream
    per column group at its width), one fp16 scale per group and row, and as
    many fp16 zeros when asymmetric."""
    from bitalloc.formats.affine import group_count

    rows, cols = shape
    groups = group_count(cols, option, allow_ragged=allow_ragged and not option.mixed)
    if column_bits is None:
        packed = -(-rows * cols * option.bits // 8)
    else:
        group_bits_of(option, groups, column_bits)  # a valid vector: the right length and mean
        packed = sum(-(-rows * option.group_size * b // 8) for b in column_bits)
    out = {"qweight": (torch.uint8, (packed,)), "scales": (torch.float16, (rows, groups))}
    if not option.symmetric:
        out["zeros"] = (torch.float16, (rows, groups))
    return out


def _record_unit(name: str, rec: dict) -> Unit:
    rows = rec.get("rows")
    return Unit(name, rec["param"], tuple(rec["shape"]), rec["index"], rec["transposed"],
                rows=tuple(rows) if rows else None)


def _stored_weight(tensors: dict[str, torch.Tensor], name: str, rec: dict) -> QuantizedWeight:
    unit, opt = _record_unit(name, rec), parse_option(rec["option"])
    bits = None if rec.get("column_bits") is None else tuple(rec["column_bits"])
    codes = unpack_weight_codes(tensors[f"{name}.qweight"].numpy(), unit.shape, opt, bits)
    return QuantizedWeight(torch.from_numpy(np.ascontiguousarray(codes)), tensors[f"{name}.scales"],
                           tensors.get(f"{name}.zeros"), opt, bits)
