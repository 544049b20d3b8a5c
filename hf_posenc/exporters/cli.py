"""``hf-posenc export``: a converted checkpoint -> a folder plain transformers (or onnxruntime) runs."""

from __future__ import annotations

import argparse
import sys

from .api import FORMATS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hf-posenc export",
        description="Export a converted checkpoint so that plain transformers loads it (AutoModelForCausalLM / "
        "AutoModelForMaskedLM, no hf_posenc, no remote code) where an exact native architecture exists, else as "
        "ONNX (docs/export.md lists the mappings).",
    )
    parser.add_argument("--model-path", required=True, help="a checkpoint saved after hf_posenc.convert")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--format", default="auto", choices=FORMATS,
                        help="native (exact transformers architecture, else an error), onnx, or auto (native where "
                        "exact, else onnx); default auto")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: --model-path's, if it has one)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out once the export is complete")
    args = parser.parse_args(argv)

    from .._fs import OutputExistsError, check_output_dir
    from .api import export

    try:
        check_output_dir(args.out, args.overwrite)  # before loading anything
        out = export(args.model_path, args.out, format=args.format, tokenizer=args.tokenizer,
                     overwrite=args.overwrite)
    except (OutputExistsError, ValueError, OSError) as err:
        print(f"hf-posenc export: error: {err}", file=sys.stderr)
        return 2
    print(f"exported to {out} (see {out}/README.md)")
    return 0
