"""token-auth -> entity-acl in a real Envoy: real JWTs from the OIDC provider (client
"sensor-gateway", roles device and entities-writer), the entity ACL deciding on what the
request touches, and the Orion stand-in recording what got through.

Both forms run every request test (the `chain` fixture is parametrized): ngsi-gateway, the
default sidecar (token-auth and entity-acl as stages of ngsi_gateway.wasm), and the separate
filters (token_auth.wasm -> entity_acl.wasm, the wrappers of the same stages)."""

import json
import os
import uuid

import pytest

import e2e_support as e2e
import render  # envoy/render.py (e2e_support puts envoy/ on the path)

ENTITY_ACL_WASM = os.path.join(e2e.ROOT, "target", "wasm32-wasip1", "release", "entity_acl.wasm")
ORION = "urn:orion"
SUBJECT = "sensor-gateway"

# The gateway may create and write Sensors under /sensors; nobody may touch the calibration
# entities; admins (a role the gateway does not have) may do anything.
ACL = {
    "max_body_bytes": 4096,
    "acl": {"rules": [
        {"name": "writers-sensors", "effect": "allow", "subjects": ["role:entities-writer"],
         "actions": ["create", "write", "read"],
         "ngsi": {"service": "smartcity", "service_path": "/sensors/#",
                  "entity_id": "urn:ngsi-ld:Sensor:*", "entity_type": "Sensor"}},
        {"name": "meters-temperature", "effect": "allow", "subjects": ["role:entities-writer"],
         "actions": ["read"],
         "ngsi": {"service": "smartcity", "service_path": "/sensors/#", "entity_type": "Meter",
                  "attributes": ["temperature"]}},
        {"name": "no-calibration", "effect": "deny", "subjects": ["anyone"], "actions": ["*"],
         "ngsi": {"service": "*", "service_path": "/#",
                  "entity_id": "urn:ngsi-ld:Sensor:calibration*"}},
        {"name": "admins", "effect": "allow", "subjects": ["role:admin"], "actions": ["*"],
         "ngsi": {"service": "*", "service_path": "/#"}},
    ]},
}


@pytest.fixture(scope="module")
def acl_wasm(work_dir):
    return e2e.copy_module(work_dir, ENTITY_ACL_WASM)


FORMS = ["gateway", "separate"]


def chain_envoy(work_dir, wasm, acl_wasm, idp, broker, name, acl=ACL, **kwargs):
    """The chain as the default sidecar (`wasm`: ngsi_gateway.wasm); with separate=True,
    `wasm` is token_auth.wasm and entity-acl runs as acl_wasm."""
    allow = kwargs.pop("acl_allow_on_headers_stop_iteration", True)
    return e2e.Envoy(
        work_dir=work_dir, name=name, filter_config=e2e.token_auth_config(idp),
        broker_port=broker.port, idp_port=idp.port, wasm=wasm,
        extra_filters=[render.chain_filter("entity-acl", acl, acl_wasm,
                                           allow_on_headers_stop_iteration=allow)],
        **kwargs,
    ).start()


def form_envoy(form, request, name, **kwargs):
    """chain_envoy in `form` ("gateway" or "separate"), with the session's modules."""
    get = request.getfixturevalue
    separate = form == "separate"
    wasm = get("token_auth_wasm") if separate else get("wasm")
    return chain_envoy(get("work_dir"), wasm, get("acl_wasm"), get("idp"), get("broker"),
                       f"{name}-{form}", separate=separate, **kwargs)


@pytest.fixture(scope="module", params=FORMS)
def chain(request):
    proxy = form_envoy(request.param, request, "envoy-entity-acl")
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def token(idp):
    return idp.token(ORION)


def ngsi_headers(token, probe, **extra):
    headers = {"authorization": f"Bearer {token}", "x-e2e-probe": probe,
               "fiware-service": "smartcity", "fiware-servicepath": "/sensors",
               "content-type": "application/json"}
    headers.update(extra)
    return headers


def probe():
    return uuid.uuid4().hex


def test_an_allowed_write_reaches_the_broker_with_its_body_and_identity(chain, broker, token):
    # A fresh id per run of the test (each form runs it against the same stand-in).
    sensor = f"urn:ngsi-ld:Sensor:{probe()[:8]}"
    created = chain.request("POST", "/v2/entities", ngsi_headers(token, probe()),
                            json.dumps({"id": sensor, "type": "Sensor"}))
    assert created.status == 201, created.body
    p = probe()
    body = json.dumps({"temperature": {"value": 21.5, "type": "Number"}})
    r = chain.request("PATCH", f"/v2/entities/{sensor}/attrs?type=Sensor",
                      ngsi_headers(token, p), body)
    assert r.status < 300, r.body
    [record] = broker.received(p)
    assert record["body"] == body
    assert e2e.header_values(record, "x-auth-subject") == [SUBJECT]
    assert "entity-acl decision=allow" in chain.log_text()


def test_a_forbidden_entity_gets_403_with_an_ngsi_body_naming_no_rule(chain, broker, token):
    p = probe()
    r = chain.request("PATCH", "/v2/entities/urn:ngsi-ld:Room:1/attrs?type=Room",
                      ngsi_headers(token, p), '{"temperature": {"value": 99}}')
    assert r.status == 403
    assert r.json() == {"error": "Forbidden",
                        "description": "the caller is not allowed to perform this request"}
    assert broker.received(p) == []


def test_deny_wins_over_the_allow_rule(chain, broker, token):
    p = probe()
    r = chain.request("GET", "/v2/entities/urn:ngsi-ld:Sensor:calibration-1?type=Sensor",
                      ngsi_headers(token, p))
    assert r.status == 403
    assert broker.received(p) == []
    assert "denied by rule 'no-calibration'" in chain.log_text()


def test_a_batch_with_one_forbidden_entity_is_refused_whole(chain, broker, token):
    p = probe()
    body = json.dumps({"actionType": "append", "entities": [
        {"id": "urn:ngsi-ld:Sensor:1", "type": "Sensor", "t": {"value": 1}},
        {"id": "urn:ngsi-ld:Sensor:calibration-2", "type": "Sensor", "t": {"value": 1}},
    ]})
    r = chain.request("POST", "/v2/op/update", ngsi_headers(token, p), body)
    assert r.status == 403
    assert broker.received(p) == []


def test_a_chunked_body_is_decided_whole_and_forwarded_unchanged(chain, broker, token):
    p = probe()
    sensor = f"urn:ngsi-ld:Sensor:{p[:8]}"  # fresh: each form creates it
    conn = e2e.Connection(chain.port)
    try:
        conn.start_chunked("POST", "/v2/entities", ngsi_headers(token, p))
        for part in [f'{{"id": "{sensor}", ', '"type": "Sensor", ',
                     '"temperature": {"value": 3}}']:
            conn.send_chunk(part)
        r = conn.finish()
    finally:
        conn.close()
    assert r.status < 300, r.body
    [record] = broker.received(p)
    assert json.loads(record["body"])["id"] == sensor


def test_a_chunked_body_over_the_limit_gets_413_and_nothing_upstream(chain, broker, token):
    p = probe()
    conn = e2e.Connection(chain.port)
    try:
        conn.start_chunked("POST", "/v2/entities", ngsi_headers(token, p))
        conn.send_chunk('{"id": "urn:ngsi-ld:Sensor:43", "type": "Sensor", "note": {"value": "')
        conn.send_chunk("x" * 5000)
        conn.send_chunk('"}}')
        r = conn.finish()
    finally:
        conn.close()
    assert r.status == 413
    assert r.json()["error"] == "RequestEntityTooLarge"
    assert broker.received(p) == []


def test_identity_headers_a_client_sends_are_not_believed(chain, broker, token):
    """The client claims to be an admin: token-auth strips the claim before entity-acl reads
    the identity, so the admin rule does not apply."""
    p = probe()
    r = chain.request("DELETE", "/v2/entities/urn:ngsi-ld:Room:1",
                      ngsi_headers(token, p, **{"x-roles": "admin", "x-auth-subject": "root"}))
    assert r.status == 403
    assert broker.received(p) == []
    assert f'subject="{SUBJECT}" method="DELETE" path="/v2/entities/urn:ngsi-ld:Room:1"' \
        in chain.log_text()


def test_a_filter_on_an_attribute_the_caller_may_not_read_is_refused(chain, broker, token):
    """Issue 12: q, orderBy, ... name attributes the caller reads one bit at a time. Envoy
    passes the query string as sent; a raw '+' is a space to Orion, so the filter reads it so."""
    allowed = probe()
    r = chain.request("GET", "/v2/entities?id=urn:ngsi-ld:Meter:1&type=Meter&attrs=temperature&q=temperature+%3E+20",
                      ngsi_headers(token, allowed))
    assert r.status == 200, r.body
    assert len(broker.received(allowed)) == 1
    for query in ("q=pressure+%3E+3", "q=!pressure", "orderBy=!pressure",
                  "mq=pressure.accuracy%3C1", "georel=near;maxDistance:10&geometry=point&coords=1,2"):
        p = probe()
        r = chain.request("GET", f"/v2/entities?id=urn:ngsi-ld:Meter:1&type=Meter&attrs=temperature&{query}",
                          ngsi_headers(token, p))
        assert r.status == 403, (query, r.body)
        assert broker.received(p) == [], query


def test_unclassified_paths_are_refused(chain, broker, token):
    p = probe()
    r = chain.request("GET", "/admin/config", ngsi_headers(token, p))
    assert r.status == 403
    assert broker.received(p) == []


def test_metrics_count_decisions_by_reason(chain, broker, token):
    before = chain.stats("wasmcustom.entity_acl.")
    chain.request("GET", "/v2/entities/urn:ngsi-ld:Sensor:1?type=Sensor", ngsi_headers(token, probe()))
    chain.request("GET", "/v2/entities/urn:ngsi-ld:Room:1?type=Room", ngsi_headers(token, probe()))
    after = e2e.wait_until(
        lambda: (s := chain.stats("wasmcustom.entity_acl."))
        and s.get("allowed", 0) > before.get("allowed", 0)
        and s.get("denied.forbidden", 0) > before.get("denied.forbidden", 0) and s,
        "entity_acl counters", timeout=5)
    assert after["allowed"] == before.get("allowed", 0) + 1
    assert after["denied.forbidden"] == before.get("denied.forbidden", 0) + 1


def test_without_allow_on_headers_stop_iteration_bodies_get_503_not_a_pass(
        work_dir, token_auth_wasm, acl_wasm, idp, broker, token):
    """The misconfiguration the filter cannot detect at load: Envoy holds the body from it.
    The filter's tick refuses such requests after body_timeout_ms and says why. (Separate
    filters only: render.py sets allow_on_headers_stop_iteration for the gateway, and refuses
    to render it without.)"""
    acl = dict(ACL, body_timeout_ms=500)
    with pytest.raises(ValueError, match="separate"):
        chain_envoy(work_dir, None, acl_wasm, idp, broker, "envoy-acl-misconfigured-gateway",
                    acl, acl_allow_on_headers_stop_iteration=False)
    proxy = chain_envoy(work_dir, token_auth_wasm, acl_wasm, idp, broker,
                        "envoy-acl-misconfigured", acl, acl_allow_on_headers_stop_iteration=False,
                        separate=True)
    try:
        p = probe()
        r = proxy.request("POST", "/v2/entities", ngsi_headers(token, p),
                          '{"id": "urn:ngsi-ld:Sensor:9", "type": "Sensor"}')
        assert r.status == 503
        assert broker.received(p) == []
        assert "without allow_on_headers_stop_iteration: true" in proxy.log_text()
        # Requests without a body are decided at once, as usual (the stand-in has no Sensor:9).
        p = probe()
        r = proxy.request("GET", "/v2/entities/urn:ngsi-ld:Sensor:9?type=Sensor",
                          ngsi_headers(token, p))
        assert r.status == 404 and len(broker.received(p)) == 1
    finally:
        proxy.stop()


@pytest.mark.parametrize("form", FORMS)
def test_a_new_policy_by_ecds_takes_effect_without_restart_and_a_bad_one_is_refused(
        form, request, work_dir, broker, token):
    """The ACL file changed as operators change it: for the gateway, push-config --stage
    entity_acl replaces that stage's configuration in ngsi-gateway.json (token_auth's stays);
    for the separate filters, entity-acl.json."""
    ecds_dir = os.path.join(work_dir, f"ecds-entity-acl-{form}")
    proxy = form_envoy(form, request, "envoy-acl-ecds", ecds_dir=ecds_dir)
    try:
        room = "/v2/entities/urn:ngsi-ld:Room:5?type=Room"
        assert proxy.request("GET", room, ngsi_headers(token, probe())).status == 403
        pid = proxy.pid

        def push(config, expect, extra_args=()):
            if form == "gateway":
                return e2e.push_config(proxy, work_dir, config, expect=expect,
                                       extra_args=["--stage", "entity_acl", *extra_args])
            return e2e.push_config(proxy, work_dir, config, expect=expect,
                                   resource=proxy.ecds_resource_of("entity-acl"),
                                   extra_args=extra_args)

        rooms = {"name": "rooms-too", "effect": "allow", "subjects": ["role:entities-writer"],
                 "actions": ["read"], "ngsi": {"service": "smartcity", "service_path": "/#",
                                               "entity_type": "Room"}}
        new_acl = json.loads(json.dumps(ACL))
        new_acl["acl"]["rules"].append(rooms)
        push(new_acl, expect=0)

        def reaches_broker():
            p = probe()
            status = proxy.request("GET", room, ngsi_headers(token, p)).status
            return status == 404 and len(broker.received(p)) == 1  # the stand-in has no Room:5

        assert reaches_broker()
        # A rule with an unknown subject kind: entity-acl refuses it, the last one stays.
        bad = json.loads(json.dumps(new_acl))
        bad["acl"]["rules"][0]["subjects"] = ["usr:someone"]
        # push-config refuses it offline (host-harness validate) with the filter's reason...
        stderr = push(bad, expect=1)
        assert "REFUSED offline, nothing written" in stderr
        assert 'subject kind "usr" is unknown' in stderr
        # ...and without that check, Envoy rejects it.
        stderr = push(bad, expect=1, extra_args=["--no-validate"])
        assert "REJECTED" in stderr
        refused = 'acl rule #1 "writers-sensors": subject kind "usr" is unknown'
        assert (f"ngsi-gateway: configuration refused: entity_acl: {refused}" if form == "gateway"
                else f"entity-acl: configuration refused: {refused}") in proxy.log_text()
        assert reaches_broker()
        if form == "gateway":  # --stage left token_auth's configuration as it was
            with open(proxy.ecds_resource) as f:
                plugin = json.load(f)["resources"][0]["typed_config"]["config"]
            assert json.loads(plugin["configuration"]["value"]) == {
                "token_auth": e2e.token_auth_config(request.getfixturevalue("idp")),
                "entity_acl": new_acl}
        assert proxy.pid == pid and proxy.proc.alive()
    finally:
        proxy.stop()


def test_render_refuses_a_chain_whose_identity_header_names_differ(tmp_path):
    """Issue 12: token-auth's identity_headers renamed, entity-acl on the defaults, would let
    entity-acl read headers the client sent; render.py refuses the chain (no Envoy needed)."""
    token_auth = {"identity_headers": {"subject": "x-user"}}
    acl = render.chain_filter("entity-acl", {"acl": {"rules": []}}, wasm=str(tmp_path / "a.wasm"))
    with pytest.raises(ValueError, match="identity_headers"):
        render.render(token_auth, extra_filters=[acl])
    with pytest.raises(ValueError, match="identity_headers"):
        render.write_ecds_resources(str(tmp_path), token_auth, extra_filters=[acl])
    same = render.chain_filter("entity-acl", {"identity_headers": {"subject": "X-User"},
                                              "acl": {"rules": []}},
                               wasm=str(tmp_path / "a.wasm"))
    assert "x-user" in render.render(token_auth, extra_filters=[same])


def test_render_refuses_an_unknown_or_split_broker_setting(tmp_path):
    """entity-acl and device-ownership model the broker behind the sidecar (`broker`): an
    unknown value, or two different ones in one chain, is refused before Envoy sees it."""
    wasm = str(tmp_path / "a.wasm")
    typo = render.chain_filter("entity-acl", {"broker": "fog-flow", "acl": {"rules": []}},
                               wasm=wasm)
    with pytest.raises(ValueError, match="broker 'fog-flow' is not one of"):
        render.render({}, extra_filters=[typo])
    with pytest.raises(ValueError, match="broker"):
        render.write_ecds_resources(str(tmp_path), {}, extra_filters=[typo])
    acl = render.chain_filter("entity-acl", {"broker": "fogflow", "acl": {"rules": []}},
                              wasm=wasm)
    own = render.chain_filter("device-ownership", {"sources": []}, wasm=wasm)
    with pytest.raises(ValueError, match="different brokers"):
        render.render({}, extra_filters=[own, acl])
    own_ff = render.chain_filter("device-ownership", {"broker": "fogflow", "sources": []},
                                 wasm=wasm)
    assert "fogflow" in render.render({}, extra_filters=[own_ff, acl])


def test_broker_semantics_in_envoy(work_dir, wasm, acl_wasm, idp, broker, token):
    """Issue 12 through a real Envoy: a subscription whose notifications would go to the
    metadata service (any spelling) or loopback is refused, a narrow subscribe grant does not
    change a subscription by id, and FogFlow's API is not served by an Orion sidecar. Each
    reached the broker on main."""
    acl = json.loads(json.dumps(ACL))
    acl["acl"]["rules"].append(
        {"name": "writers-subscribe-sensors", "effect": "allow",
         "subjects": ["role:entities-writer"], "actions": ["subscribe"],
         "ngsi": {"service": "smartcity", "service_path": "/#",
                  "entity_id": "urn:ngsi-ld:Sensor:*"}})
    proxy = chain_envoy(work_dir, wasm, acl_wasm, idp, broker, "envoy-broker-semantics", acl=acl)
    try:
        def subscription(url):
            return json.dumps({"subject": {"entities": [{"id": "urn:ngsi-ld:Sensor:7"}]},
                               "notification": {"http": {"url": url}}})

        for url, status in [
            ("http://169.254.169.254/latest/meta-data/", 403),
            ("http://[::ffff:a9fe:a9fe]/latest/meta-data/", 403),
            ("http://0x7f.1:1026/v2/op/update", 403),
            ("http://localhost./", 403),
            ("http://hooks.example.com/ngsi", 201),
        ]:
            p = probe()
            r = proxy.request("POST", "/v2/subscriptions",
                              ngsi_headers(token, p, **{"fiware-servicepath": "/"}),
                              subscription(url))
            if status == 403:
                assert r.status == 403, (url, r.status, r.body)
                assert broker.received(p) == [], url
            else:
                assert r.status < 300, (url, r.status, r.body)
                assert len(broker.received(p)) == 1
        p = probe()
        r = proxy.request("PATCH", "/v2/subscriptions/5f0a1b2c3d4e5f6a7b8c9d0e",
                          ngsi_headers(token, p, **{"fiware-servicepath": "/"}),
                          subscription("http://hooks.example.com/stolen"))
        assert r.status == 403, r.body
        assert broker.received(p) == []
        p = probe()
        r = proxy.request("POST", "/ngsi10/updateContext", ngsi_headers(token, p), json.dumps(
            {"contextElements": [{"entityId": {"id": "urn:ngsi-ld:Sensor:7", "type": "Sensor"},
                                  "attributes": [{"name": "t", "value": 1}]}],
             "updateAction": "UPDATE"}))
        assert r.status == 400, r.body
        assert "not served by the configured broker (orion)" in r.json()["description"]
        assert broker.received(p) == []
    finally:
        proxy.stop()
