"""One state per forward, passed with the call: a converted model serves several threads, every row operation of a
transformers cache keeps the cached keys' positions, and no forward depends on an earlier one.

Each test here failed on the core that parked a forward's positions on the shared method module and on cache
attributes (issue 25): 51-57 of 120 concurrent GPT-2 ALiBi forwards were wrong, a reordered cache kept the old
rows' positions, a subset of rows crashed, and Llama's dynamic RoPE depended on the calls before it.
"""

from __future__ import annotations

import random
import sys
import threading

import pytest
import torch
from test_matrix import CAUSAL, converted, ids
from tiny_models import CACHE_ARG, OLD_LIMIT, cache_of, is_encoder

from hf_posenc.forward_state import ForwardState

TOL = 1e-5


def left_padded_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, mask, position_ids) of rows with ``lengths`` real tokens, left-padded to the longest; positions count
    from 0 at each row's first real token (as generate derives them)."""
    width = max(lengths)
    x = ids(len(lengths), width, seed)
    mask = torch.zeros_like(x)
    for row, n in enumerate(lengths):
        mask[row, width - n:] = 1
    x = x.masked_fill(mask == 0, 0)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    return x, mask, positions


def run_alone(model, x, mask=None, positions=None) -> torch.Tensor:
    with torch.no_grad():
        return model(x, attention_mask=mask, position_ids=positions).logits


# ---- threads -------------------------------------------------------------------------------------------------
def run_in_threads(jobs: list, threads: int) -> list:
    """Run each job (a zero-argument callable) on ``threads`` threads at once, started together; results in order.
    The interpreter switches threads every microsecond, so the calls interleave inside each forward."""
    results, errors = [None] * len(jobs), []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    barrier = threading.Barrier(threads)

    def worker(offset: int):
        barrier.wait()
        for index in range(offset, len(jobs), threads):
            try:
                results[index] = jobs[index]()
            except Exception as err:  # noqa: BLE001 - reported below with the job
                errors.append((index, err))

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    sys.setswitchinterval(interval)
    assert not errors, errors
    return results


def test_threads_sharing_a_model_get_their_own_positions():
    """GPT-2 ALiBi, four threads, left-padded batches of different lengths and paddings, each prefilled into a
    cache and decoded a token: every result equals the same call run alone."""
    torch.set_num_threads(1)  # the calls interleave at Python level, not inside one op
    model = converted("gpt2", "alibi").eval()
    rng = random.Random(0)
    jobs = [random_job(model, "gpt2", rng, use_cache=True) for _ in range(60)]
    expected = [job() for job in jobs]
    got = run_in_threads(jobs, threads=4)
    wrong = [i for i, (a, b) in enumerate(zip(got, expected)) if a.shape != b.shape or (a - b).abs().max() > TOL]
    assert not wrong, f"{len(wrong)} of {len(jobs)} concurrent forwards differ from the same call alone"


PROPERTY_METHODS = ["alibi", "t5", "rope", "rope-partial", "rope-dynamic", "rope-dynamic_yarn", "shaw", "xpos",
                    "fire", "sinusoidal", "learned"]
PROPERTY_FAMILIES = ["gpt2", "llama", "qwen3", "opt", "bert"]


def random_job(model, family: str, rng: random.Random, use_cache: bool | None = None):
    """One call of a random shape: batch, length, left padding, and for decoders a cache (prefill + decode)."""
    lengths = [rng.choice([6, 12, 30, 2 * OLD_LIMIT]) - rng.randint(0, 3) for _ in range(rng.randint(1, 3))]
    x, mask, positions = left_padded_batch(lengths, seed=rng.randint(0, 10**6))
    split = x.shape[1] - rng.randint(1, 2)  # prefill, then one or two tokens on the cache
    if use_cache is None:
        use_cache = not is_encoder(family) and rng.random() < 0.5

    def job():
        with torch.no_grad():
            if not use_cache:
                return model(x, attention_mask=mask, position_ids=positions).logits
            first = model(x[:, :split], attention_mask=mask[:, :split], position_ids=positions[:, :split],
                          use_cache=True)
            rest = model(x[:, split:], attention_mask=mask, position_ids=positions[:, split:],
                         **{CACHE_ARG: cache_of(first)}, use_cache=True)
            return torch.cat([first.logits, rest.logits], dim=1)

    return job


@pytest.mark.parametrize("seed", range(3))
def test_threaded_property_random_method_family_length_padding_cache(seed):
    """Several threads, each call a random method x family x batch x length x padding x cache: each result equals
    the same call run alone (the property behind serving one model from a thread pool)."""
    torch.set_num_threads(1)
    rng = random.Random(seed)
    models = {}
    jobs = []
    for _ in range(48):
        family, method = rng.choice(PROPERTY_FAMILIES), rng.choice(PROPERTY_METHODS)
        if (family, method) not in models:
            models[family, method] = converted(family, method).eval()
        jobs.append(random_job(models[family, method], family, rng))
    expected = [job() for job in jobs]
    got = run_in_threads(jobs, threads=4)
    for index, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0, msg=f"job {index}")


# ---- cache row operations ------------------------------------------------------------------------------------
ROW_METHODS = ["alibi", "t5", "shaw", "xpos", "fire", "rope-dynamic", "rope", "sinusoidal"]


def prefilled(model, lengths: list[int]):
    """A left-padded batch prefilled into a cache, and the (ids, mask, positions) of one more token per row."""
    x, mask, positions = left_padded_batch([n + 1 for n in lengths], seed=3)
    with torch.no_grad():
        out = model(x[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1], use_cache=True)
    return cache_of(out), (x, mask, positions)


def step_logits(model, cache, x, mask, positions) -> torch.Tensor:
    """(B, V) logits of the last token, decoded on ``cache``."""
    with torch.no_grad():
        out = model(x[:, -1:], attention_mask=mask, position_ids=positions[:, -1:], **{CACHE_ARG: cache},
                    use_cache=True)
    return out.logits[:, -1]


def full_logits(model, x, mask, positions) -> torch.Tensor:
    return run_alone(model, x, mask, positions)[:, -1]


@pytest.mark.parametrize("case", ROW_METHODS)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_reordered_cache_rows_keep_their_positions(family, case):
    """``reorder_cache`` / ``batch_select_indices`` with a permutation (beam search reorders rows)."""
    model = converted(family, case).eval()
    for operation in ("reorder_cache", "batch_select_indices"):
        cache, (x, mask, positions) = prefilled(model, [20, 9, 14])
        order = torch.tensor([2, 0, 1])
        getattr(cache, operation)(order)
        got = step_logits(model, cache, x[order], mask[order], positions[order])
        torch.testing.assert_close(got, full_logits(model, x[order], mask[order], positions[order]), atol=1e-4,
                                   rtol=0, msg=operation)


@pytest.mark.parametrize("case", ROW_METHODS)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_subset_of_cache_rows_decodes_as_those_rows_alone(family, case):
    model = converted(family, case).eval()
    cache, (x, mask, positions) = prefilled(model, [20, 9, 14])
    keep = torch.tensor([1])
    cache.batch_select_indices(keep)
    got = step_logits(model, cache, x[keep], mask[keep], positions[keep])
    torch.testing.assert_close(got, full_logits(model, x[keep], mask[keep], positions[keep]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ROW_METHODS)
def test_repeated_cache_rows_keep_their_positions(case):
    """``batch_repeat_interleave`` (what generate does for num_return_sequences / beams)."""
    model = converted("gpt2", case).eval()
    cache, (x, mask, positions) = prefilled(model, [20, 9])
    cache.batch_repeat_interleave(2)
    rows = torch.tensor([0, 0, 1, 1])
    got = step_logits(model, cache, x[rows], mask[rows], positions[rows])
    torch.testing.assert_close(got, full_logits(model, x[rows], mask[rows], positions[rows]), atol=1e-4, rtol=0)


def test_a_reset_cache_forgets_its_positions():
    model = converted("gpt2", "alibi").eval()
    cache, _ = prefilled(model, [20, 9])
    cache.reset()
    x = ids(1, 6)
    with torch.no_grad():
        out = model(x, **{CACHE_ARG: cache}, use_cache=True).logits
    torch.testing.assert_close(out, run_alone(model, x), atol=1e-5, rtol=0)


def test_a_copied_cache_keeps_positions_and_no_forward_state():
    import copy

    model = converted("gpt2", "rope").eval()
    cache, (x, mask, positions) = prefilled(model, [20, 9])
    twin = copy.deepcopy(cache)
    a = step_logits(model, cache, x, mask, positions)
    b = step_logits(model, twin, x, mask, positions)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(a, full_logits(model, x, mask, positions), atol=1e-4, rtol=0)


# ---- no history ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_dynamic_rope_does_not_depend_on_earlier_calls(family):
    """transformers' dynamic rotary module keeps the longest length it has seen: an input past the trained context
    after a longer one gave other logits (1.8e-3). Frequencies come from the input's own positions only."""
    model = converted(family, "rope-dynamic").eval()
    short = ids(1, OLD_LIMIT + 36)
    before = run_alone(model, short)
    run_alone(model, ids(1, 3 * OLD_LIMIT))
    torch.testing.assert_close(run_alone(model, short), before, atol=0, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_dynamic_rope_scales_each_row_by_its_own_length(family):
    """A short row batched with one past the trained context equals the short row alone (the scale is per row)."""
    model = converted(family, "rope-dynamic").eval()
    x, mask, positions = left_padded_batch([20, 3 * OLD_LIMIT])
    batched = run_alone(model, x, mask, positions)[0, -20:]
    alone = run_alone(model, x[:1, -20:], mask[:1, -20:], positions[:1, -20:])[0]
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=0)


def test_the_method_module_holds_no_forward_state():
    """Forwards (with and without a cache) leave the method module as they found it: no attribute added or
    rebound (it holds parameters and options; the state of a call travels with the call)."""
    model = converted("gpt2", "alibi").eval()
    method = model.base_model.posenc
    before = dict(vars(method))
    out = model(ids(2, 10), use_cache=True)
    model(ids(2, 1), **{CACHE_ARG: cache_of(out)}, use_cache=True)
    after = vars(method)
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)


def test_an_attention_call_without_its_forward_state_is_refused():
    from hf_posenc.attention import posenc_attention_forward

    model = converted("llama", "alibi")
    module = model.base_model.layers[0].self_attn
    q = torch.randn(1, 6, 4, 8)
    with pytest.raises(RuntimeError, match="no hf_posenc forward state"):
        posenc_attention_forward(module, q, q[:, :2], q[:, :2], None)
    out, _ = posenc_attention_forward(module, q, q[:, :2], q[:, :2], None,
                                      posenc_state=ForwardState(model.base_model.posenc))
    assert out.shape == (1, 4, 6, 8)


@pytest.mark.parametrize("family", CAUSAL)
def test_every_decoder_family_passes_the_state_to_each_layer(family, monkeypatch):
    """The state reaches every self-attention call through the keyword arguments the family threads down."""
    import hf_posenc.attention as attention

    model = converted(family, "alibi").eval()
    seen = []
    original = attention.state_of

    def spy(kwargs):
        state = original(kwargs)
        seen.append(id(state))
        return state

    monkeypatch.setattr(attention, "state_of", spy)
    run_alone(model, ids(1, 8))
    assert len(seen) == model.config.num_hidden_layers and len(set(seen)) == 1
