"""The peer libraries' scores for an `lds.py` setting: the setting is written to a task directory
(data, the same trained models headwater attributes, the checkpoints with their learning rates),
`peers_driver.py` runs in the peers' own virtualenv (Kronfluence, traker, dattri with their
documented defaults; never a headwater dependency) and writes one [targets, train] score matrix
per method, oriented as headwater's (positive: training on the example lowers the target's loss).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import headwater as hw

DRIVER = Path(__file__).parent / "peers_driver.py"
NAMES = {  # driver file stem -> row name in the table
    "kronfluence__ekfac": "Kronfluence EK-FAC",
    "kronfluence__kfac": "Kronfluence KFAC",
    "traker__trak_1": "traker TRAK (1 model)",
    "traker__trak_ensemble": "traker TRAK (ensemble)",
    "dattri__grad_cos": "dattri gradient cosine",
    "dattri__tracin": "dattri TracIn",
    "dattri__if_cg": "dattri IF + CG",
    "dattri__if_ekfac": "dattri EK-FAC",
    "dattri__trak_1": "dattri TRAK (1 model)",
    "dattri__trak_ensemble": "dattri TRAK (ensemble)",
}


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def export(setting, ensemble: list, checkpoints: list[tuple], out: Path) -> Path:
    """Write `setting` as a task directory; `checkpoints` are (model, learning rate, steps)."""
    if out.exists():
        shutil.rmtree(out)
    (out / "models").mkdir(parents=True)
    (out / "checkpoints").mkdir()
    run = setting.run
    meta = {
        "name": setting.name,
        "n_train": len(setting.train),
        "n_targets": len(setting.targets),
        "training": {
            "optimizer": run.optimizer,
            "lr": run.lr,
            "momentum": run.momentum,
            "weight_decay": run.weight_decay,
            "epochs": run.epochs,
            "batch_size": run.train_batch_size,
        },
    }
    task, data = setting.task, {}
    if setting.spec is not None:
        meta |= {"kind": "classification", "model": setting.spec}
        for prefix, records in (("train", setting.train), ("target", setting.targets)):
            data[f"{prefix}_x"] = torch.stack([torch.as_tensor(r["x"]) for r in records]).float().contiguous()
            data[f"{prefix}_y"] = torch.tensor([int(r["y"]) for r in records], dtype=torch.int64)

        def save(model, rel: str) -> str:
            save_file(_state(model), out / f"{rel}.safetensors")
            return f"{rel}.safetensors"
    else:
        meta["kind"] = "lm"
        for prefix, records in (("train", setting.train), ("target", setting.targets)):
            batch = task.collate([task.whole(r) for r in records])
            for key in ("input_ids", "attention_mask", "target_mask"):
                data[f"{prefix}_{key}"] = batch[key]

        def save(model, rel: str) -> str:
            model.save_pretrained(out / rel)
            return rel

    meta["ensemble"] = [save(model, f"models/{i}") for i, model in enumerate(ensemble)]
    ckpt_paths = [save(model, f"checkpoints/{i}") for i, (model, _, _) in enumerate(checkpoints)]
    meta["checkpoints"] = [{"path": p, "lr": float(lr), "steps": int(k)} for p, (_, lr, k) in zip(ckpt_paths, checkpoints)]
    save_file(data, out / "data.safetensors")
    (out / "task.json").write_text(json.dumps(meta, indent=2))
    return out


def suggested(n_train: int) -> list[str]:
    """The settings the peers' own docs suggest beyond their defaults: Kronfluence's damping
    heuristic (0.1 × mean eigenvalue), a TRAK projection below the number of training examples
    (X^T X is singular otherwise, and both TRAKs use no ridge), the CG regularisation of dattri's
    README example."""
    dim = str(max(16, 2 ** int(np.log2(max(n_train // 4, 1)))))
    return ["kronfluence.damping_factor=null", f"traker.proj_dim={dim}", f"dattri__trak.proj_dim={dim}", "dattri__if_cg.regularization=0.01"]


def run(setting, ensemble: list, checkpoints: list[tuple], workdir: Path, python: str, train_seconds: float) -> dict:
    """{row name: (Scores, seconds)} of every peer method that ran, with its documented defaults
    and again with `suggested` settings ("(suggested)" rows); failures are printed and left out.
    Ensemble rows are charged the training of the extra models, as headwater's are."""
    task_dir = export(setting, ensemble, checkpoints, workdir / "task")
    out = _scores(setting, len(ensemble), task_dir, workdir / "scores", python, train_seconds, [])
    sets = suggested(len(setting.train))
    tuned = _scores(setting, len(ensemble), task_dir, workdir / "suggested", python, train_seconds, sets)
    changed = ("kronfluence", "traker", "dattri__trak", "dattri__if_cg")
    out.update({f"{name} (suggested)": v for name, v in tuned.items() if v[0].method.startswith(changed)})
    return out


def _scores(setting, n_models: int, task_dir: Path, scores_dir: Path, python: str, train_seconds: float, sets: list[str]) -> dict:
    if scores_dir.exists():
        shutil.rmtree(scores_dir)
    print(f"  {setting.name}: running the peers ({python})", flush=True)
    command = [python, str(DRIVER), str(task_dir), str(scores_dir), "--threads", str(torch.get_num_threads())]
    done = subprocess.run(command + [f"--set={s}" for s in sets], text=True)
    if done.returncode != 0:
        print(f"  {setting.name}: peers_driver.py exited with {done.returncode}", file=sys.stderr)
    info = json.loads((scores_dir / "peers.json").read_text()) if (scores_dir / "peers.json").exists() else {}
    out = {}
    train_ids = list(range(len(setting.train)))
    query_ids = list(range(len(setting.targets)))
    for stem, meta in info.items():
        path = scores_dir / f"{stem}.npy"
        if "error" in meta or not path.exists():
            print(f"  {setting.name}: {stem} failed: {meta.get('error', 'no scores written')}", flush=True)
            continue
        values = np.load(path).astype(np.float64).T  # driver: [targets, train]
        seconds = meta["seconds"] + (train_seconds * (n_models - 1) if stem.endswith("ensemble") else 0.0)
        out[NAMES.get(stem, stem)] = (hw.Scores(values, train_ids, query_ids, method=stem, config=meta.get("settings", {})), seconds)
    return out
