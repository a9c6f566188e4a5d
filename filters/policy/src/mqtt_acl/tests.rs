//! Tests of the mqtt-acl session: CONNECT authentication and refusal, PUBLISH and SUBSCRIBE
//! decisions with the bytes each side sees, ownership, shadow mode, expiry, malformed input.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use jwt_simple::prelude::{HS256Key, JWTClaims, MACLike};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::*;
use crate::mqtt::{Publish, Subscription, SubscriptionOptions, Will};

const NOW: u64 = 1_767_225_600;
const ISS: &str = "https://idp.example.org";
const SECRET: &[u8; 32] = b"0123456789abcdef0123456789abcdef";
const V3: ProtocolVersion = ProtocolVersion::V311;
const V5: ProtocolVersion = ProtocolVersion::V5;

fn sha(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn token_with(claims: Value, secret: &[u8]) -> String {
    let claims: JWTClaims<Map<String, Value>> = serde_json::from_value(claims).unwrap();
    HS256Key::from_bytes(secret).authenticate(claims).unwrap()
}

fn token(sub: &str, exp: u64) -> String {
    token_with(
        json!({"iss": ISS, "sub": sub, "iat": NOW - 10, "exp": exp}),
        SECRET,
    )
}

fn base_config() -> Value {
    json!({
        "jwt_providers": [{"issuer": ISS, "algorithms": ["HS256"], "allow_any_audience": true,
                           "hmac_secret": STANDARD.encode(SECRET)}],
        "device_keys": {"devices": {"lamp-01": {"key_sha256": [sha("k1")]},
                                    "lamp-02": {"key_sha256": [sha("k2")]}}},
        "mtls": {"identity_from": "subject_cn", "roles": ["device"]},
        // The defaults, and "c1" for everyone (the tests' usual client id).
        "client_ids": ["%u", "%u-*", "c1"],
        "acl": {"rules": [
            {"name": "devices", "effect": "allow", "subjects": ["authenticated"],
             "actions": ["*"], "mqtt": {"topic": "devices/#"}},
            {"name": "own-user", "effect": "allow", "subjects": ["authenticated"],
             "actions": ["*"], "mqtt": {"topic": "users/%u/#"}},
            {"name": "own-client", "effect": "allow", "subjects": ["authenticated"],
             "actions": ["write"], "mqtt": {"topic": "clients/%c"}},
            {"name": "ops-all", "effect": "allow", "subjects": ["user:ops"],
             "actions": ["read"], "mqtt": {"topic": "#"}},
            {"name": "no-secret", "effect": "deny", "subjects": ["anyone"],
             "actions": ["*"], "mqtt": {"topic": "devices/+/secret"}}
        ]},
        "ownership": {"topic_template": "devices/{device}/#",
                      "devices": {"lamp-01": {"owner": "alice",
                                              "delegations": [{"user": "bob", "access": "read"}]}}}
    })
}

fn policy_from(config: Value) -> MqttAcl {
    MqttAcl::from_json(config.to_string().as_bytes()).unwrap()
}

fn policy() -> MqttAcl {
    policy_from(base_config())
}

fn with(mut config: Value, key: &str, value: Value) -> Value {
    config[key] = value;
    config
}

fn connect_packet(
    version: ProtocolVersion,
    client_id: &str,
    username: Option<&str>,
    password: Option<&[u8]>,
    will: Option<Will>,
) -> Vec<u8> {
    encode(
        &Packet::Connect(Connect {
            version,
            bridge: false,
            client_id: client_id.into(),
            clean_start: true,
            keep_alive: 60,
            username: username.map(Into::into),
            password: password.map(<[u8]>::to_vec),
            will,
            properties: Properties::new(),
        }),
        version,
    )
    .unwrap()
}

fn publish(version: ProtocolVersion, topic: &str, qos: QoS, packet_id: Option<u16>) -> Vec<u8> {
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
        version,
    )
    .unwrap()
}

fn subscribe(version: ProtocolVersion, packet_id: u16, filters: &[&str]) -> Vec<u8> {
    encode_subscribe(
        version,
        &Subscribe {
            packet_id,
            properties: Properties::new(),
            filters: filters
                .iter()
                .map(|f| Subscription {
                    filter: (*f).into(),
                    options: SubscriptionOptions::qos(QoS::AtLeastOnce),
                })
                .collect(),
        },
    )
    .unwrap()
}

struct Conn {
    policy: MqttAcl,
    session: Session,
    now: u64,
}

impl Conn {
    fn new(policy: MqttAcl) -> Conn {
        Conn::with_peer(policy, None)
    }

    fn with_peer(policy: MqttAcl, peer: Option<PeerCertificate>) -> Conn {
        let session = Session::new(&policy, peer, 7);
        Conn {
            policy,
            session,
            now: NOW,
        }
    }

    fn client(&mut self, bytes: &[u8]) -> Output {
        let env = Env {
            policy: &self.policy,
            now: self.now,
        };
        self.session.on_client_bytes(bytes, &env)
    }

    fn broker(&mut self, bytes: &[u8]) -> Output {
        let env = Env {
            policy: &self.policy,
            now: self.now,
        };
        self.session.on_broker_bytes(bytes, &env)
    }

    /// CONNECT and the broker's CONNACK 0, both passed on.
    fn open(&mut self, version: ProtocolVersion, username: Option<&str>, password: Option<&[u8]>) {
        let connect = connect_packet(version, "c1", username, password, None);
        let out = self.client(&connect);
        assert!(out.close.is_none(), "{:?}", out.decisions);
        assert_forwarded_without_credentials(&out, &self.session, version, &connect);
        let connack = encode_connack(version, 0);
        assert_eq!(self.broker(&connack).forward, connack);
    }
}

/// The CONNECT went on as the client sent it, but with the verified subject as user name and no
/// password.
fn assert_forwarded_without_credentials(
    out: &Output,
    session: &Session,
    version: ProtocolVersion,
    connect: &[u8],
) {
    let Packet::Connect(sent) = crate::mqtt::decode_packet(&out.forward, version).unwrap() else {
        panic!("not a CONNECT: {:?}", out.forward)
    };
    let Packet::Connect(original) = crate::mqtt::decode_packet(connect, version).unwrap() else {
        panic!("not a CONNECT")
    };
    assert_eq!(sent.password, None);
    assert_eq!(
        sent.username,
        session.identity().map(|i| i.subject.clone()),
        "the user name is the verified subject"
    );
    assert_eq!(
        Connect {
            username: None,
            password: None,
            ..sent
        },
        Connect {
            username: None,
            password: None,
            ..original
        }
    );
}

fn lines(out: &Output) -> String {
    out.decisions
        .iter()
        .map(|d| d.line.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Asserts a refused CONNECT: a harmless CONNECT went to the broker, its CONNACK is replaced by
/// `code`, the connection then closes.
fn assert_refused(conn: &mut Conn, version: ProtocolVersion, connect: &[u8], code: u8) -> Output {
    let out = conn.client(connect);
    assert!(out.close.is_none(), "{:?}", out.close);
    assert_ne!(
        out.forward, connect,
        "the refused CONNECT must not be forwarded"
    );
    let harmless = crate::mqtt::decode_packet(&out.forward, version).unwrap();
    let Packet::Connect(harmless) = harmless else {
        panic!("not a CONNECT: {harmless:?}")
    };
    assert_eq!(harmless.version, version);
    assert_eq!(harmless.client_id, "mqtt-acl-refused-7");
    assert!(harmless.clean_start);
    assert!(harmless.username.is_none() && harmless.password.is_none());
    assert!(harmless.will.is_none());
    assert_eq!(harmless.keep_alive, 60);
    assert!(
        out.decisions.iter().any(|d| !d.is_allowed()),
        "{}",
        lines(&out)
    );
    assert!(out.decisions[0].counters.contains(&"connect.refused"));
    // What the client sends next is dropped.
    let more = conn.client(&publish(
        version,
        "devices/lamp-01/state",
        QoS::AtMostOnce,
        None,
    ));
    assert!(more.forward.is_empty() && more.close.is_none());
    let answer = conn.broker(&encode_connack(version, 0));
    assert_eq!(answer.forward, encode_connack(version, code));
    assert!(answer.close_after_write && answer.close.is_none());
    assert_eq!(conn.session.closing(), Some(&CloseReason::Refused));
    // The next callback closes.
    let after = conn.client(b"\xe0\x00");
    assert_eq!(after.close, Some(CloseReason::Refused));
    assert!(after.forward.is_empty());
    out
}

// ------------------------------------------------------------------------------------------
// CONNECT

#[test]
fn valid_jwt_as_username_connects_and_expiry_is_remembered() {
    let mut conn = Conn::new(policy());
    let t = token("alice", NOW + 300);
    let connect = connect_packet(V3, "c1", Some(&t), None, None);
    let out = conn.client(&connect);
    assert_forwarded_without_credentials(&out, &conn.session, V3, &connect);
    assert_eq!(
        out.forward,
        connect_packet(V3, "c1", Some("alice"), None, None)
    );
    assert!(
        out.decisions[0].line.to_string().contains("decision=allow"),
        "{}",
        lines(&out)
    );
    assert!(out.decisions[0]
        .line
        .to_string()
        .contains(r#"subject="alice""#));
    assert!(out.decisions[0]
        .line
        .to_string()
        .contains(r#"client_id="c1""#));
    assert_eq!(out.decisions[0].counters, vec!["connect.allowed"]);
    assert_eq!(conn.session.identity().unwrap().subject, "alice");
    assert_eq!(conn.session.expires_at(), Some(NOW + 300));
    // An empty password is a blank password, as LAMPI's web users send.
    let mut conn = Conn::new(policy());
    conn.open(V5, Some(&t), Some(b""));
}

#[test]
fn bad_tokens_get_bad_username_or_password() {
    let expired = token("alice", NOW - 120);
    let forged = token_with(
        json!({"iss": ISS, "sub": "alice", "exp": NOW + 300}),
        b"another-secret-another-secret-32",
    );
    let wrong_issuer = token_with(
        json!({"iss": "https://evil.example", "sub": "alice", "exp": NOW + 300}),
        SECRET,
    );
    for (t, why) in [
        (expired, "expired"),
        (forged, "signature"),
        (wrong_issuer, "issuer"),
    ] {
        let mut conn = Conn::new(policy());
        let out = assert_refused(
            &mut conn,
            V3,
            &connect_packet(V3, "c1", Some(&t), None, None),
            v3_connack::BAD_USERNAME_OR_PASSWORD,
        );
        assert!(lines(&out).contains(why), "{why}: {}", lines(&out));
        assert!(lines(&out).contains("reason=unauthenticated"));
        let mut conn = Conn::new(policy());
        assert_refused(
            &mut conn,
            V5,
            &connect_packet(V5, "c1", Some(&t), None, None),
            reason::BAD_USER_NAME_OR_PASSWORD,
        );
    }
}

#[test]
fn device_keys_right_and_wrong() {
    let mut conn = Conn::new(policy());
    conn.open(V3, Some("lamp-01"), Some(b"k1"));
    assert_eq!(
        conn.session.identity().unwrap().kind,
        IdentityKind::DeviceKey
    );
    assert_eq!(conn.session.expires_at(), None);
    for (user, key) in [("lamp-01", "k2"), ("lamp-09", "k1")] {
        let mut conn = Conn::new(policy());
        let connect = connect_packet(V3, "c1", Some(user), Some(key.as_bytes()), None);
        assert_refused(
            &mut conn,
            V3,
            &connect,
            v3_connack::BAD_USERNAME_OR_PASSWORD,
        );
    }
}

#[test]
fn refused_connect_with_a_will_never_reaches_the_broker() {
    let will = Will {
        topic: "devices/lamp-01/state".into(),
        payload: b"offline-forged".to_vec(),
        qos: QoS::AtLeastOnce,
        retain: true,
        properties: Properties::new(),
    };
    let mut conn = Conn::new(policy());
    let connect = connect_packet(V5, "c1", Some("lamp-01"), Some(b"bad"), Some(will));
    let out = assert_refused(&mut conn, V5, &connect, reason::BAD_USER_NAME_OR_PASSWORD);
    assert!(!out
        .forward
        .windows(b"offline-forged".len())
        .any(|w| w == b"offline-forged"));
}

#[test]
fn certificate_identity() {
    let peer = PeerCertificate {
        subject: Some("CN=lamp-01,O=Acme".into()),
        uri_san: None,
        dns_san: None,
    };
    let mut conn = Conn::with_peer(policy(), Some(peer.clone()));
    conn.open(V3, None, None);
    let id = conn.session.identity().unwrap();
    assert_eq!(
        (id.kind, id.subject.as_str()),
        (IdentityKind::ClientCertificate, "lamp-01")
    );
    // LAMPI sends its CN as user name with a blank password.
    let mut conn = Conn::with_peer(policy(), Some(peer.clone()));
    conn.open(V3, Some("lamp-01"), None);
    // Another name is not this certificate.
    let mut conn = Conn::with_peer(policy(), Some(peer));
    let connect = connect_packet(V3, "c1", Some("lamp-02"), None, None);
    assert_refused(
        &mut conn,
        V3,
        &connect,
        v3_connack::BAD_USERNAME_OR_PASSWORD,
    );
}

/// The CONNECT of a Mosquitto 2.0.11 bridge (`try_private` and `notifications` at their
/// defaults, `remote_clientid lamp-01`): protocol level 0x84, clean session, and a retained
/// QoS 1 will "0" on `$SYS/broker/connection/lamp-01/state`. Captured from a real bridge.
const MOSQUITTO_BRIDGE_CONNECT: &[u8] = b"\x10\x3c\x00\x04MQTT\x84\x2e\x00\x3c\x00\x07lamp-01\
    \x00\x24$SYS/broker/connection/lamp-01/state\x00\x010";

#[test]
fn a_mosquitto_bridge_connects_with_its_certificate_and_keeps_the_bridge_flag() {
    let peer = PeerCertificate {
        subject: Some("CN=lamp-01,O=Acme".into()),
        uri_san: None,
        dns_san: None,
    };
    // The bridge's will goes to its state topic: a PUBLISH the ACL must allow.
    let mut conn = Conn::with_peer(policy(), Some(peer.clone()));
    let out = assert_refused(
        &mut conn,
        V3,
        MOSQUITTO_BRIDGE_CONNECT,
        v3_connack::NOT_AUTHORIZED,
    );
    assert!(lines(&out).contains("will message"), "{}", lines(&out));

    let mut config = base_config();
    config["acl"]["rules"].as_array_mut().unwrap().push(json!(
        {"name": "bridge-state", "effect": "allow", "subjects": ["role:device"],
         "actions": ["write"], "mqtt": {"topic": "$SYS/broker/connection/%c/state"}}));
    let mut conn = Conn::with_peer(policy_from(config), Some(peer));
    let out = conn.client(MOSQUITTO_BRIDGE_CONNECT);
    assert!(out.close.is_none(), "{}", lines(&out));
    assert!(
        lines(&out).contains(r#"by="authenticated:clientcertificate bridge""#),
        "{}",
        lines(&out)
    );
    // Forwarded with the certificate's identity as user name, still at level 0x84.
    assert_forwarded_without_credentials(&out, &conn.session, V3, MOSQUITTO_BRIDGE_CONNECT);
    assert_eq!(&out.forward[2..9], b"\x00\x04MQTT\x84");
    let connack = encode_connack(V3, 0);
    assert_eq!(conn.broker(&connack).forward, connack);
    // Its notification, its topics out and in: checked as any client's.
    let state = publish(
        V3,
        "$SYS/broker/connection/lamp-01/state",
        QoS::AtLeastOnce,
        Some(1),
    );
    assert_eq!(conn.client(&state).forward, state);
    let out = conn.client(&publish(V3, "devices/lamp-02/state", QoS::AtMostOnce, None));
    assert!(out.forward.is_empty(), "{}", lines(&out));
    let sub = subscribe(V3, 2, &["devices/lamp-01/set", "devices/lamp-02/set"]);
    assert_eq!(
        conn.client(&sub).forward,
        subscribe(V3, 2, &["devices/lamp-01/set"])
    );
}

#[test]
fn anonymous_is_refused_unless_allowed() {
    let mut conn = Conn::new(policy());
    let connect = connect_packet(V3, "c1", None, None, None);
    assert_refused(&mut conn, V3, &connect, v3_connack::NOT_AUTHORIZED);
    let mut conn = Conn::new(policy());
    let connect = connect_packet(V5, "c1", None, None, None);
    assert_refused(&mut conn, V5, &connect, reason::NOT_AUTHORIZED);
    // A user name that is no token and has no password.
    let mut conn = Conn::new(policy());
    let connect = connect_packet(V5, "c1", Some("alice"), None, None);
    assert_refused(&mut conn, V5, &connect, reason::BAD_USER_NAME_OR_PASSWORD);

    let open = with(base_config(), "allow_anonymous", json!(true));
    let mut conn = Conn::new(policy_from(open));
    conn.open(V3, None, None);
    assert!(conn.session.identity().is_none());
    // ... and the ACL decides what anonymous clients do: no rule allows them anything here.
    let out = conn.client(&publish(V3, "devices/lamp-01/state", QoS::AtMostOnce, None));
    assert!(out.forward.is_empty());
}

#[test]
fn v5_enhanced_authentication_is_a_bad_authentication_method() {
    let mut conn = Conn::new(policy());
    let connect = encode(
        &Packet::Connect(Connect {
            version: V5,
            bridge: false,
            client_id: "c1".into(),
            clean_start: true,
            keep_alive: 60,
            username: None,
            password: None,
            will: None,
            properties: Properties(vec![crate::mqtt::Property::AuthenticationMethod(
                "SCRAM-SHA-1".into(),
            )]),
        }),
        V5,
    )
    .unwrap();
    assert_refused(&mut conn, V5, &connect, reason::BAD_AUTHENTICATION_METHOD);
}

#[test]
fn mqtt_3_1_gets_unacceptable_protocol_version() {
    let mut conn = Conn::new(policy());
    // mosquitto_pub -V mqttv31: protocol name MQIsdp, level 3.
    let connect = b"\x10\x12\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x04c1ab";
    let out = conn.client(connect);
    assert!(out.close.is_none());
    let harmless = crate::mqtt::decode_packet(&out.forward, V3).unwrap();
    assert!(matches!(harmless, Packet::Connect(c) if c.username.is_none()));
    let answer = conn.broker(&encode_connack(V3, 0));
    assert_eq!(answer.forward, vec![0x20, 0x02, 0x00, 0x01]);
}

#[test]
fn forbidden_will_refuses_the_connect() {
    let will = Will {
        topic: "devices/lamp-02/state".into(),
        payload: b"x".to_vec(),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: Properties::new(),
    };
    let mut conn = Conn::new(policy());
    let connect = connect_packet(V3, "c1", Some("lamp-01"), Some(b"k1"), Some(will));
    let out = assert_refused(&mut conn, V3, &connect, v3_connack::NOT_AUTHORIZED);
    assert!(lines(&out).contains("will message"), "{}", lines(&out));
}

#[test]
fn refusal_goes_to_the_stand_in_cluster_and_its_first_bytes_become_the_connack() {
    let mut conn = Conn::new(policy());
    let out = conn.client(&connect_packet(V3, "c1", None, None, None));
    assert!(!out.forward.is_empty());
    assert_eq!(out.refusal_cluster.as_deref(), Some("mqtt_acl_refusal"));
    // Nothing from upstream yet: nothing to answer.
    let none = conn.broker(&[]);
    assert!(none.forward.is_empty() && !none.close_after_write);
    // The stand-in's one packet (any bytes) becomes the CONNACK.
    let answer = conn.broker(&[0xD0, 0x00]);
    assert_eq!(answer.forward, encode_connack(V3, 0x05));
    assert!(answer.close_after_write);
}

#[test]
fn refusal_cluster_null_leaves_the_refusal_to_the_broker() {
    let config = with(base_config(), "refusal_cluster", Value::Null);
    let mut conn = Conn::new(policy_from(config));
    let out = conn.client(&connect_packet(V3, "c1", None, None, None));
    assert_eq!(out.refusal_cluster, None);
    let answer = conn.broker(&encode_connack(V3, 0));
    assert_eq!(answer.forward, encode_connack(V3, 0x05));
    for bad in [json!(""), json!("a b"), json!(3)] {
        let config = with(base_config(), "refusal_cluster", bad);
        let config: Result<MqttAclConfig, _> = serde_json::from_value(config);
        assert!(config.map_or(true, |c| MqttAcl::new(c).is_err()));
    }
}

// ------------------------------------------------------------------------------------------
// PUBLISH

#[test]
fn publish_allowed_and_denied_qos0_and_qos1() {
    let mut conn = Conn::new(policy());
    conn.open(V3, Some("lamp-01"), Some(b"k1"));
    let ok = publish(V3, "devices/lamp-01/state", QoS::AtMostOnce, None);
    let out = conn.client(&ok);
    assert_eq!(out.forward, ok);
    assert!(lines(&out).contains(r#"operation="mqtt PUBLISH devices/lamp-01/state""#));
    assert_eq!(out.decisions[0].counters, vec!["publish.allowed"]);

    // Another device's topic (ownership), a denied topic (ACL deny), an unknown one.
    for topic in [
        "devices/lamp-02/state",
        "devices/lamp-01/secret",
        "other/topic",
    ] {
        let out = conn.client(&publish(V3, topic, QoS::AtMostOnce, None));
        assert!(out.forward.is_empty(), "{topic}");
        assert!(out.close.is_none());
        assert!(lines(&out).contains("decision=deny"), "{}", lines(&out));
        assert_eq!(out.decisions[0].counters, vec!["publish.denied"]);
    }
    // QoS 1: a PINGREQ goes in its place, its PINGRESP comes back as the PUBACK.
    let out = conn.client(&publish(
        V3,
        "devices/lamp-02/state",
        QoS::AtLeastOnce,
        Some(9),
    ));
    assert_eq!(out.forward, vec![0xC0, 0x00]);
    assert_eq!(
        conn.broker(&[0xD0, 0x00]).forward,
        vec![0x40, 0x02, 0x00, 0x09]
    );
    // QoS 2 closes.
    let out = conn.client(&publish(
        V3,
        "devices/lamp-02/state",
        QoS::ExactlyOnce,
        Some(10),
    ));
    assert!(matches!(out.close, Some(CloseReason::Forbidden(_))));
    assert!(out.forward.is_empty());
}

#[test]
fn v5_denied_qos1_puback_says_not_authorized_and_client_pings_stay_in_order() {
    let mut conn = Conn::new(policy());
    conn.open(V5, Some("lamp-01"), Some(b"k1"));
    // The client's own PINGREQ, then a denied QoS 1 PUBLISH, in one read.
    let mut bytes = vec![0xC0, 0x00];
    bytes.extend(publish(
        V5,
        "devices/lamp-02/state",
        QoS::AtLeastOnce,
        Some(3),
    ));
    let out = conn.client(&bytes);
    assert_eq!(out.forward, vec![0xC0, 0x00, 0xC0, 0x00]);
    let back = conn.broker(&[0xD0, 0x00, 0xD0, 0x00]);
    let mut expected = vec![0xD0, 0x00];
    expected.extend(
        encode(
            &Packet::PubAck(PublishResponse {
                packet_id: 3,
                reason_code: reason::NOT_AUTHORIZED,
                properties: Properties::new(),
            }),
            V5,
        )
        .unwrap(),
    );
    assert_eq!(back.forward, expected);
    assert_eq!(&back.forward[2..], &[0x40, 0x03, 0x00, 0x03, 0x87]);
}

#[test]
fn on_forbidden_publish_close() {
    let config = with(base_config(), "on_forbidden_publish", json!("close"));
    let mut conn = Conn::new(policy_from(config));
    conn.open(V3, Some("lamp-01"), Some(b"k1"));
    let mut bytes = publish(V3, "devices/lamp-02/state", QoS::AtMostOnce, None);
    bytes.extend(publish(V3, "devices/lamp-01/state", QoS::AtMostOnce, None));
    let out = conn.client(&bytes);
    assert!(matches!(out.close, Some(CloseReason::Forbidden(_))));
    assert!(
        out.forward.is_empty(),
        "nothing after the forbidden packet goes on"
    );
    assert!(conn.session.is_closed());
}

#[test]
fn placeholders_u_and_c() {
    let mut conn = Conn::new(policy());
    let t = token("alice", NOW + 300);
    conn.open(V3, Some(&t), None);
    for (topic, allowed) in [
        ("users/alice/inbox", true),
        ("users/bob/inbox", false),
        ("clients/c1", true),
        ("clients/c2", false),
    ] {
        let out = conn.client(&publish(V3, topic, QoS::AtMostOnce, None));
        assert_eq!(!out.forward.is_empty(), allowed, "{topic}: {}", lines(&out));
    }
}

#[test]
fn dropped_publish_that_sets_a_topic_alias_forgets_it() {
    let mut conn = Conn::new(policy());
    conn.open(V5, Some("lamp-01"), Some(b"k1"));
    let aliased = |topic: &str| {
        encode(
            &Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtMostOnce,
                retain: false,
                topic: topic.into(),
                packet_id: None,
                properties: Properties(vec![crate::mqtt::Property::TopicAlias(1)]),
                payload: b"x".to_vec(),
            }),
            V5,
        )
        .unwrap()
    };
    let out = conn.client(&aliased("devices/lamp-02/state"));
    assert!(out.forward.is_empty());
    // Using the alias now would resolve to a topic the broker never saw: refused, closed.
    let out = conn.client(&aliased(""));
    assert!(
        matches!(out.close, Some(CloseReason::Malformed(_))),
        "{out:?}"
    );
}

// ------------------------------------------------------------------------------------------
// SUBSCRIBE

#[test]
fn subscribe_partly_refused_is_spliced() {
    let mut conn = Conn::new(policy());
    let t = token("bob", NOW + 300);
    conn.open(V3, Some(&t), None);
    // bob: read delegate of lamp-01; lamp-02 has no record; a wildcard device level spans all.
    let sub = subscribe(
        V3,
        5,
        &[
            "devices/lamp-01/state",
            "devices/lamp-02/state",
            "users/bob/#",
            "devices/+/state",
        ],
    );
    let out = conn.client(&sub);
    assert_eq!(
        out.forward,
        subscribe(V3, 5, &["devices/lamp-01/state", "users/bob/#"])
    );
    assert_eq!(out.decisions.len(), 4);
    assert_eq!(
        out.decisions
            .iter()
            .map(|d| d.is_allowed())
            .collect::<Vec<_>>(),
        vec![true, false, true, false]
    );
    let back = conn.broker(&encode_suback(V3, 5, &[1, 1]).unwrap());
    assert_eq!(
        back.forward,
        encode_suback(V3, 5, &[1, 0x80, 1, 0x80]).unwrap()
    );
    // bob may read lamp-01 but not write to it.
    let out = conn.client(&publish(V3, "devices/lamp-01/cmd", QoS::AtMostOnce, None));
    assert!(out.forward.is_empty(), "{}", lines(&out));
}

#[test]
fn subscribe_all_refused_uses_a_pingreq() {
    let mut conn = Conn::new(policy());
    conn.open(V5, Some("lamp-01"), Some(b"k1"));
    let out = conn.client(&subscribe(
        V5,
        8,
        &["devices/lamp-02/#", "devices/lamp-01/secret"],
    ));
    assert_eq!(out.forward, vec![0xC0, 0x00]);
    let back = conn.broker(&[0xD0, 0x00]);
    assert_eq!(back.forward, encode_suback(V5, 8, &[0x87, 0x87]).unwrap());
    // An allowed SUBSCRIBE afterwards goes through untouched, and its SUBACK too.
    let sub = subscribe(V5, 9, &["devices/lamp-01/state"]);
    assert_eq!(conn.client(&sub).forward, sub);
    let suback = encode_suback(V5, 9, &[1]).unwrap();
    assert_eq!(conn.broker(&suback).forward, suback);
}

#[test]
fn sys_topics_are_not_matched_by_hash() {
    // `ops` may read `#`: that is everything but $SYS.
    let mut config = base_config();
    config.as_object_mut().unwrap().remove("ownership");
    config["acl"] = json!({"rules": [{"name": "ops-all", "effect": "allow",
        "subjects": ["user:ops"], "actions": ["read"], "mqtt": {"topic": "#"}}]});
    let mut conn = Conn::new(policy_from(config));
    let t = token("ops", NOW + 300);
    conn.open(V3, Some(&t), None);
    let out = conn.client(&subscribe(V3, 1, &["#", "$SYS/#", "$SYS/broker/uptime"]));
    assert_eq!(out.forward, subscribe(V3, 1, &["#"]));
    let back = conn.broker(&encode_suback(V3, 1, &[1]).unwrap());
    assert_eq!(
        back.forward,
        encode_suback(V3, 1, &[1, 0x80, 0x80]).unwrap()
    );
}

#[test]
fn shared_subscriptions_are_checked_on_their_filter() {
    let mut conn = Conn::new(policy());
    conn.open(V5, Some("lamp-01"), Some(b"k1"));
    let out = conn.client(&subscribe(V5, 2, &["$share/g/devices/lamp-02/#"]));
    assert_eq!(out.forward, vec![0xC0, 0x00]);
    let sub = subscribe(V5, 3, &["$share/g/devices/lamp-01/state"]);
    assert_eq!(conn.client(&sub).forward, sub);
}

#[test]
fn suback_with_the_wrong_number_of_codes_closes() {
    let mut conn = Conn::new(policy());
    conn.open(V3, Some("lamp-01"), Some(b"k1"));
    conn.client(&subscribe(
        V3,
        4,
        &["devices/lamp-01/a", "devices/lamp-02/a"],
    ));
    let back = conn.broker(&encode_suback(V3, 4, &[0, 0]).unwrap());
    assert!(matches!(back.close, Some(CloseReason::Malformed(_))));
}

// ------------------------------------------------------------------------------------------
// Deliveries, ownership, shadow, expiry, malformed input

#[test]
fn deliveries_the_client_may_not_read() {
    let mut conn = Conn::new(policy());
    conn.open(V3, Some("lamp-01"), Some(b"k1"));
    let ok = publish(V3, "devices/lamp-01/cmd", QoS::AtLeastOnce, Some(1));
    assert_eq!(conn.broker(&ok).forward, ok);
    let out = conn.broker(&publish(V3, "devices/lamp-02/cmd", QoS::AtMostOnce, None));
    assert!(out.forward.is_empty() && out.close.is_none());
    assert_eq!(out.decisions[0].counters, vec!["deliver.denied"]);
    let out = conn.broker(&publish(
        V3,
        "devices/lamp-02/cmd",
        QoS::AtLeastOnce,
        Some(2),
    ));
    assert!(matches!(out.close, Some(CloseReason::Forbidden(_))));
}

#[test]
fn ownership_owner_delegate_device_and_template() {
    let p = policy();
    let alice = {
        let mut i = Identity::new(IdentityKind::Jwt, "alice");
        i.roles = vec![];
        i
    };
    let bob = Identity::new(IdentityKind::Jwt, "bob");
    let carol = Identity::new(IdentityKind::Jwt, "carol");
    let lamp1 = Identity::new(IdentityKind::DeviceKey, "lamp-01");
    let check = |id: &Identity, topic: &str, access| {
        p.check_topic(Some(id), "c", topic, access).is_allowed()
    };
    use TopicAccess::{Read, Write};
    assert!(check(&alice, "devices/lamp-01/cmd", Write));
    assert!(check(&alice, "devices/lamp-01/state/+", Read));
    // The ACL's deny rule `devices/+/secret` touches a whole-device wildcard: refused.
    assert!(!check(&alice, "devices/lamp-01/#", Read));
    assert!(check(&bob, "devices/lamp-01/state", Read));
    assert!(!check(&bob, "devices/lamp-01/cmd", Write));
    assert!(!check(&carol, "devices/lamp-01/state", Read));
    assert!(!check(&alice, "devices/lamp-02/state", Read), "no record");
    assert!(check(&lamp1, "devices/lamp-01/state", Write));
    assert!(!check(&lamp1, "devices/lamp-02/state", Write));
    assert!(!check(&alice, "devices/#", Read), "spans devices");
    assert!(!check(&alice, "+/lamp-01/state", Read), "spans devices");
    // `devices` itself is matched by `devices/{device}/#`? No: it has no device level.
    assert!(check(&alice, "users/alice/x", Write), "not a device topic");
    // Admins bypass ownership, not the ACL.
    let config = with(
        base_config(),
        "ownership",
        json!({"topic_template": "devices/{device}/#", "admin_roles": ["admin"]}),
    );
    let p = policy_from(config);
    let mut admin = Identity::new(IdentityKind::Jwt, "root");
    admin.roles = vec!["admin".into()];
    assert!(p
        .check_topic(Some(&admin), "c", "devices/+/state", Read)
        .is_allowed());
    assert!(!p
        .check_topic(Some(&admin), "c", "devices/lamp-01/secret", Read)
        .is_allowed());
}

#[test]
fn shadow_mode_lets_everything_through_and_counts() {
    let config = with(base_config(), "mode", json!("shadow"));
    let mut conn = Conn::new(policy_from(config));
    let connect = connect_packet(V3, "c1", None, None, None);
    let out = conn.client(&connect);
    assert_eq!(out.forward, connect);
    assert!(lines(&out).contains("decision=shadow-deny"));
    assert_eq!(
        out.decisions[0].counters,
        vec!["connect.refused", "shadow.denied"]
    );
    conn.broker(&encode_connack(V3, 0));
    let p = publish(V3, "devices/lamp-02/state", QoS::AtLeastOnce, Some(1));
    let out = conn.client(&p);
    assert_eq!(out.forward, p);
    assert!(out.decisions[0].counters.contains(&"shadow.denied"));
    let s = subscribe(V3, 2, &["devices/lamp-01/x", "devices/lamp-02/x"]);
    assert_eq!(conn.client(&s).forward, s);
    let suback = encode_suback(V3, 2, &[1, 1]).unwrap();
    assert_eq!(conn.broker(&suback).forward, suback);
}

#[test]
fn expired_token_closes_the_connection() {
    let mut conn = Conn::new(policy());
    let t = token("alice", NOW + 60);
    conn.open(V3, Some(&t), None);
    conn.now = NOW + 59;
    let env = Env {
        policy: &conn.policy,
        now: conn.now,
    };
    assert!(conn.session.check_expiry(&env).is_none());
    conn.now = NOW + 60;
    let env = Env {
        policy: &conn.policy,
        now: conn.now,
    };
    let out = conn.session.check_expiry(&env).unwrap();
    assert_eq!(out.close, Some(CloseReason::Expired));
    assert_eq!(
        out.close.as_ref().map(CloseReason::metric),
        Some("closed.expired")
    );
    assert!(out.decisions[0].line.to_string().contains("decision=deny"));
    // And a packet after expiry is not forwarded.
    let mut conn = Conn::new(policy());
    conn.open(V3, Some(&t), None);
    conn.now = NOW + 61;
    let out = conn.client(&publish(V3, "users/alice/x", QoS::AtMostOnce, None));
    assert_eq!(out.close, Some(CloseReason::Expired));
    assert!(out.forward.is_empty());
}

#[test]
fn malformed_input_closes_and_nothing_after_it_is_forwarded() {
    let mut conn = Conn::new(policy());
    conn.open(V3, Some("lamp-01"), Some(b"k1"));
    let mut bytes = publish(V3, "devices/lamp-01/state", QoS::AtMostOnce, None);
    bytes.extend([0x30, 0x03, 0x00, 0x01, b'#']); // a wildcard in a PUBLISH topic
    let out = conn.client(&bytes);
    // The allowed PUBLISH read before the bad packet still goes on; the close follows.
    assert_eq!(
        out.forward,
        publish(V3, "devices/lamp-01/state", QoS::AtMostOnce, None)
    );
    assert!(out.close.is_none() && out.close_after_write);
    assert!(matches!(
        conn.session.closing(),
        Some(CloseReason::Malformed(_))
    ));
    let next = conn.client(&publish(V3, "devices/lamp-01/state", QoS::AtMostOnce, None));
    assert!(matches!(next.close, Some(CloseReason::Malformed(_))));
    assert!(next.forward.is_empty());
    // A bad packet first: closed at once, nothing forwarded.
    let mut conn = Conn::new(policy());
    conn.open(V3, Some("lamp-01"), Some(b"k1"));
    let out = conn.client(&[0x30, 0x03, 0x00, 0x01, b'#']);
    assert!(matches!(out.close, Some(CloseReason::Malformed(_))));
    assert!(out.forward.is_empty());
    // Before CONNECT: never forwarded.
    let mut conn = Conn::new(policy());
    let out = conn.client(&publish(V3, "devices/lamp-01/state", QoS::AtMostOnce, None));
    assert!(out.close.is_some() && out.forward.is_empty());
    // The broker speaking first.
    let mut conn = Conn::new(policy());
    assert!(conn.broker(&encode_connack(V3, 0)).close.is_some());
}

/// An UNSUBSCRIBE as the encoder writes it.
fn unsubscribe(version: ProtocolVersion, packet_id: u16, filters: &[&str]) -> Vec<u8> {
    encode(
        &Packet::Unsubscribe(crate::mqtt::Unsubscribe {
            packet_id,
            properties: Properties::new(),
            filters: filters.iter().map(|f| (*f).to_owned()).collect(),
        }),
        version,
    )
    .unwrap()
}

#[test]
fn a_valid_unsubscribe_passes_without_an_acl_check() {
    // Filters the ACL would refuse for reading: an UNSUBSCRIBE only takes access away.
    for version in [V3, V5] {
        let mut conn = Conn::new(policy());
        conn.open(version, Some("lamp-01"), Some(b"k1"));
        let packet = unsubscribe(
            version,
            3,
            &[
                "devices/lamp-02/#",
                "#",
                "$share/g/devices/+/secret",
                "x/+/y",
            ],
        );
        let out = conn.client(&packet);
        assert_eq!(out.forward, packet);
        assert!(out.close.is_none() && !out.close_after_write);
        assert!(out.decisions.is_empty(), "{}", lines(&out));
        // The broker's UNSUBACK goes back as it is.
        let unsuback = encode(
            &Packet::UnsubAck(crate::mqtt::UnsubAck {
                packet_id: 3,
                properties: Properties::new(),
                codes: if version == V5 {
                    vec![0x11; 4]
                } else {
                    Vec::new()
                },
            }),
            version,
        )
        .unwrap();
        assert_eq!(conn.broker(&unsuback).forward, unsuback);
    }
    // With an HTTP backend: not asked (Mosquitto does not ask its auth plugin either).
    let mut conn = Conn::new(policy_from(backend_config(json!({}))));
    let ask = conn
        .client(&connect_packet(V3, "c1", Some("u1"), None, None))
        .asks
        .remove(0);
    conn.answer(&ask, Some(200));
    conn.broker(&encode_connack(V3, 0));
    let packet = unsubscribe(V3, 4, &["lamps/7/#"]);
    let out = conn.client(&packet);
    assert!(out.asks.is_empty(), "{:?}", out.asks);
    assert_eq!(out.forward, packet);
}

#[test]
fn a_malformed_unsubscribe_closes_and_nothing_after_it_is_forwarded() {
    let cases: [(&str, ProtocolVersion, &[u8]); 10] = [
        ("flags 0000, not 0010", V3, b"\xa0\x05\x00\x03\x00\x01a"),
        ("packet identifier 0", V3, b"\xa2\x05\x00\x00\x00\x01a"),
        ("no topic filter", V3, b"\xa2\x02\x00\x03"),
        ("an empty filter", V3, b"\xa2\x04\x00\x03\x00\x00"),
        ("not UTF-8", V3, b"\xa2\x06\x00\x03\x00\x02\xc3\x28"),
        ("U+0000", V3, b"\xa2\x06\x00\x03\x00\x02a\x00"),
        ("'#' not last", V3, b"\xa2\x08\x00\x03\x00\x04#/ab"),
        ("'+' inside a level", V3, b"\xa2\x06\x00\x03\x00\x02a+"),
        (
            "a filter longer than the packet",
            V3,
            b"\xa2\x05\x00\x03\x00\x09a",
        ),
        // 0x01 (payload format) is not an UNSUBSCRIBE property.
        (
            "a property UNSUBSCRIBE may not carry",
            V5,
            b"\xa2\x08\x00\x03\x02\x01\x01\x00\x01a",
        ),
    ];
    for (why, version, bad) in cases {
        let mut conn = Conn::new(policy());
        conn.open(version, Some("lamp-01"), Some(b"k1"));
        let out = conn.client(bad);
        assert!(
            matches!(out.close, Some(CloseReason::Malformed(_))),
            "{why}: {out:?}"
        );
        assert!(out.forward.is_empty(), "{why}");
        let next = conn.client(&publish(
            version,
            "devices/lamp-01/state",
            QoS::AtMostOnce,
            None,
        ));
        assert!(next.forward.is_empty() && next.close.is_some(), "{why}");
    }
    // Over the packet limit: refused from its fixed header.
    let mut conn = Conn::new(policy_from(with(
        base_config(),
        "max_packet_bytes",
        json!(64),
    )));
    conn.open(V3, Some("lamp-01"), Some(b"k1"));
    let long = "a".repeat(100);
    let out = conn.client(&unsubscribe(V3, 3, &[&long]));
    assert!(out.close.is_some() && out.forward.is_empty(), "{out:?}");
}

#[test]
fn packets_split_across_reads() {
    let mut conn = Conn::new(policy());
    let connect = connect_packet(V3, "c1", Some("lamp-01"), Some(b"k1"), None);
    let mut stream = connect.clone();
    let p1 = publish(V3, "devices/lamp-01/state", QoS::AtMostOnce, None);
    let p2 = publish(V3, "devices/lamp-02/state", QoS::AtMostOnce, None);
    stream.extend(&p1);
    stream.extend(&p2);
    stream.extend(&p1);
    let mut forwarded = Vec::new();
    for byte in &stream {
        let out = conn.client(std::slice::from_ref(byte));
        assert!(out.close.is_none());
        forwarded.extend(out.forward);
    }
    // The CONNECT without its key, then the allowed PUBLISHes.
    let mut expected = connect_packet(V3, "c1", Some("lamp-01"), None, None);
    expected.extend(&p1);
    expected.extend(&p1);
    assert_eq!(forwarded, expected);
}

// ------------------------------------------------------------------------------------------
// Configuration

#[test]
fn bad_configuration_says_what_is_wrong() {
    let err = |config: Value| MqttAcl::from_json(config.to_string().as_bytes()).unwrap_err();
    let ngsi = with(
        base_config(),
        "acl",
        json!({"rules": [{"name": "n", "effect": "allow", "subjects": ["anyone"],
                          "actions": ["read"], "ngsi": {"service": "*", "service_path": "/#"}}]}),
    );
    assert!(err(ngsi).contains("NGSI rules belong to entity-acl"));
    let both = with(base_config(), "acl_file", json!("topic read a/b"));
    assert!(err(both).contains("not both"));
    let mut none = base_config();
    none.as_object_mut().unwrap().remove("acl");
    assert!(err(none).contains("give acl"));
    assert!(err(with(base_config(), "typo", json!(1))).contains("unknown field"));
    let template = with(
        base_config(),
        "ownership",
        json!({"topic_template": "devices/+/{device}"}),
    );
    assert!(err(template).contains("topic_template"));
    let delegation = with(
        base_config(),
        "ownership",
        json!({"topic_template": "devices/{device}/#",
               "devices": {"d": {"owner": "a", "delegations": [{"user": "b", "access": "all"}]}}}),
    );
    assert!(err(delegation).contains("ownership.devices.d.delegations[0]"));
    let acl_file = with(base_config(), "acl", Value::Null);
    let acl_file = with(acl_file, "acl_file", json!("bogus line"));
    assert!(err(acl_file).contains("acl_file line 1"));
    let mut no_auth = base_config();
    for key in ["jwt_providers", "device_keys", "mtls"] {
        no_auth.as_object_mut().unwrap().remove(key);
    }
    assert!(err(no_auth).contains("at least one of"));
}

#[test]
fn acl_file_is_imported() {
    let mut config = base_config();
    config.as_object_mut().unwrap().remove("acl");
    config.as_object_mut().unwrap().remove("ownership");
    config["acl_file"] = json!("user alice\ntopic readwrite lamps/#\npattern write clients/%c\n");
    let mut conn = Conn::new(policy_from(config));
    let t = token("alice", NOW + 300);
    conn.open(V3, Some(&t), None);
    for (topic, allowed) in [("lamps/1", true), ("clients/c1", true), ("other", false)] {
        let out = conn.client(&publish(V3, topic, QoS::AtMostOnce, None));
        assert_eq!(!out.forward.is_empty(), allowed, "{topic}");
    }
}

#[test]
fn remote_keys_missing_or_rotated_mean_server_unavailable_and_a_fetch() {
    use jwt_simple::prelude::{Claims, Duration, RS256KeyPair, RSAKeyPairLike};
    const REMOTE: &str = "https://keycloak.example/realms/city";
    let mut config = base_config();
    config["jwt_providers"].as_array_mut().unwrap().push(
        json!({"issuer": REMOTE, "algorithms": ["RS256"], "allow_any_audience": true,
                     "remote": {"cluster": "idp", "path": "/jwks", "authority": "idp"}}),
    );
    let key = RS256KeyPair::generate(2048).unwrap().with_key_id("k1");
    let mut claims = Claims::create(Duration::from_secs(300))
        .with_issuer(REMOTE)
        .with_subject("alice");
    claims.issued_at = Some(Duration::from_secs(NOW - 10));
    claims.invalid_before = Some(Duration::from_secs(NOW - 10));
    claims.expires_at = Some(Duration::from_secs(NOW + 300));
    let t = key.sign(claims).unwrap();
    // No keys fetched yet: server unavailable (0x03), and the filter is asked to fetch them.
    let mut conn = Conn::new(policy_from(config.clone()));
    let connect = connect_packet(V3, "c1", Some(&t), None, None);
    let out = assert_refused(&mut conn, V3, &connect, 0x03);
    assert_eq!(out.keys_wanted.as_deref(), Some(REMOTE));
    // A token of an inline-key issuer never asks for remote keys.
    let mut conn = Conn::new(policy_from(config.clone()));
    let bad = token_with(
        json!({"iss": ISS, "sub": "a", "exp": NOW + 300}),
        b"another-secret-another-secret-32",
    );
    let out = assert_refused(
        &mut conn,
        V3,
        &connect_packet(V3, "c1", Some(&bad), None, None),
        0x04,
    );
    assert_eq!(out.keys_wanted, None);
    // Once the keys are installed, the same token connects.
    let c = key.public_key().to_components();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwks = json!({"keys": [{"kty": "RSA", "kid": "k1", "n": b64(&c.n), "e": b64(&c.e)}]});
    let mut policy = policy_from(config);
    policy
        .jwt_mut()
        .unwrap()
        .provider_mut(REMOTE)
        .unwrap()
        .set_remote_keys(
            crate::jwt::KeySet::from_jwks_json(&jwks.to_string()).unwrap(),
            NOW,
        )
        .unwrap();
    let mut conn = Conn::new(policy);
    conn.open(V3, Some(&t), None);
    assert_eq!(conn.session.identity().unwrap().subject, "alice");
}

#[test]
fn denied_huge_topics_and_client_ids_log_bounded_lines() {
    // 200 denials of a 60 KB topic once wrote 36 MB of log: every logged client value is cut.
    let config = with(base_config(), "on_forbidden_publish", json!("close"));
    let mut conn = Conn::new(policy_from(config));
    let client_id = format!("lamp-01-{}", "c".repeat(60_000));
    let connect = connect_packet(V3, &client_id, Some("lamp-01"), Some(b"k1"), None);
    assert!(conn.client(&connect).close.is_none());
    conn.broker(&encode_connack(V3, 0));
    let topic = format!("devices/lamp-02/{}", "t".repeat(60_000));
    let out = conn.client(&publish(V3, &topic, QoS::AtMostOnce, None));
    assert!(lines(&out).contains("decision=deny"), "{}", lines(&out));
    for decided in &out.decisions {
        let line = decided.line.to_string();
        assert!(line.len() < 4096, "{} bytes", line.len());
    }
    let Some(CloseReason::Forbidden(why)) = &out.close else {
        panic!("not closed: {:?}", out.close);
    };
    assert!(why.len() < 1024, "{} bytes", why.len());
}

#[test]
fn client_ids_are_bound_to_the_identity() {
    // The default patterns (%u, %u-*): base_config without its extra "c1".
    let mut config = base_config();
    config.as_object_mut().unwrap().remove("client_ids");
    let policy = policy_from(config);
    for id in ["lamp-01", "lamp-01-sensor", ""] {
        let mut conn = Conn::new(policy.clone());
        let out = conn.client(&connect_packet(V3, id, Some("lamp-01"), Some(b"k1"), None));
        assert!(
            lines(&out).contains("decision=allow"),
            "{id}: {}",
            lines(&out)
        );
        assert!(!out.forward.is_empty());
    }
    // Another device's id (the broker would drop that device and its session), or one that
    // only starts like ours: refused, 0x02 identifier rejected / v5 0x85.
    for (version, id, code) in [
        (V3, "lamp-02", 0x02),
        (V5, "lamp-02", 0x85),
        (V3, "lamp-012", 0x02),
    ] {
        let mut conn = Conn::new(policy.clone());
        let connect = connect_packet(version, id, Some("lamp-01"), Some(b"k1"), None);
        let out = assert_refused(&mut conn, version, &connect, code);
        assert!(lines(&out).contains("client_ids"), "{}", lines(&out));
    }
    // Anonymous clients match only patterns without %u.
    let anonymous = with(base_config(), "allow_anonymous", json!(true));
    let anonymous = with(anonymous, "client_ids", json!(["%u", "anon-*"]));
    let mut conn = Conn::new(policy_from(anonymous.clone()));
    let out = conn.client(&connect_packet(V3, "anon-7", None, None, None));
    assert!(lines(&out).contains("decision=allow"), "{}", lines(&out));
    let mut conn = Conn::new(policy_from(anonymous));
    let connect = connect_packet(V3, "lamp-01", None, None, None);
    assert_refused(&mut conn, V3, &connect, 0x02);
    // Patterns that say nothing sensible are refused.
    for bad in ["", "a*b", "%c-*", "**"] {
        let config = with(base_config(), "client_ids", json!([bad]));
        let config: MqttAclConfig = serde_json::from_value(config).unwrap();
        assert!(MqttAcl::new(config).is_err(), "{bad:?}");
    }
}

/// The configuration example of filters/mqtt-acl/README.md, with real keys in place of its
/// placeholders.
fn readme_example() -> MqttAcl {
    let readme = include_str!("../../../mqtt-acl/README.md");
    let start = readme.find("```json\n").unwrap() + "```json\n".len();
    let end = start + readme[start..].find("\n```").unwrap();
    let mut config: Value = serde_json::from_str(&readme[start..end]).unwrap();
    let base = base_config();
    config["jwt_providers"] = base["jwt_providers"].clone();
    config["device_keys"] = base["device_keys"].clone();
    policy_from(config)
}

#[test]
fn the_readme_example_lets_owners_and_devices_use_their_own_tree() {
    // Its deny rule once covered reads inside devices/+/: a wildcard subscription touched by a
    // deny rule is refused whole, so nobody could subscribe to devices/<own id>/#.
    let policy = readme_example();
    let device = Identity::new(IdentityKind::DeviceKey, "lamp-01");
    let owner = Identity::new(IdentityKind::Jwt, "alice");
    let delegate = Identity::new(IdentityKind::Jwt, "bob");
    let check = |who: &Identity, topic: &str, access| {
        policy
            .check_topic(Some(who), "c1", topic, access)
            .is_allowed()
    };
    for who in [&device, &owner, &delegate] {
        assert!(
            check(who, "devices/lamp-01/#", TopicAccess::Read),
            "{}",
            who.subject
        );
    }
    assert!(check(&device, "devices/lamp-01/state", TopicAccess::Write));
    assert!(check(&owner, "devices/lamp-01/cmd", TopicAccess::Write));
    // What the rules still refuse.
    assert!(!check(
        &device,
        "devices/lamp-01/config",
        TopicAccess::Write
    ));
    assert!(!check(&delegate, "devices/lamp-01/cmd", TopicAccess::Write));
    assert!(!check(&device, "devices/lamp-02/#", TopicAccess::Read));
    assert!(!check(&owner, "devices/+/state", TopicAccess::Read));
}

#[test]
fn a_client_without_a_complete_connect_is_closed_after_connect_timeout_secs() {
    let mut conn = Conn::new(policy());
    conn.session.set_opened_at(NOW);
    let connect = connect_packet(V3, "c1", Some("lamp-01"), Some(b"k1"), None);
    assert!(conn.client(&connect[..5]).forward.is_empty());
    let env = |now| Env {
        policy: &conn.policy,
        now,
    };
    assert_eq!(conn.session.check_connect_timeout(&env(NOW + 9)), None);
    let closed = conn.session.check_connect_timeout(&env(NOW + 10));
    assert!(
        matches!(closed, Some(CloseReason::Malformed(_))),
        "{closed:?}"
    );
    // A decided CONNECT is not timed out.
    let mut conn = Conn::new(policy());
    conn.session.set_opened_at(NOW);
    conn.open(V3, Some("lamp-01"), Some(b"k1"));
    let env = Env {
        policy: &conn.policy,
        now: NOW + 100,
    };
    assert_eq!(conn.session.check_connect_timeout(&env), None);
}

// ------------------------------------------------------------------------------------------
// The HTTP backend (mosquitto-go-auth's protocol)
// ------------------------------------------------------------------------------------------

fn backend_config(local: Value) -> Value {
    let mut config = json!({
        "client_ids": ["*"],
        "http_backend": {"cluster": "webapp", "authority": "webapp.internal",
                         "user": {"path": "/auth"}, "acl": {"path": "/acl"},
                         "cache": {"allow_ttl_secs": 60, "deny_ttl_secs": 5}}
    });
    for (k, v) in local.as_object().unwrap() {
        config[k] = v.clone();
    }
    config
}

impl Conn {
    fn answer(&mut self, ask: &Ask, status: Option<u32>) -> Output {
        let env = Env {
            policy: &self.policy,
            now: self.now,
        };
        let answer = BackendAnswer {
            status,
            body: Vec::new(),
        };
        self.session.on_backend_answer(ask.id, &answer, &env)
    }
}

fn backend_request(ask: &Ask) -> &BackendRequest {
    match &ask.request {
        AskRequest::Backend(request) => request,
        other => panic!("not a backend request: {other:?}"),
    }
}

fn ask_body(ask: &Ask) -> Value {
    serde_json::from_slice(&backend_request(ask).body).unwrap()
}

#[test]
fn backend_user_check_authenticates_an_opaque_token_and_acl_decides_topics() {
    let mut conn = Conn::new(policy_from(backend_config(json!({}))));
    let connect = connect_packet(V3, "browser-1", Some("3f2a9c-session"), None, None);
    let out = conn.client(&connect);
    assert!(
        out.forward.is_empty() && out.decisions.is_empty(),
        "{out:?}"
    );
    assert!(conn.session.awaiting_connect() && conn.session.waiting_for_backend());
    assert_eq!(out.asks.len(), 1);
    assert_eq!(backend_request(&out.asks[0]).path, "/auth");
    assert_eq!(
        ask_body(&out.asks[0]),
        json!({"username": "3f2a9c-session", "password": "", "clientid": "browser-1"})
    );
    let out = conn.answer(&out.asks[0].clone(), Some(200));
    assert!(!conn.session.waiting_for_backend());
    assert_forwarded_without_credentials(&out, &conn.session, V3, &connect);
    assert!(
        lines(&out).contains("authenticated:httpbackend"),
        "{}",
        lines(&out)
    );
    conn.broker(&encode_connack(V3, 0));

    // A PUBLISH waits for the acl answer (acc 2); a 403 drops it.
    let out = conn.client(&publish(V3, "lamps/7/set", QoS::AtMostOnce, None));
    assert!(out.forward.is_empty());
    assert_eq!(
        ask_body(&out.asks[0]),
        json!({"username": "3f2a9c-session", "clientid": "browser-1", "topic": "lamps/7/set",
               "acc": 2})
    );
    let out = conn.answer(&out.asks[0].clone(), Some(403));
    assert!(out.forward.is_empty());
    assert!(
        lines(&out).contains("the auth backend denied"),
        "{}",
        lines(&out)
    );
    // Within the deny TTL the cache answers: no second ask.
    let out = conn.client(&publish(V3, "lamps/7/set", QoS::AtMostOnce, None));
    assert!(out.asks.is_empty() && out.forward.is_empty(), "{out:?}");
    // After it, the backend is asked again; a 200 lets the PUBLISH through.
    conn.now += 5;
    let packet = publish(V3, "lamps/7/set", QoS::AtMostOnce, None);
    let out = conn.client(&packet);
    assert_eq!(out.asks.len(), 1);
    let out = conn.answer(&out.asks[0].clone(), Some(200));
    assert_eq!(out.forward, packet);
    let out = conn.client(&packet);
    assert!(out.asks.is_empty());
    assert_eq!(out.forward, packet, "the allow is cached");
}

#[test]
fn packets_after_one_that_waits_for_the_backend_keep_their_order() {
    let mut conn = Conn::new(policy_from(backend_config(json!({}))));
    let connect = connect_packet(V3, "c1", Some("u1"), None, None);
    let ask = conn.client(&connect).asks.remove(0);
    conn.answer(&ask, Some(200));
    conn.broker(&encode_connack(V3, 0));
    let first = publish(V3, "a/1", QoS::AtMostOnce, None);
    let second = publish(V3, "a/2", QoS::AtMostOnce, None);
    let ping = [0xC0, 0x00];
    let out = conn.client(&[first.clone(), second.clone(), ping.to_vec()].concat());
    assert!(out.forward.is_empty());
    assert_eq!(
        out.asks.len(),
        1,
        "only the first packet is asked about yet"
    );
    let out = conn.answer(&out.asks[0].clone(), Some(200));
    assert_eq!(out.forward, first);
    assert_eq!(ask_body(&out.asks[0])["topic"], "a/2");
    // More data while waiting is queued behind.
    let third = publish(V3, "a/1", QoS::AtMostOnce, None);
    let queued = conn.client(&third);
    assert!(queued.forward.is_empty() && queued.asks.is_empty());
    let out = conn.answer(&out.asks[0].clone(), Some(200));
    assert_eq!(out.forward, [second, ping.to_vec(), third].concat());
    assert!(out.asks.is_empty());
}

#[test]
fn backend_down_refuses_the_connect_as_server_unavailable_and_is_not_cached() {
    let policy = policy_from(backend_config(json!({})));
    for (version, code) in [(V3, 0x03), (V5, reason::SERVER_UNAVAILABLE)] {
        for status in [None, Some(503)] {
            let mut conn = Conn::new(policy.clone());
            let connect = connect_packet(version, "c1", Some("u1"), Some(b"pw"), None);
            let out = conn.client(&connect);
            assert_eq!(out.asks.len(), 1, "asked again: failures are not cached");
            let out = conn.answer(&out.asks[0].clone(), status);
            let Packet::Connect(harmless) =
                crate::mqtt::decode_packet(&out.forward, version).unwrap()
            else {
                panic!("not a CONNECT")
            };
            assert_eq!(harmless.client_id, "mqtt-acl-refused-7");
            let out = conn.broker(&encode_connack(version, 0));
            assert_eq!(out.forward, encode_connack(version, code));
        }
    }
}

#[test]
fn a_backend_refusal_of_its_own_credential_is_a_bad_password() {
    let mut conn = Conn::new(policy_from(backend_config(json!({}))));
    let connect = connect_packet(V3, "c1", Some("alice"), Some(b"wrong"), None);
    let out = conn.client(&connect);
    assert_eq!(ask_body(&out.asks[0])["password"], "wrong");
    conn.answer(&out.asks[0].clone(), Some(401));
    let out = conn.broker(&encode_connack(V3, 0));
    assert_eq!(
        out.forward,
        encode_connack(V3, v3_connack::BAD_USERNAME_OR_PASSWORD)
    );
}

#[test]
fn a_locally_verified_identity_is_asked_with_a_blank_password_and_both_must_allow() {
    let local = json!({"device_keys": {"devices": {"lamp-01": {"key_sha256": [sha("k1")]}}},
                       "acl": {"rules": [{"name": "all", "effect": "allow",
                                          "subjects": ["authenticated"], "actions": ["*"],
                                          "mqtt": {"topic": "#"}}]}});
    let policy = policy_from(backend_config(local));
    // A wrong key is refused locally: the backend is never asked.
    let mut conn = Conn::new(policy.clone());
    let out = conn.client(&connect_packet(
        V3,
        "lamp-01",
        Some("lamp-01"),
        Some(b"bad"),
        None,
    ));
    assert!(out.asks.is_empty());
    assert_eq!(
        conn.broker(&encode_connack(V3, 0)).forward,
        encode_connack(V3, v3_connack::BAD_USERNAME_OR_PASSWORD)
    );
    // The right key: the backend is asked about lamp-01 without the key; its 403 refuses.
    let mut conn = Conn::new(policy);
    let out = conn.client(&connect_packet(
        V3,
        "lamp-01",
        Some("lamp-01"),
        Some(b"k1"),
        None,
    ));
    assert_eq!(
        ask_body(&out.asks[0]),
        json!({"username": "lamp-01", "password": "", "clientid": "lamp-01"})
    );
    conn.answer(&out.asks[0].clone(), Some(403));
    assert_eq!(
        conn.broker(&encode_connack(V3, 0)).forward,
        encode_connack(V3, v3_connack::NOT_AUTHORIZED)
    );
}

#[test]
fn a_local_deny_wins_and_the_backend_is_not_asked() {
    let local = json!({"allow_anonymous": true, "client_ids": ["*"],
                       "acl": {"rules": [
                           {"name": "all", "effect": "allow", "subjects": ["anyone"],
                            "actions": ["*"], "mqtt": {"topic": "#"}},
                           {"name": "no-secret", "effect": "deny", "subjects": ["anyone"],
                            "actions": ["*"], "mqtt": {"topic": "secret/#"}}]}});
    let mut config = backend_config(local);
    config["http_backend"]
        .as_object_mut()
        .unwrap()
        .remove("user");
    let mut conn = Conn::new(policy_from(config));
    let out = conn.client(&connect_packet(V3, "anon", None, None, None));
    assert!(out.asks.is_empty(), "anonymous: no user check");
    conn.broker(&encode_connack(V3, 0));
    let out = conn.client(&publish(V3, "secret/x", QoS::AtMostOnce, None));
    assert!(out.asks.is_empty() && out.forward.is_empty());
    // A topic the local rules allow is asked about (as the anonymous user "").
    let out = conn.client(&publish(V3, "open/x", QoS::AtMostOnce, None));
    assert_eq!(
        ask_body(&out.asks[0]),
        json!({"username": "", "clientid": "anon", "topic": "open/x", "acc": 2})
    );
}

#[test]
fn a_superuser_is_not_asked_about_topics() {
    let mut config = backend_config(json!({}));
    config["http_backend"]["superuser"] = json!({"path": "/superuser"});
    let mut conn = Conn::new(policy_from(config));
    let out = conn.client(&connect_packet(V3, "c1", Some("admin"), Some(b"pw"), None));
    assert_eq!(out.asks.len(), 2, "user and superuser at once");
    let paths: Vec<&str> = out
        .asks
        .iter()
        .map(|a| backend_request(a).path.as_str())
        .collect();
    assert_eq!(paths, ["/auth", "/superuser"]);
    assert_eq!(ask_body(&out.asks[1]), json!({"username": "admin"}));
    assert!(conn
        .answer(&out.asks[0].clone(), Some(200))
        .forward
        .is_empty());
    let out = conn.answer(&out.asks[1].clone(), Some(200));
    assert!(lines(&out).contains("backend:superuser"), "{}", lines(&out));
    conn.broker(&encode_connack(V3, 0));
    let packet = publish(V3, "any/topic", QoS::AtMostOnce, None);
    let out = conn.client(&packet);
    assert!(out.asks.is_empty());
    assert_eq!(out.forward, packet);
}

#[test]
fn subscriptions_the_backend_allowed_cover_deliveries() {
    let mut conn = Conn::new(policy_from(backend_config(json!({}))));
    let ask = conn
        .client(&connect_packet(V3, "c1", Some("u1"), None, None))
        .asks
        .remove(0);
    conn.answer(&ask, Some(200));
    conn.broker(&encode_connack(V3, 0));
    let sub = subscribe(V3, 1, &["lamps/7/#", "lamps/8/#"]);
    let out = conn.client(&sub);
    assert_eq!(out.asks.len(), 2);
    assert_eq!(
        ask_body(&out.asks[0])["acc"],
        4,
        "Mosquitto's MOSQ_ACL_SUBSCRIBE"
    );
    conn.answer(&out.asks[0].clone(), Some(200));
    let out = conn.answer(&out.asks[1].clone(), Some(403));
    assert_eq!(out.forward, subscribe(V3, 1, &["lamps/7/#"]));
    let allowed = publish(V3, "lamps/7/state", QoS::AtMostOnce, None);
    assert_eq!(conn.broker(&allowed).forward, allowed);
    let other = publish(V3, "lamps/8/state", QoS::AtMostOnce, None);
    let out = conn.broker(&other);
    assert!(
        out.forward.is_empty(),
        "no subscription the backend allowed covers it"
    );
    assert!(out.close.is_none());
}

#[test]
fn form_params_and_subscribe_acc_1_as_mosquitto_auth_plug() {
    let mut config = backend_config(json!({}));
    config["http_backend"]["params_mode"] = json!("form");
    config["http_backend"]["subscribe_acc"] = json!(1);
    let mut conn = Conn::new(policy_from(config));
    let out = conn.client(&connect_packet(V3, "c1", Some("u 1"), Some(b"p&w"), None));
    assert_eq!(
        String::from_utf8(backend_request(&out.asks[0]).body.clone()).unwrap(),
        "username=u+1&password=p%26w&clientid=c1"
    );
    conn.answer(&out.asks[0].clone(), Some(200));
    conn.broker(&encode_connack(V3, 0));
    let out = conn.client(&subscribe(V3, 1, &["a/#"]));
    assert_eq!(
        String::from_utf8(backend_request(&out.asks[0]).body.clone()).unwrap(),
        "username=u+1&clientid=c1&topic=a%2F%23&acc=1"
    );
}

#[test]
fn too_much_data_while_waiting_closes() {
    let mut conn = Conn::new(policy_from(with(
        backend_config(json!({})),
        "max_packet_bytes",
        json!(1024),
    )));
    let ask = conn
        .client(&connect_packet(V3, "c1", Some("u1"), None, None))
        .asks
        .remove(0);
    conn.answer(&ask, Some(200));
    conn.broker(&encode_connack(V3, 0));
    let out = conn.client(&publish(V3, "a", QoS::AtMostOnce, None));
    assert_eq!(out.asks.len(), 1);
    let big = publish(V3, "b", QoS::AtMostOnce, None);
    let mut closed = None;
    for _ in 0..500 {
        let out = conn.client(&big);
        if out.close.is_some() {
            closed = out.close;
            break;
        }
    }
    assert!(matches!(closed, Some(CloseReason::Malformed(why)) if why.contains("auth backend")));
}

#[test]
fn http_backend_configuration_is_validated() {
    let err = |config: Value| MqttAcl::from_json(config.to_string().as_bytes()).unwrap_err();
    // Without local rules the backend's acl is required.
    let mut config = backend_config(json!({}));
    config["http_backend"]
        .as_object_mut()
        .unwrap()
        .remove("acl");
    assert!(err(config).contains("http_backend.acl"));
    let e = err(backend_config(
        json!({"http_backend": {"cluster": "x", "authority": "y",
                                                         "acl": {"path": "/acl"},
                                                         "cache": {"ttl": 1}}}),
    ));
    assert!(e.contains("http_backend.cache"), "{e}");
}

// ------------------------------------------------------------------------------------------
// Opaque tokens (introspection)

fn opaque_policy() -> MqttAcl {
    policy_from(with(
        base_config(),
        "introspection",
        json!({"kind": "rfc7662", "cluster": "idp", "authority": "idp.example",
               "path": "/introspect",
               "credentials": {"client_id": "mqtt", "client_secret": "s3cret"}}),
    ))
}

fn introspect_ask(out: &Output) -> u32 {
    assert_eq!(out.asks.len(), 1, "{:?}", out.asks);
    let AskRequest::Introspect { token, call } = &out.asks[0].request else {
        panic!("not an introspection: {:?}", out.asks[0]);
    };
    assert_eq!(token, "tok-1");
    assert_eq!(
        (call.cluster.as_str(), call.path.as_str()),
        ("idp", "/introspect")
    );
    assert_eq!(
        String::from_utf8(call.body.clone()).unwrap(),
        "token=tok-1&token_type_hint=access_token"
    );
    out.asks[0].id
}

fn answer(status: u32, body: &str) -> BackendAnswer {
    BackendAnswer {
        status: (status != 0).then_some(status),
        body: body.as_bytes().to_vec(),
    }
}

#[test]
fn an_opaque_token_as_user_name_is_introspected_cached_and_expires() {
    let mut conn = Conn::new(opaque_policy());
    // Any password: ignored.
    let connect = connect_packet(V3, "alice-1", Some("tok-1"), Some(b"x"), None);
    let out = conn.client(&connect);
    assert!(out.forward.is_empty() && out.decisions.is_empty());
    let id = introspect_ask(&out);
    let env = Env {
        policy: &conn.policy,
        now: NOW,
    };
    let body = format!(r#"{{"active": true, "sub": "alice", "exp": {}}}"#, NOW + 60);
    let out = conn
        .session
        .on_backend_answer(id, &answer(200, &body), &env);
    assert!(
        lines(&out).contains("authenticated:opaquetoken"),
        "{}",
        lines(&out)
    );
    assert_forwarded_without_credentials(&out, &conn.session, V3, &connect);
    assert_eq!(conn.session.expires_at(), Some(NOW + 60));
    // The token's lifetime ends: the connection closes.
    conn.now = NOW + 61;
    let env = Env {
        policy: &conn.policy,
        now: conn.now,
    };
    let closed = conn.session.check_expiry(&env).unwrap();
    assert_eq!(closed.close, Some(CloseReason::Expired));

    // A second connection with the same token: answered from the cache, nothing asked.
    let mut again = Conn::new(opaque_policy());
    again.policy = conn.policy;
    again.session = Session::new(&again.policy, None, 8);
    let out = again.client(&connect_packet(V3, "alice-2", Some("tok-1"), None, None));
    assert!(out.asks.is_empty() && !out.forward.is_empty(), "{out:?}");
}

#[test]
fn an_inactive_opaque_token_is_a_bad_password_and_no_answer_is_server_unavailable() {
    for (status, body, v3, v5) in [
        (
            200,
            r#"{"active": false}"#,
            v3_connack::BAD_USERNAME_OR_PASSWORD,
            reason::BAD_USER_NAME_OR_PASSWORD,
        ),
        (
            0,
            "",
            v3_connack::SERVER_UNAVAILABLE,
            reason::SERVER_UNAVAILABLE,
        ),
        (
            503,
            "",
            v3_connack::SERVER_UNAVAILABLE,
            reason::SERVER_UNAVAILABLE,
        ),
    ] {
        for (version, code) in [(V3, v3), (V5, v5)] {
            let mut conn = Conn::new(opaque_policy());
            let out = conn.client(&connect_packet(version, "c1", Some("tok-1"), None, None));
            let id = introspect_ask(&out);
            let env = Env {
                policy: &conn.policy,
                now: NOW,
            };
            let out = conn
                .session
                .on_backend_answer(id, &answer(status, body), &env);
            assert!(
                out.decisions.iter().any(|d| !d.is_allowed()),
                "{}",
                lines(&out)
            );
            let back = conn.broker(&encode_connack(version, 0));
            assert_eq!(
                back.forward,
                encode_connack(version, code),
                "{status} {version:?}"
            );
        }
    }
    // An IdP failure is not remembered: the next CONNECT asks again.
    let mut conn = Conn::new(opaque_policy());
    let out = conn.client(&connect_packet(V3, "c1", Some("tok-1"), None, None));
    let id = introspect_ask(&out);
    let env = Env {
        policy: &conn.policy,
        now: NOW,
    };
    conn.session.on_backend_answer(id, &answer(0, ""), &env);
    conn.session = Session::new(&conn.policy, None, 9);
    let out = conn.client(&connect_packet(V3, "c1", Some("tok-1"), None, None));
    introspect_ask(&out);
}

// ------------------------------------------------------------------------------------------
// Device keys from a registry

fn registry_policy() -> MqttAcl {
    let mut config = base_config();
    config["device_keys"]["registry"] = json!({"cluster": "iot-directory",
        "authority": "iotdirectory.example", "path": "/device-keys",
        "cache": {"positive_ttl_s": 60, "negative_ttl_s": 10}});
    policy_from(config)
}

fn lookup_ask(out: &Output, device: &str) -> u32 {
    assert_eq!(out.asks.len(), 1, "{:?}", out.asks);
    let AskRequest::DeviceLookup { device_id, call } = &out.asks[0].request else {
        panic!("not a device lookup: {:?}", out.asks[0]);
    };
    assert_eq!(device_id, device);
    assert_eq!(call.cluster, "iot-directory");
    assert_eq!(call.path, format!("/device-keys?id={device}"));
    assert_eq!(call.method, "GET");
    out.asks[0].id
}

fn registered(device: &str, key: &str) -> String {
    format!(
        r#"{{"id": "{device}", "key_sha256": ["{}"], "owner": "alice"}}"#,
        sha(key)
    )
}

#[test]
fn a_device_the_configuration_does_not_list_is_looked_up_then_cached() {
    let mut conn = Conn::new(registry_policy());
    let connect = connect_packet(V3, "lamp-07", Some("lamp-07"), Some(b"k7"), None);
    let out = conn.client(&connect);
    assert!(out.forward.is_empty() && out.decisions.is_empty());
    let id = lookup_ask(&out, "lamp-07");
    let env = Env {
        policy: &conn.policy,
        now: NOW,
    };
    let out = conn
        .session
        .on_backend_answer(id, &answer(200, &registered("lamp-07", "k7")), &env);
    assert!(
        lines(&out).contains("authenticated:devicekey"),
        "{}",
        lines(&out)
    );
    assert_forwarded_without_credentials(&out, &conn.session, V3, &connect);
    // A listed device is never looked up.
    let mut listed = Conn::new(registry_policy());
    let out = listed.client(&connect_packet(
        V3,
        "lamp-01",
        Some("lamp-01"),
        Some(b"k1"),
        None,
    ));
    assert!(out.asks.is_empty() && !out.forward.is_empty(), "{out:?}");
    // A second connection: from the cache; a wrong key is refused without asking.
    let policy = conn.policy;
    for (key, allowed) in [(&b"k7"[..], true), (b"wrong", false)] {
        let mut again = Session::new(&policy, None, 8);
        let env = Env {
            policy: &policy,
            now: NOW + 30,
        };
        let out = again.on_client_bytes(
            &connect_packet(V3, "lamp-07", Some("lamp-07"), Some(key), None),
            &env,
        );
        assert!(out.asks.is_empty(), "{out:?}");
        assert_eq!(out.decisions.iter().all(|d| d.is_allowed()), allowed);
    }
    // After the positive TTL the registry is asked again (a revoked key stops working).
    let mut later = Session::new(&policy, None, 9);
    let env = Env {
        policy: &policy,
        now: NOW + 60,
    };
    let out = later.on_client_bytes(
        &connect_packet(V3, "lamp-07", Some("lamp-07"), Some(b"k7"), None),
        &env,
    );
    lookup_ask(&out, "lamp-07");
}

#[test]
fn an_unknown_device_is_a_bad_password_and_a_registry_down_server_unavailable() {
    for (status, body, v3, v5) in [
        (
            404,
            "",
            v3_connack::BAD_USERNAME_OR_PASSWORD,
            reason::BAD_USER_NAME_OR_PASSWORD,
        ),
        (
            200,
            r#"{"id": "lamp-07", "key_sha256": []}"#,
            v3_connack::BAD_USERNAME_OR_PASSWORD,
            reason::BAD_USER_NAME_OR_PASSWORD,
        ),
        (
            0,
            "",
            v3_connack::SERVER_UNAVAILABLE,
            reason::SERVER_UNAVAILABLE,
        ),
        (
            500,
            "",
            v3_connack::SERVER_UNAVAILABLE,
            reason::SERVER_UNAVAILABLE,
        ),
        (
            200,
            "not json",
            v3_connack::SERVER_UNAVAILABLE,
            reason::SERVER_UNAVAILABLE,
        ),
    ] {
        for (version, code) in [(V3, v3), (V5, v5)] {
            let mut conn = Conn::new(registry_policy());
            let out = conn.client(&connect_packet(
                version,
                "lamp-07",
                Some("lamp-07"),
                Some(b"k7"),
                None,
            ));
            let id = lookup_ask(&out, "lamp-07");
            let env = Env {
                policy: &conn.policy,
                now: NOW,
            };
            let out = conn
                .session
                .on_backend_answer(id, &answer(status, body), &env);
            assert!(
                out.decisions.iter().any(|d| !d.is_allowed()),
                "{}",
                lines(&out)
            );
            let back = conn.broker(&encode_connack(version, 0));
            assert_eq!(
                back.forward,
                encode_connack(version, code),
                "{status} {body} {version:?}"
            );
        }
    }
}

#[test]
fn a_registry_cannot_be_combined_with_the_backend_user_check() {
    let mut config = backend_config(json!({}));
    config["device_keys"] = json!({"registry": {"cluster": "r", "authority": "r",
        "path": "/keys"}});
    let err = MqttAcl::from_json(config.to_string().as_bytes()).unwrap_err();
    assert!(err.contains("http_backend.user"), "{err}");
    let mut config = base_config();
    config["device_keys"]["registry"] = json!({"cluster": "r", "authority": "r",
        "path": "/keys", "timeout_ms": 0});
    let err = MqttAcl::from_json(config.to_string().as_bytes()).unwrap_err();
    assert!(err.contains("device_keys.registry.timeout_ms"), "{err}");
}

#[test]
fn a_registry_with_client_credentials_is_refused_mqtt_acl_relies_on_mtls() {
    let mut config = base_config();
    config["device_keys"]["registry"] = json!({"cluster": "r", "authority": "r",
        "path": "/keys", "auth": {"client_credentials": {
            "token_endpoint": {"cluster": "idp", "path": "/token"},
            "client_id": "a", "client_secret": "b"}}});
    let err = MqttAcl::from_json(config.to_string().as_bytes()).unwrap_err();
    assert!(
        err.contains("device_keys.registry.auth") && err.contains("mTLS"),
        "{err}"
    );
    // With the secret in an environment variable too: the refusal says why, not "unset".
    let grant = &mut config["device_keys"]["registry"]["auth"]["client_credentials"];
    grant["client_secret_env"] = json!("REGISTRY_SECRET");
    grant.as_object_mut().unwrap().remove("client_secret");
    let err = MqttAcl::from_json(config.to_string().as_bytes()).unwrap_err();
    assert!(err.contains("mTLS"), "{err}");
}

// ------------------------------------------------------------------------------------------
// Shared callouts: bounds

#[test]
fn a_shed_lookup_refuses_the_connect_as_server_busy_saying_which_bound() {
    let shed = Shed::Waiting(1024);
    for (version, code) in [
        (V3, v3_connack::SERVER_UNAVAILABLE),
        (V5, reason::SERVER_BUSY),
    ] {
        let mut conn = Conn::new(registry_policy());
        let out = conn.client(&connect_packet(
            version,
            "lamp-07",
            Some("lamp-07"),
            Some(b"k7"),
            None,
        ));
        let id = lookup_ask(&out, "lamp-07");
        let env = Env {
            policy: &conn.policy,
            now: NOW,
        };
        let out = conn.session.on_ask_shed(id, &shed.description(), &env);
        assert!(
            lines(&out).contains("max_waiting_connections"),
            "{}",
            lines(&out)
        );
        assert!(out.decisions.iter().all(|d| !d.is_allowed()));
        let back = conn.broker(&encode_connack(version, 0));
        assert_eq!(back.forward, encode_connack(version, code), "{version:?}");
    }
    // An ordinary failure of the same lookup is still "server unavailable" (0x88), not busy.
    let mut conn = Conn::new(registry_policy());
    let out = conn.client(&connect_packet(
        V5,
        "lamp-07",
        Some("lamp-07"),
        Some(b"k7"),
        None,
    ));
    let id = lookup_ask(&out, "lamp-07");
    let env = Env {
        policy: &conn.policy,
        now: NOW,
    };
    conn.session.on_backend_answer(id, &answer(0, ""), &env);
    let back = conn.broker(&encode_connack(V5, 0));
    assert_eq!(back.forward, encode_connack(V5, reason::SERVER_UNAVAILABLE));
}

#[test]
fn bounds_on_shared_callouts_are_configured_and_validated_with_their_path() {
    let policy = registry_policy();
    let limits = policy.ask_limits();
    assert_eq!(limits.max_waiting_connections, 1024);
    assert_eq!(limits.registry_in_flight, 64);
    for (key, value, path) in [
        (
            "max_waiting_connections",
            json!(0),
            "max_waiting_connections",
        ),
        (
            "max_waiting_connections",
            json!(1_000_001),
            "max_waiting_connections",
        ),
    ] {
        let mut config = base_config();
        config[key] = value;
        let err = MqttAcl::from_json(config.to_string().as_bytes()).unwrap_err();
        assert!(err.contains(path), "{err}");
    }
    let mut config = base_config();
    config["max_waiting_connections"] = json!(8);
    let policy = MqttAcl::from_json(config.to_string().as_bytes()).unwrap();
    assert_eq!(policy.ask_limits().max_waiting_connections, 8);
}

#[test]
fn the_introspection_secret_may_come_from_the_environment() {
    let config = with(
        base_config(),
        "introspection",
        json!({"kind": "rfc7662", "cluster": "idp", "authority": "idp.example",
               "path": "/introspect",
               "credentials": {"client_id": "mqtt", "client_secret_env": "MQTT_PEP_SECRET"}}),
    );
    let build = |env: Option<&str>| {
        let mut config: MqttAclConfig = serde_json::from_value(config.clone()).unwrap();
        config.read_environment(&|name: &str| {
            (name == "MQTT_PEP_SECRET")
                .then(|| env.map(str::to_string))
                .flatten()
        });
        MqttAcl::new(config)
    };
    // The introspection call authenticates exactly as with the secret inline.
    let mut conn = Conn::new(build(Some("s3cret")).unwrap());
    let out = conn.client(&connect_packet(V3, "alice-1", Some("tok-1"), None, None));
    introspect_ask(&out);
    let AskRequest::Introspect { call, .. } = &out.asks[0].request else {
        panic!("not an introspection: {:?}", out.asks[0]);
    };
    let inline = opaque_policy().opaque_tokens().unwrap().call("tok-1");
    assert_eq!(
        call.header("authorization"),
        Some("Basic bXF0dDpzM2NyZXQ=") // base64("mqtt:s3cret")
    );
    assert_eq!(call.header("authorization"), inline.header("authorization"));
    for env in [None, Some("")] {
        let err = build(env).map(|_| ()).unwrap_err();
        assert!(
            err.starts_with(
                "introspection: credentials.client_secret_env: the environment variable \
                 MQTT_PEP_SECRET is not set or is empty"
            ),
            "{err}"
        );
    }
}
