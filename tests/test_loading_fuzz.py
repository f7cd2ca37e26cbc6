"""The checkpoint reader never trusts what a file says: safetensors headers and config.json files
mutated at random (Hypothesis) give a one-line CheckpointError, or load, but never another exception,
a hang, or an allocation of what the header claims."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptoss import CheckpointError, load_model, open_checkpoint
from tests.conftest import tiny_config

BIG = st.one_of(st.integers(-2**70, 2**70), st.sampled_from([0, -1, 2**31, 2**32 + 1, 2**63, 10**18]))
FUZZ = settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    from gptoss.weights.random_checkpoint import write_random_checkpoint

    cfg = tiny_config(num_layers=1, num_experts=2, experts_per_token=1, vocab_size=64, pad_token_id=63)
    return write_random_checkpoint(cfg, tmp_path_factory.mktemp("fuzz") / "ck", seed=0)


def read_header(path):
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def write_file(path, header: dict | bytes, data: bytes, length: int | None = None):
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length % 2**64) + text + data)


def loads_or_refuses(directory) -> None:
    """What the reader may do with a damaged checkpoint: refuse it in one line, or load what is valid."""
    try:
        open_checkpoint(directory)
        load_model(directory, kernels=False)
    except CheckpointError as e:
        assert "\n" not in str(e) and str(e)


MUTATIONS = st.sampled_from(["offsets", "shape", "dtype", "length", "truncate", "garbage", "drop", "duplicate"])


@FUZZ
@given(kind=MUTATIONS, value=BIG, which=st.integers(0, 50), data=st.data())
def test_a_mutated_safetensors_header_is_refused_in_one_line(pristine, tmp_path, kind, value, which, data):
    case = tmp_path / f"case-{kind}-{which}"
    shutil.rmtree(case, ignore_errors=True)
    shutil.copytree(pristine, case)
    file = case / "model.safetensors"
    header, body = read_header(file)
    names = [n for n in header if n != "__metadata__"]
    name = names[which % len(names)]
    length = None
    if kind == "offsets":
        header[name]["data_offsets"] = [value, data.draw(BIG)] if which % 2 else [0, value]
    elif kind == "shape":
        header[name]["shape"] = data.draw(st.lists(BIG, max_size=5))
    elif kind == "dtype":
        header[name]["dtype"] = data.draw(st.sampled_from(["F64", "I64", "BOOL", "F8_E4M3", "U4", "??", ""]))
    elif kind == "length":
        length = value
    elif kind == "truncate":
        body = body[:abs(value) % max(len(body), 1)]
    elif kind == "garbage":
        header = data.draw(st.binary(max_size=200))
    elif kind == "drop":
        del header[name]
    elif kind == "duplicate":
        header[name + ".copy"] = header[name]
    write_file(file, header, body, length)
    loads_or_refuses(case)


CONFIG_KEYS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "num_local_experts", "num_experts_per_tok", "intermediate_size", "sliding_window",
               "max_position_embeddings", "rope_theta"]
VALUES = st.one_of(BIG, st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5), st.none(),
                   st.booleans(), st.lists(st.integers(), max_size=3))


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(CONFIG_KEYS), VALUES, min_size=1, max_size=3))
def test_a_config_with_absurd_values_is_refused_in_one_line(pristine, tmp_path, changes):
    case = tmp_path / "cfg"
    shutil.rmtree(case, ignore_errors=True)
    shutil.copytree(pristine, case)
    config = json.loads((case / "config.json").read_text())
    config.update(changes)
    (case / "config.json").write_text(json.dumps(config))
    loads_or_refuses(case)


def test_the_pristine_checkpoint_loads(pristine):
    """The fuzzing starts from a checkpoint that loads, so a refusal is the mutation's doing."""
    assert open_checkpoint(pristine).config.num_layers == 1
