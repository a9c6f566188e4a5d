"""Concurrent CONNECTs that need the same callout share one call per VM (mqtt-acl, Envoy 1.40,
Mosquitto): several paho clients of one registered device connect at once while the device
registry (device_registry_standin.py) answers slowly. The registry is asked once, every client
is admitted and publishes to a subscriber through Envoy; with the registry down, one call
refuses them all. The same for an opaque token as the user name (the LAMPI web app's scheme):
the real OIDC provider (tests/e2e/idp) holds its introspection answers until every CONNECT has
joined the first one's call; it is asked once, and every client is admitted.
(filters/mqtt-acl/README.md, "Concurrent CONNECTs share callouts".)"""

import threading
import uuid

import paho.mqtt.client as paho  # tests/e2e/requirements.txt
import pytest

import e2e_support as e2e
from device_registry_standin import DeviceRegistry

CLIENTS = 8
# The registry answers this late: every CONNECT arrives while the first one's lookup is out.
SLOW_S = 1.5


def mqtt_config():
    return {"acl": {"rules": [{"name": "lamps", "effect": "allow", "subjects": ["role:device"],
                               "actions": ["*"], "mqtt": {"topic": "lamps/#"}}]},
            "device_keys": {"registry": {
                "cluster": "iot-directory", "authority": "iotdirectory.example",
                "path": "/api/device-keys", "timeout_ms": 5000,
                "cache": {"max_entries": 1000, "positive_ttl_s": 60, "negative_ttl_s": 2}}}}


@pytest.fixture(scope="module")
def registry():
    standin = DeviceRegistry({}).start()
    yield standin
    standin.stop()


@pytest.fixture(scope="module")
def mosquitto(work_dir):
    server = e2e.Mosquitto(work_dir, name="mosquitto-concurrent")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy(work_dir, mosquitto, registry):
    # One worker: one VM, so one call for all the CONNECTs.
    envoy = e2e.MqttEnvoy(work_dir=work_dir, name="envoy-mqtt-concurrent",
                          filter_config=mqtt_config(), broker_port=mosquitto.port,
                          wasm=e2e.copy_module(work_dir, e2e.MQTT_WASM), concurrency=1,
                          http_clusters=(("iot-directory", f"127.0.0.1:{registry.port}"),)).start()
    yield envoy
    envoy.stop()


def new_device(registry):
    device = f"lamp-{uuid.uuid4().hex[:8]}"
    key = "K1-" + uuid.uuid4().hex
    registry.set_keys(device, [key])
    return device, key


class Client:
    """A paho client of `device` (client id `<device>-<n>`); connects without waiting."""

    def __init__(self, port, device, key, n, client_id=None):
        # No reconnects: a refused client would ask again.
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2,
                                  client_id=client_id or f"{device}-{n}",
                                  protocol=paho.MQTTv311, reconnect_on_failure=False)
        self.client.username_pw_set(device, key)
        self.connack = None
        self.published = threading.Event()
        self.client.on_connect = lambda c, u, flags, rc, props: setattr(self, "connack", rc)
        self.client.on_publish = lambda c, u, mid, rc, props: self.published.set()
        self.port = port

    def connect(self):
        self.client.connect_async("127.0.0.1", self.port, keepalive=60)
        self.client.loop_start()

    def stop(self):
        self.client.disconnect()
        self.client.loop_stop()


def connect_all(port, device, key):
    clients = [Client(port, device, key, n) for n in range(CLIENTS)]
    for c in clients:
        c.connect()
    e2e.wait_until(lambda: all(c.connack is not None for c in clients),
                   "every client's CONNACK", timeout=SLOW_S + 10)
    return clients


def test_clients_of_one_device_connecting_at_once_share_one_lookup(proxy, registry):
    device, key = new_device(registry)
    watcher, watcher_key = new_device(registry)
    sub = e2e.MqttSubscriber(proxy.port, "-u", watcher, "-P", watcher_key, "-i", watcher,
                             "-t", f"lamps/{device}/#")
    joined_before = proxy.stats("wasmcustom.mqtt_acl.").get("callout.joined", 0)
    registry.set_delay(SLOW_S)
    clients = []
    try:
        clients = connect_all(proxy.port, device, key)
        assert [c.connack for c in clients] == [0] * CLIENTS, [c.connack for c in clients]
        assert registry.asks(device) == 1, "one lookup for all the CONNECTs"
        stats = proxy.stats("wasmcustom.mqtt_acl.")
        assert stats["callout.joined"] - joined_before == CLIENTS - 1, stats
        markers = [f"m{n}-{uuid.uuid4().hex[:6]}" for n in range(CLIENTS)]
        for c, marker in zip(clients, markers):
            c.client.publish(f"lamps/{device}/state", marker, qos=1)
        for marker in markers:
            sub.wait_for(f"lamps/{device}/state {marker}")
    finally:
        registry.set_delay(0)
        for c in clients:
            c.stop()
        sub.stop()


def test_the_registry_down_refuses_every_waiting_client_on_one_call(proxy, mosquitto, registry):
    device, key = new_device(registry)
    accepted = mosquitto.connections_accepted()
    registry.set_delay(SLOW_S)
    registry.set_down(True)
    clients = []
    try:
        clients = connect_all(proxy.port, device, key)
        # CONNACK 0x03 (paho: "Server unavailable") for each of them, on the one answer.
        codes = [str(c.connack) for c in clients]
        assert codes == ["Server unavailable"] * CLIENTS, codes
        assert registry.asks(device) == 1
        assert mosquitto.connections_accepted() == accepted
    finally:
        registry.set_down(False)
        registry.set_delay(0)
        for c in clients:
            c.stop()


# ---- an opaque token as the user name: introspection shared ----

OPAQUE = e2e.MQTT_OPAQUE_AUDIENCE


def test_clients_with_one_opaque_token_connecting_at_once_share_one_introspection(
        work_dir, idp, mosquitto):
    # One worker: one VM, so one introspection for all the CONNECTs.
    envoy = e2e.MqttEnvoy(work_dir=work_dir, name="envoy-mqtt-concurrent-opaque",
                          filter_config=e2e.mqtt_opaque_config(idp, timeout_ms=10000), broker_port=mosquitto.port,
                          wasm=e2e.copy_module(work_dir, e2e.MQTT_WASM), concurrency=1,
                          http_clusters=(("idp", idp.authority),)).start()
    token = idp.token(OPAQUE)
    assert token.count(".") != 2, "an opaque token, not a JWT"
    topic = f"lamps/{uuid.uuid4().hex[:8]}/state"
    sub = e2e.MqttSubscriber(mosquitto.port, "-i", "watcher-opaque", "-t", topic)
    clients = [Client(envoy.port, token, None, n, client_id=f"browser-{n}-{uuid.uuid4().hex[:6]}")
               for n in range(CLIENTS)]
    stats_before = envoy.stats("wasmcustom.mqtt_acl.")
    before = idp.count("/token/introspection")
    idp.hold_introspection()
    try:
        for c in clients:
            c.connect()
        # Every CONNECT waits on the first one's introspection, which the IdP holds.
        e2e.wait_until(
            lambda: envoy.stats("wasmcustom.mqtt_acl.").get("callout.joined", 0)
            - stats_before.get("callout.joined", 0) >= CLIENTS - 1,
            "every CONNECT joined the introspection in flight", timeout=10)
        assert all(c.connack is None for c in clients)
        idp.release_introspection()
        e2e.wait_until(lambda: all(c.connack is not None for c in clients),
                       "every client's CONNACK", timeout=10)
        assert [c.connack for c in clients] == [0] * CLIENTS, [c.connack for c in clients]
        assert idp.count("/token/introspection") - before == 1, "one introspection for all"
        stats = envoy.stats("wasmcustom.mqtt_acl.")
        assert stats["introspection.asked"] - stats_before.get("introspection.asked", 0) == 1
        markers = [f"m{n}-{uuid.uuid4().hex[:6]}" for n in range(CLIENTS)]
        for c, marker in zip(clients, markers):
            c.client.publish(topic, marker, qos=1)
        for marker in markers:
            sub.wait_for(f"{topic} {marker}")
    finally:
        idp.release_introspection()
        for c in clients:
            c.stop()
        sub.stop()
        envoy.stop()
