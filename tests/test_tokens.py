"""Offline tiktoken encodings, and the counting identity the window relies on."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmem import ConfigurationError, EncodingUnavailable, TokenCounter
from tokenmem.tokens import _BUNDLED, _bundled_file, get_encoding
from tokenmem.window import count_message, newline_tokens, unspaced_tokens

URLS = {
    "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
    "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
}
SAMPLES = [
    "hi",
    "Human: not much you\nAI: not much",
    "人类: 你好，近来怎么样？",
    "<|endoftext|> x",
    " \r\n\t",
]


@pytest.mark.parametrize("name", sorted(URLS))
def test_bundled_file_is_the_official_one(name: str) -> None:
    data = gzip.decompress(_bundled_file(name).read_bytes())
    assert hashlib.sha256(data).hexdigest() == _BUNDLED[name].sha256
    # The hash we pin is the one tiktoken itself pins for this URL.
    import tiktoken_ext.openai_public as public

    assert _BUNDLED[name].sha256 in Path(public.__file__).read_text()


@pytest.mark.parametrize("name", sorted(URLS))
def test_same_encoding_as_tiktoken(name: str, tmp_path: Path) -> None:
    """tiktoken's own get_encoding, fed the file through TIKTOKEN_CACHE_DIR,
    builds exactly the encoding tokenmem builds."""
    data = gzip.decompress(_bundled_file(name).read_bytes())
    (tmp_path / hashlib.sha1(URLS[name].encode()).hexdigest()).write_bytes(data)
    code = (
        "import json, sys, tiktoken; e = tiktoken.get_encoding(sys.argv[1]);"
        "print(json.dumps([e._pat_str, e._special_tokens, e.n_vocab,"
        " [e.encode_ordinary(t) for t in json.loads(sys.argv[2])]]))"
    )
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", code, name, json.dumps(SAMPLES)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    theirs = json.loads(out)
    ours = get_encoding(name)
    assert theirs == [
        ours._pat_str,
        ours._special_tokens,
        ours.n_vocab,
        [ours.encode_ordinary(t) for t in SAMPLES],
    ]


def test_special_token_text_is_ordinary_text() -> None:
    counter = TokenCounter("o200k_base")
    assert counter.count("<|endoftext|>") > 1


def test_unknown_encoding_is_a_clear_error() -> None:
    with pytest.raises(EncodingUnavailable, match="nope_base"):
        TokenCounter("nope_base")


def test_unreachable_encoding_fails_fast(tmp_path: Path) -> None:
    """No network and no cached file: a clear error within the timeout, no hang."""
    code = (
        "from tokenmem import TokenCounter, EncodingUnavailable\n"
        "try:\n    TokenCounter('r50k_base')\n"
        "except EncodingUnavailable as e:\n    print('ERR', e)\n"
    )
    env = {
        **os.environ,
        "TIKTOKEN_CACHE_DIR": str(tmp_path),
        "TOKENMEM_TIKTOKEN_TIMEOUT": "5",
        # Make the download fail for certain, even on a machine with internet.
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "https_proxy": "http://127.0.0.1:9",
    }
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    ).stdout
    assert out.startswith("ERR ") and "TIKTOKEN_CACHE_DIR" in out
    assert time.monotonic() - start < 30


def test_unknown_model() -> None:
    with pytest.raises(ConfigurationError, match="unknown model"):
        TokenCounter.for_model("not-a-model")
    assert TokenCounter.for_model("gpt-4o").encoding_name == "o200k_base"
    assert TokenCounter.for_model("gpt-3.5-turbo").encoding_name == "cl100k_base"


@settings(max_examples=400, deadline=None)
@given(
    prefix=st.text(max_size=12),
    content=st.text(max_size=60),
    name=st.sampled_from(sorted(URLS)),
)
def test_line_tokens_split_at_the_colon(prefix: str, content: str, name: str) -> None:
    """The identity the window's stored counts rest on (see window.py)."""
    counter = TokenCounter(name)
    try:
        line = counter.count(f"{prefix}: {content}")
    except UnicodeEncodeError:
        return  # lone surrogates never reach the counter: the store rejects them
    assert line == counter.count(prefix + ":") + counter.count(" " + content)


lines = st.lists(
    st.tuples(
        st.sampled_from(["Human", "AI", "人类", "System", "x\n", "a:", "User 1", "Ωmega", "7"]),
        st.one_of(
            st.text(max_size=40),
            st.text(alphabet=" .?!。？…\n\r\t/:'sé\u0301a1", max_size=12),
        ),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=400, deadline=None)
@given(lines=lines, name=st.sampled_from(sorted(URLS)))
def test_joined_lines_count_from_stored_counts(lines: list[tuple[str, str]], name: str) -> None:
    """The window's text rule (window.py): lines joined by newlines count
    sum(tokens(prefix + ":") + text_tokens + newline_tokens), less the newest
    line's newline_tokens, when every prefix starts with a letter or digit."""
    counter = TokenCounter(name)
    try:
        counts = [count_message(counter, "human", content, None) for _, content in lines]
        rendered = counter.count("\n".join(f"{prefix}: {content}" for prefix, content in lines))
    except UnicodeEncodeError:
        return
    costs = [
        counter.count(prefix + ":") + c.text_tokens + c.newline_tokens
        for (prefix, _), c in zip(lines, counts, strict=True)
    ]
    assert rendered == sum(costs) - counts[-1].newline_tokens
    assert all(c.floor <= cost for c, cost in zip(counts, costs, strict=True))


@settings(max_examples=2000, deadline=None)
@given(
    content=st.one_of(
        st.text(max_size=30),
        st.text(alphabet="a1é\u0301\u0300 .?!。？…\n\r\t/:'’\"“)]}-_*#😀\u200d\ufe0f", max_size=10),
        st.text(alphabet=st.characters(codec="utf-8"), max_size=8),
    ),
    name=st.sampled_from(sorted(URLS)),
)
def test_newline_tokens_from_the_tail(content: str, name: str) -> None:
    """newline_tokens counts only the line's tail; it must agree with
    counting the whole line with and without its newline."""
    counter = TokenCounter(name)
    line = " " + content
    assert newline_tokens(counter, content) == counter.count(line + "\n") - counter.count(line)


@settings(max_examples=3000, deadline=None)
@given(
    content=st.one_of(
        st.text(max_size=30),
        st.text(alphabet="aA1é\u0301 .?!'’sdtlvrem\n\r\t/:😀人", max_size=10),
        st.text(alphabet=st.characters(codec="utf-8"), max_size=8),
        st.from_regex(r"[A-Za-z']{1,20}[ .,!?]?[A-Za-z ]{0,10}", fullmatch=True),
    ),
    name=st.sampled_from(sorted(URLS)),
)
def test_unspaced_tokens_from_the_spaced_count(content: str, name: str) -> None:
    """The chat count is derived from the text count through the first piece
    (window.unspaced_tokens): it must be tiktoken's count of the content."""
    counter = TokenCounter(name)
    spaced = counter.count(" " + content)
    assert unspaced_tokens(counter, content, spaced) == counter.count(content)
