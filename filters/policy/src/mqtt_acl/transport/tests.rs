//! MQTT over WebSockets through a [`Connection`]: the handshake both ways, the bytes each side
//! sees, refusals as WebSocket frames, and the session deciding exactly as for raw MQTT.

use proptest::prelude::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::*;
use crate::mqtt::{
    encode, encode_connack, v3_connack, Connect, Packet, Properties, ProtocolVersion, Publish, QoS,
};
use crate::websocket::{ControlFrame, WsError};

const NOW: u64 = 1_767_225_600;
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const MASK: [u8; 4] = [0x11, 0x22, 0x33, 0x44];
const V3: ProtocolVersion = ProtocolVersion::V311;

fn config(transport: &str) -> Value {
    let digest: String = Sha256::digest(b"k1")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    json!({
        "transport": transport,
        "device_keys": {"devices": {"lamp-01": {"key_sha256": [digest]}}},
        "client_ids": ["*"],
        "acl": {"rules": [
            {"name": "devices", "effect": "allow", "subjects": ["authenticated"],
             "actions": ["*"], "mqtt": {"topic": "devices/#"}},
            {"name": "no-secret", "effect": "deny", "subjects": ["anyone"],
             "actions": ["*"], "mqtt": {"topic": "devices/+/secret"}}
        ]}
    })
}

fn policy(transport: &str) -> MqttAcl {
    MqttAcl::from_json(config(transport).to_string().as_bytes()).unwrap()
}

fn env(policy: &MqttAcl) -> Env<'_> {
    Env { policy, now: NOW }
}

fn upgrade_request() -> String {
    format!(
        "GET /mqtt HTTP/1.1\r\nHost: localhost:9001\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: mqtt\r\nCookie: sessionid=secret\r\n\r\n"
    )
}

fn upgrade_response() -> String {
    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
     Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
        .to_string()
}

fn connect(username: &str, password: &[u8]) -> Vec<u8> {
    encode(
        &Packet::Connect(Connect {
            version: V3,
            client_id: "c1".into(),
            clean_start: true,
            keep_alive: 60,
            username: Some(username.into()),
            password: Some(password.to_vec()),
            will: None,
            properties: Properties::new(),
            bridge: false,
        }),
        V3,
    )
    .unwrap()
}

fn publish(topic: &str, qos: QoS, packet_id: Option<u16>) -> Vec<u8> {
    encode(
        &Packet::Publish(Publish {
            dup: false,
            qos,
            retain: false,
            topic: topic.into(),
            packet_id,
            properties: Properties::new(),
            payload: b"on".to_vec(),
        }),
        V3,
    )
    .unwrap()
}

fn to_broker(mqtt: &[u8]) -> Vec<u8> {
    encode_frame(Opcode::Binary, mqtt, Some(MASK))
}

fn to_client(mqtt: &[u8]) -> Vec<u8> {
    encode_frame(Opcode::Binary, mqtt, None)
}

/// What a side reads from `wire`: the MQTT bytes joined, and the control frames.
fn read(sender: Sender, wire: &[u8]) -> (Vec<u8>, Vec<ControlFrame>) {
    let mut decoder = FrameDecoder::new(sender, 1 << 24);
    let mut mqtt = Vec::new();
    let mut controls = Vec::new();
    for piece in decoder.decode_all(wire).unwrap() {
        match piece {
            Piece::Data(bytes) => mqtt.extend(bytes),
            Piece::Control(frame) => controls.push(frame),
        }
    }
    (mqtt, controls)
}

/// A connection through the handshake.
fn open(policy: &MqttAcl) -> Connection {
    let env = env(policy);
    let mut connection = Connection::new(policy, None, 7);
    assert!(connection.awaiting_connect());
    let out = connection.on_client_bytes(upgrade_request().as_bytes(), &env);
    assert!(!connection.awaiting_connect());
    assert_eq!(out.refusal_cluster, None);
    let sent = String::from_utf8(out.forward).unwrap();
    assert!(sent.starts_with("GET /mqtt HTTP/1.1\r\n"), "{sent}");
    assert!(
        !sent.contains("secret"),
        "the cookie does not reach the broker: {sent}"
    );
    let out = connection.on_broker_bytes(upgrade_response().as_bytes(), &env);
    assert_eq!(
        out.forward,
        upgrade_response().as_bytes(),
        "the 101 passes unchanged"
    );
    assert_eq!(out.close, None);
    connection
}

#[test]
fn an_allowed_client_publishes_and_a_forbidden_publish_is_dropped() {
    let policy = policy("websocket");
    let env = env(&policy);
    let mut connection = open(&policy);
    let out = connection.on_client_bytes(&to_broker(&connect("lamp-01", b"k1")), &env);
    assert!(out.decisions[0].is_allowed());
    let (mqtt, _) = read(Sender::Client, &out.forward);
    // The same bytes the raw-MQTT session forwards: the subject, no password.
    let mut raw = Session::new(&policy, None, 7);
    let raw_out = raw.on_client_bytes(&connect("lamp-01", b"k1"), &env);
    assert_eq!(mqtt, raw_out.forward);
    assert!(!mqtt.windows(2).any(|w| w == b"k1"));
    // The frame to the broker is masked with the client's key.
    assert_eq!(&out.forward[2..6], &MASK);

    let connack = encode_connack(V3, v3_connack::ACCEPTED);
    let out = connection.on_broker_bytes(&to_client(&connack), &env);
    assert_eq!(out.forward, to_client(&connack));

    let mut frames = to_broker(&publish("devices/lamp-01/state", QoS::AtMostOnce, None));
    frames.extend(to_broker(&publish(
        "devices/lamp-01/secret",
        QoS::AtMostOnce,
        None,
    )));
    let out = connection.on_client_bytes(&frames, &env);
    let (mqtt, _) = read(Sender::Client, &out.forward);
    assert_eq!(
        mqtt,
        publish("devices/lamp-01/state", QoS::AtMostOnce, None)
    );
    assert_eq!(out.decisions.len(), 2);
    assert!(!out.decisions[1].is_allowed());
    assert_eq!(out.close, None);
}

#[test]
fn a_refused_connect_gets_its_connack_in_a_binary_frame_then_a_close_frame() {
    let policy = policy("websocket");
    let env = env(&policy);
    let mut connection = open(&policy);
    let out = connection.on_client_bytes(&to_broker(&connect("lamp-01", b"wrong")), &env);
    assert!(!out.decisions[0].is_allowed());
    // The WebSocket to the broker is open already: the harmless CONNECT goes there.
    assert_eq!(out.refusal_cluster, None);
    let (mqtt, _) = read(Sender::Client, &out.forward);
    assert!(String::from_utf8_lossy(&mqtt).contains("mqtt-acl-refused-7"));
    assert!(!mqtt.windows(5).any(|w| w == b"wrong"));

    let accepted = encode_connack(V3, v3_connack::ACCEPTED);
    let out = connection.on_broker_bytes(&to_client(&accepted), &env);
    assert!(out.close_after_write);
    let (mqtt, controls) = read(Sender::Server, &out.forward);
    assert_eq!(
        mqtt,
        encode_connack(V3, v3_connack::BAD_USERNAME_OR_PASSWORD)
    );
    assert_eq!(controls.len(), 1);
    assert_eq!(controls[0].close_code(), Some(close_code::POLICY_VIOLATION));
    assert_eq!(connection.closing(), Some(&CloseReason::Refused));
    // The client's close frame answer: the connection closes.
    let out = connection.on_client_bytes(&encode_close(1000, "", Some(MASK)), &env);
    assert_eq!(out.close, Some(CloseReason::Refused));
}

#[test]
fn a_bad_upgrade_request_gets_400_through_the_refusal_stand_in() {
    let policy = policy("websocket");
    let env = env(&policy);
    for request in [
        upgrade_request().replace("Protocol: mqtt", "Protocol: chat"),
        upgrade_request().replace("GET", "POST"),
        "\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00\r\n\r\n".to_string(),
        format!("{}\u{82}", upgrade_request()),
    ] {
        let mut connection = Connection::new(&policy, None, 7);
        let out = connection.on_client_bytes(request.as_bytes(), &env);
        assert!(
            !connection.awaiting_connect(),
            "tcp_proxy starts, to the stand-in"
        );
        assert_eq!(out.refusal_cluster.as_deref(), Some("mqtt_acl_refusal"));
        assert_eq!(out.forward, REFUSED_UPGRADE_PROBE);
        assert!(!out.decisions[0].is_allowed());
        assert_eq!(out.decisions[0].counters, vec!["connect.refused"]);
        // The stand-in echoes; the client gets the 400.
        let out = connection.on_broker_bytes(REFUSED_UPGRADE_PROBE, &env);
        assert!(out.close_after_write);
        let answer = String::from_utf8(out.forward).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{answer}"
        );
        assert_eq!(connection.closing(), Some(&CloseReason::Refused));
    }
    // Too long without its end: refused as soon as it is over the bound.
    let mut connection = Connection::new(&policy, None, 7);
    let out = connection.on_client_bytes(&[b'A'; 9000], &env);
    assert_eq!(out.refusal_cluster.as_deref(), Some("mqtt_acl_refusal"));
    // Incomplete: nothing goes anywhere yet.
    let mut connection = Connection::new(&policy, None, 7);
    let out = connection.on_client_bytes(b"GET /mqtt HTTP/1.1\r\n", &env);
    assert_eq!(out, Output::default());
    assert!(connection.awaiting_connect());
}

#[test]
fn a_bad_broker_answer_becomes_502_and_early_client_data_closes() {
    let policy = policy("websocket");
    let env = env(&policy);
    let bad = upgrade_response().replace("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", "AAAA");
    for answer in [
        bad,
        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_string(),
    ] {
        let mut connection = Connection::new(&policy, None, 7);
        connection.on_client_bytes(upgrade_request().as_bytes(), &env);
        let out = connection.on_broker_bytes(answer.as_bytes(), &env);
        assert!(out.close_after_write);
        assert!(out.forward.starts_with(b"HTTP/1.1 502 Bad Gateway\r\n"));
        assert!(matches!(
            connection.closing(),
            Some(CloseReason::Malformed(_))
        ));
    }
    let mut connection = Connection::new(&policy, None, 7);
    connection.on_client_bytes(upgrade_request().as_bytes(), &env);
    let out = connection.on_client_bytes(&to_broker(&connect("lamp-01", b"k1")), &env);
    assert!(out.close.is_some());
    assert!(out.forward.is_empty());
}

#[test]
fn control_frames_pass_unchanged_and_bad_frames_close() {
    let policy = policy("websocket");
    let env = env(&policy);
    let mut connection = open(&policy);
    // A ping before the CONNECT, a CONNECT cut into two fragments with a ping between.
    let connect = connect("lamp-01", b"k1");
    let ping = encode_frame(Opcode::Ping, b"hi", Some([9, 9, 9, 9]));
    let mut first = encode_frame(Opcode::Binary, &connect[..5], Some(MASK));
    first[0] &= 0x7F;
    let mut last = encode_frame(Opcode::Continuation, &connect[5..], Some([1, 2, 3, 4]));
    last[0] = 0x80 | (last[0] & 0x0F);
    let wire = [ping.clone(), first, ping.clone(), last].concat();
    let out = connection.on_client_bytes(&wire, &env);
    assert!(out.decisions[0].is_allowed());
    let (mqtt, controls) = read(Sender::Client, &out.forward);
    assert_eq!(
        controls.iter().map(|c| c.raw.clone()).collect::<Vec<_>>(),
        [ping.clone(), ping]
    );
    assert_eq!(
        mqtt.len(),
        connect.len() - 4,
        "the password and its length are dropped"
    );
    let pong = encode_frame(Opcode::Pong, b"hi", None);
    let out = connection.on_broker_bytes(&pong, &env);
    assert_eq!(out.forward, pong);
    // A text frame closes.
    let text = encode_frame(Opcode::Text, b"{}", Some(MASK));
    let out = connection.on_client_bytes(&text, &env);
    assert!(matches!(out.close, Some(CloseReason::Malformed(ref why)) if why.contains("text")));
    // So does an unmasked client frame.
    let mut connection = open(&policy);
    let out = connection.on_client_bytes(&to_client(&[0xC0, 0x00]), &env);
    assert!(out.close.is_some());
}

#[test]
fn a_forbidden_delivery_closes_with_a_close_frame_to_the_client() {
    let policy = policy("websocket");
    let env = env(&policy);
    let mut connection = open(&policy);
    connection.on_client_bytes(&to_broker(&connect("lamp-01", b"k1")), &env);
    connection.on_broker_bytes(&to_client(&encode_connack(V3, 0)), &env);
    let allowed = publish("devices/lamp-01/state", QoS::AtMostOnce, None);
    let forbidden = publish("devices/lamp-01/secret", QoS::AtLeastOnce, Some(3));
    let wire = [to_client(&allowed), to_client(&forbidden)].concat();
    let out = connection.on_broker_bytes(&wire, &env);
    assert_eq!(out.close, None, "the close frame is written first");
    assert!(out.close_after_write);
    let (mqtt, controls) = read(Sender::Server, &out.forward);
    assert_eq!(mqtt, allowed);
    assert_eq!(controls[0].close_code(), Some(close_code::POLICY_VIOLATION));
    assert!(matches!(
        connection.closing(),
        Some(CloseReason::Forbidden(_))
    ));
    // A masked frame from the broker is refused with a close frame too.
    let mut connection = open(&policy);
    let out = connection.on_broker_bytes(&to_broker(&[0xD0, 0x00]), &env);
    let (_, controls) = read(Sender::Server, &out.forward);
    assert_eq!(controls[0].close_code(), Some(close_code::PROTOCOL_ERROR));
    assert!(out.close_after_write);
}

#[test]
fn the_transport_is_configured_and_refused_combinations_say_why() {
    assert_eq!(policy("mqtt").transport, Transport::Mqtt);
    let mut raw = config("mqtt");
    raw.as_object_mut().unwrap().remove("transport");
    let raw = MqttAcl::from_json(raw.to_string().as_bytes()).unwrap();
    assert_eq!(raw.transport, Transport::Mqtt);
    let mut no_stand_in = config("websocket");
    no_stand_in["refusal_cluster"] = Value::Null;
    let error = MqttAcl::from_json(no_stand_in.to_string().as_bytes()).unwrap_err();
    assert!(error.contains("needs a refusal_cluster"), "{error}");
    let error = MqttAcl::from_json(config("ws").to_string().as_bytes()).unwrap_err();
    assert!(error.contains("transport"), "{error}");
}

#[test]
fn raw_mqtt_connections_are_unchanged() {
    let policy = policy("mqtt");
    let env = env(&policy);
    let mut connection = Connection::new(&policy, None, 7);
    let mut session = Session::new(&policy, None, 7);
    let bytes = connect("lamp-01", b"k1");
    assert_eq!(
        connection.on_client_bytes(&bytes, &env),
        session.on_client_bytes(&bytes, &env)
    );
}

/// Frames `mqtt` as the client might: cut at `cuts`, each piece a frame or a fragment, pings
/// between some.
fn client_frames(mqtt: &[u8], cuts: &[usize], masks: &[[u8; 4]], fragment: bool) -> Vec<u8> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (mqtt.len() + 1)).collect();
    points.push(0);
    points.push(mqtt.len());
    points.sort_unstable();
    points.dedup();
    let mut wire = Vec::new();
    let pieces: Vec<&[u8]> = points.windows(2).map(|w| &mqtt[w[0]..w[1]]).collect();
    for (i, piece) in pieces.iter().enumerate() {
        let mask = masks[i % masks.len()];
        let opcode = if fragment && i > 0 {
            Opcode::Continuation
        } else {
            Opcode::Binary
        };
        let mut frame = encode_frame(opcode, piece, Some(mask));
        if fragment && i + 1 < pieces.len() {
            frame[0] &= 0x7F;
        }
        wire.extend(frame);
        if i % 3 == 1 {
            wire.extend(encode_frame(Opcode::Ping, b"p", Some(mask)));
        }
    }
    wire
}

proptest! {
    /// The WebSocket connection forwards exactly what the raw session forwards for the same MQTT
    /// bytes, decides the same, however the frames and reads are cut.
    #[test]
    fn over_websockets_the_session_decides_as_for_raw_mqtt(
        topics in prop::collection::vec(
            prop::sample::select(vec!["devices/a/state", "devices/b/secret", "other/x",
                                      "devices/c/d"]), 0..6),
        good_key in any::<bool>(),
        cuts in prop::collection::vec(any::<usize>(), 0..6),
        reads in prop::collection::vec(any::<usize>(), 0..6),
        masks in prop::collection::vec(any::<[u8; 4]>(), 1..3),
        fragment in any::<bool>(),
    ) {
        let policy = policy("websocket");
        let env = env(&policy);
        let mut mqtt = connect("lamp-01", if good_key { b"k1" } else { b"k9" });
        for (i, topic) in topics.iter().enumerate() {
            let qos = if i % 2 == 0 { QoS::AtMostOnce } else { QoS::AtLeastOnce };
            let id = (qos == QoS::AtLeastOnce).then_some(i as u16 + 1);
            mqtt.extend(publish(topic, qos, id));
        }
        let mut raw = Session::new(&policy, None, 7);
        let raw_out = raw.on_client_bytes(&mqtt, &env);

        let mut connection = open(&policy);
        let wire = client_frames(&mqtt, &cuts, &masks, fragment);
        let mut points: Vec<usize> = reads.iter().map(|c| c % (wire.len() + 1)).collect();
        points.push(0);
        points.push(wire.len());
        points.sort_unstable();
        let mut forward = Vec::new();
        let mut decisions = Vec::new();
        for w in points.windows(2) {
            let out = connection.on_client_bytes(&wire[w[0]..w[1]], &env);
            prop_assert_eq!(out.close.clone(), None);
            forward.extend(out.forward);
            decisions.extend(out.decisions.into_iter().map(|d| d.decision));
        }
        let (forwarded, _) = read(Sender::Client, &forward);
        prop_assert_eq!(forwarded, raw_out.forward);
        let raw_decisions: Vec<_> = raw_out.decisions.into_iter().map(|d| d.decision).collect();
        prop_assert_eq!(decisions, raw_decisions);
    }
}

#[test]
fn ws_errors_carry_close_codes() {
    let error = WsError {
        close_code: close_code::MESSAGE_TOO_BIG,
        message: "big".into(),
    };
    assert_eq!(error.close_code(), 1009);
}

#[test]
fn the_connection_counts_its_denials_across_packets() {
    let policy = policy("mqtt");
    let env = env(&policy);
    let mut connection = Connection::new(&policy, None, 7);
    let out = connection.on_client_bytes(&connect("lamp-01", b"k1"), &env);
    assert_eq!(connection.count_denials(&out), None, "an allowed CONNECT");
    let mut packets = publish("devices/lamp-01/state", QoS::AtMostOnce, None);
    packets.extend(publish("devices/lamp-01/secret", QoS::AtMostOnce, None));
    let out = connection.on_client_bytes(&packets, &env);
    assert_eq!(connection.count_denials(&out), Some(1));
    let out = connection.on_client_bytes(&publish("devices/a/secret", QoS::AtMostOnce, None), &env);
    assert_eq!(
        connection.count_denials(&out),
        Some(2),
        "the count is the connection's"
    );
    let out = connection.on_client_bytes(&publish("devices/a/state", QoS::AtMostOnce, None), &env);
    assert_eq!(
        connection.count_denials(&out),
        None,
        "unchanged by an allow"
    );
}

/// WebSockets with the HTTP auth backend (the browser with the web app's session token).
fn backend_policy() -> MqttAcl {
    let config = json!({
        "transport": "websocket",
        "refusal_cluster": "refusal",
        "client_ids": ["*"],
        "http_backend": {"cluster": "webapp", "authority": "webapp.internal",
                         "user": {"path": "/auth"}, "acl": {"path": "/acl"},
                         "cache": {"allow_ttl_secs": 60, "deny_ttl_secs": 5}}
    });
    MqttAcl::from_json(config.to_string().as_bytes()).unwrap()
}

fn asked(ask: &super::super::Ask) -> (String, Value) {
    let super::super::AskRequest::Backend(request) = &ask.request else {
        panic!("not a backend request: {ask:?}")
    };
    (
        request.path.clone(),
        serde_json::from_slice(&request.body).unwrap(),
    )
}

fn answered(status: Option<u32>) -> BackendAnswer {
    BackendAnswer {
        status,
        body: Vec::new(),
    }
}

#[test]
fn frames_wait_for_the_backend_and_go_on_in_order_after_its_answers() {
    let policy = backend_policy();
    let env = env(&policy);
    let mut connection = open(&policy);
    let connect = connect("3f2a9c-session", b"");
    let out = connection.on_client_bytes(&to_broker(&connect), &env);
    assert!(
        out.forward.is_empty() && out.decisions.is_empty(),
        "{out:?}"
    );
    assert_eq!(out.asks.len(), 1);
    assert_eq!(asked(&out.asks[0]).0, "/auth");
    let auth = out.asks[0].id;
    // The client does not wait for the CONNACK: its PUBLISHes arrive while /auth is out and are
    // held, not read.
    let allowed = publish("lamps/7/set", QoS::AtMostOnce, None);
    let forbidden = publish("lamps/8/set", QoS::AtMostOnce, None);
    let out = connection.on_client_bytes(&to_broker(&[allowed.clone(), forbidden].concat()), &env);
    assert!(out.forward.is_empty() && out.asks.is_empty(), "{out:?}");
    assert!(connection.waiting_for_backend());

    // /auth allows: the CONNECT goes on in a frame masked with the client's key, and the held
    // frame is read next: its first PUBLISH waits for /acl.
    let out = connection.on_backend_answer(auth, &answered(Some(200)), &env);
    assert_eq!(&out.forward[2..6], &MASK);
    let (mqtt, _) = read(Sender::Client, &out.forward);
    let Ok(Packet::Connect(sent)) = crate::mqtt::decode_packet(&mqtt, V3) else {
        panic!("not a CONNECT: {mqtt:?}")
    };
    // As for raw MQTT: the session as user name, no password.
    assert_eq!(
        (sent.username.as_deref(), sent.password),
        (Some("3f2a9c-session"), None)
    );
    assert_eq!(out.asks.len(), 1);
    let (path, body) = asked(&out.asks[0]);
    assert_eq!(
        (path.as_str(), &body["topic"]),
        ("/acl", &json!("lamps/7/set"))
    );
    let acl7 = out.asks[0].id;
    let connack = encode_connack(V3, v3_connack::ACCEPTED);
    assert_eq!(
        connection
            .on_broker_bytes(&to_client(&connack), &env)
            .forward,
        to_client(&connack)
    );

    let out = connection.on_backend_answer(acl7, &answered(Some(200)), &env);
    let (mqtt, _) = read(Sender::Client, &out.forward);
    assert_eq!(mqtt, allowed);
    assert_eq!(asked(&out.asks[0]).1["topic"], "lamps/8/set");
    let out = connection.on_backend_answer(out.asks[0].id, &answered(Some(403)), &env);
    assert!(
        out.forward.is_empty(),
        "the denied PUBLISH is dropped: {out:?}"
    );
    assert!(!out.decisions[0].is_allowed());
    assert_eq!(out.close, None);
    assert!(!connection.waiting_for_backend());
}

#[test]
fn a_failed_or_shed_backend_call_refuses_the_connect_in_a_frame_then_a_close_frame() {
    let policy = backend_policy();
    let env = env(&policy);
    for shed in [false, true] {
        let mut connection = open(&policy);
        let out = connection.on_client_bytes(&to_broker(&connect("3f2a9c-session", b"")), &env);
        let id = out.asks[0].id;
        let out = if shed {
            connection.on_ask_shed(id, "over http_backend.max_in_flight", &env)
        } else {
            connection.on_backend_answer(id, &answered(None), &env)
        };
        assert!(!out.decisions[0].is_allowed(), "shed {shed}");
        // The WebSocket to the broker is open: the harmless CONNECT goes there, in a frame.
        let (mqtt, _) = read(Sender::Client, &out.forward);
        assert!(String::from_utf8_lossy(&mqtt).contains("mqtt-acl-refused-7"));
        assert!(!String::from_utf8_lossy(&mqtt).contains("3f2a9c-session"));

        let accepted = encode_connack(V3, v3_connack::ACCEPTED);
        let out = connection.on_broker_bytes(&to_client(&accepted), &env);
        assert!(out.close_after_write);
        let (mqtt, controls) = read(Sender::Server, &out.forward);
        // 3.1.1 has no "server busy": both are "server unavailable".
        assert_eq!(
            mqtt,
            encode_connack(V3, v3_connack::SERVER_UNAVAILABLE),
            "shed {shed}"
        );
        assert_eq!(controls.len(), 1);
        assert_eq!(controls[0].close_code(), Some(close_code::POLICY_VIOLATION));
        assert_eq!(connection.closing(), Some(&CloseReason::Refused));
    }
}
