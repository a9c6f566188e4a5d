"""mqtt-acl with an HTTP auth/ACL backend (mosquitto-go-auth's protocol) in a real Envoy 1.40
in front of a real Mosquitto, with the Mosquitto clients: the LAMPI deployment, where a web app
answers /auth and /acl and the MQTT user name is the web session's token.

The web app is a stand-in (webapp_auth_standin.py) that records what it was asked. Mosquitto
runs with allow_anonymous and no ACL: every refusal seen here is the filter's."""

import time
import uuid

import pytest

import e2e_support as e2e
import test_mqtt_concurrent as concurrent
from webapp_auth_standin import WebappAuth

TOKEN = "tok-" + uuid.uuid4().hex  # alice's web session
ALLOW_TTL_S = 300
DENY_TTL_S = 5  # short, to see a denial asked again while an allow is still cached


def config():
    return {
        "client_ids": ["*"],
        # The local rules bound what the backend may grant: only lamps/.
        "acl": {"rules": [{"name": "lamps", "effect": "allow", "subjects": ["authenticated"],
                           "actions": ["*"], "mqtt": {"topic": "lamps/#"}}]},
        "http_backend": {"cluster": "webapp", "authority": "webapp.internal",
                         "timeout_ms": 1000, "params_mode": "form",
                         "user": {"path": "/auth"}, "acl": {"path": "/acl"},
                         "cache": {"max_entries": 1000, "allow_ttl_secs": ALLOW_TTL_S,
                                   "deny_ttl_secs": DENY_TTL_S}},
    }


@pytest.fixture(scope="module")
def webapp():
    app = WebappAuth(sessions={TOKEN: "alice"}, devices=(), grants={"alice": ["lamps/7/"]})
    app.start()
    yield app
    app.stop()


@pytest.fixture(scope="module")
def mosquitto(work_dir):
    server = e2e.Mosquitto(work_dir, name="mosquitto-backend")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mqtt_wasm(work_dir):
    return e2e.copy_module(work_dir, e2e.MQTT_WASM)


@pytest.fixture(scope="module")
def proxy(work_dir, mosquitto, mqtt_wasm, webapp):
    # One worker: the answer cache is per worker (VM), and the cache test counts asks.
    envoy = e2e.MqttEnvoy(work_dir=work_dir, name="envoy-mqtt-backend", filter_config=config(),
                          broker_port=mosquitto.port, wasm=mqtt_wasm, concurrency=1,
                          http_clusters=(("webapp", f"127.0.0.1:{webapp.port}"),)).start()
    yield envoy
    envoy.stop()


def acl_asks(webapp, client_id):
    return [q for _, q in webapp.requests("/acl") if q.get("clientid") == client_id]


def publish_qos1(proxy, client_id, topic, payload):
    # QoS 1: the client waits for the PUBACK (a plain one for a refused PUBLISH in 3.1.1), so
    # the /acl answer is in (and cached, or not) before it disconnects.
    done = e2e.mqtt_run("pub", proxy.port, "-u", TOKEN, "-i", client_id, "-q", "1",
                        "-t", topic, "-m", payload)
    assert done.returncode == 0, done.stderr


@pytest.fixture
def spy(mosquitto):
    """What reaches the broker: mosquitto_sub on its own listener (behind Envoy's back),
    subscribed to '#'."""
    sub = e2e.MqttSubscriber(mosquitto.port, "-t", "#", "-i", "spy-" + uuid.uuid4().hex[:6])
    yield sub
    sub.stop()


def test_the_web_app_decides_and_only_what_it_allows_reaches_the_subscriber(
        proxy, webapp, mosquitto, spy):
    marker = "on-" + uuid.uuid4().hex[:6]
    sub = e2e.MqttSubscriber(proxy.port, "-u", TOKEN, "-i", "alice-sub", "-t", "lamps/7/#",
                             "-t", "lamps/8/#")
    try:
        # The web app allowed lamps/7/# (acc 4) and refused lamps/8/#.
        assert any("Subscribed (mid: 1): 0, 128" in line for line in sub.lines), sub.lines
        for topic, payload in (("lamps/8/set", "refused-by-webapp"),
                               ("other/x", "refused-locally"),
                               ("lamps/7/set", marker)):
            # QoS 1: each client waits for its PUBACK (a plain one when refused, as Mosquitto
            # answers a denied PUBLISH), so its /acl answer is in before it disconnects; at
            # QoS 0 a client gone first has Envoy cancel the call, and nothing is forwarded
            # whatever the answer.
            publish_qos1(proxy, "alice-pub", topic, payload)
        sub.wait_for(f"lamps/7/set {marker}")
        # The refused PUBLISHes were sent (and their clients gone) before the allowed one: had
        # the broker got them, the spy would have them before the marker.
        spy.wait_for(f"lamps/7/set {marker}")
    finally:
        lines = sub.stop()
    assert "refused" not in lines, lines
    reached = "\n".join(spy.lines)
    assert "refused-by-webapp" not in reached and "refused-locally" not in reached, reached
    # What the web app was asked, in go-auth's form parameters.
    auth = [q for _, q in webapp.requests("/auth") if q["clientid"] == "alice-pub"]
    assert auth and auth[0] == {"username": TOKEN, "password": "", "clientid": "alice-pub"}
    assert {"username": TOKEN, "clientid": "alice-sub", "topic": "lamps/7/#", "acc": "4"} \
        in acl_asks(webapp, "alice-sub")
    pub_topics = {(q["topic"], q["acc"]) for q in acl_asks(webapp, "alice-pub")}
    assert pub_topics == {("lamps/8/set", "2"), ("lamps/7/set", "2")}, pub_topics
    # other/x: the local rules refused it; the web app was never asked.
    assert "other/x" not in str(webapp.requests())
    # The broker saw the session as user name, never a password, and only the allowed message.
    log = mosquitto.log_text()
    assert f"u'{TOKEN}'" in log, log[-2000:]
    stats = proxy.stats()
    assert stats["backend.denied"] >= 2 and stats["publish.denied"] >= 2


def test_the_cache_answers_a_second_time_within_its_ttl(proxy, webapp):
    client_id = "alice-" + uuid.uuid4().hex[:6]
    for i in range(3):
        # QoS 1: the client waits for the PUBACK, so the /acl answer has come back (and is
        # cached) before it disconnects. At QoS 0 a client closing first under load has Envoy
        # cancel the pending /acl call with its connection, and the next connection asks again.
        done = e2e.mqtt_run("pub", proxy.port, "-u", TOKEN, "-i", client_id, "-q", "1",
                            "-t", "lamps/7/level", "-m", str(i))
        assert done.returncode == 0, done.stderr
    # Three connections and three PUBLISHes; the web app was asked once about each.
    assert len([q for _, q in webapp.requests("/auth") if q["clientid"] == client_id]) == 1
    assert len(acl_asks(webapp, client_id)) == 1


def test_allows_and_denials_are_cached_for_their_own_ttls(proxy, webapp):
    """allow_ttl_secs 300, deny_ttl_secs 5: within 5 s both answers come from the cache; after
    it the denial is asked again, the allow is not."""
    client_id = "alice-" + uuid.uuid4().hex[:6]
    started = time.monotonic()
    for i in range(2):
        publish_qos1(proxy, client_id, "lamps/8/ttl", f"denied-{i}")
        publish_qos1(proxy, client_id, "lamps/7/ttl", f"allowed-{i}")
    assert time.monotonic() - started < DENY_TTL_S, "too slow to see the cached denial"
    asks = [q["topic"] for q in acl_asks(webapp, client_id)]
    assert sorted(asks) == ["lamps/7/ttl", "lamps/8/ttl"], asks
    # The filter's clock counts whole seconds: one more than the TTL is past it for sure.
    time.sleep(max(0.0, started + DENY_TTL_S + 1.5 - time.monotonic()))
    publish_qos1(proxy, client_id, "lamps/8/ttl", "denied-late")
    publish_qos1(proxy, client_id, "lamps/7/ttl", "allowed-late")
    asks = [q["topic"] for q in acl_asks(webapp, client_id)]
    assert sorted(asks) == ["lamps/7/ttl", "lamps/8/ttl", "lamps/8/ttl"], asks


@pytest.mark.parametrize("failure", [503, "reset"])
def test_a_failing_acl_answer_refuses_the_topic_and_is_not_cached(proxy, webapp, spy, failure):
    """The web app fails on /acl (5xx, or a reset with no answer): the PUBLISH never reaches
    the broker and the SUBSCRIBE gets SUBACK 0x80 (fail-closed); the failure is not cached,
    so once the web app is back the same topic is asked again and allowed."""
    client_id = "alice-" + uuid.uuid4().hex[:6]
    topic = f"lamps/7/{client_id}"
    before = proxy.stats()
    webapp.acl_failure = failure
    try:
        publish_qos1(proxy, client_id, topic, f"failed-{failure}")
        sub = e2e.MqttSubscriber(proxy.port, "-u", TOKEN, "-i", client_id + "-sub",
                                 "-t", topic)
        try:
            assert any("Subscribed (mid: 1): 128" in line for line in sub.lines), sub.lines
        finally:
            sub.stop()
    finally:
        webapp.acl_failure = None
    marker = "back-" + uuid.uuid4().hex[:6]
    publish_qos1(proxy, client_id, topic, marker)
    spy.wait_for(f"{topic} {marker}")
    assert f"failed-{failure}" not in "\n".join(spy.lines), spy.lines
    # Asked about the PUBLISH twice (the failure was not cached), and about the SUBSCRIBE.
    pub_asks = [q["acc"] for q in acl_asks(webapp, client_id)]
    assert pub_asks == ["2", "2"], pub_asks
    assert [q["acc"] for q in acl_asks(webapp, client_id + "-sub")] == ["4"]
    e2e.wait_until(lambda: proxy.stats().get("backend.unavailable", 0)
                   - before.get("backend.unavailable", 0) == 2,
                   "two unavailable answers counted")


def test_an_unknown_session_is_a_bad_user_name_or_password(proxy, webapp, mosquitto):
    accepted = mosquitto.connections_accepted()
    done = e2e.mqtt_run("pub", proxy.port, "-u", "tok-stolen", "-i", "mallory",
                        "-t", "lamps/7/set", "-m", "x")
    assert done.returncode != 0
    assert "bad user name or password" in done.stderr.lower(), done.stderr
    assert ("/auth", {"username": "tok-stolen", "password": "", "clientid": "mallory"}) \
        in webapp.requests()
    assert mosquitto.connections_accepted() == accepted


def test_backend_down_refuses_connects_as_server_unavailable(work_dir, mosquitto, mqtt_wasm):
    nobody = e2e.free_port()  # nothing listens there
    envoy = e2e.MqttEnvoy(work_dir=work_dir, name="envoy-mqtt-backend-down",
                          filter_config=config(), broker_port=mosquitto.port, wasm=mqtt_wasm,
                          http_clusters=(("webapp", f"127.0.0.1:{nobody}"),)).start()
    try:
        accepted = mosquitto.connections_accepted()
        for version in ("mqttv311", "5"):
            done = e2e.mqtt_run("pub", envoy.port, "-V", version, "-u", TOKEN, "-i", "alice-x",
                                "-t", "lamps/7/set", "-m", "x")
            assert done.returncode != 0
            assert any(m in done.stderr.lower() for m in ("broker unavailable", "server unavailable")), \
                done.stderr
        assert mosquitto.connections_accepted() == accepted
        assert envoy.stats()["backend.unavailable"] >= 2
        assert "the auth backend gave no answer for user" in envoy.log_text()
    finally:
        envoy.stop()


# ---- bounds on the backend's calls: server busy ----

SLOW_S = 2.0  # the web app answers this late: the second CONNECT arrives while it is out


@pytest.mark.parametrize("bound, counter", [
    ({"http_backend": {"max_in_flight": 1}}, "backend.shed"),
    ({"max_waiting_connections": 1}, "callout.waiting_shed"),
])
def test_over_a_bound_a_connect_is_refused_as_server_busy_at_once(
        work_dir, mosquitto, mqtt_wasm, bound, counter):
    """One CONNECT's /auth call is out at a slow web app; a CONNECT of another session would
    need a second call (over http_backend.max_in_flight = 1) or a second waiting connection
    (over max_waiting_connections = 1): it is refused as server busy (3.1.1 has no such code:
    0x03 server unavailable) at once, never asked of the backend nor passed to the broker, and
    counted; the first is admitted when its answer comes."""
    other = "tok-" + uuid.uuid4().hex  # bob's web session
    app = WebappAuth(sessions={TOKEN: "alice", other: "bob"}, devices=(),
                     grants={"alice": ["lamps/7/"], "bob": ["lamps/8/"]})
    app.start()
    cfg = config()
    cfg["http_backend"]["timeout_ms"] = 10000
    for key, value in bound.items():
        if isinstance(value, dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    envoy = e2e.MqttEnvoy(work_dir=work_dir, name=f"envoy-mqtt-{counter.replace('.', '-')}",
                          filter_config=cfg, broker_port=mosquitto.port, wasm=mqtt_wasm,
                          concurrency=1,
                          http_clusters=(("webapp", f"127.0.0.1:{app.port}"),)).start()
    first = concurrent.Client(envoy.port, TOKEN, "", 0, client_id="alice-" + uuid.uuid4().hex[:6])
    second = concurrent.Client(envoy.port, other, "", 0, client_id="bob-" + uuid.uuid4().hex[:6])
    try:
        before = envoy.stats()
        accepted = mosquitto.connections_accepted()
        app.delay_s = SLOW_S
        first.connect()
        e2e.wait_until(lambda: app.requests("/auth"), "the first CONNECT's /auth call",
                       timeout=10)
        asked_at = time.monotonic()
        second.connect()
        e2e.wait_until(lambda: second.connack is not None, "the second CONNACK", timeout=10)
        assert time.monotonic() - asked_at < SLOW_S, "refused at once, not after the call"
        assert first.connack is None, "the first still waits for its answer"
        assert str(second.connack) == "Server unavailable", second.connack
        e2e.wait_until(lambda: first.connack is not None, "the first CONNACK", timeout=10)
        assert first.connack == 0, first.connack
        stats = envoy.stats()
        assert stats[counter] - before.get(counter, 0) == 1, stats
        assert [q["username"] for _, q in app.requests("/auth")] == [TOKEN]
        assert mosquitto.connections_accepted() == accepted + 1
        assert "decision=deny" in envoy.log_text()
    finally:
        app.delay_s = 0
        first.stop()
        second.stop()
        envoy.stop()
        app.stop()
