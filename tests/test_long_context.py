"""The long-context scores the retrofit and the studies report (hf_posenc.integrations.long_context)."""

import pytest
import torch
import torch.nn.functional as F

from hf_posenc.integrations.long_context import passkey_accuracy, passkey_docs


@pytest.fixture(scope="module")
def model_and_docs(tiny_tokenizer):
    from tiny_models import tiny_model

    torch.manual_seed(0)
    model = tiny_model("llama").eval()
    return model, passkey_docs(tiny_tokenizer, [256, 512], [0.0, 1.0], samples=2)


def test_passkey_reports_hits_prompts_and_the_answer_nll_per_length(model_and_docs):
    model, docs = model_and_docs
    scores = passkey_accuracy(model, docs)
    assert scores["256/n"] == scores["512/n"] == 4
    for length in (256, 512):
        own = [d for d in docs if d["length"] == length]
        nll = []
        for doc in own:  # the reference: full logits of the whole prompt, the answer positions only
            ids, a = torch.tensor(doc["ids"]), doc["answer_from"]
            with torch.no_grad():
                logits = model(input_ids=ids[None]).logits[0, a - 1 : -1].float()
            nll.append(F.cross_entropy(logits, ids[a:]).item())
        assert scores[f"{length}/nll"] == pytest.approx(sum(nll) / len(nll), rel=1e-4)
        assert 0.0 <= scores[str(length)] <= 1.0 and scores[f"{length}@0"] in (0.0, 0.5, 1.0)


def test_passkey_counts_a_hit_when_argmax_reproduces_the_answer(model_and_docs):
    """A model whose head always predicts the next answer token hits every prompt at zero-ish NLL."""
    model, docs = model_and_docs
    doc = docs[0]

    class Oracle(torch.nn.Module):  # the head: logits that put the answer token first at each answer position
        def __init__(self, answer):
            super().__init__()
            self.answer = answer

        def forward(self, hidden):
            logits = torch.full((hidden.shape[0], model.config.vocab_size), -30.0)
            logits[torch.arange(len(self.answer)), self.answer] = 30.0
            return logits

    answer = torch.tensor(doc["ids"][doc["answer_from"]:])
    original = model.get_output_embeddings
    model.get_output_embeddings = lambda: Oracle(answer)
    try:
        scores = passkey_accuracy(model, [doc])
    finally:
        model.get_output_embeddings = original
    assert scores[str(doc["length"])] == 1.0 and scores[f"{doc['length']}/nll"] < 1e-6


def test_passkey_reports_each_prompt_as_it_is_done(model_and_docs):
    """``done(tokens)`` after every prompt: a progress bar moves per prompt, not once after minutes of 16k prompts."""
    model, docs = model_and_docs
    seen = []
    passkey_accuracy(model, docs[:3], done=seen.append)
    assert seen == [len(d["ids"]) for d in docs[:3]]


@pytest.mark.parametrize("family, conversion", [
    ("gemma3", None),  # sliding-window layers: the chunks attend through a sliding cache
    ("gemma3", ("rope", {"scaling": "yarn", "factor": 4.0})),
    ("llama", ("self_extend", {"window": 16, "group": 4})),
    ("llama", ("alibi", {})),
])
def test_a_chunked_prefill_scores_what_the_full_forward_scores(family, conversion):
    """token_nll(chunk=C) feeds the window C tokens at a time through a cache; for a model whose cache gives its
    full forward (not scaled by the input length), the NLL is the full forward's, past the old limit too."""
    import hf_posenc
    from hf_posenc.integrations.long_context import token_nll
    from tiny_models import OLD_LIMIT, tiny_model

    model = tiny_model(family).eval()
    if conversion:
        hf_posenc.convert(model, conversion[0], **conversion[1])
    ids = torch.randint(0, model.config.vocab_size, (3 * OLD_LIMIT + 5,), generator=torch.Generator().manual_seed(0))
    whole = token_nll(model, ids)
    assert whole.shape == (len(ids) - 1,)
    for chunk in (OLD_LIMIT // 2, 48, len(ids) - 2):  # the last chunk: one target, or none after a full one
        torch.testing.assert_close(token_nll(model, ids, chunk), whole, rtol=1e-4, atol=1e-4)
