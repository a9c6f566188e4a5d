"""Opaque tokens as MQTT user names (the LAMPI web app's scheme), introspected by mqtt_acl.wasm
in a real Envoy 1.40 at the e2e OIDC provider (oidc-provider, RFC 7662 introspection), in front
of a real Mosquitto. What reached the broker is read by a subscriber connected to it directly."""

import os
import socket
import time
import uuid

import pytest

import e2e_support as e2e

OPAQUE = e2e.MQTT_OPAQUE_AUDIENCE

# The introspection client's secret, from Envoy's environment (client_secret_env).
SECRET_ENV = "E2E_MQTT_PEP_CLIENT_SECRET"

config = e2e.mqtt_opaque_config


@pytest.fixture(scope="module")
def mosquitto(work_dir):
    server = e2e.Mosquitto(work_dir, name="mosquitto-opaque")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mqtt_wasm(work_dir):
    return e2e.copy_module(work_dir, e2e.MQTT_WASM)


def env_secret_config(idp):
    """config(idp) with the introspection client's secret named by SECRET_ENV."""
    with_env = config(idp)
    credentials = with_env["introspection"]["credentials"]
    del credentials["client_secret"]
    credentials["client_secret_env"] = SECRET_ENV
    return with_env


def test_an_opaque_token_connects_and_only_allowed_topics_reach_the_broker(
        work_dir, idp, mosquitto, mqtt_wasm):
    """With the introspection client's secret in Envoy's environment (client_secret_env,
    passed to the VM by host_env_keys): oidc-provider authenticates the introspection with it,
    and the secret is nowhere in Envoy's config dump."""
    assert SECRET_ENV not in os.environ
    secret = e2e.IdP.PEP[1]
    # One worker: the verdict cache is per worker (VM), and the test counts introspections.
    envoy = e2e.MqttEnvoy(work_dir=work_dir, name="envoy-mqtt-opaque",
                          filter_config=env_secret_config(idp),
                          broker_port=mosquitto.port, wasm=mqtt_wasm, concurrency=1,
                          http_clusters=(("idp", idp.authority),),
                          environment={SECRET_ENV: secret}).start()
    token = idp.token(OPAQUE)
    assert token.count(".") != 2, "an opaque token, not a JWT"
    sub = e2e.MqttSubscriber(mosquitto.port, "-i", "watcher", "-t", "#")
    try:
        marker = "on-" + uuid.uuid4().hex[:6]
        for topic, payload in (("other/x", "refused"), ("lamps/7/set", marker)):
            done = e2e.mqtt_run("pub", envoy.port, "-u", token, "-i", "browser-1",
                                "-t", topic, "-m", payload)
            assert done.returncode == 0, done.stderr
        sub.wait_for(f"lamps/7/set {marker}")
        # A token the IdP never issued: bad user name or password, no broker connection.
        accepted = mosquitto.connections_accepted()
        done = e2e.mqtt_run("pub", envoy.port, "-u", "forged-" + uuid.uuid4().hex, "-i", "x",
                            "-t", "lamps/7/set", "-m", "forged")
        assert done.returncode != 0 and "bad user name or password" in done.stderr.lower(), \
            done.stderr
        assert mosquitto.connections_accepted() == accepted
    finally:
        lines = sub.stop()
        stats = envoy.stats()
        log = envoy.log_text()
        dump = envoy.admin("/config_dump").body.decode()
        envoy.stop()
    assert '"host_env_keys"' in dump and f'"{SECRET_ENV}"' in dump
    at = dump.find(secret)
    assert at < 0, dump[max(0, at - 600):at + 100]
    assert secret not in log
    assert "refused" not in lines and "forged" not in lines, lines
    assert token not in mosquitto.log_text()
    assert 'by="authenticated:opaquetoken"' in log, log[-2000:]
    # Two connections with the token, one introspection (cached); the forged one asked too.
    assert stats["introspection.asked"] == 2, stats


def test_introspection_endpoint_down_refuses_as_server_unavailable(
        work_dir, idp, mosquitto, mqtt_wasm):
    envoy = e2e.MqttEnvoy(work_dir=work_dir, name="envoy-mqtt-opaque-down",
                          filter_config=config(idp),
                          broker_port=mosquitto.port, wasm=mqtt_wasm,
                          http_clusters=(("idp", f"127.0.0.1:{e2e.free_port()}"),)).start()
    try:
        accepted = mosquitto.connections_accepted()
        done = e2e.mqtt_run("pub", envoy.port, "-u", idp.token(OPAQUE), "-i", "b",
                            "-t", "lamps/7/set", "-m", "x")
        assert done.returncode != 0
        assert "unavailable" in done.stderr.lower(), done.stderr
        assert mosquitto.connections_accepted() == accepted
        assert envoy.stats()["introspection.unavailable"] >= 1
    finally:
        envoy.stop()


def _mqtt_string(text):
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def _packet(first, body):
    return bytes([first]) + e2e.mqtt_varint(len(body)) + body


def test_a_connection_closes_when_its_opaque_token_expires(work_dir, idp, mosquitto, mqtt_wasm):
    short = "urn:orion:opaque-short"  # the IdP issues these valid for 3 s
    envoy = e2e.MqttEnvoy(work_dir=work_dir, name="envoy-mqtt-opaque-exp",
                          filter_config=config(idp, audience=short),
                          broker_port=mosquitto.port, wasm=mqtt_wasm, concurrency=1,
                          http_clusters=(("idp", idp.authority),)).start()
    sub = e2e.MqttSubscriber(mosquitto.port, "-i", "watcher-exp", "-t", "lamps/#")
    marker = uuid.uuid4().hex[:6]
    try:
        token = idp.token(short)
        issued = time.monotonic()
        connect = _packet(0x10, _mqtt_string("MQTT") + bytes([4, 0x82]) + (60).to_bytes(2, "big")
                          + _mqtt_string("browser-exp") + _mqtt_string(token))
        with socket.create_connection(("127.0.0.1", envoy.port), timeout=10) as conn:
            conn.sendall(connect)
            assert conn.recv(4) == b"\x20\x02\x00\x00", "CONNACK accepted"
            conn.sendall(_packet(0x30, _mqtt_string("lamps/7/set") + f"before-{marker}".encode()))
            sub.wait_for(f"lamps/7/set before-{marker}")
            # Past the token's exp (3 s after issue, whole seconds): whatever is sent now must
            # not reach the broker, whether the tick has closed the connection yet or not.
            time.sleep(max(0.0, issued + 4.2 - time.monotonic()))
            try:
                conn.sendall(_packet(0x30, _mqtt_string("lamps/7/set")
                                     + f"after-{marker}".encode()))
            except OSError:
                pass  # already closed
            conn.settimeout(10)
            try:
                rest = conn.recv(16)
            except ConnectionResetError:
                rest = b""
            assert rest == b"", f"Envoy closed the connection, no data: {rest!r}"
        closed_after = time.monotonic() - issued
        assert closed_after < 8, closed_after
        time.sleep(1)  # anything that did get through would have reached the subscriber by now
    finally:
        lines = sub.stop()
        stats = envoy.stats()
        envoy.stop()
    assert f"before-{marker}" in lines, lines
    assert f"after-{marker}" not in lines, lines
    assert stats.get("closed.expired") == 1, stats
