"""Named public datasets: where each lives on the Hugging Face hub and how its records become ours.

`prepare_source("alpaca")` downloads the data file through `huggingface_hub` (cached, so `HF_HUB_OFFLINE=1` works
from a filled cache), converts each record and writes `data/<name>/<split>.jsonl`, which `sft.py` reads
(instruction and chat records) like any local file; pretraining sources become `{"text": ...}` records.
A conversion is one small function from a source's record to ours; None skips the record.
Without a network, a local copy of the hub's file at `data/<name>/<file name on the hub>` is converted
instead (or pass the path of your own records instead of the name).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plainlm.errors import InvalidInput, MissingInput


@dataclass(frozen=True)
class Source:
    repo_id: str  # a dataset repository on the hub
    files: dict[str, str]  # split -> data file in the repository (.json, .jsonl or .txt)
    convert: Callable[[dict[str, Any]], dict[str, Any] | None]
    licence: str


def convert_alpaca(raw: dict[str, Any]) -> dict[str, Any] | None:
    if not raw.get("instruction") or not raw.get("output"):
        return None
    return {"instruction": raw["instruction"], "input": raw.get("input") or "", "output": raw["output"]}


def convert_dolly(raw: dict[str, Any]) -> dict[str, Any] | None:
    if not raw.get("instruction") or not raw.get("response"):
        return None
    return {"instruction": raw["instruction"], "input": raw.get("context") or "", "output": raw["response"]}


def convert_lima(raw: dict[str, Any]) -> dict[str, Any] | None:
    """LIMA's conversations are plain strings that alternate user and assistant, the user first."""
    turns = raw.get("conversations") or []
    if len(turns) < 2:  # the test split holds prompts alone
        return None
    return {"messages": [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(turns)]}


def convert_text(raw: dict[str, Any]) -> dict[str, Any] | None:
    text = raw.get("text", "").strip()
    return {"text": text} if text else None


SOURCES: dict[str, Source] = {
    "alpaca": Source(
        # The dataset card says CC BY 4.0; the Stanford Alpaca data it cleans was released as CC BY-NC 4.0.
        "yahma/alpaca-cleaned",
        {"train": "alpaca_data_cleaned.json"},
        convert_alpaca,
        "CC BY 4.0 / CC BY-NC 4.0",
    ),
    "dolly": Source(
        "databricks/databricks-dolly-15k", {"train": "databricks-dolly-15k.jsonl"}, convert_dolly, "CC BY-SA 3.0"
    ),
    # Gated: accept its terms on the hub page, then pass a token (or set HF_TOKEN).
    "lima": Source("GAIR/lima", {"train": "train.jsonl"}, convert_lima, "other: non-commercial, see the card"),
    "tinystories": Source(
        "roneneldan/TinyStories",
        {"train": "TinyStoriesV2-GPT4-train.txt", "validation": "TinyStoriesV2-GPT4-valid.txt"},
        convert_text,
        "CDLA-Sharing 1.0",
    ),
}


def read_raw(path: Path) -> Iterator[dict[str, Any]]:
    """A downloaded file's records: a JSON list, JSON lines, or text with stories between `<|endoftext|>` lines."""
    if path.suffix == ".json":
        yield from json.loads(path.read_text(encoding="utf-8"))
        return
    with path.open(encoding="utf-8") as f:
        if path.suffix == ".jsonl":
            yield from (json.loads(line) for line in f if line.strip())
            return
        lines: list[str] = []
        for line in f:
            if line.strip() == "<|endoftext|>":
                yield {"text": "".join(lines)}
                lines = []
            else:
                lines.append(line)
        yield {"text": "".join(lines)}


def convert_records(name: str, raw_records: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Our records from a source's raw ones (those the conversion skips are left out), one at a time."""
    convert = SOURCES[name].convert
    return (record for raw in raw_records if (record := convert(raw)) is not None)


def download_source_file(
    name: str, split: str = "train", token: str | None = None, local_copy: Path | None = None, flag: str = "--data.path"
) -> Path:
    """The source's raw data file, from the hub (or its cache); errors are one line that says where a local
    copy goes (`local_copy`) and name the option the dataset was given with (`flag`)."""
    # on use: huggingface_hub only for named datasets
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError

    check_source(name, split)
    source = SOURCES[name]
    filename = source.files[split]
    where = f"{filename} of https://huggingface.co/datasets/{source.repo_id}"
    local = f"put a copy of that file at {local_copy}" if local_copy else "download that file yourself"
    instead = f"{local} (converted on first use), or pass your own records' path as {flag}"
    try:
        return Path(hf_hub_download(source.repo_id, filename, repo_type="dataset", token=token))
    except GatedRepoError:
        raise MissingInput(
            f"{flag} {name}: {name} is gated: accept its terms on the hub page and set HF_TOKEN; or {instead}"
        ) from None
    except LocalEntryNotFoundError:
        raise MissingInput(
            f"{flag} {name}: cannot fetch {where} (offline, and not in the Hugging Face cache); {instead}"
        ) from None
    except HfHubHTTPError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MissingInput(f"{flag} {name}: cannot fetch {where} ({first_line}); {instead}") from None


def check_source(name: str, split: str) -> None:
    if name not in SOURCES:
        raise InvalidInput(f"unknown dataset {name!r}; named datasets: {', '.join(SOURCES)}")
    if split not in SOURCES[name].files:
        raise InvalidInput(f"{name} has no split {split!r}; it has {', '.join(SOURCES[name].files)}")


def prepare_source(
    name: str, split: str = "train", out_dir: str | Path = "data", token: str | None = None, flag: str = "--data.path"
) -> Path:
    """`out_dir/<name>/<split>.jsonl` in our record format, converted unless it is already there: from a local
    copy of the hub's file at `out_dir/<name>/<its name>` when there is one, else downloaded."""
    out = Path(out_dir) / name / f"{split}.jsonl"
    if out.is_file():
        return out
    check_source(name, split)
    local_copy = Path(out_dir) / name / SOURCES[name].files[split]
    raw_path = local_copy if local_copy.is_file() else download_source_file(name, split, token, local_copy, flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, count = out.with_suffix(".tmp"), 0
    with tmp.open("w", encoding="utf-8") as f:
        for record in convert_records(name, read_raw(raw_path)):  # streamed: TinyStories is gigabytes
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    tmp.rename(out)  # a half-written file never looks finished
    print(f"{name}: wrote {count} records to {out} (licence: {SOURCES[name].licence})")
    return out


def resolve_data_path(path: str | Path, split: str = "train", flag: str = "--data.path") -> Path:
    """A local file or folder as it is; a dataset name (`alpaca`, ...) downloaded and converted.
    `flag` is the option that gave `path`, for messages."""
    if Path(path).exists():
        return Path(path)
    if str(path) in SOURCES:
        return prepare_source(str(path), split, flag=flag)
    raise MissingInput(f"{flag} {path}: no such file or folder, and not a named dataset ({', '.join(SOURCES)})")
