"""The README's Python example runs as written and returns a ranked table."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example(tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    top = scope["top"]
    assert list(top["rank"]) == [1, 2, 3]
    assert set(top["train_id"]) == {"oslo", "lima", "cats"}  # pooled: one row per document
    assert top["score"].is_monotonic_decreasing
    assert (tmp_path / "runs" / "readme-idx" / "manifest.json").exists()
