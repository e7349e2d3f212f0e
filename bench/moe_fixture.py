"""A real-weight Mixture-of-Experts made from the embedded dense SmolLM2-135M
(MoEfication), for the MoE benchmarks: **an MoE made from a dense model, not a
trained one.**

Each layer's FFN (1536 SwiGLU neurons: rows of gate/up, columns of down) is
split in two. The half of the neurons with the largest mean contribution on
the calibration half (|act(gate) * up| times the norm of the down column)
form a shared expert that every token uses: SwiGLU activations are not
sparse, and routing them away costs far more than with ReLU models (a first
version without a shared expert had perplexity 3,157 with half the neurons
routed away). The other half is split into E routed experts by balanced
k-means on the unit-normalised gate rows. The model is written as a Qwen2-MoE
(fused ``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I), a linear router
``mlp.gate``, a ``shared_expert`` with a sigmoid ``shared_expert_gate``),
the layout the issue suggests, with no attention bias.

Routing: a linear router fitted by least squares on the calibration half to
predict each expert's output norm from the layer's input, scaled so its
largest logit on that text is ``ROUTER_SCALE``: the softmax is flat (every
routing weight ~1/E, not renormalised over the top k) while the top-k order is
the fitted one; routed ``down_proj`` are multiplied by E and the shared one by
2 (its gate is 0, sigmoid 1/2), so a selected expert adds exactly its dense
neurons' output for any k. With k = E the model is the dense model to float
tolerance (tested in tests/test_moe.py on a tiny Llama); one model serves
every k (``config.num_experts_per_tok``).

    .venv/bin/python bench/moe_fixture.py --experts 8 --out bench/moe-fixture-smollm2.json
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

ROUTER_SCALE = 1e-4  # the largest |router logit| on calibration: a flat softmax that keeps the fitted order


def balanced_kmeans(X: torch.Tensor, k: int, *, iters: int = 25, seed: int = 0) -> torch.Tensor:
    """(n,) cluster of each row of X (n, d), exactly n / k rows per cluster:
    k-means whose assignment step fills clusters greedily by similarity."""
    n = X.shape[0]
    if n % k:
        raise ValueError(f"{n} rows do not split into {k} equal clusters")
    size = n // k
    g = torch.Generator().manual_seed(seed)
    centres = X[torch.randperm(n, generator=g)[:k]].clone()  # (k, d)
    for _ in range(iters):
        sim = X @ centres.T  # (n, k)
        order = torch.argsort(sim.reshape(-1), descending=True).tolist()
        assigned, counts = [-1] * n, [0] * k
        for flat in order:
            row, c = divmod(flat, k)
            if assigned[row] < 0 and counts[c] < size:
                assigned[row] = c
                counts[c] += 1
        labels = torch.tensor(assigned)
        new = torch.stack([F.normalize(X[labels == c].mean(0), dim=0) for c in range(k)])
        if torch.allclose(new, centres):
            break
        centres = new
    return labels


@torch.no_grad()
def mlp_inputs(model, windows: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the (tokens, hidden) inputs of its MLP over ``windows``."""
    seen: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].reshape(-1, a[0].shape[-1])))
             for i, layer in enumerate(model.model.layers)]
    try:
        for row in windows:
            model(row[None, :])
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(s) for s in seen]


@torch.no_grad()
def split_layer(mlp, X: torch.Tensor, experts: int, shared: int):
    """One dense MLP as (shared neuron indices (S,), routed groups (E, I),
    gate_up (E, 2I, H), down (E, H, I)): the ``shared`` neurons with the
    largest mean contribution |act(g) u| * ||down column|| on the calibration
    inputs X form the shared expert; the rest are clustered into experts."""
    gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight  # (N, H), (N, H), (H, N)
    contribution = (mlp.act_fn(X @ gate.T) * (X @ up.T)).abs().mean(0) * down.norm(dim=0)  # (N,)
    order = torch.argsort(contribution, descending=True)
    shared_idx, rest = order[:shared].sort().values, order[shared:].sort().values
    labels = balanced_kmeans(F.normalize(gate[rest].float(), dim=1), experts)
    groups = torch.stack([rest[labels == e] for e in range(experts)])  # (E, I)
    gate_up = torch.stack([torch.cat([gate[g], up[g]]) for g in groups])
    return shared_idx, groups, gate_up, torch.stack([down[:, g] for g in groups])


@torch.no_grad()
def fit_router(X: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, act) -> torch.Tensor:
    """(E, H): least squares from the layer input to each expert's output
    norm, scaled so the largest |logit| on X is ``ROUTER_SCALE``."""
    norms = []
    for e in range(gate_up.shape[0]):
        g, u = F.linear(X, gate_up[e]).chunk(2, dim=-1)
        norms.append(F.linear(act(g) * u, down[e]).norm(dim=-1))
    Y = torch.stack(norms, dim=1)  # (tokens, E)
    Xa = torch.cat([X, torch.ones(X.shape[0], 1)], dim=1).double()  # a constant column absorbs the mean
    W = torch.linalg.lstsq(Xa, Y.double()).solution[:-1].T.float()  # the constant does not change the top-k
    return W * (ROUTER_SCALE / float((X @ W.T).abs().max()))


def moefy(dense, experts: int, top_k: int, calib_windows: torch.Tensor, shared_fraction: float = 0.5):
    """The dense Llama-family model as a Qwen2-MoE: per layer a shared expert
    (the ``shared_fraction`` most contributing neurons, sigmoid gate fixed at
    1/2 and its output doubled) and ``experts`` routed experts with ``top_k``
    active (softmax weights ~1/E, not renormalised, outputs multiplied by E,
    so each selected expert adds its dense neurons' output for any k).
    Returns (model, (shared indices, routed groups) per layer)."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    c = dense.config
    shared = int(round(c.intermediate_size * shared_fraction))
    if (c.intermediate_size - shared) % experts:
        raise ValueError(f"{c.intermediate_size - shared} routed neurons do not split into {experts} experts")
    cfg = Qwen2MoeConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        moe_intermediate_size=(c.intermediate_size - shared) // experts, shared_expert_intermediate_size=shared,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters), tie_word_embeddings=c.tie_word_embeddings, num_experts=experts,
        num_experts_per_tok=top_k, norm_topk_prob=False, qkv_bias=False, decoder_sparse_step=1,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=getattr(c, "pad_token_id", None),
    )
    moe = Qwen2MoeForCausalLM(cfg).eval()
    missing = moe.load_state_dict({k: v for k, v in dense.state_dict().items() if ".mlp." not in k}, strict=False)
    assert not missing.unexpected_keys, missing.unexpected_keys
    inputs = mlp_inputs(dense, calib_windows)
    layout = []
    with torch.no_grad():
        for i, (layer, target) in enumerate(zip(dense.model.layers, moe.model.layers)):
            src, mlp = layer.mlp, target.mlp
            shared_idx, groups, gate_up, down = split_layer(src, inputs[i], experts, shared)
            mlp.shared_expert.gate_proj.weight.copy_(src.gate_proj.weight[shared_idx])
            mlp.shared_expert.up_proj.weight.copy_(src.up_proj.weight[shared_idx])
            mlp.shared_expert.down_proj.weight.copy_(src.down_proj.weight[:, shared_idx] * 2)  # sigmoid(0) = 1/2
            mlp.shared_expert_gate.weight.zero_()
            mlp.experts.gate_up_proj.copy_(gate_up)
            mlp.experts.down_proj.copy_(down * experts)
            mlp.gate.weight.copy_(fit_router(inputs[i], gate_up, down, src.act_fn))
            layout.append((shared_idx, groups))
    if cfg.tie_word_embeddings:
        moe.tie_weights()
    return moe, layout


def set_top_k(moe, k: int) -> None:
    """Experts per token, in the config and in every router."""
    moe.config.num_experts_per_tok = k
    for layer in moe.model.layers:
        layer.mlp.gate.top_k = k


@torch.no_grad()
def routing_frequency(moe, windows: torch.Tensor) -> list[list[float]]:
    """Per layer, the share of tokens routed to each expert."""
    out = []
    hooks, seen = [], [[] for _ in moe.model.layers]
    for i, layer in enumerate(moe.model.layers):
        hooks.append(layer.mlp.gate.register_forward_hook(lambda m, a, o, i=i: seen[i].append(o[2])))
    try:
        for row in windows:
            moe(row[None, :])
    finally:
        for h in hooks:
            h.remove()
    for idx in seen:
        index = torch.cat(idx)  # (tokens, k)
        E = moe.config.num_experts
        out.append([float((index == e).any(-1).float().mean()) for e in range(E)])
    return out


def main() -> None:
    from bitalloc import api
    from bitalloc.calib.grams import CalibSettings, calibration_windows
    from bitalloc.evaluate import EvalSettings, evaluate, reference_logprobs, token_windows
    from bitalloc.fileio import write_json
    from bitalloc.evaluate.text import calibration_text

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--calib-windows", type=int, default=16)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--save", help="also write the model with k = E/2 as a Hugging Face folder here")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.manual_seed(0)
    dense = api.load(None)
    calib = calibration_windows(dense.tokenizer, calibration_text(None), CalibSettings(a.calib_windows, a.seq_len))
    windows = token_windows(dense.tokenizer, api.eval_text(None)[0], EvalSettings(a.seq_len, a.windows))
    ref = reference_logprobs(dense.model, windows)
    report = {"experts": a.experts, "note": "an MoE made from the dense SmolLM2-135M (MoEfication), not a trained "
              "MoE; reference = the embedded Q4_1 model as loaded", "dense": evaluate(dense.model, windows).to_dict(),
              "rows": []}
    moe, _ = moefy(dense.model, a.experts, a.experts, calib)
    for k in (a.experts, a.experts // 2, a.experts // 4):
        set_top_k(moe, k)
        r = evaluate(moe, windows, ref).to_dict()
        r.update(top_k=k, routing_frequency=routing_frequency(moe, windows[:4]))
        report["rows"].append(r)
        print(f"k = {k} of {a.experts}: ppl {r['ppl']:.2f}  KL to dense {r['kl']:.4f}  top-1 {r['top1']:.3f}")
    if a.save:
        set_top_k(moe, a.experts // 2)
        moe.save_pretrained(a.save)
        dense.tokenizer.save_pretrained(a.save)
        print(f"wrote {a.save} (k = {a.experts // 2} of {a.experts})")
    print(f"dense: ppl {report['dense']['ppl']:.2f}")
    write_json(a.out, report)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
