"""A device's own Mosquitto bridging to the cloud Mosquitto THROUGH the mqtt sidecar (real
Envoy 1.40 with mqtt_acl.wasm, TLS with a required client certificate): the LAMPI deployment,
where each lamp's broker bridges to the cloud with the lamp's certificate (CN = device id).

Both brokers are real Mosquitto 2.0 (Debian). The bridge keeps Mosquitto's defaults:
`try_private true` (its CONNECT says protocol level 0x84, "I am a bridge") and `notifications
true` (a retained will and state messages on $SYS/broker/connection/<client id>/state). The cloud
Mosquitto runs with allow_anonymous and no ACL: every refusal seen here is the filter's.

What reached the cloud broker is read by a subscriber connected to it directly; what reached the
device by a subscriber on the device's broker. Each absence is checked after an allowed marker
sent later on the same path (Mosquitto keeps a connection's order), not by waiting."""

import os
import re
import subprocess
import uuid

import pytest

import e2e_support as e2e

DEVICE = "lamp-01"
MAKE_CERTS = os.path.join(e2e.ROOT, "envoy", "make-certs.sh")

OWN_TOPICS = {"name": "own-topics", "effect": "allow", "subjects": ["authenticated"],
              "actions": ["*"], "mqtt": {"topic": "devices/%u/#"}}
# The bridge's will and notifications (notifications true, Mosquitto's default).
BRIDGE_STATE = {"name": "bridge-state", "effect": "allow", "subjects": ["role:device"],
                "actions": ["write"], "mqtt": {"topic": "$SYS/broker/connection/%c/state"}}


def policy(*rules):
    return {"mtls": {"identity_from": "subject_cn", "roles": ["device"]},
            "acl": {"rules": [OWN_TOPICS, BRIDGE_STATE, *rules]}}


# The topics of the lamp's bridge: local name -> cloud name, by the prefixes below.
BRIDGE_TOPICS = f"""\
topic lamp/changed out 1 "" devices/{DEVICE}/
topic spoof/# out 1 "" devices/lamp-02/
topic lamp/set in 1 "" devices/{DEVICE}/
topic lamp/ok in 0 "" devices/{DEVICE}/
topic other/set in 1 "" devices/lamp-02/
"""


def bridge_conf(certs, envoy_port, cleansession="true"):
    """The `connection` section of the device broker: the LAMPI bridge, pointed at the sidecar."""
    return f"""
connection cloud
address 127.0.0.1:{envoy_port}
remote_clientid {DEVICE}
cleansession {cleansession}
restart_timeout 1 2
bridge_cafile {certs}/ca.crt
bridge_certfile {certs}/{DEVICE}.crt
bridge_keyfile {certs}/{DEVICE}.key
{BRIDGE_TOPICS}"""


class DeviceBroker(e2e.Mosquitto):
    """The lamp's own Mosquitto with its bridge to the cloud."""

    def __init__(self, work_dir, certs, envoy_port, name="mosquitto-lamp", cleansession="true"):
        super().__init__(work_dir, name=name,
                         extra_conf=bridge_conf(certs, envoy_port, cleansession))

    def wait_bridged(self, subacks=3):
        """Until the cloud accepted the bridge (CONNACK) and answered its `subacks` SUBSCRIBEs
        (one per `in` topic; a refused one is answered too)."""
        e2e.wait_until(lambda: "Received CONNACK on connection local." in self.log_text()
                       and self.log_text().count("Received SUBACK") >= subacks,
                       "the bridge connected and subscribed", timeout=20)


@pytest.fixture(scope="module")
def certs(work_dir):
    out = os.path.join(work_dir, "bridge-certs")
    subprocess.run([MAKE_CERTS, out, DEVICE], check=True, capture_output=True, timeout=60)
    # Mosquitto started as root drops to its own user before it loads a bridge's key: let it
    # read this test key (a device keeps its key owned by the mosquitto user).
    os.chmod(os.path.join(out, f"{DEVICE}.key"), 0o644)
    return out


@pytest.fixture(scope="module")
def cloud(work_dir):
    server = e2e.Mosquitto(work_dir, name="mosquitto-cloud")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mqtt_wasm(work_dir):
    return e2e.copy_module(work_dir, e2e.MQTT_WASM)


def start_sidecar(work_dir, name, filter_config, cloud, mqtt_wasm, certs):
    tls = {"cert": os.path.join(certs, "server.crt"), "key": os.path.join(certs, "server.key"),
           "client_ca": os.path.join(certs, "ca.crt")}
    return e2e.MqttEnvoy(work_dir=work_dir, name=name, filter_config=filter_config,
                         broker_port=cloud.port, wasm=mqtt_wasm, tls=tls).start()


@pytest.fixture(scope="module")
def sidecar(work_dir, cloud, mqtt_wasm, certs):
    envoy = start_sidecar(work_dir, "envoy-mqtt-bridge", policy(), cloud, mqtt_wasm, certs)
    yield envoy
    envoy.stop()


def publish(port, topic, payload, qos=1):
    done = e2e.mqtt_run("pub", port, "-i", "pub-" + uuid.uuid4().hex[:6], "-q", str(qos),
                        "-t", topic, "-m", payload)
    assert done.returncode == 0, done.stderr


def test_bridge_through_the_sidecar_with_its_certificate_both_ways(
        work_dir, certs, cloud, sidecar):
    cloud_sub = e2e.MqttSubscriber(cloud.port, "-i", "cloud-sub", "-t", "devices/#",
                                   "-t", "$SYS/broker/connection/#")
    lamp = DeviceBroker(work_dir, certs, sidecar.port)
    try:
        lamp.wait_bridged()
        log = sidecar.log_text()
        # The bridge's CONNECT (level 0x84) was accepted as the certificate's device, and went on
        # to the cloud as a bridge ("New bridge connected") with user name lamp-01.
        assert f'subject="{DEVICE}" method="CONNECT"' in log, log[-3000:]
        assert 'by="authenticated:clientcertificate bridge"' in log, log[-3000:]
        assert f"New bridge connected from 127.0.0.1:" in cloud.log_text()
        assert f"as {DEVICE} (p2, c1, k60, u'{DEVICE}')" in cloud.log_text(), \
            cloud.log_text()[-3000:]
        # Its state notification (and will topic) reached the cloud.
        cloud_sub.wait_for(f"$SYS/broker/connection/{DEVICE}/state 1")

        # Out: the lamp's own tree reaches the cloud; another device's tree does not.
        marker = "out-" + uuid.uuid4().hex[:6]
        lamp_sub = e2e.MqttSubscriber(lamp.port, "-i", "lamp-sub", "-t", "lamp/#",
                                      "-t", "other/#")
        publish(lamp.port, "spoof/changed", "spoofed")
        publish(lamp.port, "lamp/changed", marker)
        cloud_sub.wait_for(f"devices/{DEVICE}/lamp/changed {marker}")

        # In: the cloud publishes to both topics the bridge subscribed to; only the lamp's own
        # reaches the lamp (the other SUBSCRIBE was refused: SUBACK 0x80).
        marker = "in-" + uuid.uuid4().hex[:6]
        publish(cloud.port, "devices/lamp-02/other/set", "not-for-lamp-01")
        publish(cloud.port, f"devices/{DEVICE}/lamp/set", marker)
        lamp_sub.wait_for(f"lamp/set {marker}")
    finally:
        cloud_lines = cloud_sub.stop()
        lamp_lines = lamp_sub.stop() if "lamp_sub" in locals() else ""
        lamp.stop()
    assert "spoofed" not in cloud_lines, cloud_lines
    assert "not-for-lamp-01" not in lamp_lines, lamp_lines
    log = sidecar.log_text()
    assert re.search(r'decision=deny .*operation="mqtt PUBLISH devices/lamp-02/spoof/changed"',
                     log), log[-3000:]
    assert re.search(r'decision=deny .*operation="mqtt SUBSCRIBE devices/lamp-02/other/set"',
                     log), log[-3000:]
    # The cloud broker never had the refused subscription nor the spoofed message.
    cloud_log = cloud.log_text()
    assert f"{DEVICE} 1 devices/{DEVICE}/lamp/set" in cloud_log, cloud_log[-3000:]
    assert f"{DEVICE} 1 devices/lamp-02/other/set" not in cloud_log
    assert "devices/lamp-02/spoof/changed" not in cloud_log
    stats = sidecar.stats()
    assert stats["publish.denied"] >= 1 and stats["subscribe.denied"] >= 1, stats


def test_deliveries_on_a_subscription_the_cloud_kept_are_checked(
        work_dir, certs, cloud, sidecar, mqtt_wasm):
    """The bridge's session is persistent (cleansession false): the cloud keeps its
    subscriptions across connections. After the policy stops letting lamp-01 read lamp/set, the
    bridge reconnects (to a sidecar with the new policy): its SUBSCRIBE is refused, but the cloud
    still has the old subscription and delivers on it -- the filter checks each delivery and drops
    it."""
    no_set = {"name": "no-set", "effect": "deny", "subjects": ["anyone"], "actions": ["read"],
              "mqtt": {"topic": "devices/+/lamp/set"}}
    lamp = DeviceBroker(work_dir, certs, sidecar.port, name="mosquitto-lamp-a",
                        cleansession="false")
    try:
        lamp.wait_bridged()
        sub = e2e.MqttSubscriber(lamp.port, "-i", "lamp-sub-a", "-t", "lamp/#")
        try:
            marker = "a-" + uuid.uuid4().hex[:6]
            publish(cloud.port, f"devices/{DEVICE}/lamp/set", marker, qos=0)
            sub.wait_for(f"lamp/set {marker}")
        finally:
            sub.stop()
    finally:
        lamp.stop()

    stricter = start_sidecar(work_dir, "envoy-mqtt-bridge-b", policy(no_set), cloud, mqtt_wasm,
                             certs)
    lamp = DeviceBroker(work_dir, certs, stricter.port, name="mosquitto-lamp-b",
                        cleansession="false")
    try:
        lamp.wait_bridged()
        sub = e2e.MqttSubscriber(lamp.port, "-i", "lamp-sub-b", "-t", "lamp/#")
        try:
            secret, marker = "b-" + uuid.uuid4().hex[:6], "ok-" + uuid.uuid4().hex[:6]
            publish(cloud.port, f"devices/{DEVICE}/lamp/set", secret, qos=0)
            publish(cloud.port, f"devices/{DEVICE}/lamp/ok", marker, qos=0)
            sub.wait_for(f"lamp/ok {marker}")
        finally:
            lines = sub.stop()
        assert secret not in lines, lines
        # The cloud did send it to the bridge on the subscription it kept (QoS 0: before the
        # policy change, and now)...
        sent = "Sending PUBLISH to lamp-01 (d0, q0, r0, m0, 'devices/lamp-01/lamp/set'"
        assert cloud.log_text().count(sent) == 2, cloud.log_text()[-3000:]
        # ...the filter refused the new SUBSCRIBE and dropped the delivery.
        log = stricter.log_text()
        assert re.search(r'decision=deny .*operation="mqtt SUBSCRIBE devices/lamp-01/lamp/set"',
                         log), log[-3000:]
        assert 'method="DELIVER" path=- tenant=- request_id=- rule="no-set" ' \
               'operation="mqtt deliver PUBLISH devices/lamp-01/lamp/set"' in log, log[-3000:]
        assert stricter.stats()["deliver.denied"] >= 1
    finally:
        lamp.stop()
        stricter.stop()
