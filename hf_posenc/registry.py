"""Name -> method class, and model_type -> arch spec. Adding a method is one file plus one line here."""

from __future__ import annotations

from .arches import ARCHES, ArchSpec
from .methods import (
    Alibi, Fire, Learned, Nope, PositionMethod, ReRope, Rope, SelfExtend, Shaw, Sinusoidal, T5Bias, TransformerXL,
    Xpos,
)

METHODS: dict[str, type[PositionMethod]] = {
    "alibi": Alibi,
    "rope": Rope,
    "t5": T5Bias,
    "shaw": Shaw,
    "sinusoidal": Sinusoidal,
    "nope": Nope,
    "learned": Learned,
    "xpos": Xpos,
    "transformer_xl": TransformerXL,
    "fire": Fire,
    "self_extend": SelfExtend,
    "rerope": ReRope,
}

ARCH_BY_MODEL_TYPE: dict[str, ArchSpec] = {t: spec for spec in ARCHES for t in spec.model_types}
# model types of a supported family's checkpoints that it does not cover -> why, and the fix
REFUSED_MODEL_TYPES: dict[str, str] = {t: why for spec in ARCHES for t, why in spec.refused_model_types}


def available_methods() -> list[str]:
    return list(METHODS)


def supported_archs() -> list[str]:
    """Supported ``config.model_type`` values."""
    return list(ARCH_BY_MODEL_TYPE)


def method_class(name: str) -> type[PositionMethod]:
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown position method {name!r}; known methods: {', '.join(METHODS)}") from None


def arch_for(config) -> ArchSpec:
    model_type = getattr(config, "model_type", None)
    if model_type in REFUSED_MODEL_TYPES:
        raise ValueError(f"unsupported architecture {model_type!r}: {REFUSED_MODEL_TYPES[model_type]}")
    try:
        return ARCH_BY_MODEL_TYPE[model_type]
    except KeyError:
        raise ValueError(
            f"unsupported architecture {model_type!r}; hf_posenc supports model_type in "
            f"{supported_archs()}; docs/methods.md ('Adding a family') says how to add one"
        ) from None
