"""The compressed-tensors export target: a plan of vLLM schemes
(``formats.wna16``) written as the Hugging Face folder that vLLM serves and
transformers loads (its compressed-tensors integration).

The packing, the tensor names and the ``quantization_config`` are produced by
the ``compressed-tensors`` package itself: each unit's codes, 16-bit scales
and integer zero points go through its ``pack-quantized`` compressor, the
config through its ``QuantizationConfig`` (one config group per scheme, the
module names as targets) and ``ModelCompressor.update_config``. Before the
folder is put in place every unit is decompressed by the same package and
must give back bitalloc's dequantized weight exactly (in the 16-bit type the
runtime holds it in); the folder is written atomically with ``plan.json`` and
``bitalloc.json`` (every file's sha256) beside the checkpoint.

Integer codes map one to one: bitalloc's unsigned code q with zero point z
(both in [0, 2^b - 1]) is compressed-tensors' signed q - 2^(b-1) with zero
point z - 2^(b-1); a symmetric unit's fixed zero 2^(b-1) becomes 0. A
symmetric scale may be negative (the largest-magnitude weight of a group
maps onto the code -2^(b-1), so all 2^b levels are used): stored as it is,
dequantized as (q - z) * scale like every other scale.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from bitalloc.errors import BitallocError
from bitalloc.fileio import dumps_json, file_digest, replace_dir_atomic
from bitalloc.formats.affine_rtn import QuantizedWeight, dequantize
from bitalloc.formats.menu import runtime_ties
from bitalloc.formats.wna16 import WNA16Option
from bitalloc.model.units import Inventory
from bitalloc.plan import Plan
from bitalloc.solve.problem import tie_groups_for

CT_FORMAT = "pack-quantized"
EXPORT_DTYPE = torch.float16  # scales are fp16 values: a bf16 checkpoint would round them
MANIFEST = "bitalloc.json"
MANIFEST_FORMAT = "bitalloc.compressed-tensors"


def check_exportable(plan: Plan, inventory: Inventory, where: str) -> None:
    """A plan vLLM can serve: every unit at a vLLM scheme, 16-bit kept
    tensors, no expert slices (not yet written per expert), and every fused
    layer (q/k/v, gate/up, the experts of one layer) in one scheme."""
    other = sorted({o.name for o in plan.assignment.values() if not isinstance(o, WNA16Option)})
    if other:
        raise BitallocError(f"The plan {where!r} assigns {', '.join(other[:3])}, which vLLM does not serve from a "
                            "compressed-tensors checkpoint. Plan with --format vllm (W4A16/W8A16 schemes, costs "
                            "counted as compressed-tensors stores them).")
    if plan.keep_bits != 16:
        raise BitallocError(f"The plan {where!r} keeps the other tensors at {plan.keep_bits} bits; vLLM runs the model "
                            "in 16 bits. Plan again with --keep-bits 16.")
    sliced = [u.name for u in inventory.units if u.index is not None or u.rows]
    if sliced:
        raise BitallocError(f"The plan {where!r} quantizes slices of fused parameters (e.g. {sliced[0]!r}); the "
                            "compressed-tensors export writes whole linear layers only so far.")
    for group in tie_groups_for(inventory, runtime_ties(inventory)):
        options = {plan.assignment[n].name for n in group if n in plan.assignment}
        if len(options) > 1:
            shown = ", ".join(f"{n.rsplit('.', 1)[-1]} {plan.assignment[n].name}" for n in group[:4])
            raise BitallocError(f"vLLM runs {group[0].rsplit('.', 1)[0]}.{{{','.join(n.rsplit('.', 1)[-1] for n in group)}}} "
                                f"as one fused layer in one scheme, but the plan {where!r} gives {shown}. Plan with "
                                "--format vllm, which ties them.")


def module_name(param: str) -> str:
    if not param.endswith(".weight"):
        raise BitallocError(f"{param!r} is not a linear layer's weight; the compressed-tensors export writes "
                            "nn.Linear weights only.")
    return param[: -len(".weight")]


def ct_scheme(option: WNA16Option, targets: list[str]):
    """The compressed-tensors QuantizationScheme of ``option`` over ``targets``."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    return QuantizationScheme(targets=targets, weights=QuantizationArgs(**option.scheme_args()))


def ct_module_state(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """One unit's uncompressed compressed-tensors state: the dequantized
    weight (float32, so that the library's rounding recovers every code),
    the fp16 scales and, asymmetric, the signed integer zero points."""
    state = {"weight": dequantize(qw), "weight_scale": qw.scales.to(EXPORT_DTYPE).contiguous()}
    if not qw.option.symmetric:
        zeros = qw.zeros.float()
        half = 2 ** (qw.option.bits - 1)
        if not bool(torch.equal(zeros, zeros.round())) or zeros.min() < 0 or zeros.max() > 2 * half - 1:
            raise BitallocError(f"{qw.option.name} needs integer zero points in [0, {2 * half - 1}]; this unit's are "
                                "not. Quantize it again.")
        state["weight_zero_point"] = (zeros - half).to(torch.int8)
    return state


def compress_units(inventory: Inventory, plan: Plan, stored: dict[str, QuantizedWeight]) -> dict[str, torch.Tensor]:
    """Every unit through compressed-tensors' pack-quantized compressor,
    checked by decompressing it again: the tensors under their on-disk names."""
    from compressed_tensors.compressors import BaseCompressor

    compressor = BaseCompressor.load_from_registry(CT_FORMAT)
    tensors: dict[str, torch.Tensor] = {}
    for unit in inventory.units:
        qw, prefix = stored[unit.name], module_name(unit.param)
        scheme = ct_scheme(plan.assignment[unit.name], [prefix])
        state = ct_module_state(qw)
        packed = compressor.compress(dict(state), scheme)
        back = compressor.decompress(dict(packed), scheme)["weight"]
        if not torch.equal(back.to(EXPORT_DTYPE), state["weight"].to(EXPORT_DTYPE)):
            diff = (back.float() - state["weight"]).abs().max().item()
            raise BitallocError(f"compressed-tensors does not give back {unit.name} as bitalloc stored it (max |Δ| "
                                f"{diff:.3g}); the export was not written. Report this with the plan.")
        for key, value in packed.items():
            tensors[f"{prefix}.{key}"] = value.contiguous()
    return tensors


def quantization_config(inventory: Inventory, plan: Plan, model) -> dict:
    """config.json's ``quantization_config``: one config group per scheme,
    targets the exact module names; linear layers left unquantized ignored."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    by_option: dict[str, list[str]] = {}
    for unit in inventory.units:
        by_option.setdefault(plan.assignment[unit.name].name, []).append(module_name(unit.param))
    options = {o.name: o for o in plan.assignment.values()}
    groups = {f"group_{i}": ct_scheme(options[name], targets) for i, (name, targets) in enumerate(sorted(by_option.items()))}
    planned = {module_name(u.param) for u in inventory.units}
    ignore = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in planned]
    return QuantizationConfig(config_groups=groups, format=CT_FORMAT, ignore=ignore,
                              quantization_status=QuantizationStatus.COMPRESSED)


def save_compressed(out_dir: str, model, tokenizer, inventory: Inventory, plan: Plan,
                    stored: dict[str, QuantizedWeight], where: str = "plan") -> Path:
    """Write the folder atomically; the same inputs give the same bytes."""
    from compressed_tensors.compressors import ModelCompressor
    from safetensors.torch import save_file

    check_exportable(plan, inventory, where)
    tensors = compress_units(inventory, plan, stored)
    for kept in inventory.kept:
        tensors[kept.name] = model.get_parameter(kept.name).detach().to(EXPORT_DTYPE).contiguous()
    qconfig = quantization_config(inventory, plan, model)

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        for key in ("quantization_config", "_name_or_path"):  # a GGUF source's marker; a local path
            config.pop(key, None)
        config["torch_dtype"] = config["dtype"] = "float16"
        (tmp / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True, default=str) + "\n")
        ModelCompressor(quantization_config=qconfig).update_config(str(tmp))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / "plan.json").write_text(dumps_json(plan.to_dict(inventory)))
        files = {p.name: {"sha256": file_digest(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())}
        schemes = Counter(plan.assignment[u.name].name for u in inventory.units)
        (tmp / MANIFEST).write_text(dumps_json({"format": MANIFEST_FORMAT, "version": 1, "schemes": dict(schemes),
                                                "model_identity": inventory.identity, "files": files}))

    return replace_dir_atomic(out_dir, fill)
