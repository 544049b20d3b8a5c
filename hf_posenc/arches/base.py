"""What hf_posenc needs to know about a model family, as data plus a few small module swaps.

An arch spec knows no method: it says which modules are self-attention, where the native position code
lives and how to switch it off, and how to read heads / kv-heads / head size from the config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    family: str
    model_types: tuple[str, ...]
    attention_classes: tuple[str, ...]  # class names of the self-attention modules to wire
    position_table: str | None = None  # learned absolute table under the base model (nn.Embedding), if any
    rotary: str | None = None  # native rotary module under the base model, if any
    decoder_layers: str | None = None  # ModuleList of layers under the base model (for Llama-style embeds)
    is_causal: Callable[[object], bool] = lambda config: True
    is_cross_attention: Callable[[nn.Module], bool] = lambda module: False
    extend_limit: Callable[[nn.Module, int], None] | None = None  # family-specific length buffers
    example_classes: tuple[str, ...] = field(default=())  # head classes the tests exercise

    def num_kv_heads(self, config) -> int:
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads

    def head_dim(self, config) -> int:
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def attention_modules(self, base_model: nn.Module) -> list[nn.Module]:
        return [
            m
            for m in base_model.modules()
            if type(m).__name__ in self.attention_classes and not self.is_cross_attention(m)
        ]


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def rms(weight: torch.Tensor) -> float:
    return float(weight.detach().float().pow(2).mean().sqrt())


class PositionStandIn(nn.Module):
    """Base of the modules that replace a family's native position code. The model calls them with the
    ``position_ids`` of this forward; they report those to the method (``method.set_query_positions``), so every
    method uses the caller's positions. The method is held unregistered (it lives under base_model.posenc)."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.__dict__["method"] = method

    def report(self, position_ids: torch.Tensor) -> None:
        self.method.set_query_positions(position_ids)


class ZeroPositions(PositionStandIn):
    """Stands in for a removed learned position table: adds nothing, at any length."""

    def __init__(self, method: nn.Module, hidden_size: int, dtype: torch.dtype):
        super().__init__(method)
        self.hidden_size = hidden_size
        # empty: holds no values (so to_empty after init on the meta device leaves nothing uninitialised), only
        # the dtype / device the model is moved to
        self.dtype_ref = nn.Buffer(torch.zeros(0, dtype=dtype), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        self.report(position_ids)
        zero = torch.zeros((), dtype=self.dtype_ref.dtype, device=self.dtype_ref.device)
        return zero.expand(*position_ids.shape, self.hidden_size)  # (B, L, E), no memory


class MethodPositions(PositionStandIn):
    """Stands in for a learned position table with an absolute method's ``embed`` (e.g. sinusoidal)."""

    def __init__(self, method: nn.Module, dtype: torch.dtype):
        super().__init__(method)
        self.dtype_ref = nn.Buffer(torch.zeros(0, dtype=dtype), persistent=False)  # follows .to(dtype)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        self.report(position_ids)
        return self.method.embed(position_ids).to(self.dtype_ref.dtype)  # (B, L, E)


class IdentityRotary(PositionStandIn):
    """Stands in for a Llama-style rotary embedding: cos = 1, sin = 0, so ``apply_rotary_pos_emb`` is a no-op.
    The rotary is applied before the cache update, so this also keeps cached keys unrotated."""

    def __init__(self, method: nn.Module, head_dim: int):
        super().__init__(method)
        self.head_dim = head_dim

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.report(position_ids)
        shape = (*position_ids.shape, self.head_dim)  # (B, L, D)
        one = torch.ones((), dtype=x.dtype, device=x.device).expand(shape)
        return one, torch.zeros((), dtype=x.dtype, device=x.device).expand(shape)
