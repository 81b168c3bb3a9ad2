"""Record labels (topic, format, source, ...) joined to an index by record id.

    labels = labels_from_file("labels.parquet", index.train_ids)      # id + any label columns
    labels = labels_from_columns(index.records, ["topic", "format"])   # columns of the data itself
    labels = classify_records(index.records, "path/to/classifier", column="topic")  # a HF classifier
    attach_labels(index, labels)       # labels.parquet beside the index, recorded in its manifest

A label column may have a confidence column `<column>_confidence` in [0, 1]; labels below a
chosen confidence count as unlabelled. Records without a label are in the bin `(unlabelled)`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..data import record_ids, record_text
from ..errors import UserError
from ..store import read_json, write_json

UNLABELLED = "(unlabelled)"
JOINT = " × "  # joins the labels of several columns into a joint bin's name
CONFIDENCE = "_confidence"
FILE = "labels.parquet"


def label_text(value) -> str:
    """A label as text: 3.0 (an integer column with gaps, read as floats) is "3", like 3."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


@dataclass
class Labels:
    """`table`: one row per record in index order, `id` then the label columns (strings) and
    their optional `<column>_confidence`; `source` says where the labels came from."""

    table: pd.DataFrame
    source: dict = field(default_factory=dict)

    @property
    def columns(self) -> list[str]:
        return [c for c in self.table.columns if c != "id" and not c.endswith(CONFIDENCE)]

    def values(self, column: str, min_confidence: float = 0.0) -> np.ndarray:
        """The column's labels as strings [n]; missing or under-confident ones are `(unlabelled)`."""
        codes, names = self.codes(column, min_confidence)
        return np.asarray(names, dtype=object)[codes]

    def codes(self, column: str, min_confidence: float = 0.0) -> tuple[np.ndarray, list[str]]:
        """(each record's label as an index int64 [n], the label names, sorted): a few bytes per
        record, where strings would cost a Python object each on a corpus of millions."""
        if column not in self.columns:
            raise UserError(f"no label column {column!r}; the labels have {', '.join(self.columns) or 'none'}")
        col = self.table[column]
        keep = col.notna().to_numpy().copy()  # pandas may hand out a read-only view
        conf = f"{column}{CONFIDENCE}"
        if min_confidence > 0 and conf in self.table.columns:
            keep &= self.table[conf].fillna(0).to_numpy() >= min_confidence
        # Factorise first, so that only the distinct values (not every record) become text.
        raw, uniques = pd.factorize(col.astype(object).where(keep, None), use_na_sentinel=True)
        texts = [label_text(u) for u in uniques]
        clash = next((t for t in texts if JOINT in t), None)
        if clash is not None:  # joint bins are named by joining labels with it
            raise UserError(f"label {clash!r} of column {column!r} contains {JOINT.strip()!r}, which names joint bins; rename it")
        names = sorted(set(texts) | ({UNLABELLED} if (raw < 0).any() else set()))
        index = {name: i for i, name in enumerate(names)}
        lookup = np.array([index[t] for t in texts] + [index.get(UNLABELLED, -1)], dtype=np.int64)  # raw -1 reads the last entry
        return lookup[raw], names

    def fingerprint(self) -> str:
        """A hash of the label columns (the ids are the index's, checked by the index itself)."""
        labels = self.table.drop(columns="id").reset_index(drop=True)
        return hashlib.sha256(pd.util.hash_pandas_object(labels, index=True).to_numpy().tobytes()).hexdigest()[:16]


def _read_table(path: str | Path, id_column: str = "id") -> pd.DataFrame:
    """The table with its id column read as text (so "01" stays "01" and a gap does not turn the
    ids into floats)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"label file {path} does not exist")
    text = {id_column: str}
    readers = {
        ".parquet": pd.read_parquet,
        ".csv": lambda p: pd.read_csv(p, dtype=text),
        ".jsonl": lambda p: pd.read_json(p, lines=True, dtype=text),
        ".json": lambda p: pd.read_json(p, dtype=text),
    }
    if path.suffix not in readers:
        raise UserError(f"label file {path}: use .parquet, .csv, .jsonl or .json")
    try:
        return readers[path.suffix](path)
    except ValueError as exc:
        raise UserError(f"label file {path} could not be read: {exc}") from None


def labels_from_file(path: str | Path, train_ids: list, id_column: str = "id") -> Labels:
    """Labels from a table with a record-id column and label columns, in the index's record order.
    Ids of the table that the index does not hold are ignored (counted in `source`)."""
    frame = _read_table(path, id_column)
    if id_column not in frame.columns:
        raise UserError(f"label file {path} has no {id_column!r} column (columns: {', '.join(map(str, frame.columns))})")
    if frame[id_column].duplicated().any():
        dup = frame[id_column][frame[id_column].duplicated()].iloc[0]
        raise UserError(f"label file {path} labels record {dup!r} more than once")
    if id_column != "id" and "id" in frame.columns:
        raise UserError(f"label file {path} has an `id` column besides --id-column {id_column}; drop or rename one")
    missing = frame[id_column].isna()
    if missing.any():
        raise UserError(f"label file {path}: {int(missing.sum())} rows have no {id_column!r}")
    frame = frame.rename(columns={id_column: "id"})
    table = _join(frame, train_ids, str(path))
    matched = int(table.attrs.pop("matched"))
    return Labels(table, {"kind": "file", "path": str(Path(path).resolve()), "matched": matched, "unknown_ids": len(frame) - matched})


def _join(frame: pd.DataFrame, train_ids: list, what: str) -> pd.DataFrame:
    """`frame` (id + labels) reindexed to `train_ids`; ids compared as strings so 7 and "7" agree."""
    keyed = frame.assign(id=frame["id"].astype(str)).set_index("id")
    table = keyed.reindex([str(i) for i in train_ids])
    matched = int(table.index.isin(keyed.index).sum())
    if matched == 0:
        raise UserError(f"none of the {len(frame)} ids in {what} is a record of the index (e.g. {frame['id'].iloc[0]!r} vs {train_ids[0]!r})")
    labels = [c for c in table.columns if not str(c).endswith(CONFIDENCE)]
    if not labels:
        raise UserError(f"{what} has no label columns besides the id")
    for c in labels:
        table[c] = table[c].astype(object).where(table[c].notna(), None).map(lambda v: None if v is None else label_text(v))
    table = table.reset_index().assign(id=list(train_ids))
    table.attrs["matched"] = matched
    return table


def labels_from_columns(records, columns: list[str]) -> Labels:
    """Labels read from columns of the training records themselves."""
    have = records.column_names if hasattr(records, "column_names") else list(records[0])
    missing = [c for c in columns if c not in have]
    if missing:
        raise UserError(f"the records have no column {missing[0]!r} (columns: {', '.join(have)})")
    ids = record_ids(records)
    frame = pd.DataFrame({"id": ids, **{c: [r[c] for r in records] for c in columns}})
    table = _join(frame, ids, "the records' columns")
    table.attrs.pop("matched")
    return Labels(table, {"kind": "columns", "columns": list(columns)})


def classify_records(
    records, model: str, column: str = "label", batch_size: int = 32, device: str = "cpu", max_length: int = 512, progress: bool = False
) -> Labels:
    """Labels from a Hugging Face sequence classifier (a local path or a hub id the user has, e.g.
    a WebOrganizer topic or format classifier): the arg-max class name and its probability."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
        net = AutoModelForSequenceClassification.from_pretrained(model).to(device).eval()
    except OSError as exc:
        raise UserError(f"cannot load the classifier {model!r}: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    net.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.padding_side = "right"  # decoder classifiers read the last non-pad token; left padding would shift positions
    names = net.config.id2label
    texts = [record_text(r, None) for r in records]
    labels, conf = [], []
    for lo in tqdm(range(0, len(texts), batch_size), desc=f"classify {column}", disable=not progress):
        enc = tokenizer(texts[lo : lo + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length).to(device)
        with torch.no_grad():
            p = net(**enc).logits.float().softmax(-1)
        best = p.max(-1)
        labels += [names[int(i)] for i in best.indices]
        conf += best.values.tolist()
    table = pd.DataFrame({"id": record_ids(records), column: labels, f"{column}{CONFIDENCE}": conf})
    return Labels(table, {"kind": "classifier", "model": model, "column": column, "classes": len(names)})


def merge_labels(*parts: Labels) -> Labels:
    """Several label tables over the same records side by side (a later column of the same name wins)."""
    table = parts[0].table.copy()
    for p in parts[1:]:
        if list(map(str, p.table["id"])) != list(map(str, table["id"])):
            raise UserError("label tables to merge must cover the same records in the same order")
        for c in p.table.columns:
            if c != "id":
                table[c] = p.table[c].to_numpy()
    return Labels(table, {"kind": "merged", "parts": [p.source for p in parts]})


# ------------------------------------------------------------------ stored beside an index


def attach_labels(index, labels: Labels) -> Path:
    """Write `labels.parquet` into the index directory and record the labels' columns, source and
    fingerprint in its manifest (replacing earlier labels)."""
    if len(labels.table) != index.n_records:
        raise UserError(f"the labels cover {len(labels.table)} records, the index has {index.n_records}")
    path = index.path / FILE
    tmp = path.with_name(f".{FILE}.tmp")
    labels.table.astype({"id": str}).to_parquet(tmp, index=False)
    tmp.replace(path)
    manifest = read_json(index.path / "manifest.json")
    manifest["labels"] = {"file": FILE, "columns": labels.columns, "source": labels.source, "fingerprint": labels.fingerprint()}
    write_json(index.path / "manifest.json", manifest)
    index.manifest["labels"] = manifest["labels"]
    return path


def load_labels(index) -> Labels:
    """The labels attached to an index (`headwater label`)."""
    entry = index.manifest.get("labels")
    if not entry or not (index.path / entry["file"]).exists():
        raise UserError(f"{index.path} has no labels; attach some with `headwater label {index.path} --labels FILE`")
    table = pd.read_parquet(index.path / entry["file"])
    table["id"] = list(index.train_ids)
    labels = Labels(table, entry["source"])
    if labels.fingerprint() != entry["fingerprint"]:
        raise UserError(f"{index.path / entry['file']} changed since it was attached (fingerprint mismatch); attach the labels again")
    return labels


def describe(labels: Labels) -> str:
    parts = [f"{c}: {len(set(labels.values(c)) - {UNLABELLED})} values" for c in labels.columns]
    return f"{len(labels.table)} records; " + "; ".join(parts) + f" (source: {json.dumps(labels.source)[:120]})"
