"""The root ``safe-retrieval`` command: mounts every floor's commands and prints errors without tracebacks."""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from typing import Optional

import typer

from indexer.cli import index_app, search
from training import cli as training_cli
from training.errors import SafeRetrievalError

app = typer.Typer(
    rich_markup_mode=None,  # help text is literal: "[caption]" must not be read as markup and vanish
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
app.add_typer(training_cli.eval_app, name="eval")
app.command("train")(training_cli.train)


@app.command("serve")
def serve(
    model: Optional[Path] = typer.Option(None, help="Artifact directory to serve. [env SAFE_RETRIEVAL_MODEL]"),
    index: Optional[str] = typer.Option(None, help="Index name to search (default gallery). [env SAFE_RETRIEVAL_INDEX]"),
    qdrant_url: Optional[str] = typer.Option(
        None, help="Qdrant server URL; embedded store when unset. [env SAFE_RETRIEVAL_QDRANT_URL]"),
    index_root: Optional[Path] = typer.Option(None, help="Embedded store directory. [env SAFE_RETRIEVAL_INDEX_ROOT]"),
    media_root: Optional[Path] = typer.Option(None, help="Root of the indexed images. [env SAFE_RETRIEVAL_MEDIA_ROOT]"),
    host: Optional[str] = typer.Option(None, help="Interface to listen on (default 127.0.0.1). [env SAFE_RETRIEVAL_HOST]"),
    port: Optional[int] = typer.Option(None, help="Port (default 8000). [env SAFE_RETRIEVAL_PORT]"),
) -> None:
    """Serve the HTTP API and the web page (uvicorn); every other option comes from SAFE_RETRIEVAL_* variables."""
    # imported here, not at the top: `safe-retrieval --help` and the other commands stay fast
    from service.startup import settings_from

    given = {"model": model, "index": index, "qdrant_url": qdrant_url, "index_root": index_root,
             "media_root": media_root, "host": host, "port": port}
    settings = settings_from({k: v for k, v in given.items() if v is not None})
    # after the settings: a bad one fails before the app is built
    from service.app import serve as run_server

    run_server(settings)


@app.command("demo")
def demo(workdir: Path = typer.Option(Path("runs/demo"), help="Where the demo keeps its data and model.")) -> None:
    """Run the end-to-end demo on the embedded defaults."""
    # imported here: the demo pulls in the trainer and the server
    from service.demo import run_demo

    run_demo(workdir)


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, standalone_mode=True)
    except SafeRetrievalError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except OSError as e:  # a full disk or a place it may not write can meet any command; others are bugs worth a traceback
        if e.errno == errno.ENOSPC:
            where = f" while writing {e.filename}" if e.filename else ""
            typer.echo(f"error: the disk is full{where}; free some space or write somewhere else, then run the command "
                       "again", err=True)
        elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and e.filename:
            typer.echo(f"error: cannot write {e.filename} ({e.strerror}); choose a directory this user may write, "
                       "or change its permissions", err=True)
        else:
            raise
        sys.exit(SafeRetrievalError.exit_code)
