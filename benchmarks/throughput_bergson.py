"""The bergson side of `throughput.py`: `benchmarks/bergson_driver.py --serve` run in bergson's own
interpreter (a throwaway venv, never a headwater dependency), fed the same model and corpus, and
timed one `collect_gradients` per build round so that its runs interleave with headwater's."""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PRECISION = {"float32": "fp32", "bfloat16": "bf16"}  # throughput.py's --dtype → bergson's --precision


class Bergson:
    """bergson_driver.py --serve in the bergson interpreter: loaded and warmed up once, then one timed
    `collect_gradients` over the corpus per `run()`, so its runs interleave with headwater's."""

    def __init__(self, cmd: list[str], timeout: float, log_path: Path):
        self.cmd, self.timeout, self.log_path = cmd, timeout, log_path
        self._log = open(log_path, "w")
        env = {**os.environ, "TQDM_DISABLE": "1"}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env)
        self.last: dict | None = None
        import queue
        import threading

        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        try:
            self._read()  # {"ready": true} after loading, tokenising and the warm-up
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            self._log.close()
            raise

    def _pump(self) -> None:  # a thread: bergson also logs to stdout, so lines are read as they come
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _read(self) -> dict:
        import queue

        deadline = time.monotonic() + self.timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"timed out after {self.timeout:.0f}s") from None
            if line is None:
                self.proc.wait(timeout=30)
                raise RuntimeError(f"exit {self.proc.returncode}: {self.last_error()}")
            if line.startswith("{"):
                return json.loads(line)

    def last_error(self) -> str:
        self._log.flush()
        lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        return (lines[-1] if lines else "?")[:300]

    def run(self) -> float:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        self.last = self._read()
        return self.last["seconds"]

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def start_bergson(args, s, workdir: Path, log) -> tuple[Bergson | None, dict]:
    """(session, info) — session None with info["status"] saying why bergson is not measured;
    `log` is `throughput.py`'s progress line."""
    py = Path(args.bergson_python)
    if args.skip_bergson:
        return None, {"status": "skipped (--skip-bergson)"}
    if not py.exists():
        return None, {"status": f"not installed ({py} does not exist; see benchmarks/README.md)"}
    probe = subprocess.run([str(py), "-c", "import bergson, torch; print(bergson.__version__, torch.__version__)"], capture_output=True, text=True)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return None, {"status": f"not installed (import bergson failed: {last[:200]})"}
    p = math.isqrt(args.projection_dim)
    info = {"projection": f"per_module {p}x{p}, rademacher, bias included"}
    if p * p != args.projection_dim:
        info["note"] = f"projection_dim {args.projection_dim} is not a square; bergson uses {p}x{p}={p * p}"
    model_dir, data_dir = workdir / "bergson_model", workdir / "bergson_data"
    s["model"].save_pretrained(model_dir)
    s["tok"].save_pretrained(model_dir)
    s["records"].save_to_disk(str(data_dir))
    cmd = [
        str(py),
        str(HERE / "bergson_driver.py"),
        str(model_dir),
        str(data_dir),
        str(workdir / "bergson_run"),
        "--projection-dim",
        str(p),
        "--batch-size",
        str(args.batch_size),
        "--doc-tokens",
        str(args.doc_tokens),
        "--threads",
        str(args.threads),
        "--precision",
        PRECISION[args.dtype],
        "--warmup-docs",
        str(2 * args.batch_size),
        "--serve",
    ]
    info["command"] = cmd
    log("bergson: loading and warming up: " + " ".join(cmd))
    try:
        return Bergson(cmd, args.bergson_timeout, workdir / "bergson.log"), info
    except Exception as exc:  # a failed start is reported, not raised
        return None, {**info, "status": f"failed to start ({exc})"}
