"""What the attention function does with each keyword argument a family's attention module passes it.

transformers calls ``fn(module, query, key, value, attention_mask, dropout=, scaling=, **kwargs)``. ``dropout`` and
``scaling`` reach every kernel. Of the keyword arguments, each one is either **honoured** (the call computes what
the family means by it) or **bookkeeping** (it does not change what attention computes); any other keyword is
**refused** with an error naming it, so a family that starts passing one (attention sinks, a new cap) fails loudly
instead of computing something else. ``ArchSpec.attention_kwargs`` lists what each family passes;
tests/test_seams.py checks that list against the models and this table.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._seams import TransformersKwargs

# keyword -> how it is honoured
HONOURED = {
    "sliding_window": "transformers' mask function builds the window into the mask every kernel applies; a call "
                      "with no mask whose keys reach past the window is refused",
    "softcap": "logit soft-capping: the eager kernel caps the content scores, softcap * tanh(s / softcap), then adds "
               "the position bias and the mask; every call with a softcap runs it",
    "is_causal": "overrides the module's own is_causal",
}
# keyword -> why it does not change what attention computes
BOOKKEEPING = {
    **{name: "a model-level argument transformers threads through every layer" for name in TransformersKwargs.__annotations__},
    "position_ids": "read as the query positions of the call (hf_posenc.forward_state); the cache keeps the keys'",
    "output_attentions": "read from transformers' output collector (eager then returns the probabilities)",
    "use_cache": "the keys passed in already include the cache",
    "encoder_hidden_states": "self-attention attends over its own hidden states; cross-attention carries no method",
    "cu_seq_lens_q": "FlashAttention's packing metadata: for these kernels the mask encodes packed sequences",
    "cu_seq_lens_k": "FlashAttention's packing metadata: for these kernels the mask encodes packed sequences",
    "max_length_q": "FlashAttention's packing metadata: for these kernels the mask encodes packed sequences",
    "max_length_k": "FlashAttention's packing metadata: for these kernels the mask encodes packed sequences",
}
for _name in HONOURED:
    BOOKKEEPING.pop(_name, None)

# kernels that cannot apply a semantic argument, and the kernel that runs such a call instead
NO_DROPOUT = ("sdpa-banded", "flex")  # neither is chosen with dropout (flex.supports, can_train_banded); banded has none


@dataclass(frozen=True)
class CallSemantics:
    """The semantic keyword arguments of one attention call."""

    softcap: float | None = None
    sliding_window: int | None = None
    is_causal: bool | None = None


def read(kwargs: dict) -> CallSemantics:
    """The honoured keywords of ``kwargs`` (left in it); raises ``ValueError`` naming any unknown one."""
    unknown = sorted(k for k in kwargs if k not in HONOURED and k not in BOOKKEEPING)
    if unknown:
        raise ValueError(
            f"the attention call passed {unknown}, which hf_posenc's kernels do not implement; running without them "
            "would compute something other than the model means. This model family is not supported as it is "
            "(see docs/methods.md, 'Adding a family')"
        )
    return CallSemantics(**{k: kwargs[k] for k in HONOURED if k in kwargs})


def kernel_for(kernel: str, call: CallSemantics, dropout: float) -> str:
    """``kernel`` if it honours this call, else the kernel that does: softcap -> eager; dropout -> sdpa; a sliding
    window -> not flex (its per-forward block mask is keyed by the mask's shape, which a family's sliding and full
    layers share)."""
    if call.softcap is not None:
        return "eager"
    if dropout and kernel in NO_DROPOUT:
        return "sdpa"
    if call.sliding_window is not None and kernel == "flex":
        return "sdpa"
    return kernel


def check_window(call: CallSemantics, attention_mask, q_len: int, k_len: int) -> None:
    """transformers leaves the mask out only where the window hides nothing: refuse a call where it would."""
    window = call.sliding_window
    if window is not None and attention_mask is None and q_len > 1 and k_len > window:
        raise ValueError(
            f"sliding_window={window} with {k_len} keys but no attention mask: the window would be ignored. Run the "
            "model through its own forward (its mask function builds the window), not the attention function alone"
        )
