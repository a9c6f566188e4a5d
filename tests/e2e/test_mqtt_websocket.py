"""MQTT over WebSockets: mqtt_acl.wasm with "transport": "websocket" in a real Envoy 1.40
(render_mqtt(websocket=True)) in front of a real Mosquitto 2.0's WebSocket listener
(`listener` + `protocol websockets`), with real WebSocket clients: paho-mqtt's websockets
transport (Python) and the npm `mqtt` package (MQTT.js, what browser apps use), over ws:// and
wss:// (Envoy terminating TLS).

What reached the broker is read from a mosquitto_sub on the broker's own TCP listener (behind
Envoy's back) subscribed to '#'; what reached the subscribers from the clients themselves."""

import base64
import hashlib
import json
import os
import socket
import subprocess
import time
import uuid

import paho.mqtt.client as paho  # tests/e2e/requirements.txt
import pytest

import e2e_support as e2e
from webapp_auth_standin import WebappAuth

ISSUER = "https://idp.e2e.example"
SECRET = os.urandom(32)
DEVICE_KEY = "k-" + uuid.uuid4().hex
MQTTJS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mqttjs")


def config():
    return {
        "jwt_providers": [{
            "issuer": ISSUER, "audiences": ["mqtt"], "algorithms": ["HS256"],
            "hmac_secret": base64.b64encode(SECRET).decode(), "claims": {"roles": ["roles"]},
        }],
        "device_keys": {"devices": {
            "lamp-ws": {"key_sha256": [hashlib.sha256(DEVICE_KEY.encode()).hexdigest()]}}},
        "acl": {"rules": [
            {"name": "own-topics", "effect": "allow", "subjects": ["authenticated"],
             "actions": ["*"], "mqtt": {"topic": "devices/%u/#"}},
            {"name": "ops-read", "effect": "allow", "subjects": ["role:ops"],
             "actions": ["read"], "mqtt": {"topic": "#"}},
        ]},
    }


def token(sub, roles=()):
    now = int(time.time())
    return e2e.hs256_jwt({"iss": ISSUER, "aud": "mqtt", "sub": sub, "iat": now - 5,
                          "exp": now + 600, "roles": list(roles)}, SECRET)


@pytest.fixture(scope="module")
def broker(work_dir):
    """Mosquitto with its TCP listener (the spy's way in) and a WebSocket listener (Envoy's)."""
    ws_port = e2e.free_port()
    server = e2e.Mosquitto(work_dir, name="mosquitto-ws",
                           extra_conf=f"listener {ws_port} 127.0.0.1\nprotocol websockets\n")
    server.ws_port = ws_port
    e2e.wait_until(lambda: e2e.port_open(ws_port), "mosquitto's websockets listener")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mqtt_wasm(work_dir):
    return e2e.copy_module(work_dir, e2e.MQTT_WASM)


@pytest.fixture(scope="module")
def proxy(work_dir, broker, mqtt_wasm):
    envoy = e2e.MqttEnvoy(work_dir=work_dir, name="envoy-mqtt-ws", filter_config=config(),
                          broker_port=broker.ws_port, wasm=mqtt_wasm, websocket=True).start()
    yield envoy
    envoy.stop()


MAKE_CERTS = os.path.join(e2e.ROOT, "envoy", "make-certs.sh")


@pytest.fixture(scope="module")
def certs(work_dir):
    out = os.path.join(work_dir, "ws-certs")
    subprocess.run([MAKE_CERTS, out, "lamp-ws"], check=True, capture_output=True, timeout=60)
    return {"server_cert": os.path.join(out, "server.crt"),
            "server_key": os.path.join(out, "server.key"),
            "ca_cert": os.path.join(out, "ca.crt")}


@pytest.fixture(scope="module")
def tls_proxy(work_dir, broker, mqtt_wasm, certs):
    envoy = e2e.MqttEnvoy(work_dir=work_dir, name="envoy-mqtt-wss", filter_config=config(),
                          broker_port=broker.ws_port, wasm=mqtt_wasm, websocket=True,
                          tls={"cert": certs["server_cert"], "key": certs["server_key"]}).start()
    yield envoy
    envoy.stop()


@pytest.fixture
def spy(broker):
    """What reaches the broker: mosquitto_sub on its TCP listener, subscribed to '#'."""
    sub = e2e.MqttSubscriber(broker.port, "-t", "#", "-i", "spy-" + uuid.uuid4().hex[:6])
    yield sub
    sub.stop()


class PahoWs:
    """paho-mqtt over WebSockets: CONNACK code, SUBACK codes, messages received."""

    def __init__(self, port, username, password=None, client_id=None, tls_ca=None):
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2,
                                  client_id=client_id or username, transport="websockets",
                                  protocol=paho.MQTTv311)
        self.client.ws_set_options(path="/mqtt")
        self.client.username_pw_set(username, password)
        if tls_ca:
            self.client.tls_set(ca_certs=tls_ca)
        self.connack = None
        self.subacks = {}
        self.messages = []
        self.client.on_connect = lambda c, u, flags, rc, props: setattr(self, "connack", rc)
        self.client.on_subscribe = lambda c, u, mid, codes, props: self.subacks.update(
            {mid: [int(code.value) for code in codes]})
        self.client.on_message = lambda c, u, m: self.messages.append(
            (m.topic, m.payload.decode()))
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        e2e.wait_until(lambda: self.connack is not None, "paho's CONNACK", timeout=10)

    def subscribe(self, topic):
        _, mid = self.client.subscribe(topic, qos=1)
        e2e.wait_until(lambda: mid in self.subacks, "paho's SUBACK", timeout=10)
        return self.subacks[mid]

    def publish(self, topic, message, qos=1):
        info = self.client.publish(topic, message, qos=qos)
        if qos:
            # paho 2 returns silently on a timeout: the PUBACK (a plain one for a refused
            # PUBLISH) must have come back in a frame.
            info.wait_for_publish(timeout=10)
            assert info.is_published(), f"no PUBACK for {topic}"
        return info

    def stop(self):
        self.client.disconnect()
        self.client.loop_stop()


def mqttjs(options, timeout=20):
    """Runs tests/e2e/mqttjs/client.mjs (npm mqtt); returns its events."""
    done = subprocess.run(["node", os.path.join(MQTTJS, "client.mjs"), json.dumps(options)],
                          capture_output=True, text=True, timeout=timeout, cwd=MQTTJS)
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert events, f"no events: {done.stdout} {done.stderr}"
    return events


def test_paho_over_websockets_allowed_topic_delivered_forbidden_one_not(proxy, broker, spy):
    ops = PahoWs(proxy.port, token("ops-1", roles=["ops"]), client_id="ops-1-ws")
    device = PahoWs(proxy.port, "lamp-ws", DEVICE_KEY, client_id="lamp-ws")
    try:
        assert ops.connack == 0 and device.connack == 0
        assert ops.subscribe("devices/#") == [1]
        # The device may not read every device's topics: the broker never gets that SUBSCRIBE.
        assert device.subscribe("devices/#") == [128]
        device.publish("devices/lamp-ws/state", "on-ws-1")
        device.publish("devices/lamp-other/state", "forged-ws")
        e2e.wait_until(lambda: ("devices/lamp-ws/state", "on-ws-1") in ops.messages,
                       "the allowed message at the subscriber")
        spy.wait_for("devices/lamp-ws/state on-ws-1")
        time.sleep(0.5)
        assert not any("forged-ws" in payload for _, payload in ops.messages)
        assert "forged-ws" not in "\n".join(spy.lines)
    finally:
        ops.stop()
        device.stop()
    stats = proxy.stats()
    assert stats.get("publish.denied", 0) >= 1 and stats.get("subscribe.denied", 0) >= 1
    log = broker.log_text()
    # The broker saw the verified subject, never the key.
    assert "u'lamp-ws'" in log, log[-2000:]
    assert DEVICE_KEY not in log


def test_paho_with_a_bad_key_gets_a_refusing_connack_in_a_websocket_frame(proxy, broker):
    before = proxy.stats().get("connect.refused", 0)
    client = PahoWs(proxy.port, "lamp-ws", "wrong-key", client_id="lamp-ws-bad")
    try:
        # CONNACK 0x04, which paho names with its MQTT 5 equivalent.
        assert str(client.connack) == "Bad user name or password", client.connack
    finally:
        client.stop()
    assert proxy.stats()["connect.refused"] == before + 1
    assert "wrong-key" not in broker.log_text()


def test_mqttjs_over_websockets(proxy, spy):
    url = f"ws://127.0.0.1:{proxy.port}/mqtt"
    sub_token = token("ops-2", roles=["ops"])
    subscriber = subprocess.Popen(
        ["node", os.path.join(MQTTJS, "client.mjs"),
         json.dumps({"url": url, "username": sub_token, "clientId": "ops-2-js",
                     "subscribe": ["devices/#"], "stay_ms": 4000})],
        stdout=subprocess.PIPE, text=True, cwd=MQTTJS)
    try:
        time.sleep(1.5)
        events = mqttjs({"url": url, "username": "lamp-ws", "password": DEVICE_KEY,
                         "clientId": "lamp-ws-js",
                         "subscribe": ["devices/lamp-ws/#", "devices/lamp-x/#"],
                         "publish": [{"topic": "devices/lamp-ws/state", "message": "on-js",
                                      "qos": 1},
                                     {"topic": "devices/lamp-x/state", "message": "forged-js",
                                      "qos": 0}],
                         "stay_ms": 500})
        assert {"event": "connect", "code": 0} in events, events
        subacks = [e["granted"] for e in events if e["event"] == "suback"]
        assert subacks == [[1]], events
        refused = [e["topic"] for e in events if e["event"] == "suback-refused"]
        assert refused == ["devices/lamp-x/#"], events
        # Its own message came back to it through its allowed subscription.
        assert {"event": "message", "topic": "devices/lamp-ws/state",
                "payload": "on-js"} in events, events
        assert not any(e.get("payload") == "forged-js" for e in events)
        spy.wait_for("devices/lamp-ws/state on-js")
        out, _ = subscriber.communicate(timeout=15)
    finally:
        if subscriber.poll() is None:
            subscriber.kill()
    received = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert {"event": "message", "topic": "devices/lamp-ws/state", "payload": "on-js"} in received
    assert not any(e.get("payload") == "forged-js" for e in received)
    assert "forged-js" not in "\n".join(spy.lines)


def test_mqttjs_with_a_bad_credential_is_refused(proxy):
    events = mqttjs({"url": f"ws://127.0.0.1:{proxy.port}/mqtt", "username": "lamp-ws",
                     "password": "nope", "clientId": "lamp-ws-js2"})
    errors = [e for e in events if e["event"] == "error"]
    assert errors and errors[0]["code"] == 4, events
    assert not any(e["event"] == "connect" for e in events)


def test_a_bad_upgrade_gets_400_and_never_reaches_the_broker(proxy, broker):
    accepted = broker.log_text().count("New client connected")
    for request in (
        b"GET /mqtt HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Protocol: chat\r\n\r\n",
        b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00\r\n\r\n",
    ):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as conn:
            conn.sendall(request)
            answer = b""
            while True:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer
    assert broker.log_text().count("New client connected") == accepted
    assert "not a WebSocket upgrade to MQTT" in proxy.log_text()


def test_wss_through_envoy_tls(tls_proxy, certs, spy):
    device = PahoWs(tls_proxy.port, "lamp-ws", DEVICE_KEY, client_id="lamp-ws-tls",
                    tls_ca=certs["ca_cert"])
    try:
        assert device.connack == 0
        device.publish("devices/lamp-ws/state", "on-wss")
        device.publish("devices/lamp-y/state", "forged-wss")
        spy.wait_for("devices/lamp-ws/state on-wss")
    finally:
        device.stop()
    events = mqttjs({"url": f"wss://127.0.0.1:{tls_proxy.port}/mqtt", "username": "lamp-ws",
                     "password": DEVICE_KEY, "clientId": "lamp-ws-tls-js",
                     "ca": open(certs["ca_cert"]).read(),
                     "publish": [{"topic": "devices/lamp-ws/state", "message": "on-wss-js",
                                  "qos": 1}]})
    assert {"event": "connect", "code": 0} in events, events
    spy.wait_for("devices/lamp-ws/state on-wss-js")
    assert "forged-wss" not in "\n".join(spy.lines)


# ---- the seed's browser deployment: WebSockets, the web app's session token, its auth backend ----

SESSION = "tok-" + uuid.uuid4().hex  # alice's web session, the MQTT user name


@pytest.fixture(scope="module")
def webapp():
    app = WebappAuth(sessions={SESSION: "alice"}, devices=(), grants={"alice": ["lamps/7/"]})
    app.start()
    yield app
    app.stop()


@pytest.fixture(scope="module")
def backend_proxy(work_dir, broker, mqtt_wasm, webapp):
    config = {
        "client_ids": ["*"],
        "acl": {"rules": [{"name": "lamps", "effect": "allow", "subjects": ["authenticated"],
                           "actions": ["*"], "mqtt": {"topic": "lamps/#"}}]},
        "http_backend": {"cluster": "webapp", "authority": "webapp.internal",
                         "timeout_ms": 2000, "params_mode": "form",
                         "user": {"path": "/auth"}, "acl": {"path": "/acl"}},
    }
    envoy = e2e.MqttEnvoy(work_dir=work_dir, name="envoy-mqtt-ws-backend", filter_config=config,
                          broker_port=broker.ws_port, wasm=mqtt_wasm, websocket=True,
                          http_clusters=(("webapp", f"127.0.0.1:{webapp.port}"),)).start()
    yield envoy
    envoy.stop()


def test_a_browser_with_its_session_token_the_web_app_decides_over_websockets(
        backend_proxy, webapp, spy):
    """MQTT.js over ws:// with the session token as user name: its frames wait while /auth and
    /acl are out. Admitted; lamps/7 (allowed by the app) reaches the broker and comes back to
    its subscription; lamps/8 (refused by the app) and other/x (refused by the local rules)
    never reach the broker; the app's refused subscription gets a failure."""
    client_id = "alice-js-" + uuid.uuid4().hex[:6]
    marker = "on-" + uuid.uuid4().hex[:6]
    events = mqttjs({"url": f"ws://127.0.0.1:{backend_proxy.port}/mqtt", "username": SESSION,
                     "clientId": client_id, "subscribe": ["lamps/7/#", "lamps/8/#"],
                     # QoS 1: each waits for its PUBACK (plain when refused), so the refused
                     # ones were decided before the marker was sent.
                     "publish": [{"topic": "lamps/8/set", "message": "refused-by-webapp",
                                  "qos": 1},
                                 {"topic": "other/x", "message": "refused-locally", "qos": 1},
                                 {"topic": "lamps/7/set", "message": marker, "qos": 1}],
                     "stay_ms": 1000})
    assert {"event": "connect", "code": 0} in events, events
    assert [e["granted"] for e in events if e["event"] == "suback"] == [[1]], events
    assert [e["topic"] for e in events if e["event"] == "suback-refused"] == ["lamps/8/#"]
    assert [e["topic"] for e in events if e["event"] == "published"] == [
        "lamps/8/set", "other/x", "lamps/7/set"], events
    assert {"event": "message", "topic": "lamps/7/set", "payload": marker} in events, events
    spy.wait_for(f"lamps/7/set {marker}")
    reached = "\n".join(spy.lines)
    assert "refused-by-webapp" not in reached and "refused-locally" not in reached, reached
    assert not any(e.get("payload", "").startswith("refused") for e in events)
    # What the web app was asked: the session (blank password), then each topic but other/x.
    assert ("/auth", {"username": SESSION, "password": "", "clientid": client_id}) \
        in webapp.requests()
    acl = {(q["topic"], q["acc"]) for _, q in webapp.requests("/acl")
           if q["clientid"] == client_id}
    assert acl == {("lamps/7/#", "4"), ("lamps/8/#", "4"), ("lamps/8/set", "2"),
                   ("lamps/7/set", "2")}, acl


def test_a_browser_with_a_bad_session_token_gets_a_refusing_connack_frame_and_a_close(
        backend_proxy, webapp, broker):
    events = mqttjs({"url": f"ws://127.0.0.1:{backend_proxy.port}/mqtt",
                     "username": "tok-stolen", "clientId": "mallory-js"})
    errors = [e for e in events if e["event"] == "error"]
    assert errors and errors[0]["code"] == 4, events
    assert not any(e["event"] == "connect" for e in events)
    assert {"event": "close"} in events, events
    client = PahoWs(backend_proxy.port, "tok-stolen", client_id="mallory-paho")
    try:
        assert str(client.connack) == "Bad user name or password", client.connack
    finally:
        client.stop()
    assert [q["clientid"] for _, q in webapp.requests("/auth")
            if q["username"] == "tok-stolen"] == ["mallory-js", "mallory-paho"]
    assert "tok-stolen" not in broker.log_text()
