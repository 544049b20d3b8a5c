"""Export a converted model so the rest of the ecosystem runs it without hf_posenc (docs/export.md).

    hf_posenc.export(model, "out", format="auto")   # native transformers where exact, else ONNX
"""

from .api import FORMATS, ExportFailed, export, plan_export
from .table import NATIVE, NOT_NATIVE

__all__ = ["FORMATS", "NATIVE", "NOT_NATIVE", "ExportFailed", "export", "plan_export"]
