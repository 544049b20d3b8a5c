"""Position methods: one file each, one contract (see :mod:`hf_posenc.methods.base`)."""

from .alibi import Alibi, AlibiOptions, alibi_slopes
from .base import MethodOptions, ModelShape, PositionMethod, PositionTerm
from .fire import Fire, FireOptions
from .learned import Learned, LearnedOptions
from .nope import Nope, NopeOptions
from .rope import Rope, RopeOptions
from .self_extend import ReRope, ReRopeOptions, SelfExtend, SelfExtendOptions
from .shaw import Shaw, ShawOptions
from .sinusoidal import Sinusoidal, SinusoidalOptions
from .t5_bias import T5Bias, T5BiasOptions
from .transformer_xl import TransformerXL, TransformerXLOptions
from .xpos import Xpos, XposOptions

__all__ = [
    "Alibi", "AlibiOptions", "alibi_slopes", "Fire", "FireOptions", "Learned", "LearnedOptions", "MethodOptions",
    "ModelShape", "PositionMethod", "PositionTerm", "Nope", "NopeOptions", "ReRope", "ReRopeOptions", "Rope",
    "RopeOptions", "SelfExtend", "SelfExtendOptions", "Shaw",
    "ShawOptions", "Sinusoidal", "SinusoidalOptions", "T5Bias", "T5BiasOptions", "TransformerXL",
    "TransformerXLOptions", "Xpos", "XposOptions",
]
