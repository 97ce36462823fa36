"""The service's one settings object: every option from the command line or ``SAFE_RETRIEVAL_*`` variables.

``safe-retrieval serve --model DIR`` and ``SAFE_RETRIEVAL_MODEL=DIR safe-retrieval serve`` are the same
thing; command-line values win over the environment. List values (``DATA_ROOTS``, ``CORS_ORIGINS``) are
JSON arrays in the environment, e.g. ``SAFE_RETRIEVAL_DATA_ROOTS='["/data"]'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


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
    device: str = Field("cpu", description="Device for query encoding: cpu, cuda, cuda:1, auto.")

    # --- HTTP
    host: str = Field("127.0.0.1", description="Interface to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="Largest accepted request body (413 above).")
    max_image_pixels: int = Field(40_000_000, ge=1, description="Decompression-bomb guard for query images (400 above).")
    cors_origins: list[str] = Field(default_factory=list, description="Origins allowed by CORS (none by default).")
    access_log: bool = Field(False, description="Log every request line (costs CPU under load; /metrics counts requests).")

    # --- access
    admin_token: SecretStr | None = Field(None, description="Bearer token of the /v1/admin routes (they answer 403 when unset).")
    moderator_token: SecretStr | None = Field(
        None, description="Bearer token that may ask for safety=off and receive items flagged unsafe."
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
    run_jobs: bool = Field(
        True, description="Run admin jobs and write the served-pair record. False on extra replicas that share the "
        "state volume: they write nothing there and follow the index to each generation the job runner switches to."
    )

    def token(self, role: Literal["admin", "moderator"]) -> str | None:
        """The configured token of ``role`` as plain text, or None when unset or empty."""
        secret = self.admin_token if role == "admin" else self.moderator_token
        value = secret.get_secret_value() if secret is not None else ""
        return value or None
