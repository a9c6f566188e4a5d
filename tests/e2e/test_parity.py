"""Parity: the same scenarios through host-harness and through a real Envoy give the same
outcomes. Each scenario's filters (the same .wasm, the same configurations) are loaded into an
Envoy in front of the Orion stand-in, every replayable request of the scenario is sent to it,
and what the client got is compared with what `host-harness run --outcomes` reports:

* whether the request reached the broker: always equal;
* for a request a filter answered: the same status and NGSI `error`.

A forwarded request's status is the broker's: the harness's upstream is canned, the
stand-in's is not, so only "forwarded" is compared. One known difference is tolerated and
counted: Envoy normalizes paths (normalize_path, merge_slashes) before any filter, so an unclean
path the harness refuses as 400 may reach the filters clean in Envoy; it must still be refused.

Steps that need what a plain HTTP/1 client cannot send here (TLS, trailers, concurrency, clock
moves, reconfiguration, a forced Content-Length) are skipped; the test requires that most steps
of each scenario are compared.
"""

import json
import os
import subprocess
import tomllib
import uuid

import pytest

import e2e_support as e2e
import render

SCENARIOS = os.path.join(e2e.ROOT, "tests", "scenarios")
HARNESS = os.path.join(e2e.ROOT, "target", "debug", "host-harness")
WASM_DIR = os.path.join(e2e.ROOT, "target", "wasm32-wasip1", "release")
CHAIN_WASM = {"entity_acl.wasm": "entity-acl", "device_ownership.wasm": "device-ownership"}
GATEWAY_WASM = "ngsi_gateway.wasm"
# ngsi-gateway's stage keys after token_auth, in chain order, and the filter each one is.
GATEWAY_STAGES = {"device_ownership": "device-ownership", "entity_acl": "entity-acl"}

PARITY_SCENARIOS = [
    "entity-acl-ngsi-v2.toml",
    "entity-acl-ngsi-ld.toml",
    "entity-acl-fogflow.toml",
    "entity-acl-chain.toml",
    "entity-acl-shadow.toml",
    "device-ownership-static.toml",
    "ngsi-gateway-chain.toml",
]


def filter_config(f):
    return json.loads(f["config_json"]) if "config_json" in f else f.get("config", {})


def chain_of(scenario):
    """(token-auth's configuration or None, the later filters, whether it is ngsi-gateway)
    for render: the gateway's configuration is split into its stages' and rendered back as
    the gateway (render.py's default); the separate filters' scenarios render with
    --separate."""
    token_auth, extra = None, []
    for f in scenario["filter"]:
        if f["wasm"] == GATEWAY_WASM:
            config = filter_config(f)
            if len(scenario["filter"]) != 1 or "token_auth" not in config:
                raise ValueError("parity renders a gateway alone, with its token_auth stage")
            extra = [render.chain_filter(name, config[key])
                     for key, name in GATEWAY_STAGES.items() if key in config]
            return config["token_auth"], extra, True
        if f["wasm"] == "token_auth.wasm":
            token_auth = filter_config(f)
        elif f["wasm"] in CHAIN_WASM:
            extra.append(render.chain_filter(CHAIN_WASM[f["wasm"]], filter_config(f),
                                             os.path.join(WASM_DIR, f["wasm"])))
        else:
            raise ValueError(f"no Envoy rendering for {f['wasm']}")
    return token_auth, extra, False


def replayable(step):
    req = step.get("request")
    if req is None or any(k in step for k in ("concurrent", "connection", "reconfigure",
                                               "advance_clock_ms", "upstream")):
        return False
    if any(k in req for k in ("tls", "trailers", "properties")):
        return False
    headers = req.get("headers", {})
    names = [k for k, _ in headers] if isinstance(headers, list) else list(headers)
    return "content-length" not in [n.lower() for n in names]


def unclean(path):
    p = path.split("?")[0]
    return "//" in p or "/./" in p or "/../" in p or p.endswith(("/.", "/.."))


def harness_outcomes(path, work_dir):
    out = os.path.join(work_dir, f"outcomes-{uuid.uuid4().hex[:8]}.json")
    done = subprocess.run([HARNESS, "run", "--wasm-dir", WASM_DIR, "--outcomes", out, path],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"the scenario fails in the harness:\n{done.stdout}{done.stderr}"
    with open(out) as f:
        return {o["step"]: o["outcome"] for o in json.load(f)}


def send(proxy, req, probe):
    headers = req.get("headers", {})
    pairs = list(headers) if isinstance(headers, list) else list(headers.items())
    pairs = [(k, v) for k, v in pairs] + [("x-e2e-probe", probe)]
    method, path = req.get("method", "GET"), req["path"]
    if "body_chunks" in req:
        conn = e2e.Connection(proxy.port)
        try:
            conn.start_chunked(method, path, pairs)
            for chunk in req["body_chunks"]:
                conn.send_chunk(chunk)
            return conn.finish()
        finally:
            conn.close()
    return proxy.request(method, path, pairs, req.get("body"))


@pytest.mark.parametrize("name", PARITY_SCENARIOS)
def test_harness_and_envoy_agree(name, work_dir, token_auth_wasm, idp, broker):
    path = os.path.join(SCENARIOS, name)
    with open(path, "rb") as f:
        scenario = tomllib.load(f)
    expected = harness_outcomes(path, work_dir)
    token_auth, extra, gateway = chain_of(scenario)
    proxy = e2e.Envoy(work_dir=work_dir, name=f"parity-{name[:-5]}", filter_config=token_auth,
                      broker_port=broker.port, idp_port=idp.port,
                      wasm=os.path.join(WASM_DIR, GATEWAY_WASM) if gateway else token_auth_wasm,
                      extra_filters=extra, separate=not gateway).start()
    compared, normalized, differences = 0, 0, []
    steps = [s for s in scenario.get("step", []) if "request" in s]
    try:
        for n, step in enumerate(scenario.get("step", [])):
            step_name = step.get("name") or f"step {n + 1}"
            if not replayable(step) or step_name not in expected:
                continue
            want = expected[step_name]
            probe = uuid.uuid4().hex
            r = send(proxy, step["request"], probe)
            reached = len(broker.received(probe)) > 0
            got = {"status": r.status, "upstream": reached}
            if not reached:
                try:
                    got["error"] = r.json().get("error")
                except ValueError:
                    got["error"] = None
            compared += 1
            if reached != want["upstream"]:
                differences.append(f"{step_name}: harness upstream={want['upstream']}, Envoy {got}")
            elif not reached and (r.status, got["error"]) != (want["status"], want.get("error")):
                if unclean(step["request"]["path"]):
                    normalized += 1  # Envoy normalized the path; it was refused all the same
                else:
                    differences.append(f"{step_name}: harness {want}, Envoy {got}")
    finally:
        proxy.stop()
    print(f"{name}: {compared} of {len(steps)} request steps compared, {normalized} refused "
          f"after Envoy normalized the path")
    assert not differences, "harness and Envoy differ:\n" + "\n".join(differences)
    assert compared >= max(1, (len(steps) * 2) // 3), \
        f"only {compared} of {len(steps)} request steps could be compared"
    assert normalized <= 1
