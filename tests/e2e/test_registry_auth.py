"""device-ownership's calls to its ownership registry, authenticated (issue 14 item 5): the
registry (tests/e2e/ownership_registry_standin.py, a stand-in: no ownership registry can be
installed here) only answers a sidecar that proves who it is.

mTLS on the cluster: render.py gives the "owners" cluster an upstream TLS transport socket with
a client certificate (certificates from envoy/make-certs.sh, real TLS on both sides: Envoy's
BoringSSL, Python's OpenSSL). With the certificate the chain works; without it the handshake
fails and the request fails closed (503), never reaching the broker."""

import os
import subprocess
import uuid

import pytest

import e2e_support as e2e
import test_device_ownership as ownership_chain
from ownership_registry_standin import OwnershipRegistry

MAKE_CERTS = os.path.join(e2e.ROOT, "envoy", "make-certs.sh")
SIDECAR_CN = "envoy-sidecar"
OWNER, OTHER = ownership_chain.GATEWAY, ownership_chain.APP
REGISTRY_SOURCE = {"kind": "registry", "cluster": "owners", "timeout_ms": 2000}
OWNERSHIP = {"sources": [REGISTRY_SOURCE], "cache": {"max_entries": 0}}


@pytest.fixture(scope="module")
def certs(work_dir):
    """A CA, the registry's server certificate (SAN 127.0.0.1) and the sidecar's client
    certificate (CN envoy-sidecar); other-ca-envoy-sidecar.* is one the registry must refuse."""
    out = os.path.join(work_dir, "registry-certs")
    subprocess.run(["bash", MAKE_CERTS, out, SIDECAR_CN], check=True, timeout=60,
                   capture_output=True)
    return out


def cert(certs, name):
    return os.path.join(certs, name)


@pytest.fixture(scope="module")
def tls_registry(certs):
    registry = OwnershipRegistry(tls={"cert": cert(certs, "server.crt"),
                                      "key": cert(certs, "server.key"),
                                      "client_ca": cert(certs, "ca.crt")}).start()
    yield registry
    registry.stop()


@pytest.fixture(scope="module")
def tokens(idp):
    return {OWNER: idp.token(ownership_chain.ORION),
            OTHER: idp.token(ownership_chain.ORION, client=e2e.IdP.OTHER_CLIENT)}


def gateway(work_dir, idp, broker, name, registry, owners_tls):
    """token-auth -> device-ownership (registry source) as ngsi-gateway's stages."""
    return e2e.Envoy(
        work_dir=work_dir, name=name, filter_config=e2e.token_auth_config(idp),
        broker_port=broker.port, idp_port=idp.port,
        wasm=e2e.copy_module(work_dir, os.path.join(e2e.render.WASM_DIR, "ngsi_gateway.wasm")),
        extra_filters=[e2e.render.chain_filter("device-ownership", OWNERSHIP)],
        allow_on_headers_stop_iteration=True,
        owners_port=registry.port, owners_tls=owners_tls,
    ).start()


def get_lamp(proxy, tokens, who, lamp):
    return ownership_chain.call(proxy, tokens, who, "GET", f"/v2/entities/{lamp}",
                                probe=uuid.uuid4().hex)


def test_over_mtls_the_registry_knows_the_sidecar_and_the_chain_works(
        work_dir, idp, broker, certs, tls_registry, tokens):
    lamp = ownership_chain.new_id("Lamp")
    tls_registry.owners[("", lamp)] = OWNER
    proxy = gateway(work_dir, idp, broker, "envoy-registry-mtls", tls_registry, {
        "cert": cert(certs, f"{SIDECAR_CN}.crt"), "key": cert(certs, f"{SIDECAR_CN}.key"),
        "ca": cert(certs, "ca.crt"), "server_name": "127.0.0.1"})
    try:
        p = uuid.uuid4().hex
        r = ownership_chain.call(proxy, tokens, OWNER, "GET", f"/v2/entities/{lamp}", probe=p)
        # The broker stand-in knows no such entity: 404 from upstream means the request passed.
        assert r.status == 404, r.body
        assert len(broker.received(p)) == 1
        r = get_lamp(proxy, tokens, OTHER, lamp)
        assert r.status == 403, r.body
        calls = tls_registry.calls_for(lamp)
        assert calls and {c["cn"] for c in calls} == {SIDECAR_CN}
        assert {c["path"] for c in calls} == {"/ownership/lookup"}
    finally:
        proxy.stop()


@pytest.mark.parametrize("case", ["no client certificate", "a certificate of another CA"])
def test_without_an_accepted_certificate_the_request_fails_closed(
        work_dir, idp, broker, certs, tls_registry, tokens, case):
    lamp = ownership_chain.new_id("Lamp")
    tls_registry.owners[("", lamp)] = OWNER
    if case == "no client certificate":
        # The cluster as before this option: plain HTTP to a registry that only speaks TLS.
        owners_tls = None
        name = "envoy-registry-plain"
    else:
        owners_tls = {"cert": cert(certs, f"other-ca-{SIDECAR_CN}.crt"),
                      "key": cert(certs, f"other-ca-{SIDECAR_CN}.key"),
                      "ca": cert(certs, "ca.crt"), "server_name": "127.0.0.1"}
        name = "envoy-registry-other-ca"
    proxy = gateway(work_dir, idp, broker, name, tls_registry, owners_tls)
    try:
        p = uuid.uuid4().hex
        r = ownership_chain.call(proxy, tokens, OWNER, "GET", f"/v2/entities/{lamp}", probe=p)
        assert r.status == 503, r.body
        assert broker.received(p) == []
        assert tls_registry.calls_for(lamp) == []
        assert "device-ownership decision=deny status=503 reason=unavailable" in proxy.log_text()
    finally:
        proxy.stop()
