"""``PosEncConfig``: the method, its options, and what a reload needs. Stored as ``config.posenc`` in
``config.json`` by ``save_pretrained``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .backends import check_backend
from .registry import method_class

FORMAT_VERSION = 1


@dataclass
class PosEncConfig:
    method: str = field(metadata={"help": "position method, one of hf_posenc.available_methods()"})
    options: dict[str, Any] = field(default_factory=dict, metadata={"help": "the method's options"})
    max_position_embeddings: int | None = field(
        default=None,
        metadata={"help": "new position limit written to the config; None = 16x the original, at least 8192"},
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
        self.options = cls.Options.from_dict(self.method, dict(self.options)).to_dict()
        if self.max_position_embeddings is not None and (
            isinstance(self.max_position_embeddings, bool)
            or not isinstance(self.max_position_embeddings, int)
            or self.max_position_embeddings < 1
        ):
            raise ValueError(
                f"max_position_embeddings must be a positive integer, got {self.max_position_embeddings!r}"
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
    def from_dict(cls, values: dict[str, Any]) -> "PosEncConfig":
        return cls(**values)
