"""Commands of the middle floor: ``index build|add|delete|list|info|drop`` and ``search`` (mounted by ``service.cli``).

Heavy imports (torch, open_clip, the Qdrant clients, numpy) happen inside the commands, after inputs are
checked and the index lock is held, so bad input and a busy index fail within a second and the
whole ``safe-retrieval`` CLI starts without them.
"""

from __future__ import annotations

import json
import os
from enum import Enum
from pathlib import Path
from typing import Any, List, Optional

import typer

from indexer.errors import IndexNotFoundError, JobInterrupted
from training.data.roots import DataRoots
from training.errors import InputError

index_app = typer.Typer(
    rich_markup_mode=None,  # help text is literal: "[caption]" must not be read as markup and vanish
    help="Indexes: build, update, inspect and drop vector indexes (Qdrant Edge embedded, or a Qdrant server).",
    no_args_is_help=True,
)


class SafetyOpt(str, Enum):
    strict = "strict"
    traverse = "traverse"
    filter = "filter"
    off = "off"


class TargetOpt(str, Enum):
    image = "image"
    text = "text"
    any = "any"


def _workers() -> int:
    return min(4, os.cpu_count() or 1)


ROOT_OPT = typer.Option(None, "--root", envvar="SAFE_RETRIEVAL_INDEX_ROOT",
                        help="Directory of embedded (Qdrant Edge) indexes. Default: runs/indexes.")
URL_OPT = typer.Option(None, "--qdrant-url", envvar="SAFE_RETRIEVAL_QDRANT_URL",
                       help="Use a Qdrant server/cluster at this URL instead of the embedded store.")
KEY_OPT = typer.Option(None, "--api-key", envvar="SAFE_RETRIEVAL_QDRANT_API_KEY", help="API key of the Qdrant server.")
JSON_OPT = typer.Option(False, "--json", help="Print JSON instead of text.")
DATA_ROOT_OPT = typer.Option([], "--data-root", help="Read files only under this directory, after resolving symlinks: "
                             "others are recorded failures (repeatable; none given: no limit).")
SWITCH_OPT = typer.Option(True, "--switch/--no-switch",
                          help="Switch NAME to the new generation and prune old ones (--no-switch: leave it staged).")
RESULT_OPT = typer.Option(None, "--result-file", dir_okay=False,
                          help="Write the generation (as soon as it is chosen, then the job's result) to this JSON file.")
# the default is training.images.MAX_FILE_BYTES (not imported here: PIL would load at CLI start-up)
MAX_FILE_BYTES_OPT = typer.Option(None, "--max-file-bytes", min=1,
                                  help="Skip larger image files as failures, from their size before reading (default 64 MiB).")
STORAGE_OPT = typer.Option(
    None, "--storage", help="compact: one byte per dimension of the prefetch vector in memory, the exact vectors on disk "
    "(a quarter of the bytes in memory, the same recall measured; benchmarks/RESULTS.md, 'A million items'); fast: "
    "float32 in memory. "
    "Default: the current generation's, else compact.")
TAKEDOWNS_OPT = typer.Option(None, "--takedowns", dir_okay=False,
                             help="A collection's journal (the service's STATE_DIR/collection/journal.jsonl): content "
                                  "on its takedown list is skipped as a recorded failure.")


def _takedowns(path: Optional[Path]) -> frozenset:
    from indexer.journal import taken_down

    return taken_down(path)


def _roots(dirs: List[Path]) -> DataRoots:
    return DataRoots.of(dirs)


def _echo_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def _gens(name: str, root: Optional[Path], url: Optional[str], api_key: Optional[str], **layout: Optional[int]):
    # numpy and the stores: loaded per command, not at CLI start-up
    from indexer.generations import check_name
    from indexer.index import generations_for

    return generations_for(check_name(name), root=root, url=url, api_key=api_key, **layout)


def _inputs(images, manifest, visu, split, texts, captions_as_text, media_root, roots):
    """Items, the resume signature and the media root of a job's input options (confined to ``roots``)."""
    # numpy and the stores: loaded per command, not at CLI start-up
    from indexer import sources
    from indexer.builder import sources_signature

    items = sources.collect(images=images, manifest=manifest, visu=visu, split=split, texts=texts,
                            captions_as_text=captions_as_text, roots=roots)
    if media_root is not None:  # not read, only what stored uris are relative to: it needs no confinement
        try:  # a symlink loop would otherwise fail only when the first uri is made
            Path(media_root).resolve()
        except (OSError, RuntimeError) as e:
            raise InputError(f"--media-root {media_root} cannot be resolved ({e}); give an existing directory") from e
    root = media_root or sources.default_media_root(images=images, manifest=manifest, visu=visu)
    spec = {"images": images, "manifest": manifest, "visu": visu, "split": split, "texts": texts,
            "captions_as_text": captions_as_text, "media_root": root}
    spec = {k: (str(Path(v).resolve()) if isinstance(v, Path) else v) for k, v in spec.items()}
    return items, sources_signature(spec), root


def _report(result, json_out: bool) -> None:
    if json_out:
        _echo_json(result.to_dict())
        return
    s = result.summary
    typer.echo(f"{result.name}: generation {result.generation} ({result.points} points){' [resumed]' if result.resumed else ''}")
    typer.echo(f"  {s.line()}")
    if s.failed and result.failures:
        typer.echo(f"  failures: {result.failures}")
    if result.pruned:
        typer.echo(f"  pruned: {', '.join(result.pruned)}")


class _ResultFile:
    """``--result-file``: JSON written atomically, first ``{name, generation, state: building}`` when the
    generation is chosen, then the whole result with ``state: complete`` (what the service's job runner
    reads to find, accept or discard the generation a job staged)."""

    def __init__(self, path: Optional[Path], name: str):
        self.path, self.name = path, name

    def staged(self, generation: str) -> None:
        self._write({"name": self.name, "generation": generation, "state": "building", "switched": False})

    def done(self, result, switched: bool) -> None:
        self._write({**result.to_dict(), "state": "complete", "switched": switched})

    def _write(self, obj: dict) -> None:
        if self.path is not None:
            # numpy and the stores: loaded per command, not at CLI start-up
            from indexer.generations import write_json_atomic

            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, obj)


def _interrupted(what: str) -> JobInterrupted:
    return JobInterrupted(f"{what} interrupted; the partial work is kept and nothing served changed. "
                          f"Re-run the same command to resume")


@index_app.command("build")
def build_cmd(
    model: Path = typer.Option(..., help="Artifact directory of the encoder to index with."),
    name: str = typer.Option(..., help="Index name (letters, digits, '.', '_', '-')."),
    images: Optional[Path] = typer.Option(None, help="Folder of images, indexed recursively."),
    manifest: Optional[Path] = typer.Option(None, help="Manifest .csv/.jsonl/.parquet: image, [caption], [tags], extra columns."),
    visu: Optional[Path] = typer.Option(None, help="ViSU dataset root (with --split)."),
    split: Optional[str] = typer.Option(None, help="ViSU split: train, validation, test, heldout."),
    texts: Optional[Path] = typer.Option(None, help="Text file, one text per line, indexed as text points."),
    captions_as_text: bool = typer.Option(False, "--captions-as-text", help="Also index image captions as text points."),
    media_root: Optional[Path] = typer.Option(None, help="Stored uris are relative to this (default: the input folder)."),
    root: Optional[Path] = ROOT_OPT,
    qdrant_url: Optional[str] = URL_OPT,
    api_key: Optional[str] = KEY_OPT,
    shards: Optional[int] = typer.Option(
        None, min=1, help="Qdrant server: shards of the new generation's collection, spread over the cluster's nodes "
        "(default: the current generation's, else 1)."),
    replicas: Optional[int] = typer.Option(
        None, min=1, help="Qdrant server: copies of each shard on different nodes; 2 survives one node down "
        "(default: the current generation's, else 1)."),
    batch_size: int = typer.Option(64, min=1, help="Images per encode/upsert batch."),
    workers: int = typer.Option(_workers(), min=0, help="Decode/preprocess worker processes (0: in the main process)."),
    keep: int = typer.Option(2, min=1, help="Complete generations to keep (older ones are pruned)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, ..."),
    break_lock: bool = typer.Option(False, "--break-lock", help="Remove a server lock left by a dead build."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on stderr."),
    max_pixels: Optional[int] = typer.Option(None, min=1, help="Skip larger images as failures (default 40 Mpx)."),
    max_file_bytes: Optional[int] = MAX_FILE_BYTES_OPT,
    data_root: List[Path] = DATA_ROOT_OPT,
    switch: bool = SWITCH_OPT,
    result_file: Optional[Path] = RESULT_OPT,
    takedowns: Optional[Path] = TAKEDOWNS_OPT,
    storage: Optional[str] = STORAGE_OPT,
    json_out: bool = JSON_OPT,
) -> None:
    """Index a collection into a new generation of NAME and switch NAME to it once complete.

    An interrupted build re-run with the same arguments resumes where it stopped.
    Scale out with `torchrun --nproc_per_node N` and --qdrant-url: each rank indexes a disjoint shard.
    """
    # numpy and the stores: loaded per command, not at CLI start-up
    from indexer import builder

    gens = _gens(name, root, qdrant_url, api_key, shards=shards, replicas=replicas)
    roots = _roots(data_root)
    items, sig, media = _inputs(images, manifest, visu, split, texts, captions_as_text, media_root, roots)
    out = _ResultFile(result_file, gens.name)
    try:
        result = builder.build(gens, model, items, sources=sig, media_root=media, batch_size=batch_size, workers=workers,
                               keep=keep, progress=progress, break_lock=break_lock, device=device, max_pixels=max_pixels,
                               max_file_bytes=max_file_bytes, roots=roots, switch=switch, staged=out.staged,
                               blocked=_takedowns(takedowns), storage=storage)
    except KeyboardInterrupt:
        raise _interrupted("build") from None
    if result.points >= 0:  # non-zero ranks of a torchrun job have nothing to report
        out.done(result, switch)
        _report(result, json_out)


@index_app.command("add")
def add_cmd(
    model: Path = typer.Option(..., help="Artifact the index was built with."),
    name: str = typer.Option(..., help="Index name."),
    images: Optional[Path] = typer.Option(None, help="Folder of images, indexed recursively."),
    manifest: Optional[Path] = typer.Option(None, help="Manifest .csv/.jsonl/.parquet."),
    visu: Optional[Path] = typer.Option(None, help="ViSU dataset root (with --split)."),
    split: Optional[str] = typer.Option(None, help="ViSU split."),
    texts: Optional[Path] = typer.Option(None, help="Text file, one text per line."),
    captions_as_text: bool = typer.Option(False, "--captions-as-text", help="Also index image captions as text points."),
    media_root: Optional[Path] = typer.Option(None, help="Stored uris are relative to this (default: the input folder)."),
    root: Optional[Path] = ROOT_OPT,
    qdrant_url: Optional[str] = URL_OPT,
    api_key: Optional[str] = KEY_OPT,
    batch_size: int = typer.Option(64, min=1),
    workers: int = typer.Option(_workers(), min=0),
    keep: int = typer.Option(2, min=1),
    device: str = typer.Option("auto"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    max_pixels: Optional[int] = typer.Option(None, min=1, help="Skip larger images as failures (default 40 Mpx)."),
    max_file_bytes: Optional[int] = MAX_FILE_BYTES_OPT,
    data_root: List[Path] = DATA_ROOT_OPT,
    switch: bool = SWITCH_OPT,
    result_file: Optional[Path] = RESULT_OPT,
    takedowns: Optional[Path] = TAKEDOWNS_OPT,
    json_out: bool = JSON_OPT,
) -> None:
    """Add items to the current generation of NAME (already stored items are skipped)."""
    # numpy and the stores: loaded per command, not at CLI start-up
    from indexer import builder

    gens = _gens(name, root, qdrant_url, api_key)
    roots = _roots(data_root)
    items, _, media = _inputs(images, manifest, visu, split, texts, captions_as_text, media_root, roots)
    out = _ResultFile(result_file, gens.name)
    try:
        result = builder.add(gens, model, items, media_root=media, batch_size=batch_size, workers=workers, keep=keep,
                             progress=progress, device=device, max_pixels=max_pixels, max_file_bytes=max_file_bytes,
                             roots=roots, switch=switch, staged=out.staged, blocked=_takedowns(takedowns))
    except KeyboardInterrupt:
        raise _interrupted("add") from None
    out.done(result, switch)
    _report(result, json_out)


@index_app.command("delete")
def delete_cmd(
    name: str = typer.Option(..., help="Index name."),
    id: List[str] = typer.Option([], "--id", help="Point id to delete (repeatable)."),
    uri: List[str] = typer.Option([], "--uri", help="Delete the points with this uri (repeatable)."),
    root: Optional[Path] = ROOT_OPT,
    qdrant_url: Optional[str] = URL_OPT,
    api_key: Optional[str] = KEY_OPT,
    keep: int = typer.Option(2, min=1),
    switch: bool = SWITCH_OPT,
    result_file: Optional[Path] = RESULT_OPT,
    json_out: bool = JSON_OPT,
) -> None:
    """Delete points from the current generation of NAME by id or uri."""
    # numpy and the stores: loaded per command, not at CLI start-up
    from indexer import builder

    gens = _gens(name, root, qdrant_url, api_key)
    out = _ResultFile(result_file, gens.name)
    result = builder.delete(gens, ids=id, uris=uri, keep=keep, switch=switch, staged=out.staged)
    out.done(result, switch)
    if json_out:
        _echo_json(result.to_dict())
    else:
        typer.echo(f"{result.name}: removed {result.removed} points; generation {result.generation} ({result.points} points)")


def _index_names(root: Optional[Path], url: Optional[str], api_key: Optional[str]) -> list[str]:
    # numpy and the stores: loaded per command, not at CLI start-up
    from indexer.generations import GEN_RE
    from indexer.index import default_root

    if url:
        # qdrant-client takes a second to load: embedded indexes never need it
        from indexer import server_store

        client = server_store.connect(url, api_key)
        return sorted({m["name"] for c in server_store.collection_names(client) if (m := GEN_RE.match(c))})
    base = Path(root) if root is not None else default_root()
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if p.is_dir() and any(GEN_RE.match(q.name) for q in p.iterdir()))


def _summary(gens) -> dict[str, Any]:
    # numpy and the stores: loaded per command, not at CLI start-up
    from indexer.generations import PROGRESS

    gen_list = gens.describe()
    cur = next((g for g in gen_list if g["current"]), None)
    meta = gens.read_meta(cur["generation"]) if cur else {}
    building = []
    for g in gen_list:
        if g["state"] == "building":
            p = gens.dir / g["generation"] / PROGRESS
            g["progress"] = json.loads(p.read_text()) if p.is_file() else None
            building.append(g["generation"])
    return {"name": gens.name, "current": cur["generation"] if cur else None, "points": meta.get("points"),
            "geometry": meta.get("geometry"), "curvature": meta.get("curvature"), "dim": meta.get("dim"),
            "fingerprint": meta.get("fingerprint"), "model_path": meta.get("model_path"), "bounds": meta.get("bounds"),
            "thresholds": meta.get("thresholds"), "completed_at": meta.get("completed_at"),
            "last_job": meta.get("last_job"), "building": building, "generations": gen_list}


@index_app.command("list")
def list_cmd(root: Optional[Path] = ROOT_OPT, qdrant_url: Optional[str] = URL_OPT, api_key: Optional[str] = KEY_OPT,
             json_out: bool = JSON_OPT) -> None:
    """List indexes with their current generation and size."""
    rows = [_summary(_gens(n, root, qdrant_url, api_key)) for n in _index_names(root, qdrant_url, api_key)]
    if json_out:
        _echo_json([{k: r[k] for k in ("name", "current", "points", "geometry", "fingerprint")} for r in rows])
        return
    if not rows:
        typer.echo("no indexes")
    for r in rows:
        fp = (r["fingerprint"] or "")[:19]
        typer.echo(f"{r['name']}\t{r['current'] or '(no complete generation)'}\t{r['points']} points\t{r['geometry']}\t{fp}")


@index_app.command("info")
def info_cmd(name: str = typer.Argument(..., help="Index name."), root: Optional[Path] = ROOT_OPT,
             qdrant_url: Optional[str] = URL_OPT, api_key: Optional[str] = KEY_OPT) -> None:
    """Print an index's record (model fingerprint, geometry, curvature, bounds, thresholds) and its generations as JSON."""
    gens = _gens(name, root, qdrant_url, api_key)
    if not gens.exists():
        raise IndexNotFoundError(f"no index named {name} (see 'safe-retrieval index list')")
    _echo_json(_summary(gens))


@index_app.command("drop")
def drop_cmd(name: str = typer.Argument(..., help="Index name."), root: Optional[Path] = ROOT_OPT,
             qdrant_url: Optional[str] = URL_OPT, api_key: Optional[str] = KEY_OPT,
             yes: bool = typer.Option(False, "--yes", help="Do not ask for confirmation.")) -> None:
    """Delete an index and all its generations."""
    gens = _gens(name, root, qdrant_url, api_key)
    if not gens.exists():
        raise IndexNotFoundError(f"no index named {name} (see 'safe-retrieval index list')")
    if not yes:
        typer.confirm(f"delete index {name} and its {len(gens.generations())} generation(s)?", abort=True)
    with gens.lock():
        dropped = gens.drop()
    typer.echo(f"dropped {name}: {', '.join(dropped)}")


def search(
    index: str = typer.Option(..., help="Index name."),
    model: Path = typer.Option(..., help="Artifact directory (the one the index was built with)."),
    text: Optional[str] = typer.Option(None, help="Text query."),
    image: Optional[Path] = typer.Option(None, help="Image query (a file)."),
    k: int = typer.Option(10, min=1, help="Number of results."),
    offset: int = typer.Option(0, min=0, help="Results to skip (paging)."),
    safety: SafetyOpt = typer.Option(SafetyOpt.strict, help="strict (traverse + filter), traverse, filter or off."),
    target: TargetOpt = typer.Option(TargetOpt.image, help="Kind of points to return: image, text or any."),
    tag: List[str] = typer.Option([], "--tag", help="Only points with this tag (repeatable: any of them)."),
    exact: bool = typer.Option(False, "--exact", help="Scan every point exactly instead of prefetch + rescoring."),
    oversample: Optional[int] = typer.Option(None, min=1, help="Candidates per result before exact rescoring."),
    root: Optional[Path] = ROOT_OPT,
    qdrant_url: Optional[str] = URL_OPT,
    api_key: Optional[str] = KEY_OPT,
    device: str = typer.Option("auto", help="auto, cpu, cuda, ..."),
    json_out: bool = JSON_OPT,
) -> None:
    """Search an index with a text or an image, with the same safety modes as the service."""
    if (text is None) == (image is None):
        raise InputError("give exactly one of --text or --image")
    _gens(index, root, qdrant_url, api_key).require_current()  # a missing index fails before torch loads
    # torch, open_clip and PIL load only once the index is known to exist: a missing one fails fast
    from indexer import search as searching
    from indexer.index import check_model, open_index
    from training import artifact
    from training.images import open_image

    with open_index(index, root=root, url=qdrant_url, api_key=api_key) as idx:
        art = artifact.load(model, device=device)
        check_model(idx, art)
        enc = art.encoder
        if text is not None:
            vec = enc.encode_text([text])
        else:
            assert image is not None, "exactly one of --text or --image, checked above"
            vec = enc.encode_image([open_image(image)])
        res = searching.search(idx, art, vec[0], query_modality="text" if text is not None else "image",
                               target=target.value, k=k, offset=offset, safety=safety.value, tags=tag or None,
                               exact=exact, oversample=oversample)
    if json_out:
        _echo_json({"index": {"name": idx.name, "generation": idx.generation}, **res.to_dict()})
        return
    q = res.query
    if q.distance_to_origin is not None:
        flag = {None: "unknown", True: "UNSAFE", False: "safe"}[q.unsafe]
        moved = f", redirected to d0={q.distance_to_origin_after:.3f}" if q.redirected else ""
        typer.echo(f"query: d0={q.distance_to_origin:.3f} ({flag}){moved}")
    for i, h in enumerate(res.hits, 1 + offset):
        what = h.uri if h.kind == "image" else repr(h.caption)
        typer.echo(f"{i:>3}. {h.distance:8.4f}  {h.kind:<5} {'unsafe' if h.unsafe else '      '} {what}")
    if not res.hits:
        typer.echo("no results")
