"""Device keys from a registry (Snap4city's IoT Directory keeps K1/K2 with the device's owner):
token-auth and mqtt-acl in a real Envoy 1.40 look up devices the configuration does not list
through an Envoy cluster, cache the answer for a bounded time, and fail closed.

The registry is a stand-in (device_registry_standin.py) that records the ids it was asked and
whose keys can be revoked while the test runs. HTTP requests go to the Orion stand-in
(broker_standin.py), MQTT to a real Mosquitto (allow_anonymous, no ACL: every refusal seen
here is the filter's)."""

import time
import uuid

import pytest

import e2e_support as e2e
from device_registry_standin import DeviceRegistry

# The caches' positive TTL: a revoked key works at most this long.
POSITIVE_TTL_S = 4


def registry_config(**cache):
    return {"cluster": "iot-directory", "authority": "iotdirectory.example",
            "path": "/api/device-keys", "timeout_ms": 1000,
            "cache": {"max_entries": 1000, "positive_ttl_s": POSITIVE_TTL_S,
                      "negative_ttl_s": 2, **cache}}


def token_auth_config():
    return {"credentials": {"sources": [{"type": "device_key", "in": "header",
                                         "id": "x-device-id", "key": "x-device-key"}]},
            "device_keys": {"registry": registry_config()},
            "realm": "devices"}


def mqtt_config():
    return {"acl": {"rules": [{"name": "own-lamp", "effect": "allow", "subjects": ["role:device"],
                               "actions": ["*"], "mqtt": {"topic": "lamps/%u/#"}},
                              {"name": "watch", "effect": "allow", "subjects": ["role:device"],
                               "actions": ["read"], "mqtt": {"topic": "lamps/#"}}]},
            "device_keys": {"registry": registry_config()}}


def new_device(registry, prefix="lamp"):
    """A freshly registered device id and its key (nothing cached about it yet)."""
    device = f"{prefix}-{uuid.uuid4().hex[:8]}"
    key = "K1-" + uuid.uuid4().hex
    registry.set_keys(device, [key])
    return device, key


@pytest.fixture(scope="module")
def registry():
    standin = DeviceRegistry({}).start()
    yield standin
    standin.stop()


@pytest.fixture(scope="module")
def proxy(work_dir, wasm, broker, registry):
    # One worker: the registry cache is per worker (VM), and the tests count lookups.
    envoy = e2e.Envoy(work_dir=work_dir, name="envoy-device-registry",
                      filter_config=token_auth_config(), broker_port=broker.port,
                      idp_port=e2e.free_port(), wasm=wasm, concurrency=1,
                      http_clusters=(("iot-directory", f"127.0.0.1:{registry.port}"),)).start()
    yield envoy
    envoy.stop()


def device_request(proxy, device, key, probe):
    return proxy.request("GET", "/v2/entities?type=Lamp",
                         {"x-device-id": device, "x-device-key": key, "x-e2e-probe": probe})


# ------------------------------------------------------------------------------------------------
# token-auth


def test_a_registered_device_reaches_the_broker_as_itself_and_is_looked_up_once(
        proxy, broker, registry):
    device, key = new_device(registry)
    probes = [uuid.uuid4().hex for _ in range(3)]
    for probe in probes:
        r = device_request(proxy, device, key, probe)
        assert r.status == 200, r.body
    # Three requests, one lookup: the others were answered from the cache.
    assert registry.asks(device) == 1
    for probe in probes:
        [record] = broker.received(probe)
        headers = dict((k, v) for k, v in record["headers"])
        assert headers["x-auth-subject"] == device
        assert headers["x-auth-kind"] == "device_key"
        assert "x-device-key" not in headers and key not in str(record)
    # The filter never logs a key (Envoy's own http debug log prints request headers).
    filter_lines = [l for l in proxy.log_text().splitlines() if "wasm log" in l]
    assert filter_lines and not any(key in l for l in filter_lines)


def test_a_wrong_key_and_an_unknown_device_are_401_and_never_reach_the_broker(
        proxy, broker, registry):
    device, key = new_device(registry)
    probe = uuid.uuid4().hex
    assert device_request(proxy, device, "K1-guess", probe).status == 401
    ghost = "ghost-" + uuid.uuid4().hex[:8]
    r = device_request(proxy, ghost, key, probe)
    assert r.status == 401
    # An unknown device and a wrong key look the same to the client.
    assert 'error="invalid_token", error_description="invalid device key"' in \
        dict(r.headers).get("www-authenticate", "")
    assert broker.received(probe) == []
    # The unknown id is remembered for the negative TTL: asked once for two requests.
    assert device_request(proxy, ghost, key, probe).status == 401
    assert registry.asks(ghost) == 1


def test_a_revoked_key_stops_working_within_the_positive_ttl(proxy, broker, registry):
    device, k1 = new_device(registry)
    k2 = "K2-" + uuid.uuid4().hex
    registry.set_keys(device, [k1, k2])
    assert device_request(proxy, device, k1, uuid.uuid4().hex).status == 200
    revoked_at = time.monotonic()
    registry.set_keys(device, [k2])
    # Still cached: K1 works until the entry expires...
    assert device_request(proxy, device, k1, uuid.uuid4().hex).status == 200
    assert registry.asks(device) == 1
    # ...then the registry is asked again and K1 is refused; K2 goes on working.
    def refused_probe():
        probe = uuid.uuid4().hex
        return device_request(proxy, device, k1, probe).status == 401 and probe
    probe = e2e.wait_until(refused_probe, "the revoked key to be refused",
                           timeout=POSITIVE_TTL_S + 5, interval=0.5)
    assert time.monotonic() - revoked_at <= POSITIVE_TTL_S + 2
    assert broker.received(probe) == []
    assert registry.asks(device) == 2
    assert device_request(proxy, device, k2, uuid.uuid4().hex).status == 200


def test_the_registry_down_is_503_never_an_allow_and_not_cached(proxy, broker, registry):
    device, key = new_device(registry)
    registry.set_down(True)
    try:
        probe = uuid.uuid4().hex
        for _ in range(2):
            r = device_request(proxy, device, key, probe)
            assert r.status == 503, r.body
        assert broker.received(probe) == []
        assert registry.asks(device) == 2, "a failure is not cached"
    finally:
        registry.set_down(False)
    probe = uuid.uuid4().hex
    assert device_request(proxy, device, key, probe).status == 200
    assert len(broker.received(probe)) == 1


# ------------------------------------------------------------------------------------------------
# mqtt-acl


@pytest.fixture(scope="module")
def mosquitto(work_dir):
    server = e2e.Mosquitto(work_dir, name="mosquitto-device-registry")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mqtt_wasm(work_dir):
    return e2e.copy_module(work_dir, e2e.MQTT_WASM)


@pytest.fixture(scope="module")
def mqtt_proxy(work_dir, mosquitto, mqtt_wasm, registry):
    envoy = e2e.MqttEnvoy(work_dir=work_dir, name="envoy-mqtt-device-registry",
                          filter_config=mqtt_config(), broker_port=mosquitto.port,
                          wasm=mqtt_wasm, concurrency=1,
                          http_clusters=(("iot-directory", f"127.0.0.1:{registry.port}"),)).start()
    yield envoy
    envoy.stop()


def publish(port, device, key, topic, payload, *more):
    return e2e.mqtt_run("pub", port, "-u", device, "-P", key, "-i", device, "-t", topic,
                        "-m", payload, *more)


def test_a_registered_device_publishes_and_only_that_reaches_the_subscriber(
        mqtt_proxy, mosquitto, registry):
    device, key = new_device(registry)
    watcher, watcher_key = new_device(registry, "watcher")
    marker = "on-" + uuid.uuid4().hex[:6]
    sub = e2e.MqttSubscriber(mqtt_proxy.port, "-u", watcher, "-P", watcher_key, "-i", watcher,
                             "-t", "lamps/#")
    try:
        for topic, payload in ((f"lamps/{watcher}/set", "not-its-lamp"),
                               (f"lamps/{device}/state", marker)):
            done = publish(mqtt_proxy.port, device, key, topic, payload)
            assert done.returncode == 0, done.stderr
        sub.wait_for(f"lamps/{device}/state {marker}")
    finally:
        lines = sub.stop()
    assert "not-its-lamp" not in lines, lines
    # Two CONNECTs of the device, one lookup (the cache); the key never reached the broker.
    assert registry.asks(device) == 1
    log = mosquitto.log_text()
    assert f"u'{device}'" in log, log[-2000:]
    assert key not in log
    stats = mqtt_proxy.stats("wasmcustom.mqtt_acl.")
    assert stats["registry.asked"] >= 2 and stats["registry.answered"] >= 2


def test_an_unknown_device_and_a_wrong_key_are_bad_user_name_or_password(
        mqtt_proxy, mosquitto, registry):
    device, key = new_device(registry)
    ghost = "ghost-" + uuid.uuid4().hex[:8]
    accepted = mosquitto.connections_accepted()
    for who, password in ((ghost, key), (device, "K1-guess")):
        for version in ("mqttv311", "5"):
            done = publish(mqtt_proxy.port, who, password, f"lamps/{who}/state", "x",
                           "-V", version)
            assert done.returncode != 0
            assert "bad user name or password" in done.stderr.lower(), done.stderr
    assert mosquitto.connections_accepted() == accepted
    assert registry.asks(ghost) == 1, "the unknown id is remembered for the negative TTL"


def test_the_registry_down_is_server_unavailable(mqtt_proxy, mosquitto, registry):
    device, key = new_device(registry)
    registry.set_down(True)
    try:
        accepted = mosquitto.connections_accepted()
        for version in ("mqttv311", "5"):
            done = publish(mqtt_proxy.port, device, key, f"lamps/{device}/state", "x",
                           "-V", version)
            assert done.returncode != 0
            assert any(m in done.stderr.lower()
                       for m in ("broker unavailable", "server unavailable")), done.stderr
        assert mosquitto.connections_accepted() == accepted
        assert registry.asks(device) == 2, "a failure is not cached"
    finally:
        registry.set_down(False)
    assert publish(mqtt_proxy.port, device, key, f"lamps/{device}/state", "x").returncode == 0


def test_a_revoked_device_key_is_refused_after_the_ttl(mqtt_proxy, registry):
    device, key = new_device(registry)
    assert publish(mqtt_proxy.port, device, key, f"lamps/{device}/state", "1").returncode == 0
    revoked_at = time.monotonic()
    registry.set_keys(device, [])
    done = e2e.wait_until(
        lambda: (d := publish(mqtt_proxy.port, device, key, f"lamps/{device}/state", "2"))
        .returncode != 0 and d,
        "the revoked key to be refused", timeout=POSITIVE_TTL_S + 5, interval=0.5)
    assert "bad user name or password" in done.stderr.lower(), done.stderr
    assert time.monotonic() - revoked_at <= POSITIVE_TTL_S + 3
    assert registry.asks(device) == 2
