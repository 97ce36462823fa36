"""The service's one settings object: every option from the command line or ``SAFE_RETRIEVAL_*`` variables.

``safe-retrieval serve --model DIR`` and ``SAFE_RETRIEVAL_MODEL=DIR safe-retrieval serve`` are the same
thing; command-line values win over the environment. List values (``DATA_ROOTS``, ``CORS_ORIGINS``) are
JSON arrays in the environment, e.g. ``SAFE_RETRIEVAL_DATA_ROOTS='["/data"]'``; ``MODERATOR_TOKENS`` is a
JSON object, ``'{"alice": "...", "bob": "..."}'``.

Moderator tokens are checked when the settings are made, so a malformed tokens file stops the server at
start-up with a message naming the file and line (never a token).
"""

from __future__ import annotations

import ipaddress
import json
import re
import stat
from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from training.errors import InputError

TOKEN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
LEGACY_MODERATOR = "moderator"  # the name the single SAFE_RETRIEVAL_MODERATOR_TOKEN is audited under


class Settings(BaseSettings):
    """Everything the service can be told. Field docs double as the README's option table."""

    model_config = SettingsConfigDict(env_prefix="SAFE_RETRIEVAL_", extra="ignore", validate_default=True)

    # --- what is served
    model: Path | None = Field(None, description="Artifact directory of the encoder to serve.")
    index: str = Field("gallery", description="Name of the index to search (its current generation is served).")
    index_root: Path = Field(Path("runs/indexes"), description="Directory of the embedded (Qdrant Edge) store.")
    qdrant_url: str | None = Field(None, description="Qdrant server URL; when set, used instead of the embedded store.")
    qdrant_api_key: SecretStr | None = Field(None, description="API key of the Qdrant server.")
    media_root: Path | None = Field(None, description="Root that indexed image URIs are relative to (served by /v1/media).")
    near_duplicate_distance: float | None = Field(
        None, ge=0, allow_inf_nan=False,
        description="Refuse an uploaded image (409) whose embedding lies within this distance of a taken-down image's "
        "under the served model (geodesic for a lorentz model, 1 - cosine for a euclidean one). Calibrate it for your "
        "model and gallery with benchmarks/near_duplicates.py; unset: only exact copies are refused.",
    )
    upload_dir: Path | None = Field(
        None, description="Where images added through POST /v1/items are stored, content-addressed (default "
        "MEDIA_ROOT/uploads); it must lie under MEDIA_ROOT, so that /v1/media serves them.",
    )
    index_storage: Literal["compact", "fast"] | None = Field(
        None, description="The storage mode the served index must have been built with (index build --storage): a "
        "generation built otherwise is not served, and the admin jobs build with it. Unset: any mode, and jobs keep "
        "the current generation's.",
    )
    device: str = Field("cpu", description="Device for query encoding: cpu, cuda, cuda:1, auto.")

    # --- HTTP
    host: str = Field("127.0.0.1", description="Interface to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="Largest accepted request body (413 above).")
    max_image_pixels: int = Field(40_000_000, ge=1, description="Decompression-bomb guard for query images (400 above).")
    max_image_aspect: float = Field(
        50.0, ge=1, le=10_000,
        description="Longest accepted side ratio of query images (400 above): preprocessing resizes the short side.",
    )
    image_memory_budget_bytes: int = Field(
        1024**3, ge=1,
        description="Memory that the decodes of query images in flight may take together, estimated from each "
        "image's header before decoding (503 with Retry-After when full; 400 for an image over it alone). Must hold "
        "one image of MAX_IMAGE_PIXELS at MAX_IMAGE_ASPECT.",
    )
    image_admission_wait_s: float = Field(
        1.0, ge=0, le=60, description="Longest a query image waits for room in the image memory budget before its 503.",
    )
    cors_origins: list[str] = Field(default_factory=list, description="Origins allowed by CORS (none by default).")
    access_log: bool = Field(False, description="Log every request line (costs CPU under load; /metrics counts requests).")
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="Addresses or networks (CIDR) of reverse proxies whose X-Forwarded-For/-Proto headers are believed; "
        "none by default: the client address (the one the audit log records) is the connection's peer.",
    )

    # --- access
    admin_token: SecretStr | None = Field(None, description="Bearer token of the /v1/admin routes (they answer 403 when unset).")
    moderator_token: SecretStr | None = Field(
        None, description="Bearer token that may ask for safety=off and receive items flagged unsafe (audited as \"moderator\")."
    )
    moderator_tokens: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="Named moderator tokens, a JSON object name -> token; the name is what the audit log records.",
    )
    moderator_tokens_file: Path | None = Field(
        None,
        description="File of named moderator tokens: one `name:token` per line (# comments) or a JSON object; "
        "not readable by others.",
    )

    # --- query encoding
    batch_max_size: int = Field(32, ge=1, le=1024, description="Most queries encoded in one forward pass.")
    batch_max_wait_ms: float = Field(2.0, ge=0, le=1000, description="Longest a query waits for others to join its batch.")
    cache_size: int = Field(4096, ge=0, description="Query embeddings kept in the LRU cache (0 turns it off).")
    inference_dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="Precision of the encoder's forward pass (see benchmarks/RESULTS.md before changing)."
    )
    torch_threads: int | None = Field(None, ge=1, description="Intra-op threads of the inference thread (default: torch's).")

    # --- store
    store_retry_s: float = Field(5.0, gt=0, description="Seconds between reconnection attempts while the store is down.")

    # --- admin jobs
    state_dir: Path = Field(Path("runs/service"), description="Where job records, logs and retrained models are kept.")
    data_roots: list[Path] = Field(
        default_factory=list, description="Directories that paths in admin job requests must lie under."
    )
    job_cancel_grace_s: float = Field(10.0, ge=0, description="Seconds a cancelled job gets to stop before SIGKILL.")
    job_max_file_bytes: int = Field(
        64 * 1024**2, ge=1,
        description="Largest image file a reindex job reads (index build --max-file-bytes): larger files are the "
        "job's recorded failures, refused from their size before they are read.",
    )
    retrain_max_recall_drop: float = Field(
        5.0, ge=0, le=100, allow_inf_nan=False,
        description="Percentage points (0 to 100) by which a retrain's new model may score a lower T->V R@1 than the "
        "served model on the test split of its data before the job fails and nothing is swapped (a request's "
        "`max_recall_drop` overrides it).",
    )
    run_jobs: bool = Field(
        True, description="Run admin jobs and write the served-pair record. False on extra replicas that share the "
        "state volume: they write nothing there and follow the index to each generation the job runner switches to."
    )

    # --- audit trail of privileged requests (AUDIT_DIR/audit.jsonl)
    audit_dir: Path | None = Field(
        None, description="Directory of the audit log (default STATE_DIR/audit); one per replica that serves moderators.",
    )
    audit_max_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="Size at which the audit log is rotated.")
    audit_keep: int = Field(10, ge=1, le=1000, description="Rotated audit files kept (the oldest is deleted beyond).")

    _moderators: dict[str, str] = PrivateAttr(default_factory=dict)

    @field_validator("trusted_proxies")
    @classmethod
    def _proxy_addresses(cls, value: list[str]) -> list[str]:
        # uvicorn silently ignores an entry it cannot parse: refuse it here, and write networks as it parses them
        out = []
        for entry in value:
            try:
                out.append(str(ipaddress.ip_network(entry.strip(), strict=False)) if "/" in entry
                           else str(ipaddress.ip_address(entry.strip())))
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or network; give addresses such as 10.0.0.5 or "
                                 "networks such as 10.0.0.0/24 (host names are not resolved)") from None
        return out

    @model_validator(mode="after")
    def _image_budget_holds_one_image(self) -> "Settings":
        # a budget below one accepted image would refuse it with "downscale it" although the limits allow it
        from training.images import MAX_INPUT_SIDE, max_decoding_cost

        need = max_decoding_cost(self.max_image_pixels, self.max_image_aspect)
        if self.image_memory_budget_bytes < need:
            raise InputError(
                f"SAFE_RETRIEVAL_IMAGE_MEMORY_BUDGET_BYTES={self.image_memory_budget_bytes} cannot hold one image of "
                f"SAFE_RETRIEVAL_MAX_IMAGE_PIXELS={self.max_image_pixels} at aspect {self.max_image_aspect:g} (decoding "
                f"it may take {need} bytes, {-(-need // 2**20)} MiB, for a model input of up to {MAX_INPUT_SIDE} px); "
                f"raise the budget to at least {need} or lower MAX_IMAGE_PIXELS")
        return self

    @model_validator(mode="after")
    def _uploads_under_media_root(self) -> "Settings":
        if self.upload_dir is not None:
            if self.media_root is None:
                raise InputError("SAFE_RETRIEVAL_UPLOAD_DIR is set without SAFE_RETRIEVAL_MEDIA_ROOT; uploaded images are "
                                 "served from the media root, so set it too (the upload folder must lie under it)")
            if not self.upload_dir.resolve().is_relative_to(self.media_root.resolve()):
                raise InputError(f"SAFE_RETRIEVAL_UPLOAD_DIR ({self.upload_dir}) is not under SAFE_RETRIEVAL_MEDIA_ROOT "
                                 f"({self.media_root}); uploaded images could not be served: put it under the media root")
        return self

    def uploads(self) -> Path | None:
        """Where uploaded images go: ``UPLOAD_DIR``, else ``MEDIA_ROOT/uploads``; None without a media root."""
        if self.upload_dir is not None:
            return self.upload_dir
        return self.media_root / "uploads" if self.media_root is not None else None

    @model_validator(mode="after")
    def _collect_moderators(self) -> "Settings":
        tokens: dict[str, str] = {}
        admin = self.token("admin")

        def add(name: str, token: str, where: str) -> None:
            # messages name the setting and the name, never a token
            if not TOKEN_NAME.match(name):
                raise InputError(f"moderator name {name!r} in {where} is not valid: use letters, digits and _.@- "
                                 "(at most 64, starting with a letter or digit)")
            if name in tokens:
                raise InputError(f"moderator name {name!r} is given twice ({where}); each moderator needs one name")
            if not token or any(c.isspace() for c in token):
                raise InputError(f"the token of moderator {name!r} in {where} is empty or contains spaces")
            if token in tokens.values() or token == admin:
                raise InputError(f"the token of moderator {name!r} in {where} is already used by another moderator "
                                 "or the admin; give every name its own token so the audit log can tell them apart")
            tokens[name] = token

        legacy = self.token("moderator")
        if legacy is not None:
            add(LEGACY_MODERATOR, legacy, "SAFE_RETRIEVAL_MODERATOR_TOKEN")
        for name, secret in self.moderator_tokens.items():
            add(name, secret.get_secret_value(), "SAFE_RETRIEVAL_MODERATOR_TOKENS")
        if self.moderator_tokens_file is not None:
            for name, token, where in read_tokens_file(self.moderator_tokens_file):
                add(name, token, where)
        self._moderators = tokens
        return self

    def token(self, role: Literal["admin", "moderator"]) -> str | None:
        """The configured token of ``role`` as plain text, or None when unset or empty."""
        secret = self.admin_token if role == "admin" else self.moderator_token
        value = secret.get_secret_value() if secret is not None else ""
        return value or None

    def qdrant_key(self) -> str | None:
        """The Qdrant server's API key as plain text, or None when unset or empty."""
        value = self.qdrant_api_key.get_secret_value() if self.qdrant_api_key is not None else ""
        return value or None

    def moderators(self) -> dict[str, str]:
        """Every moderator token by name: the single setting (as ``moderator``), the JSON object and the file."""
        return dict(self._moderators)


def read_tokens_file(path: Path) -> list[tuple[str, str, str]]:
    """``(name, token, where)`` of each entry of a moderator tokens file; InputError says what is wrong and where.

    The file is refused when another user may read or write it: a token file anyone can edit lets anyone
    become a moderator, and one anyone can read gives the tokens away (:func:`check_private`).
    """
    variable = "SAFE_RETRIEVAL_MODERATOR_TOKENS_FILE"
    try:
        info = path.stat()
        mode, owner = info.st_mode, info.st_uid
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read the moderator tokens file {path} ({variable}): {e}") from None
    check_private(path, mode, owner, variable)
    if text.lstrip().startswith("{"):
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"the moderator tokens file {path} is not valid JSON (line {e.lineno}): {e.msg}") from None
        if not all(isinstance(v, str) for v in entries.values()):
            raise InputError(f"the moderator tokens file {path} must map names to token strings")
        found = [(name, token, f"{path}") for name, token in entries.items()]
    else:
        found = _token_lines(text, path)
    if not found:
        raise InputError(f"the moderator tokens file {path} ({variable}) holds no tokens; add 'name:token' lines")
    return found


def check_private(path: Path, mode: int, owner: int, variable: str) -> None:
    """Refuse a secret file that a user other than its owner may write, or read.

    Writing by the group or by others, and reading by others, are always refused. Reading by the group
    is accepted only for a file owned by root (as PostgreSQL accepts a root-owned key of mode 0640):
    that is how a secret is handed to a service account through its group (a Kubernetes secret
    mounted with ``defaultMode: 0440`` and ``fsGroup``); a file the service owns has no reason to let
    its group read it.
    """
    loose = mode & (stat.S_IWGRP | stat.S_IROTH | stat.S_IWOTH | (stat.S_IRGRP if owner != 0 else 0))
    if loose:
        who = [w for bit, w in ((stat.S_IRGRP | stat.S_IWGRP, "its group"), (stat.S_IROTH | stat.S_IWOTH, "every user"))
               if loose & bit]
        raise InputError(f"the secret file {path} ({variable}) has mode {stat.S_IMODE(mode):04o}, so "
                         f"{' and '.join(who)} may read or write it; run 'chmod 0600 {path}' (or 0640 on a file "
                         "owned by root, as a Kubernetes secret with defaultMode 0440 and fsGroup is)")


def _token_lines(text: str, path: Path) -> list[tuple[str, str, str]]:
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, token = line.partition(":")
        if not sep:
            raise InputError(f"line {number} of the moderator tokens file {path} is not 'name:token'")
        found.append((name.strip(), token.strip(), f"{path} line {number}"))
    return found
