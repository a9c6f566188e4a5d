"""Changing mqtt-acl's policy, or its .wasm, in a running Envoy through ECDS: the MQTT sidecar
is rendered by render_mqtt(..., ecds_dir=...) (mqtt-acl is a network filter discovered from
<ecds_dir>/mqtt-acl.json, an envoy.extensions.filters.network.wasm.v3.Wasm resource) and
changed with envoy/push-config, as operators do (envoy/README.md, "Changing policy at
runtime"). Real Envoy 1.40, real Mosquitto 2.0.

Policy A lets devices read fleet/#; policy B also lets them write there. Each check is made of
a PUBLISH (QoS 1) and then an allowed marker on the same connection: the broker delivers a
connection's messages in order, so once the subscriber has the marker, the fleet message
before it was either delivered or dropped by the filter -- no waiting for an absence.
"""

import copy
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import uuid

import pytest

import e2e_support as e2e

DEVICE_KEY = "k-" + uuid.uuid4().hex
ECDS_PREFIX = "extension_config_discovery.network_filter.mqtt-acl."

OWN_TOPICS = {"name": "own-topics", "effect": "allow", "subjects": ["authenticated"],
              "actions": ["*"], "mqtt": {"topic": "devices/%u/#"}}
DEVICES_READ = {"name": "devices-read", "effect": "allow", "subjects": ["authenticated"],
                "actions": ["read"], "mqtt": {"topic": "devices/#"}}
FLEET_READ = {"name": "fleet-read", "effect": "allow", "subjects": ["authenticated"],
              "actions": ["read"], "mqtt": {"topic": "fleet/#"}}
FLEET_WRITE = {"name": "fleet-write", "effect": "allow", "subjects": ["authenticated"],
               "actions": ["write"], "mqtt": {"topic": "fleet/#"}}


def policy(*rules):
    return {
        "device_keys": {"devices": {
            d: {"key_sha256": [hashlib.sha256(DEVICE_KEY.encode()).hexdigest()]}
            for d in ("lamp-01", "watcher")}},
        "acl": {"rules": [OWN_TOPICS, DEVICES_READ, *rules]},
    }


POLICY_A = policy(FLEET_READ)
POLICY_B = policy(FLEET_READ, FLEET_WRITE)


# Raw MQTT 3.1.1 (a connection the test keeps open across a push).

def s(text):
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def packet(first_byte, body):
    return bytes([first_byte]) + e2e.mqtt_varint(len(body)) + body


def read_packet(conn):
    """One MQTT packet (first byte, body), or None at EOF."""
    head = conn.recv(1)
    if not head:
        return None
    length, shift = 0, 0
    while True:
        b = conn.recv(1)[0]
        length |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    body = b""
    while len(body) < length:
        chunk = conn.recv(length - len(body))
        if not chunk:
            return None
        body += chunk
    return head[0], body


class Device:
    """lamp-01 on one TCP connection through Envoy (device key as password)."""

    def __init__(self, proxy):
        self.conn = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        client_id = f"lamp-01-{uuid.uuid4().hex[:6]}"
        self.conn.sendall(packet(0x10, s("MQTT") + bytes([4, 0xC2]) + (60).to_bytes(2, "big")
                                 + s(client_id) + s("lamp-01") + s(DEVICE_KEY)))
        assert read_packet(self.conn) == (0x20, b"\x00\x00"), "CONNACK accepted"
        self.packet_id = 0

    def publish(self, topic, payload):
        """PUBLISH QoS 1; returns once the PUBACK came (mqtt-acl answers a denied one with a
        PUBACK too, as Mosquitto does)."""
        self.packet_id += 1
        pid = self.packet_id.to_bytes(2, "big")
        self.conn.sendall(packet(0x32, s(topic) + pid + payload.encode()))
        assert read_packet(self.conn) == (0x40, pid), "PUBACK"

    def close(self):
        self.conn.sendall(b"\xe0\x00")  # DISCONNECT
        self.conn.close()


def ecds_stats(proxy):
    """extension_config_discovery.network_filter.mqtt-acl.*: ints, version_text a string."""
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


def fleet_publish_delivered(proxy, subscriber, device=None):
    """Publishes to fleet/lamp-01 and then an allowed marker, on `device`'s connection (else a
    new one); True if the subscriber got the fleet message."""
    own = device or Device(proxy)
    probe = uuid.uuid4().hex[:10]
    try:
        own.publish("fleet/lamp-01", f"fleet-{probe}")
        own.publish("devices/lamp-01/state", f"marker-{probe}")
    finally:
        if device is None:
            own.close()
    subscriber.wait_for(f"marker-{probe}")
    return any(f"fleet-{probe}" in line for line in subscriber.messages())


@pytest.fixture(scope="module")
def mosquitto(work_dir):
    server = e2e.Mosquitto(work_dir, name="mosquitto-reload")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mqtt_wasm(work_dir):
    return e2e.copy_module(work_dir, e2e.MQTT_WASM)


@pytest.fixture(scope="module")
def reload_envoy(work_dir, mosquitto, mqtt_wasm):
    envoy = e2e.MqttEnvoy(work_dir=work_dir, name="envoy-mqtt-ecds", filter_config=POLICY_A,
                          broker_port=mosquitto.port, wasm=mqtt_wasm,
                          ecds_dir=os.path.join(work_dir, "mqtt-ecds")).start()
    yield envoy
    envoy.stop()


@pytest.fixture
def proxy(reload_envoy, work_dir, mqtt_wasm):
    """The ECDS Envoy back at policy A (push-config says "unchanged" when it already is),
    and still the same process afterwards."""
    e2e.push_config(reload_envoy, work_dir, POLICY_A, mqtt_wasm)
    pid = reload_envoy.pid
    yield reload_envoy
    assert reload_envoy.proc.alive(), "Envoy exited"
    assert reload_envoy.pid == pid, "Envoy restarted"


@pytest.fixture
def subscriber(proxy):
    """`watcher` subscribed to fleet/# and devices/# (allowed by A and B)."""
    sub = e2e.MqttSubscriber(proxy.port, "-u", "watcher", "-P", DEVICE_KEY,
                             "-i", "watcher-" + uuid.uuid4().hex[:6], "-q", "1",
                             "-t", "fleet/#", "-t", "devices/#")
    yield sub
    sub.stop()


# ------------------------------------------------------------------------------------------------


def test_the_mqtt_sidecar_discovers_mqtt_acl_from_the_network_wasm_resource(proxy):
    with open(proxy.ecds_resource) as f:
        resource = json.load(f)
    typed = resource["resources"][0]["typed_config"]
    assert typed["@type"] == "type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm"
    assert "allow_on_headers_stop_iteration" not in typed["config"]  # an HTTP-only option
    stats = ecds_stats(proxy)
    assert stats["version_text"] == resource["version_info"]
    assert stats["update_rejected"] == 0 and stats["update_failure"] == 0
    dump = proxy.admin("/config_dump?resource=ecds_filters").json()["configs"]
    assert [c["ecds_filter"]["name"] for c in dump] == ["mqtt-acl"]


def test_a_publish_refused_under_a_is_allowed_after_pushing_b_without_restart(
        proxy, subscriber, work_dir, mqtt_wasm):
    pid = proxy.pid
    denied = proxy.stats().get("publish.denied", 0)
    assert not fleet_publish_delivered(proxy, subscriber)
    assert proxy.stats()["publish.denied"] == denied + 1

    # Policy B with another module: the same code plus a custom section, so other bytes
    # (push-config installs it as modules/mqtt-acl-<its sha256>.wasm).
    module = os.path.join(work_dir, "mqtt_acl-b.wasm")
    name, payload = b"e2e-reload", uuid.uuid4().bytes
    section = e2e.mqtt_varint(len(name)) + name + payload  # LEB128 = MQTT's varint (< 2^28)
    with open(mqtt_wasm, "rb") as src, open(module, "wb") as dst:
        dst.write(src.read() + b"\x00" + e2e.mqtt_varint(len(section)) + section)
    out = e2e.push_config(proxy, work_dir, POLICY_B, module)
    assert "accepted" in out, out
    with open(proxy.ecds_resource) as f:
        in_force = json.load(f)["resources"][0]["typed_config"]["config"]
    installed = in_force["vm_config"]["code"]["local"]["filename"]
    with open(installed, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest()[:16] in os.path.basename(installed)
    assert proxy.pid == pid
    assert fleet_publish_delivered(proxy, subscriber)  # a new connection: policy B

    out = e2e.push_config(proxy, work_dir, POLICY_A)
    assert "accepted" in out, out
    assert not fleet_publish_delivered(proxy, subscriber)  # and back
    assert proxy.pid == pid


def test_an_open_connection_keeps_the_policy_it_was_accepted_with(proxy, subscriber, work_dir):
    """Measured: Envoy builds a connection's network filters when it accepts it, so a push
    changes the policy for new connections; one that is open keeps deciding with the policy
    (and VM) it started with until it closes. A device that must lose a right at once has to
    be disconnected (or its token expire, expiry_check)."""
    under_a = Device(proxy)
    try:
        assert not fleet_publish_delivered(proxy, subscriber, under_a)
        out = e2e.push_config(proxy, work_dir, POLICY_B)
        assert "accepted" in out, out
        under_b = Device(proxy)
        try:
            assert fleet_publish_delivered(proxy, subscriber, under_b)
            assert not fleet_publish_delivered(proxy, subscriber, under_a)  # still policy A

            # And the other way: B's open connection keeps B after A is pushed back.
            out = e2e.push_config(proxy, work_dir, POLICY_A)
            assert "accepted" in out, out
            assert fleet_publish_delivered(proxy, subscriber, under_b)
            assert not fleet_publish_delivered(proxy, subscriber)
        finally:
            under_b.close()
    finally:
        under_a.close()


def test_a_configuration_envoy_rejects_keeps_the_old_policy_serving(proxy, subscriber,
                                                                    work_dir):
    before = ecds_stats(proxy)
    # No authentication method at all: mqtt-acl refuses it at configure time. --no-validate
    # skips push-config's offline check, so Envoy itself has to reject it.
    bad = copy.deepcopy(POLICY_B)
    del bad["device_keys"]
    out = e2e.push_config(proxy, work_dir, bad, expect=1, extra_args=["--no-validate"])
    assert "REJECTED by Envoy" in out, out
    assert "configure at least one of jwt_providers, device_keys, mtls" in out, out
    after = ecds_stats(proxy)
    assert after["update_rejected"] == before["update_rejected"] + 1
    assert after["version_text"] == before["version_text"]
    with open(proxy.ecds_resource) as f:
        assert json.load(f)["version_info"] == before["version_text"], "file restored"
    # Policy A still decides new connections: devices connect, fleet writes stay refused.
    assert not fleet_publish_delivered(proxy, subscriber)

    # The offline check refuses it before anything is written (the default).
    out = e2e.push_config(proxy, work_dir, bad, expect=1)
    assert "REFUSED offline" in out, out
    assert ecds_stats(proxy)["update_rejected"] == after["update_rejected"]


def test_a_resource_with_the_http_wasm_type_is_rejected_by_the_network_filter(
        proxy, subscriber, work_dir):
    """The listener accepts only the network wasm type (type_urls): a resource of the HTTP
    type (e.g. token-auth's copied by mistake) is refused, and policy A stays."""
    before = ecds_stats(proxy)
    with open(proxy.ecds_resource) as f:
        original = json.load(f)
    resource = copy.deepcopy(original)
    resource["resources"][0]["typed_config"]["@type"] = (
        "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm")
    resource["version_info"] = "http-type-" + uuid.uuid4().hex[:6]
    try:
        e2e.render.write_atomically(proxy.ecds_resource, resource)
        e2e.wait_until(lambda: ecds_stats(proxy)["update_rejected"] > before["update_rejected"]
                       or ecds_stats(proxy)["update_failure"] > before["update_failure"],
                       "Envoy's verdict on the HTTP-typed resource", timeout=30)
        assert ecds_stats(proxy)["version_text"] == before["version_text"]
        assert not fleet_publish_delivered(proxy, subscriber)
    finally:
        e2e.render.write_atomically(proxy.ecds_resource, original)


RENDER = os.path.join(e2e.ROOT, "envoy", "render.py")


def test_render_py_mqtt_on_the_command_line_renders_the_reloadable_mqtt_sidecar(
        work_dir, mosquitto, mqtt_wasm):
    """render.py --mqtt --ecds DIR, as an operator runs it: writes DIR/mqtt-acl.json (the
    builders' resource) and a configuration Envoy runs; push-config then changes the policy."""
    ecds_dir = os.path.join(work_dir, "mqtt-ecds-cli")
    os.makedirs(ecds_dir, exist_ok=True)
    config_path = os.path.join(work_dir, "mqtt-acl-cli.json")
    with open(config_path, "w") as f:
        json.dump(POLICY_A, f)
    done = subprocess.run(
        [sys.executable, RENDER, "--mqtt", "--filter-config", config_path, "--ecds", ecds_dir,
         "--wasm", mqtt_wasm, "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
         "--broker", f"127.0.0.1:{mosquitto.port}", "--node-id", "envoy-mqtt-cli"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    resource_path = os.path.join(ecds_dir, "mqtt-acl.json")
    assert f"wrote mqtt-acl's ECDS resource {resource_path}" in done.stderr
    assert "NOT validated" not in done.stderr  # host-harness validate checked it
    with open(resource_path) as f:
        assert json.load(f) == e2e.render.ecds_resource(POLICY_A, mqtt_wasm, name="mqtt-acl",
                                                        network=True)
    assert done.stdout == e2e.render.render_mqtt(
        POLICY_A, listen="127.0.0.1:0", admin="127.0.0.1:0",
        broker=f"127.0.0.1:{mosquitto.port}", wasm=mqtt_wasm, node_id="envoy-mqtt-cli",
        ecds_dir=ecds_dir)

    proxy = e2e.MqttEnvoy(work_dir=work_dir, name="envoy-mqtt-cli", filter_config=POLICY_A,
                          broker_port=mosquitto.port, wasm=mqtt_wasm, ecds_dir=ecds_dir)
    proxy.launch(done.stdout, "wasm:debug")
    try:
        Device(proxy).close()  # lamp-01's key is accepted: policy A came from the file
        e2e.push_config(proxy, work_dir, POLICY_B)
        assert ecds_stats(proxy)["update_rejected"] == 0
        sub = e2e.MqttSubscriber(proxy.port, "-u", "watcher", "-P", DEVICE_KEY,
                                 "-i", "watcher-" + uuid.uuid4().hex[:6], "-q", "1",
                                 "-t", "fleet/#", "-t", "devices/#")
        try:
            assert fleet_publish_delivered(proxy, sub), "policy B (fleet writes) in force"
        finally:
            sub.stop()
    finally:
        proxy.stop()


def test_render_py_mqtt_refuses_http_only_options(tmp_path):
    config_path = tmp_path / "mqtt-acl.json"
    config_path.write_text(json.dumps(POLICY_A))
    for extra in (["--idp", "127.0.0.1:3001"], ["--entity-acl-config", str(config_path)],
                  ["--allow-on-headers-stop-iteration"]):
        done = subprocess.run([sys.executable, RENDER, "--mqtt", "--filter-config",
                               str(config_path), "--no-validate", *extra],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 2, (extra, done.stderr)
        assert f"--mqtt: {extra[0]} only apply to the HTTP sidecar" in done.stderr
        assert done.stdout == ""


def test_render_py_http_cluster_adds_the_http_services_the_filters_ask(tmp_path):
    """--http-cluster NAME=HOST:PORT (repeatable): the plain HTTP clusters an mqtt-acl
    http_backend, a device registry or an introspection endpoint needs, on the command line as
    render_mqtt(http_clusters=...) renders them (test_mqtt_http_backend.py runs that sidecar),
    and Envoy accepts the result; a template's own cluster name or a malformed value is refused."""
    config = dict(POLICY_A, http_backend={"cluster": "webapp", "authority": "webapp.internal",
                                          "user": {"path": "/auth"}, "acl": {"path": "/acl"}})
    config_path = tmp_path / "mqtt-acl.json"
    config_path.write_text(json.dumps(config))
    clusters = [("webapp", "127.0.0.1:8081"), ("registry", "registry.internal:8443")]
    done = subprocess.run(
        [sys.executable, RENDER, "--mqtt", "--filter-config", str(config_path), "--no-validate",
         *[arg for name, address in clusters for arg in ("--http-cluster", f"{name}={address}")]],
        capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout == e2e.render.render_mqtt(config, http_clusters=clusters)
    assert "  - name: webapp\n" in done.stdout and "  - name: registry\n" in done.stdout
    rendered = tmp_path / "mqtt-sidecar.yaml"
    rendered.write_text(done.stdout)
    valid = subprocess.run([e2e.ENVOY, "--mode", "validate", "-c", str(rendered)],
                           capture_output=True, text=True, timeout=60)
    assert valid.returncode == 0, valid.stdout + valid.stderr
    for value, message in (("mosquitto=127.0.0.1:1", "mosquitto is a cluster of the template"),
                           ("webapp", "expected NAME=HOST:PORT"),
                           ("web app=127.0.0.1:1", "expected NAME=HOST:PORT"),
                           ("webapp=nowhere", "--http-cluster webapp")):
        done = subprocess.run([sys.executable, RENDER, "--mqtt", "--filter-config",
                               str(config_path), "--no-validate", "--http-cluster", value],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 2 and message in done.stderr, (value, done.stderr)
        assert done.stdout == ""
