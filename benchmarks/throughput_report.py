"""The report side of `throughput.py`: the printed table, and how busy the machine was."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path


def fmt_rate(x: float) -> str:
    return f"{x:,.1f}" if x < 1000 else f"{x:,.0f}"


def table(result: dict) -> str:
    L = []
    env = result["environment"]
    gpu = f"{env['gpu']} + " if env.get("gpu") else ""
    L.append(
        f"headwater throughput — {gpu}{env['cpu']} | {env['cores']} cores, threads={env['threads']} | torch {env['torch']} | numpy {env['numpy']}"
    )
    load = result.get("machine_load")
    if load is not None:
        busy = load["others_fraction"]
        L.append(
            f"other processes used {100 * busy:.0f}% of the machine's CPU time during the run"
            + (" -- NOISY: rerun on an idle machine" if busy > 0.1 else " (quiet enough)")
        )
    b = result.get("build")
    if b:
        m = result["build_setup"]
        L.append("")
        L.append(
            f"BUILD  GPT-2 {m['layers']}L/{m['embd']}d/{m['heads']}h, vocab {m['vocab']}, {m['params'] / 1e6:.2f}M params, {m.get('dtype', 'float32')} on {m.get('device', 'cpu')}; "
            f"{b['docs']} docs x {m['doc_tokens']} tokens, batch {m['batch_size']}; factored {m['projection_dim']}/module x {b['modules']} modules = {b['row_dim']} dims, float16"
        )
        L.append(f"  {'':38}{'seconds':>9}{'docs/s':>10}{'tokens/s':>11}{'vs bare':>9}")
        for key, label in (
            ("bare_fwd_bwd", "bare forward+backward (training)"),
            ("collector", "GradientCollector (no disk)"),
            ("build_index", "build_index (end to end)"),
        ):
            r = b[key]
            ratio = b["bare_fwd_bwd"]["seconds"] / r["seconds"]
            L.append(f"  {label:38}{r['seconds']:9.2f}{fmt_rate(r['docs_per_s']):>10}{fmt_rate(r['tokens_per_s']):>11}{ratio:9.2f}")
        g = result.get("bergson", {})
        if g.get("status") == "ok":
            L.append(
                f"  {'bergson ' + g['version'] + ' collect_gradients':38}{g['seconds']:9.2f}{fmt_rate(g['docs_per_s']):>10}{fmt_rate(g['tokens_per_s']):>11}{b['bare_fwd_bwd']['seconds'] / g['seconds']:9.2f}"
            )
        L.append(
            f"  build_index / bare = {b['build_over_bare']:.2f} (target >= 0.8: {'met' if b['build_over_bare'] >= 0.8 else 'NOT met'});"
            f" store+setup overhead = {b['store_and_setup_seconds']:.2f} s ({100 * (1 - b['build_over_collector']):.0f}% of build_index);"
            f" model fingerprint {b['model_fingerprint_seconds']:.2f} s, data fingerprint {b['records_fingerprint_seconds']:.3f} s"
        )
        if "raw_write_seconds" in b:
            raw = b["raw_write_seconds"]
            L.append(
                f"  the store's floor: np.save + fsync of the same {b['index_bytes'] / 1e9:.2f} GB takes {raw:.2f} s"
                f" ({b['index_bytes'] / 1e9 / raw:.2f} GB/s), {100 * raw / b['build_index']['seconds']:.0f}% of build_index"
            )
        if g.get("status") == "ok":
            r = g.get("headwater_over_bergson")
            L.append(
                f"  headwater / bergson docs/s = {r:.2f} (target >= 1.5: {'met' if r >= 1.5 else 'NOT met'});"
                f" bergson: {g['projection']}, {g['row_dim']} dims stored as {g['stored_dtype']}" + (f"; {g['note']}" if g.get("note") else "")
            )
        else:
            L.append(f"  bergson: {g.get('status', 'not run')}")
    q = result.get("query")
    if q:
        L.append("")
        L.append(
            f"QUERY  {q['rows']:,} rows x {q['dim']:,} dims float16 = {q['data_bytes'] / 1e9:.2f} GB in {q['shards']} shards (page cache);"
            f" {q['queries']} queries, cosine, top_k {q['top_k']}, best of {result['args']['repeats']}"
        )
        L.append(f"  {'':38}{'seconds':>9}{'GB/s':>8}{'rows/s':>10}{'vs np mm':>10}{'vs np cos':>10}")
        labels = {
            "numpy_matmul": "numpy mmap: f32 + matmul",
            "numpy_cosine": "numpy mmap: f32 + matmul + norms",
            "score_blocks_verify_off": "score_blocks, verify off",
            "rank_verify_off": "rank (score_blocks+top-k), verify off",
            "rank_verify_on": "rank, verify on (fresh Index)",
        }
        mm, cos = q["cases"]["numpy_matmul"]["seconds"], q["cases"]["numpy_cosine"]["seconds"]
        for key, label in labels.items():
            c = q["cases"][key]
            L.append(
                f"  {label:38}{c['seconds']:9.3f}{c['GB_per_s']:8.2f}{fmt_rate(c['rows_per_s']):>10}{mm / c['seconds']:10.2f}{cos / c['seconds']:10.2f}"
            )
        r = q["ratios"]["rank_verify_off_over_numpy_matmul"]
        L.append(
            f"  rank (verify off) / numpy matmul = {r:.2f} (target >= 0.7: {'met' if r >= 0.7 else 'NOT met'}); ShardWriter wrote it at {q['write_GB_per_s']:.2f} GB/s (float16 cast, np.save, fsync, sha256)"
        )
    return "\n".join(L)


def cpu_ticks() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat (None elsewhere)."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    idle = f[3] + (f[4] if len(f) > 4 else 0)
    return (sum(f[:8]) - idle) / hz, sum(f[:8]) / hz


def own_cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def machine_load(before, own_before: float) -> dict | None:
    """CPU time other processes used since `before` (a cpu_ticks() reading): the noise indicator."""
    after = cpu_ticks()
    if before is None or after is None:
        return None
    busy, total = after[0] - before[0], after[1] - before[1]
    others = max(0.0, busy - (own_cpu() - own_before))
    return {"others_cpu_seconds": others, "wall_cpu_seconds": total, "others_fraction": others / total if total else 0.0}


def cpu_name() -> str:
    with contextlib.suppress(OSError):  # no /proc outside Linux: fall back below
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
