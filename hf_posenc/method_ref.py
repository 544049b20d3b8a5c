"""How an attention module finds its model's position method: a plain reference, looked up at call time."""

from __future__ import annotations

from torch import nn

from .methods.base import PositionMethod


class MethodRef:
    """Where an attention module finds its method: ``owner.<name>`` (``base_model.posenc``), looked up at call time.
    The method's parameters live once, there; and a wrapper that replaces it (PEFT ``modules_to_save=["posenc"]``
    trains a copy inside one) is the one used, not the original it copied."""

    __slots__ = ("owner", "name")

    def __init__(self, owner: nn.Module, name: str):
        self.owner, self.name = owner, name

    def get(self) -> PositionMethod:
        return getattr(self.owner, self.name)


def method_of(module: nn.Module) -> PositionMethod | None:
    ref = module.__dict__.get("_posenc_method")
    return None if ref is None else ref.get()


def attach_method(module: nn.Module, method: MethodRef | None) -> None:
    """A plain (unregistered) reference, so the method is not registered once per layer."""
    if method is None:
        module.__dict__.pop("_posenc_method", None)
    else:
        module.__dict__["_posenc_method"] = method
