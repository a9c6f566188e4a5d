"""render.py as an operator runs it: the chain token-auth -> entity-acl rendered as
ngsi-gateway (one filter, one module: the default), its configuration checked offline in the real .wasm,
discovered by ECDS from DIR/ngsi-gateway.json, and its policy changed at run time with
push-config, in a real Envoy with real JWTs and the Orion stand-in recording what got through."""

import copy
import json
import os
import subprocess
import sys
import uuid

import pytest

import e2e_support as e2e
from test_entity_acl import ACL, ORION, ngsi_headers

RENDER = os.path.join(e2e.ROOT, "envoy", "render.py")
GATEWAY_WASM = os.path.join(e2e.ROOT, "target", "wasm32-wasip1", "release", "ngsi_gateway.wasm")
SENSOR = "/v2/entities/urn:ngsi-ld:Sensor:7?type=Sensor"
CALIBRATION = "/v2/entities/urn:ngsi-ld:Sensor:calibration-1?type=Sensor"


def write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f)
    return path


def render_cli(work_dir, *args):
    return subprocess.run([sys.executable, RENDER, *args],
                          capture_output=True, text=True, timeout=120)


def http_filter_names(yaml_text):
    """The filters before the router: an ECDS entry's name, or an inline wasm filter's vm_id."""
    http_filters = yaml_text.split("http_filters:")[1].split("envoy.filters.http.router")[0]
    names = []
    for line in http_filters.splitlines():
        line = line.strip()
        if line.startswith("- name: ") and line != "- name: envoy.filters.http.wasm":
            names.append(line[len("- name: "):])
        elif line.startswith("vm_id: "):
            names.append(line[len("vm_id: "):])
    return names


@pytest.fixture(scope="module")
def gateway_wasm(work_dir):
    return e2e.copy_module(work_dir, GATEWAY_WASM)


def test_render_py_gateway_runs_the_chain_as_one_module_and_push_config_changes_its_policy(
        work_dir, gateway_wasm, idp, broker):
    ecds_dir = os.path.join(work_dir, "gateway-ecds-cli")
    os.makedirs(ecds_dir, exist_ok=True)
    token_auth = e2e.token_auth_config(idp)
    done = render_cli(
        work_dir, "--filter-config", write_json(os.path.join(work_dir, "gw-ta.json"), token_auth),
        "--entity-acl-config", write_json(os.path.join(work_dir, "gw-acl.json"), ACL),
        "--wasm", gateway_wasm, "--ecds", ecds_dir, "--listen", "127.0.0.1:0",
        "--admin", "127.0.0.1:0", "--broker", f"127.0.0.1:{broker.port}",
        "--idp", f"127.0.0.1:{idp.port}", "--node-id", "envoy-gateway-cli")
    assert done.returncode == 0, done.stderr
    assert "NOT validated" not in done.stderr  # host-harness validate checked it
    resource_path = os.path.join(ecds_dir, "ngsi-gateway.json")
    assert f"wrote ngsi-gateway's ECDS resource {resource_path}" in done.stderr
    # One filter: the gateway, with each stage's configuration under its key.
    with open(resource_path) as f:
        resource = json.load(f)
    plugin = resource["resources"][0]["typed_config"]["config"]
    assert json.loads(plugin["configuration"]["value"]) == {"token_auth": token_auth,
                                                            "entity_acl": ACL}
    assert plugin["allow_on_headers_stop_iteration"] is True
    assert http_filter_names(done.stdout) == ["ngsi-gateway"]

    proxy = e2e.Envoy(work_dir=work_dir, name="envoy-gateway-cli", filter_config=token_auth,
                      broker_port=broker.port, idp_port=idp.port, wasm=gateway_wasm,
                      ecds_dir=ecds_dir)
    proxy.launch(done.stdout, "wasm:debug")
    try:
        token = idp.token(ORION)
        p = uuid.uuid4().hex
        r = proxy.request("GET", SENSOR, ngsi_headers(token, p))
        assert len(broker.received(p)) == 1, (r.status, r.body)  # read on Sensors: allowed
        p = uuid.uuid4().hex
        r = proxy.request("GET", CALIBRATION, ngsi_headers(token, p))
        assert r.status == 403 and broker.received(p) == []

        # New policy: Sensors may be written but no longer read. No restart.
        stricter = copy.deepcopy(ACL)
        stricter["acl"]["rules"][0]["actions"] = ["create", "write"]
        e2e.push_config(proxy, work_dir, {"token_auth": token_auth, "entity_acl": stricter},
                        resource=resource_path)
        p = uuid.uuid4().hex
        r = proxy.request("GET", SENSOR, ngsi_headers(token, p))
        assert r.status == 403, r.body
        assert broker.received(p) == []
        assert "rule=\"default-deny\"" in proxy.log_text()
    finally:
        proxy.stop()


def test_render_py_gateway_refuses_a_bad_stage_configuration_naming_its_path(work_dir, idp):
    bad_acl = copy.deepcopy(ACL)
    bad_acl["acl"]["rules"][1]["effect"] = "permit"
    done = render_cli(
        work_dir,
        "--filter-config", write_json(os.path.join(work_dir, "gw-ta-2.json"),
                                      e2e.token_auth_config(idp)),
        "--entity-acl-config", write_json(os.path.join(work_dir, "gw-bad-acl.json"), bad_acl),
        "--wasm", GATEWAY_WASM)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert "ngsi-gateway: the filter refuses this configuration" in done.stderr
    assert "entity_acl.acl.rules[1].effect" in done.stderr, done.stderr


def test_render_py_offers_the_gateway_by_default_and_the_separate_filters_on_request(
        work_dir, idp):
    """The forms on the command line (no Envoy, --no-validate: the structure only): the default
    is one ngsi-gateway filter, --gateway is the same (kept for scripts written when it was a
    switch), --separate renders the separate filters, and what the gateway cannot run as given
    stops render.py with a message naming --separate instead of switching form silently."""
    args = ["--no-validate",
            "--filter-config", write_json(os.path.join(work_dir, "forms-ta.json"),
                                          e2e.token_auth_config(idp)),
            "--entity-acl-config", write_json(os.path.join(work_dir, "forms-acl.json"), ACL)]
    default = render_cli(work_dir, *args)
    assert default.returncode == 0, default.stderr
    assert http_filter_names(default.stdout) == ["ngsi-gateway"]
    assert os.path.abspath(GATEWAY_WASM) in default.stdout
    alias = render_cli(work_dir, "--gateway", *args)
    assert alias.returncode == 0 and alias.stdout == default.stdout
    separate = render_cli(work_dir, "--separate", *args)
    assert separate.returncode == 0, separate.stderr
    assert http_filter_names(separate.stdout) == ["token-auth", "entity-acl"]

    both = render_cli(work_dir, "--gateway", "--separate", *args)
    assert both.returncode == 2 and both.stdout == ""
    assert "contradict" in both.stderr
    token_auth_module = render_cli(work_dir, *args, "--wasm", e2e.WASM)
    assert token_auth_module.returncode == 2 and token_auth_module.stdout == ""
    assert "token_auth.wasm is a separate filter's module" in token_auth_module.stderr
    assert "--separate" in token_auth_module.stderr
    acl_module = render_cli(work_dir, *args, "--entity-acl-wasm", e2e.WASM)
    assert acl_module.returncode == 2 and "--separate" in acl_module.stderr
    # The same in the Python API: a chain the gateway has no stage for.
    probe = e2e.render.test_probe_filter({"mode": "buffer"})
    with pytest.raises(ValueError, match="abi-probe is not a stage of ngsi-gateway.*--separate"):
        e2e.render.render(e2e.token_auth_config(idp), extra_filters=[probe])
    with pytest.raises(ValueError, match="separate"):
        e2e.render.render(None, extra_filters=[e2e.render.chain_filter("entity-acl", ACL)])
    acl, own = (e2e.render.chain_filter(n, c) for n, c in
                (("entity-acl", ACL), ("device-ownership", {"sources": []})))
    with pytest.raises(ValueError, match="in the order.*--separate"):
        e2e.render.render(e2e.token_auth_config(idp), extra_filters=[acl, own])
