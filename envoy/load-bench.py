#!/usr/bin/env python3
"""Load benchmark through a real Envoy, in one run, so the ratios mean something on a noisy
machine. Three Envoys of the same shape, one after the other, each answering with Envoy's own
direct_response (no upstream, so only the filters' cost differs):

  no_filter     router only
  native        Envoy's jwt_authn (same JWKS, issuer, audience) + rbac (a path rule)
  token_auth    token_auth.wasm (V8) with the same keys, issuer and audience
  chain         token_auth.wasm -> device_ownership.wasm -> entity_acl.wasm, as sidecar.yaml
                chains them: ownership from a static map (the list answer is filtered), a rule
                granting the path's entities to authenticated callers

For each: wrk at 1 connection and at 16 connections, the same valid RS256 token on every
request (both filters cache verified tokens). Prints a Markdown table: req/s, p50, p99 and the
ratio to no_filter.

    scripts/setup && apt-get install -y wrk
    .venv/bin/python envoy/load-bench.py [--seconds 10]
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "envoy"))
import processes  # noqa: E402  (envoy/processes.py: free ports, readiness)
import render  # noqa: E402  (envoy/render.py: the wasm filter stanza)
ENVOY = ROOT / ".venv/bin/envoy"
WASM = ROOT / "target/wasm32-wasip1/release/token_auth.wasm"
ENTITY_ACL_WASM = ROOT / "target/wasm32-wasip1/release/entity_acl.wasm"
OWNERSHIP_WASM = ROOT / "target/wasm32-wasip1/release/device_ownership.wasm"
OWNERSHIP = {"sources": [{"kind": "static", "entities": [
    {"id": "urn:ngsi-ld:Room:1", "owner": "someone-else"}]}]}
VARIANTS = ["no_filter", "native", "token_auth", "chain"]
# What the chain's entity-acl grants: the benchmark path (a Room list) to any authenticated caller.
ENTITY_ACL = {"acl": {"rules": [{
    "name": "rooms", "effect": "allow", "subjects": ["authenticated"], "actions": ["read"],
    "ngsi": {"service": "", "service_path": "/#", "entity_type": "Room"}}]}}
FIXTURES = ROOT / "tests/fixtures/jwt"
ISS = "https://idp.example/realms/city"
PATH = "/v2/entities?type=Room&limit=10"


def http_filters(variant, jwks):
    if variant == "no_filter":
        return []
    if variant == "native":
        return [
            {"name": "envoy.filters.http.jwt_authn", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
                "providers": {"city": {
                    "issuer": ISS, "audiences": ["orion"],
                    "local_jwks": {"inline_string": jwks},
                    "forward": False,
                    "jwt_cache_config": {"jwt_cache_size": 1000}}},
                "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "city"}}]}},
            {"name": "envoy.filters.http.rbac", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
                "rules": {"action": "ALLOW", "policies": {"entities": {
                    "permissions": [{"url_path": {"path": {"prefix": "/v2/entities"}}}],
                    "principals": [{"any": True}]}}}}},
        ]
    config = {"jwt_providers": [{"issuer": ISS, "audiences": ["orion"], "algorithms": ["RS256"],
                                 "jwks": json.loads(jwks), "claims": {"subject": "sub"}}]}
    filters = [wasm_filter("token-auth", WASM, config)]
    if variant == "chain":
        filters.append(wasm_filter("device-ownership", OWNERSHIP_WASM, OWNERSHIP, body=True))
        filters.append(wasm_filter("entity-acl", ENTITY_ACL_WASM, ENTITY_ACL, body=True))
    return filters


def wasm_filter(name, wasm, config, body=False):
    """A wasm http filter as sidecar.yaml has it (body: the filter decides on the body), built
    by render.py's one builder."""
    return render.wasm_filter(render.wasm_plugin(name, str(wasm), config,
                                                 allow_on_headers_stop_iteration=body))


def envoy_config(variant, port, admin_port, jwks):
    filters = http_filters(variant, jwks) + [{"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]
    return {
        "node": {"id": f"bench-{variant}", "cluster": "bench"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": [{
            "name": "ngsi",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "ngsi",
                    "route_config": {"virtual_hosts": [{
                        "name": "broker", "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, "direct_response": {
                            "status": 200, "body": {"inline_string": "[]"}}}]}]},
                    "http_filters": filters}}]}]}]}}


def wait_ready(admin_port, proc):
    def ready():
        if proc.poll() is not None:
            raise RuntimeError("envoy exited during start-up")
        return processes.request(admin_port, "GET", "/ready", timeout=1).status == 200
    processes.wait_until(ready, "envoy /ready")


def check(port, token):
    """The token must be accepted and a missing token refused, or the run measures nothing."""
    def status(headers):
        req = urllib.request.Request(f"http://127.0.0.1:{port}{PATH}", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
    return status({"authorization": f"Bearer {token}"}), status({})


def to_ms(value, unit):
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(port, token, connections, seconds):
    threads = 1 if connections == 1 else 2
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency",
         "-H", f"Authorization: Bearer {token}", f"http://127.0.0.1:{port}{PATH}"],
        check=True, capture_output=True, text=True, timeout=seconds + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = {p: to_ms(v, u) for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"{errors.group(1)} non-2xx responses under load:\n{out}")
    return rps, lat["50"], lat["99"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    for needed in (ENVOY, WASM, ENTITY_ACL_WASM, OWNERSHIP_WASM):
        if not needed.exists():
            sys.exit(f"{needed} is missing: run scripts/setup")
    if not shutil.which("wrk"):
        sys.exit("wrk is missing: apt-get install -y wrk")
    token = json.loads((FIXTURES / "tokens.json").read_text())["valid_rs256"]
    jwks = (FIXTURES / "jwks.json").read_text()
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for n, variant in enumerate(VARIANTS):
            port, admin = processes.free_port(), processes.free_port()
            cfg = Path(work) / f"{variant}.json"
            cfg.write_text(json.dumps(envoy_config(variant, port, admin, jwks)))
            log = open(Path(work) / f"{variant}.log", "w")
            proc = subprocess.Popen(
                [str(ENVOY), "-c", str(cfg), "--concurrency", "1", "--base-id", str(4000 + n + os.getpid() % 1000 * 10),
                 "--log-level", "warn"], stdout=log, stderr=subprocess.STDOUT)
            try:
                wait_ready(admin, proc)
                ok, missing = check(port, token)
                expected_missing = 200 if variant == "no_filter" else 401
                if ok != 200 or missing != expected_missing:
                    raise RuntimeError(f"{variant}: token -> {ok}, no token -> {missing}")
                for connections in (1, 16):
                    results[(variant, connections)] = wrk(port, token, connections, args.seconds)
            finally:
                proc.terminate()
                proc.wait(timeout=10)
    version = subprocess.run([str(ENVOY), "--version"], capture_output=True, text=True).stdout
    match = re.search(r"version: \S+?/([\d.]+)/", version)
    print(f"\n{time.strftime('%Y-%m-%d')}, Envoy {match.group(1) if match else '?'}, "
          f"--concurrency 1, {os.cpu_count()} CPUs, wrk {args.seconds}s per cell\n")
    print("| filter chain | connections | req/s | p50 | p99 | req/s ratio to no filter |")
    print("|---|---|---|---|---|---|")
    for connections in (1, 16):
        base = results[("no_filter", connections)][0]
        for variant in VARIANTS:
            rps, p50, p99 = results[(variant, connections)]
            print(f"| {variant} | {connections} | {rps:,.0f} | {p50:.3f} ms | {p99:.3f} ms | {rps / base:.2f} |")


if __name__ == "__main__":
    main()
