"""Built-in end-to-end demos, one per main capability, each runnable on 2 CPU cores with no
downloads: `headwater demo <name>`."""

DEMOS = {
    "facts": ("headwater.demos.facts", "Fact tracing on a synthetic corpus: a tiny GPT-2, token-level gradients vs BM25."),
    "concepts": (
        "headwater.demos.concepts",
        "Which fine-tuning records taught a tiny GPT-2 a planted hostile tone: Concept Influence vs probe approximations, loss influence and BM25.",
    ),
    "corpus": (
        "headwater.demos.corpus",
        "Which topic × format bins of a generated corpus support two planted capabilities: the corpus map, a contrast, unlearning, an HTML report.",
    ),
    "stages": ("headwater.demos.stages", "Training-stage attribution of a four-stage run recorded through the Hugging Face Trainer, vs retraining."),
}

# A demo trains its models for hundreds of float32 steps, which amplify round-off: with each CPU's
# fastest kernels the same seed gives models answering 46% to 76% of the facts demo's questions.
# These settings pick kernels whose arithmetic is the same on every x86-64 CPU: MKL's conditional
# numerical reproducibility on its SSE2 branch (the one Intel documents for non-Intel CPUs too),
# ATen's baseline kernels, and a fixed thread count (reductions split by thread). The libraries
# read them when they load, hence a re-exec; they cost about twice the time.
PORTABLE_KERNELS = {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}


def portable_environment(environ: dict[str, str]) -> dict[str, str]:
    """`environ` with the portable-kernel settings, marked so that the re-exec'd process runs once."""
    return {**environ, **PORTABLE_KERNELS, "HEADWATER_PORTABLE_KERNELS": "1"}


def reexec_with_portable_kernels(argv: list[str]) -> None:
    """Replace this process by `python *argv` with portable kernels, unless it already has them
    (then print them and return). For the demos and the benchmarks that reuse their models."""
    import os
    import sys

    if os.environ.get("HEADWATER_PORTABLE_KERNELS") != "1":
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, *argv], portable_environment(dict(os.environ)))
    import torch

    print(f"portable kernels: MKL_CBWR=COMPATIBLE, ATen {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")


class CachedConfig:
    """Mixin of the demos' size dataclasses: `key()` hashes the settings to name cached models,
    and whether they were trained with portable kernels (`headwater demo --portable`), so that a
    model trained with a CPU's own kernels is not reused as a portable one."""

    def key(self) -> str:
        import dataclasses
        import hashlib
        import json
        import os

        settings = {**dataclasses.asdict(self), "portable": os.environ.get("HEADWATER_PORTABLE_KERNELS") == "1"}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
