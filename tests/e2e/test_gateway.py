"""ngsi_gateway.wasm in a real Envoy, with real JWTs from the OIDC provider and the Orion
stand-in recording what got through: token-auth then entity-acl as stages of one module, one
pass, with the ACL of test_entity_acl.py (where the two stages run as two filters); and the
whole chain token-auth -> device-ownership -> entity-acl as stages of one module, with the
ownership and ACL of test_device_ownership.py (where they run as three filters)."""

import json
import os
import uuid

import pytest

import e2e_support as e2e
import test_device_ownership as ownership_chain
from test_entity_acl import ACL, ORION, SUBJECT, ngsi_headers

GATEWAY_WASM = os.path.join(e2e.ROOT, "target", "wasm32-wasip1", "release", "ngsi_gateway.wasm")


@pytest.fixture(scope="module")
def gateway(work_dir, wasm, idp, broker):
    proxy = e2e.Envoy(
        work_dir=work_dir, name="envoy-gateway", filter_config=e2e.token_auth_config(idp),
        broker_port=broker.port, idp_port=idp.port, wasm=wasm,
        extra_filters=[e2e.render.chain_filter("entity-acl", ACL)],
    ).start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def token(idp):
    return idp.token(ORION)


def probe():
    return uuid.uuid4().hex


def test_an_allowed_write_reaches_the_broker_with_its_body_and_identity(gateway, broker, token):
    created = gateway.request("POST", "/v2/entities", ngsi_headers(token, probe()),
                              '{"id": "urn:ngsi-ld:Sensor:7", "type": "Sensor"}')
    assert created.status in (201, 422), created.body  # 422: another test created it first
    p = probe()
    body = json.dumps({"temperature": {"value": 21.5, "type": "Number"}})
    r = gateway.request("PATCH", "/v2/entities/urn:ngsi-ld:Sensor:7/attrs?type=Sensor",
                        ngsi_headers(token, p), body)
    assert r.status < 300, r.body
    [record] = broker.received(p)
    assert record["body"] == body
    assert e2e.header_values(record, "x-auth-subject") == [SUBJECT]
    assert e2e.header_values(record, "authorization") == []
    log = gateway.log_text()
    assert "token-auth decision=allow" in log
    assert "entity-acl decision=allow" in log


def test_a_forbidden_entity_is_refused_by_the_entity_acl_stage(gateway, broker, token):
    p = probe()
    r = gateway.request("PATCH", "/v2/entities/urn:ngsi-ld:Room:1/attrs?type=Room",
                        ngsi_headers(token, p), '{"temperature": {"value": 99}}')
    assert r.status == 403
    assert r.json() == {"error": "Forbidden",
                        "description": "the caller is not allowed to perform this request"}
    assert broker.received(p) == []


def test_no_token_is_refused_by_the_token_auth_stage_and_forged_identity_counts_for_nothing(
        gateway, broker):
    p = probe()
    headers = ngsi_headers("x", p, **{"x-auth-subject": SUBJECT, "x-roles": "admin"})
    del headers["authorization"]
    r = gateway.request("GET", "/v2/entities/urn:ngsi-ld:Sensor:7?type=Sensor", headers)
    assert r.status == 401
    assert r.header("www-authenticate").startswith("Bearer")
    assert broker.received(p) == []


def test_a_body_over_the_limit_gets_413_without_reaching_the_broker(gateway, broker, token):
    p = probe()
    big = json.dumps({"temperature": {"value": "x" * 5000}})
    r = gateway.request("PATCH", "/v2/entities/urn:ngsi-ld:Sensor:7/attrs?type=Sensor",
                        ngsi_headers(token, p), big)
    assert r.status == 413
    assert broker.received(p) == []


# ---- the three stages: token-auth -> device-ownership -> entity-acl in one module ----

def three_stage_gateway(work_dir, idp, broker, name, ownership, owners_port=None):
    return e2e.Envoy(
        work_dir=work_dir, name=name, filter_config=e2e.token_auth_config(idp),
        broker_port=broker.port, idp_port=idp.port,
        wasm=e2e.copy_module(work_dir, GATEWAY_WASM), owners_port=owners_port,
        extra_filters=[e2e.render.chain_filter("device-ownership", ownership),
                       e2e.render.chain_filter("entity-acl", ownership_chain.ACL)],
        allow_on_headers_stop_iteration=True,
    ).start()


@pytest.fixture(scope="module")
def chain(work_dir, idp, broker):
    """Ownership read from the broker itself (the owner attribute), as test_device_ownership."""
    ownership = {"sources": [{"kind": "broker", "cluster": "broker",
                              "authority": f"127.0.0.1:{broker.port}"}],
                 "cache": {"ttl_secs": 1, "negative_ttl_secs": 1}}
    proxy = three_stage_gateway(work_dir, idp, broker, "envoy-gateway-3", ownership)
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def tokens(idp):
    return {ownership_chain.GATEWAY: idp.token(ORION),
            ownership_chain.APP: idp.token(ORION, client=e2e.IdP.OTHER_CLIENT)}


SENSORS, APP = ownership_chain.GATEWAY, ownership_chain.APP
call, new_id = ownership_chain.call, ownership_chain.new_id


def test_three_stages_the_creator_owns_and_only_the_owner_reads(chain, broker, tokens):
    lamp, p = new_id("Lamp"), probe()
    r = call(chain, tokens, SENSORS, "POST", "/v2/entities", {"id": lamp, "type": "Lamp"},
             probe=p)
    assert r.status == 201, r.body
    # The body device-ownership rewrote (owner injected) is what entity-acl let through.
    [record] = broker.received(p)
    assert json.loads(record["body"])["owner"] == {"type": "Text", "value": SENSORS}
    assert call(chain, tokens, SENSORS, "GET", f"/v2/entities/{lamp}").status == 200
    p = probe()
    r = call(chain, tokens, APP, "GET", f"/v2/entities/{lamp}", probe=p)
    assert r.status == 403 and r.json()["error"] == "Forbidden"
    assert broker.received(p) == []
    p = probe()
    r = call(chain, tokens, APP, "PATCH", f"/v2/entities/{lamp}/attrs",
             {"on": {"type": "Boolean", "value": False}}, probe=p)
    assert r.status == 403 and broker.received(p) == []
    log = chain.log_text()
    for line in ("token-auth decision=allow", "device-ownership decision=allow",
                 "device-ownership decision=deny status=403", "entity-acl decision=allow"):
        assert line in log, line


def test_three_stages_entity_acl_still_decides_after_ownership(chain, broker, tokens):
    lamp = new_id("Lamp")
    assert call(chain, tokens, SENSORS, "POST", "/v2/entities",
                {"id": lamp, "type": "Lamp"}).status == 201
    # The owner may delete (ownership), the ACL has no delete rule: 403 from entity-acl.
    p = probe()
    r = call(chain, tokens, SENSORS, "DELETE", f"/v2/entities/{lamp}", probe=p)
    assert r.status == 403 and broker.received(p) == []
    assert "entity-acl decision=deny status=403" in chain.log_text()


def test_three_stages_a_list_answer_holds_only_the_callers_entities(chain, tokens):
    kind = f"Meter{uuid.uuid4().hex[:6]}"
    mine = [new_id(kind) for _ in range(2)]
    theirs = new_id(kind)
    for entity in mine:
        assert call(chain, tokens, APP, "POST", "/v2/entities",
                    {"id": entity, "type": kind}).status == 201
    assert call(chain, tokens, SENSORS, "POST", "/v2/entities",
                {"id": theirs, "type": kind}).status == 201
    r = call(chain, tokens, APP, "GET", f"/v2/entities?type={kind}&options=count")
    assert r.status == 200, r.body
    assert sorted(e["id"] for e in r.json()) == sorted(mine)
    assert r.header("fiware-total-count") in (None, "2")
    r = call(chain, tokens, SENSORS, "GET", f"/v2/entities?type={kind}")
    assert [e["id"] for e in r.json()] == [theirs]
    assert "list filtered: kept 1 of 3 entities" in chain.log_text()


def test_three_stages_a_registry_that_can_not_be_reached_is_503(work_dir, idp, broker, tokens):
    """The registry's cluster points at a closed port: every lookup fails, the request fails
    closed with 503 and never reaches the broker."""
    ownership = {"sources": [{"kind": "registry", "cluster": "owners", "timeout_ms": 1000}]}
    proxy = three_stage_gateway(work_dir, idp, broker, "envoy-gateway-3-down", ownership,
                                owners_port=e2e.free_port())
    try:
        p = probe()
        r = call(proxy, tokens, SENSORS, "GET", f"/v2/entities/{new_id('Lamp')}", probe=p)
        assert r.status == 503, r.body
        assert broker.received(p) == []
        assert "device-ownership decision=deny status=503 reason=unavailable" in proxy.log_text()
    finally:
        proxy.stop()
