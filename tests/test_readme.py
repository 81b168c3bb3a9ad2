"""The README's Python example runs as written, and the ranking it asserts holds."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example(tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert "assert top" in code  # the example states the ranking it shows
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    scores = scope["scores"]
    assert scores.values.shape == (3, 2) and scores.train_ids == ["oslo", "lima", "cats"]
    assert (scores.values.argmax(0) == [0, 1]).all()  # each query's own fact first, pooled per document
    assert (tmp_path / "runs" / "readme-idx" / "manifest.json").exists()
