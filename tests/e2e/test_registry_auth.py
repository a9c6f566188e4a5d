"""device-ownership's calls to its ownership registry, authenticated (issue 14 item 5): the
registry (tests/e2e/ownership_registry_standin.py, a stand-in: no ownership registry can be
installed here) only answers a sidecar that proves who it is.

mTLS on the cluster: render.py gives the "owners" cluster an upstream TLS transport socket with
a client certificate (certificates from envoy/make-certs.sh, real TLS on both sides: Envoy's
BoringSSL, Python's OpenSSL). With the certificate the chain works; without it the handshake
fails and the request fails closed (503), never reaching the broker.

Client credentials: the registry source's `auth.client_credentials` makes the filter get an
access token from the real OIDC provider (tests/e2e/idp, client "ownership-sidecar", the
client_credentials grant) through the IdP's cluster, and send it as `Authorization: Bearer` on
every registry call; the registry stand-in introspects it at the IdP (RFC 7662). The token is
reused until shortly before it expires, fetched again when the registry answers 401, and
without the IdP the request fails closed (503)."""

import http.client
import os
import re
import subprocess
import threading
import time
import urllib.parse
import uuid

import pytest

import e2e_support as e2e
import test_device_ownership as ownership_chain
import test_recovery
from ownership_registry_standin import OwnershipRegistry

MAKE_CERTS = os.path.join(e2e.ROOT, "envoy", "make-certs.sh")
SIDECAR_CN = "envoy-sidecar"
OWNER, OTHER = ownership_chain.GATEWAY, ownership_chain.APP
REGISTRY_SOURCE = {"kind": "registry", "cluster": "owners", "timeout_ms": 2000}
OWNERSHIP = {"sources": [REGISTRY_SOURCE], "cache": {"max_entries": 0}}
STATS = "wasmcustom.device_ownership."


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


def gateway(work_dir, idp, broker, name, registry, owners_tls=None, ownership=OWNERSHIP,
            http_clusters=(), concurrency=2, environment=None, exact_balance=False):
    """token-auth -> device-ownership (registry source) as ngsi-gateway's stages."""
    return e2e.Envoy(environment=environment,
        work_dir=work_dir, name=name, filter_config=e2e.token_auth_config(idp),
        broker_port=broker.port, idp_port=idp.port,
        wasm=e2e.copy_module(work_dir, os.path.join(e2e.render.WASM_DIR, "ngsi_gateway.wasm")),
        extra_filters=[e2e.render.chain_filter("device-ownership", ownership)],
        allow_on_headers_stop_iteration=True,
        owners_port=registry.port, owners_tls=owners_tls, http_clusters=http_clusters,
        concurrency=concurrency, exact_balance=exact_balance,
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


# ---- client credentials ----

def client_credentials_ownership(idp, token_cluster="idp"):
    source = dict(REGISTRY_SOURCE, auth={"client_credentials": {
        "token_endpoint": {"cluster": token_cluster, "authority": idp.authority,
                           "path": "/token", "timeout_ms": 2000},
        "client_id": e2e.IdP.SIDECAR[0], "client_secret": e2e.IdP.SIDECAR[1]}})
    return dict(OWNERSHIP, sources=[source])


class TokenCheck:
    """The registry stand-in's check: the IdP says the token is active and the sidecar's; a
    token the test revoked here is refused (as after a revocation the IdP would)."""

    def __init__(self, idp):
        self.idp, self.revoked = idp, set()

    def __call__(self, token):
        if token in self.revoked:
            return False
        answer = self.idp.introspect(token)
        return answer.get("active") is True and answer.get("client_id") == e2e.IdP.SIDECAR[0]


@pytest.fixture(scope="module")
def token_registry(idp):
    check = TokenCheck(idp)
    registry = OwnershipRegistry(check_token=check).start()
    registry.check = check
    yield registry
    registry.stop()


@pytest.fixture(scope="module")
def cc_gateway(work_dir, idp, broker, token_registry):
    proxy = gateway(work_dir, idp, broker, "envoy-registry-cc", token_registry,
                    ownership=client_credentials_ownership(idp))
    yield proxy
    proxy.stop()


def test_registry_calls_carry_the_sidecars_token_fetched_once(
        cc_gateway, idp, broker, token_registry, tokens):
    lamp = ownership_chain.new_id("Lamp")
    token_registry.owners[("", lamp)] = OWNER
    fetched = idp.count("/token")
    p = uuid.uuid4().hex
    r = ownership_chain.call(cc_gateway, tokens, OWNER, "GET", f"/v2/entities/{lamp}", probe=p)
    assert r.status == 404, r.body  # passed: the broker stand-in knows no such entity
    assert len(broker.received(p)) == 1
    assert get_lamp(cc_gateway, tokens, OTHER, lamp).status == 403
    for _ in range(3):
        assert get_lamp(cc_gateway, tokens, OWNER, lamp).status == 404
    calls = token_registry.calls_for(lamp)
    assert len(calls) == 5
    # One token from the IdP for the sidecar's client, reused (the workers' VMs share it:
    # test_the_workers_share_one_token).
    used = {c["token"] for c in calls}
    assert None not in used and len(used) == 1, used
    for token in used:
        assert idp.introspect(token)["client_id"] == e2e.IdP.SIDECAR[0]
    assert idp.count("/token") - fetched <= 1
    assert cc_gateway.stats(STATS)["registry_token.fetched"] >= 1


SHARED_ROUND = 4  # connections per round: two per worker under exact_balance


def concurrent_round(proxy, tokens, lamp):
    """SHARED_ROUND connections opened at once (exact_balance spreads them over the workers),
    a GET of `lamp` sent on each before any answer is read: [status]."""
    test_recovery.wait_until_idle(proxy)
    conns = [http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=e2e.HTTP_TIMEOUT)
             for _ in range(SHARED_ROUND)]
    try:
        for conn in conns:
            conn.connect()
        for conn in conns:
            conn.request("GET", f"/v2/entities/{lamp}",
                         headers={"authorization": f"Bearer {tokens[OWNER]}",
                                  "x-e2e-probe": uuid.uuid4().hex})
        statuses = []
        for conn in conns:
            resp = conn.getresponse()
            resp.read()
            statuses.append(resp.status)
        return statuses
    finally:
        for conn in conns:
            conn.close()


def test_the_workers_share_one_token(work_dir, idp, broker, token_registry, tokens):
    """Envoy --concurrency 2, the connections spread over both workers, the first requests of
    both at once: one worker's VM claims the fetch (shared data, compare-and-swap) and asks the
    IdP; the other waits for that token and takes it from the shared data. The IdP's token
    endpoint is asked once, and every registry call, from either worker, carries that token
    (before, each worker's VM fetched its own: two token requests)."""
    lamp = ownership_chain.new_id("Lamp")
    token_registry.owners[("", lamp)] = OWNER
    proxy = gateway(work_dir, idp, broker, "envoy-registry-cc-shared", token_registry,
                    ownership=client_credentials_ownership(idp), concurrency=2,
                    exact_balance=True)
    try:
        fetched = idp.count("/token")
        for _ in range(3):
            # The broker stand-in knows no such entity: 404 from upstream means it passed.
            assert concurrent_round(proxy, tokens, lamp) == [404] * SHARED_ROUND
        workers = test_recovery.worker_connections(proxy)
        assert len(workers) == 2 and all(n >= SHARED_ROUND for n in workers.values()), workers
        # No lookup cache: every request needs the registry. Concurrent requests on one worker
        # share a lookup; the workers' VMs each make their own, so at least two.
        calls = token_registry.calls_for(lamp)
        assert 2 <= len(calls) <= 3 * SHARED_ROUND
        used = {c["token"] for c in calls}
        assert None not in used and len(used) == 1, used
        assert idp.count("/token") - fetched == 1
        stats = proxy.stats(STATS)
        assert stats["registry_token.fetched"] == 1, stats
        assert stats["registry_token.shared"] >= 1, stats
        assert e2e.IdP.SIDECAR[1] not in proxy.log_text()
    finally:
        proxy.stop()


def flushed_counter(proxy, name):
    """A counter as Envoy's stats show it right now (what the VMs flushed on their ticks so
    far; `proxy.stats` waits for the flushes first)."""
    body = proxy.admin("/stats?filter=" + urllib.parse.quote(f"^{re.escape(name)}$")).body
    for line in body.decode().splitlines():
        key, _, value = line.partition(": ")
        if key == name and value.strip().isdigit():
            return int(value)
    return 0


def test_a_request_waiting_for_the_other_workers_token_goes_on_with_it(
        work_dir, idp, broker, token_registry, tokens):
    """Envoy --concurrency 2, the IdP's token endpoint held: a request on one worker claims the
    token fetch (its VM asks the IdP); a request on the other worker waits for that token.
    Its VM reads the shared token on its root's tick, which comes every 20 ms while a call waits
    (before: once a second). The token is released right after the waiting worker's tick was
    seen (the tick flushes the VM's counters: its count of the waiting request appearing in
    Envoy's stats is that tick), so a once-a-second tick would let the waiting request go
    almost a second after the fetching worker's; here they go together (asserted: within half
    a second of each other, both answers starting from the same token answer)."""
    lamp = ownership_chain.new_id("Lamp")
    token_registry.owners[("", lamp)] = OWNER
    proxy = gateway(work_dir, idp, broker, "envoy-registry-cc-wake", token_registry,
                    ownership=client_credentials_ownership(idp), concurrency=2,
                    exact_balance=True)
    allowed = "wasmcustom.token_auth.allowed"
    conns = []
    try:
        test_recovery.wait_until_idle(proxy)
        workers_before = test_recovery.worker_connections(proxy)
        fetched = idp.count("/token")
        idp.hold_token()
        done = {}

        def send(name):
            # exact_balance: a connection goes to the worker with the fewest open ones.
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=e2e.HTTP_TIMEOUT)
            conns.append(conn)
            conn.request("GET", f"/v2/entities/{lamp}",
                         headers={"authorization": f"Bearer {tokens[OWNER]}",
                                  "x-e2e-probe": uuid.uuid4().hex})

            def read():
                resp = conn.getresponse()
                resp.read()
                done[name] = (resp.status, time.monotonic())
            thread = threading.Thread(target=read, daemon=True)
            thread.start()
            return thread

        def until(what, check, bound_s=10):
            deadline = time.monotonic() + bound_s
            while not check():
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                time.sleep(0.01)

        base = flushed_counter(proxy, allowed)
        fetching = send("fetching")
        until("the first worker's token request", lambda: idp.count("/token") == fetched + 1)
        until("the first worker's tick", lambda: flushed_counter(proxy, allowed) == base + 1)
        waiting = send("waiting")
        # The second worker passed token-auth and, in the same callback, device-ownership's
        # lookup began to wait for the token: its tick handed that count to Envoy just now.
        until("the second worker's tick", lambda: flushed_counter(proxy, allowed) == base + 2)
        idp.release_token()
        fetching.join(e2e.HTTP_TIMEOUT)
        waiting.join(e2e.HTTP_TIMEOUT)
        assert done["fetching"][0] == 404 and done["waiting"][0] == 404, done  # both passed
        gap = done["waiting"][1] - done["fetching"][1]
        print(f"the waiting request went {gap * 1000:.0f} ms after the fetching one")
        assert gap < 0.5, f"the waiting request went {gap:.3f} s after the fetching one"
        workers = test_recovery.worker_connections(proxy)
        assert all(workers[w] - workers_before.get(w, 0) == 1 for w in workers), \
            (workers_before, workers)
        # One token request; the second worker took that token from the shared data.
        assert idp.count("/token") - fetched == 1
        stats = proxy.stats(STATS)
        assert stats["registry_token.fetched"] == 1, stats
        assert stats["registry_token.shared"] >= 1, stats
        used = {c["token"] for c in token_registry.calls_for(lamp)}
        assert len(token_registry.calls_for(lamp)) == 2 and None not in used \
            and len(used) == 1, used
    finally:
        idp.release_token()
        for conn in conns:
            conn.close()
        proxy.stop()


def test_a_token_the_registry_refuses_is_fetched_again_once(
        work_dir, idp, broker, token_registry, tokens):
    """One worker, so one token: revoked at the registry, the next lookup gets 401, the
    filter fetches another token and asks again; the request passes."""
    lamp = ownership_chain.new_id("Lamp")
    token_registry.owners[("", lamp)] = OWNER
    proxy = gateway(work_dir, idp, broker, "envoy-registry-cc-401", token_registry,
                    ownership=client_credentials_ownership(idp), concurrency=1)
    try:
        assert get_lamp(proxy, tokens, OWNER, lamp).status == 404
        [old] = {c["token"] for c in token_registry.calls_for(lamp)}
        token_registry.check.revoked.add(old)
        fetched = idp.count("/token")
        p = uuid.uuid4().hex
        r = ownership_chain.call(proxy, tokens, OWNER, "GET", f"/v2/entities/{lamp}", probe=p)
        assert r.status == 404, r.body
        assert len(broker.received(p)) == 1
        # 401 with the old token, then the same lookup with a new one.
        seen = [c["token"] for c in token_registry.calls_for(lamp)]
        assert len(seen) == 3 and seen[1] == old and seen[2] not in (None, old), seen
        assert idp.count("/token") - fetched == 1
        assert "refused the access token (401)" in proxy.log_text()
        # A registry that keeps refusing: one new token, then 503 (never a loop, never an allow).
        token_registry.check.revoked.add(seen[2])
        real_check = token_registry.check_token
        token_registry.check_token = lambda _token: False
        try:
            fetched = idp.count("/token")
            p = uuid.uuid4().hex
            r = ownership_chain.call(proxy, tokens, OWNER, "GET", f"/v2/entities/{lamp}",
                                     probe=p)
            assert r.status == 503, r.body
            assert broker.received(p) == []
            assert idp.count("/token") - fetched == 1
            assert len(token_registry.calls_for(lamp)) == 5
        finally:
            token_registry.check_token = real_check
    finally:
        proxy.stop()


def test_without_the_idp_registry_calls_fail_closed(work_dir, idp, broker, token_registry,
                                                    tokens):
    """The token endpoint's cluster points at a closed port: no token, 503, the registry is
    never asked without one and nothing reaches the broker."""
    lamp = ownership_chain.new_id("Lamp")
    token_registry.owners[("", lamp)] = OWNER
    proxy = gateway(work_dir, idp, broker, "envoy-registry-cc-idp-down", token_registry,
                    ownership=client_credentials_ownership(idp, token_cluster="idp-down"),
                    http_clusters=[("idp-down", f"127.0.0.1:{e2e.free_port()}")])
    try:
        p = uuid.uuid4().hex
        r = ownership_chain.call(proxy, tokens, OWNER, "GET", f"/v2/entities/{lamp}", probe=p)
        assert r.status == 503, r.body
        assert broker.received(p) == []
        assert token_registry.calls_for(lamp) == []
        log = proxy.log_text()
        assert "no access token for the ownership registry" in log
        assert "device-ownership decision=deny status=503 reason=unavailable" in log
        assert proxy.stats(STATS)["registry_token.failed"] >= 1
    finally:
        proxy.stop()


# ---- the client secret from Envoy's environment (client_secret_env) ----

SECRET_ENV = "E2E_OWNERSHIP_CLIENT_SECRET"


def env_secret_ownership(idp):
    """client_credentials_ownership with the secret named by an environment variable."""
    ownership = client_credentials_ownership(idp)
    grant = ownership["sources"][0]["auth"]["client_credentials"]
    del grant["client_secret"]
    grant["client_secret_env"] = SECRET_ENV
    return ownership


def test_the_client_secret_comes_from_envoys_environment_and_stays_out_of_its_config(
        work_dir, idp, broker, token_registry, tokens):
    """Envoy started with the secret in its environment: render.py lists the variable in the
    filter's vm_config.environment_variables.host_env_keys, the filter reads it at configure
    time and the real IdP gives the sidecar's client a token with it (so the Basic
    authorization carried the right secret); the secret is nowhere in Envoy's config dump."""
    assert SECRET_ENV not in os.environ
    secret = e2e.IdP.SIDECAR[1]
    lamp = ownership_chain.new_id("Lamp")
    token_registry.owners[("", lamp)] = OWNER
    proxy = gateway(work_dir, idp, broker, "envoy-registry-cc-env", token_registry,
                    ownership=env_secret_ownership(idp), concurrency=1,
                    environment={SECRET_ENV: secret})
    try:
        fetched = idp.count("/token")
        p = uuid.uuid4().hex
        r = ownership_chain.call(proxy, tokens, OWNER, "GET", f"/v2/entities/{lamp}", probe=p)
        assert r.status == 404, r.body  # passed: the broker stand-in knows no such entity
        assert len(broker.received(p)) == 1
        [token] = {c["token"] for c in token_registry.calls_for(lamp)}
        assert idp.introspect(token)["client_id"] == e2e.IdP.SIDECAR[0]
        assert idp.count("/token") - fetched == 1
        dump = proxy.admin("/config_dump").body.decode()
        assert '"host_env_keys"' in dump and f'"{SECRET_ENV}"' in dump
        assert '"client_secret_env\\":\\"' + SECRET_ENV in dump
        at = dump.find(secret)
        assert at < 0, dump[max(0, at - 600):at + 100]
        assert secret not in proxy.log_text()
    finally:
        proxy.stop()


def test_without_the_variable_envoy_refuses_the_filters_configuration(
        work_dir, idp, broker, token_registry):
    """The same configuration, Envoy started without the variable: the filter refuses its
    configuration at start (naming client_secret_env), so Envoy does not start; no request is
    ever served without the registry's credentials."""
    assert SECRET_ENV not in os.environ
    name = "envoy-registry-cc-env-unset"
    with pytest.raises(RuntimeError, match="exited"):
        gateway(work_dir, idp, broker, name, token_registry,
                ownership=env_secret_ownership(idp), concurrency=1)
    with open(os.path.join(work_dir, f"{name}.log"), errors="replace") as f:
        log = f.read()
    assert ("device_ownership: sources[0].auth.client_credentials.client_secret_env: the "
            f"environment variable {SECRET_ENV} is not set or is empty") in log


def test_render_py_passes_the_variable_through_and_validates_with_a_placeholder(work_dir, idp):
    """render.py on the command line: the offline validation (host-harness, the real .wasm)
    accepts the configuration without the variable in render.py's environment, and the
    rendered filter names the variable in host_env_keys, never a value."""
    import json
    import sys
    config = os.path.join(work_dir, "env-secret-ownership.json")
    with open(config, "w") as f:
        json.dump(env_secret_ownership(idp), f)
    token_auth = os.path.join(work_dir, "env-secret-token-auth.json")
    with open(token_auth, "w") as f:
        json.dump(e2e.token_auth_config(idp), f)
    done = subprocess.run(
        [sys.executable, os.path.join(e2e.ROOT, "envoy", "render.py"),
         "--filter-config", token_auth, "--device-ownership-config", config,
         "--owners", "127.0.0.1:9"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "NOT validated" not in done.stdout + done.stderr
    assert re.search(rf"host_env_keys:\n *- \"?{SECRET_ENV}\"?\n", done.stdout), done.stdout
    assert f"# Start Envoy with {SECRET_ENV} in its environment" in done.stdout
    assert e2e.IdP.SIDECAR[1] not in done.stdout


# ---- token-auth's device registry, with the same auth ----

def device_registry_proxy(work_dir, wasm, broker, idp, device_registry, token_cluster="idp",
                          http_clusters=(), name="envoy-device-registry-cc"):
    registry = {"cluster": "iot-directory", "authority": "iotdirectory.example",
                "path": "/api/device-keys", "timeout_ms": 1000,
                # No caching: every request asks the registry (the tests count its calls).
                "cache": {"max_entries": 1, "positive_ttl_s": 0, "negative_ttl_s": 0},
                "auth": {"client_credentials": {
                    "token_endpoint": {"cluster": token_cluster, "authority": idp.authority,
                                       "path": "/token"},
                    "client_id": e2e.IdP.SIDECAR[0], "client_secret": e2e.IdP.SIDECAR[1]}}}
    config = {"credentials": {"sources": [{"type": "device_key", "in": "header",
                                           "id": "x-device-id", "key": "x-device-key"}]},
              "device_keys": {"registry": registry}, "realm": "devices"}
    return e2e.Envoy(work_dir=work_dir, name=name, filter_config=config,
                     broker_port=broker.port, idp_port=idp.port, wasm=wasm, concurrency=1,
                     http_clusters=(("iot-directory", f"127.0.0.1:{device_registry.port}"),)
                     + tuple(http_clusters)).start()


def device_request(proxy, device, key):
    p = uuid.uuid4().hex
    r = proxy.request("GET", "/v2/entities?type=Lamp",
                      {"x-device-id": device, "x-device-key": key, "x-e2e-probe": p})
    return r, p


def test_token_auth_asks_the_device_registry_with_the_sidecars_token(work_dir, wasm, broker,
                                                                      idp):
    from device_registry_standin import DeviceRegistry
    check = TokenCheck(idp)
    registry = DeviceRegistry({"lamp-cc": ("alice", ["K1-cc"])}, check_token=check).start()
    proxy = device_registry_proxy(work_dir, wasm, broker, idp, registry)
    try:
        fetched = idp.count("/token")
        for _ in range(2):
            r, p = device_request(proxy, "lamp-cc", "K1-cc")
            assert r.status == 200, r.body
            assert len(broker.received(p)) == 1
        [token] = set(registry.tokens)
        assert idp.count("/token") - fetched == 1
        # Revoked at the registry: 401, a new token, the same lookup again; the request passes.
        check.revoked.add(token)
        r, p = device_request(proxy, "lamp-cc", "K1-cc")
        assert r.status == 200, r.body
        assert registry.tokens[-2:][0] == token and registry.tokens[-1] not in (None, token)
        assert idp.count("/token") - fetched == 2
        stats = proxy.stats("wasmcustom.token_auth.")
        assert stats["device_registry.token.fetched"] == 2
        # A wrong key is still refused by the registry's digests (401), with a valid token.
        r, p = device_request(proxy, "lamp-cc", "K1-wrong")
        assert r.status == 401 and broker.received(p) == []
    finally:
        proxy.stop()
        registry.stop()


def test_token_auth_without_the_idp_fails_closed(work_dir, wasm, broker, idp):
    from device_registry_standin import DeviceRegistry
    registry = DeviceRegistry({"lamp-cc": ("alice", ["K1-cc"])},
                              check_token=TokenCheck(idp)).start()
    proxy = device_registry_proxy(work_dir, wasm, broker, idp, registry, token_cluster="idp-down",
                                  http_clusters=[("idp-down", f"127.0.0.1:{e2e.free_port()}")],
                                  name="envoy-device-registry-cc-down")
    try:
        r, p = device_request(proxy, "lamp-cc", "K1-cc")
        assert r.status == 503, r.body
        assert broker.received(p) == [] and registry.tokens == []
        assert "no access token for the device registry" in proxy.log_text()
    finally:
        proxy.stop()
        registry.stop()


# ---- mqtt-acl's device registry over mTLS (mqtt-acl's own calls carry no token) ----

@pytest.fixture(scope="module")
def mosquitto(work_dir):
    server = e2e.Mosquitto(work_dir, name="mosquitto-registry-mtls")
    yield server
    server.stop()


@pytest.mark.parametrize("case", ["client certificate", "no client certificate"])
def test_mqtt_acl_asks_the_device_registry_over_mtls_and_fails_closed_without_it(
        work_dir, certs, mosquitto, case):
    import test_device_registry as registry_tests
    from device_registry_standin import DeviceRegistry
    registry = DeviceRegistry({}, tls={"cert": cert(certs, "server.crt"),
                                       "key": cert(certs, "server.key"),
                                       "client_ca": cert(certs, "ca.crt")}).start()
    with_cert = case == "client certificate"
    tls = {"cert": cert(certs, f"{SIDECAR_CN}.crt"), "key": cert(certs, f"{SIDECAR_CN}.key"),
           "ca": cert(certs, "ca.crt"), "server_name": "127.0.0.1"} if with_cert else None
    name = "envoy-mqtt-registry-" + ("mtls" if with_cert else "plain")
    proxy = e2e.MqttEnvoy(
        work_dir=work_dir, name=name, filter_config=registry_tests.mqtt_config(),
        broker_port=mosquitto.port, wasm=e2e.copy_module(work_dir, e2e.MQTT_WASM),
        concurrency=1,
        http_clusters=(("iot-directory", f"127.0.0.1:{registry.port}", tls),)).start()
    try:
        device, key = registry_tests.new_device(registry)
        accepted = mosquitto.connections_accepted()
        done = registry_tests.publish(proxy.port, device, key, f"lamps/{device}/state", "on")
        if with_cert:
            assert done.returncode == 0, done.stderr
            assert registry.callers == [SIDECAR_CN], "the registry knew the sidecar"
            assert f"u'{device}'" in mosquitto.log_text()
        else:
            assert done.returncode != 0
            assert any(m in done.stderr.lower()
                       for m in ("broker unavailable", "server unavailable")), done.stderr
            assert registry.asks(device) == 0, "no handshake, no lookup"
            assert mosquitto.connections_accepted() == accepted
    finally:
        proxy.stop()
        registry.stop()
