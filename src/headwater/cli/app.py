"""The `headwater` Typer application that every command module registers on."""

import typer

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="Attribute a model's behaviour to its training data."
)
evaluate_app = typer.Typer(no_args_is_help=True, help="Validate attributions against retraining.")
app.add_typer(evaluate_app, name="evaluate")
