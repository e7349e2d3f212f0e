"""`bitalloc export PLAN --to gguf`: a plan of GGUF types written as a
llama.cpp model file, with the same importance matrix the plan was made
with, and for people who run llama-quantize themselves the plan as a
``--tensor-type-file`` and the imatrix as a file.

Orchestration only: names (Hugging Face unit -> GGUF tensor), the
importance vectors, and the calls into ``export.gguf`` and
``formats.imatrix``."""

from __future__ import annotations

from pathlib import Path

from bitalloc.errors import BitallocError
from bitalloc.formats import is_gguf


def gguf_names(inventory, n_blocks: int, arch: str) -> dict[str, str]:
    """Unit name -> GGUF tensor name. The token embedding (a tied pair
    included) is ``token_embd.weight``, an untied head ``output.weight``; the
    rest by gguf-py's name map for ``arch``."""
    from bitalloc.export.gguf import hf_to_gguf_names

    out = {}
    for name in inventory.embedding_units:
        u = inventory.unit(name)
        out[name] = "token_embd.weight" if u.param.endswith("embed_tokens.weight") or u.lookup else "output.weight"
    rest = [u.name for u in inventory.units if u.name not in out]
    out.update(hf_to_gguf_names(rest, n_blocks=n_blocks, arch=arch))
    return out


def check_plan_types(the_plan, plan_path: str) -> None:
    other = [(n, o.name) for n, o in the_plan.assignment.items() if not is_gguf(o)]
    if other:
        raise BitallocError(f"The plan {plan_path!r} assigns integer options (e.g. {other[0][0]}: {other[0][1]}); "
                            "a GGUF file stores GGUF types only. Make the plan with `bitalloc plan --format gguf`.")


def source_gguf(src) -> str:
    """The GGUF file of a model source, or a clear error saying how to make one."""
    if not src.gguf_file:
        raise BitallocError(f"`bitalloc export --to gguf` copies metadata and tokenizer from a GGUF source, and "
                            f"{src.label} is not one. Convert it with llama.cpp's converter (convert_hf_to_gguf.py "
                            "MODEL_DIR --outtype f16 --outfile model-f16.gguf) and pass --model model-f16.gguf; plans "
                            "made on the folder apply to it (same parameter names and shapes).")
    return str(Path(src.path) / src.gguf_file)


def _arch(path: str) -> str:
    from bitalloc.model.gguf_header import read_gguf_header

    return read_gguf_header(path).architecture or "llama"


def export_gguf(plan_path: str, out: str, *, model: str | None = None, settings=None, tensor_types: str | None = None,
                imatrix: str | None = None, progress: bool = True, loaded=None) -> dict:
    """Write ``out`` (and the optional recipe and imatrix files) from a plan
    of GGUF types; returns ``write_gguf``'s sizes plus the plan's prediction."""
    from bitalloc import api
    from bitalloc.export.gguf import tensor_type_recipe, write_gguf
    from bitalloc.fileio import write_atomic
    from bitalloc.plan import Plan

    the_plan = Plan.load(plan_path)
    check_plan_types(the_plan, plan_path)
    loaded = api.with_plan_units(loaded or api.load(model), the_plan)
    the_plan.check_model(loaded.inventory)
    source = source_gguf(loaded.source)
    names = gguf_names(loaded.inventory, loaded.model.config.num_hidden_layers, _arch(source))
    settings = settings or api.PlanSettings(the_plan.budget)

    importance = api.ensure_importance(loaded, settings, progress) if the_plan.uses_importance else {}
    types = {names[n]: o.name for n, o in the_plan.assignment.items()}
    vectors = {names[n]: v.numpy() for n, v in importance.items()
               if n in the_plan.assignment and the_plan.assignment[n].uses_importance}
    info = write_gguf(source, out, types, importance=vectors, progress=api._tqdm(progress))
    sizes = the_plan.sizes(loaded.inventory)
    info["plan_unit_bytes"] = sizes.quantized_bits / 8
    if tensor_types:
        recipe = tensor_type_recipe(types)
        write_atomic(tensor_types, lambda tmp: Path(tmp).write_text(recipe, encoding="utf-8"))
        info["tensor_types"] = tensor_types
    if imatrix:
        _write_imatrix(imatrix, importance, names, settings)
        info["imatrix"] = imatrix
    return info


def _write_imatrix(path: str, importance: dict, names: dict[str, str], settings) -> None:
    from bitalloc.formats.imatrix import write_imatrix

    tokens = settings.calib.windows * settings.calib.seq_len
    sums = {n: v.double().numpy() * tokens for n, v in importance.items()}
    label = settings.calib_text or "gensim enwiki sample, calibration half (odd-numbered articles)"
    write_imatrix(path, sums, {n: tokens for n in importance}, name_map=names, datasets=[label],
                  chunk_count=settings.calib.windows, chunk_size=settings.calib.seq_len)


