"""Architecture facts as data: one row per model family.

The generic walk in ``units.py`` finds every linear weight in any model; a
row here adds what the walk cannot know: which projections a block should
have (checked, so a silent miss is caught), which of them a runtime must
store in one format (tie groups), which fused 3-D parameters hold one expert
per slice, and which linears are never quantized (routers, tied heads).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ArchSpec:
    family: str
    model_types: tuple[str, ...]
    # Suffixes of the linear modules every block should have, e.g. "self_attn.q_proj".
    projections: tuple[str, ...]
    # Named groups of suffixes that share one option inside a block.
    tie_groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Suffixes of fused (E, out, in) expert parameters: each slice is a unit.
    expert_params: tuple[str, ...] = ()
    # fnmatch patterns of module names that are never quantized.
    exclude: tuple[str, ...] = ()
    # Suffixes llama.cpp's Q4_K_M rule gives more bits in some layers (attn_v, ffn_down).
    more_bits: tuple[str, ...] = ()
    # Per-expert keys of checkpoints on disk, after the layer prefix ("model.layers.3."), for each expert part
    # ("gate", "up": the halves of a fused gate_up_proj; "down"); {e} is the expert.
    expert_keys: dict[str, str] = field(default_factory=lambda: dict(_EXPERT_KEYS))


# A fused (E, 2I, H) gate_up_proj stores gate rows [0, I) then up rows [I, 2I); each half is its own unit.
FUSED_HALVES = {"gate_up_proj": ("gate", "up")}
# The part a whole (unsplit) fused expert parameter holds.
EXPERT_PART = {"down_proj": "down"}
_EXPERT_KEYS = {part: f"mlp.experts.{{e}}.{part}_proj.weight" for part in ("gate", "up", "down")}
_MIXTRAL_KEYS = {part: f"block_sparse_moe.experts.{{e}}.{w}.weight" for part, w in
                 (("gate", "w1"), ("up", "w3"), ("down", "w2"))}


_LLAMA_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_LLAMA_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_LLAMA_TIES = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
}
_HEADS = ("lm_head", "*.lm_head")
_MORE = ("self_attn.v_proj", "mlp.down_proj")
_ROUTERS = ("*.mlp.gate", "*.shared_expert_gate")
_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")

def _routed_moe(family: str, model_types: tuple[str, ...], ties: dict | None = None,
                keys: dict | None = None) -> ArchSpec:
    """A Llama-attention block with fused routed experts and a router (Mixtral, OLMoE, Qwen-MoE)."""
    return ArchSpec(family, model_types, _LLAMA_ATTN, {"qkv": _LLAMA_TIES["qkv"], **(ties or {})},
                    expert_params=_EXPERTS, exclude=_HEADS + _ROUTERS,
                    more_bits=("self_attn.v_proj", "mlp.experts.down_proj"), expert_keys=dict(keys or _EXPERT_KEYS))


ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec("llama", ("llama",), _LLAMA_ATTN + _LLAMA_MLP, _LLAMA_TIES, exclude=_HEADS, more_bits=_MORE),
    ArchSpec("mistral", ("mistral",), _LLAMA_ATTN + _LLAMA_MLP, _LLAMA_TIES, exclude=_HEADS, more_bits=_MORE),
    ArchSpec("qwen2", ("qwen2",), _LLAMA_ATTN + _LLAMA_MLP, _LLAMA_TIES, exclude=_HEADS, more_bits=_MORE),
    ArchSpec("qwen3", ("qwen3",), _LLAMA_ATTN + _LLAMA_MLP, _LLAMA_TIES, exclude=_HEADS, more_bits=_MORE),
    ArchSpec("gemma3", ("gemma3_text", "gemma3", "gemma2", "gemma"), _LLAMA_ATTN + _LLAMA_MLP, _LLAMA_TIES,
             exclude=_HEADS, more_bits=_MORE),
    ArchSpec(
        "gpt2",
        ("gpt2",),
        ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
        exclude=_HEADS,
        more_bits=("attn.c_attn", "mlp.c_proj"),
    ),
    ArchSpec(
        "bert",
        ("bert", "roberta"),
        (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        ),
        {"qkv": ("attention.self.query", "attention.self.key", "attention.self.value")},
        exclude=("cls.*", "*.pooler.dense", "pooler.dense", "classifier", "qa_outputs"),
        more_bits=("attention.self.value", "output.dense"),
    ),
    _routed_moe("mixtral", ("mixtral",), keys=_MIXTRAL_KEYS),
    _routed_moe("qwen-moe", ("qwen2_moe", "qwen3_moe"),
                {"shared_gate_up": ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj")}),
    _routed_moe("olmoe", ("olmoe",)),
    ArchSpec(
        "deepseek",
        ("deepseek_v2", "deepseek_v3"),
        # multi-head latent attention: q_proj, or q_a_proj/q_b_proj with a q LoRA rank; kv through a low-rank pair
        ("self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj", "self_attn.o_proj"),
        # the first dense layers' MLP, and the shared experts of the MoE layers
        {"gate_up": _LLAMA_TIES["gate_up"],
         "shared_gate_up": ("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj")},
        expert_params=_EXPERTS,
        exclude=_HEADS + _ROUTERS,
        more_bits=("self_attn.kv_b_proj", "mlp.experts.down_proj", "mlp.down_proj"),
    ),
)

# Any family: fused (E, out, in) parameters of a module named "experts" are expert slices too.
GENERIC = ArchSpec("generic", (), (), expert_params=_EXPERTS, exclude=_HEADS + _ROUTERS)


def arch_for(model_type: str | None) -> ArchSpec | None:
    """The table row for a transformers ``config.model_type``, or None."""
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return spec
    return None


def arch_of_family(family: str) -> ArchSpec:
    """The table row of a family name (an inventory's ``arch``); the generic row for any other."""
    return next((s for s in ARCHITECTURES if s.family == family), GENERIC)
