"""``export(model, out_dir, format="auto")``: a converted model as a checkpoint the rest of the ecosystem runs
without hf_posenc: a native transformers architecture where one is exact (:mod:`.table`), else ONNX (:mod:`.onnx`).

Everything is checked before anything is written; the folder is built beside ``out_dir`` and renamed into place
(complete or absent). Before it is published, the export is run against the converted model on a probe past every
threshold of the model (:mod:`.probe`; native: transformers; ONNX: onnxruntime, when installed) and refused if the
logits differ.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .._fs import check_output_dir, replaced_dir
from ..config import is_converted
from . import onnx as onnx_export
from .common import family, posenc, thresholds
from .probe import probe_inputs
from .readme import write_readme
from .table import NATIVE, NOT_NATIVE, NativeMapping, native_pairs

FORMATS = ("auto", "native", "onnx")
TOLERANCE = 1e-4  # max |logit difference| of an fp32 export on the probe (probe.py: past every threshold)


class ExportFailed(ValueError):
    """An export that could not be made, or that computes something else than the converted model: nothing was
    written (a ValueError, so the CLIs report it in one line with exit code 2)."""


@dataclass
class Plan:
    format: str  # "native" or "onnx"
    mapping: NativeMapping | None
    why_not_native: str | None


def export(model: nn.Module | str | os.PathLike, out_dir: str | os.PathLike, format: str = "auto",
           tokenizer=None, overwrite: bool = False) -> Path:
    """Write ``model`` (converted by hf_posenc, or the path of a saved one) to ``out_dir`` in a form plain
    transformers / onnxruntime load without hf_posenc; returns ``out_dir``.

    ``format``: ``"native"`` (an exact transformers architecture, see docs/export.md; refused where there is none),
    ``"onnx"`` (``model.onnx``, dynamic batch and sequence axes) or ``"auto"`` (native where exact, else ONNX).
    ``tokenizer`` (an object or a path; default: the model's path when given one) is saved with it. The model is
    left as it was."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    check_output_dir(out_dir, overwrite)
    source_path = None
    if isinstance(model, (str, os.PathLike)):
        source_path, model = model, _load(model)
    if not is_converted(model):
        raise ValueError(f"export expects a model converted by hf_posenc (got a plain {type(model).__name__}): "
                         "call hf_posenc.convert(model, method) first, or pass the path of a converted checkpoint")
    plan = plan_export(model, format)
    tokenizer = _tokenizer(tokenizer) if tokenizer is not None else _tokenizer(source_path, required=False)
    with replaced_dir(out_dir, overwrite) as tmp:
        model_was_training = model.training
        model.eval()
        try:
            check = _write(model, plan, tmp)
        finally:
            model.train(model_was_training)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_readme(tmp, model, plan, check, tokenizer is not None)
    return Path(out_dir)


def plan_export(model: nn.Module, format: str) -> Plan:
    """Where this converted model goes, or a ValueError listing what can be exported."""
    key = (family(model), posenc(model)["method"])
    mapping = NATIVE.get(key)
    why_not = _why_not_native(model, key, mapping)
    if format == "native" or (format == "auto" and why_not is None):
        if why_not is not None:
            raise ValueError(f"no exact native export for {key[0]} + {key[1]}: {why_not}. Exportable natively: "
                             f"{native_pairs()}. Everything else: format='onnx'")
        return Plan("native", mapping, None)
    onnx_refusal = onnx_export.refusal(model)
    if onnx_refusal is not None:
        raise ValueError(f"cannot export {key[0]} + {key[1]}: " + (f"no exact native target ({why_not}), and " if
                         format == "auto" else "") + f"not to ONNX: {onnx_refusal}. Exportable natively: "
                         f"{native_pairs()}; to ONNX: every other method, except the rope scalings "
                         f"{list(onnx_export.LENGTH_FOLLOWING)}")
    return Plan("onnx", None, why_not)


def _why_not_native(model: nn.Module, key: tuple[str, str], mapping: NativeMapping | None) -> str | None:
    if mapping is None:
        return NOT_NATIVE.get(key, "no transformers architecture has this position method on this family")
    if mapping.head_classes is not None and type(model).__name__ not in mapping.head_classes:
        return f"the native target covers {list(mapping.head_classes)}, not {type(model).__name__}"
    return mapping.refusal(model)


def _write(model: nn.Module, plan: Plan, folder: Path) -> dict:
    """Write the model files into ``folder``, run them on the probe; returns what was made and measured."""
    positioned = plan.mapping.takes_position_ids if plan.format == "native" else onnx_export.takes_position_ids(model)
    inputs = probe_inputs(model, positioned)
    with torch.no_grad():
        reference = model(**inputs)[0]
        write = _write_native if plan.format == "native" else _write_onnx
        made, exported = write(model, plan, folder, inputs)
    made.update(tokens=inputs["input_ids"].shape[-1], last_position=_last_position(inputs),
                thresholds=thresholds(model))
    if exported is None:
        return {**made, "checked": False}
    difference = float((exported.float() - reference.float()).abs().max())
    tolerance = TOLERANCE if reference.dtype == torch.float32 else 1e-2 * float(reference.abs().max())
    if not difference <= tolerance:  # nan-safe
        raise ExportFailed(f"the {plan.format} export's logits differ from the converted model's by {difference:.3g} "
                           f"(> {tolerance:.3g}) on a {made['tokens']}-token probe reaching position "
                           f"{made['last_position']}; nothing was written")
    return {**made, "checked": True, "max_difference": difference}


def _last_position(inputs: dict[str, torch.Tensor]) -> int:
    return int(inputs["position_ids"].max()) if "position_ids" in inputs else inputs["input_ids"].shape[-1] - 1


def _write_native(model, plan: Plan, folder: Path, inputs: dict) -> tuple[dict, torch.Tensor]:
    target = plan.mapping.build(model)
    if model.can_generate() and target.can_generate():
        target.generation_config = copy.deepcopy(model.generation_config)
    target.save_pretrained(folder)
    return {"class": type(target).__name__}, target(**inputs)[0]


def _write_onnx(model, plan: Plan, folder: Path, inputs: dict) -> tuple[dict, torch.Tensor | None]:
    try:
        path = onnx_export.write_onnx(model, folder)
        exported = onnx_export.onnx_logits(path, inputs) if _have_onnxruntime() else None
    except Exception as err:  # torch.export / onnxscript / onnxruntime: long multi-line reports, varied types
        report = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # torch's reports are coloured
        first_line = next((line for line in report.splitlines() if line.strip()), type(err).__name__)
        raise ExportFailed(f"the ONNX export of {family(model)} + {posenc(model)['method']} failed "
                           f"({type(err).__name__}: {first_line.strip()[:300]}); nothing was written. Please report "
                           "it with the full error (hf_posenc.export(...) raises it with this one's cause)") from err
    model.config.save_pretrained(folder)  # what the graph was made from (loads with hf_posenc)
    return {"class": None}, exported


def _have_onnxruntime() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def _load(path: str | os.PathLike) -> nn.Module:
    from ..convert import from_pretrained

    return from_pretrained(path, dtype=torch.float32).eval()


def _tokenizer(tokenizer, required: bool = True):
    """A tokenizer object as given; a path -> its tokenizer (``required=False``: None when that folder has none)."""
    if tokenizer is None or not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(tokenizer)
    except (OSError, ValueError) as err:
        if not required:
            return None
        raise ValueError(f"no tokenizer could be loaded from {tokenizer}: {err}") from None
