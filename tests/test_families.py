"""Per-family seams and contracts: the ArchSpec table against the models it describes.

- the keyword arguments each family passes its attention function are the ones its spec declares, and each is
  honoured or bookkeeping; an unknown one is refused;
- soft-capping (Gemma2), sliding windows, dropout and is_causal are honoured by every backend;
- the stand-ins accept the signatures their families call the native modules with, and report 0-based positions;
- every head class a family ships converts, runs past the old limit and reloads; LoRA targets come from PEFT.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import transformers
from test_matrix import ids
from tiny_models import (CACHE_ARG, FAMILIES, GEMMA2_WINDOW, GEMMA3_THETAS, OLD_LIMIT, cache_of, is_encoder,
                         tiny_config, tiny_model)

import hf_posenc
from hf_posenc import _seams, attention_kwargs
from hf_posenc.arches import ARCHES
from hf_posenc.arches.base import IdentityRotary, LayerTypeRotary
from hf_posenc.attention import method_of, posenc_attention_forward
from hf_posenc.forward_state import ForwardState
from hf_posenc.registry import arch_for

TOL = 1e-4
MODEL_LEVEL = set(_seams.TransformersKwargs.__annotations__)  # threaded through by transformers, any family


def spec_of(family: str):
    return arch_for(tiny_config(family))


def moved(internal: str, use: str) -> str:
    return f"transformers {transformers.__version__}: `{internal}` changed; hf_posenc relies on it {use}"


# ---- attention keyword arguments ------------------------------------------------------------------------------
def passed_kwargs(family: str, monkeypatch) -> set[str]:
    """Every keyword the family's attention modules pass, over a forward with a mask and hidden states, cached
    decoding and generate (decoders), and a training forward with labels."""
    model = hf_posenc.convert(tiny_model(family), "alibi")
    seen: set[str] = set()
    original = attention_kwargs.read

    def spy(kwargs):
        seen.update(kwargs)
        return original(kwargs)

    monkeypatch.setattr(attention_kwargs, "read", spy)
    x = ids(2, 20)
    model(x, attention_mask=torch.ones_like(x), output_hidden_states=True)
    if not is_encoder(family):
        out = model(x, use_cache=True)
        model(x[:, :1], **{CACHE_ARG: cache_of(out)})
        model.generate(x, max_new_tokens=2, do_sample=False, pad_token_id=0)
    model.train()
    model(x, labels=x)
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_kwargs_each_family_passes_are_declared(family, monkeypatch):
    seen = passed_kwargs(family, monkeypatch) - MODEL_LEVEL
    declared = spec_of(family).attention_kwargs
    assert seen <= declared, moved(
        f"{spec_of(family).attention_classes} -> attention_interface(**kwargs)",
        f"declaring what it passes: new keyword(s) {sorted(seen - declared)}; honour or refuse each in "
        "hf_posenc/attention_kwargs.py and add it to the family's ArchSpec.attention_kwargs",
    )


def test_transformers_kwargs_lists_the_model_level_arguments():
    assert {"position_ids", "output_attentions", "is_causal", "num_items_in_batch"} <= MODEL_LEVEL, moved(
        "utils.generic.TransformersKwargs", "as the keyword arguments every layer threads through (bookkeeping)"
    )
    assert "is_causal" in attention_kwargs.HONOURED and "is_causal" not in attention_kwargs.BOOKKEEPING


def test_every_declared_kwarg_is_honoured_or_bookkeeping():
    known = set(attention_kwargs.HONOURED) | set(attention_kwargs.BOOKKEEPING)
    for spec in ARCHES:
        assert spec.attention_kwargs <= known, spec.family
    assert not set(attention_kwargs.HONOURED) & set(attention_kwargs.BOOKKEEPING)


def attention_call(family: str = "llama", method: str = "alibi", length: int = 8):
    model = hf_posenc.convert(tiny_model(family), method)
    module = spec_of(family).attention_modules(model.base_model)[0]
    shape = model.base_model.posenc.shape
    torch.manual_seed(0)
    q = torch.randn(1, shape.num_heads, length, shape.head_dim)
    k = torch.randn(1, shape.num_kv_heads, length, shape.head_dim)
    v = torch.randn(1, shape.num_kv_heads, length, shape.head_dim)
    return module, q, k, v


def attend(module, q, k, v, mask, **kwargs):
    """One attention call as the model makes it: with a forward state of its own (no cache: key indices)."""
    state = ForwardState(method_of(module))
    return posenc_attention_forward(module, q, k, v, mask, **kwargs, posenc_state=state)


@pytest.mark.parametrize("keyword", ["s_aux", "sinks", "logit_scale"])
def test_an_unknown_attention_kwarg_is_refused_naming_it(keyword):
    module, q, k, v = attention_call()
    with pytest.raises(ValueError, match=keyword):
        attend(module, q, k, v, None, **{keyword: torch.zeros(6)})


def test_is_causal_false_is_honoured():
    """A decoder module called with is_causal=False attends to later keys: the first query sees the last key."""
    module, q, k, v = attention_call()
    causal, _ = attend(module, q, k, v, None)
    bidirectional, _ = attend(module, q, k, v, None, is_causal=False)
    changed = v.clone()
    changed[:, :, -1] += 1.0
    moved_last, _ = attend(module, q, k, changed, None, is_causal=False)
    assert (moved_last[:, 0] - bidirectional[:, 0]).abs().max() > 1e-3
    assert (causal[:, 0] - attend(module, q, k, changed, None)[0][:, 0]).abs().max() == 0


def test_a_window_without_its_mask_is_refused():
    module, q, k, v = attention_call(length=8)
    with pytest.raises(ValueError, match="sliding_window=4"):
        attend(module, q, k, v, None, sliding_window=4)
    attend(module, q, k, v, None, sliding_window=8)  # the window hides nothing: fine


def test_kernels_without_dropout_hand_the_call_on():
    none = attention_kwargs.CallSemantics()
    assert attention_kwargs.kernel_for("sdpa-banded", none, dropout=0.1) == "sdpa"
    assert attention_kwargs.kernel_for("sdpa-banded", none, dropout=0.0) == "sdpa-banded"
    capped = attention_kwargs.CallSemantics(softcap=30.0)
    for kernel in ("sdpa", "sdpa-windowed", "sdpa-banded", "sdpa-blocked", "flex", "eager"):
        assert attention_kwargs.kernel_for(kernel, capped, dropout=0.0) == "eager"


# ---- Gemma2: soft-capping, sliding windows, query_pre_attn_scalar ------------------------------------------
def test_tiny_gemma2_exercises_the_cap_and_the_window():
    """Without these the tests below would pass whether or not softcap / sliding_window were honoured."""
    x = ids(1, 3 * GEMMA2_WINDOW)
    reference = tiny_model("gemma2")(x).logits
    uncapped = tiny_model("gemma2", attn_logit_softcapping=None)(x).logits
    unwindowed = tiny_model("gemma2", sliding_window=4 * GEMMA2_WINDOW)(x).logits
    assert (reference - uncapped).abs().max() > 1e-2
    assert (reference - unwindowed).abs().max() > 1e-2


@pytest.mark.parametrize("backend", ["auto", "sdpa", "eager"])
def test_gemma2_converted_to_its_own_rope_is_the_original(backend):
    """RoPE at the model's own theta is what Gemma2 computed: the same logits, so soft-capping, the sliding window
    and ``scaling = query_pre_attn_scalar ** -0.5`` all reached the kernel (transformers' eager is the reference)."""
    x = ids(2, 3 * GEMMA2_WINDOW)
    original = tiny_model("gemma2")
    model = hf_posenc.convert(tiny_model("gemma2"), "rope", backend=backend)
    torch.testing.assert_close(model(x).logits, original(x).logits, atol=TOL, rtol=0)


@pytest.mark.parametrize("method", ["alibi", "t5"])
def test_every_backend_honours_softcap(method):
    """Long enough for the query-block kernels (>= 512 queries): each backend gives the eager kernel's logits."""
    x = ids(1, 520)
    logits = {}
    for backend in ("eager", "auto", "sdpa", "flex"):
        model = hf_posenc.convert(tiny_model("gemma2"), method, backend=backend)
        with torch.no_grad():
            logits[backend] = model(x).logits
    for backend in ("auto", "sdpa", "flex"):
        torch.testing.assert_close(logits[backend], logits["eager"], atol=TOL, rtol=0)


# ---- Gemma 3: a rotary per layer type, q/k norms, sliding windows --------------------------------------------
def gemma3_with_thetas(sliding: float, full: dict | None = None, **overrides):
    """The tiny Gemma 3 (same weights) with its sliding layers at ``sliding`` and ``full`` as its full layers' rope."""
    full = full or {"rope_type": "default", "rope_theta": GEMMA3_THETAS["full_attention"]}
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": sliding}, "full_attention": full}
    return tiny_model("gemma3", rope_parameters=rope, **overrides)


def test_tiny_gemma3_exercises_both_thetas_and_the_window():
    """Without these the tests below would pass whichever theta each layer got, and with the window ignored."""
    x = ids(1, 3 * GEMMA2_WINDOW)
    reference = tiny_model("gemma3")(x).logits
    own = GEMMA3_THETAS["sliding_attention"]
    for changed in (gemma3_with_thetas(10 * own), gemma3_with_thetas(own, {"rope_type": "default", "rope_theta": 37.0}),
                    tiny_model("gemma3", sliding_window=4 * GEMMA2_WINDOW)):
        assert (changed(x).logits - reference).abs().max() > 1e-2


@pytest.mark.parametrize("backend", ["auto", "sdpa", "eager"])
@pytest.mark.parametrize("method, options", [("rope", {}), ("rope", {"scaling": "dynamic_yarn", "factor": 4.0}),
                                             ("self_extend", {"window": 12, "group": 3, "dynamic": True})])
def test_gemma3_converted_to_its_own_rope_is_the_original(backend, method, options):
    """Each layer type's own theta, the q/k norms, the window and the query scalar all reached the kernel: the
    unconverted model's logits inside the trained context (the tiny model's thetas 100 / 10000)."""
    x = ids(2, 3 * GEMMA2_WINDOW)
    model = hf_posenc.convert(tiny_model("gemma3"), method, backend=backend, **options)
    torch.testing.assert_close(model(x).logits, tiny_model("gemma3")(x).logits, atol=TOL, rtol=0)


@pytest.mark.parametrize("scaling, scale", [("yarn", 4.0), ("linear", 4.0), ("dynamic_yarn", 2.0)])
def test_a_gemma3_scaling_applies_to_the_full_attention_layers_only(scaling, scale):
    """transformers' own Gemma 3 with that scaling on its full layers' entry alone is the reference: the sliding
    layers keep their own unscaled rotary (their window of 16 never reaches past the trained 64). Dynamic YaRN at
    2x the trained context is YaRN x 2 (rotated by hf_posenc, not by the model's rotary)."""
    x = ids(1, int(scale * OLD_LIMIT) if scaling == "dynamic_yarn" else 3 * GEMMA2_WINDOW)
    model = hf_posenc.convert(tiny_model("gemma3"), "rope", scaling=scaling, factor=4.0)
    full = {"rope_type": "yarn" if scaling == "dynamic_yarn" else scaling, "factor": scale,
            "rope_theta": GEMMA3_THETAS["full_attention"]}
    if scaling != "linear":
        full["original_max_position_embeddings"] = OLD_LIMIT
    reference = gemma3_with_thetas(GEMMA3_THETAS["sliding_attention"], full)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, reference(x).logits, atol=TOL, rtol=0)
        assert (reference(x).logits - tiny_model("gemma3")(x).logits).abs().max() > 1e-2  # the scaling bites


def test_gemma3_keys_stored_rotated_leave_the_sliding_layers_to_their_own_rotary():
    """Partial rotary rotates in attention and stores keys rotated; a prefill shorter than the window is adopted
    whole (hf_posenc.key_cache). The sliding layers' keys are the model's rotary's alone: decoding across the
    window gives the full forward's logits."""
    model = hf_posenc.convert(tiny_model("gemma3"), "rope", fraction=0.5)
    x = ids(1, 2 * GEMMA2_WINDOW)
    with torch.no_grad():
        full = model(x).logits
        cache = cache_of(model(x[:, : GEMMA2_WINDOW // 2], use_cache=True))
        for n in range(GEMMA2_WINDOW // 2, x.shape[1]):
            step = model(x[:, n: n + 1], use_cache=True, **{CACHE_ARG: cache})
            cache = cache_of(step)
    torch.testing.assert_close(step.logits[:, -1], full[:, -1], atol=TOL, rtol=0)


def test_a_gemma3_multimodal_model_is_refused_naming_the_text_model():
    """Its vision tower is not covered: the error names the text-only class, and the model is left as it was."""
    text = tiny_config("gemma3")
    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    model = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
        text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="Gemma3ForCausalLM"):
        hf_posenc.convert(model, "rope", scaling="yarn", factor=4.0)
    assert model.config._attn_implementation != "hf_posenc" and not hasattr(model.config, "posenc")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---- stand-ins: the signatures the families call them with -----------------------------------------------------
def parameters(function) -> list[str]:
    return [name for name in inspect.signature(function).parameters if name != "self"]


@pytest.mark.parametrize("family", [f for f in FAMILIES if spec_of(f).position_table])
def test_table_stand_in_takes_the_native_tables_signature(family):
    spec = spec_of(family)
    table = tiny_model(family).base_model.get_submodule(spec.position_table)
    assert isinstance(table, torch.nn.Embedding), moved(spec.position_table, "as the learned table to replace")
    assert parameters(type(table).forward) == parameters(spec.table_call), moved(
        f"{type(table).__name__}.forward", f"calling its stand-in with {parameters(spec.table_call)}"
    )


@pytest.mark.parametrize("family", [f for f in FAMILIES if spec_of(f).rotary])
def test_rotary_stand_in_takes_the_native_rotarys_signature(family):
    rotary = tiny_model(family).base_model.get_submodule(spec_of(family).rotary)
    native = parameters(type(rotary).forward)
    assert set(native) <= set(parameters(IdentityRotary.forward)), moved(
        f"{type(rotary).__name__}.forward{native}", "calling IdentityRotary with the same arguments"
    )
    if spec_of(family).rope_layer_type is not None:  # a rotary per layer type (Gemma 3): its stand-in, its config
        assert set(native) == set(parameters(LayerTypeRotary.forward)), moved(
            f"{type(rotary).__name__}.forward{native}", "calling LayerTypeRotary with the same arguments")
        config = tiny_config(family)
        assert set(config.rope_parameters) == set(config.layer_types) >= {spec_of(family).rope_layer_type}, moved(
            "config.rope_parameters / config.layer_types", "to find each layer type's rotary")


def reported_positions(family: str, x, **kwargs) -> torch.Tensor:
    """The query positions the method's bias is built for in the model's first attention call."""
    model = hf_posenc.convert(tiny_model(family), "alibi")
    method = model.base_model.posenc
    reports = []
    original = method.score_bias
    method.score_bias = lambda q_pos, k_pos: reports.append(q_pos) or original(q_pos, k_pos)
    model(x, **kwargs)
    return reports[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_method_sees_position_zero_at_the_first_token(family):
    """RoBERTa counts from padding_idx + 1, OPT's table adds 2 itself: the method sees 0, 1, ... in every family."""
    x = ids(2, 12)
    assert torch.equal(reported_positions(family, x).expand(2, -1), torch.arange(12).expand(2, -1))


def test_opt_counts_positions_from_the_attention_mask():
    """OPT derives left-padded rows' positions from the mask: the first real token is position 0."""
    x = ids(2, 10)
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    positions = reported_positions("opt", x, attention_mask=mask)
    assert positions[0].tolist() == list(range(10))
    assert positions[1, 3:].tolist() == list(range(7))


def test_opt_table_call_matches_opts_own_rule():
    table = tiny_model("opt").base_model.decoder.embed_positions
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    ours = arch_for(tiny_config("opt")).table_call(mask, 2)
    torch.testing.assert_close(table(mask, 2), table.weight[ours + table.offset])


@pytest.mark.parametrize("family", [f for f in FAMILIES if spec_of(f).position_table])
def test_table_limit_is_where_the_native_table_stops(family):
    """``ArchSpec.table_limit`` tokens run on the unconverted model; one more raises (RoBERTa: 2 rows of offset)."""
    model = tiny_model(family)
    limit = spec_of(family).table_limit(model.config)
    assert limit == (OLD_LIMIT - 2 if family == "roberta" else OLD_LIMIT)
    model(ids(1, limit))
    with pytest.raises((IndexError, RuntimeError)):  # the table (or BERT's position buffers) end there
        model(ids(1, limit + 1))


# ---- every head class a family ships ---------------------------------------------------------------------------
HEAD_CASES = [(spec.family, head) for spec in ARCHES for head in spec.head_classes]


@pytest.mark.parametrize("family, head", HEAD_CASES)
def test_every_head_class_converts_runs_past_the_limit_and_reloads(family, head, tmp_path, monkeypatch):
    model = hf_posenc.convert(tiny_model(family, head, num_labels=3), "alibi")
    x = ids(2, 2 * OLD_LIMIT + 1)
    begun = []

    class Counted(ForwardState):
        def __init__(self, *args, **kwargs):
            begun.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(hf_posenc.hooks, "ForwardState", Counted)
    out = model(x)
    assert begun == [1], moved(f"{head}.forward", "running the base model's forward (ArchSpec.forward_root) once")
    logits = out.logits if hasattr(out, "logits") else out.last_hidden_state
    assert torch.isfinite(logits).all()
    model.save_pretrained(tmp_path)
    reloaded = hf_posenc.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    again = reloaded(x)
    torch.testing.assert_close(again.logits if hasattr(again, "logits") else again.last_hidden_state, logits,
                               atol=0, rtol=0)


# ---- LoRA targets from PEFT ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_targets_are_peft_s_and_train(family):
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    from hf_posenc.training.config import LoraArgs
    from hf_posenc.training.model import apply_lora, lora_targets

    model = hf_posenc.convert(tiny_model(family), "t5")
    assert lora_targets(LoraArgs(), model.config) == list(PEFT_TARGETS[model.config.model_type])
    peft_model = apply_lora(model, LoraArgs(r=2), spec_of(family).family, [])
    trained = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trained) and any(".posenc." in n for n in trained)
    x = ids(1, 20)
    peft_model(x, labels=x).loss.backward()


@pytest.mark.parametrize("family", [f for f in FAMILIES if not is_encoder(f)])
def test_packs_by_position_ids_is_what_the_family_does(family):
    """Unconverted: two sequences in one row with positions restarting at 0 equal the separate sequences exactly
    when the spec says the family's mask separates them."""
    model = tiny_model(family)
    a, b = ids(1, 9, seed=1), ids(1, 7, seed=2)
    position_ids = torch.cat([torch.arange(9), torch.arange(7)])[None]
    packed = model(torch.cat([a, b], dim=1), position_ids=position_ids, use_cache=False).logits
    separate = (packed[:, 9:] - model(b).logits).abs().max() < TOL
    assert bool(separate) == spec_of(family).packs_by_position_ids


@pytest.mark.parametrize("family", ["opt", "roberta"])
def test_finetune_takes_objective_and_lora_targets_from_the_spec(family, tmp_path, tiny_tokenizer_dir, text_path):
    """RoBERTa trains masked-LM (an encoder), OPT causal; LoRA on PEFT's targets; the result reloads."""
    from test_finetune import run, save_tiny

    from hf_posenc.training import load_finetuned, read_metrics

    model_dir = save_tiny(tmp_path, tiny_tokenizer_dir, family)
    result = run(model_dir, tmp_path / "out", text_path, max_steps=4, eval_every=0, log_every=2,
                 eval_multipliers=[1, 2], lora={"r": 2})
    assert result.step == 4 and all(math.isfinite(loss) for loss in result.losses)
    start = next(r for r in read_metrics(tmp_path / "out") if r.get("event") == "start")
    assert start["objective"] == ("mlm" if is_encoder(family) else "causal")
    reloaded = load_finetuned(tmp_path / "out")
    assert reloaded.config.posenc["method"] == "alibi"


@pytest.mark.parametrize("family", ["gemma2", "llama"])
def test_sinusoidal_matches_the_hidden_states_it_is_added_to(family):
    """Gemma2 multiplies its token embeddings by sqrt(hidden_size) before layer 0: the default sinusoidal scale
    matches what layer 0 receives (ArchSpec.token_embedding_scale)."""
    model = tiny_model(family)
    x = ids(1, 16)
    seen = {}
    layers = model.base_model.get_submodule(spec_of(family).decoder_layers)
    handle = layers[0].register_forward_pre_hook(lambda m, a, kw: seen.update(h=kw.get("hidden_states", a and a[0])),
                                                 with_kwargs=True)
    model(x)
    handle.remove()
    hidden_rms = float(seen["h"].pow(2).mean().sqrt())
    hf_posenc.convert(model, "sinusoidal")
    scale = model.config.posenc["options"]["scale"]
    assert 0.3 < scale / hidden_rms < 3.0


def test_dropout_is_honoured_by_the_kernel_auto_picks():
    """T5 past 512 queries without autograd takes the banded kernel, which has no dropout: a training-mode call
    (attention dropout 1: every probability dropped) goes to a kernel that applies it."""
    model = hf_posenc.convert(tiny_model("gpt2", attn_pdrop=1.0, resid_pdrop=0.0, embd_pdrop=0.0), "t5")
    x = ids(1, 520)
    with torch.no_grad():
        evaluated = model(x).logits
        dropped = model.train()(x).logits
    assert (dropped - evaluated).abs().max() > 1e-2


@pytest.mark.parametrize("family", [f for f in FAMILIES if spec_of(f).rotary])
def test_native_rotary_is_applied_before_the_cache_update(family):
    """IdentityRotary keeps cached keys unrotated only if the family rotates before ``cache.update``."""
    attention = type(spec_of(family).attention_modules(tiny_model(family).base_model)[0])
    source = inspect.getsource(attention.forward)
    assert source.index("apply_rotary_pos_emb") < source.index(".update("), moved(
        f"{attention.__name__}.forward", "assuming RoPE is applied to keys before they enter the cache"
    )
