"""Where `--model` points: the embedded nano model (the default), the random checkpoint, a local directory or a
Hugging Face repo id."""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from gptoss.errors import GptossError
from gptoss.model.config import preset

# The default when no --model is given: the nano model, a tiny GPT-OSS trained on synthetic harmony
# conversations (`gptoss train-nano`, docs/nano.md), shipped as package data under gptoss/nano/checkpoint.
# A path rather than an import: the folder holds data only, the training code sits on a higher layer.
NANO_CHECKPOINT = Path(__file__).parents[1] / "nano" / "checkpoint"
# `--model random-small`: a small random-weight checkpoint of the real structure and vocabulary, made once
# on first use, for tests and benchmarks. Its output is gibberish.
RANDOM_MODEL = "random-small"
RANDOM_PRESET = "small"
REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def cache_dir() -> Path:
    return Path(os.environ.get("GPTOSS_HOME", Path.home() / ".cache" / "gptoss"))


def random_model() -> Path:
    """The built-in random checkpoint, written on first use (a second or two, about 0.2 GB)."""
    from gptoss.weights.random_checkpoint import write_random_checkpoint

    path = cache_dir() / RANDOM_MODEL
    if not (path / "config.json").exists():
        print(f"gptoss: making a small random-weight checkpoint at {path} (its output is gibberish)",
              file=sys.stderr)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))  # two first runs never share it
        write_random_checkpoint(preset(RANDOM_PRESET), tmp / "ckpt", seed=0)
        try:
            (tmp / "ckpt").rename(path)
        except OSError:  # another first run got there first: its checkpoint is the same
            shutil.rmtree(tmp, ignore_errors=True)
            return path
        tmp.rmdir()
    return path


def resolve_model(spec: str | None) -> Path:
    """A directory to load: the nano model for None, the random checkpoint for "random-small", `spec` itself
    if it exists, else a Hub download of repo id `spec`."""
    if spec is None:
        if not (NANO_CHECKPOINT / "model.safetensors").is_file():
            raise GptossError(f"the nano model is missing from {NANO_CHECKPOINT} (reinstall gptoss, or pass --model)")
        return NANO_CHECKPOINT
    if spec == RANDOM_MODEL:
        return random_model()
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if not REPO_ID.match(spec):
        raise GptossError(f"{spec}: no such directory, and not a Hugging Face repo id (owner/name)")
    return download(spec)


# What `load_model` reads of a published repository: not original/ or metal/ (a second and a third copy of
# the weights), nor the tokenizer files (the o200k_harmony vocabulary ships with gptoss).
LOADED_FILES = ["config.json", "generation_config.json", "model.safetensors.index.json", "*.safetensors"]


def download(repo_id: str, revision: str | None = None) -> Path:
    """Downloads the Hugging Face layout of `repo_id` into the Hugging Face cache (resuming a download that
    was cut off), with progress bars; offline, the cached copy."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=LOADED_FILES,
                                      ignore_patterns=["original/*", "metal/*"]))
    except LocalEntryNotFoundError:
        raise GptossError(f"{repo_id}: not in the local Hugging Face cache and cannot be downloaded "
                          f"(offline, or HF_HUB_OFFLINE is set); pass a local directory instead") from None
    except HfHubHTTPError as e:
        raise GptossError(f"{repo_id}: download from the Hugging Face Hub failed: {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise GptossError(f"{repo_id}: cannot download from the Hugging Face Hub ({e}); "
                          f"pass a local directory instead") from None
