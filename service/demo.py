"""``safe-retrieval demo``: data, model, index and server on the embedded defaults, each step cached.

```
WORKDIR/
  data/       the synthetic ViSU-style dataset (training.data.synthetic, the demo presets' look)
  base/       the stand-in for pretrained CLIP (``train --method clip --preset demo-base``)
  model/      the demo HySAC artifact, fine-tuned from base (``train --preset demo --model base``)
  recipe.json which recipe made data, base and model
  indexes/    the embedded Qdrant Edge store with index ``demo``: the test split's images and captions
  service/    job records, retrained models, the served-pair record
```
A step is skipped when its output exists (and, for the index, was built with this model), so only
the first run trains; later runs start serving in seconds. A work directory made by an older recipe
(``RECIPE``) has its data and models made again.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from indexer import builder, sources
from indexer.index import generations_for
from service.admin.plans import write_source
from service.app import serve
from service.settings import Settings
from training import artifact, trainer
from training.recipes import RECIPES, synthesize_for_recipe

INDEX = "demo"
SPLIT = "test"
SEED = 0
# 4: hysac fine-tuned for 24 epochs (3: 16; 2: 8; generated-look data and the base since 2; 1: hysac
# from scratch on plain data)
RECIPE = 4

log = logging.getLogger("safe_retrieval.demo")


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def prepare_data(data: Path) -> None:
    """Generate the synthetic dataset unless it is already there."""
    if (data / "dataset.json").is_file():
        _say(f"dataset: {data} (cached)")
        return
    _say(f"dataset: generating {RECIPES['demo']['synthetic_n']} synthetic quadruplets in {data}")
    synthesize_for_recipe("demo", data, seed=SEED)


def prepare_model(data: Path, base: Path, model: Path) -> None:
    """Train the base CLIP (``--preset demo-base``), then the demo HySAC model from it (``--preset demo``),
    each unless its artifact exists."""
    if (model / "config.json").is_file():
        _say(f"model: {model} (cached)")
        return
    if (base / "config.json").is_file():
        _say(f"base model: {base} (cached)")
    else:
        _say(f"base model: training the stand-in for pretrained CLIP into {base} (~3 minutes on 2 CPU cores, once)")
        trainer.train(trainer.TrainConfig(method="clip", preset="demo-base", data=data, out=base, seed=SEED))
    _say(f"model: fine-tuning the demo HySAC model from the base into {model} (~3 minutes, once)")
    trainer.train(trainer.TrainConfig(method="hysac", preset="demo", model=str(base), data=data, out=model, seed=SEED))


def check_recipe(workdir: Path) -> None:
    """Remove data and models that an older demo recipe made, so that they are made again."""
    stamp = workdir / "recipe.json"
    try:
        recipe = json.loads(stamp.read_text()).get("recipe")
    except (OSError, ValueError):
        recipe = None if (workdir / "data").exists() or (workdir / "model").exists() else RECIPE
    if recipe != RECIPE:
        _say(f"{workdir} was made by an older demo recipe: making its data and models again")
        for name in ("data", "base", "model", "base.run", "model.run"):
            shutil.rmtree(workdir / name, ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"recipe": RECIPE}) + "\n")


def source(data: Path) -> dict:
    """The demo gallery: the test split's images with their captions indexed as text points too."""
    return {"visu": str(data.resolve()), "split": SPLIT, "captions": True, "media_root": str(data.resolve())}


def prepare_index(data: Path, model: Path, root: Path) -> None:
    """Index the test gallery with the model unless the current generation was built with it (and this format)."""
    gens = generations_for(INDEX, root=root)
    current = gens.current()
    fingerprint = artifact.read_config(model).get("fingerprint")
    meta = gens.read_meta(current) if current is not None else {}
    if meta.get("fingerprint") == fingerprint and meta.get("format_version") == builder.INDEX_FORMAT_VERSION:
        _say(f"index: {INDEX} generation {current} (cached)")
        return
    _say(f"index: indexing the {SPLIT} split's images and captions into {root / INDEX}")
    spec = source(data)
    items = sources.collect(visu=data, split=SPLIT, captions_as_text=True)
    result = builder.build(gens, model, items, sources=builder.sources_signature(spec), media_root=data,
                           workers=0, progress=True, device="cpu")
    _say(f"index: {result.points} points in generation {result.generation}")


def demo_settings(workdir: Path, *, host: str = "127.0.0.1", port: int = 8000) -> Settings:
    """Settings of the demo server; tokens and other options still come from SAFE_RETRIEVAL_* variables."""
    workdir = Path(workdir)
    return Settings(
        model=workdir / "model", index=INDEX, index_root=workdir / "indexes", media_root=workdir / "data",
        state_dir=workdir / "service", data_roots=[workdir.resolve()], host=host, port=port,
    )


def prepare(workdir: Path) -> Settings:
    """Every step but serving; returns the settings to serve with."""
    workdir = Path(workdir)
    data, model = workdir / "data", workdir / "model"
    check_recipe(workdir)
    prepare_data(data)
    prepare_model(data, workdir / "base", model)
    prepare_index(data, model, workdir / "indexes")
    settings = demo_settings(workdir)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    write_source(settings.state_dir, source(data))  # a retrain from the admin API reindexes the same gallery
    return settings


def run_demo(workdir: Path, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Prepare (cached) and serve the demo at http://HOST:PORT until Ctrl-C."""
    settings = prepare(workdir)
    settings = settings.model_copy(update={"host": host, "port": port})
    _say(f"serving http://{host}:{port}/  (API docs at /docs, Ctrl-C to stop)")
    serve(settings)
