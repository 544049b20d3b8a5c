"""Any converted model -> an ONNX graph (``torch.onnx.export(..., dynamo=True)``) of its full forward.

Inputs ``input_ids``, ``attention_mask`` and (every family but OPT and RoBERTa, which derive their own)
``position_ids``, (B, L) int64; output the model's first output (logits (B, L, V) for an LM head), with dynamic
batch and sequence axes; no KV cache (each call is a full forward). The graph is traced
with the ``eager`` backend (explicit softmax attention: one graph for every method; the query-block kernels pick
per length, which a graph with a symbolic length cannot). Dynamic YaRN traces as tensor ops of the input length
(``Rope._traced_dynamic_yarn``). Refused: dynamic NTK (``scaling="dynamic"``): its frequencies are chosen per length
in Python (by hf_posenc, or statefully by transformers' rotary on Llama-style models, which export natively).
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings
from pathlib import Path

import torch
from torch import nn

from ..backends import get_backend, set_backend
from ..registry import arch_for
from .common import posenc

FILE_NAME = "model.onnx"
INPUT_NAMES = ("input_ids", "attention_mask")
LENGTH_FOLLOWING = ("dynamic",)  # dynamic_yarn and longrope have traced forms (Rope._traced_dynamic_yarn, _longrope_rows)
TWO_PASS = ("self_extend", "rerope")  # hf_posenc.methods.self_extend: no native form, no traced one
# the exporter's notes on what is harmless here: the method's per-forward positions are plain attributes (not state of
# the graph), and input_ids / attention_mask share their axes
QUIET = (r"The tensor attribute .* was assigned during export", r"# The axis name: .* will not be used",
         r"`isinstance\(treespec, LeafSpec\)` is deprecated")
REQUIREMENTS = ("onnxscript", "onnx")  # what torch.onnx's dynamo exporter imports


def refusal(model: nn.Module) -> str | None:
    entry = posenc(model)
    if entry["method"] in TWO_PASS:
        return (f"{entry['method']} decides per input in Python which pairs take far positions (and runs its own "
                "two-pass kernels), which a traced ONNX graph cannot do")
    if entry["method"] == "rope" and entry["options"]["scaling"] in LENGTH_FOLLOWING:
        return (f"rope scaling={entry['options']['scaling']!r} chooses its frequencies per input length in Python, "
                "which a traced ONNX graph cannot do")
    missing = [name for name in REQUIREMENTS if importlib.util.find_spec(name) is None]
    if missing:
        return f"torch.onnx's exporter needs {', '.join(missing)}: pip install 'hf_posenc[onnx]'"
    return None


def takes_position_ids(model: nn.Module) -> bool:
    """Whether the graph takes ``position_ids``: every family that counts positions as key indices when given none
    (so a left-padded row needs them); OPT and RoBERTa derive their own from the mask / the padding tokens
    (``ArchSpec.derive_position_ids``), and their graphs take only ``input_ids`` and ``attention_mask``."""
    return arch_for(model.config).derive_position_ids is None


def input_names(model: nn.Module) -> tuple[str, ...]:
    return INPUT_NAMES + (("position_ids",) if takes_position_ids(model) else ())


def mask_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) position ids from a 2-D mask: the attended tokens counted from 0 (left pads at 0, right pads
    repeating the last position; pads are never attended). What to feed the graph's ``position_ids`` for a padded
    batch (numpy: ``np.maximum(mask.cumsum(-1) - 1, 0)``)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class FirstOutput(nn.Module):
    """(input_ids, attention_mask) -> the model's first output, without a cache."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.cache_kwargs = {"use_cache": False} if arch_for(model.config).is_causal(model.config) else {}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **self.cache_kwargs)[0]


class PositionedOutput(FirstOutput):
    """(input_ids, attention_mask, position_ids) -> the model's first output, without a cache."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          **self.cache_kwargs)[0]


@contextlib.contextmanager
def eager_backend(model: nn.Module):
    before = get_backend(model)
    set_backend(model, "eager")
    try:
        yield
    finally:
        set_backend(model, before)


def example_inputs(model: nn.Module) -> tuple[torch.Tensor, ...]:
    """(2, 16) each: sizes above 1, so the exporter keeps both axes symbolic; the second row left-padded."""
    device = next(model.parameters()).device
    input_ids = torch.randint(0, model.config.vocab_size, (2, 16), device=device)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    if not takes_position_ids(model):
        return input_ids, attention_mask
    return input_ids, attention_mask, mask_position_ids(attention_mask)


def traced_module(model: nn.Module) -> nn.Module:
    """What the graph is traced from: the model's first output from the inputs :func:`input_names` lists."""
    return (PositionedOutput(model) if takes_position_ids(model) else FirstOutput(model)).eval()


def dynamic_shapes(model: nn.Module) -> dict[str, dict[int, torch.export.Dim]]:
    """Every input symbolic in batch (axis 0) and sequence (axis 1)."""
    batch = torch.export.Dim("batch", min=1)
    length = torch.export.Dim("sequence", min=1)
    return {name: {0: batch, 1: length} for name in input_names(model)}


def write_onnx(model: nn.Module, folder: Path) -> Path:
    with eager_backend(model), torch.no_grad(), warnings.catch_warnings():
        for message in QUIET:
            warnings.filterwarnings("ignore", message=message)
        program = torch.onnx.export(
            traced_module(model), example_inputs(model), dynamo=True, verbose=False,
            input_names=list(input_names(model)), output_names=["logits"], dynamic_shapes=dynamic_shapes(model),
        )
    path = folder / FILE_NAME
    program.save(str(path))
    return path


def onnx_logits(path: Path, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Run the graph with onnxruntime (CPU) on the named inputs it takes."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {node.name: inputs[node.name].cpu().numpy() for node in session.get_inputs()}
    return torch.from_numpy(session.run(None, feeds)[0])
