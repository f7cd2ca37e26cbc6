"""The shipped o200k_harmony tokenizer against tiktoken's own, and the offline set-up for openai-harmony."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

import pytest
import tiktoken

from gptoss.chat.tokenizer import (HARMONY_VOCAB_ENV, NUM_TEXT_TOKENS, VOCAB_DIR, VOCAB_FILE, VOCAB_SHA256,
                                   VocabError, get_tokenizer, load_tokenizer, prepare_harmony_vocab)
from gptoss.errors import GptossError

# tiktoken caches downloads under the sha1 of their URL; this is o200k_base's.
TIKTOKEN_CACHE_KEY = "fb374d419588a4632f3f557e76b4b70aebbca790"

PROBES = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's fine; we'd've known. DON'T SHOUT.",
    "日本語のテキストと中文文本，还有한국어 문장도 있습니다。",
    "مرحبا بالعالم، هذا نص عربي مع أرقام ١٢٣٤٥",
    "नमस्ते दुनिया, यह हिंदी पाठ है।",
    "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "Emoji: 😀🎉 👩‍💻 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️‍🔥 👍🏽 🇫🇷",
    "def f(x):\n\treturn {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\n\nclass A: pass\n",
    "    four spaces\t\ttwo tabs\n\n\n\nnewlines   \r\n windows line\u00a0nbsp\u3000ideographic space   ",
    "1234567890 3.14159 -42 1e-10 0x1F 1,000,000 ٣ ½ ²",
    "Ünïcödé çömbïnïng: e\u0301 a\u0308 Å ﬁ ß",
    "<|start|>user<|message|>special tokens as text<|end|>",
    "",
    " ",
    "\n",
]


@pytest.fixture(scope="module")
def tiktoken_o200k_harmony(tmp_path_factory):
    """tiktoken's own o200k_harmony, loaded offline from a cache dir holding the shipped file."""
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    shutil.copy(VOCAB_FILE, cache / TIKTOKEN_CACHE_KEY)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        mp.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # any download attempt fails instead of going out
        yield tiktoken.get_encoding("o200k_harmony")


def test_definition_equals_tiktoken(tiktoken_o200k_harmony):
    ours, theirs = get_tokenizer(), tiktoken_o200k_harmony
    assert ours.name == theirs.name == "o200k_harmony"
    assert ours._pat_str == theirs._pat_str
    assert ours._special_tokens == theirs._special_tokens
    assert ours._mergeable_ranks == theirs._mergeable_ranks
    assert len(ours._mergeable_ranks) == NUM_TEXT_TOKENS
    assert ours.n_vocab == theirs.n_vocab == 201088


@pytest.mark.parametrize("text", PROBES)
def test_probe_ids_equal_tiktoken_and_round_trip(tiktoken_o200k_harmony, text):
    ours = get_tokenizer()
    ids = ours.encode(text, disallowed_special=())  # special-token names, if any, as plain text
    assert ids == tiktoken_o200k_harmony.encode(text, disallowed_special=())
    assert ours.decode(ids) == text
    special = ours.encode(text, allowed_special="all")
    assert special == tiktoken_o200k_harmony.encode(text, allowed_special="all")
    assert ours.decode(special) == text


def test_every_special_token_matches_tiktoken(tiktoken_o200k_harmony):
    ours = get_tokenizer()
    ids = range(NUM_TEXT_TOKENS, 201088)
    assert [ours.decode_single_token_bytes(i) for i in ids] == \
        [tiktoken_o200k_harmony.decode_single_token_bytes(i) for i in ids]
    names = ours.decode(list(ids))
    assert ours.encode(names, allowed_special="all") == tiktoken_o200k_harmony.encode(names, allowed_special="all")
    harmony = {"<|start|>": 200006, "<|channel|>": 200005, "<|message|>": 200008, "<|end|>": 200007,
               "<|return|>": 200002, "<|constrain|>": 200003, "<|call|>": 200012, "<|reserved_201087|>": 201087}
    for name, i in harmony.items():
        assert ours.encode(name, allowed_special="all") == [i]
        assert ours.decode([i]) == name


def test_text_ids_agree_with_openai_harmony():
    from gptoss.chat.harmony import get_encoding

    for text in PROBES:
        assert get_encoding().encode(text, allowed_special="all") == get_tokenizer().encode(text, allowed_special="all")


@pytest.mark.parametrize("damage", ["truncated", "edited", "missing"])
def test_bad_vocab_file_gives_one_line_error(tmp_path, damage):
    bad = tmp_path / "o200k_base.tiktoken"
    data = VOCAB_FILE.read_bytes()
    if damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "edited":
        bad.write_bytes(data.replace(b" 1000\n", b" 1001\n", 1))
    with pytest.raises(VocabError) as err:
        load_tokenizer(bad)
    message = str(err.value)
    assert isinstance(err.value, GptossError)
    assert "\n" not in message and str(bad) in message and VOCAB_SHA256 in message


def test_shipped_file_is_intact():
    assert hashlib.sha256(VOCAB_FILE.read_bytes()).hexdigest() == VOCAB_SHA256


def test_prepare_harmony_vocab(monkeypatch, tmp_path):
    monkeypatch.delenv(HARMONY_VOCAB_ENV, raising=False)
    assert prepare_harmony_vocab() == VOCAB_DIR
    assert (VOCAB_DIR / VOCAB_FILE.name).is_file()

    monkeypatch.setenv(HARMONY_VOCAB_ENV, str(tmp_path))  # a dir without the file is replaced
    assert prepare_harmony_vocab() == VOCAB_DIR

    shutil.copy(VOCAB_FILE, tmp_path / VOCAB_FILE.name)  # a dir with the file is kept
    monkeypatch.setenv(HARMONY_VOCAB_ENV, str(tmp_path))
    assert prepare_harmony_vocab() == tmp_path
    assert os.environ[HARMONY_VOCAB_ENV] == str(tmp_path)


def test_openai_harmony_loads_offline_without_configuration(tmp_path):
    """No env var set, an empty download cache and no network: get_encoding still works."""
    env = {k: v for k, v in os.environ.items() if k not in (HARMONY_VOCAB_ENV, "TIKTOKEN_CACHE_DIR")}
    env |= {"TIKTOKEN_RS_CACHE_DIR": str(tmp_path), "HTTPS_PROXY": "http://127.0.0.1:9",
            "https_proxy": "http://127.0.0.1:9"}
    code = "from gptoss.chat import get_encoding; print(get_encoding().encode('hello world'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(get_tokenizer().encode("hello world"))
    assert not any(tmp_path.iterdir())  # nothing was downloaded


def test_one_decoder_for_every_output(monkeypatch):
    """Raw generation (stream_text), /v1/completions and the harmony parser's salvaged text all decode
    through TextDecoder: on a stream with special tokens between the bytes of one character, and a
    character cut off at the end, the three give the same text, and it is the decoder's."""
    from gptoss.chat.harmony import StreamParser
    from gptoss.chat.tokenizer import HARMONY_SPECIAL_TOKENS as SPECIAL, TextDecoder
    from gptoss.generation import generate as generate_module
    from gptoss.server.outputs import CompletionOutput

    tokenizer = get_tokenizer()
    llama = tokenizer.encode("🦙")                        # three tokens, none of them a whole character
    assert len(llama) == 3
    tokens = (tokenizer.encode("Llamas ") + [llama[0], SPECIAL["<|constrain|>"], llama[1], SPECIAL["<|reserved_200013|>"],
                                             llama[2]] + tokenizer.encode(" and ünïcode") + [llama[0], SPECIAL["<|return|>"]])
    expected = "Llamas 🦙 and ünïcode\ufffd"

    decoder = TextDecoder()
    assert "".join(decoder.feed(t) for t in tokens) + decoder.flush() == expected

    monkeypatch.setattr(generate_module, "stream", lambda *args, **kwargs: iter(tokens))
    assert "".join(text for _, text in generate_module.stream_text(None, [0], len(tokens))) == expected

    completion = CompletionOutput([], eos_tokens=(SPECIAL["<|return|>"],))
    pieces = [piece for t in tokens for piece in completion.feed(t)] + completion.end()
    assert "".join(piece["text"] for piece in pieces) == expected

    parser = StreamParser()                              # a header that breaks at once: all of it salvaged
    for t in tokens:
        parser.feed(t)
    assert [m.text for m in parser.finish()] == [expected]

    named = TextDecoder(specials="text")
    assert "".join(named.feed(t) for t in tokenizer.encode("a<|constrain|>b", allowed_special="all")) == "a<|constrain|>b"
