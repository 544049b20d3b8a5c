"""``PosEncConfig``: the method, its options, and what a reload needs. Stored as ``config.posenc`` in
``config.json`` by ``save_pretrained``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .backends import check_backend
from .registry import method_class

FORMAT_VERSION = 1
# position limits above this are refused as absurd: longer than any model is run at, and the length buffers
# some families keep (BERT's position_ids) would take gigabytes
MAX_POSITIONS = 2**26
# what a reload needs from a saved checkpoint's posenc entry (convert fills these in)
SAVED_KEYS = {
    "method": "the position method, one of hf_posenc.available_methods()",
    "original_max_position_embeddings": "the model's position limit before conversion (the original checkpoint's "
    "max_position_embeddings / n_positions)",
}


@dataclass
class PosEncConfig:
    method: str = field(metadata={"help": "position method, one of hf_posenc.available_methods()"})
    options: dict[str, Any] = field(default_factory=dict, metadata={"help": "the method's options"})
    max_position_embeddings: int | None = field(
        default=None,
        metadata={"help": "new position limit written to the config; None = 16x the original, at least 8192, at most "
                        "2**26"},
    )
    original_max_position_embeddings: int | None = field(
        default=None, metadata={"help": "the model's limit before conversion (filled in by convert)"}
    )
    format_version: int = FORMAT_VERSION
    backend: str = field(
        default="auto",
        metadata={"help": "attention backend: 'auto', 'sdpa', 'flex' or 'eager' (see docs/performance.md)"},
    )

    def __post_init__(self):
        cls = method_class(self.method)  # unknown method -> lists the known ones
        check_backend(self.backend)  # unknown backend -> lists the known ones
        if not isinstance(self.options, dict):
            raise ValueError(f"options must be a dict of the method's options, got {self.options!r}")
        self.options = cls.Options.from_dict(self.method, dict(self.options)).to_dict()
        check_limit("max_position_embeddings", self.max_position_embeddings)
        check_limit("original_max_position_embeddings", self.original_max_position_embeddings)
        if not _is_int(self.format_version) or self.format_version < 1:
            raise ValueError(
                f"format_version must be an integer >= 1 (this hf_posenc writes {FORMAT_VERSION}), got "
                f"{self.format_version!r}"
            )
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"this checkpoint was written by a newer hf_posenc (format {self.format_version}, this one reads "
                f"<= {FORMAT_VERSION}); upgrade hf_posenc"
            )

    def method_options(self):
        return method_class(self.method).Options(**self.options)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "options": dict(self.options),
            "max_position_embeddings": self.max_position_embeddings,
            "original_max_position_embeddings": self.original_max_position_embeddings,
            "format_version": self.format_version,
            "backend": self.backend,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any], saved: bool = False) -> "PosEncConfig":
        """``saved=True``: ``values`` is a converted checkpoint's ``config.posenc``; it must hold what a reload needs,
        and errors say which entry of its config.json to fix."""
        try:
            if not isinstance(values, dict):
                raise ValueError(f"must be a dict, got {type(values).__name__}")
            known = [f.name for f in dataclasses.fields(cls)]
            unknown = sorted(set(values) - set(known))
            if unknown:
                raise ValueError(f"unknown key(s) {unknown}; known keys: {', '.join(known)}")
            for key, meaning in SAVED_KEYS.items() if saved else ():
                if values.get(key) is None:
                    raise ValueError(f"'{key}' is missing: add it ({meaning}), or convert and save the model again")
            if values.get("method") is None:
                raise ValueError("'method' is missing")
            return cls(**values)
        except ValueError as err:
            if saved:
                raise ValueError(f"the checkpoint's config.json has a bad 'posenc' entry: {err}") from None
            raise


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_limit(name: str, value: Any) -> None:
    """A position limit: None (not set) or an integer in [1, MAX_POSITIONS]; the error names the fix."""
    if value is None:
        return
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if value > MAX_POSITIONS:
        raise ValueError(
            f"{name}={value} is above hf_posenc's limit of {MAX_POSITIONS} (2**26) positions, longer than any model "
            f"is run at (some families keep buffers of this length): use a smaller {name}"
        )


def is_converted(model) -> bool:
    """True for a model :func:`hf_posenc.convert` converted (its config carries a ``posenc`` entry)."""
    return getattr(getattr(model, "config", None), "posenc", None) is not None
