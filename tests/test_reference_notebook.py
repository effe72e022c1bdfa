"""The reference notebook, run with only its imports changed, gives LangChain's outputs.

``tests/reference_notebook_zh.md`` is the page tokenmem's API mirrors:
LangChain's "Conversation Token Buffer" notebook in its Chinese translation
(LangChain's documentation, MIT licence), copied verbatim. Its printed
outputs were translated, not re-run (``人类:`` where LangChain prints
``Human:``), so this test does not compare against them. It runs the
notebook's code cells twice, as Jupyter would (each cell's last expression is
its output), against the local OpenAI-compatible server scripted with the
notebook's own replies:

- with LangChain: ``langchain.memory`` and ``langchain.chains`` become
  ``langchain_classic``'s (where LangChain 1.x keeps them), ``langchain_openai``
  stays;
- with tokenmem: every import becomes ``from tokenmem import ...`` and the
  code is otherwise unchanged, on the embedded SQLite default and on
  PostgreSQL (``TOKENMEM_DATABASE_URL``).

Every cell's output, everything printed (the chain's verbose prompts) and
every request the model received must be the same, and the second snippet's
messages (``return_messages=True``) too.
"""

from __future__ import annotations

import ast
import contextlib
import gzip
import hashlib
import importlib.util
import io
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from tokenmem import Store, TokenCounter

from .openai_server import FakeOpenAI

NOTEBOOK = Path(__file__).with_name("reference_notebook_zh.md")
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"

TO_LANGCHAIN = {
    "from langchain.memory import": "from langchain_classic.memory import",
    "from langchain.chains import": "from langchain_classic.chains import",
}
IMPORT = re.compile(r"^from (langchain\.memory|langchain\.chains|langchain_openai) import", re.M)


# The English notebook's strings, for its Chinese translation's.
ENGLISH = {
    "你好": "hi",
    "最近怎么样": "whats up",
    "没什么，你呢": "not much you",
    "一般般": "not much",
    "你好，近来怎么样？": "Hi, what's up?",
    "我正在写一些文档！": "Just working on writing some documentation!",
    "是关于LangChain的！你听说过吗？": "For LangChain! Have you heard of it?",
    "哈哈，不是，虽然很多人把它弄混了": "Haha nope, although a lot of people confuse it for that",
}
ENGLISH_REPLIES = [
    " Hi there! I'm doing great, just enjoying the day. How about you?",
    " Sounds like a productive day! What kind of documentation are you writing?",
    " Yes, I have heard of LangChain! It is a decentralized language-learning platform"
    " that connects native speakers and learners in real time. Is that the documentation"
    " you're writing about?",
    " Oh, okay. What is LangChain?",
]


def cells(language: str = "zh") -> list[str]:
    code = re.findall(r"^```python\n(.*?)^```", NOTEBOOK.read_text(encoding="utf-8"), re.S | re.M)
    if language == "en":
        for zh, en in ENGLISH.items():
            code = [c.replace(f'"{zh}"', repr(en)) for c in code]
    return code


def replies(language: str = "zh") -> list[str]:
    """The model's replies the notebook shows: the outputs that are string literals."""
    if language == "en":
        return ENGLISH_REPLIES
    shown = re.findall(r'^    (".*")$', NOTEBOOK.read_text(encoding="utf-8"), re.M)
    return [ast.literal_eval(line) for line in shown]


def as_langchain(code: str) -> str:
    for old, new in TO_LANGCHAIN.items():
        code = code.replace(old, new)
    return code


def as_tokenmem(code: str) -> str:
    return IMPORT.sub("from tokenmem import", code)


def run(code_cells: list[str]) -> tuple[list[Any], str, dict[str, Any]]:
    """Run cells in one namespace as Jupyter does; their outputs, what they
    printed, and the namespace."""
    namespace: dict[str, Any] = {}
    outputs: list[Any] = []
    printed = io.StringIO()
    for code in code_cells:
        tree = ast.parse(code)
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        with contextlib.redirect_stdout(printed):
            exec(compile(tree, "<cell>", "exec"), namespace)
            if last is not None:
                expression = ast.Expression(last.value)
                value = eval(compile(expression, "<cell>", "eval"), namespace)
                if value is not None:  # Jupyter shows no output for None
                    outputs.append(value)
    return outputs, printed.getvalue(), namespace


def tiktoken_cache(directory: Path) -> Path:
    """cl100k_base where tiktoken looks before downloading, for langchain_openai
    (tokenmem reads the same official file from bpe-openai)."""
    spec = importlib.util.find_spec("bpe_openai")
    assert spec is not None and spec.submodule_search_locations
    packed = Path(next(iter(spec.submodule_search_locations))) / "data" / "cl100k_base.tiktoken.gz"
    data = gzip.decompress(packed.read_bytes())
    # The sha256 tiktoken pins for the file.
    expected = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
    assert hashlib.sha256(data).hexdigest() == expected
    directory.mkdir()
    (directory / hashlib.sha1(CL100K_URL.encode()).hexdigest()).write_bytes(data)
    return directory


def received(server: FakeOpenAI) -> list[tuple[str, str, str]]:
    """Each request's endpoint, model and prompt (LangChain sends its prompt as
    a batch of one, which the API takes as that one prompt)."""
    seen = []
    for r in server.requests:
        assert isinstance(r.body, dict)
        prompt = r.body["prompt"]
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        seen.append((r.path, r.body["model"], prompt))
    return seen


def test_the_notebook_s_cells_are_what_this_test_runs() -> None:
    code = cells()
    assert len(code) == 8
    assert len(IMPORT.findall("".join(code))) == 3
    assert len(replies()) == 4
    english = "".join(cells("en"))
    assert not re.search(r"[\u4e00-\u9fff]", re.sub(r"#.*", "", english))


@pytest.mark.parametrize("language", ["zh", "en"])
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_reference_notebook_gives_langchain_s_outputs(
    backend: str,
    language: str,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    code = cells(language)
    store: Store | None = None
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-notebook")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tiktoken_cache(tmp_path / "tiktoken")))
    if backend == "postgresql":
        # A migrated schema of its own, named by the URL, as a service would.
        store = request.getfixturevalue("store")
        engine: Engine = store.engine
        monkeypatch.setenv("TOKENMEM_DATABASE_URL", engine.url.render_as_string(False))
    else:
        monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))

    def notebook(convert: Callable[[str], str]) -> tuple[list[Any], str, Any, Any]:
        with FakeOpenAI() as server:
            monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
            monkeypatch.setenv("OPENAI_API_BASE", server.base_url)
            server.reply(*replies(language))
            outputs, printed, namespace = run([convert(c) for c in code])
            # The second snippet's memory (return_messages=True), left unshown.
            messages = namespace["memory"].load_memory_variables({})["history"]
            with contextlib.suppress(AttributeError):
                namespace["llm"].client.close()
            return outputs, printed, [(m.type, m.content) for m in messages], received(server)

    # Imported first: langchain_core's import adds a warnings filter of its
    # own, which would come before the "ignore" below.
    importlib.import_module("langchain_classic.chains")
    importlib.import_module("langchain_openai")
    with warnings.catch_warnings():
        # langchain_classic's memory and ConversationChain are deprecated there.
        warnings.simplefilter("ignore")
        theirs = notebook(as_langchain)
    ours = notebook(as_tokenmem)

    # tokenmem wrote where it was told to: three memories, three sessions.
    if store is None:
        store = Store(f"sqlite:///{tmp_path / 'data' / 'tokenmem' / 'tokenmem.sqlite3'}")
    assert sorted(s.messages for s in store.session_stats()) == [4, 4, 8]

    assert ours[0] == theirs[0]  # every cell's output
    assert ours[1] == theirs[1]  # the chain's verbose prompts, byte for byte
    assert ours[2] == theirs[2]  # return_messages=True: the same window
    assert ours[3] == theirs[3]  # what the model received
    # What they are, so that two runs that agree in failing do not pass.
    first, *predicted = ours[0]
    assert predicted == replies(language)
    assert [path for path, _, _ in ours[3]] == ["/v1/completions"] * 4
    assert ours[1].count("> Entering new ConversationChain chain...") == 4
    # The 60-token window slid: the last prompt no longer holds the first input.
    last_prompt = ours[3][-1][2]
    first_input, last_input = "你好，近来怎么样？", "哈哈，不是，虽然很多人把它弄混了"
    if language == "en":
        first_input, last_input = ENGLISH[first_input], ENGLISH[last_input]
    assert first_input not in last_prompt
    assert last_prompt.endswith(f"Human: {last_input}\nAI:")
    cl100k = TokenCounter("cl100k_base")
    if language == "en":
        assert first == {"history": "Human: not much you\nAI: not much"}
        assert ours[2] == [("human", "not much you"), ("ai", "not much")]
    else:
        # The notebook shows two lines (its outputs were translated, not
        # re-run): in Chinese they are 21 tokens of cl100k_base, over 10.
        assert cl100k.count("Human: 没什么，你呢\nAI: 一般般") > 10 >= cl100k.count("AI: 一般般")
        assert first == {"history": "AI: 一般般"}
        assert ours[2] == [("ai", "一般般")]
