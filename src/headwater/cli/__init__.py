"""The `headwater` command line, one module per command group:

- `index.py`: build, curvature, query (top-k over an index);
- `attribute.py`: attribute (any method → a Scores file);
- `evaluate.py`: evaluate lds | leave-k-out | tail-patch;
- `concepts.py`: probe train | sae (concepts to attribute with);
- `components.py`: components (heads, MLPs, neurons carrying a behaviour);
- `stages.py`: stages (training-stage attribution of a recorded run);
- `corpus.py`: label | bins | contrast | unlearn | report (corpus-level capability maps);
- `demo.py`: demo <name>.

Flags are generated from the config dataclasses (`options.py`). User errors (bad files,
mismatched indexes, bad flags) exit with status 2 and one line on stderr; anything else is a bug
and keeps its traceback. Warnings (MAGIC's failed smoothness check, ...) are one line too.
"""

import os
import sys
import warnings

import typer

from . import attribute, components, concepts, corpus, demo, evaluate, index, stages  # noqa: F401  (each registers its commands)
from .app import app

_default_format = warnings.formatwarning


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """headwater's own warnings as `headwater: warning: …`, without the library's file and source
    line (users act on the message); other libraries' warnings as Python prints them."""
    if f"{os.sep}headwater{os.sep}" not in str(filename):
        return _default_format(message, category, filename, lineno, line)
    return f"headwater: warning: {message}\n"


def main() -> None:
    """Run the CLI; a usage error (an unknown flag, a bad value or choice) is one line, exit 2."""
    warnings.formatwarning = one_line_warning
    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        typer.echo("headwater: aborted", err=True)
        sys.exit(1)
    except Exception as exc:
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):  # click's usage errors (typer may vendor click)
            message = " ".join(exc.format_message().split())
            if message:  # (none when a bare command printed its help)
                typer.echo(f"headwater: error: {message}", err=True)
            sys.exit(2)
        raise
    sys.exit(code if isinstance(code, int) else 0)
