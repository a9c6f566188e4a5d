"""What an operator sees of the filters' decisions, through a real Envoy (token-auth ->
entity-acl, rendered from envoy/sidecar.yaml): the JSON access log with the deciding filter's
facts (filter state wasm.iot_*), the labelled decision counters on /stats/prometheus, and the
decision line carrying the request's x-request-id."""

import json
import os
import re
import uuid

import pytest

import e2e_support as e2e
import render  # envoy/render.py (e2e_support puts envoy/ on the path)

ENTITY_ACL_WASM = os.path.join(e2e.ROOT, "target", "wasm32-wasip1", "release", "entity_acl.wasm")
ORION = "urn:orion"
SUBJECT = "sensor-gateway"

ACL = {
    "acl": {"rules": [
        {"name": "writers-sensors", "effect": "allow", "subjects": ["role:entities-writer"],
         "actions": ["create", "write", "read"],
         "ngsi": {"service": "smartcity", "service_path": "/sensors/#",
                  "entity_id": "urn:ngsi-ld:Sensor:*", "entity_type": "Sensor"}},
        {"name": "no-calibration", "effect": "deny", "subjects": ["anyone"], "actions": ["*"],
         "ngsi": {"service": "*", "service_path": "/#",
                  "entity_id": "urn:ngsi-ld:Sensor:calibration*"}},
    ]},
}


@pytest.fixture(scope="module")
def chain(work_dir, wasm, idp, broker):
    acl_wasm = e2e.copy_module(work_dir, ENTITY_ACL_WASM)
    proxy = e2e.Envoy(
        work_dir=work_dir, name="envoy-observability", filter_config=e2e.token_auth_config(idp),
        broker_port=broker.port, idp_port=idp.port, wasm=wasm,
        extra_filters=[render.chain_filter("entity-acl", ACL, acl_wasm,
                                           allow_on_headers_stop_iteration=True)],
    ).start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def token(idp):
    return idp.token(ORION)


def headers(token=None):
    h = {"fiware-service": "smartcity", "fiware-servicepath": "/sensors"}
    if token:
        h["authorization"] = f"Bearer {token}"
    return h


def access_log_entry(proxy, path):
    """The access log's JSON line for the request to `path`."""
    return e2e.access_log_entry(proxy, lambda entry: entry.get("path") == path, path)


def test_a_denial_names_filter_decision_reason_subject_and_rule(chain, token):
    sensor = f"urn:ngsi-ld:Sensor:calibration-{uuid.uuid4().hex}"
    r = chain.request("GET", f"/v2/entities/{sensor}?type=Sensor", headers(token))
    assert r.status == 403
    entry = access_log_entry(chain, f"/v2/entities/{sensor}")
    assert entry["status"] == 403
    assert {k: entry[k] for k in ("filter", "decision", "decision_status", "reason", "subject",
                                  "rule")} == {
        "filter": "entity-acl", "decision": "deny", "decision_status": "403",
        "reason": "forbidden", "subject": SUBJECT, "rule": "no-calibration"}
    # The query is never logged (it may carry a credential).
    assert entry["path"] == f"/v2/entities/{sensor}"
    # The decision line carries the same request id, so the two can be joined.
    request_id = entry["request_id"]
    assert request_id and request_id != "-"
    [line] = [l for l in chain.log_text().splitlines() if sensor in l and "filter=entity-acl" in l]
    assert f'request_id="{request_id}"' in line
    assert ('decision=deny status=403 reason=forbidden subject="sensor-gateway" method="GET" '
            f'path="/v2/entities/{sensor}" tenant="smartcity" request_id="{request_id}" '
            'rule="no-calibration"') in line


def test_an_allow_is_the_last_filters_and_names_its_rule(chain, token):
    sensor = f"urn:ngsi-ld:Sensor:{uuid.uuid4().hex}"
    r = chain.request("GET", f"/v2/entities/{sensor}?type=Sensor", headers(token))
    assert r.status < 500, r.body
    entry = access_log_entry(chain, f"/v2/entities/{sensor}")
    assert entry["status"] == r.status
    assert (entry["filter"], entry["decision"], entry["decision_status"], entry["reason"],
            entry["subject"], entry["rule"]) == (
        "entity-acl", "allow", "-", "allowed", SUBJECT, "writers-sensors")


def test_an_unauthenticated_request_is_token_auths_denial(chain):
    sensor = f"urn:ngsi-ld:Sensor:{uuid.uuid4().hex}"
    r = chain.request("GET", f"/v2/entities/{sensor}", headers())
    assert r.status == 401
    entry = access_log_entry(chain, f"/v2/entities/{sensor}")
    assert (entry["filter"], entry["decision"], entry["decision_status"], entry["reason"],
            entry["subject"]) == ("token-auth", "deny", "401", "unauthenticated", "-")


def prometheus_counter(proxy, metric, *label_names):
    """{(label values, in label_names order): count} of `metric` on /stats/prometheus, once
    what the filters counted so far reached Envoy."""
    proxy.settle_counters()
    out = {}
    for line in proxy.admin("/stats/prometheus").body.decode().splitlines():
        m = re.fullmatch(re.escape(metric) + r"\{(.*)\} (\d+)", line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            out[tuple(labels[n] for n in label_names)] = int(m.group(2))
    return out


def prometheus_decisions(proxy):
    return prometheus_counter(proxy, "iot_decisions", "filter", "decision", "reason")


def prometheus_rule_decisions(proxy):
    return prometheus_counter(proxy, "iot_rule_decisions", "filter", "rule", "decision")


def test_prometheus_has_decisions_labelled_by_filter_decision_and_reason(chain, token):
    before = prometheus_decisions(chain)
    before_rules = prometheus_rule_decisions(chain)
    r = chain.request("GET", "/v2/entities/urn:ngsi-ld:Sensor:calibration-9?type=Sensor",
                      headers(token))
    assert r.status == 403
    r = chain.request("GET", "/v2/entities/urn:ngsi-ld:Sensor:9?type=Sensor", headers())
    assert r.status == 401
    after = prometheus_decisions(chain)
    key = ("entity_acl", "deny", "forbidden")
    assert after.get(key, 0) - before.get(key, 0) == 1, after
    key = ("token_auth", "deny", "unauthenticated")
    assert after.get(key, 0) - before.get(key, 0) == 1, after
    # Per rule: the deny rule that refused the calibration entity.
    rules = prometheus_rule_decisions(chain)
    assert rules.get(("entity_acl", "no-calibration", "deny"), 0) - before_rules.get(
        ("entity_acl", "no-calibration", "deny"), 0) == 1, rules
    # The labelled counters replace no name: the per-filter counters are still there.
    text = chain.admin("/stats/prometheus").body.decode()
    assert re.search(r"^entity_acl_denied_forbidden\{\} \d+$", text, re.M)
    assert "# TYPE iot_decisions counter" in text


def test_prometheus_counts_decisions_per_rule_with_default_deny_for_unmatched(chain, token):
    before = prometheus_rule_decisions(chain)
    r = chain.request("GET", "/v2/entities/urn:ngsi-ld:Sensor:9?type=Sensor", headers(token))
    assert r.status < 500
    r = chain.request("GET", "/v2/entities/urn:ngsi-ld:Room:9?type=Room", headers(token))
    assert r.status == 403
    after = prometheus_rule_decisions(chain)

    def grew(key):
        return after.get(key, 0) - before.get(key, 0)
    assert grew(("entity_acl", "writers-sensors", "allow")) == 1, after
    assert grew(("entity_acl", "default-deny", "deny")) == 1, after
    # Only ACL rules have counters: token-auth's decisions name no rule.
    assert not [k for k in after if k[0] == "token_auth"], after
    text = chain.admin("/stats/prometheus").body.decode()
    assert "# TYPE iot_rule_decisions counter" in text
