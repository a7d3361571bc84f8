"""API keys that cannot be empty (gateway/cli.py, gateway/config.py, gateway/api/middleware.py):
an empty or whitespace-only key from any source is a start-up error naming its source, and an
empty bearer token never passes, whatever the configured keys."""

from __future__ import annotations

import subprocess
import sys

import pytest
from starlette.testclient import TestClient

from gateway.api.app import build_app
from gateway.api.middleware import APIKeyMiddleware
from gateway.cli import build_parser, config_from_args
from gateway.config import Config
from test_api_app import FakeEngine, FakeMetrics


def _config(argv: list[str], environ: dict | None = None) -> Config:
    return config_from_args(build_parser().parse_args(["serve", *argv]), environ or {})


@pytest.mark.parametrize("argv,environ,names", [
    (["--api-key", ""], {}, "--api-key"),
    (["--api-key", "   "], {}, "--api-key"),
    (["--api-key", "good", "--api-key", "\t"], {}, "--api-key"),
    ([], {"GATEWAY_API_KEY": ""}, "GATEWAY_API_KEY"),
    ([], {"GATEWAY_API_KEY": "k1,,k2"}, "GATEWAY_API_KEY"),
    ([], {"GATEWAY_API_KEY": "k1, "}, "GATEWAY_API_KEY"),
])
def test_an_empty_key_is_a_start_up_error_naming_its_source(argv, environ, names):
    with pytest.raises(ValueError, match=names):
        _config(argv, environ)


def test_a_key_file_without_a_key_is_an_error(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("\n   \n\n")
    with pytest.raises(ValueError, match="--api-key-file"):
        _config(["--api-key-file", str(keys)])
    keys.write_text("\n  k-file  \n\n")   # blank lines around a key are only spacing
    assert _config(["--api-key-file", str(keys)]).api_keys == ["k-file"]


def test_config_and_middleware_refuse_empty_keys_from_python_too():
    with pytest.raises(ValueError, match="--api-key"):
        Config(api_keys=["k", " "])
    with pytest.raises(ValueError):
        APIKeyMiddleware(None, [""])


def test_gateway_serve_with_an_empty_api_key_exits_2_before_loading_anything():
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--api-key", ""],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--api-key must not be empty" in proc.stderr, proc.stderr


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer ", "Bearer    ", "bearer", "Bearer \t"])
def test_an_empty_or_missing_token_is_401(header):
    client = TestClient(build_app(FakeEngine(), _config(["--api-key", "sk-real"]), FakeMetrics()))
    headers = {} if header is None else {"Authorization": header}
    response = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=headers)
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    ok = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2},
                     headers={"Authorization": "Bearer sk-real"})
    assert ok.status_code == 200


def test_the_empty_token_is_refused_even_if_an_empty_key_slipped_past_the_checks():
    # Defence in depth: a digest list holding sha256(b"") must still not let `Bearer ` in.
    import hashlib
    middleware = APIKeyMiddleware(None, ["k"])
    middleware.digests.append(hashlib.sha256(b"").digest())
    assert not middleware.authorized({"headers": [(b"authorization", b"Bearer ")]})
    assert middleware.authorized({"headers": [(b"authorization", b"Bearer k")]})
