"""A built index: its store, the configuration it was built with, and query rows in its space.

    index = headwater.Index("runs/idx")
    scores = headwater.TrackStar().fit(index).score(queries)      # any method takes an index

Query gradients are computed with exactly the build's modules, projection and normaliser; a model
whose weights differ from the one the index was built with is refused.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .collect import GradientCollector, model_fingerprint
from .config import BuildConfig, ProjectionConfig
from .data import fingerprint_records, load_records, record_ids, record_text
from .errors import UserError
from .measurement import Loss, Measurement, objective_fn
from .models import load_model
from .normalizer import load_optimizer_state, module_scales, optimizer_state_file
from .store import GradientStore, read_json, sha256_file
from .task import LanguageModelTask, Task, collated_batches, whole_examples


class Index:
    """Read side of an index directory written by `build_index`."""

    def __init__(self, path: str | Path, block_rows: int | None = None, verify: bool = True):
        """`block_rows`: rows per streamed block (default about 64 MiB); `verify`: checksum each
        shard before its first use."""
        self.path = Path(path)
        self.store = GradientStore(self.path, block_rows, verify)
        self.manifest = self.store.manifest
        self.config = BuildConfig.from_dict(read_json(self.path / "config.json"))
        self._model = None
        self._tokenizer = None
        self._state_checked = False  # the optimizer state's hash is checked once, not per query batch

    def __repr__(self) -> str:
        return f"Index({str(self.path)!r}, rows={self.store.rows}, dim={self.store.dim}, records={self.n_records})"

    @property
    def n_records(self) -> int:
        return self.manifest["data"]["records"]

    @property
    def unit(self) -> str:
        return self.manifest["task"].get("unit", "document")

    @property
    def module_names(self) -> list[str]:
        return [m["name"] for m in self.manifest["modules"]]

    @property
    def projection(self) -> ProjectionConfig:
        return ProjectionConfig(**self.manifest["projection"])

    @property
    def curvature_path(self) -> Path:
        return self.path / "curvature.safetensors"

    # ------------------------------------------------------------------ data, model, task

    @cached_property
    def records(self):
        """The training records the index was built from (fingerprint-checked)."""
        saved = self.path / "records"
        source = str(saved) if saved.exists() else self.config.data
        if source is None:
            raise UserError("the index does not know where its training records are")
        ds = load_records(source)
        if fingerprint_records(ds) != self.manifest["data"]["fingerprint"]:
            raise UserError(f"the training data at {source} changed since the index was built (fingerprint mismatch)")
        return ds

    @cached_property
    def train_ids(self) -> list:
        return record_ids(self.records)

    def text(self, record: int, max_chars: int | None = 200) -> str:
        return record_text(self.records[int(record)], max_chars)

    def use_model(self, name: str | None = None, device: str | None = None) -> None:
        """Load the queries' model from `name` (default: the build's model) onto `device`, in the
        build's precision (the fingerprint covers the parameters' dtype)."""
        self._model, self._tokenizer = load_model(name or self.config.model, device or self.config.device, self.config.model_dtype)

    def model(self) -> torch.nn.Module:
        """The model named in the build config, loaded once."""
        if self._model is None:
            if not self.config.model:
                raise UserError("the index was built from an in-memory model: pass model= (and task=)")
            self.use_model()
        return self._model

    def task(self) -> Task:
        """The build's task (a causal-LM task with the build's settings and the model's tokenizer)."""
        self.model()
        if self._tokenizer is None:
            raise UserError("pass task= to compute gradients with this index")
        t = self.manifest["task"]
        return LanguageModelTask(self._tokenizer, t.get("max_length"), t.get("format", "auto"), t.get("unit", "document"))

    def collector(self, model: torch.nn.Module, task: Task) -> GradientCollector:
        """A collector identical to the build's; refuses a different model, modules or projection."""
        built = self.manifest
        fp = model_fingerprint(model)
        if fp != built["model"]["fingerprint"]:
            raise UserError(
                f"model mismatch: the index was built with model {built['model']['name'] or '(in-memory)'} "
                f"(fingerprint {built['model']['fingerprint']}), the query model's fingerprint is {fp}"
            )
        proj, names = self.projection, self.module_names
        scales = None
        if built["normalizer"]:
            tracked = GradientCollector(model, task, proj, names).modules
            state_file = optimizer_state_file(built["normalizer"]["path"])
            if not self._state_checked and sha256_file(state_file) != built["normalizer"]["sha256"]:
                raise UserError(
                    f"{state_file} changed since the index was built (its sha256 differs): queries would be normalised differently from its rows"
                )
            self._state_checked = True
            state = load_optimizer_state(state_file)
            floor = built["normalizer"].get("floor", 0.0)  # indices built before the floor divided by the raw V
            scales = module_scales(model, tracked, state, materialise=proj.kind != "factored", floor=floor)
        collector = GradientCollector(model, task, proj, names, scales)
        check_compatible(built, collector)
        return collector

    def query_rows(
        self,
        queries,
        measurement: Measurement | None = None,
        model=None,
        task: Task | None = None,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Gradients of the measurement's objective in the index's space, [q, dim], one row per
        query record (all its targets together)."""
        model = model if model is not None else self.model()
        task = task if task is not None else self.task()
        collector = self.collector(model, task)
        records = load_records(queries)
        bs = batch_size or self.config.batch_size
        examples = whole_examples(task, records)
        fn = objective_fn(measurement or Loss(), task)
        batches = tqdm(collated_batches(task, examples, bs), total=-(-len(examples) // bs), desc="query gradients", disable=not progress)
        return torch.cat([collector(b, fn).cpu() for b in batches])


def check_compatible(manifest: dict, collector: GradientCollector) -> None:
    """Raise a UserError naming the first of modules/projection/dim that differs from the index."""
    mine = collector.describe()
    if mine["modules"] != manifest["modules"]:
        raise UserError(
            f"modules mismatch: the index tracks {[m['name'] for m in manifest['modules']]}, the query tracks {[m['name'] for m in mine['modules']]}"
        )
    if mine["projection"] != manifest["projection"]:
        raise UserError(f"projection mismatch: the index was built with {manifest['projection']}, the query uses {mine['projection']}")
    if mine["dim"] != manifest["dim"]:
        raise UserError(f"dimension mismatch: index rows have {manifest['dim']} dims, query rows {mine['dim']}")
