"""The root ``safe-retrieval`` command: mounts every floor's commands and prints errors without tracebacks."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from indexer.cli import index_app, search
from training import cli as training_cli
from training.errors import SafeRetrievalError

app = typer.Typer(
    help="safe-retrieval: image/text retrieval that stays safe when the query is not.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(training_cli.data_app, name="data")
app.add_typer(training_cli.model_app, name="model")
app.command("embed")(training_cli.embed)
app.add_typer(index_app, name="index")
app.command("search")(search)
app.command("eval")(training_cli.evaluate)
app.command("train")(training_cli.train)


@app.command("demo")
def demo(workdir: Path = typer.Option(Path("runs/demo"), help="Where the demo keeps its data and model.")) -> None:
    """Run the end-to-end demo on the embedded defaults."""
    from service.demo import run_demo

    run_demo(workdir)


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, standalone_mode=True)
    except SafeRetrievalError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
