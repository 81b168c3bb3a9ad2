"""Conjugate-gradient influence against EK-FAC on the four settings of `lds.py`: CG from zero on
the damped Hessian of the mean training loss over the tracked weights (dattri's recipe), at three
dampings, LDS after 1, 2, 3, 5 and 10 steps; and headwater's own refinement (PCG on the sampled
Fisher from the EK-FAC solve) at its defaults (a classifier's exact Fisher at 10 × the model's
mean eigenvalue, a sampled one at 30 ×), at EK-FAC's damping on the sampled Fisher (CG's setting until this release), and
over Fishers and dampings: the evidence for CG's defaults and for keeping CG off by default
(docs/benchmarks.md).

    python benchmarks/cg.py --cache /tmp/lds-cache     # retraining outcomes shared with damping.py
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from pathlib import Path

import damping  # noqa: E402  (beside this script)
import torch

import headwater as hw
from headwater.collect import tracked_modules
from headwater.methods.influence import record_gradients

STEPS = [1, 2, 3, 5, 10]
SWEEP = [3.0, 10.0, 30.0, 100.0]  # headwater's PCG: × the model's or each module's mean eigenvalue
MODES = ["model", "relative"]
DEFAULT_CURVATURE = dataclasses.replace(damping.CURVATURE, fisher=None)  # as damping.py's, the Fisher left to the default
SWEEP_STEPS = [5, 20]  # 20: the exact damped solve, as far as LDS can tell (10 and 20 steps agree to 0.002)


def hessian_products(model, task, records, names):
    """v ↦ H v per query, {module: [q, d_out, d_in_aug]}, H the Hessian of the mean training loss
    over the tracked weights (float64 autograd, double backward)."""
    model = copy.deepcopy(model).double()
    tms = list(tracked_modules(model, names).values())
    params = [p for tm in tms for p in ([tm.module.weight] + ([tm.module.bias] if tm.has_bias else []))]
    batch = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in task.collate([task.whole(r) for r in records]).items()}
    grads = torch.autograd.grad(task.loss(model, batch).mean(), params, create_graph=True)

    def as_params(v):  # one query's {module: [d_out, d_in_aug]} as the parameters' shapes
        out = []
        for tm in tms:
            w = v[tm.name][:, : tm.d_in]
            out.append((w.T if tm.transposed else w).reshape(tm.module.weight.shape))
            if tm.has_bias:
                out.append(v[tm.name][:, tm.d_in])
        return out

    def product(v):
        out = {n: torch.zeros_like(t) for n, t in v.items()}
        for q in range(next(iter(v.values())).shape[0]):
            hv = iter(torch.autograd.grad(grads, params, as_params({n: t[q] for n, t in v.items()}), retain_graph=True))
            for tm in tms:
                w = next(hv)
                w = (w.T if tm.transposed else w).reshape(tm.d_out, tm.d_in)
                out[tm.name][q] = torch.cat([w, next(hv)[:, None]], 1) if tm.has_bias else w
        return out

    return product


def cg_iterates(product, b, damping_of, steps):
    """CG from zero on (H + λ) x = b, per query; the iterates after 1..steps steps."""
    dot = lambda u, w: sum((u[n] * w[n]).flatten(1).sum(1) for n in u)  # noqa: E731
    x = {n: torch.zeros_like(t) for n, t in b.items()}
    r = {n: t.clone() for n, t in b.items()}
    p, rr, out = {n: t.clone() for n, t in r.items()}, dot(r, r), []
    for _ in range(steps):
        hp = product(p)
        ap = {n: hp[n] + damping_of(n) * p[n] for n in p}
        alpha = (rr / dot(p, ap)).view(-1, 1, 1)
        x = {n: x[n] + alpha * p[n] for n in x}
        r = {n: r[n] - alpha * ap[n] for n in r}
        rr_new = dot(r, r)
        p = {n: r[n] + (rr_new / rr).view(-1, 1, 1) * p[n] for n in p}
        rr = rr_new
        out.append(x)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, help="a folder for the retraining outcomes (reused when present)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cg.json")
    args = p.parse_args()
    torch.set_num_threads(2)
    results, lines = [], []
    for setting, final, masks, losses in damping.trained_tasks(args.cache):
        target = losses.mean(0)
        method = hw.EKFAC(final, setting.task, hw.InfluenceConfig(curvature=damping.CURVATURE)).fit(setting.train)
        row = {"setting": setting.name, "EK-FAC": hw.lds(method.score(setting.targets), masks, target)[0]}
        b = {n: t.double() for n, t in record_gradients(method.collector, setting.targets, hw.Loss(), method.config.batch_size).items()}

        def lds_of(x):
            return hw.lds(method.score_solution(setting.targets, x), masks, target)[0]

        sampled = method.config
        for k in STEPS:  # CG's damping until this release, on the factors' sampled Fisher
            method.config = dataclasses.replace(sampled, cg_steps=k, damping=1.0, damping_mode="relative")
            row[f"headwater PCG, EK-FAC's damping, sampled Fisher {k}"] = hw.lds(method.score(setting.targets), masks, target)[0]
        # CG's defaults: 30 × the model's mean eigenvalue, and a classifier's exact Fisher
        refined = hw.EKFAC(final, setting.task, hw.InfluenceConfig(curvature=DEFAULT_CURVATURE, cg_steps=1)).fit(setting.train)
        for k in STEPS:
            refined.config = dataclasses.replace(refined.config, cg_steps=k)
            row[f"headwater PCG, its defaults {k}"] = hw.lds(refined.score(setting.targets), masks, target)[0]
        row["fisher"] = refined.curvature.config.fisher
        fishers = {"sampled": method, "exact": refined} if row["fisher"] == "exact" else {"sampled": method}
        for fisher, fitted in fishers.items():
            base = fitted.config
            for mode in MODES:
                for d in SWEEP:
                    for k in [0] + SWEEP_STEPS:
                        fitted.config = dataclasses.replace(base, cg_steps=k, damping=d, damping_mode=mode)
                        row.setdefault("sweep", {})[f"{fisher} {mode} {d:g} {k}"] = hw.lds(fitted.score(setting.targets), masks, target)[0]
            fitted.config = base
        method.config = sampled
        product = hessian_products(final, setting.task, setting.train, list(b))
        for label, damping_of in (
            ("0.01 absolute", lambda n: 0.01),
            ("0.1 absolute", lambda n: 0.1),
            ("1 × mean eigenvalue", lambda n: method.curvature.damping_for(n, 1.0, "relative", True)),
        ):
            iterates = cg_iterates(product, b, damping_of, max(STEPS))
            for k in STEPS:
                row[f"Hessian CG from zero, {label} {k}"] = lds_of(iterates[k - 1])
        results.append(row)
        print(setting.name, {k: round(v, 3) for k, v in row.items() if k not in ("setting", "sweep", "fisher")}, flush=True)
    variants = sorted({k.rsplit(" ", 1)[0] for r in results for k in r if k not in ("setting", "EK-FAC", "sweep", "fisher")})
    lines = ["| setting | EK-FAC | " + " | ".join(f"{v}, {STEPS} steps" for v in variants) + " |", "|---" * (2 + len(variants)) + "|"]
    for r in results:
        cells = [" / ".join(f"{r[f'{v} {k}']:.3f}" for k in STEPS) for v in variants]
        lines.append(f"| {r['setting']} | {r['EK-FAC']:.3f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "headwater's PCG by Fisher and damping (model: × the model's mean eigenvalue; relative: × each module's): LDS of the EK-FAC start / after ",
    ]
    lines[-1] += " / ".join(map(str, SWEEP_STEPS)) + " steps (exact: the classifiers; its mean takes the LM's sampled figure)"
    lines += ["", "| Fisher, damping | " + " | ".join(r["setting"] for r in results) + " | mean after 5 |", "|---" * (2 + len(results)) + "|"]
    for key in (f"{fisher} {mode} {d:g}" for fisher in ("sampled", "exact") for mode in MODES for d in SWEEP):
        cells = [" / ".join(f"{r['sweep'][f'{key} {k}']:.3f}" for k in [0] + SWEEP_STEPS) if f"{key} 5" in r["sweep"] else "" for r in results]
        after = [r["sweep"].get(f"{key} 5", r["sweep"][f"sampled {key.split(' ', 1)[1]} 5"]) for r in results]  # the LM has no exact Fisher
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {sum(after) / len(after):.3f} |")
    text = "\n".join(lines)
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"steps": STEPS, "results": results, "table": text}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
