"""Opaque tokens as MQTT user names (the LAMPI web app's scheme), introspected by mqtt_acl.wasm
in a real Envoy 1.40 at the e2e OIDC provider (oidc-provider, RFC 7662 introspection), in front
of a real Mosquitto. What reached the broker is read by a subscriber connected to it directly."""

import uuid

import pytest

import e2e_support as e2e

OPAQUE = "urn:orion:opaque"  # the IdP issues opaque access tokens for this resource


def config(idp):
    return {
        "client_ids": ["*"],
        "acl": {"rules": [{"name": "lamps", "effect": "allow", "subjects": ["authenticated"],
                           "actions": ["*"], "mqtt": {"topic": "lamps/#"}}]},
        "introspection": {"kind": "rfc7662", "cluster": "idp", "authority": idp.authority,
                          "path": "/token/introspection",
                          "credentials": {"client_id": e2e.IdP.PEP[0],
                                          "client_secret": e2e.IdP.PEP[1]},
                          "audience": OPAQUE},
    }


@pytest.fixture(scope="module")
def mosquitto(work_dir):
    server = e2e.Mosquitto(work_dir, name="mosquitto-opaque")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mqtt_wasm(work_dir):
    return e2e.copy_module(work_dir, e2e.MQTT_WASM)


def test_an_opaque_token_connects_and_only_allowed_topics_reach_the_broker(
        work_dir, idp, mosquitto, mqtt_wasm):
    # One worker: the verdict cache is per worker (VM), and the test counts introspections.
    envoy = e2e.MqttEnvoy(work_dir=work_dir, name="envoy-mqtt-opaque", filter_config=config(idp),
                          broker_port=mosquitto.port, wasm=mqtt_wasm, concurrency=1,
                          http_clusters=(("idp", idp.authority),)).start()
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
        envoy.stop()
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
