"""Saved by hf_posenc next to the weights of a checkpoint whose position encoding it replaced.

transformers runs this file for ``AutoConfig`` / ``AutoModelFor*.from_pretrained(path, trust_remote_code=True)``.
It only hands over to the installed hf_posenc package (``pip install hf_posenc``), which rebuilds the model exactly
as ``hf_posenc.from_pretrained(path)`` does: the family's own transformers class, with the new position method.
"""

from hf_posenc.hub_code import (  # noqa: F401
    PosEncAutoConfig,
    PosEncAutoModel,
    PosEncAutoModelForCausalLM,
    PosEncAutoModelForMaskedLM,
    PosEncAutoModelForQuestionAnswering,
    PosEncAutoModelForSequenceClassification,
    PosEncAutoModelForTokenClassification,
)
