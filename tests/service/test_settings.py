"""One settings object: defaults, SAFE_RETRIEVAL_* variables, explicit values winning over them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings
from training.errors import InputError


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


# ------------------------------------------------------------------ moderator tokens
def _clean(monkeypatch):
    for key in list(__import__("os").environ):
        if key.startswith("SAFE_RETRIEVAL_"):
            monkeypatch.delenv(key)


def _token_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "moderators"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_named_moderator_tokens_from_the_environment_and_a_file(monkeypatch, tmp_path):
    _clean(monkeypatch)
    monkeypatch.setenv("SAFE_RETRIEVAL_MODERATOR_TOKEN", "legacy-token")
    monkeypatch.setenv("SAFE_RETRIEVAL_MODERATOR_TOKENS", '{"alice": "alice-token", "bob": "bob-token"}')
    lines = _token_file(tmp_path, "# the night shift\ncarol: carol-token\n\n dave:dave-token \n")
    monkeypatch.setenv("SAFE_RETRIEVAL_MODERATOR_TOKENS_FILE", str(lines))
    s = Settings()
    assert s.moderators() == {"moderator": "legacy-token", "alice": "alice-token", "bob": "bob-token",
                              "carol": "carol-token", "dave": "dave-token"}
    assert "alice-token" not in repr(s) and "carol-token" not in repr(s)
    as_json = _token_file(tmp_path, '{"erin": "erin-token"}', 0o400)
    assert Settings(moderator_tokens_file=as_json).moderators()["erin"] == "erin-token"
    monkeypatch.delenv("SAFE_RETRIEVAL_MODERATOR_TOKEN")
    monkeypatch.delenv("SAFE_RETRIEVAL_MODERATOR_TOKENS")
    monkeypatch.delenv("SAFE_RETRIEVAL_MODERATOR_TOKENS_FILE")
    assert Settings().moderators() == {}
    assert Settings(moderator_token="only").moderators() == {"moderator": "only"}  # the single setting still works


@pytest.mark.parametrize(
    "text, mode, words",
    [
        ("carol carol-token\n", 0o600, "line 1"),  # no colon
        ("ok:ok-token\n:nameless-token\n", 0o600, "not valid"),
        ("carol:\n", 0o600, "empty"),
        ("carol:two words\n", 0o600, "spaces"),
        ("carol:same-token\ndave:same-token\n", 0o600, "already used"),
        ("carol:c-token\ncarol:d-token\n", 0o600, "twice"),
        ("admin:admin-token\n", 0o600, "already used"),  # the admin's token is no moderator's
        ("moderator:x-token\n", 0o600, "twice"),  # the single setting's name is taken
        ('{"carol": "c-token",}', 0o600, "not valid JSON"),
        ('{"carol": 7}', 0o600, "token strings"),
        ("# only a comment\n", 0o600, "holds no tokens"),
        ("carol:carol-token\n", 0o644, "every user may read"),  # readable by every user
        ("carol:carol-token\n", 0o602, "every user may read or write"),  # writable by every user
        ("carol:carol-token\n", 0o620, "its group may read or write"),  # writable by the group
        ("carol:carol-token\n", 0o660, "its group may read or write"),
        ("carol:carol-token\n", 0o606, "every user"),
    ],
)
def test_a_malformed_tokens_file_stops_start_up_with_a_clear_message(monkeypatch, tmp_path, text, mode, words):
    _clean(monkeypatch)
    path = _token_file(tmp_path, text, mode)
    with pytest.raises(InputError, match=words) as caught:
        Settings(admin_token="admin-token", moderator_token="legacy-token", moderator_tokens_file=path)
    message = str(caught.value)
    assert str(path) in message or "moderator" in message
    for token in ("carol-token", "same-token", "c-token", "d-token", "admin-token", "x-token", "nameless-token"):
        assert token not in message  # names may appear in a start-up error, tokens never


def test_group_read_is_accepted_only_on_a_root_owned_tokens_file(monkeypatch, tmp_path):
    """A Kubernetes secret (root:fsGroup, 0440) is readable through the group; a file of the service's own is not."""
    _clean(monkeypatch)
    path = _token_file(tmp_path, "carol:carol-token\n", 0o640)
    if os.getuid() == 0:
        assert Settings(moderator_tokens_file=path).moderators() == {"carol": "carol-token"}
        os.chown(path, 4321, 4321)  # the same mode on a file that an ordinary user owns
    with pytest.raises(InputError, match="its group may read") as caught:
        Settings(moderator_tokens_file=path)
    assert "0640" in str(caught.value) and "chmod 0600" in str(caught.value)


def test_a_missing_tokens_file_and_bad_names_are_refused(monkeypatch, tmp_path):
    _clean(monkeypatch)
    with pytest.raises(InputError, match="cannot read"):
        Settings(moderator_tokens_file=tmp_path / "absent")
    with pytest.raises(InputError, match="not valid"):
        Settings(moderator_tokens={"has space": "t-token"})
    with pytest.raises(InputError, match="already used"):
        Settings(moderator_tokens={"a": "t-token", "b": "t-token"})


def test_qdrant_key_is_plain_text_or_none(monkeypatch):
    monkeypatch.delenv("SAFE_RETRIEVAL_QDRANT_API_KEY", raising=False)
    assert Settings().qdrant_key() is None
    assert Settings(qdrant_api_key="").qdrant_key() is None  # empty means unset, as for the tokens
    monkeypatch.setenv("SAFE_RETRIEVAL_QDRANT_API_KEY", "k3y")
    s = Settings()
    assert s.qdrant_key() == "k3y" and "k3y" not in repr(s)


def test_the_retrain_recall_margin_is_points_from_0_to_100(monkeypatch):
    _clean(monkeypatch)
    assert Settings().retrain_max_recall_drop == 5
    monkeypatch.setenv("SAFE_RETRIEVAL_RETRAIN_MAX_RECALL_DROP", "2.5")
    assert Settings().retrain_max_recall_drop == 2.5
    for bad in ("-1", "101", "nan", "lots"):
        monkeypatch.setenv("SAFE_RETRIEVAL_RETRAIN_MAX_RECALL_DROP", bad)
        with pytest.raises(ValidationError, match="retrain_max_recall_drop"):
            Settings()
