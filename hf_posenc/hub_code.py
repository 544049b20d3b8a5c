"""Converted checkpoints on disk, and how the rest of transformers loads them.

``save_pretrained`` of a converted model writes ``config.json`` so that transformers *without* hf_posenc can never
load it silently wrong:

- ``model_type`` is ``"hf_posenc"`` (the family's own, e.g. ``"gpt2"``, is kept as ``posenc_base_model_type``), and
  ``auto_map`` points every Auto class at ``modeling_hf_posenc.py``, a thin file saved next to the weights that
  hands over to this package. ``AutoModelFor*.from_pretrained(dir)`` therefore asks for ``trust_remote_code=True``
  and, given it, rebuilds the model exactly as :func:`hf_posenc.from_pretrained` does.
- the family's position-limit field (``n_positions`` / ``max_position_embeddings``) holds a sentence instead of a
  number: the family's own config class (``GPT2LMHeadModel.from_pretrained(dir)``, which ignores ``auto_map`` and
  only *warns* about a foreign ``model_type``) refuses it, and its error quotes the sentence, which says how to load
  the checkpoint. The real limit is ``posenc["max_position_embeddings"]``.

In memory nothing of this shows: a converted model's config is the family's own config class (a subclass,
``PosEnc<Family>Config``, whose only difference is that ``save_pretrained`` writes the format above), with the
family's ``model_type``, so PEFT, pipelines, the Trainer and ``generate`` see an ordinary model.

With hf_posenc imported, ``AutoConfig`` / ``AutoModelFor*`` / ``pipeline(model=dir)`` load converted checkpoints
without ``trust_remote_code``: the ``"hf_posenc"`` model type and the ``PosEnc<Family>Config`` classes are
registered with transformers' Auto classes.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import transformers
from transformers import AutoConfig, PretrainedConfig

from ._seams import AttentionInterface, AttentionMaskInterface, sdpa_mask
from .config import PosEncConfig

MODEL_TYPE = "hf_posenc"  # config.json model_type of a saved converted checkpoint
BASE_MODEL_TYPE = "posenc_base_model_type"  # config.json key: the family's own model_type
CODE_MODULE = "modeling_hf_posenc"  # the file saved next to the weights (without .py)
CODE_SOURCE = Path(__file__).parent / "remote" / f"{CODE_MODULE}.py"
UNCONVERTED_ATTENTION = "hf_posenc_unconverted"  # attention of a model plain transformers built from our config
AUTO_CLASSES = (
    "AutoModel", "AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification", "AutoModelForQuestionAnswering",
)


def how_to_load(base_model_type: str, posenc: dict) -> str:
    return (
        f"hf_posenc checkpoint ({base_model_type} converted to {posenc.get('method')!r} positions): transformers' "
        f"{base_model_type} classes cannot build it. Load it with `hf_posenc.from_pretrained(path)`, or with "
        f"`AutoModelFor<Task>.from_pretrained(path, trust_remote_code=True)` (needs `pip install hf_posenc`)"
    )


def native_config_class(model_type: str) -> type[PretrainedConfig]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type]


def auto_mapping(auto_name: str):
    """``transformers.<auto_name>``'s config class -> model class mapping (a transformers internal)."""
    mapping = getattr(getattr(transformers, auto_name), "_model_mapping", None)
    if mapping is None:  # pragma: no cover - only on an unsupported transformers
        raise ImportError(
            f"hf_posenc needs `transformers.{auto_name}._model_mapping`, which transformers {transformers.__version__} "
            "does not have. hf_posenc is tested with transformers>=5,<6."
        )
    return mapping


def limit_key(config_class: type[PretrainedConfig]) -> str:
    """The config.json key of the family's position limit (GPT-2: ``n_positions``)."""
    return config_class.attribute_map.get("max_position_embeddings", "max_position_embeddings")


# ---- disk format ---------------------------------------------------------------------------------------------
def checkpoint_dict(native: dict[str, Any]) -> dict[str, Any]:
    """config.json contents for a converted model, from the family's own (``native``) contents."""
    saved = dict(native)
    base_type = saved["model_type"]
    config_class = native_config_class(base_type)
    saved[BASE_MODEL_TYPE] = base_type
    saved["model_type"] = MODEL_TYPE
    saved[limit_key(config_class)] = how_to_load(base_type, saved["posenc"])
    auto_map = {"AutoConfig": f"{CODE_MODULE}.PosEncAutoConfig"}
    for name in AUTO_CLASSES:
        if config_class in auto_mapping(name):
            auto_map[name] = f"{CODE_MODULE}.PosEnc{name}"
    saved["auto_map"] = auto_map
    return saved


def native_dict(saved: dict[str, Any]) -> dict[str, Any]:
    """The family's own config contents from a saved converted config.json (unchanged if it is native already)."""
    native = dict(saved)
    native.pop("auto_map", None)
    if native.get("model_type") != MODEL_TYPE:
        return native
    base_type = native.pop(BASE_MODEL_TYPE, None)
    posenc = native.get("posenc")
    if base_type is None or not isinstance(posenc, dict) or "max_position_embeddings" not in posenc:
        raise ValueError(
            f"config.json has model_type={MODEL_TYPE!r} but no {BASE_MODEL_TYPE!r} / posenc entry: it was not "
            "written by hf_posenc's save_pretrained, or was edited by hand"
        )
    native["model_type"] = base_type
    native[limit_key(native_config_class(base_type))] = posenc["max_position_embeddings"]
    return native


def write_checkpoint_files(save_directory: str | os.PathLike) -> None:
    """Rewrite the config.json transformers just saved into the converted-checkpoint format; add the code file."""
    path = Path(save_directory) / transformers.utils.CONFIG_NAME
    native = json.loads(path.read_text(encoding="utf-8"))
    if native.get("model_type") == MODEL_TYPE:
        native = native_dict(native)
    path.write_text(json.dumps(checkpoint_dict(native), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    shutil.copyfile(CODE_SOURCE, Path(save_directory) / f"{CODE_MODULE}.py")


def read_config(path, **hub_kwargs) -> PretrainedConfig:
    """The family's own config class (not the ``PosEnc`` subclass), built from a saved checkpoint's config.json."""
    saved, _ = PretrainedConfig.get_config_dict(path, **hub_kwargs)
    native = native_dict(saved)
    return native_config_class(native["model_type"]).from_dict(native)


def plain_config(config: PretrainedConfig) -> PretrainedConfig:
    """A copy of ``config`` as the family's own config class, without Auto-loading leftovers."""
    config = copy.deepcopy(config)
    config.__class__ = _native_class(type(config))
    config.__dict__.pop("auto_map", None)
    config._attn_implementation = None
    return config


def _native_class(config_class: type) -> type:
    return getattr(config_class, "_posenc_native", config_class)


# ---- in-memory config class --------------------------------------------------------------------------------
class _ConvertedConfigMixin:
    """Mixed in front of a family's config class: same fields, same ``model_type``; loads and saves the
    converted-checkpoint format."""

    _posenc_native: type[PretrainedConfig]

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        out = super().from_dict(native_dict(config_dict), **kwargs)
        config = out[0] if isinstance(out, tuple) else out
        # a model that plain transformers builds from this config (e.g. GPT2LMHeadModel.from_pretrained(path,
        # config=config)) is not converted: give it an attention that refuses to run rather than wrong outputs
        config._attn_implementation = UNCONVERTED_ATTENTION
        return out

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        if push_to_hub:
            raise ValueError(
                "push a converted model with model.push_to_hub(...) or model.save_pretrained(..., push_to_hub=True); "
                "its config alone is not a loadable checkpoint"
            )
        super().save_pretrained(save_directory, **kwargs)
        write_checkpoint_files(save_directory)


_CONVERTED_CLASSES: dict[type, type] = {}


def converted_config_class(native: type[PretrainedConfig]) -> type[PretrainedConfig]:
    """``PosEnc<Family>Config`` for a family's config class, created (and registered with the Auto model classes)
    on first use."""
    native = _native_class(native)
    cls = _CONVERTED_CLASSES.get(native)
    if cls is not None:
        return cls
    name = f"PosEnc{native.__name__}"
    cls = type(name, (_ConvertedConfigMixin, native), {
        "__module__": __name__, "__qualname__": name, "_posenc_native": native,
        "__doc__": f"{native.__name__} of a model converted by hf_posenc (saves the converted-checkpoint format).",
    })
    globals()[name] = cls  # importable by name, so configs and models pickle
    _CONVERTED_CLASSES[native] = cls
    for auto_name in AUTO_CLASSES:
        if native in auto_mapping(auto_name):
            loader = type(f"{name}{auto_name[4:]}Loader", (_AUTO_LOADERS[auto_name],), {
                "__module__": __name__, "config_class": cls,
            })
            getattr(transformers, auto_name).register(cls, loader, exist_ok=True)
    return cls


def __getattr__(name: str):
    """``PosEnc<Family>Config`` classes are made on first use; this makes them on lookup too (unpickling)."""
    native = getattr(transformers, name.removeprefix("PosEnc"), None) if name.startswith("PosEnc") else None
    if isinstance(native, type) and issubclass(native, PretrainedConfig) and native is not PretrainedConfig:
        return converted_config_class(native)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def mark_converted(config: PretrainedConfig) -> None:
    """Make ``config`` (a converted model's) save the converted-checkpoint format; idempotent."""
    config.__class__ = converted_config_class(type(config))


# ---- Auto-class entry points (also what modeling_hf_posenc.py exports) -------------------------------------
class PosEncAutoConfig(PretrainedConfig):
    """``AutoConfig`` for ``model_type="hf_posenc"``: returns the family's config (``PosEnc<Family>Config``)."""

    model_type = MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        native = native_dict(config_dict)
        return converted_config_class(native_config_class(native["model_type"])).from_dict(native, **kwargs)


# what the Auto loaders hand over to: hf_posenc.convert registers its convert / from_pretrained here when it is
# imported (it imports this module, so this module does not import it back)
_LOADING: dict[str, Callable[..., Any]] = {}


def register_loading(*, from_pretrained: Callable[..., Any], convert: Callable[..., Any]) -> None:
    _LOADING.update(from_pretrained=from_pretrained, convert=convert)


class _AutoLoader:
    """Stands in for a model class in transformers' Auto mappings: loads with :func:`hf_posenc.from_pretrained`."""

    auto_class: str

    @classmethod
    def register_for_auto_class(cls, auto_class=None) -> None:
        pass

    @classmethod
    def _model_class(cls, config):
        return auto_mapping(cls.auto_class)[_native_class(type(config))]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        if model_args:
            raise TypeError("hf_posenc checkpoints take keyword arguments only")
        for key in ("trust_remote_code", "_from_auto", "_from_pipeline", "code_revision"):
            kwargs.pop(key, None)
        if config is None:
            config = read_config(pretrained_model_name_or_path)
        return _LOADING["from_pretrained"](pretrained_model_name_or_path, model_class=cls._model_class(config),
                                           config=config, **kwargs)

    @classmethod
    def from_config(cls, config, **kwargs):
        return cls._from_config(config, **kwargs)

    @classmethod
    def _from_config(cls, config, **kwargs):
        """A freshly initialised model of the family, converted as ``config.posenc`` says."""
        config = plain_config(config)
        posenc = PosEncConfig.from_dict(config.posenc, saved=True)
        del config.posenc
        config.max_position_embeddings = posenc.original_max_position_embeddings
        model = cls._model_class(config)._from_config(config, **kwargs)
        return _LOADING["convert"](model, posenc)


class PosEncAutoModel(_AutoLoader):
    auto_class = "AutoModel"


class PosEncAutoModelForCausalLM(_AutoLoader):
    auto_class = "AutoModelForCausalLM"


class PosEncAutoModelForMaskedLM(_AutoLoader):
    auto_class = "AutoModelForMaskedLM"


class PosEncAutoModelForSequenceClassification(_AutoLoader):
    auto_class = "AutoModelForSequenceClassification"


class PosEncAutoModelForTokenClassification(_AutoLoader):
    auto_class = "AutoModelForTokenClassification"


class PosEncAutoModelForQuestionAnswering(_AutoLoader):
    auto_class = "AutoModelForQuestionAnswering"


_AUTO_LOADERS = {cls.auto_class: cls for cls in _AutoLoader.__subclasses__()}
assert set(_AUTO_LOADERS) == set(AUTO_CLASSES)


def _refuse_unconverted(module, *args, **kwargs):
    raise RuntimeError(
        "this model was built by plain transformers from the config of an hf_posenc checkpoint, so its position "
        "encoding was never converted and its outputs would be wrong. Load it with hf_posenc.from_pretrained(path) "
        "(or AutoModelFor<Task>.from_pretrained(path)), not with a concrete model class and config=..."
    )


def register() -> None:
    """Teach transformers' Auto classes the ``hf_posenc`` model type (idempotent; done on ``import hf_posenc``)."""
    AutoConfig.register(MODEL_TYPE, PosEncAutoConfig, exist_ok=True)
    AttentionInterface.register(UNCONVERTED_ATTENTION, _refuse_unconverted)
    AttentionMaskInterface.register(UNCONVERTED_ATTENTION, sdpa_mask)


register()
