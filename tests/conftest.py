import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny_models.py

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    from tiny_models import train_tiny_tokenizer

    out = tmp_path_factory.mktemp("tiny_tokenizer")
    train_tiny_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def text_path() -> Path:
    from tiny_models import TEXT

    return TEXT


@pytest.fixture
def tiny_llama_dir(tmp_path, tiny_tokenizer_dir, monkeypatch):
    """A saved tiny Llama with a tokenizer, as a retrofit --model; shared scores go to a temporary source cache."""
    import shutil

    from tiny_models import tiny_model

    monkeypatch.setenv("HF_POSENC_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(model)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, model)
    return model


@pytest.fixture
def kernels_seen(monkeypatch):
    """The kernel names ``dispatch.choose_kernel`` returns while the test runs, in order."""
    from hf_posenc.backends import dispatch

    seen = []
    original = dispatch.choose_kernel

    def spy(*args, **kwargs):
        seen.append(original(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(dispatch, "choose_kernel", spy)
    return seen
