"""ngsi_gateway.wasm in a real Envoy: token-auth then entity-acl as stages of one module, one
pass, with real JWTs from the OIDC provider and the Orion stand-in recording what got through.
The same ACL as test_entity_acl.py (where the two stages run as two filters)."""

import json
import os
import uuid

import pytest

import e2e_support as e2e
from test_entity_acl import ACL, ORION, SUBJECT, ngsi_headers

GATEWAY_WASM = os.path.join(e2e.ROOT, "target", "wasm32-wasip1", "release", "ngsi_gateway.wasm")


@pytest.fixture(scope="module")
def gateway(work_dir, idp, broker):
    wasm = e2e.copy_module(work_dir, GATEWAY_WASM)
    proxy = e2e.Envoy(
        work_dir=work_dir, name="envoy-gateway",
        filter_config={"token_auth": e2e.token_auth_config(idp), "entity_acl": ACL},
        broker_port=broker.port, idp_port=idp.port, wasm=wasm,
        allow_on_headers_stop_iteration=True,
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
