"""A built index: its store, the configuration it was built with, and queries against it.

    index = headwater.Index("runs/idx")
    top = index.query(queries, method="trackstar", top_k=20)   # pandas DataFrame

Query gradients are computed with exactly the build's modules, projection and normaliser; a model
whose weights differ from the one the index was built with is refused.
"""

from __future__ import annotations

import dataclasses
from functools import cached_property
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .build import BuildConfig, load_model
from .collect import GradientCollector, model_fingerprint
from .data import fingerprint_records, load_records, record_ids, record_text
from .errors import UserError
from .methods.gradient import Scorer, make_scorer
from .normalizer import load_optimizer_state, module_scales
from .projection import ProjectionConfig
from .query import Ranking, rank, results_frame
from .store import GradientStore, read_json
from .task import LanguageModelTask, Task, collated_batches, encode_records


class Index:
    """Read side of an index directory written by `build_index`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.store = GradientStore(self.path)
        self.manifest = self.store.manifest
        self.config = BuildConfig.from_dict(read_json(self.path / "config.json"))
        self._model = None
        self._tokenizer = None

    def __repr__(self) -> str:
        return f"Index({str(self.path)!r}, rows={self.store.rows}, dim={self.store.dim}, records={self.n_records})"

    @property
    def n_records(self) -> int:
        return self.manifest["data"]["records"]

    @property
    def pooled(self) -> bool:
        """True when records have several rows (span-level units)."""
        return self.manifest["task"].get("unit", "document") != "document"

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

    def model(self):
        """The model named in the build config, loaded once."""
        if self._model is None:
            if not self.config.model:
                raise UserError("the index was built from an in-memory model: pass model= (and task=) to query it")
            self._model, self._tokenizer = load_model(self.config.model, self.config.device)
        return self._model

    def query_task(self, task: Task | None = None) -> Task:
        """The task for query gradients: the build's settings, one example per query (no span split)."""
        if task is None:
            self.model()
            if self._tokenizer is None:
                raise UserError("pass task= to compute query gradients")
            t = self.manifest["task"]
            task = LanguageModelTask(self._tokenizer, t.get("max_length"), t.get("format", "auto"))
        if isinstance(task, LanguageModelTask) and task.unit != "document":
            task = dataclasses.replace(task, unit="document", stats={"examples": 0, "truncated": 0, "empty": 0})
        return task

    def collector(self, model: torch.nn.Module, task: Task) -> GradientCollector:
        """A collector identical to the build's; refuses a different model, modules or projection."""
        built = self.manifest
        fp = model_fingerprint(model)
        if fp != built["model"]["fingerprint"]:
            raise UserError(
                f"model mismatch: the index was built with model {built['model']['name'] or '(in-memory)'} "
                f"(fingerprint {built['model']['fingerprint']}), the query model's fingerprint is {fp}"
            )
        proj = ProjectionConfig(**built["projection"])
        names = [m["name"] for m in built["modules"]]
        scales = None
        if built["normalizer"]:
            scales = module_scales(model, GradientCollector(model, task, proj, names).modules, load_optimizer_state(built["normalizer"]["path"]), materialise=proj.kind != "factored")
        collector = GradientCollector(model, task, proj, names, scales)
        check_compatible(built, collector)
        return collector

    def gradients(self, queries, model=None, task: Task | None = None, batch_size: int | None = None, progress: bool = False) -> torch.Tensor:
        """Query gradients [q, dim] in the index's space (one row per query record)."""
        model = model if model is not None else self.model()
        task = self.query_task(task)
        collector = self.collector(model, task)
        records = load_records(queries)
        bs = batch_size or self.config.batch_size
        examples = encode_records(task, records)
        batches = tqdm(collated_batches(task, examples, bs), total=-(-len(examples) // bs), desc="queries", disable=not progress)
        return torch.cat([collector(b).cpu() for b in batches])

    # ------------------------------------------------------------------ curvature (influence functions)

    @property
    def curvature_path(self) -> Path:
        return self.path / "curvature.safetensors"

    def fit_curvature(self, config=None, model=None, task: Task | None = None, progress: bool = True):
        """Fit EK-FAC factors on the index's training records and save them beside the index."""
        from .curvature import fit_curvature

        model = model if model is not None else self.model()
        task = self.query_task(task)
        self.collector(model, task)  # refuses a model that differs from the index's
        names = [m["name"] for m in self.manifest["modules"]]
        curv = fit_curvature(model, task, self.records, names, config, progress=progress)
        curv.save(self.curvature_path)
        return curv

    def _influence_rows(self, records, method: str, model, task: Task, cg_steps: int = 0, damping: float | None = None) -> torch.Tensor:
        from .curvature import Curvature
        from .methods.influence import InfluenceFunction

        if not self.curvature_path.exists():
            raise UserError(f"no curvature beside {self.path}: fit it first (`headwater curvature {self.path}`)")
        self.collector(model, task)  # refuses a model that differs from the index's
        curv = Curvature.load(self.curvature_path)
        names = [m["name"] for m in self.manifest["modules"]]
        inf = InfluenceFunction(model, task, curv, names, ekfac=method == "ekfac", damping=damping, cg_steps=cg_steps,
                                cg_records=self.records if cg_steps else None, batch_size=self.config.batch_size)
        return inf.query_rows(records, self)

    def _fitted_scorer(self, records, method: str, model, task, aggregate: bool, batch_size: int | None, options: dict) -> Scorer:
        """The scorer for `method`, fitted on the queries' gradients."""
        model = model if model is not None else self.model()
        task = self.query_task(task)
        if method in ("ekfac", "kfac"):
            rows = self._influence_rows(records, method, model, task, options.pop("cg_steps", 0), options.pop("damping", None))
            if options:
                raise UserError(f"unknown options for {method}: {', '.join(options)}")
            return Scorer().fit(self.store, rows, aggregate)
        return make_scorer(method, **options).fit(self.store, self.gradients(records, model, task, batch_size), aggregate)

    # ------------------------------------------------------------------ scoring

    def score_blocks(self, scorer: Scorer, block_rows: int | None = None, verify: bool = True) -> Iterator[tuple[int, np.ndarray, torch.Tensor]]:
        """Stream (first row, ids [b, 2], scores [b, q]) over the whole store."""
        for block in self.store.blocks(block_rows, verify, reuse=True):
            yield block.start, block.ids, scorer.score(block.rows)

    def scores(self, queries, method: str = "cosine", model=None, task=None, aggregate: bool = False, batch_size: int | None = None, **options) -> np.ndarray:
        """Dense scores [rows, q] of every stored row (for evaluation on small indexes)."""
        scorer = self._fitted_scorer(load_records(queries), method, model, task, aggregate, batch_size, options)
        return torch.cat([s for _, _, s in self.score_blocks(scorer)]).numpy()

    def query(
        self,
        queries,
        method: str = "cosine",
        top_k: int = 10,
        bottom_k: int = 0,
        aggregate: bool = False,
        pool: str | None = "max",
        model=None,
        task: Task | None = None,
        block_rows: int | None = None,
        verify: bool = True,
        max_chars: int = 200,
        batch_size: int | None = None,
        **options,
    ) -> pd.DataFrame:
        """Top (and bottom) training records per query, as a DataFrame.

        `method`: dot, cosine, trackstar (options `mix`, `damping`), or the influence functions
        ekfac / kfac (options `cg_steps`, `damping`; fit the curvature first with `fit_curvature`).
        `aggregate=True` scores the mean of the normalised query gradients once (query_id "mean").
        `pool` combines the rows of a record when the index is span-level (max, mean or sum).
        """
        records = load_records(queries)
        scorer = self._fitted_scorer(records, method, model, task, aggregate, batch_size, options)
        ranking = rank(self.score_blocks(scorer, block_rows, verify), top_k, bottom_k, pool if self.pooled else None, self.n_records)
        query_ids = ["mean"] if aggregate else record_ids(records)
        return self.frame(ranking, query_ids, max_chars)

    def frame(self, ranking: Ranking, query_ids: list, max_chars: int = 200) -> pd.DataFrame:
        return results_frame(ranking, query_ids, self.store.ids(), self.train_ids, self.text, max_chars)


def check_compatible(manifest: dict, collector: GradientCollector) -> None:
    """Raise a UserError naming the first of modules/projection/dim that differs from the index."""
    mine = collector.describe()
    if mine["modules"] != manifest["modules"]:
        raise UserError(f"modules mismatch: the index tracks {[m['name'] for m in manifest['modules']]}, the query tracks {[m['name'] for m in mine['modules']]}")
    if mine["projection"] != manifest["projection"]:
        raise UserError(f"projection mismatch: the index was built with {manifest['projection']}, the query uses {mine['projection']}")
    if mine["dim"] != manifest["dim"]:
        raise UserError(f"dimension mismatch: index rows have {manifest['dim']} dims, query rows {mine['dim']}")
