"""HTTPS and mTLS in front of the broker: envoy/sidecar.yaml rendered with --tls-cert/--tls-key
(and --client-ca for mTLS), certificates made by envoy/make-certs.sh with openssl: a local CA, a
server certificate for 127.0.0.1, a device certificate with CN=lamp-01, and a certificate with
the same CN from another CA. Real TLS (Envoy's BoringSSL, Python's OpenSSL, curl).

token-auth is configured with `"mtls": {"identity_from": "subject_cn", "roles": ["device"]}`:
a request without a token, on a connection with a verified client certificate, is the device.
"""

import http.client
import os
import shutil
import socket
import ssl
import subprocess
import uuid

import pytest

import e2e_support as e2e

ORION = "urn:orion"
MAKE_CERTS = os.path.join(e2e.ROOT, "envoy", "make-certs.sh")
DEVICE = "lamp-01"
MTLS = {"identity_from": "subject_cn", "roles": ["device"]}


def new_probe():
    return uuid.uuid4().hex


@pytest.fixture(scope="module")
def certs(work_dir):
    out = os.path.join(work_dir, "certs")
    subprocess.run(["bash", MAKE_CERTS, out, DEVICE], check=True, timeout=60,
                   capture_output=True)
    return out


def client_context(certs, cert=None, ca="ca", tls_version=None):
    """Verifies the server against `ca` (and its name, 127.0.0.1); presents `cert` if given."""
    ctx = ssl.create_default_context(cafile=os.path.join(certs, f"{ca}.crt"))
    if cert:
        ctx.load_cert_chain(os.path.join(certs, f"{cert}.crt"), os.path.join(certs, f"{cert}.key"))
    if tls_version:
        ctx.minimum_version = ctx.maximum_version = tls_version
    return ctx


def _tls_envoy(work_dir, wasm, idp, broker, certs, name, client_ca):
    tls = {"cert": os.path.join(certs, "server.crt"), "key": os.path.join(certs, "server.key")}
    if client_ca:
        tls["client_ca"] = os.path.join(certs, "ca.crt")
    return e2e.Envoy(work_dir=work_dir, name=name, filter_config=e2e.token_auth_config(idp, mtls=MTLS),
                     broker_port=broker.port, idp_port=idp.port, wasm=wasm, tls=tls).start()


@pytest.fixture(scope="module")
def https_envoy(work_dir, wasm, idp, broker, certs):
    """HTTPS, no client certificate asked for."""
    proxy = _tls_envoy(work_dir, wasm, idp, broker, certs, "envoy-https", client_ca=False)
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def mtls_envoy(work_dir, wasm, idp, broker, certs):
    """HTTPS with require_client_certificate and the local CA."""
    proxy = _tls_envoy(work_dir, wasm, idp, broker, certs, "envoy-mtls", client_ca=True)
    yield proxy
    proxy.stop()


def ssl_stats(proxy):
    """The listener's TLS counters (listener stat_prefix ngsi in sidecar.yaml)."""
    return proxy.stats("listener.ngsi.ssl.")


def only_record(broker, probe):
    records = broker.received(probe)
    assert len(records) == 1, f"expected the request at the broker once, got {len(records)}"
    return records[0]


def refused(proxy, ctx, probe):
    """Tries a request on a new TLS connection that the server is expected to refuse; returns
    the exception (never an HTTP answer). With TLS 1.3 the client's side of the handshake
    completes before the server has checked the client's certificate, so the refusal (an alert,
    or the connection closed) arrives at the first read."""
    try:
        r = e2e.request(proxy.port, "GET", "/v2/entities", {"x-e2e-probe": probe},
                        ssl_context=ctx, timeout=10)
    except (ssl.SSLError, ConnectionError, http.client.RemoteDisconnected) as e:
        return e
    pytest.fail(f"the server answered HTTP {r.status} instead of refusing the connection")


# ------------------------------------------------------------------------------------------------
# HTTPS


def test_https_with_a_token_is_allowed_and_the_client_verifies_the_server(
        https_envoy, idp, broker, certs):
    ctx = client_context(certs)
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    probe = new_probe()
    r = e2e.request(https_envoy.port, "GET", "/v2/entities",
                    {"authorization": f"Bearer {idp.token(ORION)}", "x-e2e-probe": probe},
                    ssl_context=ctx)
    assert r.status == 200, r
    record = only_record(broker, probe)
    assert e2e.header_values(record, "x-auth-subject") == ["sensor-gateway"]
    assert e2e.header_values(record, "x-auth-kind") == ["jwt"]
    assert e2e.header_values(record, "x-forwarded-proto") == ["https"]
    assert e2e.header_values(record, "authorization") == []

    r = e2e.request(https_envoy.port, "GET", "/v2/entities", ssl_context=ctx)
    assert r.status == 401
    assert ssl_stats(https_envoy)["handshake"] >= 2


def test_a_client_that_trusts_another_ca_refuses_the_server(https_envoy, certs):
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        e2e.request(https_envoy.port, "GET", "/version",
                    ssl_context=client_context(certs, ca="other-ca"))


def test_plain_http_on_the_https_port_gets_nothing(https_envoy, broker):
    probe = new_probe()
    with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
        e2e.request(https_envoy.port, "GET", "/version", {"x-e2e-probe": probe}, timeout=10)
    assert broker.received(probe) == []


def test_without_client_certificate_validation_a_certificate_names_nobody(
        https_envoy, broker, certs):
    """The HTTPS-only listener does not ask for client certificates: a device that has one and
    sends no token is not identified (the filter takes identities only from verified ones)."""
    probe = new_probe()
    r = e2e.request(https_envoy.port, "GET", "/v2/entities", {"x-e2e-probe": probe},
                    ssl_context=client_context(certs, cert=DEVICE))
    assert r.status == 401, r
    assert r.json()["description"] == "missing credential"
    assert broker.received(probe) == []


# ------------------------------------------------------------------------------------------------
# mTLS


def test_a_device_with_its_certificate_and_no_token_is_identified(mtls_envoy, broker, certs):
    probe = new_probe()
    r = e2e.request(mtls_envoy.port, "GET", "/v2/entities?type=Lamp", {"x-e2e-probe": probe},
                    ssl_context=client_context(certs, cert=DEVICE))
    assert r.status == 200, r
    record = only_record(broker, probe)
    assert e2e.header_values(record, "x-auth-subject") == [DEVICE]
    assert e2e.header_values(record, "x-auth-kind") == ["client_certificate"]
    assert e2e.header_values(record, "x-roles") == ["device"]
    assert f'decision=allow status=- reason=allowed subject="{DEVICE}"' in mtls_envoy.log_text()


def test_spoofed_identity_headers_with_a_valid_certificate_are_replaced(
        mtls_envoy, broker, certs):
    probe = new_probe()
    r = e2e.request(mtls_envoy.port, "GET", "/v2/entities",
                    [("x-e2e-probe", probe), ("x-auth-subject", "admin"),
                     ("X-Auth-Kind", "jwt"), ("x-roles", "admin"), ("x-nick-name", "admin")],
                    ssl_context=client_context(certs, cert=DEVICE))
    assert r.status == 200, r
    record = only_record(broker, probe)
    assert e2e.header_values(record, "x-auth-subject") == [DEVICE]
    assert e2e.header_values(record, "x-auth-kind") == ["client_certificate"]
    assert e2e.header_values(record, "x-roles") == ["device"]
    assert e2e.header_values(record, "x-nick-name") == [DEVICE]


def test_a_token_on_a_device_connection_is_the_identity(mtls_envoy, idp, broker, certs):
    """The certificate names the caller only when the request has no credential."""
    probe = new_probe()
    r = e2e.request(mtls_envoy.port, "GET", "/v2/entities",
                    {"authorization": f"Bearer {idp.token(ORION)}", "x-e2e-probe": probe},
                    ssl_context=client_context(certs, cert=DEVICE))
    assert r.status == 200, r
    record = only_record(broker, probe)
    assert e2e.header_values(record, "x-auth-subject") == ["sensor-gateway"]
    assert e2e.header_values(record, "x-auth-kind") == ["jwt"]

    probe = new_probe()
    r = e2e.request(mtls_envoy.port, "GET", "/v2/entities",
                    {"authorization": "Bearer not-a-real-token-" + probe, "x-e2e-probe": probe},
                    ssl_context=client_context(certs, cert=DEVICE))
    assert r.status == 401, "a bad token must not fall back to the certificate"
    assert broker.received(probe) == []


def test_no_client_certificate_is_refused_in_the_handshake(mtls_envoy, broker, certs):
    before = ssl_stats(mtls_envoy)
    probe = new_probe()
    error = refused(mtls_envoy, client_context(certs), probe)
    # The alert (certificate required) or, when the request crossed it, a closed connection.
    assert "CERTIFICATE_REQUIRED" in str(error) or isinstance(
        error, (ssl.SSLEOFError, ConnectionError, http.client.RemoteDisconnected)), error
    # TLS 1.2: the handshake itself fails.
    with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
        with socket.create_connection(("127.0.0.1", mtls_envoy.port), timeout=10) as sock:
            client_context(certs, tls_version=ssl.TLSVersion.TLSv1_2).wrap_socket(
                sock, server_hostname="127.0.0.1")
    assert broker.received(probe) == []
    after = e2e.wait_until(
        lambda: (s := ssl_stats(mtls_envoy))["fail_verify_no_cert"] >= before["fail_verify_no_cert"] + 2 and s,
        "Envoy to count the refused handshakes", timeout=10)
    assert after["fail_verify_error"] == before["fail_verify_error"]


def test_a_certificate_from_another_ca_is_refused_in_the_handshake(mtls_envoy, broker, certs):
    """other-ca-lamp-01 has the device's CN, but the listener trusts only the local CA."""
    before = ssl_stats(mtls_envoy)
    probe = new_probe()
    error = refused(mtls_envoy, client_context(certs, cert=f"other-ca-{DEVICE}"), probe)
    # The alert (unknown CA) or, when the request crossed it, a closed connection.
    assert "UNKNOWN_CA" in str(error) or isinstance(
        error, (ssl.SSLEOFError, ConnectionError, http.client.RemoteDisconnected)), error
    with pytest.raises(ssl.SSLError, match="UNKNOWN_CA"):
        with socket.create_connection(("127.0.0.1", mtls_envoy.port), timeout=10) as sock:
            client_context(certs, cert=f"other-ca-{DEVICE}",
                           tls_version=ssl.TLSVersion.TLSv1_2).wrap_socket(
                sock, server_hostname="127.0.0.1")
    assert broker.received(probe) == []
    after = e2e.wait_until(
        lambda: (s := ssl_stats(mtls_envoy))["fail_verify_error"] >= before["fail_verify_error"] + 2 and s,
        "Envoy to count the refused handshakes", timeout=10)
    assert after["fail_verify_no_cert"] == before["fail_verify_no_cert"]


def test_curl_over_http2_with_the_device_certificate(mtls_envoy, broker, certs):
    """What a device or an operator runs: curl, HTTP/2 by ALPN, the device's key pair."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    probe = new_probe()
    cert = os.path.join(certs, DEVICE)
    done = subprocess.run(
        [curl, "-sS", "--http2", "--max-time", "10", "-o", "/dev/null",
         "-w", "%{http_code} %{http_version}",
         "--cacert", os.path.join(certs, "ca.crt"), "--cert", cert + ".crt", "--key", cert + ".key",
         "-H", f"x-e2e-probe: {probe}", "-H", "x-auth-subject: admin",
         f"https://127.0.0.1:{mtls_envoy.port}/v2/entities"],
        capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "200 2"
    record = only_record(broker, probe)
    assert e2e.header_values(record, "x-auth-subject") == [DEVICE]

    done = subprocess.run(
        [curl, "-sS", "--http2", "--max-time", "10", "-o", "/dev/null",
         "--cacert", os.path.join(certs, "ca.crt"),
         f"https://127.0.0.1:{mtls_envoy.port}/v2/entities"],
        capture_output=True, text=True, timeout=30)
    assert done.returncode != 0, "a client without a certificate got an answer"
