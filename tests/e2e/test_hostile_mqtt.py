"""Hostile MQTT traffic through a real Envoy 1.40 (two workers, connections balanced exactly
over them) with mqtt_acl.wasm in front of a real Mosquitto: malformed frames, 60 KB topics,
floods of refused CONNECTs; then legitimate clients on every worker still work.

Bounded: a few hundred short raw-socket connections, well under a minute."""

import hashlib
import socket
import time
import uuid

import pytest

import e2e_support as e2e

DEVICE_KEY = "k-" + uuid.uuid4().hex
HUGE = 60_000


def config():
    return {
        # Short, so the test sees a silent client closed.
        "connect_timeout_secs": 1,
        "device_keys": {"devices": {
            d: {"key_sha256": [hashlib.sha256(DEVICE_KEY.encode()).hexdigest()]}
            for d in ("lamp-01", "lamp-02")}},
        "acl": {"rules": [
            {"name": "own-topics", "effect": "allow", "subjects": ["authenticated"],
             "actions": ["*"], "mqtt": {"topic": "devices/%u/#"}},
            {"name": "read-all", "effect": "allow", "subjects": ["authenticated"],
             "actions": ["read"], "mqtt": {"topic": "devices/#"}},
        ]},
    }


@pytest.fixture(scope="module")
def mosquitto(work_dir):
    server = e2e.Mosquitto(work_dir, name="mosquitto-hostile")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy(work_dir, mosquitto):
    wasm = e2e.copy_module(work_dir, e2e.MQTT_WASM)
    envoy = e2e.MqttEnvoy(work_dir=work_dir, name="envoy-mqtt-hostile", filter_config=config(),
                          broker_port=mosquitto.port, wasm=wasm, concurrency=2,
                          exact_balance=True).start()
    envoy.rss_at_start = rss_kib(envoy.pid)
    yield envoy
    envoy.stop()


def s(text):
    raw = text if isinstance(text, bytes) else text.encode()
    return len(raw).to_bytes(2, "big") + raw


def packet(first_byte, body):
    return bytes([first_byte]) + e2e.mqtt_varint(len(body)) + body


def connect(client_id, username=None, password=None, level=4, properties=b""):
    flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    body = s("MQTT") + bytes([level, flags]) + (60).to_bytes(2, "big")
    if level == 5:
        body += e2e.mqtt_varint(len(properties)) + properties
    body += s(client_id)
    if username is not None:
        body += s(username)
    if password is not None:
        body += s(password)
    return packet(0x10, body)


def device_connect(device="lamp-01"):
    return connect(f"{device}-{uuid.uuid4().hex[:6]}", device, DEVICE_KEY)


def publish(topic, payload=b"x"):
    return packet(0x30, s(topic) + payload)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def closed_by_envoy(conn, timeout=5):
    """True once Envoy closed the connection (EOF or reset), reading and discarding answers."""
    conn.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if conn.recv(65536) == b"":
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False
    return False


def open_device(proxy, device="lamp-01"):
    conn = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    conn.sendall(device_connect(device))
    assert conn.recv(4) == b"\x20\x02\x00\x00", "CONNACK accepted"
    return conn


# Frames that must close the connection, each sent on a fresh one. `after_connect`: sent once
# a device's CONNECT was accepted.
BEFORE_CONNECT = {
    "remaining length of five bytes": b"\x10\xff\xff\xff\xff\x01",
    "oversize remaining length (256 MiB)": b"\x10\xff\xff\xff\x7f",
    "PUBLISH before CONNECT": publish("devices/lamp-01/state"),
    "SUBSCRIBE before CONNECT": packet(0x82, b"\x00\x01" + s("#") + b"\x00"),
    "reserved packet type 0": b"\x00\x00",
    "CONNECT with a bad protocol name": packet(0x10, s("MQTX") + b"\x04\x02\x00\x3c" + s("c")),
    "v5 CONNECT with an unknown property": connect("c5", level=5, properties=b"\xff\x00"),
    "v5 CONNECT with a truncated property": connect("c5", level=5, properties=b"\x11\x00"),
    "CONNECT with a client id that is not UTF-8": packet(
        0x10, s("MQTT") + b"\x04\x02\x00\x3c" + s(b"\xff\xfe")),
}
AFTER_CONNECT = {
    "PUBLISH topic that is not UTF-8": publish(b"devices/lamp-01/\xff\xfe"),
    "PUBLISH topic with a wildcard": publish("devices/lamp-01/#"),
    "second CONNECT": device_connect(),
    "SUBSCRIBE without filters": packet(0x82, b"\x00\x01"),
    "PUBLISH QoS 3": packet(0x36, s("devices/lamp-01/state") + b"\x00\x01x"),
    "packet over max_packet_bytes": publish("devices/lamp-01/state", b"p" * 300_000),
}


def test_malformed_frames_close_and_never_reach_the_broker(proxy, mosquitto):
    accepted = mosquitto.connections_accepted()
    malformed = proxy.stats().get("closed.malformed", 0)
    for name, frame in BEFORE_CONNECT.items():
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as conn:
            try:
                conn.sendall(frame)
            except (ConnectionResetError, BrokenPipeError):
                pass
            assert closed_by_envoy(conn), name
    # Nothing before a complete, valid CONNECT opens a broker connection.
    assert mosquitto.connections_accepted() == accepted
    # A truncated CONNECT, then the client's half-close: no broker connection either.
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as conn:
        conn.sendall(device_connect()[:12])
        conn.shutdown(socket.SHUT_WR)
        assert closed_by_envoy(conn), "truncated CONNECT"
    assert mosquitto.connections_accepted() == accepted
    for name, frame in AFTER_CONNECT.items():
        with open_device(proxy) as conn:
            try:
                conn.sendall(frame)
            except (ConnectionResetError, BrokenPipeError):
                pass
            assert closed_by_envoy(conn), name
    assert e2e.wait_until(
        lambda: proxy.stats().get("closed.malformed", 0) >= malformed + len(AFTER_CONNECT),
        "closed.malformed counted", timeout=5)


def test_huge_denied_topics_keep_the_log_small(proxy):
    log_before = len(proxy.log_text())
    denied = proxy.stats().get("publish.denied", 0)
    with open_device(proxy) as conn:
        topic = "devices/lamp-02/" + "t" * HUGE
        for _ in range(200):
            conn.sendall(publish(topic))
        # Still open: a PINGREQ is answered.
        conn.sendall(b"\xc0\x00")
        assert conn.recv(2) == b"\xd0\x00"
    assert e2e.wait_until(lambda: proxy.stats().get("publish.denied", 0) == denied + 200,
                          "200 denials counted", timeout=10)
    grown = len(proxy.log_text()) - log_before
    print(f"log growth for 200 denied {HUGE}-byte topics: {grown} bytes")
    # Unbounded, each denial logged its topic at least twice (~24 MB); bounded, well under 1 KB
    # of topic per line.
    assert grown < 200 * 4096, grown


def test_connect_floods(proxy, mosquitto):
    accepted = mosquitto.connections_accepted()
    refused = proxy.stats().get("connect.refused", 0)
    # 100 connections open at once, each with refused credentials.
    conns = [socket.create_connection(("127.0.0.1", proxy.port), timeout=10) for _ in range(100)]
    try:
        for i, conn in enumerate(conns):
            conn.sendall(connect(f"flood-{i}", "lamp-01", "wrong-key"))
        for conn in conns:
            assert conn.recv(4) == b"\x20\x02\x00\x04", "bad user name or password"
        # 100 more that send nothing at all: Envoy closes them (connect_timeout_secs).
        silent = [socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
                  for _ in range(100)]
        try:
            for conn in silent:
                assert closed_by_envoy(conn, timeout=10), "silent connection left open"
        finally:
            for conn in silent:
                conn.close()
    finally:
        for conn in conns:
            conn.close()
    assert e2e.wait_until(lambda: proxy.stats().get("connect.refused", 0) == refused + 100,
                          "100 refusals counted", timeout=10)
    assert mosquitto.connections_accepted() == accepted


def test_legitimate_clients_work_on_every_worker_afterwards(proxy, mosquitto):
    rss_before = rss_kib(proxy.pid)
    subscribers = []
    try:
        # Several connections: exact balancing spreads them over both workers.
        for i in range(4):
            subscribers.append(e2e.MqttSubscriber(
                proxy.port, "-u", "lamp-02", "-P", DEVICE_KEY, "-i", f"lamp-02-sub-{i}",
                "-t", "devices/lamp-01/#"))
        markers = []
        for i in range(4):
            marker = f"legit-{i}-{uuid.uuid4().hex[:6]}"
            markers.append(marker)
            done = e2e.mqtt_run("pub", proxy.port, "-u", "lamp-01", "-P", DEVICE_KEY,
                                "-i", f"lamp-01-pub-{i}", "-t", "devices/lamp-01/state",
                                "-m", marker, "-q", "1")
            assert done.returncode == 0, done.stderr
        for sub in subscribers:
            for marker in markers:
                sub.wait_for(f"devices/lamp-01/state {marker}")
    finally:
        for sub in subscribers:
            sub.stop()
    workers = proxy.stats("listener.")
    per_worker = {k: v for k, v in workers.items()
                  if k.startswith("mqtt.worker_") and k.endswith("downstream_cx_total")}
    print("connections per worker:", per_worker)
    assert len(per_worker) == 2 and all(v > 0 for v in per_worker.values()), per_worker
    rss_after = rss_kib(proxy.pid)
    print(f"Envoy RSS: {proxy.rss_at_start} KiB at start, {rss_before} KiB after the barrage, "
          f"floods and huge topics, {rss_after} KiB after the legitimate clients")
    assert rss_after < 512 * 1024, rss_after
    # Hundreds of connections ended (closed by the filter, by clients, mid-flight): none of
    # them is the filter's own failure.
    assert proxy.stats().get("closed.internal", 0) == 0
