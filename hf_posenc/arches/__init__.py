"""Model families hf_posenc can convert, one file each; adding one is a file and a line in ARCHES."""

from .base import ArchSpec
from .bert import BERT
from .gemma2 import GEMMA2
from .gemma3 import GEMMA3
from .gpt2 import GPT2
from .llama import LLAMA
from .opt import OPT
from .qwen3 import QWEN3
from .roberta import ROBERTA

ARCHES: tuple[ArchSpec, ...] = (GPT2, BERT, LLAMA, OPT, ROBERTA, QWEN3, GEMMA2, GEMMA3)

__all__ = ["ArchSpec", "ARCHES", "BERT", "GEMMA2", "GEMMA3", "GPT2", "LLAMA", "OPT", "QWEN3", "ROBERTA"]
