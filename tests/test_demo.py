"""`headwater demo` runs with portable kernels: the same seed gives the same numbers whatever
kernels the CPU would otherwise pick. A second run under another CPU's environment (MKL capped at
SSE4.2, oneDNN at SSE4.1, ATen's AVX2 kernels, one thread) must reproduce the first to the last
bit. The portable settings override all of these but MKL's cap, so that is what the comparison
tests; with `--native-kernels` the same change of environment changes the results
(`test_native_kernels_depend_on_the_cpu`), so the comparison can fail. Both need x86-64 with MKL,
where the settings mean something."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import LAUNCHER_VARIABLES

from headwater.demos import PORTABLE_KERNELS, portable_environment

BASE = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES and k not in PORTABLE_KERNELS}
OTHER_CPU = {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41", "ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "1"}
x86_with_mkl = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkl.is_available(),
    reason="MKL's reproducibility branches are x86-64 only",
)


def stages_demo(workdir: Path, env: dict, *flags: str) -> dict:
    """Run `headwater demo stages` (about 30 s); its estimates and retrained truth, both pipelines."""
    cmd = [sys.executable, "-m", "headwater", "demo", "stages", "--workdir", str(workdir), *flags]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    files = ("effects.json", "truth.json", "finetune/effects.json", "finetune/truth.json")
    return {"stdout": r.stdout, **{f: json.loads((workdir / f).read_text()) for f in files}}


def test_portable_environment_sets_every_kernel_choice():
    env = portable_environment({"PATH": "/bin", "OMP_NUM_THREADS": "16"})
    assert env["PATH"] == "/bin"
    assert {k: env[k] for k in PORTABLE_KERNELS} == {
        "MKL_CBWR": "COMPATIBLE",
        "ATEN_CPU_CAPABILITY": "default",
        "ONEDNN_MAX_CPU_ISA": "SSE41",
        "OMP_NUM_THREADS": "2",
        "MKL_NUM_THREADS": "2",
    }


@x86_with_mkl
def test_portable_demo_is_bit_identical_under_another_cpus_environment(tmp_path):
    here = stages_demo(tmp_path / "here", BASE)
    there = stages_demo(tmp_path / "there", {**BASE, **OTHER_CPU})
    for run in (here, there):
        assert run["stdout"].startswith("portable kernels: MKL_CBWR=COMPATIBLE, ATen DEFAULT, 2 threads\n")
    for f in ("effects.json", "truth.json", "finetune/effects.json", "finetune/truth.json"):
        assert here[f] == there[f], f


@x86_with_mkl
def test_native_kernels_depend_on_the_cpu(tmp_path):
    here = stages_demo(tmp_path / "here", BASE, "--native-kernels")
    there = stages_demo(tmp_path / "there", {**BASE, **OTHER_CPU}, "--native-kernels")
    assert "portable kernels" not in here["stdout"]
    assert here["truth.json"] != there["truth.json"]
