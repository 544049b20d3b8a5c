"""The README.md written into an exported folder: what it was made from, what it is, how it was checked."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from .common import posenc
from .onnx import input_names, takes_position_ids


def write_readme(folder: Path, model: nn.Module, plan, check: dict, has_tokenizer: bool) -> None:
    from .. import __version__

    entry = posenc(model)
    source = f"`{type(model).__name__}` converted by hf_posenc {__version__} to `{entry['method']}`"
    lines = [
        "# Exported by hf_posenc",
        "",
        f"Source: {source}, options `{json.dumps(entry['options'], sort_keys=True)}`, position limit "
        f"{entry['original_max_position_embeddings']} -> {entry['max_position_embeddings']}.",
        "",
    ]
    if plan.format == "native":
        lines += [
            f"Format: native transformers, {plan.mapping.target}. Exact: the same function as the converted model "
            "(see hf_posenc's docs/export.md for the mapping). Load it without hf_posenc:",
            "",
            "```python",
            "import transformers",
            f"model = transformers.{check['class']}.from_pretrained(path)  # or the matching AutoModelFor* class",
            "```",
        ]
    else:
        lines += _onnx_lines(model, plan)
    lines += ["", _check_line(check, plan.format, model),
              "" if has_tokenizer else "\nNo tokenizer was saved with it (the source had none).", ""]
    (folder / "README.md").write_text("\n".join(lines), encoding="utf-8")


def _onnx_lines(model: nn.Module, plan) -> list[str]:
    positioned = takes_position_ids(model)
    names = ", ".join(f"`{name}`" for name in input_names(model))
    feeds = "{'input_ids': ids, 'attention_mask': mask" + (", 'position_ids': positions}" if positioned else "}")
    lines = [
        f"Format: ONNX (`model.onnx`, inputs {names} (batch, sequence) int64, output `logits`, dynamic batch and "
        "sequence axes, no KV cache: each call is a full forward). "
        f"Why not native: {plan.why_not_native}. `config.json` is the converted model's (it loads with "
        "hf_posenc). Run it without hf_posenc:",
        "",
        "```python",
        *(["import numpy as np"] if positioned else []),
        "import onnxruntime",
        "session = onnxruntime.InferenceSession(path + '/model.onnx')",
    ]
    if positioned:
        lines.append("positions = np.maximum(mask.cumsum(-1) - 1, 0)  # a padded batch: count the attended tokens")
    return lines + [f"logits = session.run(None, {feeds})[0]", "```"]


def _check_line(check: dict, format: str, model: nn.Module) -> str:
    runner = "transformers" if format == "native" else "onnxruntime"
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    if not check["checked"]:
        return f"Not checked at export time ({runner} not installed)."
    passed = ", ".join(f"{name} {value}" for name, value in check["thresholds"].items())
    return (f"Checked at export time: {runner} vs the converted model on a {check['tokens']}-token probe ({dtype}) "
            f"reaching position {check['last_position']} (thresholds: {passed}), max |logit difference| "
            f"{check['max_difference']:.2g}.")
