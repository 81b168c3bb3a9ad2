"""The throughput benchmark still runs end to end against the library as it is now (at toy sizes;
its figures are not checked here, only that every part ran and reported finite ratios). A
stand-in for bergson's interpreter answers the driver's protocol, so the bergson side runs too."""

import json
import math
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

FAKE_BERGSON = """#!/bin/sh
if [ "$1" = "-c" ]; then echo "0.0 0.0"; exit 0; fi
echo '{"ready": true}'
while read line; do
  [ "$line" = "run" ] && echo '{"seconds": 0.5, "docs": 8, "tokens": 64, "bergson_version": "stand-in"}'
done
"""


def test_throughput_benchmark_runs_end_to_end(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_BERGSON)
    fake.chmod(0o755)
    out = tmp_path / "t.json"
    sizes = "--docs 8 --doc-tokens 8 --layers 1 --embd 16 --heads 2 --projection-dim 16 --rows 64 --dim 64 --build-repeats 1 --repeats 1"
    cmd = [sys.executable, str(BENCHMARKS / "throughput.py"), *sizes.split(), "--threads", "1", "--out", str(out), "--bergson-python", str(fake)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["bergson"]["status"] == "ok" and result["bergson"]["version"] == "stand-in"
    ratios = [result["build"]["build_over_bare"], result["bergson"]["headwater_over_bergson"]]
    ratios += [case["seconds"] for case in result["query"]["cases"].values()]
    assert all(math.isfinite(r) and r > 0 for r in ratios), ratios
    assert "headwater / bergson docs/s" in done.stdout
