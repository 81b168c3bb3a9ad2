"""Scores a task exported by lds.py with the peer libraries Kronfluence, TRAK (traker) and dattri,
each with its own documented defaults; run with the *peers* virtualenv's python (never a headwater
dependency):

    /work/peers-venv/bin/python benchmarks/peers_driver.py TASK_DIR OUT_DIR [--only kronfluence,traker,dattri] [--threads 1]

The side environment (CPU wheels; no CUDA extension):

    python3 -m venv /work/peers-venv
    /work/peers-venv/bin/pip install torch==2.13.0
    echo torch==2.13.0 > /tmp/c.txt
    /work/peers-venv/bin/pip install -c /tmp/c.txt kronfluence traker dattri safetensors numpy transformers
    /work/peers-venv/bin/pip uninstall -y torchvision
    # (kronfluence requires torchvision but never imports it; PyPI's 0.28.0 wheel is a CUDA build whose
    #  ops fail to load against CPU torch, "operator torchvision::nms does not exist", breaking transformers)

TASK_DIR holds task.json and data.safetensors (see lds.py); models are loaded with
lds_models.build(spec) (classification) or GPT2LMHeadModel.from_pretrained (kind "lm").

Writes OUT_DIR/<peer>__<method>.npy, float64 [n_targets, n_train], all in ONE orientation:
positive = training on that example lowers that target's loss (the example helps). Each peer's
own convention and the flip applied (none were needed: all three already point that way, checked
against gradient dot products and exact leave-one-out retraining) are recorded in
OUT_DIR/peers.json: {"<peer>__<method>": {"seconds", "version", "settings"}} or {"error": "..."}.
A line per method goes to stdout; the peers' own logging goes to stderr. Every peer runs with
its documented defaults; --set PREFIX.KEY=VALUE changes one (recorded under "overrides").

Methods:
  kronfluence__ekfac, kronfluence__kfac     Analyzer.fit_all_factors + compute_pairwise_scores
  traker__trak_1, traker__trak_ensemble     TRAKer on ensemble[0] / on every ensemble model
  dattri__grad_cos                          TracInAttributor(normalized_grad=True, weights 1) on ensemble[0]
  dattri__tracin                            TracInAttributor over the checkpoints, weights lr*steps
  dattri__if_cg, dattri__if_ekfac           IFAttributorCG / IFAttributorEKFAC on ensemble[0]
  dattri__trak_1, dattri__trak_ensemble     TRAKAttributor on ensemble[0] / on every ensemble model
For kind "lm": kronfluence (both), dattri grad_cos / tracin (if checkpoints) / if_cg; traker has no
language-model output function, so it is reported as an error.

Caveat of the defaults: TRAK's X^T X is proj_dim x proj_dim (traker 2048, dattri 512) with no
regularisation, so with n_train < proj_dim it is singular and the TRAK scores are noise (the
settings record a "note"); --set traker.proj_dim=... / dattri__trak.proj_dim=... is the knob.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from peers_dattri import run_dattri
from peers_kronfluence import run_kronfluence
from peers_task import Task
from peers_traker import run_traker

PEERS = ("kronfluence", "traker", "dattri")
DIST = {"kronfluence": "kronfluence", "traker": "traker", "dattri": "dattri"}


def version(peer: str) -> str:
    try:
        return importlib.metadata.version(DIST[peer])
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


RUNNERS = {"kronfluence": run_kronfluence, "traker": run_traker, "dattri": run_dattri}
METHODS = {
    "kronfluence": ["ekfac", "kfac"],
    "traker": ["trak_1", "trak_ensemble"],
    "dattri": ["grad_cos", "tracin", "if_cg", "if_ekfac", "trak_1", "trak_ensemble"],
}


# ------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--only", default=",".join(PEERS), help="comma-separated peers (kronfluence,traker,dattri)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="PREFIX.KEY=VALUE",
        help="a NON-default setting, recorded in peers.json: PREFIX is a peer or a method-name prefix "
        "(kronfluence, traker__trak_1, dattri__trak, ...), KEY a keyword of that peer's constructor / "
        "FactorArguments / ScoreArguments (dattri: proj_dim etc. go to projector_kwargs), VALUE JSON "
        "(e.g. --set kronfluence.damping_factor=null for kronfluence's heuristic damping, "
        "--set traker.proj_dim=512, --set dattri__if_cg.regularization=0.01)",
    )
    args = ap.parse_args()
    sets = []
    for item in args.set:
        target, equals, value = item.partition("=")
        prefix, dot, key = target.rpartition(".")
        if not (prefix and dot and key and equals):
            ap.error(f"--set {item!r}: expected PREFIX.KEY=VALUE")
        try:
            value = json.loads(value)
        except json.JSONDecodeError:  # not JSON: the value is the string as given
            pass
        sets.append((prefix, key, value))
    args.overrides = lambda method: {k: v for p, k, v in sets if method.startswith(p)}
    only = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(only) - set(PEERS)
    if unknown:
        ap.error(f"unknown peer(s): {sorted(unknown)}")

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    # the peers log to stdout: keep the real stdout for our lines, send everything else to stderr
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    task = Task(args.task_dir)
    results: dict = {}
    meta_path = args.out_dir / "peers.json"

    def record(name: str, fn) -> None:
        peer = name.split("__")[0]
        t0 = time.perf_counter()
        try:
            torch.manual_seed(0)
            scores, settings = fn()
            secs = time.perf_counter() - t0
            scores = np.asarray(scores, dtype=np.float64)
            if scores.shape != (task.q, task.n):
                raise ValueError(f"scores have shape {scores.shape}, expected {(task.q, task.n)}")
            bad = int((~np.isfinite(scores)).sum())
            if bad:
                settings["non_finite_scores"] = bad
            np.save(args.out_dir / f"{name}.npy", scores)
            results[name] = {"seconds": secs, "version": version(peer), "settings": settings}
            line = f"{name}: {secs:.1f} s" + (f" ({bad} non-finite scores)" if bad else "")
        except Exception as e:  # a failing peer must not stop the others
            traceback.print_exc()
            msg = f"{type(e).__name__}: {e}".splitlines()[0][:300] if str(e) else type(e).__name__
            results[name] = {"error": msg, "version": version(peer), "seconds": time.perf_counter() - t0}
            line = f"{name}: ERROR {msg}"
        print(line, file=out, flush=True)
        meta_path.write_text(json.dumps(results, indent=2, default=str))

    work = Path(tempfile.mkdtemp(prefix="peers_"))
    try:
        for peer in only:
            try:
                RUNNERS[peer](task, record, work, args)
            except Exception as e:  # an import error etc.: every method of that peer not yet recorded fails
                traceback.print_exc()
                msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                for m in METHODS[peer]:
                    if f"{peer}__{m}" not in results:
                        results[f"{peer}__{m}"] = {"error": msg, "version": version(peer)}
                        print(f"{peer}__{m}: ERROR {msg}", file=out, flush=True)
                meta_path.write_text(json.dumps(results, indent=2, default=str))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta_path.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
