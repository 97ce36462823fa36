"""One settings object: defaults, SAFE_RETRIEVAL_* variables, explicit values winning over them."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings


def test_environment_variables(monkeypatch):
    monkeypatch.setenv("SAFE_RETRIEVAL_MODEL", "/models/a")
    monkeypatch.setenv("SAFE_RETRIEVAL_PORT", "9001")
    monkeypatch.setenv("SAFE_RETRIEVAL_ADMIN_TOKEN", "s3cret")
    monkeypatch.setenv("SAFE_RETRIEVAL_DATA_ROOTS", '["/data", "/more"]')
    monkeypatch.setenv("SAFE_RETRIEVAL_BATCH_MAX_WAIT_MS", "4.5")
    s = Settings()
    assert s.model == Path("/models/a") and s.port == 9001 and s.batch_max_wait_ms == 4.5
    assert s.data_roots == [Path("/data"), Path("/more")]
    assert s.token("admin") == "s3cret" and s.token("moderator") is None
    assert "s3cret" not in repr(s)  # secrets never show up in logs
    assert Settings(port=8123).port == 8123  # explicit (command line) beats the environment


def test_defaults_and_validation(monkeypatch):
    for key in list(__import__("os").environ):
        if key.startswith("SAFE_RETRIEVAL_"):
            monkeypatch.delenv(key)
    s = Settings()
    assert (s.host, s.port, s.index, s.max_body_bytes) == ("127.0.0.1", 8000, "gallery", 10 * 1024 * 1024)
    assert Settings(admin_token="").token("admin") is None  # an empty token does not enable a role
    monkeypatch.setenv("SAFE_RETRIEVAL_PORT", "not-a-port")
    with pytest.raises(ValidationError):
        Settings()
