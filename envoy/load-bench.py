#!/usr/bin/env python3
"""Load benchmark through a real Envoy, in one run, so the ratios mean something on a noisy
machine. One Envoy per variant, all of the same shape and all started before measuring; each
answers with Envoy's own direct_response (no upstream, so only the filters' cost differs):

  no_filter     router only
  passthrough   example.wasm in pass-through mode: what one wasm module costs before deciding
  floor         example.wasm in identity_floor mode: token-auth's host calls on an allowed
                request (headers read, clock, credential removed, four identity headers set)
                and no decision: the least a wasm filter that forwards identity costs
  native        Envoy's jwt_authn (same JWKS, issuer, audience, token cache) + rbac (a path rule)
  token_auth    token_auth.wasm (V8) with the same keys, issuer and audience
  separate      token_auth.wasm -> device_ownership.wasm -> entity_acl.wasm, as sidecar.yaml
                chains them: ownership from a static map (the list answer is filtered), a rule
                granting the path's entities to authenticated callers
  gateway       ngsi_gateway.wasm with the same configurations under its stage keys
                (--gateway-stages; the separate filters it replaces are `separate`). Given
                --gateway-stages more than once, one gateway per set, named by its stages
                (`gateway:token_auth+entity_acl`), all in the same run.

Requests (--paths, each measured on every variant): `list` is a Room list (GET
/v2/entities?type=Room&limit=10: device-ownership filters its answer), `entity` a GET of one
Room the caller owns (device-ownership decides it on the request alone); any other value is
a path as is.

For each: wrk at each of --connections, the same valid RS256 token on every request (every
variant caches verified tokens). Rounds are interleaved (round 1 of every variant, then round
2, ...) and the median round is reported, so slow drift of the machine hits every variant
alike. With --concurrency 1 Envoy is pinned to CPU 0 and wrk to CPU 1 (taskset); with more
workers nothing is pinned. Prints a Markdown table: req/s, p50, p99, Envoy CPU per request
(utime+stime from /proc over the requests wrk counted) and the req/s ratio to no_filter and to
native.

    scripts/setup && apt-get install -y wrk
    .venv/bin/python envoy/load-bench.py [--seconds 10] [--rounds 3] [--concurrency 1]
        [--connections 1,16] [--variants no_filter,passthrough,native,...] [--baseline DIR]
        [--paths list,entity] [--gateway-stages token_auth,entity_acl --gateway-stages ...]
"""
import argparse
import json
import os
import re
import shutil
import statistics
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
RELEASE = ROOT / "target/wasm32-wasip1/release"
WASM = {name: RELEASE / f"{name}.wasm" for name in
        ("token_auth", "device_ownership", "entity_acl", "ngsi_gateway", "example")}
VARIANTS = ["no_filter", "passthrough", "floor", "native", "token_auth", "separate", "gateway"]
GATEWAY_STAGES = ["token_auth", "device_ownership", "entity_acl"]
FIXTURES = ROOT / "tests/fixtures/jwt"
ISS = "https://idp.example/realms/city"
PATHS = {
    # A list: device-ownership holds the answer and filters it.
    "list": "/v2/entities?type=Room&limit=10",
    # One Room the token's subject owns (envoy/bench-stages.json): decided on the request.
    "entity": "/v2/entities/urn:ngsi-ld:Room:2?type=Room",
}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def stage_configs(jwks):
    """Each HTTP stage's configuration, the same for the separate filters and the gateway
    (envoy/bench-stages.json, which host-harness's host_calls example reads too)."""
    configs = json.loads((ROOT / "envoy/bench-stages.json").read_text())
    configs.pop("_comment", None)
    for provider in configs["token_auth"]["jwt_providers"]:
        provider["jwks"] = json.loads(jwks)
    return configs


def gateway_variants(stage_sets):
    """The gateway variants for the --gateway-stages sets: `gateway` for one set, else one
    `gateway:STAGE+STAGE` per set."""
    if len(stage_sets) == 1:
        return {"gateway": stage_sets[0]}
    return {"gateway:" + "+".join(stages): stages for stages in stage_sets}


def http_filters(variant, jwks, gateway_stages, baseline_dir=None):
    """The http_filters of `variant`; `NAME@baseline` is NAME with the .wasm files of
    baseline_dir (--baseline). gateway_stages: the stages of each gateway variant."""
    variant, _, baseline = variant.partition("@")
    wasm = {name: Path(baseline_dir) / path.name for name, path in WASM.items()} \
        if baseline else WASM
    configs = stage_configs(jwks)
    if variant == "no_filter":
        return []
    if variant == "passthrough":
        return [wasm_filter("example", wasm["example"], {"mode": "passthrough"})]
    if variant == "floor":
        return [wasm_filter("example", wasm["example"], {"mode": "identity_floor"})]
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
    if variant == "token_auth":
        return [wasm_filter("token-auth", wasm["token_auth"], configs["token_auth"])]
    if variant == "separate":
        return [wasm_filter("token-auth", wasm["token_auth"], configs["token_auth"]),
                wasm_filter("device-ownership", wasm["device_ownership"],
                            configs["device_ownership"], body=True),
                wasm_filter("entity-acl", wasm["entity_acl"], configs["entity_acl"], body=True)]
    if variant in gateway_stages:
        config = {stage: configs[stage] for stage in gateway_stages[variant]}
        return [wasm_filter("ngsi-gateway", wasm["ngsi_gateway"], config, body=True)]
    raise ValueError(f"unknown variant {variant}")


def wasm_filter(name, wasm, config, body=False):
    """A wasm http filter as sidecar.yaml has it (body: the filter decides on the body), built
    by render.py's one builder."""
    return render.wasm_filter(render.wasm_plugin(name, str(wasm), config,
                                                 allow_on_headers_stop_iteration=body))


def envoy_config(variant, port, admin_port, jwks, gateway_stages, baseline_dir=None):
    filters = http_filters(variant, jwks, gateway_stages, baseline_dir) + [{
        "name": "envoy.filters.http.router", "typed_config": {
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


def check(port, token, path):
    """The token must be accepted and a missing token refused, or the run measures nothing."""
    def status(headers):
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
    return status({"authorization": f"Bearer {token}"}), status({})


def to_ms(value, unit):
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def cpu_seconds(pid):
    """utime + stime of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wrk(port, token, path, connections, seconds, pin):
    threads = 1 if connections == 1 else 2
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency",
               "-H", f"Authorization: Bearer {token}", f"http://127.0.0.1:{port}{path}"]
    if pin:
        command = ["taskset", "-c", "1"] + command
    out = subprocess.run(command, check=True, capture_output=True, text=True,
                         timeout=seconds + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    lat = {p: to_ms(v, u) for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"{errors.group(1)} non-2xx responses under load:\n{out}")
    return rps, lat["50"], lat["99"], requests


def start_envoy(work, n, variant, jwks, args):
    port, admin = processes.free_port(), processes.free_port()
    cfg = Path(work) / f"{variant}.json"
    cfg.write_text(json.dumps(envoy_config(variant, port, admin, jwks, args.gateway_stages,
                                           args.baseline)))
    log = open(Path(work) / f"{variant}.log", "w")
    command = [str(ENVOY), "-c", str(cfg), "--concurrency", str(args.concurrency),
               "--base-id", str(4000 + n + os.getpid() % 1000 * 10), "--log-level", "warn"]
    if args.pin:
        command = ["taskset", "-c", "0"] + command
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(admin, proc)
    except Exception:
        proc.terminate()
        raise RuntimeError(f"{variant}: Envoy did not start; its log:\n"
                           + (Path(work) / f"{variant}.log").read_text()[-3000:])
    return proc, port


def names(value):
    return [v for v in value.split(",") if v]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument("--concurrency", type=int, default=1, help="Envoy worker threads")
    parser.add_argument("--connections", type=names, default=["1", "16"])
    parser.add_argument("--variants", type=names, default=VARIANTS)
    parser.add_argument("--gateway-stages", type=names, action="append",
                        help="the gateway's stages (default: "
                             f"{','.join(GATEWAY_STAGES)}); given more than once, one gateway"
                             " variant per set")
    parser.add_argument("--paths", type=names, default=["list"],
                        help=f"requests to measure on every variant: {', '.join(PATHS)} or a"
                             " path (default: list)")
    parser.add_argument("--baseline", metavar="DIR",
                        help="also measure each wasm variant with the .wasm files of DIR (e.g."
                             " a copy of target/wasm32-wasip1/release before a change), as"
                             " VARIANT@baseline, in the same run (not `floor`: it measures"
                             " the host, not our filters)")
    args = parser.parse_args()
    args.pin = args.concurrency == 1 and (os.cpu_count() or 1) >= 2 and bool(shutil.which("taskset"))
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        sys.exit(f"unknown variants {sorted(unknown)}: choose from {VARIANTS}")
    stage_sets = args.gateway_stages or [GATEWAY_STAGES]
    for stages in stage_sets:
        if set(stages) - set(GATEWAY_STAGES):
            sys.exit(f"unknown gateway stages in {stages}: choose from {GATEWAY_STAGES}")
    args.gateway_stages = gateway_variants(stage_sets)
    if "gateway" in args.variants:
        at = args.variants.index("gateway")
        args.variants[at:at + 1] = list(args.gateway_stages)
    paths = [PATHS.get(p, p) for p in args.paths]
    for path in paths:
        if not path.startswith("/"):
            sys.exit(f"--paths: {path!r} is neither {' nor '.join(PATHS)} nor a path")
    if "no_filter" not in args.variants:
        args.variants.insert(0, "no_filter")   # every ratio is to it
    if args.baseline:
        args.variants += [f"{v}@baseline" for v in args.variants
                          if v not in ("no_filter", "native", "floor")]
    baseline = [Path(args.baseline) / w.name for w in WASM.values()] if args.baseline else []
    for needed in [ENVOY] + list(WASM.values()) + baseline:
        if not needed.exists():
            sys.exit(f"{needed} is missing: run scripts/setup")
    if not shutil.which("wrk"):
        sys.exit("wrk is missing: apt-get install -y wrk")
    token = json.loads((FIXTURES / "tokens.json").read_text())["valid_rs256"]
    jwks = (FIXTURES / "jwks.json").read_text()
    connections = [int(c) for c in args.connections]
    samples = {}   # (variant, connections) -> [(rps, p50, p99, cpu_us_per_request)]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as work:
        envoys = {}
        try:
            for n, variant in enumerate(args.variants):
                envoys[variant] = start_envoy(work, n, variant, jwks, args)
                for path in paths:
                    ok, missing = check(envoys[variant][1], token, path)
                    expected_missing = 200 \
                        if variant.split("@")[0] in ("no_filter", "passthrough", "floor") else 401
                    if ok != 200 or missing != expected_missing:
                        raise RuntimeError(
                            f"{variant} {path}: token -> {ok}, no token -> {missing}")
            for _ in range(args.rounds):
                for variant in args.variants:
                    proc, port = envoys[variant]
                    for path in paths:
                        for c in connections:
                            before = cpu_seconds(proc.pid)
                            rps, p50, p99, requests = wrk(port, token, path, c, args.seconds,
                                                          args.pin)
                            cpu_us = (cpu_seconds(proc.pid) - before) * 1e6 / max(requests, 1)
                            samples.setdefault((variant, path, c), []).append(
                                (rps, p50, p99, cpu_us))
        finally:
            for proc, _ in envoys.values():
                proc.terminate()
                proc.wait(timeout=10)
    version = subprocess.run([str(ENVOY), "--version"], capture_output=True, text=True).stdout
    match = re.search(r"version: \S+?/([\d.]+)/", version)
    print(f"\n{time.strftime('%Y-%m-%d')}, Envoy {match.group(1) if match else '?'}, "
          f"--concurrency {args.concurrency}{' (Envoy on CPU 0, wrk on CPU 1)' if args.pin else ''}, "
          f"{os.cpu_count()} CPUs, wrk {args.seconds}s per cell, median of {args.rounds} "
          f"interleaved rounds; gateway stages: "
          f"{'; '.join(' -> '.join(s) for s in args.gateway_stages.values())}; requests: "
          f"{', '.join(paths)}; load average "
          f"{load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after (other processes share "
          f"the CPUs: the spread column is the slowest round's CPU per request over the "
          f"fastest's)\n")
    request_column = len(paths) > 1
    print("| filter chain | " + ("request | " if request_column else "") + "connections | "
          "req/s | p50 | p99 | Envoy CPU per request | spread | req/s ratio to no filter | "
          "req/s ratio to native |")
    print("|---|" + ("---|" if request_column else "") + "---|---|---|---|---|---|---|---|")
    for path in paths:
        for c in connections:
            def median(variant):
                rounds = samples[(variant, path, c)]
                return tuple(statistics.median(r[i] for r in rounds) for i in range(4))
            base = median("no_filter")[0]
            native = median("native")[0] if "native" in args.variants else None
            for variant in args.variants:
                rps, p50, p99, cpu_us = median(variant)
                cpu = [r[3] for r in samples[(variant, path, c)]]
                to_native = f"{rps / native:.2f}" if native else "-"
                request = f"{path} | " if request_column else ""
                print(f"| {variant} | {request}{c} | {rps:,.0f} | {p50:.3f} ms | {p99:.3f} ms "
                      f"| {cpu_us:.1f} us | {max(cpu) / min(cpu):.2f} | {rps / base:.2f} "
                      f"| {to_native} |")


if __name__ == "__main__":
    main()
