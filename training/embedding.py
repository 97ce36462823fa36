"""One embedding with its safety report: shared by ``safe-retrieval embed`` and the service."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training import traversal
from training.artifact import Artifact
from training.errors import InputError
from training.images import open_image


def embed_one(
    art: Artifact,
    *,
    text: str | None = None,
    image: str | Path | None = None,
    traverse: bool = False,
    target: str = "image",
) -> dict[str, Any]:
    """Embed a text or an image file and report distance to origin, the unsafe rule and traversal."""
    enc = art.encoder
    if text is not None:
        vec, modality = enc.encode_text([text]), "text"
    else:
        vec, modality = enc.encode_image([open_image(image)]), "image"
    out: dict[str, Any] = {
        "geometry": art.geometry,
        "curvature": art.curvature if art.geometry == "lorentz" else None,
        "modality": modality,
        "vector": vec[0].tolist(),
        "distance_to_origin": None,
        "unsafe": None,
        "traversal": None,
    }
    if art.geometry != "lorentz":
        if traverse:
            raise InputError("traversal needs a lorentz (hyperbolic) model; this artifact is euclidean")
        return out
    d0 = enc.dist0(vec)
    threshold = art.unsafe_threshold(modality)
    flag = traversal.is_unsafe(d0, threshold)
    out["distance_to_origin"] = float(d0[0])
    out["unsafe"] = None if flag is None else bool(flag[0])
    if traverse:
        if target not in traversal.SAFE_CLASS:
            raise InputError(f"--target must be image or text, not {target!r}")
        moved = traversal.traverse(vec, art.curvature, art.bounds, target=target, threshold=threshold)
        out["traversal"] = {"method": "geodesic", "target": target, **moved.report(0), "vector": moved.vectors[0].tolist()}
    return out
