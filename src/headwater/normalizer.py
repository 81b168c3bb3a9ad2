"""Optimizer normalisation (TrackStar): divide each gradient entry by √(optimizer second moment).

From an Adam/AdamW `state_dict` (`exp_avg_sq`, bias-corrected) or an Adafactor state (rank-one
`row_var`/`col_var` in torch, `exp_avg_sq_row`/`exp_avg_sq_col` in transformers). For each
tracked module we build the inverse-scale matrix S [d_out, d_in + 1] (bias last) so that the
normalised gradient is DW_aug ⊙ S. The materialised paths (`dense`, `none`) apply S exactly; the
factored path folds a rank-one fit S ≈ r cᵀ into the two projections, which is exact for
Adafactor weights (and for any rank-one second moment) and a least-squares fit otherwise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError


@dataclass
class ModuleScale:
    """Inverse √(second moment) of one module, float64: `full` [d_out, d_in_aug] (None when only the
    factored projection's rank-one fit is needed: it is as large as the weight), `row` [d_out], `col` [d_in_aug]."""

    full: torch.Tensor | None
    row: torch.Tensor
    col: torch.Tensor


OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin", "optimizer.safetensors")


def numpy_safe_globals() -> list:
    """The numpy types ordinary optimizer states hold (a step saved as a numpy float64, a 0-d
    array): data, nothing that can run code, so `weights_only` unpickling may build them (the
    Hugging Face Trainer allows the same for its own rng state)."""
    import numpy as np

    multiarray = (np._core if hasattr(np, "_core") else np.core).multiarray  # numpy 2 / numpy 1
    dtypes = [type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int32, np.int64, np.uint32, np.uint8, np.bool_)]
    return [multiarray.scalar, multiarray._reconstruct, np.ndarray, np.dtype, *dtypes]


def load_optimizer_state(path: str | Path) -> dict:
    """An optimizer `state_dict` from `path`: a `torch.save`d file (unpickled with `weights_only`,
    numpy scalars allowed, nothing else), a safetensors file, or a Hugging Face / accelerate
    checkpoint folder holding one of `OPTIMIZER_FILES`. States keyed by parameter names (FSDP's
    full state dict, flattened `state.<name>.<key>` dicts) are accepted; partitioned DeepSpeed
    ZeRO shards and sharded distributed checkpoints are refused with what to do instead."""
    path = optimizer_state_file(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return _unflatten(load_file(str(path)), path)
    try:
        with torch.serialization.safe_globals(numpy_safe_globals()):
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError or others by version
        found = re.search(r"GLOBAL ([\w.]+)", str(exc)) or re.search(r"got <class '([\w.]+)'>", str(exc))
        if found:
            raise UserError(
                f"{path}: refusing to unpickle {found.group(1)} (only tensors, numbers and numpy scalars are loaded from "
                "optimizer states, never arbitrary classes); save the state_dict's tensors, e.g. as safetensors"
            ) from None
        raise UserError(f"could not read optimizer state {path}: {' '.join(str(exc).split())}") from None
    if not isinstance(sd, dict):
        raise UserError(f"{path} holds a {type(sd).__name__}, not an optimizer state_dict")
    if "optimizer_state_dict" in sd and "zero_stage" in sd.get("optimizer_state_dict", {}):
        raise UserError(
            f"{path} is a DeepSpeed ZeRO shard (flat partitions of many parameters): convert the checkpoint with "
            "DeepSpeed's ds_to_universal.py or load it into the model's optimizer and torch.save its state_dict()"
        )
    if "state" not in sd and any(k.startswith("state.") for k in sd):
        return _unflatten(sd, path)
    return sd


def optimizer_state_file(path: str | Path) -> Path:
    """The file holding the optimizer state: `path` itself, or the one a checkpoint folder holds."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"optimizer state {path} does not exist")
    return _file_in_checkpoint(path) if path.is_dir() else path


def _file_in_checkpoint(folder: Path) -> Path:
    for name in OPTIMIZER_FILES:
        if (folder / name).exists():
            return folder / name
    if (folder / ".metadata").exists():
        raise UserError(
            f"{folder} is a sharded torch.distributed checkpoint: consolidate it (get_optimizer_state_dict with "
            "full_state_dict=True) and torch.save the result"
        )
    raise UserError(f"{folder} holds no optimizer state (looked for {', '.join(OPTIMIZER_FILES)})")


def _unflatten(flat: dict, path: Path) -> dict:
    """{"state.<index or name>.<key>": tensor} (safetensors, flattened DCP) as a state_dict."""
    state: dict = {}
    for key, value in flat.items():
        if not key.startswith("state."):
            continue
        param, _, name = key[len("state.") :].rpartition(".")
        if not param:
            raise UserError(f"{path}: key {key!r} is not state.<parameter>.<name>")
        state.setdefault(int(param) if param.isdigit() else param, {})[name] = value
    if not state:
        raise UserError(f"{path} has no state.<parameter>.<name> entries: not an optimizer state")
    return {"state": state, "param_groups": [{"params": list(state)}]}


def param_states(model: torch.nn.Module, sd: dict) -> dict[str, tuple[dict, dict]]:
    """Map parameter name → (its state, its param group), checking names and shapes against the model.

    torch numbers a state_dict's parameters group after group, so positions are model order only
    with one group. Parameters are identified by the groups' `param_names`, by name keys (FSDP full
    state dicts), by position when there is one group, or by the Hugging Face Trainer's grouping
    (decayed parameters, then the rest, each in model order); anything else is refused."""
    if "state" not in sd or "param_groups" not in sd:
        raise UserError("optimizer state has no 'state'/'param_groups': not an optimizer state_dict")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    by_name = dict(named)
    groups = sd["param_groups"]
    if all("param_names" in g for g in groups):
        names = [list(g["param_names"]) for g in groups]
    elif all(isinstance(i, str) for g in groups for i in g["params"]):
        names = [[i.removeprefix("_orig_mod.") for i in g["params"]] for g in groups]
    elif len(groups) == 1:
        if len(groups[0]["params"]) > len(named):
            raise UserError(f"optimizer state has more parameters than the model ({len(groups[0]['params'])} > {len(named)})")
        names = [[n for n, _ in named[: len(groups[0]["params"])]]]
    else:
        names = _trainer_groups(model, named, groups, sd["state"])
    out = {}
    for group, group_names in zip(groups, names):
        for idx, name in zip(group["params"], group_names):
            if name not in by_name:
                raise UserError(f"optimizer state names parameter {name!r}, which the model does not have")
            out[name] = (sd["state"].get(idx, {}), group)
    return out


def _trainer_groups(model: torch.nn.Module, named: list, groups: list[dict], state: dict) -> list[list[str]]:
    """The names of a Hugging Face Trainer optimizer's two groups (weight decay, then none), if
    the state's group sizes and tensor shapes fit that rule."""
    from transformers.trainer_pt_utils import get_parameter_names

    forbidden = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]  # the Trainer's own rule
    decay = set(get_parameter_names(model, [torch.nn.LayerNorm], forbidden))
    candidate = [[n for n, _ in named if n in decay], [n for n, _ in named if n not in decay]]
    shapes = dict(named)
    fits = (
        len(groups) == 2
        and all(len(g["params"]) == len(c) for g, c in zip(groups, candidate))
        and all(
            all(t.shape == shapes[n].shape for t in state.get(i, {}).values() if torch.is_tensor(t) and t.dim() > 0)
            for g, c in zip(groups, candidate)
            for i, n in zip(g["params"], c)
        )
    )
    if not fits:
        raise UserError(
            "the optimizer state has several parameter groups but no parameter names: save it from an optimizer built "
            "with model.named_parameters() (torch ≥ 2.5 then records param_names)"
        )
    return candidate


V_FLOOR = 1e-3  # each parameter's second moment is floored at this fraction of its mean


def floored(v: torch.Tensor, floor: float = V_FLOOR) -> torch.Tensor:
    """A second-moment tensor with every entry raised to at least `floor` times its mean.

    Coordinates whose gradient stays at zero keep V ≈ 0, and 1/√V ≈ 1/ε then swamps everything
    else: GPT-2's attention key biases (softmax ignores a shift of every score) end a run at
    V ≈ 1e-21, so their scale is 10⁵–10⁶ times their neighbours'. A rank-one fit of a module's
    scales (the factored projection) then multiplies the whole bias column by it, and SOURCE,
    which keeps the diagonal of the scale in the curvature's eigenbasis, spreads it over whole
    rows. Entries at or above the floor keep their own value. On the demo's GPT-2 the floor raises
    2.5% of the entries, 99% of them with V below 1e-12 of the mean: parameters whose gradient
    was always zero (key biases, unused token and position embeddings)."""
    v = v.clamp_min(0)
    return v.clamp_min(floor * float(v.mean()))


def _second_moment(name: str, shape: torch.Size, state: dict, group: dict, floor: float) -> tuple[torch.Tensor, str]:
    """The (bias-corrected) second-moment estimate V of one parameter, floored (`floored`), and
    the optimizer kind."""
    if "exp_avg_sq" in state:
        v = state["exp_avg_sq"].double()
        step = float(state.get("step", 0))
        beta2 = group.get("betas", (0.9, 0.999))[1]
        if step > 0:
            v = v / (1 - beta2**step)
        v, kind = floored(v, floor), "adam"
    elif "row_var" in state or "exp_avg_sq_row" in state:
        row = state.get("row_var", state.get("exp_avg_sq_row")).double().reshape(-1)
        col = state.get("col_var", state.get("exp_avg_sq_col")).double().reshape(-1)
        # each factor floored at √floor of its mean keeps V rank one (the factored fold stays exact)
        # and V ≥ floor·mean(V), since mean(V) = mean(col)
        v = torch.outer(floored(row, floor**0.5), floored(col, floor**0.5)) / row.mean()
        kind = "adafactor"
    elif "variance" in state:  # torch Adafactor keeps vectors' second moment unfactored
        v, kind = floored(state["variance"].double(), floor), "adafactor"
    else:
        raise UserError(f"optimizer state for {name!r} has no second moment (keys: {sorted(state)})")
    if v.numel() != shape.numel() or (v.dim() > 1 and tuple(v.shape) != tuple(shape)):  # same size, other shape: still wrong
        raise UserError(
            f"optimizer state for {name!r} has {tuple(v.shape)} entries, the model's parameter is {tuple(shape)}: "
            "the optimizer state does not match the model"
        )
    return v.reshape(shape), kind


def module_scales(
    model: torch.nn.Module, modules: dict[str, object], sd: dict, eps: float | None = None, materialise: bool = True, floor: float = V_FLOOR
) -> dict[str, ModuleScale]:
    """Inverse 1/(√V + eps) per tracked module, V floored at `floor` times each parameter's mean
    (`floored`; an index records the floor it was built with). `modules` maps name → collect.TrackedModule.

    `eps=None` uses the optimizer's own epsilon where it is a number (Adam), else 1e-8. `materialise=False`
    keeps only the rank-one factors (all the factored projection uses).
    """
    states = param_states(model, sd)
    scales = {}
    for name, tm in modules.items():
        w_name = tm.weight_name
        if w_name not in states:
            raise UserError(f"optimizer state has no entry for {w_name!r}: the optimizer state does not match the model")
        w_state, group = states[w_name]
        v_w, kind = _second_moment(w_name, tm.module.weight.shape, w_state, group, floor)
        v_w = tm.weight_matrix(v_w)  # HF Conv1D stores [d_in, d_out], Conv2d [C_out, C_in, kh, kw]
        full = torch.empty(tm.d_out, tm.d_in_aug, dtype=torch.float64)
        full[:, : tm.d_in] = v_w
        if tm.has_bias:
            b_name = tm.bias_name
            b_state, b_group = states[b_name]
            full[:, -1] = _second_moment(b_name, tm.module.bias.shape, b_state, b_group, floor)[0]
        group_eps = group.get("eps")
        e = eps if eps is not None else (group_eps if isinstance(group_eps, float) else 1e-8)
        inv = 1.0 / (full.clamp_min(0).sqrt() + e)
        row, col = rank_one_fit(inv[:, : tm.d_in])
        if tm.has_bias:  # bias column given the row factor: least squares c_b = <r, s_b> / <r, r>
            col = torch.cat([col, ((row @ inv[:, -1]) / (row @ row))[None]])
        scales[name] = ModuleScale(inv if materialise else None, row, col)
    return scales


def rank_one_fit(m: torch.Tensor, iters: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-one approximation m ≈ r cᵀ by power iteration; exact when m is rank one."""
    c = m.mean(0)
    for _ in range(iters):
        r = m @ c
        r = r / r.norm()
        c_new = m.T @ r
        if torch.allclose(c_new, c, rtol=1e-12, atol=0):
            break
        c = c_new
    return r, m.T @ r
