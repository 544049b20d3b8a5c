"""Model families hf_posenc can convert, one file each."""

from .base import ArchSpec
from .bert import BERT
from .gpt2 import GPT2
from .llama import LLAMA

ARCHES: tuple[ArchSpec, ...] = (GPT2, BERT, LLAMA)

__all__ = ["ArchSpec", "ARCHES", "BERT", "GPT2", "LLAMA"]
