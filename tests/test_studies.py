"""The study scripts run end to end on tiny settings (the full runs are the developers', not CI's)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from tiny_models import TEXT

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "studies" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_gpt2_study_quick(tmp_path, monkeypatch):
    from hf_posenc import sources

    monkeypatch.setattr(sources, "text_splits", lambda name: {"train": TEXT, "heldout": TEXT})
    study = load_script("gpt2_extrapolation")
    out = tmp_path / "study"
    assert study.main(["--out", str(out), "--quick", "--methods", "alibi,nope", "--plot", str(tmp_path / "p.png")]) == 0
    results = json.loads((out / "results.json").read_text())
    ppl = results["perplexity"]
    assert set(ppl) == {"native (pretrained)", "native (continued)", "alibi", "nope"}
    assert set(ppl["native (pretrained)"]) == {"32"}  # the learned table covers 1x only
    assert set(ppl["alibi"]) == {"32", "64", "128"}
    assert "| alibi |" in (out / "table.md").read_text()
    assert (tmp_path / "p.png").stat().st_size > 1000
    # re-running reuses every stage
    assert study.main(["--out", str(out), "--quick", "--methods", "alibi,nope"]) == 0
