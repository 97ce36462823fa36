"""Request and response models of the HTTP API, shared by the routes, the OpenAPI document and the tests.

Every request model forbids unknown fields, so a typo (``"safty": "off"``) is a 422 instead of a
silently ignored option. Integer fields are strict everywhere: a JSON body takes integer literals only
(``"k": 67.0`` and ``"k": "5"`` are 422s), a form field digits only (``k=67.0`` is a 422). JSON Schema
counts ``67.0`` as an integer and has no way to say otherwise, so each such field's description says it
(:func:`integer`). The "exactly one of" rules are also stated in the schema (``oneOf``), so that the OpenAPI document
describes what the server accepts.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, field_validator, model_validator

from training.methods import FORGET_REQUESTS

MAX_TEXT_CHARS = 1000  # a query, not a document: CLIP reads at most 77 tokens anyway
MAX_K_PER_REQUEST = 100  # the most results one HTTP search returns (indexer.search allows more)
MAX_OFFSET = 10_000  # deeper paging gets slow and is not what a search page needs
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"

Safety = Literal["strict", "traverse", "filter", "off"]
Target = Literal["image", "text", "any"]
Tag = Annotated[str, StringConstraints(min_length=1, max_length=100)]
ItemId = Annotated[str, StringConstraints(min_length=1, max_length=128)]
QueryText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT_CHARS)]
# "format": "path" tells schema readers (and the fuzz tests' path generator) what the string names
PathText = Annotated[str, StringConstraints(min_length=1, max_length=4096), Field(json_schema_extra={"format": "path"})]


INTEGER_NOTE = "An integer literal: 58, not 58.0 or \"58\"."
_INTEGER_TEXT = re.compile(r"^[+-]?[0-9]{1,18}$")


def _say_strict(schema: dict[str, Any]) -> None:
    schema["description"] = f"{schema.get('description', '')} {INTEGER_NOTE}".strip()


def integer(default: Any, **constraints: Any) -> Any:
    """A strict integer field of a JSON body (no floats, strings or booleans), documented as such."""
    return Field(default, strict=True, json_schema_extra=_say_strict, **constraints)


def _integer_text(value: Any) -> Any:
    if isinstance(value, str) and not _INTEGER_TEXT.match(value):
        raise ValueError(f"must be an integer written in digits (like 10, not 10.0); {INTEGER_NOTE}")
    return value


#: An integer given as text (a form field, a query parameter): digits only, so "67.0" is a 422 there as in JSON.
IntText = Annotated[int, BeforeValidator(_integer_text)]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


def exactly_one(among: tuple[str, ...], *choices: tuple[str, ...]) -> dict[str, Any]:
    """JSON Schema of "exactly one choice is given": its fields not null, the other fields of ``among`` absent or null.

    The branches exclude each other, so ``oneOf`` holds exactly when the model's own validator does.
    """
    return {"oneOf": [
        {"required": list(chosen),
         "properties": {name: {"not": {"type": "null"}} if name in chosen else {"type": "null"} for name in among}}
        for chosen in choices
    ]}


def _not_blank(value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise ValueError("must contain a non-space character")
    return value


# ------------------------------------------------------------------ search
class SearchFilter(StrictModel):
    tags: list[Tag] | None = Field(None, max_length=32, description="Keep only items carrying at least one of these tags.")


class SearchOptions(StrictModel):
    target: Target = Field("image", description="What to search: images, captions, or both.")
    k: int = integer(10, ge=1, le=MAX_K_PER_REQUEST, description="Number of results.")
    offset: int = integer(0, ge=0, le=MAX_OFFSET, description="Results to skip (paging).")
    safety: Safety = Field(
        "strict",
        description="strict: traverse unsafe queries and drop unsafe items; traverse: only move the query; "
        "filter: only drop unsafe items; off: plain nearest neighbours (moderator token required).",
    )
    filter: SearchFilter | None = None


class SearchRequest(SearchOptions):
    """Exactly one of ``text``, ``image`` (base64) or ``item_id`` (more like this item)."""

    model_config = ConfigDict(json_schema_extra=exactly_one(("text", "image", "item_id"), ("text",), ("image",), ("item_id",)))
    text: QueryText | None = None
    image: str | None = Field(None, description="Base64 image bytes (a data: URI prefix is accepted).")
    item_id: ItemId | None = None

    _blank = field_validator("text")(_not_blank)

    @model_validator(mode="after")
    def _one_query(self) -> "SearchRequest":
        given = [name for name in ("text", "image", "item_id") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of text, image or item_id (got {', '.join(given) or 'none'})")
        return self


class Result(BaseModel):
    id: str
    kind: str
    score: float
    distance: float
    uri: str | None = None
    caption: str | None = None
    tags: list[str] = []
    unsafe: bool | None = None


class QueryReport(BaseModel):
    model_config = ConfigDict(from_attributes=True)  # built from indexer.search.QueryReport, a dataclass
    unsafe: bool | None = Field(None, description="The model's rule: distance to the origin above the threshold.")
    distance_to_origin: float | None = None
    threshold: float | None = None
    redirected: bool = Field(False, description="True when the query was moved toward safe content.")
    distance_to_origin_after: float | None = None


class IndexRef(BaseModel):
    name: str
    generation: str | None = None
    model: str = Field(description="Fingerprint of the model the index was built with (and that encodes queries).")


class Timings(BaseModel):
    encode: float
    search: float
    total: float


class SearchResponse(BaseModel):
    results: list[Result]
    query: QueryReport
    index: IndexRef
    timings_ms: Timings


# ------------------------------------------------------------------ embed / items
class EmbedRequest(StrictModel):
    """Exactly one of ``text`` or ``image`` (base64)."""

    model_config = ConfigDict(json_schema_extra=exactly_one(("text", "image"), ("text",), ("image",)))
    text: QueryText | None = None
    image: str | None = Field(None, description="Base64 image bytes.")

    _blank = field_validator("text")(_not_blank)

    @model_validator(mode="after")
    def _one_input(self) -> "EmbedRequest":
        if (self.text is None) == (self.image is None):
            raise ValueError("give exactly one of text or image")
        return self


class EmbedResponse(BaseModel):
    geometry: str
    curvature: float | None
    vector: list[float]
    distance_to_origin: float | None
    unsafe: bool | None


class Item(BaseModel):
    id: str
    kind: str
    uri: str | None = None
    caption: str | None = None
    tags: list[str] = []
    unsafe: bool | None = None
    payload: dict[str, Any] = {}
    vector: list[float] | None = None


# ------------------------------------------------------------------ items written through the API
MAX_REASON_CHARS = 1000
Caption = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT_CHARS)]
ALLOW_NEAR_DUPLICATE = ("Add the image even though it lies within NEAR_DUPLICATE_DISTANCE of a taken-down image (the "
                        "admin looked and it is not that content); the audit record names the near item. The exact "
                        "taken-down content is refused all the same.")


class ItemAdd(StrictModel):
    """Exactly one of ``path`` (an image file under the data roots, copied into the managed uploads folder) or
    ``text`` (a text item); ``caption`` and ``tags`` go with an image."""

    model_config = ConfigDict(json_schema_extra=exactly_one(("path", "text"), ("path",), ("text",)))
    path: PathText | None = Field(None, description="An image file under the data roots.")
    text: QueryText | None = Field(None, description="A text item.")
    caption: Caption | None = Field(None, description="The image's caption (image items only).")
    tags: list[Tag] = Field(default_factory=list, max_length=32)
    allow_near_duplicate: bool = Field(False, description=f"{ALLOW_NEAR_DUPLICATE} Image items only.")

    _blank = field_validator("text", "caption")(_not_blank)

    @model_validator(mode="after")
    def _one_item(self) -> "ItemAdd":
        given = [name for name in ("path", "text") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of path or text (got {', '.join(given) or 'none'})")
        if self.text is not None and self.caption is not None:
            raise ValueError("a text item has no caption: its text is what is indexed")
        if self.text is not None and self.allow_near_duplicate:
            raise ValueError("a text item is never refused as a near-duplicate: allow_near_duplicate goes with a path")
        return self


class ItemWritten(BaseModel):
    """An item added (201) or found already there (200: the same content, so the same id)."""

    id: str
    kind: str
    created: bool
    uri: str | None = None
    caption: str | None = None
    tags: list[str] = []
    unsafe: bool | None = None
    index: dict[str, Any]
    near_duplicate_of: str | None = Field(None, description="With allow_near_duplicate: the taken-down item this image "
                                          "lies within NEAR_DUPLICATE_DISTANCE of (null when none).")
    near_duplicate_distance: float | None = Field(None, description="Its distance (null when none).")


class TakedownRequest(StrictModel):
    reason: str = Field(..., min_length=1, max_length=MAX_REASON_CHARS,
                        description=f"Why the item is taken down (at most {MAX_REASON_CHARS} characters): the audit "
                                    "record and the takedown list keep it.")

    _blank = field_validator("reason")(_not_blank)


class Takedown(BaseModel):
    """A takedown as the takedown list holds it; ``already``: the id was taken down before (this request changed
    nothing, the first record stands)."""

    id: str
    reason: str
    by: str
    at: str
    purged: bool
    already: bool


# ------------------------------------------------------------------ health
class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Footprint(BaseModel):
    """What the served index costs this machine: its storage mode, disk, and the process's memory."""

    storage: str = Field(description="compact (one byte per dimension in memory, the exact vectors on disk) or fast.")
    points: int | None = None
    disk_bytes: int | None = Field(None, description="On disk (embedded store); null on a Qdrant server.")
    memory_anonymous_bytes: int | None = Field(None, description="Anonymous resident memory of this process.")
    memory_resident_bytes: int | None = Field(None, description="All resident memory of this process, mapped files included.")


class Readiness(BaseModel):
    ready: bool
    reason: str | None = None
    index: IndexRef | None = None
    store: Footprint | None = None


# ------------------------------------------------------------------ admin
class IndexSource(StrictModel):
    """What to index: exactly one of ``images``, ``manifest`` or ``visu`` (+ ``split``); paths under the data roots."""

    model_config = ConfigDict(json_schema_extra=exactly_one(("images", "manifest", "visu", "split"),
                                                            ("images",), ("manifest",), ("visu", "split")))

    images: PathText | None = Field(None, description="A folder of images (searched recursively).")
    manifest: PathText | None = Field(None, description="A CSV/JSONL/Parquet manifest with an image column.")
    visu: PathText | None = Field(None, description="A ViSU-layout dataset (real or synthetic).")
    split: Literal["train", "validation", "test", "heldout"] | None = Field(None, description="Split of a ViSU dataset.")
    captions: bool = Field(False, description="Also index each image's caption as a text point (image->text search).")
    texts: PathText | None = Field(None, description="A UTF-8 file of texts (one per line) to index as text points.")
    media_root: PathText | None = Field(None, description="Root that stored image URIs are made relative to.")

    @model_validator(mode="after")
    def _one_source(self) -> "IndexSource":
        given = [name for name in ("images", "manifest", "visu") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of images, manifest or visu (got {', '.join(given) or 'none'})")
        if (self.split is not None) != (self.visu is not None):
            raise ValueError("split goes with visu, and visu needs a split")
        return self


class ReindexRequest(StrictModel):
    source: IndexSource
    name: Annotated[str, StringConstraints(pattern=NAME_PATTERN)] | None = Field(
        None, description="Index to build (default: the served one, which is swapped in when the build succeeds)."
    )
    incremental: bool = Field(False, description="Add to the current generation instead of building a new one.")


def points(default: float | None, description: str) -> Any:
    """A threshold in percentage points, 0 to 100 (a NaN or infinity is refused too)."""
    return Field(default, ge=0, le=100, allow_inf_nan=False,
                 description=f"{description} Percentage points, from 0 to 100.")


class RetrainRequest(StrictModel):
    method: Literal["hysac", "safeclip", "clip"] = "hysac"
    data: PathText = Field(description="ViSU-layout dataset to train on.")
    preset: Literal["demo"] | None = None
    epochs: int | None = integer(None, ge=1, le=1000)
    batch_size: int | None = integer(None, ge=1, le=65536)
    lr: float | None = Field(None, gt=0, le=1)
    lora_rank: int | None = integer(None, ge=1, le=1024)
    full_finetune: bool = False
    eta: float | None = Field(None, ge=0, le=100)
    precision: Literal["fp32", "bf16"] | None = None
    seed: int | None = integer(None, ge=0, le=2**31 - 1)
    max_steps: int | None = integer(None, ge=1, le=10_000_000, description="Stop after this many optimizer steps.")
    reindex: bool = Field(True, description="Rebuild the served index with the new model, then swap both together.")
    source: IndexSource | None = Field(None, description="What to reindex (default: the source of the last reindex).")
    max_recall_drop: float | None = points(
        None, "The most T->V R@1 (safe caption -> safe image, recall at 1, in %) may fall from the served model's to the "
        "new model's, both evaluated on the test split of `data`, in percentage points; a bigger fall fails the job and "
        "nothing is swapped. Default: the server's SAFE_RETRIEVAL_RETRAIN_MAX_RECALL_DROP (5 unless set).")
    force: bool = Field(False, description="Swap the new model in even when it misses `max_recall_drop` (the job's "
                        "result and the audit log record that it was forced).")


#: a concept or tag to forget: no comma (the CLI's separator), at least one visible character
CONCEPT_PATTERN = r"^[^,\x00-\x1f]*[^,\s\x00-\x1f][^,\x00-\x1f]*$"
ConceptName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=CONCEPT_PATTERN)]
#: the forget methods of ``training.methods`` (an enum in the OpenAPI document)
ForgetMethod = Literal[FORGET_REQUESTS]  # type: ignore[valid-type]
#: a named weight of a forget method (``alpha``, ``lambda2``, ...) or an option's name or value
MethodWord = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.+-]+$")]


#: ForgetRequest.erase's default: off while the eraser misses its bars on the demo data (a linear probe still reads
#: the concept at about 60 % where the bar is 55, and the other concepts lose more than 2 points; benchmarks/RESULTS.md,
#: "The eraser"), and because it needs as many images of a concept as the features have dimensions
ERASE_BY_DEFAULT = False


class ForgetRequest(StrictModel):
    """Unlearn concepts from the served model, evaluate before/after, and (``reindex``) swap model and index."""

    concepts: list[ConceptName] = Field(
        min_length=1, max_length=32,
        description="Concept names or tags of the training data (a tag stands for all its concepts), e.g. [\"knife\"].",
    )
    method: ForgetMethod = Field("cliperase", description="Unlearning method; hac needs a lorentz (hyperbolic) model; "
                                 "erase: the closed-form concept eraser alone (no training; no preset, epochs, lr, "
                                 "max_steps, weights or options).")
    erase: bool = Field(ERASE_BY_DEFAULT, description="After the method, also fit the closed-form concept eraser (LEACE) on "
                        "the new model's image features and fold it into the encoder, so the concept leaves what the "
                        "index stores, not only what a text query reaches (benchmarks/RESULTS.md, 'the eraser').")
    data: PathText | None = Field(
        None, description="ViSU-layout dataset whose pairs showing the concepts are forgotten, the others retained "
        "(default: the served model's training data, from its provenance, when it lies under the data roots).")
    preset: Literal["demo"] | None = None
    epochs: int | None = integer(None, ge=1, le=1000)
    lr: float | None = Field(None, gt=0, le=1)
    seed: int | None = integer(None, ge=0, le=2**31 - 1)
    max_steps: int | None = integer(None, ge=1, le=10_000_000, description="Stop after this many optimizer steps.")
    weights: dict[MethodWord, float] | None = Field(
        None, max_length=16, description="Named weights of the method's loss terms, e.g. {\"alpha\": 0.75, \"beta\": 0.5} for "
        "ac; the others keep their defaults (training.methods lists each method's weights). Non-negative; checked "
        "before the job starts (422 naming the method's weights).")
    options: dict[MethodWord, MethodWord] | None = Field(
        None, max_length=16, description="Options of the method, e.g. {\"alpha_gamma\": \"untied\"}; checked before the job "
        "starts (422 naming the method's options).")
    reindex: bool = Field(True, description="Rebuild the served index with the new model, then swap both together.")
    source: IndexSource | None = Field(None, description="What to reindex (default: the source of the last reindex).")
    min_forget_drop: float = points(
        50, "How far forget accuracy (zero-shot accuracy on the test images of the concepts, in %) must fall from the "
        "served model to the new one, in percentage points. Where the served model recognised less than this, the new "
        "model must recognise none of them (forget accuracy 0): the fall required is min(min_forget_drop, forget "
        "accuracy before).")
    max_retain_drop: float = points(
        10, "The most retain accuracy (zero-shot accuracy on the other concepts' test images, in %) may fall, in "
        "percentage points.")
    max_benign_drop: float = points(
        10, "The most accuracy on harmless look-alikes of the concepts (their safe counterparts) may fall, in "
        "percentage points.")
    force: bool = Field(False, description="Swap the new model in even when it misses a threshold or a figure could not "
                        "be measured (the job's `result.unlearning.acceptance` and the audit log record that it was forced).")


JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class Job(BaseModel):
    id: str
    kind: Literal["reindex", "retrain", "forget"]
    status: JobStatus
    progress: float = Field(0.0, ge=0, le=1)
    step: str | None = Field(None, description="The command now running.")
    log_tail: list[str] = []
    error: str | None = None
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    request: dict[str, Any] = {}
    result: dict[str, Any] = Field(
        {}, description="What the job's evaluation measured, kept whether the job succeeds or fails: a forget job's "
        "`unlearning` (the before/after table of its evaluation) and a retrain's `retrieval` (T->V R@1 before and "
        "after), each with its `acceptance` (thresholds, measured drops, passed per check, forced); on success also "
        "what was swapped in.")


class JobList(BaseModel):
    jobs: list[Job]


class Reload(BaseModel):
    changed: bool
    index: IndexRef


class AuditRecord(BaseModel):
    """One privileged request (see ``service.audit``)."""

    time: str = Field(description="UTC, ISO 8601 with microseconds.")
    token: str = Field(description="Name of the token used (`admin` for admin requests), never the token.")
    method: str | None = None
    route: str | None = Field(None, description="The route template, e.g. /v1/items/{item_id}.")
    status: int | None = Field(None, description="HTTP status of the response.")
    safety: str | None = None
    query: dict[str, Any] | None = Field(
        None, description="text, image_sha256 or item_id; a job request's body; for the commit of a job whose model "
        "missed its acceptance and was swapped in because its request said `force` (a record with no request: no "
        "method, route or status), `forced: true` and `misses`, the checks it missed.")
    unsafe_ids: list[str] = Field([], description="Ids of the items flagged unsafe that the response carried.")
    client: str | None = Field(None, description="The client's address.")
    job: str | None = None


class AuditPage(BaseModel):
    records: list[AuditRecord]
    truncated: bool = Field(description="Older matching records were left out: ask again with `until`.")
