"""hf_posenc: swap the position encoding of a pretrained transformers model.

    import hf_posenc
    model = hf_posenc.convert(model, "alibi")       # in place, returns the model
    model.save_pretrained(out); hf_posenc.from_pretrained(out)
"""

from .attention import ATTN_IMPLEMENTATION, register
from .backends import BACKENDS, get_backend, set_backend
from .config import FORMAT_VERSION, PosEncConfig
from .convert import convert, from_pretrained, is_converted
from .exporters import export
from .registry import available_methods, supported_archs
from .restore import original_positions

register()

__version__ = "0.1.0"
__all__ = [
    "ATTN_IMPLEMENTATION", "BACKENDS", "FORMAT_VERSION", "PosEncConfig", "available_methods", "convert", "export",
    "from_pretrained",
    "get_backend", "is_converted", "original_positions", "set_backend", "supported_archs",
]
