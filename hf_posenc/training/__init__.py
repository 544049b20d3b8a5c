"""Fine-tuning a converted model back to health: brief continued pre-training at a short length.

    from hf_posenc.training import load_config, train
    result = train(load_config("recipes/configs/gpt2_alibi.yaml", ["--max_steps", "200"]))

Needs the ``train`` extra (accelerate, peft, pyyaml, tqdm, datasets). ``recipes/finetune.py`` is the command
line; docs/finetune.md lists every config key.
"""

from .checkpointing import StopRequest, TrainState, list_checkpoints
from .config import ConfigError, DataArgs, DistillArgs, LoraArgs, PoseArgs, TrainConfig, load_config, reference
from .data import DataError
from .loop import TrainResult, train
from .metrics import METRICS_FILE, read_metrics
from .model import load_finetuned

__all__ = [
    "ConfigError", "DataArgs", "DataError", "DistillArgs", "LoraArgs", "METRICS_FILE", "PoseArgs", "StopRequest",
    "TrainConfig", "TrainResult",
    "TrainState", "list_checkpoints", "load_config", "load_finetuned", "read_metrics", "reference", "train",
]
