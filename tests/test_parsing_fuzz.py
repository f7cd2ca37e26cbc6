"""Property tests (Hypothesis) of the text paths every request goes through: the tokenizer round trip,
the incremental decoder, and the harmony parser on arbitrary token streams."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gptoss.chat.harmony import StreamParser
from gptoss.chat.tokenizer import HARMONY_SPECIAL_TOKENS, NUM_TEXT_TOKENS, TextDecoder, get_tokenizer

TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=200)  # any text JSON can carry, but surrogates
SPECIAL = sorted(set(HARMONY_SPECIAL_TOKENS.values()))
TOKEN = st.one_of(st.integers(0, NUM_TEXT_TOKENS - 1), st.sampled_from(SPECIAL))


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_text_survives_encode_and_incremental_decode(text):
    tokens = get_tokenizer().encode(text, disallowed_special=())  # "<|end|>" typed as text stays text
    assert get_tokenizer().decode(tokens) == text
    decoder = TextDecoder()
    assert "".join(decoder.feed(t) for t in tokens) + decoder.flush() == text


@settings(max_examples=300, deadline=None)
@given(st.lists(TOKEN, max_size=120))
def test_the_harmony_parser_takes_any_stream(tokens):
    """Never raises, whatever the model writes, and every message it reports is one it built."""
    parser = StreamParser()
    events = [event for t in tokens for event in parser.feed(t)] + parser.end()
    assert len(parser.messages) == sum(type(e).__name__ == "MessageEnd" for e in events)


@settings(max_examples=200, deadline=None)
@given(TEXT.filter(lambda s: s.strip()))
def test_plain_text_from_the_model_is_never_lost(text):
    """A completion that is plain text, no harmony at all, comes back whole as the message's text."""
    tokens = get_tokenizer().encode(text, disallowed_special=())  # "<|end|>" typed as text stays text
    parser = StreamParser()
    for t in tokens:
        parser.feed(t)
    assert "".join(m.text for m in parser.finish()) == text
