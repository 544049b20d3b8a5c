"""Fine-tune configuration: dataclasses with ``metadata={"help": ...}``, read from YAML and overridden by flags.

    config = load_config("recipes/configs/gpt2_alibi.yaml", ["--max_steps", "200", "--lora.r", "16"])

Flags are ``--key value`` or ``--section.key value`` (``--key=value`` too); values are parsed as YAML, so
``--eval_multipliers [1,2,8]`` and ``--lora none`` work. A ``lora`` section present means LoRA, absent (or
``none``) means full fine-tuning. Unknown keys, bad values and unknown position methods or options fail here,
before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

OBJECTIVES = ("auto", "causal", "mlm")
SECTION = "(section)"  # the "default" that reference() gives a nested section
PRECISIONS = ("auto", "no", "fp16", "bf16")


def _field(default: Any, help: str) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DataArgs:
    """Where the text comes from: exactly one of ``text``, ``files``, ``dataset``."""

    text: str | None = _field(
        None, "a named corpus from hf_posenc.sources (e.g. 'shakespeare'); brings its own held-out split")
    files: list[str] | None = _field(
        None, "text files and/or folders (every file with one of `extensions` below a folder, sorted)")
    extensions: list[str] = _field([".txt", ".md"], "file endings read from folders in `files`")
    dataset: str | None = _field(
        None, "a `datasets` dataset (hub name, local folder, or a loader such as 'json' / 'text' with data_files)")
    dataset_config: str | None = _field(None, "the dataset's configuration name, if it has several")
    data_files: list[str] | None = _field(None, "data_files for a loader dataset ('json', 'text', 'csv', ...)")
    split: str = _field("train", "dataset split to train on")
    column: str = _field("text", "dataset column holding the text")
    heldout_files: list[str] | None = _field(None, "held-out text files/folders for perplexity (files / dataset)")
    heldout_split: str | None = _field(None, "held-out dataset split (e.g. 'validation')")
    heldout_fraction: float = _field(
        0.05, "without held-out files or split: the last fraction of the token stream is held out; in (0, 0.5]")
    max_train_tokens: int | None = _field(None, "keep only the first N training tokens (None = all)")

    def validate(self) -> None:
        given = [k for k in ("text", "files", "dataset") if getattr(self, k)]
        if len(given) != 1:
            raise ConfigError(
                "data: give exactly one of data.text (a named corpus), data.files (files/folders) or "
                f"data.dataset (a `datasets` dataset); got {given or 'none'}")
        if self.heldout_split and not self.dataset:
            raise ConfigError("data.heldout_split only applies to data.dataset; use data.heldout_files")
        if self.text and (self.heldout_files or self.heldout_split):
            raise ConfigError(f"data.text {self.text!r} brings its own held-out split; drop data.heldout_*")
        _check(0 < self.heldout_fraction <= 0.5, "data.heldout_fraction must be in (0, 0.5]")
        _check(self.max_train_tokens is None or self.max_train_tokens > 0, "data.max_train_tokens must be > 0")


@dataclass
class LoraArgs:
    """LoRA through PEFT. The position method's learned tables train alongside (PEFT ``modules_to_save``)."""

    r: int = _field(16, "LoRA rank; >= 1")
    alpha: float = _field(32, "LoRA scaling numerator (scale = alpha / r)")
    dropout: float = _field(0.05, "dropout on the LoRA input; in [0, 1)")
    target_modules: list[str] | None = _field(
        None, "module names to adapt; None = per family: GPT-2 c_attn, Llama q_proj+v_proj, BERT query+value")
    modules_to_save: list[str] = _field(
        [], "extra modules trained in full and saved with the adapter (the position tables are added for you)")
    merge: bool = _field(True, "merge the adapter into the final model; false = save it separately in <out>/adapter")

    def validate(self) -> None:
        _check(isinstance(self.r, int) and self.r >= 1, f"lora.r must be an integer >= 1, got {self.r!r}")
        _check(0 <= self.dropout < 1, f"lora.dropout must be in [0, 1), got {self.dropout!r}")


POSE_SPLITS = ("random", "equal")


@dataclass
class PoseArgs:
    """PoSE position skipping (Zhu et al. 2024): each causal training window is cut into ``chunks`` chunks whose
    position ids skip ahead by random amounts, so short windows cover relative distances up to ``target_length``."""

    target_length: int = _field(
        32768, "the context length trained for: every position id is < target_length; must be > seq_len")
    chunks: int = _field(2, "chunks per window (the paper uses 2); chunk 0 keeps positions 0..; in [1, seq_len]")
    split: str = _field("random", "chunk lengths: 'random' (uniform split points) or 'equal'")

    def validate(self, seq_len: int) -> None:
        _check(isinstance(self.target_length, int) and self.target_length > seq_len,
               f"pose.target_length must be an integer > seq_len ({seq_len}), got {self.target_length!r}: PoSE "
               "trains positions up to target_length with windows of seq_len tokens")
        _check(isinstance(self.chunks, int) and 1 <= self.chunks <= seq_len,
               f"pose.chunks must be an integer in [1, seq_len={seq_len}], got {self.chunks!r}")
        _check(self.split in POSE_SPLITS, f"pose.split must be one of {POSE_SPLITS}, got {self.split!r}")


@dataclass
class DistillArgs:
    """Self-distillation from the unconverted model: ``weight`` x T^2 x KL(teacher || student) at temperature T,
    averaged over real token positions, added to ``lm_weight`` x the LM loss."""

    weight: float = _field(1.0, "weight of the distillation term; >= 0")
    temperature: float = _field(1.0, "softmax temperature T of both distributions; > 0 (the term is scaled by T^2)")
    lm_weight: float = _field(1.0, "weight of the language-model loss; 0 = pure distillation")

    def validate(self) -> None:
        _check(self.weight >= 0 and self.lm_weight >= 0, "distill.weight and distill.lm_weight must be >= 0")
        _check(self.weight > 0 or self.lm_weight > 0, "distill.weight and distill.lm_weight are both 0: no loss")
        _check(self.temperature > 0, f"distill.temperature must be > 0, got {self.temperature!r}")


@dataclass
class TrainConfig:
    # -- model and position method ------------------------------------------------------------------------
    model: str | None = _field(
        None, "local directory, hub name, or a named offline source (hf_posenc.sources, e.g. 'smollm2-135m')")
    tokenizer: str | None = _field(None, "tokenizer location if not the model's (same forms as `model`)")
    objective: str = _field("auto", "'causal' (next token), 'mlm' (masked LM) or 'auto' (mlm for BERT)")
    mlm_probability: float = _field(0.15, "share of tokens masked by the MLM objective")
    method: str | None = _field(
        None, "position method for hf_posenc.convert; None only for an already converted checkpoint; 'native' "
        "trains the checkpoint with its own position encoding (pre-training, baselines)")
    method_options: dict[str, Any] = _field({}, "the method's options (see docs/methods.md)")
    max_position_embeddings: int | None = _field(
        None, "new position limit written to the config; None = convert's default (16x the old, >= 8192)")
    # -- data ---------------------------------------------------------------------------------------------
    data: DataArgs = field(default_factory=DataArgs, metadata={"help": "training and held-out text"})
    seq_len: int = _field(512, "training length: the token stream is packed into blocks of this many tokens")
    # -- optimisation -------------------------------------------------------------------------------------
    batch_size: int = _field(8, "blocks per micro-batch, per process")
    grad_accum: int = _field(1, "micro-batches per optimizer step")
    max_steps: int = _field(300, "optimizer steps")
    optimizer: str = _field("adamw", "a torch.optim class name, case-insensitive (adamw, adam, sgd, ...)")
    optimizer_args: dict[str, Any] = _field({}, "extra keyword arguments for the optimizer (e.g. momentum)")
    lr: float = _field(1e-4, "peak learning rate")
    position_lr: float | None = _field(None, "learning rate of the method's new position tables; None = lr")
    weight_decay: float = _field(0.0, "decoupled weight decay on matrices (not on biases, norms, position tables)")
    betas: list[float] = _field([0.9, 0.95], "Adam betas (Adam-family optimizers only)")
    max_grad_norm: float | None = _field(1.0, "clip the gradient norm to this; None = no clipping")
    lr_scheduler: str = _field("cosine", "transformers.get_scheduler name (cosine, linear, constant_with_warmup, ...)")
    warmup_steps: int = _field(20, "linear warm-up steps")
    seed: int = _field(0, "seed for initialisation, data order and MLM masks")
    gradient_checkpointing: bool = _field(False, "recompute activations in backward: less memory, more compute")
    mixed_precision: str = _field("auto", "'no', 'fp16', 'bf16', or 'auto' (bf16 on a GPU that has it, else no)")
    cpu: bool = _field(False, "force CPU even if a GPU is present (always CPU when there is none)")
    # -- evaluation, logging, checkpoints -----------------------------------------------------------------
    output_dir: str | None = _field(None, "where metrics, checkpoints and the final model go")
    eval_every: int = _field(100, "held-out perplexity at seq_len every N steps; 0 = only at the end")
    eval_tokens: int = _field(16384, "held-out tokens per evaluated length (whole windows, at least one)")
    eval_multipliers: list[int] = _field([1, 2, 4], "final evaluation lengths, as multiples of seq_len")
    log_every: int = _field(10, "console / metrics line every N steps")
    report_to: list[str] = _field(
        ["auto"], "Accelerate trackers: names (tensorboard, wandb, ...), 'none', or 'auto' (tensorboard if installed)")
    save_every: int = _field(100, "checkpoint every N steps; 0 = only on Ctrl-C")
    keep_checkpoints: int = _field(2, "newest checkpoints kept; older ones are deleted; 0 = keep all")
    resume_from: str | None = _field(None, "a checkpoint folder, or 'latest' (newest under output_dir/checkpoints)")
    rank_report: bool = _field(
        False, "each process writes rank<i>.json (world size, first-batch and final-weight hashes): a DDP check")
    # -- which parameters train ---------------------------------------------------------------------------
    lora: LoraArgs | None = field(
        default=None, metadata={"help": "LoRA settings; absent or none = full fine-tuning"})
    # -- what the loss sees ----------------------------------------------------------------------------------
    pose: PoseArgs | None = field(
        default=None, metadata={"help": "PoSE position skipping for causal training; absent or none = off"})
    distill: DistillArgs | None = field(
        default=None, metadata={"help": "self-distillation from the unconverted model; absent or none = off"})

    def validate(self) -> None:
        _check(bool(self.model), "model is required: a local directory, hub name or named source")
        _check(bool(self.output_dir), "output_dir is required")
        _check(self.objective in OBJECTIVES, f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        _check(self.mixed_precision in PRECISIONS, f"mixed_precision must be one of {PRECISIONS}")
        for key in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_tokens", "log_every"):
            value = getattr(self, key)
            _check(isinstance(value, int) and value >= 1, f"{key} must be an integer >= 1, got {value!r}")
        _check(self.seq_len >= 2, "seq_len must be >= 2")
        for key in ("warmup_steps", "eval_every", "save_every", "keep_checkpoints"):
            _check(getattr(self, key) >= 0, f"{key} must be >= 0")
        _check(0 < self.mlm_probability < 1, "mlm_probability must be in (0, 1)")
        _check(self.lr > 0 and (self.position_lr is None or self.position_lr > 0), "lr and position_lr must be > 0")
        _check(bool(self.eval_multipliers) and all(isinstance(m, int) and m >= 1 for m in self.eval_multipliers),
               f"eval_multipliers must be a non-empty list of integers >= 1, got {self.eval_multipliers!r}")
        self._validate_names()
        self.data.validate()
        if self.lora is not None:
            self.lora.validate()
        if self.pose is not None:
            self.pose.validate(self.seq_len)
            _check(self.objective != "mlm", "pose: PoSE position skipping is for causal language models; the mlm "
                   "objective trains a bidirectional encoder (drop pose or use objective causal)")
        if self.distill is not None:
            self.distill.validate()
            _check(self.method is not None, "distill: the teacher is the unconverted model, but method: null trains an "
                   "already converted checkpoint, which has no original to compare against; start from the "
                   "unconverted checkpoint with a method")
        if self.method == NATIVE:
            _check(not self.method_options and self.max_position_embeddings is None,
                   f"method {NATIVE!r} trains the model as it is: method_options / max_position_embeddings "
                   "make no sense with it")
        elif self.method is not None:
            from ..config import PosEncConfig  # unknown method / option -> ValueError naming the valid ones

            _check("max_position_embeddings" not in self.method_options,
                   "method_options.max_position_embeddings is not a method option; set the top-level key "
                   "max_position_embeddings instead")
            try:
                PosEncConfig(self.method, dict(self.method_options), self.max_position_embeddings)
            except (ValueError, TypeError) as err:
                raise ConfigError(f"method: {err}") from None
        elif self.method_options:
            raise ConfigError("method_options given without a method")

    def _validate_names(self) -> None:
        from transformers import SchedulerType

        schedulers = [s.value for s in SchedulerType]
        _check(self.lr_scheduler in schedulers, f"lr_scheduler {self.lr_scheduler!r} unknown; one of {schedulers}")
        _check(optimizer_class(self.optimizer) is not None,
               f"optimizer {self.optimizer!r} is not a torch.optim class (e.g. adamw, adam, sgd)")

    @property
    def train_mode(self) -> str:
        return "lora" if self.lora is not None else "full"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


NATIVE = "native"  # method value: train the checkpoint with its own position encoding (pre-training, baselines)


class ConfigError(ValueError):
    """A bad configuration: raised before any model or data is loaded."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def optimizer_class(name: str):
    import torch

    classes = (getattr(torch.optim, n) for n in dir(torch.optim))
    by_lower = {c.__name__.lower(): c for c in classes if isinstance(c, type) and issubclass(c, torch.optim.Optimizer)}
    return by_lower.get(str(name).lower())


# ---- building a config from nested dicts ------------------------------------------------------------------


def from_dict(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``values``, recursing into nested dataclasses and coercing scalars to the
    annotated types. Unknown keys raise :class:`ConfigError` with the known ones and a close match."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else "."
            known_keys = ", ".join(prefix + k for k in known)
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint} Known keys: {known_keys}")
    kwargs = {key: _coerce(value, hints[key], prefix + key) for key, value in values.items()}
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    options = typing.get_args(hint) if _is_union(hint) else (hint,)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and type(None) in options):
        if type(None) in options:
            return None
        raise ConfigError(f"{name} may not be empty")
    errors = []
    for option in (o for o in options if o is not type(None)):
        try:
            return _coerce_one(value, option, name)
        except (TypeError, ValueError) as err:
            errors.append(err)
    if len(errors) == 1 and isinstance(errors[0], ConfigError):
        raise errors[0]
    raise ConfigError(f"{name}: cannot use {value!r} as {_type_name(hint)}")


def _coerce_one(value: Any, hint: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, {} if value is True else value, prefix=name + ".")
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_coerce_one(v, item, name) for v in items]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise TypeError(name)
    if hint is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise TypeError(name)
        return int(value)
    if hint is float:
        if isinstance(value, bool):
            raise TypeError(name)
        return float(value)
    if hint is str:
        if isinstance(value, (dict, list)):
            raise TypeError(name)
        return str(value)
    raise TypeError(f"{name}: unsupported type {hint}")


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (Union, types.UnionType)


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "")


# ---- YAML + flags -----------------------------------------------------------------------------------------


def parse_flags(argv: list[str]) -> tuple[str | None, dict[str, Any]]:
    """``["--config", "x.yaml", "--lora.r", "16", "--cpu"]`` -> ("x.yaml", {"lora.r": 16, "cpu": True}).
    Values are parsed as YAML; a flag followed by another flag (or nothing) is ``true``."""
    config_path, overrides, i = None, {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"expected a --key flag, got {arg!r}")
        key, sep, text = arg[2:].partition("=")
        bare = not sep and not (i + 1 < len(argv) and not argv[i + 1].startswith("--"))
        if not sep:
            text, i = ("true", i) if bare else (argv[i + 1], i + 1)
        i += 1
        key = key.replace("-", "_")
        if key == "config":
            if bare or not text:
                raise ConfigError("--config needs a YAML file: --config recipes/configs/gpt2_alibi.yaml")
            config_path = str(text)
        else:
            overrides[key] = _flag_value(key, text)
    return config_path, overrides


def _flag_value(key: str, text: str) -> Any:
    """A flag's value parsed as YAML (``[1,2,8]`` -> a list); unparsable text is refused in one line."""
    import yaml

    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--{key} {text!r} is not a valid YAML value ({_yaml_problem(err)}); fix it, or quote a "
                          "plain string") from None


def _yaml_problem(err: Exception) -> str:
    """One line from a yaml error: its problem and where (1-based line / column), not yaml's multi-line text."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or type(err).__name__
    return problem if mark is None else f"{problem} at line {mark.line + 1}, column {mark.column + 1}"


def apply_overrides(values: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``lora.r``) in a nested dict; a missing or ``None`` section is created."""
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = values
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    return values


def load_config(path: str | Path | None = None, argv: list[str] | None = None,
                overrides: dict[str, Any] | None = None) -> TrainConfig:
    """YAML file (optional) + ``--flags`` (``argv``, which may carry ``--config``) + ``overrides`` -> a validated
    :class:`TrainConfig`."""
    import yaml

    flag_path, flags = parse_flags(list(argv or []))
    path = flag_path or path
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            what = "is a folder, not a YAML file" if path.is_dir() else "does not exist"
            raise ConfigError(f"config file {path} {what}")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(err)}; fix the YAML syntax "
                              "there") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"cannot read config file {path}: {err}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path} must hold a YAML mapping of config keys")
    apply_overrides(values, {**flags, **(overrides or {})})
    config = from_dict(TrainConfig, values)
    config.validate()
    return config


def reference(cls: type = TrainConfig, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(key, help, default) for every config key, nested sections dotted: the table in docs/finetune.md."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        nested = [t for t in (typing.get_args(hints[f.name]) or (hints[f.name],)) if dataclasses.is_dataclass(t)]
        if nested:
            rows.append((prefix + f.name, f.metadata.get("help", ""), SECTION))
            rows.extend(reference(nested[0], prefix + f.name + "."))
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        rows.append((prefix + f.name, f.metadata.get("help", ""), default))
    return rows
