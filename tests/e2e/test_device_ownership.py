"""token-auth -> device-ownership -> entity-acl in a real Envoy, the ownership read from the
broker itself (the owner attribute, through the broker's Envoy cluster): two callers with real
JWTs from the OIDC provider, "sensor-gateway" and "parking-app". The creator becomes the owner
(the filter injects the owner attribute into the create body), only the owner reads and writes
its entities, list answers hold only what the caller may read."""

import json
import os
import uuid

import pytest

import e2e_support as e2e
import render

ORION = "urn:orion"
GATEWAY, APP = "sensor-gateway", "parking-app"

# entity-acl behind ownership: both callers may do anything in the default tenant but delete
# (ownership decides whose entities; the ACL what kind of operation).
ACL = {"acl": {"rules": [
    {"name": "callers", "effect": "allow", "subjects": ["authenticated"],
     "actions": ["read", "create", "write", "subscribe"],
     "ngsi": {"service": "", "service_path": "/#"}},
]}}


@pytest.fixture(scope="module")
def chain(work_dir, token_auth_wasm, idp, broker):
    """The separate filters (the wrappers of the stages; the same chain as ngsi-gateway's
    stages runs in test_gateway.py)."""
    ownership = {"sources": [{"kind": "broker", "cluster": "broker",
                              "authority": f"127.0.0.1:{broker.port}"}],
                 "cache": {"ttl_secs": 1, "negative_ttl_secs": 1}}
    proxy = e2e.Envoy(
        work_dir=work_dir, name="envoy-ownership", filter_config=e2e.token_auth_config(idp),
        broker_port=broker.port, idp_port=idp.port, wasm=token_auth_wasm, separate=True,
        extra_filters=[
            render.chain_filter("device-ownership", ownership,
                                e2e.copy_module(work_dir, os.path.join(
                                    render.WASM_DIR, "device_ownership.wasm"))),
            render.chain_filter("entity-acl", ACL,
                                e2e.copy_module(work_dir, os.path.join(
                                    render.WASM_DIR, "entity_acl.wasm"))),
        ]).start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def tokens(idp):
    return {GATEWAY: idp.token(ORION), APP: idp.token(ORION, client=e2e.IdP.OTHER_CLIENT)}


def call(chain, tokens, who, method, path, body=None, probe=None):
    headers = {"authorization": f"Bearer {tokens[who]}", "x-e2e-probe": probe or uuid.uuid4().hex}
    if body is not None:
        headers["content-type"] = "application/json"
        body = json.dumps(body)
    return chain.request(method, path, headers, body)


def new_id(kind):
    return f"urn:ngsi-ld:{kind}:{uuid.uuid4().hex[:8]}"


def test_the_creator_becomes_the_owner(chain, broker, tokens):
    lamp, p = new_id("Lamp"), uuid.uuid4().hex
    r = call(chain, tokens, GATEWAY, "POST", "/v2/entities",
             {"id": lamp, "type": "Lamp", "on": {"type": "Boolean", "value": True}}, probe=p)
    assert r.status == 201, r.body
    [record] = broker.received(p)
    assert json.loads(record["body"])["owner"] == {"type": "Text", "value": GATEWAY}


def test_only_the_owner_reads_and_writes(chain, broker, tokens):
    lamp = new_id("Lamp")
    assert call(chain, tokens, GATEWAY, "POST", "/v2/entities",
                {"id": lamp, "type": "Lamp"}).status == 201
    assert call(chain, tokens, GATEWAY, "GET", f"/v2/entities/{lamp}").status == 200
    p = uuid.uuid4().hex
    r = call(chain, tokens, APP, "GET", f"/v2/entities/{lamp}", probe=p)
    assert r.status == 403 and r.json()["error"] == "Forbidden"
    assert broker.received(p) == []
    p = uuid.uuid4().hex
    r = call(chain, tokens, APP, "PATCH", f"/v2/entities/{lamp}/attrs",
             {"on": {"type": "Boolean", "value": False}}, probe=p)
    assert r.status == 403
    assert broker.received(p) == []
    assert call(chain, tokens, GATEWAY, "PATCH", f"/v2/entities/{lamp}/attrs",
                {"on": {"type": "Boolean", "value": False}}).status == 204
    assert "device-ownership decision=deny" in chain.log_text()


def test_nobody_takes_over_an_entity_or_names_another_owner(chain, broker, tokens):
    lamp = new_id("Lamp")
    assert call(chain, tokens, GATEWAY, "POST", "/v2/entities",
                {"id": lamp, "type": "Lamp"}).status == 201
    p = uuid.uuid4().hex
    r = call(chain, tokens, APP, "PATCH", f"/v2/entities/{lamp}/attrs",
             {"owner": {"type": "Text", "value": APP}}, probe=p)
    assert r.status == 403 and broker.received(p) == []
    p = uuid.uuid4().hex
    r = call(chain, tokens, APP, "POST", "/v2/entities",
             {"id": new_id("Lamp"), "type": "Lamp", "owner": {"type": "Text", "value": GATEWAY}},
             probe=p)
    assert r.status == 403 and broker.received(p) == []


def test_a_list_answer_holds_only_the_callers_entities(chain, broker, tokens):
    kind = f"Meter{uuid.uuid4().hex[:6]}"
    mine = [new_id(kind) for _ in range(2)]
    theirs = new_id(kind)
    for entity in mine:
        assert call(chain, tokens, APP, "POST", "/v2/entities",
                    {"id": entity, "type": kind}).status == 201
    assert call(chain, tokens, GATEWAY, "POST", "/v2/entities",
                {"id": theirs, "type": kind}).status == 201
    r = call(chain, tokens, APP, "GET", f"/v2/entities?type={kind}&options=count")
    assert r.status == 200, r.body
    assert sorted(e["id"] for e in r.json()) == sorted(mine)
    assert r.header("fiware-total-count") in (None, "2")
    r = call(chain, tokens, GATEWAY, "GET", f"/v2/entities?type={kind}")
    assert [e["id"] for e in r.json()] == [theirs]
    # The rewritten answer carries its own length (set in the body callback, not removed).
    assert r.header("content-length") == str(len(r.body))


def test_an_answer_filtering_leaves_as_it_is_reaches_the_client_as_the_broker_sent_it(
        chain, tokens):
    kind = f"Meter{uuid.uuid4().hex[:6]}"
    for _ in range(2):
        assert call(chain, tokens, APP, "POST", "/v2/entities",
                    {"id": new_id(kind), "type": kind}).status == 201
    r = call(chain, tokens, APP, "GET", f"/v2/entities?type={kind}&options=count")
    assert r.status == 200, r.body
    assert len(r.json()) == 2
    # The broker's own bytes (Python's json.dumps spacing), not the filter's compact
    # re-serialization, with the broker's length and count.
    assert r.body == json.dumps(r.json()).encode()
    assert r.header("content-length") == str(len(r.body))
    assert r.header("fiware-total-count") == "2"


def test_a_list_answer_over_max_response_bytes_is_refused_by_the_filter(
        chain, broker, tokens):
    """A list answer between max_response_bytes (768 KiB by default) and Envoy's buffer limit
    (1 MiB): the filter's 503 with its NGSI error. With the old default (4 MiB) this answer
    passed, and any answer over 1 MiB got Envoy's own bare 500 instead (Envoy's buffer overflows
    before the filter has seen the whole answer); one over 1 MiB can still do so when a single
    read delivers more than the headroom (filters/device-ownership/README.md)."""
    kind = f"Bulky{uuid.uuid4().hex[:6]}"
    ids = [new_id(kind) for _ in range(3)]
    try:
        for entity in ids:  # ~300 KB each: under every request limit, ~900 KB as a list
            assert call(chain, tokens, APP, "POST", "/v2/entities",
                        {"id": entity, "type": kind,
                         "data": {"type": "Text", "value": "x" * 300_000}}).status == 201
        r = call(chain, tokens, APP, "GET", f"/v2/entities?type={kind}")
        assert r.status == 503, (r.status, r.body[:200])
        assert r.json()["error"] == "ServiceUnavailable", r.body[:200]
    finally:
        # Straight to the stand-in: nothing this large stays for later tests' list answers.
        for entity in ids:
            e2e.request(broker.port, "DELETE", f"/v2/entities/{entity}", timeout=5)
