"""`plainlm download ORG/NAME`: fetch a model from the Hugging Face hub and convert it.

The files go through `huggingface_hub` into its cache (so a second download is free and
`HF_HUB_OFFLINE=1` works from a filled cache); the native checkpoint is then written to
`checkpoints/ORG/NAME`. Only what a model needs is fetched: config, weights, tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from plainlm.checkpoint import check_output_path
from plainlm.convert.hf import convert_from_hf
from plainlm.errors import CheckpointError, InvalidInput

# safetensors first; `.bin` weights are fetched only for repositories that have nothing else.
MODEL_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json"]
TOKENIZER_PATTERNS = [
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
]
BIN_PATTERNS = ["*.bin", "pytorch_model.bin.index.json"]
# The patterns' "*" matches "/" too: files in folders are left out, as transformers never reads them (gpt-oss keeps
# a second copy of its weights, 13 GB for 20b, in original/).
IGNORE_PATTERNS = ["*/*"]


def download(
    repo_id: str,
    checkpoint_dir: str | Path = "checkpoints",
    revision: str | None = None,
    token: str | None = None,
    cache_dir: str | Path | None = None,
    convert: bool = True,
) -> Path:
    """Download `repo_id` and (by default) convert it to a native checkpoint; returns its path.

    With `convert=False` the path of the downloaded Hugging Face snapshot is returned
    (`LLM.load` reads it as it is).
    """
    # on use: huggingface_hub only for downloads
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    if repo_id.count("/") != 1:
        raise InvalidInput(f"expected a repository id like ORG/NAME, got {repo_id!r}")
    if convert:  # before downloading: the checkpoint must have somewhere to go
        check_output_path(Path(checkpoint_dir) / repo_id, "--checkpoint_dir")
    kwargs = dict(repo_id=repo_id, revision=revision, token=token, cache_dir=cache_dir, ignore_patterns=IGNORE_PATTERNS)
    try:
        snapshot = Path(snapshot_download(allow_patterns=MODEL_PATTERNS + TOKENIZER_PATTERNS, **kwargs))
        if not list(snapshot.glob("*.safetensors")):
            snapshot = Path(
                snapshot_download(allow_patterns=MODEL_PATTERNS + TOKENIZER_PATTERNS + BIN_PATTERNS, **kwargs)
            )
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{repo_id}: no such repository on the hub, or it is gated: check the name, "
            "and for gated models accept the licence on the hub and pass --token (or set HF_TOKEN)"
        ) from None
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{repo_id}: not in the local cache and the hub cannot be reached (offline?). "
            "Connect to the internet, or unset HF_HUB_OFFLINE"
        ) from None
    except HfHubHTTPError as e:
        raise CheckpointError(f"{repo_id}: download failed ({e})") from None
    if not convert:
        return snapshot
    return convert_from_hf(snapshot, Path(checkpoint_dir) / repo_id)
