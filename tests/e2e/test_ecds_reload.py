"""Changing token-auth's policy, or its .wasm, in a running Envoy through ECDS: the Envoy is
rendered by envoy/render.py with an ECDS directory (the filter's configuration comes from a file
in a watched directory) and changed with envoy/push-config, as operators do (envoy/README.md, "Changing
policy at runtime"). Real Envoy 1.40, real IdP, the Orion stand-in.

It runs token_auth.wasm, the separate filter, on its own ECDS resource (token-auth.json): the
ECDS machinery is the same for every wasm filter, and the default sidecar's resource,
ngsi-gateway.json, is changed by push-config in test_gateway_render.py and
test_entity_acl.py (--stage), and rendered against the inline form below.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid

import pytest

import e2e_support as e2e

ORION = "urn:orion"
RENDER = os.path.join(e2e.ROOT, "envoy", "render.py")
EXAMPLE_WASM = os.path.join(os.path.dirname(e2e.WASM), "example.wasm")
ECDS_PREFIX = "extension_config_discovery.http_filter.token-auth."


def new_probe():
    return uuid.uuid4().hex


def base_config(idp, **overrides):
    """What the ECDS Envoy starts with, and what every test starts from: a JWT from the IdP
    is allowed (no required role)."""
    return e2e.token_auth_config(idp, **dict({"required_roles": []}, **overrides))


def ecds_stats(proxy):
    """extension_config_discovery.http_filter.token-auth.*: counters as ints, version_text as
    a string."""
    out = {}
    body = proxy.admin("/stats?filter=" + re.escape(ECDS_PREFIX)).body.decode()
    for line in body.splitlines():
        name, _, value = line.partition(": ")
        if not name.startswith(ECDS_PREFIX):
            continue
        name, value = name[len(ECDS_PREFIX):], value.strip()
        if value.isdigit():
            out[name] = int(value)
        elif value.startswith('"') and value.endswith('"'):
            out[name] = value[1:-1]
    return out


def resource_version(proxy):
    with open(proxy.ecds_resource) as f:
        return json.load(f)["version_info"]


push = e2e.push_config


def jwt_get(proxy, token, probe=None, conn=None):
    headers = {"authorization": f"Bearer {token}", "x-e2e-probe": probe or new_probe()}
    if conn is not None:
        return conn.request("GET", "/v2/entities", headers)
    return proxy.request("GET", "/v2/entities", headers)


def statuses_of(proxy, token, n=6):
    """`n` requests on fresh connections (both workers see some)."""
    return [jwt_get(proxy, token).status for _ in range(n)]


@pytest.fixture(scope="module")
def wasm(token_auth_wasm):
    """This module runs the separate token-auth filter (see the docstring)."""
    return token_auth_wasm


@pytest.fixture(scope="module")
def example_wasm(work_dir):
    """A copy of example.wasm (pass-through mode: the module swapped in by the tests)."""
    return e2e.copy_module(work_dir, EXAMPLE_WASM)


@pytest.fixture(scope="module")
def ecds_envoy(work_dir, wasm, idp, broker):
    proxy = e2e.Envoy(work_dir=work_dir, name="envoy-ecds", filter_config=base_config(idp),
                      broker_port=broker.port, idp_port=idp.port, wasm=wasm,
                      ecds_dir=os.path.join(work_dir, "ecds"), separate=True).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def ecds(ecds_envoy, work_dir, wasm, idp):
    """The ECDS Envoy, back at the base configuration and token_auth.wasm (push-config says
    "unchanged" when it already is), and still the same process afterwards."""
    push(ecds_envoy, work_dir, base_config(idp), wasm)
    pid = ecds_envoy.pid
    yield ecds_envoy
    assert ecds_envoy.proc.alive(), "Envoy exited"
    assert ecds_envoy.pid == pid


# ------------------------------------------------------------------------------------------------


def test_the_ecds_envoy_starts_with_the_configuration_from_the_file(ecds, idp, broker):
    stats = ecds_stats(ecds)
    assert stats["version_text"] == resource_version(ecds)
    assert stats["update_rejected"] == 0
    dump = ecds.admin("/config_dump?resource=ecds_filters").json()["configs"]
    assert [c["ecds_filter"]["name"] for c in dump] == ["token-auth"]
    token = idp.token(ORION)
    probe = new_probe()
    assert jwt_get(ecds, token, probe).status == 200
    assert len(broker.received(probe)) == 1
    assert ecds.request("GET", "/v2/entities").status == 401


def test_a_policy_change_takes_effect_without_restart(ecds, idp, broker, work_dir):
    pid = ecds.pid
    token = idp.token(ORION)
    kept_open = e2e.Connection(ecds.port)   # a keep-alive connection opened before the change
    try:
        assert jwt_get(ecds, token, conn=kept_open).status == 200
        reloads = ecds_stats(ecds)["config_reload"]

        out = push(ecds, work_dir, base_config(idp, required_roles=["no-such-role"]))
        assert "accepted" in out
        stats = ecds_stats(ecds)
        assert stats["config_reload"] == reloads + 1
        assert stats["version_text"] == resource_version(ecds)
        probe = new_probe()
        r = jwt_get(ecds, token, probe)
        assert r.status == 403, r
        assert r.json()["error"] == "Forbidden"
        assert 'error="insufficient_scope"' in r.header("www-authenticate")
        assert broker.received(probe) == []
        assert set(statuses_of(ecds, token)) == {403}
        # The open connection gets the new policy too (the filter chain is made per request).
        assert jwt_get(ecds, token, conn=kept_open).status == 403

        push(ecds, work_dir, base_config(idp))
        probe = new_probe()
        assert jwt_get(ecds, token, probe).status == 200
        assert e2e.header_values(broker.received(probe)[0], "x-auth-subject") == ["sensor-gateway"]
        assert set(statuses_of(ecds, token)) == {200}
        assert jwt_get(ecds, token, conn=kept_open).status == 200
        assert ecds_stats(ecds)["config_reload"] == reloads + 2
        # Only the filter changed: no listener update, nothing drained.
        listeners = ecds.stats("listener_manager.")
        assert listeners["listener_modified"] == 0 and listeners["total_listeners_draining"] == 0
    finally:
        kept_open.close()
    assert ecds.pid == pid and ecds.proc.alive()


def test_no_request_fails_while_the_policy_and_the_module_change(
        ecds, idp, work_dir, example_wasm, wasm):
    """Two clients (fresh connections, one keep-alive connection) send requests without pause
    while push-config changes the policy and swaps the .wasm, six times, and once pushes a
    configuration the filter rejects. Every answer is the outcome of one of the configurations
    -- 200 or 403 -- never a 5xx or a broken connection; and once push-config has returned,
    every later request gets the outcome of the configuration in force."""
    token = idp.token(ORION)
    forbid = base_config(idp, required_roles=["no-such-role"])
    allow = base_config(idp)
    passthrough = {"mode": "passthrough"}
    rejected = base_config(idp, bogus_field=1)
    # (filter configuration, module, push-config's exit status, the outcome for the JWT)
    steps = [(forbid, wasm, 0, 403), (allow, wasm, 0, 200), (forbid, wasm, 0, 403),
             (rejected, wasm, 1, 403), (passthrough, example_wasm, 0, 200),
             (forbid, wasm, 0, 403), (allow, wasm, 0, 200)]
    # Bounded: at most 1000 requests, 30 s; each client paces itself (about 40 requests/s).
    max_requests, deadline = 1000, time.monotonic() + 30
    stop = threading.Event()
    lock = threading.Lock()
    results = []   # (sent, received, status or error text)

    def client(keep_alive):
        conn = e2e.Connection(ecds.port, timeout=10) if keep_alive else None
        try:
            while not stop.is_set() and time.monotonic() < deadline:
                with lock:
                    if len(results) >= max_requests:
                        return
                sent = time.monotonic()
                try:
                    outcome = jwt_get(ecds, token, conn=conn).status
                except Exception as e:   # noqa: BLE001 -- any failure is a finding
                    outcome = f"{type(e).__name__}: {e}"
                    if conn is not None:
                        conn.close()
                        conn = e2e.Connection(ecds.port, timeout=10)
                with lock:
                    results.append((sent, time.monotonic(), outcome))
                stop.wait(0.025)
        finally:
            if conn is not None:
                conn.close()

    def completed_since(t):
        with lock:
            return sum(1 for sent, _, _ in results if sent > t)

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in (False, True)]
    for t in threads:
        t.start()
    windows = []   # (accepted at, next push starts at, expected outcome)
    try:
        accepted_at, expected = time.monotonic(), 200
        e2e.wait_until(lambda: completed_since(accepted_at) >= 5, "requests before any change",
                       timeout=15)
        for filter_config, module, status, outcome in steps:
            started = time.monotonic()
            windows.append((accepted_at, started, expected))
            # Envoy's side under load: the offline check (seconds per push) would stretch the
            # pushes past the clients' bounded window; test_a_configuration_the_filter_rejects...
            # covers it.
            push(ecds, work_dir, filter_config, module, expect=status,
                 extra_args=["--no-validate"])
            accepted_at, expected = time.monotonic(), outcome
            # Let some requests run under this configuration before the next change.
            e2e.wait_until(lambda: completed_since(accepted_at) >= 5,
                           "requests after the change", timeout=15)
        windows.append((accepted_at, time.monotonic(), expected))
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    assert not any(t.is_alive() for t in threads)

    outcomes = [o for _, _, o in results]
    failures = [o for o in outcomes if o not in (200, 403)]
    assert failures == [], f"{len(failures)} of {len(outcomes)} requests failed: {failures[:5]}"
    assert outcomes.count(200) >= 5 and outcomes.count(403) >= 5
    checked = 0
    for start, end, expected in windows:
        inside = [o for sent, received, o in results if sent > start and received < end]
        assert inside and set(inside) == {expected}, (
            f"after an accepted push, expected only {expected}, got {inside}")
        checked += len(inside)
    assert checked >= 5 * len(windows)


def test_a_configuration_the_filter_rejects_is_refused_and_the_old_one_stays(
        ecds, idp, broker, work_dir):
    token = idp.token(ORION)
    push(ecds, work_dir, base_config(idp, required_roles=["no-such-role"]))
    in_force = resource_version(ecds)
    before = ecds_stats(ecds)
    log_size = len(ecds.log_text())

    # Would allow the JWT (no required role) if Envoy took it.
    # push-config checks it offline first (host-harness validate): refused, nothing written.
    out = push(ecds, work_dir, base_config(idp, bogus_field=1), expect=1)
    assert "REFUSED offline, nothing written" in out, out
    assert "unknown field `bogus_field`" in out, out
    assert ecds_stats(ecds)["update_attempt"] == before["update_attempt"]
    assert resource_version(ecds) == in_force

    # Without that check, Envoy refuses it, and push-config says why.
    out = push(ecds, work_dir, base_config(idp, bogus_field=1), expect=1,
               extra_args=["--no-validate"])
    assert "REJECTED" in out and "restored" in out
    assert "Envoy's reason:" in out and "bogus_field" in out, out
    after = ecds_stats(ecds)
    assert after["update_rejected"] == before["update_rejected"] + 1
    assert after["config_fail"] == before["config_fail"] + 1
    assert after["version_text"] == in_force
    assert set(statuses_of(ecds, token)) == {403}, "the rejected configuration is in force"
    log = ecds.log_text()[log_size:]
    assert "token-auth: configuration refused at bogus_field: unknown field `bogus_field`" in log
    assert "Filesystem config update rejected: Unable to create Wasm plugin token-auth" in log
    # push-config put the configuration in force back into the file: a restart starts with it.
    assert resource_version(ecds) == in_force
    with open(ecds.ecds_resource) as f:
        assert "bogus_field" not in f.read()


@pytest.mark.parametrize("damage", ["configuration-not-json", "wasm-missing", "file-not-json"])
def test_a_bad_resource_file_is_rejected_by_envoy_and_the_old_configuration_stays(
        ecds, idp, work_dir, damage):
    """The file written by hand (not through push-config, which refuses such input): Envoy
    itself rejects it and keeps what it runs."""
    token = idp.token(ORION)
    push(ecds, work_dir, base_config(idp, required_roles=["no-such-role"]))
    good_version = resource_version(ecds)
    with open(ecds.ecds_resource) as f:
        good_text = f.read()
    resource = json.loads(good_text)
    config = resource["resources"][0]["typed_config"]["config"]
    resource["version_info"] = "hand-written-" + damage
    if damage == "configuration-not-json":
        config["configuration"]["value"] = "{required_roles: []"
        reason = "token-auth: configuration refused: key must be a string"
    elif damage == "wasm-missing":
        config["vm_config"]["code"]["local"]["filename"] = os.path.join(work_dir, "nope.wasm")
        reason = "Filesystem config update rejected: Invalid path: " + os.path.join(
            work_dir, "nope.wasm")
    else:
        resource = None
        reason = "Filesystem config update failure: in " + ecds.ecds_resource + \
            ", Unable to parse JSON as proto"
    # The filter or the module refused: "rejected"; a file Envoy cannot parse: "failure".
    counter = "update_failure" if damage == "file-not-json" else "update_rejected"
    before = ecds_stats(ecds)
    log_size = len(ecds.log_text())
    tmp = ecds.ecds_resource + ".tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(resource) if resource else '{"version_info": "x", "resources": [')
    os.rename(tmp, ecds.ecds_resource)
    e2e.wait_until(lambda: ecds_stats(ecds)["config_fail"] > before["config_fail"],
                   "Envoy to reject the file", timeout=e2e.PUSH_TIMEOUT)
    after = ecds_stats(ecds)
    assert after["config_fail"] == before["config_fail"] + 1
    assert after[counter] == before[counter] + 1
    assert after["version_text"] == good_version
    assert set(statuses_of(ecds, token)) == {403}
    assert reason in ecds.log_text()[log_size:]
    if damage != "file-not-json":
        # Envoy 1.40: once the filter (or the .wasm) refused a resource, the config dump shows
        # the refused one, although the previous configuration is the one in force, and
        # config_reload counted it.
        dump = ecds.admin("/config_dump?resource=ecds_filters").json()["configs"]
        assert dump[0]["version_info"] == resource["version_info"]
        # ... with no error_state: nothing in the dump says it was refused (push-config gives
        # the reason from Envoy's log or the filter's own words instead).
        assert "error_state" not in dump[0], dump[0]
        assert after["config_reload"] == before["config_reload"] + 1
        # And the same refused resource again (another version_info) is skipped as "identical
        # to the last one read", yet reported as a success with its version -- while the old
        # configuration stays in force. (Why push-config restores the file after a rejection.)
        resource["version_info"] += "-again"
        with open(tmp, "w") as f:
            f.write(json.dumps(resource))
        os.rename(tmp, ecds.ecds_resource)
        e2e.wait_until(lambda: ecds_stats(ecds)["update_success"] > after["update_success"],
                       "Envoy to take the file", timeout=e2e.PUSH_TIMEOUT)
        again = ecds_stats(ecds)
        assert again["version_text"] == resource["version_info"]
        assert again["update_rejected"] == after["update_rejected"]
        assert again["config_reload"] == after["config_reload"]
        assert set(statuses_of(ecds, token)) == {403}

    # The good file back, by hand too: Envoy takes it (again) without a restart.
    restored_from = ecds_stats(ecds)
    with open(tmp, "w") as f:
        f.write(good_text)
    os.rename(tmp, ecds.ecds_resource)
    e2e.wait_until(lambda: ecds_stats(ecds)["version_text"] == good_version
                   and ecds_stats(ecds)["update_success"] > restored_from["update_success"],
                   "Envoy to take the good file back", timeout=e2e.PUSH_TIMEOUT)
    assert set(statuses_of(ecds, token)) == {403}


def test_push_config_refuses_bad_input_without_touching_the_file(ecds, work_dir):
    before_stats, before_version = ecds_stats(ecds), resource_version(ecds)
    not_json = os.path.join(work_dir, "not-json.json")
    with open(not_json, "w") as f:
        f.write("{required_roles: []")
    for args, message in [
        (["--filter-config", not_json], "is not JSON"),
        (["--wasm", os.path.join(work_dir, "nope.wasm")], "does not exist"),
    ]:
        done = subprocess.run(
            [sys.executable, e2e.PUSH_CONFIG, "--resource", ecds.ecds_resource,
             "--admin", f"127.0.0.1:{ecds.admin_port}"] + args,
            capture_output=True, text=True, timeout=30)
        assert done.returncode == 2, done.stderr
        assert message in done.stderr
    assert resource_version(ecds) == before_version
    assert ecds_stats(ecds)["update_attempt"] == before_stats["update_attempt"]


def test_push_config_refuses_a_remote_module_source(ecds, work_dir):
    """A resource whose module Envoy would fetch (a `remote` code source) is refused: in an ECDS
    update Envoy 1.40 serves without the filter when that fetch does not happen."""
    with open(ecds.ecds_resource) as f:
        resource = json.load(f)
    config = resource["resources"][0]["typed_config"]["config"]
    config["vm_config"]["code"] = {"remote": {
        "http_uri": {"uri": "https://filters.example/token_auth.wasm", "cluster": "idp",
                     "timeout": "5s"},
        "sha256": "0" * 64}}
    remote = os.path.join(work_dir, "remote-resource.json")
    with open(remote, "w") as f:
        json.dump(resource, f)
    out = push(ecds, work_dir, {"mode": "passthrough"}, expect=2, resource=remote)
    assert "must come from a local file" in out and "remote source is refused" in out, out


def test_swapping_the_wasm_module_takes_effect_without_restart(
        ecds, idp, broker, work_dir, wasm, example_wasm):
    pid = ecds.pid
    r = ecds.request("GET", "/v2/entities")
    assert r.status == 401 and r.json()["description"] == "missing credential"

    out = push(ecds, work_dir, {"mode": "passthrough"}, example_wasm)
    assert "accepted" in out
    dump = ecds.admin("/config_dump?resource=ecds_filters").json()["configs"][0]
    # Envoy loads a copy named by content beside the resource, never the file given.
    loaded = dump["ecds_filter"]["typed_config"]["config"]["vm_config"]["code"]["local"][
        "filename"]
    with open(example_wasm, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    assert loaded == os.path.join(os.path.dirname(ecds.ecds_resource), "modules",
                                  f"token-auth-{digest}.wasm")
    with open(loaded, "rb") as a, open(example_wasm, "rb") as b:
        assert a.read() == b.read()
    # The example filter in pass-through mode: no credential needed, no identity set.
    probe = new_probe()
    r = ecds.request("GET", "/v2/entities", {"x-e2e-probe": probe})
    assert r.status == 200, r
    assert e2e.header_values(broker.received(probe)[0], "x-auth-subject") == []

    push(ecds, work_dir, base_config(idp), wasm)
    probe = new_probe()
    r = ecds.request("GET", "/v2/entities", {"x-e2e-probe": probe})
    assert r.status == 401 and r.json()["description"] == "missing credential"
    assert broker.received(probe) == []
    probe = new_probe()
    assert jwt_get(ecds, idp.token(ORION), probe).status == 200
    assert e2e.header_values(broker.received(probe)[0], "x-auth-kind") == ["jwt"]
    assert ecds.pid == pid and ecds.proc.alive()


def test_a_request_in_flight_is_decided_by_the_configuration_it_started_with(
        ecds, held_idp, broker, work_dir):
    """An opaque token waits for introspection (parked at the IdP) while a policy that would
    refuse it is pushed: Envoy keeps the old filter instance for streams that started under it."""
    token = held_idp.token("urn:orion:opaque")
    probe = new_probe()
    before = held_idp.count("/token/introspection")
    result = {}

    def send():
        result["r"] = ecds.request("GET", "/v2/entities",
                                   {"authorization": f"Bearer {token}", "x-e2e-probe": probe})

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    e2e.wait_until(lambda: held_idp.count("/token/introspection") > before,
                   "the filter to ask the IdP", timeout=10)
    push(ecds, work_dir, base_config(held_idp, required_roles=["no-such-role"]))
    assert broker.received(probe) == []
    held_idp.release_introspection()
    sender.join(15)
    assert not sender.is_alive()
    assert result["r"].status == 200, result["r"]
    assert len(broker.received(probe)) == 1
    # A request started after the change gets the new policy.
    r = ecds.request("GET", "/v2/entities", {"authorization": f"Bearer {token}"})
    assert r.status == 403, r


def test_a_configuration_rejected_at_start_serves_500_until_a_good_one_is_pushed(
        work_dir, wasm, idp, broker):
    """Unlike sidecar.yaml (a rejected configuration keeps Envoy from starting), with ECDS
    Envoy starts, and the filter without a configuration answers 500 to everything -- never a
    pass -- until push-config brings an accepted one."""
    proxy = e2e.Envoy(work_dir=work_dir, name="envoy-ecds-rejected-at-start",
                      filter_config=base_config(idp, bogus_field=1), broker_port=broker.port,
                      idp_port=idp.port, wasm=wasm, concurrency=1,
                      ecds_dir=os.path.join(work_dir, "ecds-rejected-at-start"),
                      separate=True).start()
    try:
        pid = proxy.pid
        stats = ecds_stats(proxy)
        assert stats["update_rejected"] == 1 and stats["version_text"] == ""
        token = idp.token(ORION)
        for headers in ({}, {"authorization": f"Bearer {token}"}):
            probe = new_probe()
            r = proxy.request("GET", "/v2/entities", dict(headers, **{"x-e2e-probe": probe}))
            assert r.status == 500 and r.body == b"", r
            assert broker.received(probe) == []
        assert "unknown field `bogus_field`" in proxy.log_text()

        push(proxy, work_dir, base_config(idp))
        assert jwt_get(proxy, token).status == 200
        assert proxy.request("GET", "/v2/entities").status == 401
        assert proxy.pid == pid and proxy.proc.alive()
    finally:
        proxy.stop()


@pytest.mark.parametrize("form", ["gateway", "separate"])
def test_the_ecds_rendering_matches_the_inline_one_outside_the_filter(form, work_dir, wasm, idp):
    """render.py --ecds moves the filter's configuration to ECDS: everything else (listener,
    path normalization, clusters, TLS) must stay the same. Rendered through render.py's command
    line, which also writes the first resource: the same settings as the inline entry. Both
    forms: the default (ngsi-gateway.json) and --separate (token-auth.json)."""
    name = "token-auth" if form == "separate" else "ngsi-gateway"
    if form == "gateway":
        wasm = e2e.copy_module(work_dir, e2e.GATEWAY_WASM)

    def significant(text, start_marker):
        lines = [l for l in text.splitlines() if l.strip() and not l.strip().startswith("#")]
        start = next(i for i, l in enumerate(lines) if start_marker in l)
        end = next(i for i, l in enumerate(lines) if "name: envoy.filters.http.router" in l)
        return lines[:start] + lines[end:]

    config_path = os.path.join(work_dir, "cli-filter-config.json")
    with open(config_path, "w") as f:
        json.dump(base_config(idp), f)
    ecds_dir = os.path.join(work_dir, f"ecds-cli-{form}")
    os.makedirs(ecds_dir, exist_ok=True)
    # Rendering only (the offline check runs in test_gateway_render.py and on every push).
    common = ["--filter-config", config_path, "--wasm", wasm, "--listen", "127.0.0.1:0",
              "--no-validate"]
    if form == "separate":
        common.append("--separate")
    static = subprocess.run([sys.executable, RENDER] + common,
                            capture_output=True, text=True, timeout=30, check=True).stdout
    dynamic = subprocess.run([sys.executable, RENDER, "--ecds", ecds_dir] + common,
                             capture_output=True, text=True, timeout=30, check=True).stdout
    assert significant(static, "- name: envoy.filters.http.wasm") == \
        significant(dynamic, f"- name: {name}")
    code = [l for l in dynamic.splitlines() if not l.strip().startswith("#")]
    assert any("config_discovery:" in l for l in code)
    assert not any("vm_config" in l or "failure_policy" in l for l in code)
    with open(os.path.join(ecds_dir, f"{name}.json")) as f:
        resource = json.load(f)
    config = resource["resources"][0]["typed_config"]["config"]
    assert resource["version_info"] == "1"
    assert json.loads(config["configuration"]["value"]) == (
        base_config(idp) if form == "separate" else {"token_auth": base_config(idp)})
    assert config["vm_config"]["code"]["local"]["filename"] == os.path.abspath(wasm)
    assert config["failure_policy"] == "FAIL_RELOAD"


def configmap_update(directory, version, resource):
    """Updates `directory` the way the kubelet updates a mounted ConfigMap: the new files in a
    fresh hidden directory, a `..data_tmp` symlink to it renamed over `..data` (the one atomic
    step), the old directory removed. `token-auth.json` itself is a symlink through `..data`
    and never changes."""
    fresh = os.path.join(directory, f"..{version}")
    os.mkdir(fresh)
    with open(os.path.join(fresh, "token-auth.json"), "w") as f:
        json.dump(resource, f)
    data = os.path.join(directory, "..data")
    old = os.path.realpath(data) if os.path.islink(data) else None
    tmp = os.path.join(directory, "..data_tmp")
    os.symlink(os.path.basename(fresh), tmp)
    os.rename(tmp, data)
    if old and old != os.path.realpath(fresh):
        shutil.rmtree(old)


def test_a_kubernetes_configmap_update_reloads_the_policy(work_dir, wasm, idp, broker):
    """ECDS from a directory laid out and updated as a Kubernetes ConfigMap volume: Envoy
    watches the directory, so the rename of `..data` reloads token-auth.json (a symlink)."""
    directory = os.path.join(work_dir, "ecds-configmap")
    proxy = e2e.Envoy(work_dir=work_dir, name="envoy-ecds-configmap",
                      filter_config=base_config(idp), broker_port=broker.port,
                      idp_port=idp.port, wasm=wasm, ecds_dir=directory, separate=True).start()
    try:
        token = idp.token(ORION)
        assert jwt_get(proxy, token).status == 200

        def resource(version, **overrides):
            return e2e.render.ecds_resource(base_config(idp, **overrides), wasm,
                                            version=version)

        # The layout a ConfigMap mount has; the same resource Envoy already runs.
        configmap_update(directory, "v1", resource("1"))
        link_tmp = os.path.join(directory, ".token-auth.json.link")
        os.symlink(os.path.join("..data", "token-auth.json"), link_tmp)
        os.rename(link_tmp, proxy.ecds_resource)

        # token-auth.json (a symlink) never changes again: only `..data` is renamed.
        configmap_update(directory, "v2", resource("2", required_roles=["no-such-role"]))
        e2e.wait_until(lambda: ecds_stats(proxy)["version_text"] == "2",
                       "the ConfigMap update reloaded", timeout=10)
        probe = new_probe()
        assert jwt_get(proxy, token, probe).status == 403
        assert broker.received(probe) == []

        # A configuration the filter refuses: rejected, the previous one stays in force.
        rejected = ecds_stats(proxy).get("update_rejected", 0)
        configmap_update(directory, "v3", resource("3", required_roles="not-a-list"))
        e2e.wait_until(lambda: ecds_stats(proxy).get("update_rejected", 0) > rejected,
                       "the bad ConfigMap update was rejected", timeout=10)
        assert ecds_stats(proxy)["version_text"] == "2"
        assert jwt_get(proxy, token).status == 403

        configmap_update(directory, "v4", resource("4"))
        e2e.wait_until(lambda: ecds_stats(proxy)["version_text"] == "4",
                       "the good ConfigMap update reloaded", timeout=10)
        probe = new_probe()
        assert jwt_get(proxy, token, probe).status == 200
        assert len(broker.received(probe)) == 1
        assert proxy.proc.alive()
    finally:
        proxy.stop()
