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

# A demo trains its models for hundreds of float32 steps, which amplify round-off: the same seed
# gave a model answering 62% of the facts demo's questions on an AMD EPYC and 76% on an Intel Xeon.
# These settings pick kernels whose arithmetic does not depend on the x86-64 CPU: MKL's conditional
# numerical reproducibility on its SSE2 branch (the one Intel documents for non-Intel CPUs too),
# oneDNN and ATen at their baseline instruction sets, and a fixed thread count (reductions split by
# thread). The libraries read them when they load, hence a child process; they cost about twice
# the time. Elsewhere (ARM, builds without MKL) they only fix the threads.
PORTABLE_KERNELS = {
    "MKL_CBWR": "COMPATIBLE",
    "ATEN_CPU_CAPABILITY": "default",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    "OMP_NUM_THREADS": "2",
    "MKL_NUM_THREADS": "2",
}


def portable_environment(environ: dict[str, str]) -> dict[str, str]:
    """`environ` with the portable-kernel settings."""
    return {**environ, **PORTABLE_KERNELS}


def portable_kernels_active() -> bool:
    """Whether this process was started with every portable-kernel setting."""
    import os

    return all(os.environ.get(k) == v for k, v in PORTABLE_KERNELS.items())


def run_with_portable_kernels(argv: list[str]) -> int | None:
    """Run `python *argv` in a child process with portable kernels and return its exit status;
    None when this process already has them (it prints them and goes on)."""
    import os
    import platform
    import subprocess
    import sys

    if not portable_kernels_active():
        sys.stdout.flush()
        return subprocess.call([sys.executable, *argv], env=portable_environment(dict(os.environ)))
    import torch

    mkl = torch.backends.mkl.is_available()
    branch = f"MKL_CBWR={os.environ['MKL_CBWR']}" if mkl else "no MKL"
    print(f"portable kernels: {branch}, ATen {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")
    if not mkl or platform.machine().lower() not in ("x86_64", "amd64"):
        print(f"  (on {platform.machine()} without MKL's reproducibility branch these fix the threads only; results may differ between CPUs)")
    return None


class CachedConfig:
    """Mixin of the demos' size dataclasses: `key()` hashes the settings to name cached models,
    and whether they were trained with portable kernels (`headwater demo --portable`), so that a
    model trained with a CPU's own kernels is not reused as a portable one."""

    def key(self) -> str:
        import dataclasses
        import hashlib
        import json

        settings = dataclasses.asdict(self) | ({"portable": True} if portable_kernels_active() else {})  # older keys stay valid
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
