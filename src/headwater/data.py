"""Loading training and query records from files, `datasets` directories, hub names or lists.

Every source ends up as a `datasets.Dataset` plus a fingerprint, so the index can record
exactly which data it was built from and refuse a query against other data.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import datasets

from .errors import UserError

FILE_LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def load_records(source: str | os.PathLike | Iterable[dict] | datasets.Dataset) -> datasets.Dataset:
    """Return the records of `source` as a `datasets.Dataset`.

    `source` is a JSONL/CSV/parquet file, a directory written by `Dataset.save_to_disk`, a hub
    data set name (`name` or `name:split`), a list of dicts or a `Dataset`. Empty sources and
    text files that are not UTF-8 are refused with a message naming the file and line.
    """
    if isinstance(source, datasets.Dataset):
        ds = source
    elif isinstance(source, (str, os.PathLike)):
        ds = _load_path(str(source))
    else:
        rows = list(source)
        if not rows:
            raise UserError("no records given (empty list)")
        # from_list takes its columns from the first row only; use every row's keys (missing → None).
        keys = list(dict.fromkeys(k for r in rows for k in r))
        ds = datasets.Dataset.from_dict({k: [r.get(k) for r in rows] for k in keys})
    if len(ds) == 0:
        raise UserError(f"data source {source!s:.200} has no records")
    return ds


def as_records(source) -> list[dict] | datasets.Dataset:
    """In-memory lists of records as they are (tensors stay tensors); anything else loaded."""
    if isinstance(source, list):
        if not source:
            raise UserError("no records given (empty list)")
        return source
    return load_records(source)


def _load_path(source: str) -> datasets.Dataset:
    path = Path(source)
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[next(iter(ds))]
            return ds
        raise UserError(f"{path} is a directory but not one written by Dataset.save_to_disk")
    if path.exists():
        suffix = path.suffix.lower()
        if suffix not in FILE_LOADERS:
            raise UserError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .csv or .parquet")
        if path.stat().st_size == 0:
            raise UserError(f"{path} is empty")
        if suffix in (".jsonl", ".json", ".csv"):
            check_utf8(path)
        try:
            return datasets.load_dataset(FILE_LOADERS[suffix], data_files=str(path), split="train")
        except Exception as exc:  # datasets wraps parse errors in several types
            raise UserError(f"{path}: could not parse as {FILE_LOADERS[suffix]}: {exc}") from exc
    if path.is_absolute() or source.startswith(".") or path.suffix.lower() in FILE_LOADERS or source.count("/") > 1:
        raise UserError(f"data file {source} does not exist")  # hub names are `name` or `owner/name`
    name, _, split = source.partition(":")
    try:
        return datasets.load_dataset(name, split=split or "train")
    except Exception as exc:
        raise UserError(f"could not load {source!r} as a local file or hub data set: {exc}") from exc


def check_utf8(path: Path) -> None:
    """Raise a `UserError` naming the first line of `path` that is not valid UTF-8."""
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(f"{path}:{lineno}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def fingerprint_records(ds: datasets.Dataset) -> str:
    """A content hash of the records: equal for equal data, whatever the source format."""
    h = hashlib.sha256()
    for batch in ds.iter(batch_size=1024):
        h.update(json.dumps(batch, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def id_positions(ids: list) -> dict[str, int]:
    """Each record id's position, keyed by its text (ids recorded in JSON come back as text or numbers alike)."""
    return {str(i): k for k, i in enumerate(ids)}


def record_ids(ds: datasets.Dataset | list[dict]) -> list[Any]:
    """The user-facing id of each record: its `id` column (field) if it has one, else its position."""
    if isinstance(ds, list):
        return [r.get("id", i) for i, r in enumerate(ds)]
    if "id" in ds.column_names:
        return list(ds["id"])
    return list(range(len(ds)))


def record_text(record: dict, max_chars: int | None = 200) -> str:
    """A one-line human-readable rendering of a record, for result tables."""
    if "text" in record:
        text = str(record["text"])
    elif "prompt" in record:
        text = f"{record['prompt']}{record.get('completion', '')}"
    elif "messages" in record:
        text = " | ".join(f"{m['role']}: {m['content']}" for m in record["messages"])
    else:
        text = json.dumps({k: v for k, v in record.items() if k != "id"}, default=str)
    text = " ".join(text.split())
    if max_chars is not None and len(text) > max_chars:
        text = text[: max_chars - 1] + "…"
    return text
