"""Token counting with tiktoken, offline.

tiktoken downloads its encoding files on first use; servers without internet
cannot. tokenmem loads OpenAI's official ``cl100k_base`` and ``o200k_base``
files from the ``bpe-openai`` package (installed with tokenmem), checks them
against the sha256 that tiktoken itself pins, and builds the same
``tiktoken.Encoding`` that ``tiktoken.get_encoding`` would. Any other encoding
goes through tiktoken's own loader, which reads ``TIKTOKEN_CACHE_DIR`` first (an
air-gapped deployment puts the official file there, named by the sha1 of its
download URL) and is given a bounded time to download otherwise::

    >>> counter = TokenCounter.for_model("gpt-4o-mini")
    >>> counter.encoding_name, counter.count("hi")
    ('o200k_base', 1)
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import importlib.util
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tiktoken
import tiktoken.model

from .errors import ConfigurationError, EncodingUnavailable

__all__ = ["TokenCounter", "encoding_for_model", "get_encoding", "split_pattern"]

_ENDOFTEXT = "<|endoftext|>"
_ENDOFPROMPT = "<|endofprompt|>"

# Copied from tiktoken_ext.openai_public (tiktoken 0.14); tests/test_tokens.py
# checks the result against tiktoken's own constructor.
_O200K_PAT = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
_CL100K_PAT = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""


@dataclass(frozen=True)
class _Bundled:
    sha256: str  # of the uncompressed file, as pinned by tiktoken
    pat_str: str
    special_tokens: dict[str, int]


_BUNDLED = {
    "cl100k_base": _Bundled(
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        _CL100K_PAT,
        {
            _ENDOFTEXT: 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            _ENDOFPROMPT: 100276,
        },
    ),
    "o200k_base": _Bundled(
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        _O200K_PAT,
        {_ENDOFTEXT: 199999, _ENDOFPROMPT: 200018},
    ),
}

_DOWNLOAD_TIMEOUT_S = float(os.environ.get("TOKENMEM_TIKTOKEN_TIMEOUT", "20"))
_cache: dict[str, tiktoken.Encoding] = {}
_lock = threading.Lock()


def _bundled_file(name: str) -> Path:
    # Located without importing bpe_openai: its import loads a tokenizer of its own.
    spec = importlib.util.find_spec("bpe_openai")
    if spec is None or not spec.submodule_search_locations:
        raise EncodingUnavailable(
            f"the {name} file ships in the 'bpe-openai' package, which is missing: "
            "pip install bpe-openai",
            encoding=name,
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data" / f"{name}.tiktoken.gz"


def _load_bundled(name: str, spec: _Bundled) -> tiktoken.Encoding:
    path = _bundled_file(name)
    try:
        packed = path.read_bytes()
    except OSError as exc:
        raise EncodingUnavailable(f"cannot read {path}: {exc}", encoding=name) from exc
    data = gzip.decompress(packed)
    digest = hashlib.sha256(data).hexdigest()
    if digest != spec.sha256:
        raise EncodingUnavailable(
            f"the bundled {name} file has sha256 {digest}, expected {spec.sha256}; "
            "reinstall bpe-openai",
            encoding=name,
        )
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(
        name, pat_str=spec.pat_str, mergeable_ranks=ranks, special_tokens=spec.special_tokens
    )


def _load_with_tiktoken(name: str) -> tiktoken.Encoding:
    # tiktoken downloads without a timeout; run it aside so a dead network
    # becomes a clear error instead of a hang.
    box: dict[str, Any] = {}

    def load() -> None:
        try:
            box["enc"] = tiktoken.get_encoding(name)
        except BaseException as exc:  # reported to the caller below
            box["exc"] = exc

    worker = threading.Thread(target=load, name=f"tiktoken-load-{name}", daemon=True)
    worker.start()
    worker.join(_DOWNLOAD_TIMEOUT_S)
    hint = (
        "tokenmem bundles cl100k_base and o200k_base; for other encodings place the "
        "official file in TIKTOKEN_CACHE_DIR, named by the sha1 of its download URL "
        "(see README, 'Tokenizers offline')"
    )
    if "enc" in box:
        enc: tiktoken.Encoding = box["enc"]
        return enc
    if worker.is_alive():
        raise EncodingUnavailable(
            f"loading tiktoken encoding {name!r} did not finish in {_DOWNLOAD_TIMEOUT_S:g}s; "
            + hint,
            encoding=name,
        )
    raise EncodingUnavailable(
        f"cannot load tiktoken encoding {name!r}: {box['exc']}; {hint}", encoding=name
    ) from box["exc"]


def split_pattern(name: str) -> str | None:
    """The regex tiktoken splits text with before merging, for the encodings
    tokenmem ships (None for any other): the same string tiktoken's own
    definition holds (tests/test_tokens.py compares them)."""
    spec = _BUNDLED.get(name)
    return spec.pat_str if spec else None


def get_encoding(name: str) -> tiktoken.Encoding:
    """Return the tiktoken encoding ``name``, loaded once per process.

    Raises :class:`EncodingUnavailable` if it cannot be loaded.
    """
    enc = _cache.get(name)
    if enc is None:
        with _lock:
            enc = _cache.get(name)
            if enc is None:
                spec = _BUNDLED.get(name)
                enc = _load_bundled(name, spec) if spec else _load_with_tiktoken(name)
                _cache[name] = enc
    return enc


def encoding_for_model(model: str) -> str:
    """Return the encoding name tiktoken's model table gives for ``model``.

    Raises :class:`ConfigurationError` for a model tiktoken does not know.
    """
    try:
        return tiktoken.model.encoding_name_for_model(model)
    except KeyError:
        raise ConfigurationError(
            f"unknown model {model!r}: tiktoken cannot tell its encoding; pass "
            "encoding='o200k_base' (current OpenAI chat models) or 'cl100k_base'"
        ) from None


@dataclass(frozen=True)
class TokenCounter:
    """Counts tokens of text with one tiktoken encoding.

    Special-token text such as ``<|endoftext|>`` is counted as the ordinary
    text it is: users may type it. ``image_tokens``: what an ``image_url``
    content part of a chat message counts (85: OpenAI's price of a
    low-detail image; see :mod:`tokenmem.chat` for the whole rule).
    """

    encoding_name: str
    image_tokens: int = 85

    def __post_init__(self) -> None:
        get_encoding(self.encoding_name)  # fail now, not at the first save

    @classmethod
    def for_model(cls, model: str) -> TokenCounter:
        return cls(encoding_for_model(model))

    @property
    def encoding(self) -> tiktoken.Encoding:
        return get_encoding(self.encoding_name)

    def count(self, text: str) -> int:
        """Return the number of tokens of ``text``."""
        return len(self.encoding.encode_ordinary(text))

    def count_label(self, text: str) -> int:
        """:meth:`count` for the few short strings counted on every call
        (prefixes, role names), remembered."""
        return _count_label(self.encoding_name, text)


@functools.lru_cache(maxsize=4096)
def _count_label(encoding: str, text: str) -> int:
    return len(get_encoding(encoding).encode_ordinary(text))
