"""The checks a command makes before it loads a model: options that the
rest of the command line makes meaningless, recipes, defaults, the model's
files and position limit, and the text files."""

from __future__ import annotations

from bitalloc.errors import BitallocError
from bitalloc.quantizers import any_calibrated, any_orders_columns, any_sequential, quantizer
from bitalloc.scorers import any_calibrated as scorers_calibrated
from bitalloc.scorers import any_reads as scorers_read

# (flag, attribute, applies(args), why it would be ignored otherwise)
_SCORER_ONLY = (
    ("--alpha-gamma", "alpha_gamma", lambda a: _reads(a, "alpha_gamma"), "only the alpha scorers use it"),
    ("--alpha-fit", "alpha_fit", lambda a: _reads(a, "alpha_fit"), "only the alpha scorers use it"),
    ("--farms", "farms", lambda a: _reads(a, "alpha_farms"), "only the alpha scorers use it"),
    ("--probe-windows", "probe_windows", lambda a: _reads(a, "probe_windows"), "only kl, kl-block and linearity probe"),
    ("--probe-seq-len", "probe_seq_len", lambda a: _reads(a, "probe_seq_len"), "only kl, kl-block and linearity probe"),
    ("--kl-probes", "kl_probes", lambda a: _reads(a, "kl_probes"), "only the kl scorers probe options"),
    ("--kl-anchors", "kl_anchors", lambda a: _reads(a, "kl_anchors"), "only the kl-block scorer has anchors"),
    ("--act-order", "act_order", lambda a: any_orders_columns(a.quantizer), "only GPTQ orders columns"),
    ("--gptq-sequential", "gptq_sequential", lambda a: any_sequential(a.quantizer), "it is a GPTQ setting"),
    ("--gptq-one-shot", "gptq_one_shot", lambda a: any_sequential(a.quantizer), "it is a GPTQ setting"),
)


def _imatrix(args) -> bool:
    """Whether the plan quantizes with the importance matrix (the default of both menus)."""
    return not getattr(args, "no_imatrix", False)


def _reads(args, setting: str) -> bool:
    """Whether a chosen scorer reads ``ScorerSettings.<setting>`` (the scorer registry says)."""
    return scorers_read(_scorers_of(args), setting)


def _scorers_of(args) -> tuple[str, ...]:
    from bitalloc.scorers import SCORERS

    scorers = getattr(args, "scorers", None)
    if scorers is not None:
        if scorers != "all":
            return scorers
        store_mixed = getattr(args, "format", "int") == "int"  # GGUF types and vLLM schemes: one width per tensor
        return tuple(n for n, s in SCORERS.items() if store_mixed or not s.mixes_bits)
    return args.scorer or ("rtn-mse-rel",)


def _given(args, attr: str) -> bool:
    value = getattr(args, attr, None)
    return value is not None and value is not False and value != [] and value != ""


CALIB_FLAGS = (("--calib-text", "calib_text"), ("--calib-windows", "calib_windows"), ("--calib-seq-len", "calib_seq_len"))
INT_MENU_FLAGS = (("--bits", "bits"), ("--group-sizes", "group_sizes"), ("--schemes", "schemes"),
                  ("--allow-ragged-groups", "allow_ragged_groups"), ("--fine-groups", "fine_groups"))


def given_flags(args, flags) -> list[str]:
    """The flags of ``flags`` ((flag, attribute) pairs) given on this command line."""
    return [f for f, a in flags if _given(args, a)]


def refuse_ignored(args) -> None:
    """An option that the rest of the command line makes meaningless is an
    error, never silently dropped."""
    for flag, attr, applies, why in _SCORER_ONLY:
        if _given(args, attr) and not applies(args):
            raise BitallocError(f"{flag} would be ignored: {why}, and this command uses scorer(s) "
                                f"{', '.join(_scorers_of(args))} with quantizer(s) {', '.join(args.quantizer or ('rtn',))}.")
    calib = given_flags(args, CALIB_FLAGS)
    needs_calib = any_calibrated(args.quantizer) or scorers_calibrated(_scorers_of(args)) or _imatrix(args)
    if calib and not needs_calib:
        raise BitallocError(f"{calib[0]} would be ignored: nothing here calibrates (scorer(s) "
                            f"{', '.join(_scorers_of(args))} are data-free, the quantizer is RTN and --no-imatrix "
                            "turns the importance matrix off).")
    if args.format == "gguf":
        affine = given_flags(args, INT_MENU_FLAGS)
        if affine:
            raise BitallocError(f"{affine[0]} would be ignored: it shapes the integer menu, and --format gguf offers "
                                "GGUF types (choose them with --types).")
        from bitalloc.formats.menu import gguf_menu

        menu = gguf_menu(args.types)  # every named type exists in the installed ggml
        if args.keep_type and args.keep_type.strip().upper() not in {t.name for t in menu}:
            raise BitallocError(f"--keep-type {args.keep_type} is not in the menu of GGUF types "
                                f"({', '.join(t.name for t in menu)}).")
    if getattr(args, "over", None) and getattr(args, "bytes", None) is not None:
        raise BitallocError("--over would be ignored: a --bytes budget always counts the whole model.")
    if args.min_bits and args.max_bits and args.min_bits > args.max_bits:
        raise BitallocError(f"--min-bits {args.min_bits} is above --max-bits {args.max_bits}; no option fits.")


def _shown(value) -> str:
    """An option's value as typed: a comma list for tuples."""
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def apply_recipe(args) -> None:
    """--recipe NAME sets its options; one given explicitly that contradicts it is an error."""
    from bitalloc.cli.options import RECIPES

    name = getattr(args, "recipe", None)
    if not name:
        return
    recipe = RECIPES[name]
    if not all(quantizer(n).gguf for n in recipe.get("quantizer", ())) and getattr(args, "format", "int") == "gguf":
        raise BitallocError(f"--recipe {name} quantizes the integer menu with GPTQ; GGUF types are quantized by "
                            "ggml's own quantizers. With --format gguf use e.g. --scorer kl --refine-rounds 3.")
    if recipe.get("fine_groups") and _given(args, "group_sizes"):
        raise BitallocError(f"--group-sizes contradicts --recipe {name}, which uses the finer group-size menu "
                            "(--fine-groups). Drop one of them.")
    for key, value in recipe.items():
        given = getattr(args, key, None)
        if given not in (None, False) and given != value:
            flag = "--" + key.replace("_", "-")
            said = flag if isinstance(given, bool) else f"{flag} {_shown(given)}"
            sets = "" if isinstance(value, bool) else f", which sets {_shown(value)}"
            raise BitallocError(f"{said} contradicts --recipe {name}{sets}. Drop one of them.")
        setattr(args, key, value)


def fill_defaults(args) -> None:
    from bitalloc.cli.options import DEFAULTS, VLLM_DEFAULTS

    defaults = {**DEFAULTS, **(VLLM_DEFAULTS if getattr(args, "format", None) == "vllm" else {})}
    for key, value in defaults.items():
        if hasattr(args, key) and getattr(args, key) is None:
            setattr(args, key, value)


def check_model_source(model: str | None, lengths: dict[str, int], *, quantized: str | None = None,
                       args=None, defaulted: frozenset[str] = frozenset()) -> None:
    """The model's files can be read, and window lengths fit its position
    limit (from its config or GGUF header): all without loading it. A length
    in ``defaulted`` (left at its default, not typed) that does not fit is
    shortened to the limit on ``args`` instead of refused."""
    from bitalloc.model.loading import ModelSource, check_source, position_limit, resolve_source

    source = ModelSource("dir", quantized) if quantized else resolve_source(model)
    if not quantized:
        check_source(source)
    limit = position_limit(source)
    for flag, n in lengths.items():
        if limit is not None and n is not None and n > limit:
            if flag in defaulted:
                setattr(args, _attribute(flag), limit)
                continue
            raise BitallocError(f"{flag} {n} is longer than the model's position limit of {limit} tokens "
                                f"({source.label}); use at most {limit}.")


def read_texts(args) -> None:
    """Read --text and --calib-text once now, so that a missing or
    undecodable file fails before the model loads; say how much of a large
    one will be read."""
    import sys

    from bitalloc.evaluate.text import LARGE_TEXT_CAP, WIKITEXT2, LargeText, read_text_file

    for flag, path in (("--text", getattr(args, "text", None)), ("--calib-text", getattr(args, "calib_text", None))):
        if path and path != WIKITEXT2 and isinstance(text := read_text_file(path, args.encoding), LargeText):
            part = "its first windows' worth from the start" if flag == "--text" else \
                f"calibration windows spread over its first {LARGE_TEXT_CAP >> 20} MB"
            print(f"notice: {flag} {path!r} is {text.size / 1e6:.1f} MB; bitalloc reads and tokenizes only what it "
                  f"needs: {part}.", file=sys.stderr)


def _calib_lengths(args) -> dict[str, int]:
    out = {}
    if any_calibrated(args.quantizer) or scorers_calibrated(_scorers_of(args)) or _imatrix(args):
        out["--calib-seq-len"] = args.calib_seq_len
    if args.refine_rounds or not args.no_guard:
        out["--refine-seq-len"] = args.refine_seq_len
    if _reads(args, "probe_seq_len"):
        out["--probe-seq-len"] = args.probe_seq_len
    return out


LENGTH_FLAGS = ("--calib-seq-len", "--refine-seq-len", "--probe-seq-len", "--seq-len")


def _attribute(flag: str) -> str:
    return flag[2:].replace("-", "_")


def defaulted_lengths(args) -> frozenset[str]:
    """The window-length flags not given on this command line (call before fill_defaults)."""
    return frozenset(f for f in LENGTH_FLAGS if getattr(args, _attribute(f), None) is None)


def prepare_planning(args) -> None:
    """Everything a planning command checks before it loads the model."""
    apply_recipe(args)
    refuse_ignored(args)
    defaulted = defaulted_lengths(args)
    fill_defaults(args)
    check_report_path(args)
    lengths = _calib_lengths(args)
    if hasattr(args, "seq_len"):
        lengths["--seq-len"] = args.seq_len
    check_model_source(args.model, lengths, args=args, defaulted=defaulted)
    read_texts(args)


def check_report_path(args) -> None:
    from bitalloc.fileio import check_output_file

    check_output_file(getattr(args, "json", None), "bitalloc.report", flag="--json", overwrite=args.overwrite)


_INPUTS = (("--model", "model"), ("--quantized", "quantized"), ("--gguf", "gguf"), ("--reference", "reference"),
           ("the plan", "plan"), ("--table", "table"), ("--text", "text"), ("--calib-text", "calib_text"),
           ("--refine-from", "refine_from"))
_OUTPUTS = (("--out", "out"), ("--json", "json"), ("--save-table", "save_table"), ("--plans-dir", "plans_dir"),
            ("--tensor-types", "tensor_types"), ("--imatrix", "imatrix"))


def check_inputs_apart(args) -> None:
    """No output of this command is, holds, or lies inside one of its inputs
    (the model, plan, table, texts; the embedded model when no --model is
    given), and its outputs are distinct: refused before anything is read."""
    from pathlib import Path

    from bitalloc.fileio import check_apart
    from bitalloc.model.loading import embedded_source

    inputs = []
    for flag, attr in _INPUTS:
        value = getattr(args, attr, None)
        embedded = (attr == "model" and not value) or (attr == "reference" and value == "default")
        if embedded:
            try:
                source = embedded_source()
                value = str(Path(source.path) / source.gguf_file)
            except BitallocError:
                value = None
        if value and Path(value).expanduser().exists():
            inputs.append((flag, value))
    outputs = [(flag, getattr(args, attr)) for flag, attr in _OUTPUTS if getattr(args, attr, None)]
    check_apart(outputs, inputs)


def check_plan_architecture(plan, plan_path: str, model: str | None) -> None:
    """A plan made for another architecture is refused before the model
    loads (its parameter names and shapes, from the config alone)."""
    from bitalloc.errors import PlanMismatchError
    from bitalloc.model.loading import architecture_identity, resolve_source

    source = resolve_source(model)
    identity = architecture_identity(source)
    if identity is not None and identity != plan.model_identity:
        raise PlanMismatchError(f"The plan {plan_path!r} was made for another model ({plan.model_label}); "
                                f"{source.label} has other parameters or shapes. Make a plan for it with "
                                "`bitalloc plan`.")


def check_same_vocabulary(model_flag: str, model_source, reference: str | None) -> None:
    """KL against a reference compares two next-token distributions: both
    models must have one vocabulary. Read from their headers and configs,
    before either loads."""
    from bitalloc.model.loading import resolve_source, vocab_size

    if reference is None:
        return
    ref_source = resolve_source(reference or None)
    ours, theirs = vocab_size(model_source), vocab_size(ref_source)
    if ours is not None and theirs is not None and ours != theirs:
        raise BitallocError(f"{model_flag} {model_source.label} has a vocabulary of {ours} tokens and --reference "
                            f"{ref_source.label} one of {theirs}: KL and top-1 compare distributions over the same "
                            "tokens. Pass the model it was quantized from as --reference.")
