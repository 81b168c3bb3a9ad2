"""Settings of the corpus commands (`headwater label | bins | contrast`); the statistics' own
settings are `BinsConfig` (bins.py) and the unlearning run's `UnlearnConfig` (unlearn.py)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import H_DEVICE, H_INIT_MODEL, H_MEASUREMENT, H_METHOD, H_PROBE, MEASUREMENTS, Config, option
from ..errors import UserError

H_BENCHMARK = "A benchmark as NAME=FILE of query records (repeatable); unlearn takes the aligned one, NAME alone for the map's own file."
MAP_METHODS = ("dot", "cosine", "trackstar", "ekfac", "kfac")


@dataclass
class LabelConfig(Config):
    """Where `headwater label` takes record labels from."""

    labels: str | None = option(None, "A table (.parquet/.csv/.jsonl) with an `id` column and label columns (optional `<column>_confidence`).")
    columns: list[str] | None = option(None, "Label columns read from the training records themselves (repeat or comma-separate).")
    classifier: str | None = option(None, "A Hugging Face sequence classifier (local path or hub id you have) that labels each record.")
    column: str = option("label", "Name of the label column the classifier writes.")
    id_column: str = option("id", "The record-id column of the --labels table.")
    classifier_batch_size: int = option(32, "Records per forward pass of the classifier.")
    device: str = option("cpu", H_DEVICE)


@dataclass
class MapInputConfig(Config):
    """What `headwater bins` scores: the benchmarks, the method, the measurement."""

    benchmark: list[str] | None = option(None, H_BENCHMARK)
    method: str = option("trackstar", H_METHOD, choices=MAP_METHODS)
    measurement: str = option("default", H_MEASUREMENT, choices=MEASUREMENTS)
    probe: str | None = option(None, H_PROBE)
    gradient_contrast: list[str] | None = option(
        None, "Also score A,B with the mean query gradient of benchmark A minus B's (repeatable; dot, cosine, trackstar)."
    )

    def benchmarks(self) -> dict[str, str]:
        out = {}
        for spec in self.benchmark or []:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise UserError(f"--benchmark takes NAME=FILE, got {spec!r}")
            if name in out:
                raise UserError(f"benchmark {name!r} given twice")
            out[name] = path
        if not out:
            raise UserError("give at least one --benchmark NAME=FILE")
        return out

    def contrasts(self) -> list[tuple[str, str]]:
        pairs = []
        for spec in self.gradient_contrast or []:
            a, sep, b = spec.partition(",")
            if not sep:
                raise UserError(f"--gradient-contrast takes A,B (two benchmark names), got {spec!r}")
            pairs.append((a.strip(), b.strip()))
        return pairs


@dataclass
class UnlearnTargetConfig(Config):
    """What `headwater unlearn` validates: a bin of a corpus map, for a benchmark, against a control."""

    map: str | None = option(None, "A corpus map directory (`headwater bins --out`): its record scores and benchmark files.")
    bin: str | None = option(None, "The bin to unlearn from, as COLUMN=VALUE (or COLUMN=VALUE,COLUMN=VALUE for a joint bin).")
    benchmark: list[str] | None = option(None, H_BENCHMARK)
    control: str | None = option(None, "The control benchmark of the map (or NAME=FILE): it should not move more for the top records.")

    def view_and_bin(self, by: list[str]) -> tuple[str, str]:
        """(view name, bin name) of the map for `bin`, ordering columns as the map's `by` does."""
        from .bins import JOINT

        if not self.bin:
            raise UserError("give the bin to unlearn from (--bin COLUMN=VALUE)")
        pairs = dict(p.split("=", 1) for p in self.bin.split(",") if "=" in p)
        if not pairs or len(pairs) != len(self.bin.split(",")):
            raise UserError(f"--bin takes COLUMN=VALUE[,COLUMN=VALUE], got {self.bin!r}")
        cols = [c for c in by if c in pairs]
        if len(cols) != len(pairs):
            raise UserError(f"--bin names columns {sorted(pairs)}, the map bins by {by}")
        return JOINT.join(cols), JOINT.join(pairs[c] for c in cols)


@dataclass
class FilterConfig(Config):
    """How `headwater filter` trains again without a bin's records."""

    init_model: str | None = option(None, H_INIT_MODEL)
    filter_seeds: list[int] = option([0, 1, 2], "Data-order seeds of the filtering runs (repeatable): each trains full, filtered and random arms.")
