"""mqtt_acl.wasm in a real Envoy 1.40 (network filter before tcp_proxy) in front of a real
Mosquitto 2.0 (Debian), with the Mosquitto clients: CONNECT authentication with a JWT as user
name, PUBLISH and SUBSCRIBE ACLs, $SYS, token expiry.

Mosquitto runs with allow_anonymous and no ACL: every refusal seen here is the filter's. Tokens
are HS256 JWTs signed with the shared secret the filter's provider is configured with (the
same verification code token-auth uses)."""

import base64
import hashlib
import os
import re
import socket
import subprocess
import time
import uuid

import pytest

import e2e_support as e2e

ISSUER = "https://idp.e2e.example"
SECRET = os.urandom(32)
DEVICE_KEY = "k-" + uuid.uuid4().hex


def config():
    return {
        "jwt_providers": [{
            "issuer": ISSUER,
            "audiences": ["mqtt"],
            "algorithms": ["HS256"],
            "hmac_secret": base64.b64encode(SECRET).decode(),
            "claims": {"roles": ["roles"]},
        }],
        "device_keys": {"devices": {
            "lamp-02": {"key_sha256": [hashlib.sha256(DEVICE_KEY.encode()).hexdigest()]}}},
        "mtls": {"identity_from": "subject_cn", "roles": ["device"]},
        "acl": {"rules": [
            # Devices and users: read and write under devices/<own id>/.
            {"name": "own-topics", "effect": "allow", "subjects": ["authenticated"],
             "actions": ["*"], "mqtt": {"topic": "devices/%u/#"}},
            # Operators read every device (not $SYS: '#' does not match it).
            {"name": "ops-read", "effect": "allow", "subjects": ["role:ops"],
             "actions": ["read"], "mqtt": {"topic": "#"}},
        ]},
    }


def token(sub, ttl=600, roles=(), issuer=ISSUER, secret=SECRET):
    now = int(time.time())
    return e2e.hs256_jwt({"iss": issuer, "aud": "mqtt", "sub": sub, "iat": now - 5,
                          "exp": now + ttl, "roles": list(roles)}, secret)


@pytest.fixture(scope="module")
def mosquitto(work_dir):
    server = e2e.Mosquitto(work_dir)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mqtt_wasm(work_dir):
    return e2e.copy_module(work_dir, e2e.MQTT_WASM)


@pytest.fixture(scope="module")
def proxy(work_dir, mosquitto, mqtt_wasm):
    envoy = e2e.MqttEnvoy(work_dir=work_dir, name="envoy-mqtt", filter_config=config(),
                          broker_port=mosquitto.port, wasm=mqtt_wasm).start()
    yield envoy
    envoy.stop()


def ops_subscriber(proxy, *topics):
    args = ["-u", token("ops-1", roles=["ops"]), "-i", "ops-1-" + uuid.uuid4().hex[:6]]
    for t in topics:
        args += ["-t", t]
    return e2e.MqttSubscriber(proxy.port, *args)


def test_device_with_a_jwt_publishes_and_a_subscriber_receives(proxy, mosquitto):
    sub = ops_subscriber(proxy, "devices/#")
    jwt = token("lamp-01")
    try:
        done = e2e.mqtt_run("pub", proxy.port, "-u", jwt, "-i", "lamp-01",
                            "-t", "devices/lamp-01/state", "-m", "on-1", "-q", "1")
        assert done.returncode == 0, done.stderr
        sub.wait_for("devices/lamp-01/state on-1")
    finally:
        sub.stop()
    stats = proxy.stats()
    assert stats.get("connect.allowed", 0) >= 2 and stats.get("publish.allowed", 0) >= 1
    # The broker got the verified subject as user name, never the token.
    log = mosquitto.log_text()
    assert "u'lamp-01')" in log, log[-2000:]
    assert jwt.split(".")[2] not in log and jwt.split(".")[1] not in log


def test_a_client_cannot_take_over_another_device_s_client_id(proxy):
    for version, message in (("mqttv311", "identifier rejected"),
                             ("5", "client identifier not valid")):
        done = e2e.mqtt_run("pub", proxy.port, "-V", version, "-u", "lamp-02", "-P", DEVICE_KEY,
                            "-i", "lamp-01", "-t", "devices/lamp-02/state", "-m", "takeover")
        assert done.returncode != 0
        assert message in (done.stderr + done.stdout).lower(), done.stderr
    assert 'by="client id \\"lamp-01\\" is not one \\"lamp-02\\" may use' in proxy.log_text()


@pytest.mark.parametrize("version,message", [
    ("mqttv311", "Connection Refused: bad user name or password"),
    ("5", "Bad user name or password"),
])
def test_bad_token_gets_a_refusing_connack(proxy, version, message):
    forged = token("lamp-01", secret=os.urandom(32))
    before = proxy.stats().get("connect.refused", 0)
    done = e2e.mqtt_run("pub", proxy.port, "-V", version, "-u", forged, "-i", "lamp-01",
                        "-t", "devices/lamp-01/state", "-m", "forged")
    assert done.returncode != 0
    assert message.lower() in (done.stderr + done.stdout).lower(), done.stderr
    assert proxy.stats()["connect.refused"] == before + 1


def test_no_credentials_is_not_authorized(proxy, mosquitto):
    accepted = mosquitto.connections_accepted()
    done = e2e.mqtt_run("pub", proxy.port, "-i", "anon-" + uuid.uuid4().hex[:6],
                        "-t", "devices/x/state", "-m", "x")
    assert done.returncode != 0
    assert "not authori" in done.stderr.lower(), done.stderr
    # The refusal came from the stand-in inside Envoy: the broker saw no connection at all.
    assert mosquitto.connections_accepted() == accepted
    assert "mqtt-acl-refused-" not in mosquitto.log_text()


def test_a_flood_of_refused_connects_costs_the_broker_no_connection(proxy, mosquitto):
    accepted = mosquitto.connections_accepted()
    refused = proxy.stats().get("connect.refused", 0)
    for i in range(100):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as conn:
            conn.sendall(_connect_packet(f"flood-{i}", "lamp-02" if i % 2 else None))
            assert conn.recv(4) in (b"\x20\x02\x00\x05", b"\x20\x02\x00\x04")
    assert e2e.wait_until(lambda: proxy.stats().get("connect.refused", 0) == refused + 100,
                          "100 refusals counted", timeout=10)
    assert mosquitto.connections_accepted() == accepted
    # An allowed client still reaches the broker.
    done = e2e.mqtt_run("pub", proxy.port, "-u", "lamp-02", "-P", DEVICE_KEY, "-i", "lamp-02",
                        "-t", "devices/lamp-02/state", "-m", "after-flood")
    assert done.returncode == 0, done.stderr
    assert e2e.wait_until(lambda: mosquitto.connections_accepted() == accepted + 1,
                          "the allowed client's broker connection", timeout=5)


def test_device_key_connects(proxy, mosquitto):
    done = e2e.mqtt_run("pub", proxy.port, "-u", "lamp-02", "-P", DEVICE_KEY, "-i", "lamp-02",
                        "-t", "devices/lamp-02/state", "-m", "k")
    assert done.returncode == 0, done.stderr
    assert DEVICE_KEY not in mosquitto.log_text()
    wrong = e2e.mqtt_run("pub", proxy.port, "-u", "lamp-02", "-P", "wrong", "-i", "lamp-02",
                         "-t", "devices/lamp-02/state", "-m", "k")
    assert wrong.returncode != 0 and "bad user name or password" in wrong.stderr.lower()


def test_forbidden_publish_never_reaches_a_subscriber(proxy):
    marker = "marker-" + uuid.uuid4().hex[:6]
    sub = ops_subscriber(proxy, "devices/#")
    try:
        t = token("lamp-01")
        for qos in ("0", "1"):
            done = e2e.mqtt_run("pub", proxy.port, "-u", t, "-i", "lamp-01", "-q", qos,
                                "-t", "devices/lamp-02/cmd", "-m", "forbidden-" + qos)
            # QoS 0 is dropped silently; QoS 1 is answered with a PUBACK (as Mosquitto
            # answers a denied publish): the client sees success either way.
            assert done.returncode == 0, done.stderr
        done = e2e.mqtt_run("pub", proxy.port, "-u", t, "-i", "lamp-01",
                            "-t", "devices/lamp-01/state", "-m", marker)
        assert done.returncode == 0, done.stderr
        sub.wait_for(marker)
    finally:
        lines = sub.stop()
    assert "forbidden" not in lines, lines
    assert proxy.stats()["publish.denied"] >= 2
    assert 'decision=deny status=403 reason=forbidden subject="lamp-01" method="PUBLISH" ' \
           'path=- tenant=- request_id=- rule="default-deny" operation="mqtt PUBLISH devices/lamp-02/cmd"' \
        in proxy.log_text()
    # Per rule on /stats/prometheus, labelled as on the HTTP sidecar.
    text = proxy.admin("/stats/prometheus").body.decode()
    for rule, decision in (("default-deny", "deny"), ("own-topics", "allow")):
        assert re.search(r'^iot_rule_decisions\{filter="mqtt_acl",rule="%s",decision="%s"\} '
                         r'[1-9]' % (rule, decision), text, re.M), text


def test_forbidden_publish_v5_gets_puback_not_authorized(proxy):
    done = e2e.mqtt_run("pub", proxy.port, "-V", "5", "-u", token("lamp-01"), "-i", "lamp-01",
                        "-q", "1", "-t", "devices/lamp-02/cmd", "-m", "x", "-d")
    out = done.stdout + done.stderr
    assert "received PUBACK" in out, out
    assert "not authorized" in out.lower(), out


def test_forbidden_subscribe_fails_in_the_suback(proxy):
    done = e2e.mqtt_run("sub", proxy.port, "-u", token("lamp-01"), "-i", "lamp-01-sub",
                        "-t", "devices/lamp-02/#", "-d", "-C", "1", "-W", "5")
    out = done.stdout + done.stderr
    assert "Subscribed (mid: 1): 128" in out, out
    assert "All subscription requests were denied" in out, out


def test_partly_forbidden_subscribe_keeps_the_allowed_filter(proxy):
    sub = e2e.MqttSubscriber(proxy.port, "-u", token("lamp-01"), "-i", "lamp-01-mixed",
                             "-t", "devices/lamp-01/cmd", "-t", "devices/lamp-02/cmd")
    try:
        assert any("Subscribed (mid: 1): 0, 128" in l for l in sub.lines), sub.lines
        done = e2e.mqtt_run("pub", proxy.port, "-u", token("lamp-01"), "-i", "lamp-01-pub",
                            "-t", "devices/lamp-01/cmd", "-m", "dim")
        assert done.returncode == 0
        sub.wait_for("devices/lamp-01/cmd dim")
    finally:
        sub.stop()


def test_sys_topics_are_not_granted_by_hash(proxy):
    done = e2e.mqtt_run("sub", proxy.port, "-u", token("ops-2", roles=["ops"]), "-i", "ops-2-sys",
                        "-t", "#", "-t", "$SYS/#", "-d", "-C", "1", "-W", "3")
    out = done.stdout + done.stderr
    assert "Subscribed (mid: 1): 0, 128" in out, out


def _connect_packet(client_id, username=None):
    def s(x):
        x = x.encode()
        return len(x).to_bytes(2, "big") + x
    flags = 0x82 if username is not None else 0x02
    body = s("MQTT") + bytes([4, flags]) + (60).to_bytes(2, "big") + s(client_id)
    if username is not None:
        body += s(username)
    return bytes([0x10]) + e2e.mqtt_varint(len(body)) + body


def test_connection_closes_when_the_token_expires(proxy):
    before = proxy.stats().get("closed.expired", 0)
    t = token("lamp-01", ttl=3)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as conn:
        conn.sendall(_connect_packet("lamp-01-exp", t))
        assert conn.recv(4) == b"\x20\x02\x00\x00", "CONNACK accepted"
        started = time.monotonic()
        conn.settimeout(15)
        assert conn.recv(1) == b"", "Envoy closed the connection"
        waited = time.monotonic() - started
    assert waited < 8, waited
    assert e2e.wait_until(lambda: proxy.stats().get("closed.expired", 0) == before + 1,
                          "closed.expired", timeout=5)


MAKE_CERTS = os.path.join(e2e.ROOT, "envoy", "make-certs.sh")


@pytest.fixture(scope="module")
def mqtt_certs(work_dir):
    out = os.path.join(work_dir, "mqtt-certs")
    subprocess.run([MAKE_CERTS, out, "lamp-01"], check=True, capture_output=True, timeout=60)
    return out


@pytest.fixture(scope="module")
def mtls_proxy(work_dir, mosquitto, mqtt_wasm, mqtt_certs):
    tls = {"cert": os.path.join(mqtt_certs, "server.crt"),
           "key": os.path.join(mqtt_certs, "server.key"),
           "client_ca": os.path.join(mqtt_certs, "ca.crt")}
    envoy = e2e.MqttEnvoy(work_dir=work_dir, name="envoy-mqtt-mtls", filter_config=config(),
                          broker_port=mosquitto.port, wasm=mqtt_wasm, tls=tls).start()
    yield envoy
    envoy.stop()


def test_device_identified_by_its_client_certificate(proxy, mtls_proxy, mqtt_certs):
    tls = ["--cafile", os.path.join(mqtt_certs, "ca.crt"),
           "--cert", os.path.join(mqtt_certs, "lamp-01.crt"),
           "--key", os.path.join(mqtt_certs, "lamp-01.key")]
    marker = "cert-" + uuid.uuid4().hex[:6]
    sub = ops_subscriber(proxy, "devices/#")
    try:
        # Another device's topic: dropped; its own (CN=lamp-01, no user name): delivered.
        for topic, payload in (("devices/lamp-02/state", "cert-forbidden"),
                               ("devices/lamp-01/state", marker)):
            done = e2e.mqtt_run("pub", mtls_proxy.port, *tls, "-i", "lamp-01-cert",
                                "-t", topic, "-m", payload)
            assert done.returncode == 0, done.stderr
        sub.wait_for(marker)
    finally:
        lines = sub.stop()
    assert "cert-forbidden" not in lines, lines
    assert 'subject="lamp-01" method="CONNECT" path=- tenant=- request_id=- rule=- ' \
           'operation="mqtt CONNECT" entities=[] client_id=' in mtls_proxy.log_text()
    assert 'by="authenticated:clientcertificate"' in mtls_proxy.log_text()
    # Without a client certificate the TLS handshake itself fails.
    done = e2e.mqtt_run("pub", mtls_proxy.port, "--cafile", os.path.join(mqtt_certs, "ca.crt"),
                        "-t", "devices/lamp-01/state", "-m", "x")
    assert done.returncode != 0


def test_refused_connection_is_closed_by_envoy_after_the_connack(proxy):
    """A client that stays after its refusing CONNACK is disconnected by the filter (the next
    tick), with the CONNACK delivered first."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as conn:
        conn.sendall(_connect_packet("anon-raw"))
        assert conn.recv(4) == b"\x20\x02\x00\x05", "CONNACK not authorized"
        started = time.monotonic()
        conn.settimeout(10)
        assert conn.recv(1) == b"", "Envoy closed the connection"
        assert time.monotonic() - started < 3


# A Mosquitto acl_file as the policy: each device writes its own state, and nothing else is
# granted, so the rest falls to default-deny.
ACL_FILE = """\
# devices write their own state
pattern write devices/%u/state
"""


@pytest.fixture(scope="module")
def acl_file_proxy(work_dir, mosquitto, mqtt_wasm):
    filter_config = {**config(), "acl_file": ACL_FILE}
    del filter_config["acl"]
    envoy = e2e.MqttEnvoy(work_dir=work_dir, name="envoy-mqtt-acl-file",
                          filter_config=filter_config, broker_port=mosquitto.port,
                          wasm=mqtt_wasm).start()
    yield envoy
    envoy.stop()


def connection_log(proxy, subject):
    """The JSON access-log line of the connection whose client was `subject` (written when
    the connection closes)."""
    return e2e.access_log_entry(proxy, lambda entry: entry.get("subject") == subject,
                                f"{subject}'s connection")


def test_access_log_shows_each_connection_s_client_and_its_acl_file_denials(acl_file_proxy):
    proxy = acl_file_proxy
    allowed, denied = ("lamp-" + uuid.uuid4().hex[:8] for _ in range(2))
    done = e2e.mqtt_run("pub", proxy.port, "-u", token(allowed), "-i", allowed,
                        "-t", f"devices/{allowed}/state", "-m", "on")
    assert done.returncode == 0, done.stderr
    done = e2e.mqtt_run("pub", proxy.port, "-u", token(denied), "-i", denied, "-q", "1",
                        "-t", f"devices/{allowed}/state", "-m", "spoofed")
    assert done.returncode == 0, done.stderr  # QoS 1: a PUBACK, as Mosquitto answers a denial
    refused = e2e.mqtt_run("pub", proxy.port, "-u", token("x", secret=os.urandom(32)),
                           "-t", "devices/x/state", "-m", "x")
    assert refused.returncode != 0

    entry = connection_log(proxy, allowed)
    assert (entry["filter"], entry["decision"], entry["rule"], entry["denials"]) == \
        ("mqtt-acl", "allow", "acl_file:2", None), entry
    assert entry["upstream_cluster"] == "mosquitto", entry

    entry = connection_log(proxy, denied)
    assert (entry["decision"], entry["reason"], entry["rule"], entry["denials"]) == \
        ("deny", "forbidden", "default-deny", "1"), entry
    assert entry["upstream_cluster"] == "mosquitto", entry

    # The forged token's CONNECT went to the refusal stand-in, never to the broker.
    entry = e2e.access_log_entry(
        proxy, lambda e: e.get("upstream_cluster") == "mqtt_acl_refusal", "the refused CONNECT")
    assert (entry["filter"], entry["decision"], entry["subject"], entry["denials"]) == \
        ("mqtt-acl", "deny", "-", "1"), entry
