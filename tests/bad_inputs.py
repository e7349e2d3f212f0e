"""Bad and hostile inputs to every command, each with the one-line refusal a
user must see. ``tests/test_cli_bad_inputs.py`` runs them; running this file
regenerates the table in ``docs/bad-inputs.md`` from the same cases:

    .venv/bin/python tests/bad_inputs.py
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "bad-inputs.md"


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # {name} fields are workspace paths
    expect: str  # regex the message must match
    loads: bool = False  # True: refused after the model is loaded (it depends on the model)
    code: int = 2
    env: tuple[tuple[str, str], ...] = ()  # environment variables ({name} fields as in argv)


def C(id, argv, expect, *, env: dict | None = None, **kw) -> Case:
    words = argv.split()
    kw["env"] = tuple((env or {}).items())
    if words[:1] == ["--model"]:  # M + " plan ...": the command first, as a user types it
        words = [words[2], *words[:2], *words[3:]]
    return Case(id, tuple(words), expect, **kw)


M = "--model {tiny}"
CASES = (
    # ---- usage ------------------------------------------------------------
    C("no-command", "", "required: command"),
    C("unknown-command", "frobnicate", "invalid choice: 'frobnicate'"),
    C("unknown-option", "plan --bpw 3 --frob", "unrecognized arguments: --frob"),
    # ---- budgets ----------------------------------------------------------
    C("bpw-inf", "plan --bpw inf --out {new}", "finite number of bits per weight"),
    C("bpw-nan", "plan --bpw nan --out {new}", "finite number of bits per weight"),
    C("bpw-negative", "plan --bpw -1 --out {new}", "above 0 and at most 32"),
    C("bpw-zero", "plan --bpw 0 --out {new}", "above 0 and at most 32"),
    C("bpw-100", "plan --bpw 100 --out {new}", "above 0 and at most 32"),
    C("bpw-text", "plan --bpw abc --out {new}", "got 'abc'"),
    C("bpw-and-bytes", "plan --bpw 3 --bytes 1e6 --out {new}", "not allowed with argument --bpw"),
    C("bytes-negative", "plan --bytes -5 --out {new}", "whole number of bytes"),
    C("bytes-fraction", "plan --bytes 1.5 --out {new}", "whole number of bytes"),
    C("bytes-with-over", "plan --bytes 1e6 --over model --out {new}", "--over would be ignored"),
    C("no-budget", "plan --out {new}", "Give a budget"),
    C("run-bpw-list-negative", "run --bpw 3.5,-1", "got '-1'"),
    C("run-bpw-list-text", "run --bpw 3.5,abc", "got 'abc'"),
    C("run-bpw-list-empty-item", "run --bpw 3.5,", "one or more budgets"),
    C("run-bpw-duplicate", "run --bpw 3.5,3.5", "distinct budgets"),
    C("compare-budgets-text", "compare --budgets 3,x", "got 'x'"),
    C("bpw-infeasible-low", M + " plan --bpw 1 --out {new}", r"infeasible.*feasible budgets run from", loads=True),
    C("bpw-above-max", M + " plan --bpw 20 --out {new}", "above the largest allowed assignment", loads=True),
    C("bytes-too-small", M + " plan --bytes 1000 --out {new}", "infeasible", loads=True),
    C("bpw-max-bits-too-low", M + " plan --bpw 6 --max-bits 4 --out {new}", "above the largest allowed",
      loads=True),
    # ---- the option menu ----------------------------------------------------
    C("bits-1", "plan --bpw 3 --bits 1 --out {new}", r"one of \[2, 3, 4, 5, 6, 7, 8\]; got '1'"),
    C("bits-9", "plan --bpw 3 --bits 9 --out {new}", "got '9'"),
    C("bits-text", "plan --bpw 3 --bits 4,x --out {new}", "got 'x'"),
    C("bits-duplicate", "plan --bpw 3 --bits 4,4 --out {new}", "distinct bit-widths"),
    C("group-7", "plan --bpw 3 --group-sizes 7 --out {new}", "multiples of 16"),
    C("group-0", "plan --bpw 3 --group-sizes 0 --out {new}", "got '0'"),
    C("group-duplicate", "plan --bpw 3 --group-sizes 32,32 --out {new}", "distinct group sizes"),
    C("group-not-dividing", M + " plan --bpw 4 --group-sizes 48 --out {new}", "does not divide the 64 input columns",
      loads=True),
    C("schemes-nf4", "plan --bpw 3 --schemes nf4 --out {new}", "asym, sym or asym,sym"),
    C("min-bits-1", "plan --bpw 3 --min-bits 1 --out {new}", "got '1'"),
    C("min-above-max", "plan --bpw 3 --min-bits 6 --max-bits 4 --out {new}", "above --max-bits"),
    C("scorer-unknown", "plan --bpw 3 --scorer magic --out {new}", "unknown scorer 'magic'"),
    C("solver-unknown", "plan --bpw 3 --solver magic --out {new}", "invalid choice: 'magic'"),
    C("keep-bits-8", "plan --bpw 3 --keep-bits 8 --out {new}", "must be one of 16, 32; got '8'"),
    C("allow-without-equals", "plan --bpw 3 --allow novalue --out {new}", "UNIT_PATTERN=OPTION_PATTERN"),
    C("allow-empty-pattern", "plan --bpw 3 --allow =int4* --out {new}", "needs a unit pattern"),
    C("allow-matches-no-unit", M + " plan --bpw 4 --allow *.nomatch=int4* --out {new}", "matches no unit",
      loads=True),
    C("allow-matches-no-option", M + " plan --bpw 4 --allow *.q_proj=fp8* --out {new}", "match no option",
      loads=True),
    C("tie-unknown", M + " plan --bpw 4 --tie nonsense --out {new}", r"Unknown tie group\(s\) \['nonsense'\]",
      loads=True),
    C("tie-pattern-matches-nothing", M + " plan --bpw 4 --tie *.experts.*.w1.weight --out {new}",
      r"--tie pattern '\*\.experts\.\*\.w1\.weight' matches no unit", loads=True),
    # ---- options that would be ignored ------------------------------------
    C("alpha-gamma-without-alpha", "plan --bpw 3 --alpha-gamma 2 --out {new}", "--alpha-gamma would be ignored"),
    C("kl-anchors-without-kl-block", "plan --bpw 3 --scorer kl --kl-anchors 2 --out {new}",
      "--kl-anchors would be ignored"),
    C("kl-anchors-zero", "plan --bpw 3 --scorer kl-block --kl-anchors 0 --out {new}", "a whole number from 1"),
    C("probe-windows-without-probes", "plan --bpw 3 --probe-windows 4 --out {new}", "--probe-windows would be ignored"),
    C("act-order-with-rtn", "plan --bpw 3 --act-order --out {new}", "--act-order would be ignored"),
    C("gptq-one-shot-with-rtn", "plan --bpw 3 --gptq-one-shot --out {new}", "--gptq-one-shot would be ignored"),
    C("gptq-one-shot-and-sequential", "plan --quantizer gptq --gptq-one-shot --gptq-sequential --bpw 3 --out {new}",
      "not allowed with argument --gptq-one-shot"),
    C("refine-from-without-rounds", "plan --bpw 3 --refine-from {missing} --out {new}", "give --refine-rounds N"),
    C("refine-from-missing", "plan --bpw 3 --refine-rounds 1 --refine-from {missing} --out {new}", "does not exist"),
    C("refine-from-not-a-plan", "plan --bpw 3 --refine-rounds 1 --refine-from {text} --out {new}", "is not valid JSON"),
    C("recipe-quality-one-shot", "plan --recipe quality --gptq-one-shot --bpw 4 --out {new}",
      "contradicts --recipe quality"),
    C("calib-windows-data-free", "plan --bpw 3 --no-imatrix --calib-windows 4 --out {new}",
      "--calib-windows would be ignored"),
    C("table-with-bits", "plan --bpw 3 --table {table} --bits 4 --out {new}", "--bits would be ignored"),
    C("table-with-calib-text", "plan --bpw 3 --table {table} --no-imatrix --calib-text {text} --out {new}",
      "--calib-text would be ignored"),
    C("dry-run-with-out", "plan --bpw 3 --dry-run --out {new}", "--dry-run writes nothing"),
    C("plan-without-out", "plan --bpw 3", "needs --out FILE"),
    C("quantize-rtn-plan-with-calib", "quantize --plan {plain_plan} --out {newdir} --calib-windows 4",
      "--calib-windows would be ignored: the plan .* quantizes by RTN"),
    # ---- counts and lengths -------------------------------------------------
    C("calib-windows-0", "plan --bpw 3 --scorer hessian --calib-windows 0 --out {new}", "from 1 to"),
    C("alpha-gamma-inf", "plan --bpw 3 --scorer alpha --alpha-gamma inf --out {new}", "a finite number"),
    C("windows-0", "eval --windows 0", "from 1 to"),
    C("windows-negative", "eval --windows -3", "got '-3'"),
    C("seq-len-1", "eval --seq-len 1", "from 2 to"),
    C("seq-len-past-positions", M + " eval --seq-len 100000", "longer than the model's position limit of 256"),
    C("seq-len-just-past-positions", M + " eval --seq-len 257", "position limit of 256"),
    C("calib-seq-len-past-positions", M + " plan --bpw 4 --scorer hessian --calib-seq-len 300 --out {new}",
      "--calib-seq-len 300 is longer than the model's position limit"),
    C("windows-past-the-text", M + " eval --windows 5000 --seq-len 64 --text {text}", "enough for", loads=True),
    C("run-windows-past-the-text", M + " run --bpw 4 --windows 5000 --seq-len 64 --text {text}", "enough for",
      loads=True),
    C("calib-text-too-short", M + " plan --bpw 4 --scorer hessian --calib-text {short} --calib-seq-len 64 --out {new}",
      "Use fewer --calib-windows", loads=True),
    C("bos-maybe", "eval --bos maybe", "invalid choice: 'maybe'"),
    # ---- text -----------------------------------------------------------------
    C("text-missing", "eval --text {missing}", "does not exist"),
    C("text-folder", "eval --text {folder}", "is a folder"),
    C("text-random-bytes", "eval --text {random}", "is not valid utf-8"),
    C("text-empty", "eval --text {empty}", "is empty"),
    C("text-nul", "eval --text {nul}", "holds NUL characters"),
    C("encoding-unknown", "eval --encoding klingon", "not a text encoding Python knows"),
    C("calib-text-random-bytes", "plan --bpw 3 --scorer hessian --calib-text {random} --out {new}",
      "is not valid utf-8"),
    # ---- models -----------------------------------------------------------------
    C("model-missing", "plan --bpw 3 --model {missing} --out {new}", "does not exist"),
    C("model-not-gguf", "plan --bpw 3 --model {text} --out {new}", "not a .gguf file"),
    C("model-folder-without-config", "plan --bpw 3 --model {folder} --out {new}", "has no config.json"),
    C("model-empty-gguf", "plan --bpw 3 --model {empty_gguf} --out {new}", "is empty"),
    C("model-random-gguf", "plan --bpw 3 --model {random_gguf} --out {new}", "does not start with the GGUF magic"),
    C("model-truncated-gguf", "plan --bpw 3 --model {truncated_gguf} --out {new}", "damaged or truncated"),
    C("model-corrupt-safetensors", "plan --bpw 3 --model {corrupt_st} --out {new}", "damaged or truncated"),
    C("model-truncated-safetensors", "plan --bpw 3 --model {truncated_st} --out {new}", "damaged or truncated"),
    C("model-without-weights", "plan --bpw 3 --model {no_weights} --out {new}", "has a config.json but no weights file"),
    # ---- plan files ---------------------------------------------------------------
    C("plan-missing", "quantize --plan {missing} --out {newdir}", "does not exist"),
    C("plan-not-json", "quantize --plan {text} --out {newdir}", "is not valid JSON"),
    C("plan-empty-object", "quantize --plan {plan_empty} --out {newdir}", "is not a bitalloc plan"),
    C("plan-without-model", "quantize --plan {plan_no_model} --out {newdir}", "lacks the field 'model'"),
    C("plan-units-list", "quantize --plan {plan_units_list} --out {newdir}", "field 'units' must be an object"),
    C("plan-option-number", "quantize --plan {plan_option_number} --out {newdir}", r"units\[.*\] must be a string"),
    C("plan-option-unknown", "quantize --plan {plan_option_unknown} --out {newdir}", "Unknown option name 'int4'"),
    C("plan-budget-inf", "quantize --plan {plan_budget_inf} --out {newdir}", "'value' must be a finite number"),
    C("plan-version-99", "quantize --plan {plan_version} --out {newdir}", "version 99"),
    C("plan-other-model", M + " quantize --plan {plan_other} --out {newdir}", "was made for another model"),
    C("quantize-without-plan", "quantize --out {newdir}", "required: --plan"),
    # ---- error tables --------------------------------------------------------------
    C("table-other-scorer", "plan --bpw 3 --table {table} --scorer kl --out {new}", "cannot serve scorer 'kl'"),
    C("table-missing", "plan --bpw 3 --table {missing} --out {new}", "does not exist"),
    C("table-not-json", "plan --bpw 3 --table {text} --out {new}", "is not valid JSON"),
    C("table-is-a-plan", "plan --bpw 3 --table {plan} --out {new}", "is not a bitalloc error table"),
    C("table-units-list", "plan --bpw 3 --table {table_units_list} --out {new}", "field 'units' must be an object"),
    C("table-short-row", "plan --bpw 3 --table {table_short_row} --out {new}", "entries; expected"),
    C("table-other-model", M + " plan --bpw 4 --table {table_other} --out {new}", "another model or checkpoint",
      loads=True),
    # ---- outputs -----------------------------------------------------------------
    C("plan-out-user-file", "plan --bpw 3 --out {user_file}", "was not written by bitalloc as a plan"),
    C("plan-out-folder", "plan --bpw 3 --out {folder}", "is a folder; give a file path"),
    C("plan-out-under-a-file", "plan --bpw 3 --out {user_file}/plan.json", "is a file, not a folder"),
    C("plan-json-user-file", "plan --bpw 3 --out {new} --json {user_file}", "--json .* was not written by bitalloc"),
    C("save-table-user-file", "plan --bpw 3 --out {new} --save-table {user_file}", "--save-table .* was not written by bitalloc"),
    C("quantize-out-user-folder", "quantize --plan {plan} --out {folder}", "holds files bitalloc did not write"),
    C("quantize-out-user-file", "quantize --plan {plan} --out {user_file}", "is an existing file"),
    C("quantize-out-under-a-file", "quantize --plan {plan} --out {user_file}/q", "is a file, not a folder"),
    C("eval-json-user-file", "eval --json {user_file}", "--json .* was not written by bitalloc"),
    C("run-plans-dir-user-file", "run --bpw 3.5 --plans-dir {plans_dir}", "--plans-dir file .* was not written by bitalloc"),
    C("compare-out-user-file", "compare --out {user_file}", "is an existing file"),
    C("compare-out-user-folder", "compare --out {folder}", "holds files bitalloc did not write"),
    C("demo-out-user-file", "demo --out {user_file}", "is an existing file"),
    C("demo-out-user-folder", "demo --out {folder}", "holds files bitalloc did not write"),
    C("demo-windows-0", "demo --windows 0", "from 1 to"),
    C("demo-unknown-preset", "demo --preset Q9_K", "invalid choice: 'Q9_K'"),
    # ---- inputs that pass the schema but lie ----------------------------------------------
    C("quantized-wrong-packed-size", "eval --quantized {q_int2_codes} --seq-len 64",
      r"q_proj\.(qweight|scales|zeros) as \w+ \[[\d, ]+\]; int\d-\S+ on \[64, 64\] stores", loads=True),
    C("quantized-nan-scale", "eval --quantized {q_nan_scale} --seq-len 64", r"non-finite values \(NaN or infinity\) in .*\.scales",
      loads=True),
    C("quantized-extra-tensor", "eval --quantized {q_extra_tensor} --seq-len 64", "tensors its plan does not describe", loads=True),
    C("checkpoint-missing-tensor", "plan --model {missing_tensor} --bpw 4 --out {new}",
      r"lacks tensors its config calls for: model\.layers\.1\.mlp\.down_proj\.weight", loads=True),
    C("checkpoint-unexpected-tensor", "plan --model {extra_tensor} --bpw 4 --out {new}",
      "holds tensors its config has no place for: extra.weight", loads=True),
    C("table-negative-distortion", "plan --table {table_negative} --bpw 4 --out {new}",
      "distortions are finite and at least 0"),
    C("table-negative-importance", "plan --table {table_negative_importance} --bpw 4 --out {new}",
      "has importance -5.0; importances are finite and at least 0"),
    C("plan-edited-budget", M + " quantize --plan {plan_edited_budget} --out {newdir}",
      "more than its budget of 2 bpw over the quantized weights: the file was edited", loads=True),
    C("plan-extra-unit", M + " quantize --plan {plan_extra_unit} --out {newdir}",
      "assigns 1 unit\\(s\\) this model does not have", loads=True),
    C("plan-duplicate-key", "quantize --plan {plan_duplicate_key} --out {newdir}", "holds the key .* twice"),
    C("plan-nested-deep", "quantize --plan {plan_nested} --out {newdir}", "nested too deeply"),
    C("eval-gguf-other-vocabulary", "eval --gguf {vocab32_gguf} --reference {tiny} --seq-len 32",
      "vocabulary of 32 tokens and --reference .* one of 128"),
    # ---- outputs that would overwrite inputs --------------------------------------------------
    C("quantize-out-is-the-model", "quantize --model {tiny_copy} --plan {plan} --out {tiny_copy} --overwrite",
      "is the input of --model"),
    C("quantize-out-inside-the-model", "quantize --model {tiny_copy} --plan {plan} --out {tiny_copy}/q",
      "lies inside the input of --model"),
    C("compare-out-holds-the-model", "compare --model {tiny_copy} --out {tiny_parent} --overwrite",
      "contains the input of --model"),
    C("plan-out-is-save-table", "plan --bpw 3 --out {new} --save-table {new}", "name the same place"),
    C("plan-out-is-the-table", "plan --table {table_copy} --bpw 4 --out {table_copy} --overwrite",
      "is the input of --table"),
    C("eval-json-is-the-text", "eval --text {text} --json {text} --overwrite", "is the input of --text"),
    C("plan-out-symlink", "plan --bpw 3 --out {link}", "is a symbolic link"),
    # ---- one line that names the fix ------------------------------------------------------------
    C("text-dev-zero", "eval --text /dev/zero", "is not a regular file"),
    C("text-fifo", "eval --text {fifo}", "is not a regular file"),
    C("model-fifo", "plan --model {fifo} --bpw 4 --out {new}", "is not a regular file or folder"),
    C("cache-is-a-file", "plan --bpw 3 --out {new}", "BITALLOC_CACHE=.* is a file, not a folder",
      env={"BITALLOC_CACHE": "{user_file}"}),
    C("cache-under-a-file", "plan --bpw 3 --out {new}", "BITALLOC_CACHE=.* cannot be made: .* is a file",
      env={"BITALLOC_CACHE": "{user_file}/cache"}),
    C("bpw-underscore", "plan --bpw 0_5 --out {new}", "digits without '_'"),
    C("windows-underscore", "eval --windows 1_0", "digits without '_'"),
    # ---- quantized folders ------------------------------------------------------------
    C("quantized-missing", "eval --quantized {missing}", "is not a folder"),
    C("quantized-without-manifest", "eval --quantized {folder}", "no bitalloc.json"),
    C("quantized-flipped-byte", "eval --quantized {q_flipped}", "does not match the sha256"),
    C("quantized-missing-weights", "eval --quantized {q_no_weights}", "lacks model.safetensors"),
    C("quantized-bad-manifest", "eval --quantized {q_bad_manifest}", "is not valid JSON"),
    C("model-and-quantized", "eval --model {tiny} --quantized {q}", "not allowed with argument --model"),
    C("gguf-not-gguf", "eval --gguf {text}", "is not a .gguf file"),
    C("gguf-missing", "eval --gguf {missing}.gguf", "does not exist"),
    C("gguf-random-bytes", "eval --gguf {random_gguf}", "does not start with the GGUF magic"),
    C("gguf-and-quantized", "eval --gguf {random_gguf} --quantized {q}", "not allowed with argument --gguf"),
    # ---- GGUF types as options, export, compare with llama.cpp presets --------------------
    C("gguf-with-bits", "plan --format gguf --bits 4 --bpw 5 --out {new}", "--bits would be ignored"),
    C("gguf-fine-groups", "plan --format gguf --fine-groups --bpw 5 --out {new}", "--fine-groups would be ignored"),
    C("gguf-with-quality-recipe", "plan --format gguf --recipe quality --bpw 5 --out {new}",
      "--recipe quality quantizes the integer menu with GPTQ"),
    C("recipe-quality-group-sizes", "plan --recipe quality --group-sizes 64 --bpw 4 --out {new}",
      "--group-sizes contradicts --recipe quality"),
    C("recipe-quality-objective", "plan --recipe quality --refine-objective kl --bpw 4 --out {new}",
      "--refine-objective kl contradicts --recipe quality, which sets nll"),
    C("gguf-type-unknown", "plan --format gguf --types Q4_K,Q9_K --bpw 5 --out {new}", "Unknown or unsupported GGUF type"),
    C("types-without-gguf", "plan --types Q4_K --bpw 5 --out {new}", "add --format gguf"),
    C("gguf-with-gptq", "plan --format gguf --quantizer gptq --bpw 5 --out {new}", "not by GPTQ"),
    C("gguf-with-salience", "plan --format gguf --scorer salience --bpw 5 --out {new}", "cannot store"),
    C("keep-type-without-embeddings", "plan --keep-type int8-pc-sym --bpw 4 --out {new}", "only with --embeddings"),
    C("keep-type-not-gguf-menu", "plan --format gguf --keep-type Q4_K --types Q8_0,F16 --bpw 9 --out {new}",
      "is not in the menu"),
    C("keep-type-not-int-menu", M + " plan --embeddings --keep-type int4-g128-sym --bpw 4 --out {new}",
      "is not in the menu", loads=True),
    C("export-missing-plan", "export {missing} --out {new}.gguf", "does not exist"),
    C("export-int-plan", "export {plan} --out {new}.gguf", "assigns integer options"),
    C("export-hf-source", M + " export {gguf_plan} --out {new}.gguf", "is not one. Convert it"),
    C("plan-option-does-not-fit", M + " quantize --plan {plan_unfit} --out {newdir}", "its 64 input columns are not "
      "a multiple", loads=True),
    C("export-out-exists", "export {gguf_plan} --out {user_file}", "already exists; bitalloc replaces it only"),
    C("export-out-folder", "export {gguf_plan} --out {folder}", "is a folder"),
    C("export-same-files", "export {gguf_plan} --out {new}.gguf --tensor-types {new}.gguf", "name the same place"),
    C("export-imatrix-without", "export {gguf_plan} --out {new}.gguf --imatrix {new}.imatrix", "--imatrix would be ignored"),
    C("export-to-other", "export {gguf_plan} --to safetensors --out {new}.gguf", "invalid choice: 'safetensors'"),
    # ---- the vLLM menu and the compressed-tensors export ----------------------------------
    C("vllm-bits", M + " plan --format vllm --bits 3,4 --bpw 5 --out {new}", r"offers \[4, 8\] bits", loads=True),
    C("vllm-group-size", M + " plan --format vllm --group-sizes 48 --bpw 5 --out {new}", "takes group sizes",
      loads=True),
    C("vllm-salience", "plan --format vllm --scorer salience --bpw 5 --out {new}", "vLLM schemes cannot store"),
    C("vllm-embeddings", "plan --format vllm --embeddings --bpw 5 --out {new}", "serves the token embedding"),
    C("vllm-fine-groups", "plan --format vllm --fine-groups --bpw 5 --out {new}", "has no place in --format vllm"),
    C("export-ct-int-plan", M + " export {plan} --to compressed-tensors --out {newdir}", "vLLM does not serve",
      loads=True),
    C("export-ct-broken-tie", M + " export {vllm_plan_untied} --to compressed-tensors --out {newdir}",
      "as one fused layer in one scheme", loads=True),
    C("export-ct-tensor-types", M + " export {vllm_plan} --to compressed-tensors --out {newdir} --tensor-types {new}",
      "--tensor-types would be ignored"),
    C("export-ct-out-file", M + " export {vllm_plan} --to compressed-tensors --out {user_file}",
      "is an existing file"),
    # ---- the KV cache -------------------------------------------------------------------
    C("kv-codec-unknown", "kv --codecs int4,fp8", "Unknown KV cache codec 'fp8'"),
    C("kv-ladder-unknown", "kv --ladder rot2,rot4,q3_k", "Unknown KV cache codec 'q3_k'"),
    C("kv-budget-negative", "kv --budgets 3,-1", "got '-1'"),
    C("kv-plan-missing", "kv --plan {missing}", "KV plan file .* does not exist"),
    C("kv-plan-weights", "kv --plan {plan}", "is not a bitalloc KV cache plan"),
    C("kv-plan-with-budgets", "kv --plan {kvplan_other} --budgets 3", "--budgets would be ignored"),
    C("kv-llamacpp-not-gguf", "kv --llamacpp {text}", "is not a .gguf file"),
    C("kv-llamacpp-hf-model", M + " kv --llamacpp --seq-len 64 --calib-seq-len 32 --out {newdir}",
      "needs a .gguf model"),
    C("kv-seq-len-too-long", M + " kv --out {newdir}", "--seq-len 2048 is longer than the model's position limit"),
    C("kv-budget-infeasible", M + " kv --budgets 1 --codecs rot2,int8 --seq-len 64 --calib-seq-len 32 --out {newdir}",
      r"below what the codecs .* reach at head dimension 16: \[3\.0000, 10\.0000\]", loads=True),
    C("kv-plan-other-model", M + " kv --plan {kvplan_other} --out {newdir} --seq-len 32 --windows 1",
      "The KV plan is for a cache of", loads=True),
    C("stream-probe-scorer", "plan --stream --scorer kl --bpw 4 --out {new}", "--stream scores from the weights alone"),
    C("stream-gptq", "plan --stream --quantizer gptq --bpw 4 --out {new}", "--stream quantizes without calibration"),
    C("stream-refine", "plan --stream --refine-rounds 1 --bpw 4 --out {new}", "--refine-rounds needs them"),
    C("stream-hub-id", "plan --stream --model someorg/some-model --bpw 4 --out {new}", "--stream reads local files"),
    C("stream-bin-weights", "plan --stream --model {bin_weights} --bpw 4 --out {new}",
      "holds no .safetensors weights", loads=True),
    C("stream-missing-tensor", "plan --stream --model {lacking_st} --bpw 4 --out {new}",
      "lacks the tensor 'model.layers.1.mlp.down_proj.weight'", loads=True),
    C("stream-truncated-shard", "plan --stream --model {truncated_st} --bpw 4 --out {new}", "damaged or truncated"),
    C("stream-quantize-imatrix-plan", "quantize --stream --plan {plan} --out {newdir}",
      "--stream quantizes without calibration; the plan .* needs an importance matrix"),
    C("ray-without-stream", "plan --ray --bpw 4 --out {new}", "add --stream"),
    C("ray-workers-without-ray", "plan --stream --ray-workers 3 --bpw 4 --out {new}", "would be ignored without --ray"),
    C("ray-workers-0", "plan --stream --ray --ray-workers 0 --bpw 4 --out {new}", "from 1 to 1024"),
    C("compare-gguf-budgets", "compare --format gguf --budgets 3.5", "--budgets would be ignored"),
    C("compare-presets-int", "compare --presets Q4_K_M", "--presets would be ignored"),
    C("compare-gguf-preset-unknown", "compare --format gguf --presets Q4_K_X --out {newdir}", "Unknown llama.cpp preset"),
    C("compare-gguf-hf-source", M + " compare --format gguf --out {newdir}", "is not one. Convert it"),
)


# ---- the workspace the cases run in ---------------------------------------

def _write(path: Path, data) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    elif isinstance(data, str):
        path.write_text(data)
    else:
        path.write_text(json.dumps(data))
    return str(path)


def _tiny_gguf(path: Path, tokens: int = 0) -> None:
    import numpy as np
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    if tokens:
        w.add_tokenizer_model("gpt2")
        w.add_token_list([f"t{i}" for i in range(tokens)])
    w.add_tensor("token_embd.weight", np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def build_workspace(root: Path) -> dict[str, str]:
    """Models, texts, plans, tables and folders (good and damaged) under ``root``."""
    import numpy as np

    from bitalloc import api
    from bitalloc.solve.problem import Budget
    from conftest import char_tokenizer, tiny_llama

    rng = np.random.default_rng(0)
    ws: dict[str, str] = {"new": str(root / "new-plan.json"), "newdir": str(root / "new-folder"),
                          "missing": str(root / "missing")}
    for name, model in (("tiny", tiny_llama()), ("other", tiny_llama(intermediate_size=96))):
        model.save_pretrained(root / name)
        char_tokenizer().save_pretrained(root / name)
        ws[name] = str(root / name)
    from bitalloc.evaluate.text import wiki_text

    ws["text"] = _write(root / "text.txt", wiki_text("eval")[:6000])
    ws["short"] = _write(root / "short.txt", "Too short to calibrate on.")
    ws["random"] = _write(root / "random.bin", rng.integers(128, 256, 4096, dtype=np.uint8).tobytes())
    ws["empty"] = _write(root / "empty.txt", "   \n")
    ws["nul"] = _write(root / "nul.txt", "text\x00with a NUL")
    ws["folder"] = _write(root / "folder" / "notes.txt", "a user's notes").rsplit("/", 1)[0]
    ws["user_file"] = _write(root / "user-file.txt", "precious")
    ws["plans_dir"] = _write(root / "plans" / "plan-rtn-mse-rel-3.5.json", "not a plan").rsplit("/", 1)[0]
    ws["empty_gguf"] = _write(root / "empty.gguf", b"")
    ws["random_gguf"] = _write(root / "random.gguf", rng.bytes(4096))
    _tiny_gguf(root / "whole.gguf")
    ws["truncated_gguf"] = _write(root / "truncated.gguf", (root / "whole.gguf").read_bytes()[:2000])
    (root / "whole.gguf").unlink()
    for name, cut in (("corrupt_st", lambda b: b"\xff" * 64 + b[64:]), ("truncated_st", lambda b: b[: len(b) // 2]),
                      ("no_weights", lambda b: None)):
        folder = root / name
        folder.mkdir()
        (folder / "config.json").write_text((root / "tiny" / "config.json").read_text())
        data = cut((root / "tiny" / "model.safetensors").read_bytes())
        if data is not None:
            (folder / "model.safetensors").write_bytes(data)
        ws[name] = str(folder)

    from safetensors.torch import load_file, save_file

    lacking = root / "lacking_st"  # a checkpoint without one tensor its config calls for
    lacking.mkdir()
    (lacking / "config.json").write_text((root / "tiny" / "config.json").read_text())
    tensors = load_file(str(root / "tiny" / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.down_proj.weight"},
              str(lacking / "model.safetensors"))
    ws["lacking_st"] = str(lacking)
    (root / "bin_weights").mkdir()  # a checkpoint in pytorch_model.bin only
    (root / "bin_weights" / "config.json").write_text((root / "tiny" / "config.json").read_text())
    import torch

    torch.save(tensors, root / "bin_weights" / "pytorch_model.bin")
    ws["bin_weights"] = str(root / "bin_weights")

    tiny, other = api.load(ws["tiny"]), api.load(ws["other"])
    from bitalloc.calib.grams import CalibSettings

    settings = api.PlanSettings(Budget(4.0), calib=CalibSettings(8, 128))  # fits the tiny model's 256 positions
    ws["plan"], ws["table"] = str(root / "plan.json"), str(root / "table.json")
    api.plan(settings=settings, loaded=tiny, out=ws["plan"], save_table=ws["table"], progress=False)
    ws["plan_other"], ws["table_other"] = str(root / "plan-other.json"), str(root / "table-other.json")
    api.plan(settings=settings, loaded=other, out=ws["plan_other"], save_table=ws["table_other"], progress=False)
    ws["plain_plan"] = str(root / "plain-plan.json")  # made with --no-imatrix: RTN with plain min/max scales
    api.plan(settings=replace(settings, menu=api.MenuSettings(imatrix=False)), loaded=tiny, out=ws["plain_plan"],
             progress=False)
    plan, table = json.loads(Path(ws["plan"]).read_text()), json.loads(Path(ws["table"]).read_text())
    unit = next(iter(plan["units"]))
    variants = {
        "plan_empty": {},
        "plan_no_model": {k: v for k, v in plan.items() if k != "model"},
        "plan_units_list": {**plan, "units": list(plan["units"])},
        "plan_option_number": {**plan, "units": {**plan["units"], unit: 4}},
        "plan_option_unknown": {**plan, "units": {**plan["units"], unit: "int4"}},
        "plan_version": {**plan, "version": 99},
        "plan_unfit": {**plan, "units": {**plan["units"], unit: "int4-g48-sym"}},
        "table_units_list": {**table, "units": list(table["units"])},
        "table_short_row": {**table, "units": {**table["units"], unit: {**table["units"][unit], "distortion": [1.0]}}},
    }
    for name, data in variants.items():
        ws[name] = _write(root / f"{name}.json", data)
    ws["gguf_plan"] = str(root / "gguf-plan.json")
    gguf_settings = api.PlanSettings(Budget(6.0), keep_bits=32, guard=False,
                                     menu=api.MenuSettings(format="gguf", embeddings=True, imatrix=False))
    api.plan(settings=gguf_settings, loaded=api.load(ws["tiny"], embeddings=True), out=ws["gguf_plan"], progress=False)
    ws["plan_budget_inf"] = _write(root / "plan_budget_inf.json",
                                   Path(ws["plan"]).read_text().replace('"value": 4.0', '"value": Infinity'))
    ws["vllm_plan"] = str(root / "vllm-plan.json")
    api.plan(settings=replace(settings, budget=Budget(6.0), menu=api.MenuSettings(format="vllm", schemes=("sym",))),
             loaded=tiny, out=ws["vllm_plan"], progress=False)
    untied = json.loads(Path(ws["vllm_plan"]).read_text())
    k = "model.layers.0.self_attn.k_proj"
    untied["units"][k] = "w4a16-pc-sym" if untied["units"][k] != "w4a16-pc-sym" else "w4a16-g32-sym"
    ws["vllm_plan_untied"] = _write(root / "vllm-plan-untied.json", json.dumps(untied))
    from bitalloc.kvcache.layout import KVLayout
    from bitalloc.kvcache.plan import KVPlan

    other_cache = KVLayout(5, 1, 64)
    ws["kvplan_other"] = str(root / "kvplan-other.json")
    KVPlan("another model", other_cache, {u: "rot3" for u in other_cache.units}, 3.25).save(ws["kvplan_other"])
    ws["q"] = str(root / "q")
    api.quantize(plan_path=ws["plan"], out=ws["q"], loaded=tiny, progress=False)
    for name, damage in (("q_flipped", "flip"), ("q_no_weights", "drop"), ("q_bad_manifest", "manifest")):
        import shutil

        shutil.copytree(ws["q"], root / name)
        st, manifest = root / name / "model.safetensors", root / name / "bitalloc.json"
        if damage == "flip":
            data = bytearray(st.read_bytes())
            data[len(data) // 2] ^= 0x01
            st.write_bytes(bytes(data))
        elif damage == "drop":
            st.unlink()
        else:
            manifest.write_text(manifest.read_text()[:-40])
        ws[name] = str(root / name)
    _lying_inputs(root, ws)
    return ws


def _rehash(folder: Path) -> None:
    """Record the files' new sizes and sha256 in bitalloc.json, as someone who
    edits a quantized folder on purpose would."""
    manifest = folder / "bitalloc.json"
    meta = json.loads(manifest.read_text())
    for name, rec in meta["files"].items():
        data = (folder / name).read_bytes()
        rec.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    manifest.write_text(json.dumps(meta))


def _edit_safetensors(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _lying_inputs(root: Path, ws: dict[str, str]) -> None:
    """Inputs that pass every schema check but lie about what they hold, and
    paths for the output-over-input cases."""
    import os
    import shutil

    import numpy as np
    import torch

    from bitalloc.formats.affine_rtn import pack_bits

    q_unit = "model.layers.0.self_attn.q_proj"

    def int2_codes(t):  # int2 per-channel codes and one scale/zero per row where the plan stores another option
        t[f"{q_unit}.qweight"] = torch.from_numpy(pack_bits(np.zeros((64, 64), dtype=np.uint8), 2))
        t[f"{q_unit}.scales"] = torch.ones(64, 1, dtype=torch.float16)
        if f"{q_unit}.zeros" in t:
            t[f"{q_unit}.zeros"] = torch.zeros(64, 1, dtype=torch.float16)

    def nan_scale(t):
        t[f"{q_unit}.scales"][0, 0] = float("nan")

    def extra(t):
        t["extra.weight"] = torch.zeros(3)

    for name, edit in (("q_int2_codes", int2_codes), ("q_nan_scale", nan_scale), ("q_extra_tensor", extra)):
        shutil.copytree(ws["q"], root / name)
        _edit_safetensors(root / name, edit)
        _rehash(root / name)
        ws[name] = str(root / name)

    def drop(t):
        del t["model.layers.1.mlp.down_proj.weight"]

    for name, edit in (("missing_tensor", drop), ("extra_tensor", extra)):
        shutil.copytree(ws["tiny"], root / name)
        _edit_safetensors(root / name, edit)
        ws[name] = str(root / name)

    plan, table = json.loads(Path(ws["plan"]).read_text()), json.loads(Path(ws["table"]).read_text())
    unit = next(iter(table["units"]))
    negated = {n: {**r, "distortion": [None if d is None else -d for d in r["distortion"]]}
               for n, r in table["units"].items()}
    variants = {
        "table_negative": {**table, "units": negated},
        "table_negative_importance": {**table, "units": {**table["units"], unit: {**table["units"][unit],
                                                                                  "importance": -5.0}}},
        "plan_edited_budget": {**plan, "budget": {**plan["budget"], "value": 2.0}},
        "plan_extra_unit": {**plan, "units": {**plan["units"], "model.layers.9.mlp.up_proj": "int4-g32-sym"}},
    }
    for name, data in variants.items():
        ws[name] = _write(root / f"{name}.json", data)
    text = Path(ws["plan"]).read_text()
    first = next(line for line in text.splitlines() if line.strip().startswith(f'"{next(iter(plan["units"]))}"'))
    ws["plan_duplicate_key"] = _write(root / "plan_duplicate_key.json", text.replace(first, first + "\n" + first, 1))
    ws["plan_nested"] = _write(root / "plan_nested.json", "[" * 200_000 + "]" * 200_000)
    ws["vocab32_gguf"] = str(root / "vocab32.gguf")
    _tiny_gguf(root / "vocab32.gguf", tokens=32)
    shutil.copytree(ws["tiny"], root / "holder" / "tiny-copy")
    ws["tiny_copy"], ws["tiny_parent"] = str(root / "holder" / "tiny-copy"), str(root / "holder")
    ws["table_copy"] = _write(root / "table-copy.json", Path(ws["table"]).read_text())
    os.symlink(ws["user_file"], root / "link.json")
    ws["link"] = str(root / "link.json")
    os.mkfifo(root / "fifo.txt")
    ws["fifo"] = str(root / "fifo.txt")


# ---- running one case ------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    code: int
    stderr: str
    stdout: str


def run_case(case: Case, ws: dict[str, str]) -> Outcome:
    import os

    from bitalloc.cli import main

    argv = ["--quiet"] + [a.format(**ws) for a in case.argv]
    err, out = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k, _ in case.env}
    os.environ.update({k: v.format(**ws) for k, v in case.env})
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(argv)
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return Outcome(code, err.getvalue(), out.getvalue())


def _state(p: Path) -> str:
    if p.is_symlink():
        return f"link to {p.readlink()}"
    if p.is_dir():
        return "dir"
    if p.is_fifo():
        return "fifo"
    return hashlib.sha256(p.read_bytes()).hexdigest()


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _state(p) for p in sorted(root.rglob("*"))}


def normalise(text: str, ws: dict[str, str], root: Path) -> str:
    text = text.replace(str(root.resolve()), "<tmp>").replace(str(root), "<tmp>")
    text = re.sub(r"\(see `bitalloc[^`]*`\)", "", text).strip()
    return text


def command_text(case: Case) -> str:
    env = "".join(f"{k}={v} " for k, v in case.env)
    return (env + "bitalloc " + " ".join(case.argv)).replace("{", "<").replace("}", ">")


def render(rows: list[tuple[Case, str]]) -> str:
    lines = [
        "# Bad inputs and what bitalloc says",
        "",
        "Generated from `tests/bad_inputs.py` by `.venv/bin/python tests/bad_inputs.py`; `tests/test_cli_bad_inputs.py`",
        "runs every case and fails when this table is out of date. Each command exits with status 2, prints the one",
        "line shown on stderr (no traceback) and leaves no new file or folder. Cases marked *after load* depend on",
        "the model and are refused after it is loaded, before any scoring; every other case is refused before the",
        "model is loaded. `<tiny>` is a small Llama folder, `<tmp>` the test's folder.",
        "",
        "| case | command | message | when |",
        "|---|---|---|---|",
    ]
    for case, message in rows:
        msg = message.replace("|", "\\|")
        lines.append(f"| `{case.id}` | `{command_text(case)}` | {msg} | {'after load' if case.loads else 'before load'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        ws = build_workspace(root)
        rows = [(case, normalise(run_case(case, ws).stderr, ws, root)) for case in CASES]
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(render(rows))
    print(f"wrote {DOC} ({len(rows)} cases)")


if __name__ == "__main__":
    main()
