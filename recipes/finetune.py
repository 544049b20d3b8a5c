"""Fine-tune a model after swapping its position encoding, so it works past its old position limit.

    accelerate launch recipes/finetune.py --config recipes/configs/gpt2_alibi.yaml
    accelerate launch recipes/finetune.py --config recipes/configs/gpt2_alibi.yaml --max_steps 200 --lora.r 16
    python recipes/finetune.py --config recipes/configs/gpt2_alibi.yaml --resume_from latest

Flags override YAML keys; ``--help`` lists them all. Everything here lives in :mod:`hf_posenc.training`
(config, data, loop, checkpointing); see docs/finetune.md.
"""

import sys

from hf_posenc.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
