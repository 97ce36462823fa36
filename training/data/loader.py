"""From a ViSU-layout dataset to training batches: splits, the epoch's order, caching, collation.

- :func:`load_splits` reads the train and validation splits and reports what it skipped.
- :func:`train_dataset` decodes the train split's images on demand, or once into memory
  (:class:`CachedQuads`) when several epochs will read them and they fit.
- :func:`epoch_batches` yields one epoch of :class:`~training.objectives.Batch` for this rank:
  a ``DistributedSampler`` shard (the same on every run and resume), from a step onwards.
- :class:`Collate` tokenises captions and stacks images in the loader workers, and lists the
  train positions whose images could not be read, so the trainer can count them.
- :class:`LeftOut` is the retrain-without view of a train split (``clip --forget``, the oracle):
  chosen records lose their unsafe pair before its image is ever read, and each batch says which.
"""

from __future__ import annotations

import dataclasses
import signal
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from training import distributed
from training.data import visu
from training.data.roots import DataRoots
from training.encoder import SafetyEncoder
from training.errors import DataError
from training.objectives import Batch

SPLITS = ("train", "validation")


def load_splits(data: Path, log: Callable[[str], None], roots: DataRoots = DataRoots()) -> dict[str, visu.VisuSplit]:
    """The train and validation splits; skipped records are reported, an empty split is a DataError.

    With ``roots``, records whose images lie outside them are skipped (``outside_data_roots``).
    """
    if not data.is_dir():
        raise DataError(f"dataset directory not found: {data}; "
                        f"create a synthetic one with 'safe-retrieval data synth --out {data}'")
    splits = {}
    for name in SPLITS:
        split = visu.load_split(data, name, roots=roots)
        if not split.records:
            raise DataError(f"the {name} split of {data} is empty; check the dataset layout")
        skipped = {k: int(v) for k, v in (split.skipped or {}).items() if v}
        if skipped:
            log(f"{name}: skipped {sum(skipped.values())} records ({', '.join(f'{k}: {v}' for k, v in sorted(skipped.items()))})")
        splits[name] = split
    return splits


class Collate:
    """Stacks images and tokenises captions inside the loader workers: dicts -> :class:`Batch`."""

    def __init__(self, tokenizer, n_records: int | None = None):
        self.tokenizer = tokenizer
        self.n = n_records  # the dataset's length: with it, the batch lists the unreadable positions skipped

    def unreadable(self, items: list[dict[str, Any]]) -> tuple[int, ...]:
        if self.n is None:
            return ()
        return tuple((it["requested"] + k) % self.n for it in items for k in range((it["index"] - it["requested"]) % self.n))

    def __call__(self, items: list[dict[str, Any]]) -> Batch:
        return Batch(
            safe_tokens=self.tokenizer([it["safe"] for it in items]),
            nsfw_tokens=self.tokenizer([it["nsfw"] for it in items]),
            safe_pixels=torch.stack([it["safe_image"] for it in items]),
            nsfw_pixels=torch.stack([it["nsfw_image"] for it in items]),
            unreadable=self.unreadable(items),
            # a dataset flags every item or none (LeftOut): every rank's batches agree on having the mask
            unsafe_kept=torch.tensor([it["unsafe_kept"] for it in items]) if "unsafe_kept" in items[0] else None,
        )


class LeftOut(Dataset):
    """A train split without the unsafe pairs of the records at ``left_out`` (positions).

    Those records' unsafe caption and image are replaced by their safe ones, so the left-out image
    is never opened, and every item carries ``unsafe_kept`` (False for them): an objective that
    reads the unsafe half skips it where it is False.
    """

    def __init__(self, records: list[visu.Quadruplet], transform, *, left_out: frozenset[int],
                 roots: DataRoots = DataRoots()):
        self.left_out = left_out
        kept = [dataclasses.replace(r, nsfw=r.safe, nsfw_image=r.safe_image) if i in left_out else r
                for i, r in enumerate(records)]
        self.dataset = visu.QuadDataset(kept, transform, roots=roots)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.dataset[i]
        return {**item, "unsafe_kept": item["index"] not in self.left_out}  # index: the record actually returned


class CachedQuads(Dataset):
    """A dataset's items computed once and kept in memory: small datasets stop re-decoding images every epoch."""

    def __init__(self, dataset: Dataset):
        self.items = [dataset[i] for i in range(len(dataset))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def cache_fits(records: int, image_size: int, limit_bytes: int) -> bool:
    """Whether two float32 images per record fit in ``limit_bytes``."""
    return records * 2 * 3 * image_size * image_size * 4 <= limit_bytes


def train_dataset(records: list[visu.Quadruplet], encoder: SafetyEncoder, *, epochs: int, cache_mb: int,
                  roots: DataRoots = DataRoots(), left_out: frozenset[int] | None = None) -> Dataset:
    """The train split as the encoder's inputs; decoded once and cached when more than one epoch reads it and it fits.

    With ``roots``, each image is checked again when it is opened (a symlink swapped in after listing is refused).
    With ``left_out`` (positions; may be empty), those records' unsafe pairs are left out (:class:`LeftOut`).
    """
    dataset: Dataset = (visu.QuadDataset(records, encoder.transform, roots=roots) if left_out is None
                        else LeftOut(records, encoder.transform, left_out=left_out, roots=roots))
    size = encoder.arch.preprocess["size"]
    size = int(size if isinstance(size, int) else max(size))
    if epochs > 1 and cache_fits(len(records), size, cache_mb << 20):
        dataset = CachedQuads(dataset)
    return dataset


def epoch_order(n: int, ctx: distributed.Context, *, seed: int, epoch: int) -> list[int]:
    """This rank's sample order for ``epoch``: a DistributedSampler shard (same on every run)."""
    sampler = DistributedSampler(range(n), num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    return list(sampler)


def steps_per_epoch(records: int, world_size: int, batch_size: int) -> int:
    """Full batches per rank and epoch; a :class:`DataError` when the split has fewer than one."""
    steps = records // world_size // batch_size
    if steps < 1:
        raise DataError(
            f"the train split has {records} quadruplets: fewer than one batch of {batch_size} per process; lower --batch-size"
        )
    return steps


def _worker_init(_: int) -> None:
    # Ctrl-C reaches the whole process group; workers leave it to the main process, which saves a checkpoint.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def epoch_batches(
    dataset: Dataset, tokenizer, ctx: distributed.Context, *, batch_size: int, seed: int, epoch: int, start_step: int,
    workers: int,
) -> Iterator[Batch]:
    """This rank's full batches of ``epoch``, from optimizer step ``start_step`` of the epoch on."""
    order = epoch_order(len(dataset), ctx, seed=seed, epoch=epoch)[start_step * batch_size :]
    workers = 0 if isinstance(dataset, CachedQuads) else workers  # nothing left to decode
    loader = DataLoader(
        dataset, batch_size=batch_size, sampler=order, drop_last=True, num_workers=workers,
        collate_fn=Collate(tokenizer, len(dataset)), pin_memory=ctx.device.type == "cuda",
        worker_init_fn=_worker_init if workers else None, persistent_workers=False,
    )
    return iter(loader)
