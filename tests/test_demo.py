"""`headwater demo` runs with portable kernels: the same seed gives the same numbers whatever
kernels the CPU would otherwise pick. A second run with the environment of a different CPU
(MKL and oneDNN capped at SSE4.2, ATen's AVX2 kernels, one thread) must reproduce the first to
the last bit; with `--fast` the same change of environment changes the results (checked in
`test_fast_kernels_depend_on_the_cpu`), so the comparison can fail."""

import json
import os
import subprocess
import sys
from pathlib import Path

from headwater.demos import PORTABLE_KERNELS, portable_environment

LAUNCHER = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "HEADWATER_PORTABLE_KERNELS")
BASE = {k: v for k, v in os.environ.items() if k not in LAUNCHER and k not in PORTABLE_KERNELS}
OTHER_CPU = {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41", "ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "1"}


def stages_demo(workdir: Path, env: dict, *flags: str) -> dict:
    """Run `headwater demo stages` (about 15 s); its estimates and retrained truth."""
    cmd = [sys.executable, "-m", "headwater", "demo", "stages", "--workdir", str(workdir), *flags]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    return {"stdout": r.stdout, **{f: json.loads((workdir / f).read_text()) for f in ("effects.json", "truth.json")}}


def test_portable_environment_sets_every_kernel_choice():
    env = portable_environment({"PATH": "/bin", "OMP_NUM_THREADS": "16"})
    assert env["PATH"] == "/bin" and env["HEADWATER_PORTABLE_KERNELS"] == "1"
    assert {k: env[k] for k in PORTABLE_KERNELS} == {
        "MKL_CBWR": "COMPATIBLE",
        "ATEN_CPU_CAPABILITY": "default",
        "OMP_NUM_THREADS": "2",
        "MKL_NUM_THREADS": "2",
    }


def test_portable_demo_is_bit_identical_under_another_cpus_environment(tmp_path):
    here = stages_demo(tmp_path / "here", BASE)
    there = stages_demo(tmp_path / "there", {**BASE, **OTHER_CPU})
    for run in (here, there):
        assert run["stdout"].startswith("portable kernels: MKL_CBWR=COMPATIBLE, ATen DEFAULT, 2 threads\n")
    assert here["effects.json"] == there["effects.json"] and here["truth.json"] == there["truth.json"]


def test_fast_kernels_depend_on_the_cpu(tmp_path):
    here = stages_demo(tmp_path / "here", BASE, "--fast")
    there = stages_demo(tmp_path / "there", {**BASE, **OTHER_CPU}, "--fast")
    assert "portable kernels" not in here["stdout"]
    assert here["truth.json"] != there["truth.json"]
