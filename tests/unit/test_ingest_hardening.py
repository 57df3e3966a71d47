"""``kafka_util.preflight`` against fake listeners on loopback: a TLS, SASL or protocol mismatch is reported in
seconds as a ConfigError naming the setting to fix (the real broker's cases are in tests/integration)."""

from __future__ import annotations

import dataclasses
import shutil
import socket
import ssl
import struct
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from stream import kafka_util
from stream.config import KafkaSettings
from stream.errors import ConfigError

Handler = Callable[[socket.socket], None]


def _listen(handler: Handler, tls: ssl.SSLContext | None = None) -> str:
    """Serve one connection with ``handler`` (over TLS with ``tls``) in a thread; the ``host:port``."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def run() -> None:
        with srv:
            conn, _ = srv.accept()
            conn.settimeout(5)
            try:
                if tls is not None:
                    conn = tls.wrap_socket(conn, server_side=True)
                handler(conn)
            except (OSError, ssl.SSLError):
                pass
            finally:
                conn.close()

    threading.Thread(target=run, daemon=True).start()
    return f"127.0.0.1:{port}"


def _recv(conn: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = conn.recv(n - len(out))
        if not chunk:
            raise ConnectionError("client went away")
        out += chunk
    return out


def _request(conn: socket.socket) -> tuple[int, int]:
    """Read one Kafka request; (api key, correlation id)."""
    (size,) = struct.unpack(">i", _recv(conn, 4))
    api, _version, corr = struct.unpack(">hhi", _recv(conn, size)[:8])
    return api, corr


def _reply(conn: socket.socket, corr: int, body: bytes) -> None:
    conn.sendall(struct.pack(">ii", len(body) + 4, corr) + body)


def _kafka(answers: dict[int, bytes]) -> Handler:
    """A fake broker: answers the API keys in ``answers`` (body after the correlation id), closes on others."""

    def handle(conn: socket.socket) -> None:
        while True:
            api, corr = _request(conn)
            if api not in answers:
                return
            _reply(conn, corr, answers[api])

    return handle


API_VERSIONS, METADATA, SASL_HANDSHAKE, SASL_AUTH = 18, 3, 17, 36
#: ApiVersions v0 answer: no error, then (api key, min, max) rows, as a Kafka 3.x broker lists them
OK_VERSIONS = struct.pack(">hi", 0, 4) + b"".join(
    struct.pack(">hhh", *row) for row in [(3, 0, 12), (17, 0, 1), (18, 0, 3), (36, 0, 2)]
)
OK_METADATA = struct.pack(">ii", 0, 0)


def _settings(bootstrap: str, **kw: str) -> KafkaSettings:
    return KafkaSettings(bootstrap=bootstrap, **kw)  # type: ignore[arg-type]


def test_a_plain_broker_passes() -> None:
    kafka_util.preflight(_settings(_listen(_kafka({API_VERSIONS: OK_VERSIONS, METADATA: OK_METADATA}))))


def test_plaintext_to_a_sasl_listener_names_the_security_protocol() -> None:
    server = _listen(_kafka({API_VERSIONS: OK_VERSIONS}))  # a SASL listener drops anything else before auth
    with pytest.raises(ConfigError, match="expects SASL: set ZEROCF_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT"):
        kafka_util.preflight(_settings(server))


def _sasl_broker(auth_error: int) -> str:
    mechs = struct.pack(">hih", 0, 1, 5) + b"PLAIN"
    auth = struct.pack(">hh", auth_error, 3) + b"bad" + struct.pack(">i", 0)
    return _listen(_kafka({API_VERSIONS: OK_VERSIONS, SASL_HANDSHAKE: mechs, SASL_AUTH: auth}))


def test_a_wrong_sasl_password_is_an_authentication_error() -> None:
    bad = _settings(
        _sasl_broker(58),
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="PLAIN",
        sasl_username="app",
        sasl_password="wrong",
    )
    with pytest.raises(ConfigError, match="authentication of user 'app' failed.*ZEROCF_KAFKA_SASL_PASSWORD") as err:
        kafka_util.preflight(bad)
    assert "wrong" not in str(err.value)
    good = _settings(_sasl_broker(0), security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_username="a")
    kafka_util.preflight(good)


def test_a_mechanism_the_broker_does_not_offer_is_named() -> None:
    mechs = struct.pack(">hih", 33, 1, 13) + b"SCRAM-SHA-512"
    server = _listen(_kafka({API_VERSIONS: OK_VERSIONS, SASL_HANDSHAKE: mechs}))
    cfg = _settings(server, security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_username="a")
    with pytest.raises(ConfigError, match="does not offer SASL mechanism PLAIN .it offers SCRAM-SHA-512"):
        kafka_util.preflight(cfg)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert)]
        + ["-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    return cert, key


def _tls_server(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx


def test_plaintext_to_a_tls_listener_says_it_expects_tls(tls_files: tuple[Path, Path]) -> None:
    server = _listen(_kafka({API_VERSIONS: OK_VERSIONS}), tls=_tls_server(*tls_files))
    with pytest.raises(ConfigError, match="expects TLS: set ZEROCF_KAFKA_SECURITY_PROTOCOL=SSL"):
        kafka_util.preflight(_settings(server))


def test_tls_needs_a_trusted_certificate(tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    answers = {API_VERSIONS: OK_VERSIONS, METADATA: OK_METADATA}
    server = _listen(_kafka(answers), tls=_tls_server(cert, key))
    with pytest.raises(ConfigError, match="certificate of .* is not trusted.*ZEROCF_KAFKA_SSL_CAFILE"):
        kafka_util.preflight(_settings(server, security_protocol="SSL"))
    trusted = _settings(_listen(_kafka(answers), tls=_tls_server(cert, key)), security_protocol="SSL")
    kafka_util.preflight(dataclasses.replace(trusted, ssl_cafile=str(cert)))


def test_a_missing_ca_file_is_named(tls_files: tuple[Path, Path]) -> None:
    server = _listen(_kafka({}), tls=_tls_server(*tls_files))
    with pytest.raises(ConfigError, match="cannot load the TLS files .*ZEROCF_KAFKA_SSL_CAFILE"):
        kafka_util.preflight(_settings(server, security_protocol="SSL", ssl_cafile="/nonexistent/ca.pem"))
