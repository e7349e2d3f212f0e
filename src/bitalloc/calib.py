"""Calibration: each linear's input Gram matrix H = 2 X^T X / n, accumulated
by forward hooks one batch at a time (no activations are kept), cached on
disk keyed by the checkpoint's content hash, text and settings, and reused.
A cache file that does not hold what it should (damaged, another model's
units, wrong shapes, non-finite values) is measured again and replaced."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from bitalloc.errors import BitallocError
from bitalloc.evaluate import EvalSettings, token_windows
from bitalloc.fileio import write_atomic
from bitalloc.text import cache_dir
from bitalloc.units import Inventory


@dataclass(frozen=True)
class CalibSettings:
    windows: int = 16
    seq_len: int = 512

    def key(self, identity: str, text: str) -> str:
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        return f"{identity}-{digest}-{self.windows}x{self.seq_len}"

    def to_dict(self) -> dict:
        return asdict(self)


def calibration_windows(tokenizer, text: str, settings: CalibSettings) -> torch.Tensor:
    return token_windows(tokenizer, text, EvalSettings(settings.seq_len, settings.windows, "auto"))


def unit_modules(inventory: Inventory) -> list[str]:
    """Module names whose input Gram matrix the units need (one per linear;
    none for a token embedding read by lookup)."""
    names = []
    for u in inventory.units:
        if u.lookup:  # a token embedding: its input is token ids, no Gram matrix
            continue
        if u.index is not None:
            raise BitallocError(
                f"Calibrated scorers and GPTQ do not yet support fused expert slices such as {u.name}; "
                "use a data-free scorer (rtn-mse, rtn-mse-rel, alpha) with --quantizer rtn."
            )
        names.append(u.name)
    return names


class GramAccumulator:
    """Forward hooks summing X^T X (float64) per module; ``hessians()`` gives 2 X^T X / n."""

    def __init__(self, model: nn.Module, module_names: list[str]):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (input seen, its X^T X)
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(n)) for n in module_names]

    def _gram(self, x: torch.Tensor) -> torch.Tensor:
        """X^T X of one input; modules fed the very same tensor (q/k/v,
        gate/up) share one product instead of computing it again."""
        if self._last is not None and self._last[0] is x:
            return self._last[1]
        X = x.detach().reshape(-1, x.shape[-1]).double()  # (tokens, in)
        gram = X.T @ X  # (in, in)
        self._last = (x, gram)
        return gram

    def _hook(self, name: str):
        def hook(_module, inputs, _output):
            gram = self._gram(inputs[0])
            if name in self.sums:
                self.sums[name] += gram
            else:
                self.sums[name] = gram.clone()
            self.counts[name] = self.counts.get(name, 0) + inputs[0].numel() // inputs[0].shape[-1]

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self._last = None

    def hessians(self) -> dict[str, torch.Tensor]:
        return {n: (2.0 * s / self.counts[n]).float() for n, s in self.sums.items()}


def _valid_hessians(H: dict[str, torch.Tensor], inventory: Inventory) -> bool:
    """One finite (in, in) matrix per unit, nothing else."""
    units = [u for u in inventory.units if not u.lookup]
    if set(H) != {u.name for u in units}:
        return False
    return all(H[u.name].shape == (u.shape[1], u.shape[1]) and bool(torch.isfinite(H[u.name]).all()) for u in units)


@torch.no_grad()
def accumulate_hessians(model: nn.Module, inventory: Inventory, windows: torch.Tensor, *,
                        progress: Callable | None = None) -> dict[str, torch.Tensor]:
    acc = GramAccumulator(model, unit_modules(inventory))
    try:
        rows = progress(list(windows), desc="calibrating (X^T X)", unit="window") if progress else windows
        for row in rows:
            model(row[None, :])
    finally:
        acc.remove()
    return acc.hessians()


def cached_hessians(model: nn.Module, inventory: Inventory, tokenizer, text: str, settings: CalibSettings, *,
                    progress: Callable | None = None) -> dict[str, torch.Tensor]:
    """Hessians from the disk cache, or measured and cached (safetensors)."""
    from safetensors.torch import load_file, save_file

    path = Path(cache_dir()) / "hessians" / f"{settings.key(inventory.content_id, text)}.safetensors"
    if path.is_file():
        try:
            H = load_file(str(path))
        except Exception:  # safetensors raises its own error type for a damaged header
            H = None
        if H is not None and _valid_hessians(H, inventory):
            return H
    H = accumulate_hessians(model, inventory, calibration_windows(tokenizer, text, settings), progress=progress)
    write_atomic(path, lambda tmp: save_file({k: v.contiguous() for k, v in H.items()}, tmp))
    return H
