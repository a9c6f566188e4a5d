//! Golden-byte tests: packets written by hand after the specs' layouts and what mosquitto's
//! clients and broker send, decoded to the expected packets and (where the encoding is the
//! canonical one) encoded back to the same bytes; and one test per validation rule.

use super::*;

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// CONNECT with an empty client id, clean session, keep alive 60.
const CONNECT_V311_MINIMAL: &[u8] = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00";
const CONNECT_V5_MINIMAL: &[u8] = b"\x10\x0d\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x00";

/// Decodes a client→broker stream fed in one piece.
fn client_frames(stream: &[u8]) -> Result<Vec<Frame>, MqttError> {
    let mut decoder = Decoder::client_to_broker(Limits::default());
    decoder.feed(stream);
    let mut frames = Vec::new();
    while let Some(frame) = decoder.next_frame()? {
        frames.push(frame);
    }
    Ok(frames)
}

/// Decodes one client packet sent after a minimal CONNECT of `version`.
fn client_packet(version: ProtocolVersion, packet: &[u8]) -> Result<Frame, MqttError> {
    let connect = match version {
        ProtocolVersion::V311 => CONNECT_V311_MINIMAL,
        ProtocolVersion::V5 => CONNECT_V5_MINIMAL,
    };
    let mut frames = client_frames(&cat(&[connect, packet]))?;
    assert_eq!(frames.len(), 2, "expected CONNECT and one packet");
    Ok(frames.remove(1))
}

/// Decodes one broker packet sent after a CONNACK of `version`.
fn broker_packet(version: ProtocolVersion, packet: &[u8]) -> Result<Frame, MqttError> {
    let mut decoder = Decoder::broker_to_client(Limits::default());
    decoder.set_version(version);
    decoder.feed(&encode_connack(version, 0));
    decoder.feed(packet);
    assert!(matches!(
        decoder.next_frame()?.map(|f| f.packet),
        Some(Packet::ConnAck(_))
    ));
    let frame = decoder.next_frame()?.expect("a complete packet");
    assert_eq!(decoder.next_frame(), Ok(None));
    Ok(frame)
}

fn kind_of<T: std::fmt::Debug>(result: Result<T, MqttError>) -> ErrorKind {
    match result {
        Err(error) => error.kind,
        Ok(value) => panic!("expected an error, got {value:?}"),
    }
}

/// The packet encodes back to exactly `raw`.
fn assert_reencodes(frame: &Frame, version: ProtocolVersion) {
    assert_eq!(encode(&frame.packet, version).unwrap(), frame.raw);
}

// ---- CONNECT ----

#[test]
fn mosquitto_pub_connect_v311_with_username_and_password() {
    // mosquitto_pub -V mqttv311 -i client1 -u user -P pass ...
    let raw = b"\x10\x1f\x00\x04MQTT\x04\xc2\x00\x3c\x00\x07client1\x00\x04user\x00\x04pass";
    let frames = client_frames(raw).unwrap();
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].raw, raw);
    assert_eq!(
        frames[0].packet,
        Packet::Connect(Connect {
            version: ProtocolVersion::V311,
            bridge: false,
            client_id: "client1".into(),
            clean_start: true,
            keep_alive: 60,
            username: Some("user".into()),
            password: Some(b"pass".to_vec()),
            will: None,
            properties: Properties::new(),
        })
    );
    assert_reencodes(&frames[0], ProtocolVersion::V311);
}

#[test]
fn mosquitto_pub_connect_v5_with_username_and_password() {
    // mosquitto_pub -V 5 -i client1 -u user -P pass ...: it asks for Receive Maximum 20.
    let raw = b"\x10\x23\x00\x04MQTT\x05\xc2\x00\x3c\x03\x21\x00\x14\x00\x07client1\x00\x04user\x00\x04pass";
    let mut decoder = Decoder::client_to_broker(Limits::default());
    decoder.feed(raw);
    let frame = decoder.next_frame().unwrap().unwrap();
    assert_eq!(decoder.version(), Some(ProtocolVersion::V5));
    assert_eq!(
        frame.packet,
        Packet::Connect(Connect {
            version: ProtocolVersion::V5,
            bridge: false,
            client_id: "client1".into(),
            clean_start: true,
            keep_alive: 60,
            username: Some("user".into()),
            password: Some(b"pass".to_vec()),
            will: None,
            properties: Properties(vec![Property::ReceiveMaximum(20)]),
        })
    );
    assert_reencodes(&frame, ProtocolVersion::V5);
}

fn hex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

/// Whole client→broker streams captured from mosquitto_pub / mosquitto_sub 2.0.11 (each line
/// one packet), decoded and re-encoded packet by packet.
#[test]
fn captured_mosquitto_client_streams() {
    let sessions: &[(&[&str], ProtocolVersion)] = &[
        // mosquitto_pub -V mqttv311 -i client1 -u user -P pass -t a/b -m hello
        (
            &[
                "101f00044d51545404c2003c0007636c69656e7431000475736572000470617373",
                "300a0003612f6268656c6c6f",
                "e000",
            ],
            ProtocolVersion::V311,
        ),
        // mosquitto_pub -V 5 -i client1 -u user -P pass -t a/b -m hello -q 1
        (
            &[
                "102300044d51545405c2003c032100140007636c69656e7431000475736572000470617373",
                "320d0003612f6200010068656c6c6f",
                "e000",
            ],
            ProtocolVersion::V5,
        ),
        // mosquitto_sub -V mqttv311 -i sub1 -t a/b -t 'c/#' -q 1
        (
            &[
                "101000044d5154540402003c000473756231",
                "820e00010003612f62010003632f2301",
                "e000",
            ],
            ProtocolVersion::V311,
        ),
        // mosquitto_sub -V 5 -i sub1 -t 'a/+' -t '$share/g/c/#' -q 2
        //   -D subscribe subscription-identifier 5
        (
            &[
                "101400044d5154540502003c03210014000473756231",
                "821a0001020b050003612f2b02000c2473686172652f672f632f2302",
                "e00104",
            ],
            ProtocolVersion::V5,
        ),
        // mosquitto_pub -V mqttv311 -i w1 -u user -P pass -t a/b -m x --will-topic w/t
        //   --will-payload bye --will-qos 1 --will-retain
        (
            &[
                "102400044d51545404ee003c000277310003772f740003627965000475736572000470617373",
                "30060003612f6278",
                "e000",
            ],
            ProtocolVersion::V311,
        ),
        // mosquitto_pub -V 5 -i w1 -t a/b -m x --will-topic w/t --will-payload bye
        //   --will-qos 1 -D will will-delay-interval 5 -D connect session-expiry-interval 3600
        (
            &[
                "102700044d515454050e003c081100000e10210014000277310518000000050003772f740003627965",
                "30070003612f620078",
                "e000",
            ],
            ProtocolVersion::V5,
        ),
    ];
    for (packets, version) in sessions {
        let packets: Vec<Vec<u8>> = packets.iter().map(|p| hex(p)).collect();
        let frames = client_frames(&packets.concat()).unwrap();
        assert_eq!(frames.len(), packets.len());
        for (frame, raw) in frames.iter().zip(&packets) {
            assert_eq!(&frame.raw, raw);
            assert_reencodes(frame, *version);
        }
        let Packet::Connect(connect) = &frames[0].packet else {
            panic!("not a CONNECT")
        };
        assert_eq!(connect.version, *version);
    }

    let v5_subscribe = client_frames(&cat(&[
        &hex("101400044d5154540502003c03210014000473756231"),
        &hex("821a0001020b050003612f2b02000c2473686172652f672f632f2302"),
    ]))
    .unwrap();
    let Packet::Subscribe(subscribe) = &v5_subscribe[1].packet else {
        panic!("not a SUBSCRIBE")
    };
    assert_eq!(
        subscribe
            .properties
            .subscription_identifiers()
            .collect::<Vec<_>>(),
        vec![5]
    );
    let filters: Vec<&str> = subscribe
        .filters
        .iter()
        .map(|s| s.filter.as_str())
        .collect();
    assert_eq!(filters, vec!["a/+", "$share/g/c/#"]);
    assert_eq!(shared_subscription(filters[1]), Some(("g", "c/#")));
    assert_eq!(
        subscribe.filters[1].options,
        SubscriptionOptions::qos(QoS::ExactlyOnce)
    );

    let v5_will = client_frames(&hex(
        "102700044d515454050e003c081100000e10210014000277310518000000050003772f740003627965",
    ))
    .unwrap();
    let Packet::Connect(connect) = &v5_will[0].packet else {
        panic!("not a CONNECT")
    };
    assert_eq!(connect.properties.session_expiry_interval(), Some(3600));
    assert_eq!(
        connect.will,
        Some(Will {
            topic: "w/t".into(),
            payload: b"bye".to_vec(),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Properties(vec![Property::WillDelayInterval(5)]),
        })
    );
}

#[test]
fn spec_connect_v311_with_will() {
    // Flags 0xCE as in the 3.1.1 spec's example: user name, password, will QoS 1, will, clean.
    let raw = b"\x10\x26\x00\x04MQTT\x04\xce\x00\x0a\x00\x03dev\x00\x03w/t\x00\x03bye\x00\x04user\x00\x05s3cr\xff";
    let frame = &client_frames(raw).unwrap()[0];
    assert_eq!(
        frame.packet,
        Packet::Connect(Connect {
            version: ProtocolVersion::V311,
            bridge: false,
            client_id: "dev".into(),
            clean_start: true,
            keep_alive: 10,
            username: Some("user".into()),
            // Passwords are binary data: any bytes.
            password: Some(b"s3cr\xff".to_vec()),
            will: Some(Will {
                topic: "w/t".into(),
                payload: b"bye".to_vec(),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: Properties::new(),
            }),
            properties: Properties::new(),
        })
    );
    assert_reencodes(frame, ProtocolVersion::V311);
}

#[test]
fn connect_v5_with_properties_and_will_properties() {
    let raw = cat(&[
        b"\x10\x37\x00\x04MQTT\x05\x2e\x00\x1e",
        // Session expiry 3600, receive maximum 20, authentication method "token".
        b"\x10\x11\x00\x00\x0e\x10\x21\x00\x14\x15\x00\x05token",
        b"\x00\x03dev",
        // Will: delay 5, user property ("k", "v"); topic, payload. Flags 0x2e: will retain,
        // will QoS 1, will, clean start.
        b"\x0c\x18\x00\x00\x00\x05\x26\x00\x01k\x00\x01v",
        b"\x00\x03w/t\x00\x03bye",
    ]);
    let frame = &client_frames(&raw).unwrap()[0];
    let Packet::Connect(connect) = &frame.packet else {
        panic!("not a CONNECT")
    };
    assert_eq!(connect.properties.session_expiry_interval(), Some(3600));
    assert_eq!(connect.properties.authentication_method(), Some("token"));
    assert_eq!(
        connect.properties.0,
        vec![
            Property::SessionExpiryInterval(3600),
            Property::ReceiveMaximum(20),
            Property::AuthenticationMethod("token".into()),
        ]
    );
    let will = connect.will.as_ref().unwrap();
    assert_eq!((will.qos, will.retain), (QoS::AtLeastOnce, true));
    assert_eq!(
        will.properties.0,
        vec![
            Property::WillDelayInterval(5),
            Property::UserProperty("k".into(), "v".into())
        ]
    );
    assert_eq!(connect.username, None);
    assert_reencodes(frame, ProtocolVersion::V5);
}

#[test]
fn connect_flag_rules() {
    let with_flags = |level: u8, flags: u8, payload: &[u8]| {
        let mut raw = cat(&[b"\x10\x00\x00\x04MQTT", &[level, flags], b"\x00\x3c"]);
        if level == 5 {
            raw.push(0);
        }
        raw.extend_from_slice(b"\x00\x01c");
        raw.extend_from_slice(payload);
        raw[1] = u8::try_from(raw.len() - 2).unwrap();
        client_frames(&raw)
    };
    // Sanity: the helper builds valid packets.
    assert!(with_flags(4, 0x02, b"").is_ok());
    // Reserved flag (MQTT-3.1.2-3).
    assert_eq!(kind_of(with_flags(4, 0x03, b"")), ErrorKind::Malformed);
    assert_eq!(kind_of(with_flags(5, 0x03, b"")), ErrorKind::Malformed);
    // Will QoS 3 with a will.
    let will = b"\x00\x01t\x00\x00";
    assert!(with_flags(4, 0x14, will).is_ok());
    assert_eq!(kind_of(with_flags(4, 0x1c, will)), ErrorKind::Malformed);
    // Will QoS or retain without a will (MQTT-3.1.2-13, -15).
    assert_eq!(kind_of(with_flags(4, 0x08, b"")), ErrorKind::Malformed);
    assert_eq!(kind_of(with_flags(4, 0x20, b"")), ErrorKind::Malformed);
    // A will topic is a topic name: no wildcards, not empty.
    assert_eq!(
        kind_of(with_flags(4, 0x04, b"\x00\x01#\x00\x00")),
        ErrorKind::Malformed
    );
    assert_eq!(
        kind_of(with_flags(4, 0x04, b"\x00\x00\x00\x00")),
        ErrorKind::Malformed
    );
    // Password without user name: refused in 3.1.1 (MQTT-3.1.2-22), allowed in 5.0.
    assert_eq!(
        kind_of(with_flags(4, 0x40, b"\x00\x02pw")),
        ErrorKind::Malformed
    );
    let frames = with_flags(5, 0x40, b"\x00\x02pw").unwrap();
    let Packet::Connect(connect) = &frames[0].packet else {
        panic!("not a CONNECT")
    };
    assert_eq!(
        (connect.username.as_deref(), connect.password.as_deref()),
        (None, Some(&b"pw"[..]))
    );
    // A flag announcing a field that is missing, or a field without its flag (left over).
    assert_eq!(kind_of(with_flags(4, 0x80, b"")), ErrorKind::Malformed);
    assert_eq!(
        kind_of(with_flags(4, 0x00, b"\x00\x01u")),
        ErrorKind::Malformed
    );
}

#[test]
fn connect_strings_must_be_utf8_without_nul() {
    let nul = b"\x10\x0f\x00\x04MQTT\x04\x02\x00\x3c\x00\x03a\x00b";
    assert_eq!(kind_of(client_frames(nul)), ErrorKind::Malformed);
    let invalid = b"\x10\x0f\x00\x04MQTT\x04\x02\x00\x3c\x00\x03a\xffb";
    assert_eq!(kind_of(client_frames(invalid)), ErrorKind::Malformed);
    // A UTF-16 surrogate encoded in UTF-8 (MQTT-1.5.3-1).
    let surrogate = b"\x10\x0f\x00\x04MQTT\x04\x02\x00\x3c\x00\x03\xed\xa0\x80";
    assert_eq!(kind_of(client_frames(surrogate)), ErrorKind::Malformed);
    // Non-ASCII is fine.
    let text = "\x10\x0f\x00\x04MQTT\x04\x02\x00\x3c\x00\x03é1".as_bytes();
    assert!(client_frames(text).is_ok());
}

#[test]
fn unsupported_versions_are_reported_with_their_level() {
    let mqtt31 = b"\x10\x0e\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x00";
    let mut decoder = Decoder::client_to_broker(Limits::default());
    decoder.feed(mqtt31);
    let error = decoder.next_frame().unwrap_err();
    assert_eq!(error.kind, ErrorKind::UnsupportedVersion { level: 3 });
    assert_eq!(
        error.connack_code(ProtocolVersion::V311),
        Some(v3_connack::UNACCEPTABLE_PROTOCOL_VERSION)
    );
    let level6 = b"\x10\x0c\x00\x04MQTT\x06\x02\x00\x3c\x00\x00";
    assert_eq!(
        kind_of(client_frames(level6)),
        ErrorKind::UnsupportedVersion { level: 6 }
    );
    let unknown_name = b"\x10\x0c\x00\x04MQTX\x04\x02\x00\x3c\x00\x00";
    assert_eq!(
        kind_of(client_frames(unknown_name)),
        ErrorKind::ProtocolError
    );
    // The bridge flag does not make 3.1 or an unknown level acceptable.
    let bridge31 = b"\x10\x0e\x00\x06MQIsdp\x83\x02\x00\x3c\x00\x00";
    assert_eq!(
        kind_of(client_frames(bridge31)),
        ErrorKind::UnsupportedVersion { level: 0x83 }
    );
    let bridge6 = b"\x10\x0c\x00\x04MQTT\x86\x02\x00\x3c\x00\x00";
    assert_eq!(
        kind_of(client_frames(bridge6)),
        ErrorKind::UnsupportedVersion { level: 0x86 }
    );
}

/// The will a Mosquitto bridge connects with (`notifications true`, its default).
fn bridge_will(client_id: &str) -> Option<Will> {
    Some(Will {
        topic: format!("$SYS/broker/connection/{client_id}/state"),
        payload: b"0".to_vec(),
        qos: QoS::AtLeastOnce,
        retain: true,
        properties: Properties::new(),
    })
}

#[test]
fn mosquitto_bridge_connect_v311_keeps_the_bridge_flag() {
    // Captured from Mosquitto 2.0.11 bridging with `bridge_protocol_version mqttv311`,
    // `remote_clientid lamp-01`, `cleansession true`, try_private and notifications left at
    // their defaults (true): protocol level 0x84.
    let raw = hex(
        "103c00044d515454842e003c00076c616d702d30310024245359532f62726f6b65722f636f6e6e\
         656374696f6e2f6c616d702d30312f7374617465000130",
    );
    let frames = client_frames(&raw).unwrap();
    assert_eq!(frames.len(), 1);
    let expected = Connect {
        version: ProtocolVersion::V311,
        bridge: true,
        client_id: "lamp-01".into(),
        clean_start: true,
        keep_alive: 60,
        username: None,
        password: None,
        will: bridge_will("lamp-01"),
        properties: Properties::new(),
    };
    assert_eq!(frames[0].packet, Packet::Connect(expected.clone()));
    // Encoded back byte for byte, the flag included...
    assert_reencodes(&frames[0], ProtocolVersion::V311);
    // ...and, with a user name added (what mqtt-acl forwards), still at level 0x84.
    let forwarded = Connect {
        username: Some("lamp-01".into()),
        ..expected.clone()
    };
    let bytes = encode(&Packet::Connect(forwarded), ProtocolVersion::V311).unwrap();
    assert_eq!(&bytes[2..9], b"\x00\x04MQTT\x84");
    assert_eq!(bytes[9], 0xae, "user name flag added to the bridge's 0x2e");
    // Without the flag: level 4, nothing else differs.
    let plain = Connect {
        bridge: false,
        ..expected
    };
    let mut unflagged = raw.clone();
    unflagged[8] = 0x04;
    assert_eq!(
        encode(&Packet::Connect(plain), ProtocolVersion::V311).unwrap(),
        unflagged
    );
}

#[test]
fn mosquitto_bridge_connect_v5() {
    // Captured from Mosquitto 2.0.11 with `bridge_protocol_version mqttv50`: it sends level 5
    // without the flag (v5 has no-local and retain-as-published instead).
    let raw = hex(
        "104100044d515454052e003c0321001400076c616d702d3031000024245359532f62726f6b6572\
         2f636f6e6e656374696f6e2f6c616d702d30312f7374617465000130",
    );
    let frames = client_frames(&raw).unwrap();
    let Packet::Connect(connect) = &frames[0].packet else {
        panic!("not a CONNECT: {:?}", frames[0].packet);
    };
    assert_eq!(
        (connect.version, connect.bridge),
        (ProtocolVersion::V5, false)
    );
    assert_eq!(connect.client_id, "lamp-01");
    assert_reencodes(&frames[0], ProtocolVersion::V5);
    // With the flag on v5 (level 0x85, accepted too): decoded and encoded back.
    let mut flagged = raw.clone();
    flagged[8] = 0x85;
    let mut decoder = Decoder::client_to_broker(Limits::default());
    decoder.feed(&flagged);
    let frame = decoder.next_frame().unwrap().unwrap();
    assert_eq!(decoder.version(), Some(ProtocolVersion::V5));
    let Packet::Connect(connect) = &frame.packet else {
        panic!("not a CONNECT");
    };
    assert!(connect.bridge);
    assert_eq!(
        connect.properties,
        Properties(vec![Property::ReceiveMaximum(20)])
    );
    assert_reencodes(&frame, ProtocolVersion::V5);
}

#[test]
fn version_is_known_even_when_the_rest_of_connect_is_invalid() {
    // v5 CONNECT whose property list names an unknown property.
    let raw = b"\x10\x0f\x00\x04MQTT\x05\x02\x00\x3c\x02\x7f\x00\x00\x00";
    let mut decoder = Decoder::client_to_broker(Limits::default());
    decoder.feed(raw);
    assert_eq!(decoder.next_frame().unwrap_err().kind, ErrorKind::Malformed);
    assert_eq!(decoder.version(), Some(ProtocolVersion::V5));
}

#[test]
fn v5_property_rules() {
    let connect_with_properties = |properties: &[u8]| {
        let mut raw = cat(&[b"\x10\x00\x00\x04MQTT\x05\x02\x00\x3c"]);
        raw.push(u8::try_from(properties.len()).unwrap());
        raw.extend_from_slice(properties);
        raw.extend_from_slice(b"\x00\x00");
        raw[1] = u8::try_from(raw.len() - 2).unwrap();
        client_frames(&raw)
    };
    assert!(connect_with_properties(b"\x11\x00\x00\x00\x05").is_ok());
    // Topic Alias is not a CONNECT property: malformed (section 2.2.2.2).
    assert_eq!(
        kind_of(connect_with_properties(b"\x23\x00\x01")),
        ErrorKind::Malformed
    );
    // Unknown identifier.
    assert_eq!(
        kind_of(connect_with_properties(b"\x7f\x00")),
        ErrorKind::Malformed
    );
    // Twice a single-valued property.
    assert_eq!(
        kind_of(connect_with_properties(
            b"\x11\x00\x00\x00\x05\x11\x00\x00\x00\x06"
        )),
        ErrorKind::ProtocolError
    );
    // User properties may repeat.
    assert!(connect_with_properties(b"\x26\x00\x01a\x00\x00\x26\x00\x01a\x00\x00").is_ok());
    // Receive maximum 0, maximum packet size 0, request problem information 2.
    assert_eq!(
        kind_of(connect_with_properties(b"\x21\x00\x00")),
        ErrorKind::ProtocolError
    );
    assert_eq!(
        kind_of(connect_with_properties(b"\x27\x00\x00\x00\x00")),
        ErrorKind::ProtocolError
    );
    assert_eq!(
        kind_of(connect_with_properties(b"\x17\x02")),
        ErrorKind::ProtocolError
    );
    // Authentication data without method.
    assert_eq!(
        kind_of(connect_with_properties(b"\x16\x00\x01x")),
        ErrorKind::ProtocolError
    );
    // A value running past the property list.
    assert_eq!(
        kind_of(connect_with_properties(b"\x11\x00\x00")),
        ErrorKind::Malformed
    );
    // A property list longer than the packet.
    let too_long = b"\x10\x0d\x00\x04MQTT\x05\x02\x00\x3c\x09\x00\x00";
    assert_eq!(kind_of(client_frames(too_long)), ErrorKind::Malformed);
}

// ---- Framing ----

#[test]
fn packets_split_at_every_byte_and_several_in_one_read() {
    let stream = cat(&[
        b"\x10\x1f\x00\x04MQTT\x04\xc2\x00\x3c\x00\x07client1\x00\x04user\x00\x04pass",
        b"\x30\x0a\x00\x03a/bhello",
        b"\xc0\x00",
        b"\xe0\x00",
    ]);
    let whole = client_frames(&stream).unwrap();
    assert_eq!(whole.len(), 4);
    let mut decoder = Decoder::client_to_broker(Limits::default());
    let mut bytewise = Vec::new();
    for byte in &stream {
        decoder.feed(&[*byte]);
        while let Some(frame) = decoder.next_frame().unwrap() {
            bytewise.push(frame);
        }
    }
    assert_eq!(bytewise, whole);
    assert_eq!(decoder.buffered_len(), 0);
    assert_eq!(
        whole.iter().map(|f| f.raw.len()).sum::<usize>(),
        stream.len()
    );
}

#[test]
fn remaining_length_split_inside_its_varint() {
    // PUBLISH with 200 bytes of payload: remaining length 205 = 0xCD 0x01.
    let mut publish = b"\x30\xcd\x01\x00\x03a/b".to_vec();
    publish.extend_from_slice(&[7u8; 200]);
    let mut decoder = Decoder::client_to_broker(Limits::default());
    decoder.feed(CONNECT_V311_MINIMAL);
    assert!(decoder.next_frame().unwrap().is_some());
    decoder.feed(&publish[..2]);
    assert_eq!(decoder.next_frame(), Ok(None));
    decoder.feed(&publish[2..]);
    let frame = decoder.next_frame().unwrap().unwrap();
    assert_eq!(frame.raw, publish);
    let Packet::Publish(p) = frame.packet else {
        panic!("not a PUBLISH")
    };
    assert_eq!(p.payload, vec![7u8; 200]);
}

#[test]
fn truncated_packets_wait_for_more_bytes() {
    let raw = b"\x10\x1f\x00\x04MQTT\x04\xc2\x00\x3c\x00\x07client1\x00\x04user\x00\x04pass";
    let mut decoder = Decoder::client_to_broker(Limits::default());
    decoder.feed(&raw[..raw.len() - 1]);
    assert_eq!(decoder.next_frame(), Ok(None));
    assert_eq!(decoder.next_frame(), Ok(None));
    assert_eq!(decoder.buffered_len(), raw.len() - 1);
    decoder.feed(&raw[raw.len() - 1..]);
    assert!(decoder.next_frame().unwrap().is_some());
}

#[test]
fn remaining_length_rules() {
    // Five bytes of remaining length.
    let five = cat(&[CONNECT_V311_MINIMAL, b"\x30\xff\xff\xff\xff\x01"]);
    assert_eq!(kind_of(client_frames(&five)), ErrorKind::Malformed);
    // Four continuation bytes are an error at once, before the fifth arrives.
    let mut decoder = Decoder::client_to_broker(Limits::default());
    decoder.feed(CONNECT_V311_MINIMAL);
    decoder.feed(b"\x30\xff\xff\xff\xff");
    assert!(decoder.next_frame().unwrap().is_some());
    assert_eq!(decoder.next_frame().unwrap_err().kind, ErrorKind::Malformed);
    // Not the shortest form (MQTT-1.5.5-1): 0 in two bytes.
    let padded = cat(&[CONNECT_V311_MINIMAL, b"\xc0\x80\x00"]);
    assert_eq!(kind_of(client_frames(&padded)), ErrorKind::Malformed);
    // The largest value is accepted as a length (and refused by the limit only).
    let max = cat(&[CONNECT_V311_MINIMAL, b"\x30\xff\xff\xff\x7f"]);
    assert_eq!(kind_of(client_frames(&max)), ErrorKind::TooLarge);
}

#[test]
fn packets_over_the_limit_are_refused_before_their_body() {
    let limits = Limits {
        max_packet_bytes: 64,
        ..Limits::default()
    };
    let mut decoder = Decoder::client_to_broker(limits);
    // A CONNECT announcing 255 bytes: refused with only 3 bytes buffered.
    decoder.feed(b"\x10\xff\x01");
    let error = decoder.next_frame().unwrap_err();
    assert_eq!(error.kind, ErrorKind::TooLarge);
    assert_eq!(error.disconnect_reason_code(), reason::PACKET_TOO_LARGE);
    // The decoder stays failed and drops what it is fed.
    decoder.feed(&[0u8; 1000]);
    assert_eq!(decoder.buffered_len(), 0);
    assert_eq!(decoder.next_frame().unwrap_err(), error);
    // Exactly at the limit is fine: 2 + 62 bytes.
    let mut decoder = Decoder::client_to_broker(limits);
    let mut connect = b"\x10\x3e\x00\x04MQTT\x04\x02\x00\x3c\x00\x32".to_vec();
    connect.extend_from_slice(&[b'c'; 0x32]);
    assert_eq!(connect.len(), 64);
    decoder.feed(&connect);
    assert!(decoder.next_frame().unwrap().is_some());
}

#[test]
fn first_packet_must_be_connect_and_only_once() {
    let publish_first = b"\x30\x0a\x00\x03a/bhello";
    assert_eq!(
        kind_of(client_frames(publish_first)),
        ErrorKind::ProtocolError
    );
    // Refused from its first byte, without waiting for the rest.
    let mut decoder = Decoder::client_to_broker(Limits::default());
    decoder.feed(b"\x82");
    assert_eq!(
        decoder.next_frame().unwrap_err().kind,
        ErrorKind::ProtocolError
    );
    let twice = cat(&[CONNECT_V311_MINIMAL, CONNECT_V311_MINIMAL]);
    assert_eq!(kind_of(client_frames(&twice)), ErrorKind::ProtocolError);
}

#[test]
fn packets_in_the_wrong_direction_are_refused() {
    for broker_packet_bytes in [
        &b"\x20\x02\x00\x00"[..],
        b"\x90\x03\x00\x01\x00",
        b"\xb0\x02\x00\x01",
        b"\xd0\x00",
    ] {
        assert_eq!(
            kind_of(client_packet(ProtocolVersion::V311, broker_packet_bytes)),
            ErrorKind::ProtocolError
        );
    }
    for client_packet_bytes in [&b"\xc0\x00"[..], b"\xa2\x05\x00\x03\x00\x01a"] {
        assert_eq!(
            kind_of(broker_packet(ProtocolVersion::V311, client_packet_bytes)),
            ErrorKind::ProtocolError
        );
    }
    // 3.1.1 brokers send no DISCONNECT; v5 brokers may.
    assert_eq!(
        kind_of(broker_packet(ProtocolVersion::V311, b"\xe0\x00")),
        ErrorKind::ProtocolError
    );
    assert!(broker_packet(ProtocolVersion::V5, b"\xe0\x01\x8e").is_ok());
}

#[test]
fn broker_decoder_needs_the_version_and_connack_first() {
    let mut decoder = Decoder::broker_to_client(Limits::default());
    decoder.feed(b"\x20\x02\x00\x00");
    assert_eq!(
        decoder.next_frame().unwrap_err().kind,
        ErrorKind::ProtocolError
    );

    let mut decoder = Decoder::broker_to_client(Limits::default());
    decoder.set_version(ProtocolVersion::V311);
    decoder.feed(b"\x90\x03\x00\x01\x00");
    assert_eq!(
        decoder.next_frame().unwrap_err().kind,
        ErrorKind::ProtocolError
    );

    assert_eq!(
        kind_of(broker_packet(ProtocolVersion::V311, b"\x20\x02\x00\x00")),
        ErrorKind::ProtocolError
    );
}

#[test]
fn nothing_after_disconnect() {
    let after = cat(&[CONNECT_V311_MINIMAL, b"\xe0\x00\xc0\x00"]);
    assert_eq!(kind_of(client_frames(&after)), ErrorKind::ProtocolError);
    let mut decoder = Decoder::broker_to_client(Limits::default());
    decoder.set_version(ProtocolVersion::V5);
    decoder.feed(b"\x20\x03\x00\x00\x00\xe0\x01\x8b\xd0\x00");
    assert!(decoder.next_frame().unwrap().is_some());
    assert!(decoder.next_frame().unwrap().is_some());
    assert_eq!(
        decoder.next_frame().unwrap_err().kind,
        ErrorKind::ProtocolError
    );
}

#[test]
fn failure_is_sticky() {
    let mut decoder = Decoder::client_to_broker(Limits::default());
    decoder.feed(b"\x30\x00");
    let error = decoder.next_frame().unwrap_err();
    decoder.feed(CONNECT_V311_MINIMAL);
    assert_eq!(decoder.next_frame(), Err(error.clone()));
    assert_eq!(decoder.failure(), Some(&error));
}

#[test]
fn fixed_header_flags() {
    let v3 = ProtocolVersion::V311;
    // SUBSCRIBE, UNSUBSCRIBE, PUBREL need 0b0010.
    assert!(client_packet(v3, b"\x82\x06\x00\x01\x00\x01a\x00").is_ok());
    assert_eq!(
        kind_of(client_packet(v3, b"\x80\x06\x00\x01\x00\x01a\x00")),
        ErrorKind::Malformed
    );
    assert_eq!(
        kind_of(client_packet(v3, b"\xa0\x05\x00\x01\x00\x01a")),
        ErrorKind::Malformed
    );
    assert!(client_packet(v3, b"\x62\x02\x00\x01").is_ok());
    assert_eq!(
        kind_of(client_packet(v3, b"\x60\x02\x00\x01")),
        ErrorKind::Malformed
    );
    // Others need 0.
    assert_eq!(
        kind_of(client_packet(v3, b"\xc1\x00")),
        ErrorKind::Malformed
    );
    assert_eq!(
        kind_of(client_packet(v3, b"\x42\x02\x00\x01")),
        ErrorKind::Malformed
    );
    let mut connect = CONNECT_V311_MINIMAL.to_vec();
    connect[0] = 0x11;
    assert_eq!(kind_of(client_frames(&connect)), ErrorKind::Malformed);
    // Packet type 0 is reserved; 15 is AUTH in v5 only.
    assert_eq!(
        kind_of(client_packet(v3, b"\x00\x00")),
        ErrorKind::Malformed
    );
    assert_eq!(
        kind_of(client_packet(v3, b"\xf0\x00")),
        ErrorKind::Malformed
    );
    // PUBLISH: QoS 3, DUP at QoS 0.
    assert_eq!(
        kind_of(client_packet(v3, b"\x36\x07\x00\x03a/b\x00\x01")),
        ErrorKind::Malformed
    );
    assert_eq!(
        kind_of(client_packet(v3, b"\x38\x05\x00\x03a/b")),
        ErrorKind::Malformed
    );
}

#[test]
fn leftover_bytes_inside_a_packet_are_malformed() {
    let v3 = ProtocolVersion::V311;
    assert_eq!(
        kind_of(client_packet(v3, b"\xc0\x01\x00")),
        ErrorKind::Malformed
    );
    assert_eq!(
        kind_of(client_packet(v3, b"\xe0\x01\x00")),
        ErrorKind::Malformed
    );
    assert_eq!(
        kind_of(client_packet(v3, b"\x40\x03\x00\x01\x00")),
        ErrorKind::Malformed
    );
    let connect = b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x3c\x00\x00\x00";
    assert_eq!(kind_of(client_frames(connect)), ErrorKind::Malformed);
    // And fields past the end are malformed too, never read from the next packet.
    let short_puback = cat(&[b"\x40\x01\x00", b"\xc0\x00"]);
    assert_eq!(
        kind_of(client_packet(v3, &short_puback)),
        ErrorKind::Malformed
    );
}

// ---- PUBLISH ----

#[test]
fn publish_qos0_and_qos1() {
    let v3 = ProtocolVersion::V311;
    let qos0 = client_packet(v3, b"\x30\x0a\x00\x03a/bhello").unwrap();
    assert_eq!(
        qos0.packet,
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: "a/b".into(),
            packet_id: None,
            properties: Properties::new(),
            payload: b"hello".to_vec(),
        })
    );
    assert_eq!(qos0.effective_topic.as_deref(), Some("a/b"));
    assert_reencodes(&qos0, v3);

    let qos1 = client_packet(v3, b"\x3b\x0c\x00\x03a/b\x00\x0ahello").unwrap();
    assert_eq!(
        qos1.packet,
        Packet::Publish(Publish {
            dup: true,
            qos: QoS::AtLeastOnce,
            retain: true,
            topic: "a/b".into(),
            packet_id: Some(10),
            properties: Properties::new(),
            payload: b"hello".to_vec(),
        })
    );
    assert_reencodes(&qos1, v3);
    // An empty payload is fine.
    assert!(client_packet(v3, b"\x30\x05\x00\x03a/b").is_ok());
}

#[test]
fn publish_topic_rules() {
    let v3 = ProtocolVersion::V311;
    for topic in [&b"a/+"[..], b"a/#", b"+", b"#", b"a+b"] {
        let mut raw = vec![0x30, u8::try_from(topic.len() + 2).unwrap(), 0];
        raw.push(u8::try_from(topic.len()).unwrap());
        raw.extend_from_slice(topic);
        assert_eq!(kind_of(client_packet(v3, &raw)), ErrorKind::Malformed);
    }
    // Empty topic: malformed in 3.1.1, and in 5.0 without a topic alias.
    assert_eq!(
        kind_of(client_packet(v3, b"\x30\x02\x00\x00")),
        ErrorKind::Malformed
    );
    assert_eq!(
        kind_of(client_packet(ProtocolVersion::V5, b"\x30\x03\x00\x00\x00")),
        ErrorKind::Malformed
    );
    assert_eq!(
        kind_of(client_packet(v3, b"\x30\x05\x00\x03a\xffb")),
        ErrorKind::Malformed
    );
    assert_eq!(
        kind_of(client_packet(v3, b"\x30\x05\x00\x03a\x00b")),
        ErrorKind::Malformed
    );
    // Packet identifier 0 at QoS 1.
    assert_eq!(
        kind_of(client_packet(v3, b"\x32\x07\x00\x03a/b\x00\x00")),
        ErrorKind::Malformed
    );
}

#[test]
fn v5_publish_with_topic_alias_is_resolved() {
    let stream = cat(&[
        CONNECT_V5_MINIMAL,
        // QoS 1, id 10, topic alias 1, payload "hi".
        b"\x32\x0d\x00\x03a/b\x00\x0a\x03\x23\x00\x01hi",
        // QoS 0, empty topic, alias 1.
        b"\x30\x08\x00\x00\x03\x23\x00\x01hi",
    ]);
    let frames = client_frames(&stream).unwrap();
    let Packet::Publish(first) = &frames[1].packet else {
        panic!("not a PUBLISH")
    };
    assert_eq!(first.properties.topic_alias(), Some(1));
    assert_eq!(frames[1].effective_topic.as_deref(), Some("a/b"));
    let Packet::Publish(second) = &frames[2].packet else {
        panic!("not a PUBLISH")
    };
    assert_eq!(second.topic, "");
    assert_eq!(frames[2].effective_topic.as_deref(), Some("a/b"));
    assert_reencodes(&frames[1], ProtocolVersion::V5);
    assert_reencodes(&frames[2], ProtocolVersion::V5);

    // A forgotten alias can't be used any more.
    let mut decoder = Decoder::client_to_broker(Limits::default());
    decoder.feed(&stream[..stream.len() - 10]);
    while decoder.next_frame().unwrap().is_some() {}
    decoder.forget_topic_alias(1);
    decoder.feed(&stream[stream.len() - 10..]);
    assert_eq!(
        decoder.next_frame().unwrap_err().kind,
        ErrorKind::TopicAliasInvalid
    );
}

#[test]
fn v5_topic_alias_rules() {
    let v5 = ProtocolVersion::V5;
    // Unknown alias.
    let error = client_packet(v5, b"\x30\x08\x00\x00\x03\x23\x00\x02hi").unwrap_err();
    assert_eq!(error.kind, ErrorKind::TopicAliasInvalid);
    assert_eq!(error.disconnect_reason_code(), reason::TOPIC_ALIAS_INVALID);
    // Above the limit (10 by default).
    assert_eq!(
        kind_of(client_packet(v5, b"\x30\x0b\x00\x03a/b\x03\x23\x00\x0bhi")),
        ErrorKind::TopicAliasInvalid
    );
    // 0.
    assert_eq!(
        kind_of(client_packet(v5, b"\x30\x0b\x00\x03a/b\x03\x23\x00\x00hi")),
        ErrorKind::ProtocolError
    );
    // A client's PUBLISH carries no subscription identifier (MQTT-3.3.4-6); a broker's may
    // carry several.
    let with_ids = b"\x30\x0a\x00\x03a/b\x04\x0b\x01\x0b\x02";
    assert_eq!(
        kind_of(client_packet(v5, with_ids)),
        ErrorKind::ProtocolError
    );
    let frame = broker_packet(v5, with_ids).unwrap();
    let Packet::Publish(publish) = &frame.packet else {
        panic!("not a PUBLISH")
    };
    assert_eq!(
        publish
            .properties
            .subscription_identifiers()
            .collect::<Vec<_>>(),
        vec![1, 2]
    );
}

// ---- Acknowledgements ----

#[test]
fn publish_responses() {
    let v3 = ProtocolVersion::V311;
    let v5 = ProtocolVersion::V5;
    let puback = client_packet(v3, b"\x40\x02\x00\x0a").unwrap();
    assert_eq!(
        puback.packet,
        Packet::PubAck(PublishResponse {
            packet_id: 10,
            reason_code: 0,
            properties: Properties::new()
        })
    );
    assert_reencodes(&puback, v3);
    let pubrec = client_packet(v5, b"\x50\x03\x00\x0a\x10").unwrap();
    assert_eq!(
        pubrec.packet,
        Packet::PubRec(PublishResponse {
            packet_id: 10,
            reason_code: reason::NO_MATCHING_SUBSCRIBERS,
            properties: Properties::new()
        })
    );
    assert_reencodes(&pubrec, v5);
    let with_reason_string = client_packet(v5, b"\x70\x08\x00\x0a\x92\x04\x1f\x00\x01x").unwrap();
    let Packet::PubComp(pubcomp) = &with_reason_string.packet else {
        panic!("not a PUBCOMP")
    };
    assert_eq!(pubcomp.properties.reason_string(), Some("x"));
    assert_reencodes(&with_reason_string, v5);
    // The long form of "success, no properties" is accepted, and encoded in the short form.
    let long_form = client_packet(v5, b"\x40\x04\x00\x0a\x00\x00").unwrap();
    assert_eq!(long_form.packet, puback.packet);
    assert_eq!(encode(&long_form.packet, v5).unwrap(), b"\x40\x02\x00\x0a");
    // Packet identifier 0.
    assert_eq!(
        kind_of(client_packet(v3, b"\x40\x02\x00\x00")),
        ErrorKind::Malformed
    );
    // Topic alias is not a PUBACK property.
    assert_eq!(
        kind_of(client_packet(v5, b"\x40\x07\x00\x0a\x00\x03\x23\x00\x01")),
        ErrorKind::Malformed
    );
}

#[test]
fn connack_v311_and_v5() {
    let v3 = broker_packet_first(ProtocolVersion::V311, b"\x20\x02\x01\x00").unwrap();
    assert_eq!(
        v3.packet,
        Packet::ConnAck(ConnAck {
            session_present: true,
            code: 0,
            properties: Properties::new()
        })
    );
    assert_reencodes(&v3, ProtocolVersion::V311);
    // Mosquitto's v5 CONNACK: topic alias maximum 10, receive maximum 20.
    let v5 = broker_packet_first(
        ProtocolVersion::V5,
        b"\x20\x09\x00\x00\x06\x22\x00\x0a\x21\x00\x14",
    )
    .unwrap();
    let Packet::ConnAck(connack) = &v5.packet else {
        panic!("not a CONNACK")
    };
    assert_eq!(connack.properties.topic_alias_maximum(), Some(10));
    assert_reencodes(&v5, ProtocolVersion::V5);
    // Reserved flags; session present with a refusal.
    assert_eq!(
        kind_of(broker_packet_first(
            ProtocolVersion::V311,
            b"\x20\x02\x02\x00"
        )),
        ErrorKind::Malformed
    );
    assert_eq!(
        kind_of(broker_packet_first(
            ProtocolVersion::V311,
            b"\x20\x02\x01\x05"
        )),
        ErrorKind::ProtocolError
    );
    // A v5 CONNACK needs its property length.
    assert_eq!(
        kind_of(broker_packet_first(
            ProtocolVersion::V5,
            b"\x20\x02\x00\x00"
        )),
        ErrorKind::Malformed
    );
}

fn broker_packet_first(version: ProtocolVersion, raw: &[u8]) -> Result<Frame, MqttError> {
    let mut decoder = Decoder::broker_to_client(Limits::default());
    decoder.set_version(version);
    decoder.feed(raw);
    Ok(decoder.next_frame()?.expect("a complete packet"))
}

#[test]
fn v5_auth_before_connack_is_allowed() {
    // AUTH continue authentication, method "SCRAM", data 0xAB 0xCD.
    let raw = b"\xf0\x0f\x18\x0d\x15\x00\x05SCRAM\x16\x00\x02\xab\xcd";
    let frame = broker_packet_first(ProtocolVersion::V5, raw).unwrap();
    let Packet::Auth(auth) = &frame.packet else {
        panic!("not an AUTH")
    };
    assert_eq!(auth.reason_code, reason::CONTINUE_AUTHENTICATION);
    assert_eq!(auth.properties.authentication_method(), Some("SCRAM"));
    assert_eq!(
        auth.properties.authentication_data(),
        Some(&[0xab, 0xcd][..])
    );
    assert_reencodes(&frame, ProtocolVersion::V5);
    assert!(client_packet(ProtocolVersion::V5, raw).is_ok());
}

// ---- SUBSCRIBE and friends ----

#[test]
fn subscribe_v311_with_two_filters() {
    let frame = client_packet(
        ProtocolVersion::V311,
        b"\x82\x0e\x00\x01\x00\x03a/b\x00\x00\x03c/#\x01",
    )
    .unwrap();
    assert_eq!(
        frame.packet,
        Packet::Subscribe(Subscribe {
            packet_id: 1,
            properties: Properties::new(),
            filters: vec![
                Subscription {
                    filter: "a/b".into(),
                    options: SubscriptionOptions::qos(QoS::AtMostOnce)
                },
                Subscription {
                    filter: "c/#".into(),
                    options: SubscriptionOptions::qos(QoS::AtLeastOnce)
                },
            ],
        })
    );
    assert_reencodes(&frame, ProtocolVersion::V311);
}

#[test]
fn subscribe_v5_with_options_and_subscription_identifier() {
    // Subscription identifier 5; QoS 1, no local, retain as published, retain handling 2.
    let frame = client_packet(
        ProtocolVersion::V5,
        b"\x82\x0b\x00\x02\x02\x0b\x05\x00\x03a/+\x2d",
    )
    .unwrap();
    assert_eq!(
        frame.packet,
        Packet::Subscribe(Subscribe {
            packet_id: 2,
            properties: Properties(vec![Property::SubscriptionIdentifier(5)]),
            filters: vec![Subscription {
                filter: "a/+".into(),
                options: SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    no_local: true,
                    retain_as_published: true,
                    retain_handling: 2,
                },
            }],
        })
    );
    assert_reencodes(&frame, ProtocolVersion::V5);
}

#[test]
fn subscribe_rules() {
    let v3 = ProtocolVersion::V311;
    let v5 = ProtocolVersion::V5;
    let subscribe = |version, filter: &[u8], options: u8| {
        let mut raw = vec![0x82, 0, 0, 1];
        if version == ProtocolVersion::V5 {
            raw.push(0);
        }
        raw.extend_from_slice(&[0, u8::try_from(filter.len()).unwrap()]);
        raw.extend_from_slice(filter);
        raw.push(options);
        raw[1] = u8::try_from(raw.len() - 2).unwrap();
        client_packet(version, &raw)
    };
    for valid in [
        &b"#"[..],
        b"+",
        b"a/#",
        b"+/+/#",
        b"/",
        b"a//b",
        b"$share/g/a/+",
        b"$SYS/#",
    ] {
        assert!(subscribe(v3, valid, 0).is_ok(), "{valid:?}");
    }
    for invalid in [
        &b""[..],
        b"a/#/b",
        b"a#",
        b"a/b#",
        b"a+",
        b"a/+b/c",
        b"$share/g",
        b"$share//a",
        b"$share/g+/a",
        b"$share/g/",
        b"a\x00b",
    ] {
        assert_eq!(
            kind_of(subscribe(v3, invalid, 0)),
            ErrorKind::Malformed,
            "{invalid:?}"
        );
    }
    // QoS 3; reserved option bits (3.1.1: all but QoS; 5.0: the top two).
    assert_eq!(kind_of(subscribe(v3, b"a", 3)), ErrorKind::Malformed);
    assert_eq!(kind_of(subscribe(v3, b"a", 0x04)), ErrorKind::Malformed);
    assert!(subscribe(v5, b"a", 0x2d).is_ok());
    assert_eq!(kind_of(subscribe(v5, b"a", 0x40)), ErrorKind::Malformed);
    // Retain handling 3; no local on a shared subscription.
    assert_eq!(kind_of(subscribe(v5, b"a", 0x30)), ErrorKind::ProtocolError);
    assert_eq!(
        kind_of(subscribe(v5, b"$share/g/a", 0x04)),
        ErrorKind::ProtocolError
    );
    // No filters; packet identifier 0; a filter without its options byte.
    assert_eq!(
        kind_of(client_packet(v3, b"\x82\x02\x00\x01")),
        ErrorKind::ProtocolError
    );
    assert_eq!(
        kind_of(client_packet(v3, b"\x82\x06\x00\x00\x00\x01a\x00")),
        ErrorKind::Malformed
    );
    assert_eq!(
        kind_of(client_packet(v3, b"\x82\x05\x00\x01\x00\x01a")),
        ErrorKind::Malformed
    );
    // A second subscription identifier.
    assert_eq!(
        kind_of(client_packet(
            v5,
            b"\x82\x0b\x00\x01\x04\x0b\x01\x0b\x02\x00\x01a\x00"
        )),
        ErrorKind::ProtocolError
    );
    assert_eq!(shared_subscription("$share/g/a/+"), Some(("g", "a/+")));
    assert_eq!(shared_subscription("a/+"), None);
}

#[test]
fn suback_v311_and_v5() {
    let v3 = broker_packet(ProtocolVersion::V311, b"\x90\x04\x00\x01\x00\x80").unwrap();
    assert_eq!(
        v3.packet,
        Packet::SubAck(SubAck {
            packet_id: 1,
            properties: Properties::new(),
            codes: vec![0x00, v3_suback::FAILURE]
        })
    );
    assert_reencodes(&v3, ProtocolVersion::V311);
    let v5 = broker_packet(ProtocolVersion::V5, b"\x90\x04\x00\x02\x00\x01").unwrap();
    assert_eq!(
        v5.packet,
        Packet::SubAck(SubAck {
            packet_id: 2,
            properties: Properties::new(),
            codes: vec![0x01]
        })
    );
    assert_reencodes(&v5, ProtocolVersion::V5);
    // 3.1.1 return codes other than 0, 1, 2, 0x80 are reserved; no codes at all.
    assert_eq!(
        kind_of(broker_packet(
            ProtocolVersion::V311,
            b"\x90\x03\x00\x01\x87"
        )),
        ErrorKind::Malformed
    );
    assert_eq!(
        kind_of(broker_packet(ProtocolVersion::V311, b"\x90\x02\x00\x01")),
        ErrorKind::ProtocolError
    );
}

#[test]
fn unsubscribe_and_unsuback() {
    let unsubscribe = client_packet(ProtocolVersion::V311, b"\xa2\x05\x00\x03\x00\x01a").unwrap();
    assert_eq!(
        unsubscribe.packet,
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 3,
            properties: Properties::new(),
            filters: vec!["a".into()]
        })
    );
    assert_reencodes(&unsubscribe, ProtocolVersion::V311);
    assert_eq!(
        kind_of(client_packet(ProtocolVersion::V311, b"\xa2\x02\x00\x03")),
        ErrorKind::ProtocolError
    );
    assert_eq!(
        kind_of(client_packet(
            ProtocolVersion::V311,
            b"\xa2\x05\x00\x03\x00\x01+a"
        )),
        ErrorKind::Malformed
    );
    let v3 = broker_packet(ProtocolVersion::V311, b"\xb0\x02\x00\x03").unwrap();
    assert_reencodes(&v3, ProtocolVersion::V311);
    // 3.1.1 has no reason codes: a byte after the identifier is left over.
    assert_eq!(
        kind_of(broker_packet(
            ProtocolVersion::V311,
            b"\xb0\x03\x00\x03\x00"
        )),
        ErrorKind::Malformed
    );
    let v5 = broker_packet(ProtocolVersion::V5, b"\xb0\x04\x00\x03\x00\x11").unwrap();
    assert_eq!(
        v5.packet,
        Packet::UnsubAck(UnsubAck {
            packet_id: 3,
            properties: Properties::new(),
            codes: vec![0x11]
        })
    );
    assert_reencodes(&v5, ProtocolVersion::V5);
}

#[test]
fn ping_and_disconnect() {
    let ping = client_packet(ProtocolVersion::V311, b"\xc0\x00").unwrap();
    assert_eq!(ping.packet, Packet::PingReq);
    assert_reencodes(&ping, ProtocolVersion::V311);
    let pong = broker_packet(ProtocolVersion::V311, b"\xd0\x00").unwrap();
    assert_eq!(pong.packet, Packet::PingResp);
    let v3 = client_packet(ProtocolVersion::V311, b"\xe0\x00").unwrap();
    assert_eq!(
        v3.packet,
        Packet::Disconnect(Disconnect {
            reason_code: 0,
            properties: Properties::new()
        })
    );
    assert_reencodes(&v3, ProtocolVersion::V311);
    // Disconnect with will message, session expiry 0.
    let v5 = client_packet(ProtocolVersion::V5, b"\xe0\x07\x04\x05\x11\x00\x00\x00\x00").unwrap();
    assert_eq!(
        v5.packet,
        Packet::Disconnect(Disconnect {
            reason_code: 0x04,
            properties: Properties(vec![Property::SessionExpiryInterval(0)])
        })
    );
    assert_reencodes(&v5, ProtocolVersion::V5);
}

// ---- Encoders ----

#[test]
fn refusing_connacks() {
    assert_eq!(
        encode_connack(ProtocolVersion::V311, v3_connack::BAD_USERNAME_OR_PASSWORD),
        b"\x20\x02\x00\x04"
    );
    assert_eq!(
        encode_connack(ProtocolVersion::V311, v3_connack::NOT_AUTHORIZED),
        b"\x20\x02\x00\x05"
    );
    assert_eq!(
        encode_connack(ProtocolVersion::V5, reason::BAD_USER_NAME_OR_PASSWORD),
        b"\x20\x03\x00\x86\x00"
    );
    assert_eq!(
        encode_connack(ProtocolVersion::V5, reason::NOT_AUTHORIZED),
        b"\x20\x03\x00\x87\x00"
    );
    for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
        let mut decoder = Decoder::broker_to_client(Limits::default());
        decoder.set_version(version);
        decoder.feed(&encode_connack(version, 0x05));
        assert!(matches!(
            decoder.next_frame().unwrap().unwrap().packet,
            Packet::ConnAck(ConnAck {
                code: 0x05,
                session_present: false,
                ..
            })
        ));
    }
}

#[test]
fn reason_code_values() {
    assert_eq!(v3_connack::UNACCEPTABLE_PROTOCOL_VERSION, 0x01);
    assert_eq!(reason::UNSUPPORTED_PROTOCOL_VERSION, 0x84);
    assert_eq!(reason::PACKET_TOO_LARGE, 0x95);
    assert_eq!(reason::BAD_AUTHENTICATION_METHOD, 0x8C);
    assert_eq!(reason::MALFORMED_PACKET, 0x81);
    assert_eq!(reason::PROTOCOL_ERROR, 0x82);
    assert_eq!(reason::MAXIMUM_CONNECT_TIME, 0xA0);
}

#[test]
fn subacks_and_disconnects() {
    assert_eq!(
        encode_suback(ProtocolVersion::V311, 7, &[0x01, v3_suback::FAILURE]).unwrap(),
        b"\x90\x04\x00\x07\x01\x80"
    );
    assert_eq!(
        encode_suback(ProtocolVersion::V5, 7, &[reason::NOT_AUTHORIZED]).unwrap(),
        b"\x90\x04\x00\x07\x00\x87"
    );
    assert_eq!(
        encode_disconnect_v5(reason::NOT_AUTHORIZED),
        b"\xe0\x01\x87"
    );
    assert_eq!(
        encode_disconnect_v5(reason::NORMAL_DISCONNECTION),
        b"\xe0\x00"
    );
    let frame = broker_packet(
        ProtocolVersion::V5,
        &encode_disconnect_v5(reason::MAXIMUM_CONNECT_TIME),
    )
    .unwrap();
    assert!(matches!(
        frame.packet,
        Packet::Disconnect(Disconnect {
            reason_code: 0xA0,
            ..
        })
    ));
}

#[test]
fn forwarding_a_subscribe_without_refused_filters() {
    let original = b"\x82\x11\x00\x02\x02\x0b\x05\x00\x03a/+\x2d\x00\x03s/#\x01";
    let frame = client_packet(ProtocolVersion::V5, original).unwrap();
    let Packet::Subscribe(mut subscribe) = frame.packet else {
        panic!("not a SUBSCRIBE")
    };
    subscribe.filters.retain(|s| !s.filter.starts_with("s/"));
    assert_eq!(
        encode_subscribe(ProtocolVersion::V5, &subscribe).unwrap(),
        b"\x82\x0b\x00\x02\x02\x0b\x05\x00\x03a/+\x2d"
    );
    // The broker grants the forwarded filter; the client gets a code per original filter.
    assert_eq!(
        splice_suback_codes(&[0x01], &[false, true], reason::NOT_AUTHORIZED),
        Some(vec![0x01, 0x87])
    );
    assert_eq!(
        splice_suback_codes(&[], &[true, true], 0x80),
        Some(vec![0x80, 0x80])
    );
    assert_eq!(
        splice_suback_codes(&[0x01, 0x02], &[false, true], 0x80),
        None
    );
    assert_eq!(splice_suback_codes(&[], &[false], 0x80), None);
}

#[test]
fn encoding_refuses_what_the_version_cannot_carry() {
    let v3 = ProtocolVersion::V311;
    let with_reason = Packet::PubAck(PublishResponse {
        packet_id: 1,
        reason_code: 0x87,
        properties: Properties::new(),
    });
    assert_eq!(kind_of(encode(&with_reason, v3)), ErrorKind::CannotEncode);
    let auth = Packet::Auth(Auth {
        reason_code: 0,
        properties: Properties::new(),
    });
    assert_eq!(kind_of(encode(&auth, v3)), ErrorKind::CannotEncode);
    let publish = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: "t".into(),
        packet_id: None,
        properties: Properties::new(),
        payload: Vec::new(),
    });
    assert_eq!(kind_of(encode(&publish, v3)), ErrorKind::CannotEncode);
    let long_topic = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: "t".repeat(65_536),
        packet_id: None,
        properties: Properties::new(),
        payload: Vec::new(),
    });
    assert_eq!(kind_of(encode(&long_topic, v3)), ErrorKind::CannotEncode);
}

#[test]
fn decode_packet_needs_exactly_one_packet() {
    let v3 = ProtocolVersion::V311;
    assert_eq!(decode_packet(b"\xc0\x00", v3), Ok(Packet::PingReq));
    assert_eq!(
        kind_of(decode_packet(b"\xc0\x00\x00", v3)),
        ErrorKind::Malformed
    );
    assert_eq!(
        kind_of(decode_packet(b"\x40\x02\x00", v3)),
        ErrorKind::Malformed
    );
    assert_eq!(kind_of(decode_packet(b"", v3)), ErrorKind::Malformed);
}

/// Both directions of sessions through mosquitto 2.0.11 (broker) with its clients, captured
/// by a proxy; each string one packet.
#[test]
fn captured_mosquitto_broker_sessions() {
    struct Session {
        version: ProtocolVersion,
        client: &'static [&'static str],
        broker: &'static [&'static str],
    }
    let sessions = [
        // mosquitto_sub -V 5 -i s5 -t 'a/+' -q 1, a retained message on a/r, then publishes
        // to a/x (with a user property) and a/b.
        Session {
            version: ProtocolVersion::V5,
            client: &[
                "101200044d5154540502003c0321001400027335",
                "82090001000003612f2b01",
                "40020001",
                "40020002",
                "40020003",
                "e00104",
            ],
            broker: &[
                "200900000622000a210014",
                "900400010001",
                "33100003612f7200010072657461696e6564",
                "32130003612f780002072600016b0001766c697665",
                "320d0003612f6200030068656c6c6f",
            ],
        },
        // mosquitto_sub -V mqttv311 -i s3 -t 'a/+' -t 'b/#' -q 2
        Session {
            version: ProtocolVersion::V311,
            client: &[
                "100e00044d5154540402003c00027333",
                "820e00010003612f2b020003622f2302",
                "40020001",
                "e000",
            ],
            broker: &[
                "20020000",
                "900400010202",
                "330f0003612f72000172657461696e6564",
            ],
        },
        // mosquitto_pub -V 5 -t a/b -m hello -q 2 (no client id: the broker assigns one)
        Session {
            version: ProtocolVersion::V5,
            client: &[
                "101000044d5154540502003c032100140000",
                "340d0003612f6200010068656c6c6f",
                "62020001",
                "e000",
            ],
            broker: &[
                "203500003222000a1200296175746f2d31463733304635382d314232332d334535392d383344322d303430363942344645444541210014",
                "50020001",
                "70020001",
            ],
        },
    ];
    for session in &sessions {
        let client: Vec<Vec<u8>> = session.client.iter().map(|p| hex(p)).collect();
        let broker: Vec<Vec<u8>> = session.broker.iter().map(|p| hex(p)).collect();
        let client_frames = client_frames(&client.concat()).unwrap();
        let mut decoder = Decoder::broker_to_client(Limits::default());
        decoder.set_version(session.version);
        decoder.feed(&broker.concat());
        let mut broker_frames = Vec::new();
        while let Some(frame) = decoder.next_frame().unwrap() {
            broker_frames.push(frame);
        }
        for (frames, packets) in [(&client_frames, &client), (&broker_frames, &broker)] {
            assert_eq!(frames.len(), packets.len());
            for (frame, raw) in frames.iter().zip(packets) {
                assert_eq!(&frame.raw, raw);
                assert_reencodes(frame, session.version);
            }
        }
    }

    let connack = decode_packet(&hex(sessions[2].broker[0]), ProtocolVersion::V5).unwrap();
    let Packet::ConnAck(connack) = connack else {
        panic!("not a CONNACK")
    };
    assert_eq!(
        connack.properties.0,
        vec![
            Property::TopicAliasMaximum(10),
            Property::AssignedClientIdentifier("auto-1F730F58-1B23-3E59-83D2-04069B4FEDEA".into()),
            Property::ReceiveMaximum(20),
        ]
    );
    let publish = decode_packet(&hex(sessions[0].broker[3]), ProtocolVersion::V5).unwrap();
    assert_eq!(
        publish,
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: "a/x".into(),
            packet_id: Some(2),
            properties: Properties(vec![Property::UserProperty("k".into(), "v".into())]),
            payload: b"live".to_vec(),
        })
    );
    let suback = decode_packet(&hex(sessions[1].broker[1]), ProtocolVersion::V311).unwrap();
    assert_eq!(
        suback,
        Packet::SubAck(SubAck {
            packet_id: 1,
            properties: Properties::new(),
            codes: vec![2, 2]
        })
    );
}
