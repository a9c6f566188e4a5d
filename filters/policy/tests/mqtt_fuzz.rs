//! Property tests of the MQTT codec, and the project's fuzz target: cargo-fuzz needs a nightly
//! toolchain, which this project does not use, so fuzzing is these proptest cases run longer.
//!
//! ```text
//! cargo test -p policy --test mqtt_fuzz                                  # 256 cases each
//! PROPTEST_CASES=100000 cargo test --release -p policy --test mqtt_fuzz  # a fuzz run
//! ```
//!
//! `PROPTEST_CASES` sets the number of cases of each property (never below 256); 100,000 take
//! about 30 s in release. A failure prints its (shrunk) input; no regression file is written.
//!
//! 1. Arbitrary bytes, and mutated valid streams, fed in arbitrary chunks never panic, never
//!    loop, keep the buffer bounded, and every frame they yield is consistent.
//! 2. A valid packet stream split at arbitrary points decodes to the same frames, with the same
//!    raw bytes, as fed in one piece.
//! 3. Generated packets round-trip: decode(encode(p)) == p.

// Test code: helpers outside #[test] functions may panic too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use policy::mqtt::{
    decode_packet, encode, Auth, ConnAck, Connect, Decoder, Disconnect, Frame, Limits, MqttError,
    Packet, Properties, Property, ProtocolVersion, Publish, PublishResponse, QoS, SubAck,
    Subscribe, Subscription, SubscriptionOptions, UnsubAck, Unsubscribe, Will,
};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

const V3: ProtocolVersion = ProtocolVersion::V311;
const V5: ProtocolVersion = ProtocolVersion::V5;

fn config() -> ProptestConfig {
    // At least 256 cases (proptest's default); PROPTEST_CASES raises it for fuzz runs.
    let from_env = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    ProptestConfig {
        cases: from_env.max(256),
        // No regression files written into the source tree; a failure prints its input.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---- Generators of valid packets ----

fn version() -> impl Strategy<Value = ProtocolVersion> {
    prop_oneof![Just(V3), Just(V5)]
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

/// Strings as clients send them: ASCII, some multi-byte UTF-8, never U+0000.
fn text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 _/é€😀-]{0,12}"
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..24)
}

fn topic_name() -> impl Strategy<Value = String> {
    "[a-z$é]{1,4}(/[a-z0-9]{0,4}){0,3}"
}

fn topic_filter() -> impl Strategy<Value = String> {
    let level = prop_oneof![Just("+".to_string()), "[a-z0-9]{0,4}"];
    (option::of("[a-z]{1,3}"), vec(level, 1..4), any::<bool>()).prop_map(
        |(share, levels, multi_level)| {
            let mut filter = levels.join("/");
            if filter.is_empty() {
                filter.push('a');
            }
            if multi_level {
                filter.push_str("/#");
            }
            match share {
                Some(name) => format!("$share/{name}/{filter}"),
                None => filter,
            }
        },
    )
}

fn packet_id() -> impl Strategy<Value = u16> {
    1..=u16::MAX
}

fn user_properties() -> impl Strategy<Value = Vec<Property>> {
    vec(
        (text(), text()).prop_map(|(k, v)| Property::UserProperty(k, v)),
        0..3,
    )
}

/// A valid property list: each optional single-valued property at most once, user properties.
fn property_list(singles: Vec<BoxedStrategy<Property>>) -> impl Strategy<Value = Properties> {
    let optional: Vec<_> = singles.into_iter().map(option::of).collect();
    (optional, user_properties()).prop_map(|(singles, users)| {
        Properties(singles.into_iter().flatten().chain(users).collect())
    })
}

fn for_version(
    version: ProtocolVersion,
    v5: BoxedStrategy<Properties>,
) -> BoxedStrategy<Properties> {
    match version {
        ProtocolVersion::V311 => Just(Properties::new()).boxed(),
        ProtocolVersion::V5 => v5,
    }
}

fn reason_string() -> BoxedStrategy<Property> {
    text().prop_map(Property::ReasonString).boxed()
}

fn publish_properties(from_broker: bool) -> BoxedStrategy<Properties> {
    let singles = vec![
        (0u8..=1).prop_map(Property::PayloadFormatIndicator).boxed(),
        any::<u32>()
            .prop_map(Property::MessageExpiryInterval)
            .boxed(),
        text().prop_map(Property::ContentType).boxed(),
        topic_name().prop_map(Property::ResponseTopic).boxed(),
        bytes().prop_map(Property::CorrelationData).boxed(),
        // Within the default Topic Alias Maximum (10); the topic is never empty here.
        (1u16..=10).prop_map(Property::TopicAlias).boxed(),
    ];
    let subscription_ids = if from_broker {
        vec(1u32..=268_435_455, 0..3).boxed()
    } else {
        Just(Vec::new()).boxed()
    };
    (property_list(singles), subscription_ids)
        .prop_map(|(mut properties, ids)| {
            properties
                .0
                .extend(ids.into_iter().map(Property::SubscriptionIdentifier));
            properties
        })
        .boxed()
}

fn connect() -> impl Strategy<Value = Connect> {
    let will = (
        topic_name(),
        bytes(),
        qos(),
        any::<bool>(),
        property_list(vec![
            any::<u32>().prop_map(Property::WillDelayInterval).boxed(),
            (0u8..=1).prop_map(Property::PayloadFormatIndicator).boxed(),
            topic_name().prop_map(Property::ResponseTopic).boxed(),
        ]),
    );
    let v5_properties = (
        property_list(vec![
            any::<u32>()
                .prop_map(Property::SessionExpiryInterval)
                .boxed(),
            (1u16..).prop_map(Property::ReceiveMaximum).boxed(),
            any::<u16>().prop_map(Property::TopicAliasMaximum).boxed(),
            (1u32..).prop_map(Property::MaximumPacketSize).boxed(),
            (0u8..=1)
                .prop_map(Property::RequestProblemInformation)
                .boxed(),
        ]),
        option::of((text(), option::of(bytes()))),
    )
        .prop_map(|(mut properties, auth)| {
            if let Some((method, data)) = auth {
                properties.0.push(Property::AuthenticationMethod(method));
                properties.0.extend(data.map(Property::AuthenticationData));
            }
            properties
        });
    (
        version(),
        text(),
        any::<bool>(),
        any::<u16>(),
        option::of(text()),
        option::of(bytes()),
        option::of(will),
        v5_properties,
        any::<bool>(),
    )
        .prop_map(
            |(
                version,
                client_id,
                clean_start,
                keep_alive,
                username,
                password,
                will,
                properties,
                bridge,
            )| {
                let v5 = version == V5;
                Connect {
                    version,
                    bridge,
                    client_id,
                    clean_start,
                    keep_alive,
                    // 3.1.1: no password without a user name.
                    password: if v5 || username.is_some() {
                        password
                    } else {
                        None
                    },
                    username,
                    will: will.map(|(topic, payload, qos, retain, properties)| Will {
                        topic,
                        payload,
                        qos,
                        retain,
                        properties: if v5 { properties } else { Properties::new() },
                    }),
                    properties: if v5 { properties } else { Properties::new() },
                }
            },
        )
}

fn publish(version: ProtocolVersion, from_broker: bool) -> impl Strategy<Value = Packet> {
    (
        qos(),
        any::<bool>(),
        any::<bool>(),
        topic_name(),
        packet_id(),
        for_version(version, publish_properties(from_broker)),
        vec(any::<u8>(), 0..64),
    )
        .prop_map(|(qos, dup, retain, topic, id, properties, payload)| {
            let at_most_once = qos == QoS::AtMostOnce;
            Packet::Publish(Publish {
                dup: dup && !at_most_once,
                qos,
                retain,
                topic,
                packet_id: (!at_most_once).then_some(id),
                properties,
                payload,
            })
        })
}

fn publish_response(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let reason = match version {
        ProtocolVersion::V311 => Just(0u8).boxed(),
        ProtocolVersion::V5 => prop_oneof![Just(0u8), any::<u8>()].boxed(),
    };
    (
        0..4u8,
        packet_id(),
        reason,
        for_version(version, property_list(vec![reason_string()]).boxed()),
    )
        .prop_map(|(kind, packet_id, reason_code, properties)| {
            let response = PublishResponse {
                packet_id,
                reason_code,
                properties,
            };
            match kind {
                0 => Packet::PubAck(response),
                1 => Packet::PubRec(response),
                2 => Packet::PubRel(response),
                _ => Packet::PubComp(response),
            }
        })
}

fn subscription(version: ProtocolVersion) -> impl Strategy<Value = Subscription> {
    (topic_filter(), qos(), any::<bool>(), any::<bool>(), 0u8..=2).prop_map(
        move |(filter, qos, no_local, retain_as_published, retain_handling)| {
            let options = match version {
                ProtocolVersion::V311 => SubscriptionOptions::qos(qos),
                ProtocolVersion::V5 => SubscriptionOptions {
                    qos,
                    // No Local is a protocol error on shared subscriptions.
                    no_local: no_local && !filter.starts_with("$share/"),
                    retain_as_published,
                    retain_handling,
                },
            };
            Subscription { filter, options }
        },
    )
}

fn client_packet(version: ProtocolVersion) -> BoxedStrategy<Packet> {
    let subscribe = (
        packet_id(),
        for_version(
            version,
            property_list(vec![(1u32..=268_435_455)
                .prop_map(Property::SubscriptionIdentifier)
                .boxed()])
            .boxed(),
        ),
        vec(subscription(version), 1..4),
    )
        .prop_map(|(packet_id, properties, filters)| {
            Packet::Subscribe(Subscribe {
                packet_id,
                properties,
                filters,
            })
        });
    let unsubscribe = (
        packet_id(),
        for_version(version, property_list(vec![]).boxed()),
        vec(topic_filter(), 1..4),
    )
        .prop_map(|(packet_id, properties, filters)| {
            Packet::Unsubscribe(Unsubscribe {
                packet_id,
                properties,
                filters,
            })
        });
    let common = prop_oneof![
        4 => publish(version, false),
        2 => publish_response(version),
        2 => subscribe,
        1 => unsubscribe,
        1 => Just(Packet::PingReq),
    ];
    match version {
        ProtocolVersion::V311 => prop_oneof![
            10 => common,
            1 => Just(Packet::Disconnect(Disconnect { reason_code: 0, properties: Properties::new() })),
        ]
        .boxed(),
        ProtocolVersion::V5 => prop_oneof![10 => common, 1 => disconnect_v5(), 1 => auth_v5()].boxed(),
    }
}

fn disconnect_v5() -> impl Strategy<Value = Packet> {
    (
        any::<u8>(),
        property_list(vec![
            any::<u32>()
                .prop_map(Property::SessionExpiryInterval)
                .boxed(),
            reason_string(),
            text().prop_map(Property::ServerReference).boxed(),
        ]),
    )
        .prop_map(|(reason_code, properties)| {
            Packet::Disconnect(Disconnect {
                reason_code,
                properties,
            })
        })
}

fn auth_v5() -> impl Strategy<Value = Packet> {
    (
        prop_oneof![Just(0x00u8), Just(0x18u8), Just(0x19u8)],
        property_list(vec![
            text().prop_map(Property::AuthenticationMethod).boxed(),
            bytes().prop_map(Property::AuthenticationData).boxed(),
            reason_string(),
        ]),
    )
        .prop_map(|(reason_code, properties)| {
            Packet::Auth(Auth {
                reason_code,
                properties,
            })
        })
}

fn connack(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    (
        any::<bool>(),
        prop_oneof![Just(0u8), 1u8..=5],
        for_version(
            version,
            property_list(vec![
                any::<u32>()
                    .prop_map(Property::SessionExpiryInterval)
                    .boxed(),
                text().prop_map(Property::AssignedClientIdentifier).boxed(),
                any::<u16>().prop_map(Property::ServerKeepAlive).boxed(),
                (1u16..).prop_map(Property::ReceiveMaximum).boxed(),
                any::<u16>().prop_map(Property::TopicAliasMaximum).boxed(),
                (0u8..=1).prop_map(Property::MaximumQos).boxed(),
                (0u8..=1).prop_map(Property::RetainAvailable).boxed(),
                (0u8..=1)
                    .prop_map(Property::WildcardSubscriptionAvailable)
                    .boxed(),
                (0u8..=1)
                    .prop_map(Property::SharedSubscriptionAvailable)
                    .boxed(),
                reason_string(),
            ])
            .boxed(),
        ),
    )
        .prop_map(|(session_present, code, properties)| {
            Packet::ConnAck(ConnAck {
                session_present: session_present && code == 0,
                code,
                properties,
            })
        })
}

fn broker_packet(version: ProtocolVersion) -> BoxedStrategy<Packet> {
    let suback_code = match version {
        ProtocolVersion::V311 => prop_oneof![Just(0u8), Just(1), Just(2), Just(0x80)].boxed(),
        ProtocolVersion::V5 => any::<u8>().boxed(),
    };
    let suback = (
        packet_id(),
        for_version(version, property_list(vec![reason_string()]).boxed()),
        vec(suback_code, 1..4),
    )
        .prop_map(|(packet_id, properties, codes)| {
            Packet::SubAck(SubAck {
                packet_id,
                properties,
                codes,
            })
        });
    let unsuback_codes = match version {
        ProtocolVersion::V311 => Just(Vec::new()).boxed(),
        ProtocolVersion::V5 => vec(any::<u8>(), 1..4).boxed(),
    };
    let unsuback = (
        packet_id(),
        for_version(version, property_list(vec![reason_string()]).boxed()),
        unsuback_codes,
    )
        .prop_map(|(packet_id, properties, codes)| {
            Packet::UnsubAck(UnsubAck {
                packet_id,
                properties,
                codes,
            })
        });
    let common = prop_oneof![
        4 => publish(version, true),
        2 => publish_response(version),
        2 => suback,
        1 => unsuback,
        1 => Just(Packet::PingResp),
    ];
    match version {
        ProtocolVersion::V311 => common.boxed(),
        ProtocolVersion::V5 => {
            prop_oneof![10 => common, 1 => disconnect_v5(), 1 => auth_v5()].boxed()
        }
    }
}

/// Which way a generated stream goes, with the packets in an order the decoder accepts.
#[derive(Debug, Clone)]
struct Stream {
    version: ProtocolVersion,
    from_client: bool,
    packets: Vec<Packet>,
}

impl Stream {
    fn decoder(&self, limits: Limits) -> Decoder {
        if self.from_client {
            Decoder::client_to_broker(limits)
        } else {
            let mut decoder = Decoder::broker_to_client(limits);
            decoder.set_version(self.version);
            decoder
        }
    }

    fn encoded(&self) -> Vec<Vec<u8>> {
        self.packets
            .iter()
            .map(|p| encode(p, self.version).expect("generated packets encode"))
            .collect()
    }
}

/// Nothing may follow a DISCONNECT: cut the stream after the first one.
fn end_at_disconnect(mut packets: Vec<Packet>) -> Vec<Packet> {
    if let Some(position) = packets
        .iter()
        .position(|p| matches!(p, Packet::Disconnect(_)))
    {
        packets.truncate(position + 1);
    }
    packets
}

fn stream() -> impl Strategy<Value = Stream> {
    (connect(), any::<bool>()).prop_flat_map(|(connect, from_client)| {
        let version = connect.version;
        if from_client {
            vec(client_packet(version), 0..8)
                .prop_map(move |rest| Stream {
                    version,
                    from_client,
                    packets: end_at_disconnect(
                        std::iter::once(Packet::Connect(connect.clone()))
                            .chain(rest)
                            .collect(),
                    ),
                })
                .boxed()
        } else {
            (connack(version), vec(broker_packet(version), 0..8))
                .prop_map(move |(first, rest)| Stream {
                    version,
                    from_client,
                    packets: end_at_disconnect(std::iter::once(first).chain(rest).collect()),
                })
                .boxed()
        }
    })
}

fn any_packet() -> impl Strategy<Value = (ProtocolVersion, Packet)> {
    version().prop_flat_map(|version| {
        prop_oneof![
            connect().prop_map(Packet::Connect).prop_map(|p| match &p {
                // A CONNECT carries its own version.
                Packet::Connect(c) => (c.version, p.clone()),
                _ => (V3, p.clone()),
            }),
            client_packet(version).prop_map(move |p| (version, p)),
            broker_packet(version).prop_map(move |p| (version, p)),
            connack(version).prop_map(move |p| (version, p)),
        ]
    })
}

// ---- Feeding helpers ----

/// Feeds `bytes` in chunks of the given sizes (cycled), draining frames after each feed, and
/// checks the invariants every decoder must keep whatever it is fed.
fn feed_in_chunks(
    decoder: &mut Decoder,
    bytes: &[u8],
    chunk_sizes: &[usize],
    limits: Limits,
) -> (Vec<Frame>, Option<MqttError>) {
    let mut frames = Vec::new();
    let mut rest = bytes;
    let mut sizes = chunk_sizes.iter().cycle();
    while !rest.is_empty() {
        let size = sizes.next().copied().unwrap_or(1).clamp(1, rest.len());
        let (chunk, tail) = rest.split_at(size);
        rest = tail;
        decoder.feed(chunk);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    // Every frame consumes at least its 2-byte fixed header: no endless loop.
                    assert!(frame.raw.len() >= 2);
                    assert!(frame.raw.len() <= limits.max_packet_bytes);
                    frames.push(frame);
                }
                Ok(None) => {
                    // At most one incomplete packet is buffered, and it fits the limit.
                    assert!(decoder.buffered_len() < limits.max_packet_bytes.max(5));
                    break;
                }
                Err(error) => {
                    // Sticky, and nothing is buffered any more.
                    assert_eq!(decoder.next_frame(), Err(error.clone()));
                    decoder.feed(rest);
                    assert_eq!(decoder.buffered_len(), 0);
                    return (frames, Some(error));
                }
            }
        }
    }
    (frames, None)
}

/// What holds for any frame the decoder yields: its bytes are the input's, in order, and they
/// decode alone to the same packet, which re-encodes to something decoding the same.
fn check_frames(input: &[u8], frames: &[Frame], version: Option<ProtocolVersion>) {
    let consumed: Vec<u8> = frames.iter().flat_map(|f| f.raw.iter().copied()).collect();
    assert!(input.starts_with(&consumed));
    for frame in frames {
        let version = match (&frame.packet, version) {
            (Packet::Connect(connect), _) => connect.version,
            (_, Some(version)) => version,
            (_, None) => panic!("a frame without a known version"),
        };
        assert_eq!(
            decode_packet(&frame.raw, version).as_ref(),
            Ok(&frame.packet)
        );
        let reencoded = encode(&frame.packet, version).expect("a decoded packet encodes");
        assert_eq!(
            decode_packet(&reencoded, version).as_ref(),
            Ok(&frame.packet)
        );
        assert!(reencoded.len() <= frame.raw.len());
        match &frame.packet {
            Packet::Publish(publish) => {
                let topic = frame
                    .effective_topic
                    .as_deref()
                    .expect("PUBLISH has a topic");
                assert!(!topic.is_empty() && !topic.contains(['+', '#', '\0']));
                if !publish.topic.is_empty() {
                    assert_eq!(topic, publish.topic);
                }
            }
            _ => assert_eq!(frame.effective_topic, None),
        }
    }
}

const SMALL_LIMITS: Limits = Limits {
    max_packet_bytes: 300,
    max_topic_aliases: 10,
};

proptest! {
    #![proptest_config(config())]

    /// (1) Arbitrary bytes, in either direction, after a valid CONNECT or not.
    #[test]
    fn arbitrary_bytes_never_panic(
        prefix in option::of(connect()),
        from_client in any::<bool>(),
        noise in vec(any::<u8>(), 0..1024),
        chunk_sizes in vec(1usize..80, 1..16),
    ) {
        let mut input = match &prefix {
            Some(connect) if from_client => {
                encode(&Packet::Connect(connect.clone()), connect.version).unwrap()
            }
            _ => Vec::new(),
        };
        input.extend_from_slice(&noise);
        let version = prefix.as_ref().map(|c| c.version);
        let mut decoder = if from_client {
            Decoder::client_to_broker(SMALL_LIMITS)
        } else {
            let mut decoder = Decoder::broker_to_client(SMALL_LIMITS);
            decoder.set_version(version.unwrap_or(V5));
            decoder
        };
        let (frames, _) = feed_in_chunks(&mut decoder, &input, &chunk_sizes, SMALL_LIMITS);
        check_frames(&input, &frames, decoder.version());
    }

    /// (1) Valid streams with a few bytes changed: reaches deep into every parser.
    #[test]
    fn mutated_streams_never_panic(
        stream in stream(),
        mutations in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        chunk_sizes in vec(1usize..80, 1..16),
    ) {
        let mut input = stream.encoded().concat();
        for (index, byte) in &mutations {
            let position = index.index(input.len());
            input[position] = *byte;
        }
        let limits = Limits::default();
        let mut decoder = stream.decoder(limits);
        let (frames, _) = feed_in_chunks(&mut decoder, &input, &chunk_sizes, limits);
        check_frames(&input, &frames, decoder.version());
    }

    /// (2) A valid stream split anywhere gives the same frames as in one piece.
    #[test]
    fn valid_streams_decode_the_same_however_split(
        stream in stream(),
        chunk_sizes in vec(1usize..40, 1..16),
    ) {
        let encoded = stream.encoded();
        let input = encoded.concat();
        let limits = Limits::default();

        let mut whole_decoder = stream.decoder(limits);
        let (whole, error) = feed_in_chunks(&mut whole_decoder, &input, &[input.len().max(1)], limits);
        prop_assert_eq!(error, None);
        let mut split_decoder = stream.decoder(limits);
        let (split, error) = feed_in_chunks(&mut split_decoder, &input, &chunk_sizes, limits);
        prop_assert_eq!(error, None);

        prop_assert_eq!(&split, &whole);
        prop_assert_eq!(split.len(), stream.packets.len());
        for ((frame, packet), raw) in split.iter().zip(&stream.packets).zip(&encoded) {
            prop_assert_eq!(&frame.packet, packet);
            prop_assert_eq!(&frame.raw, raw);
        }
        prop_assert_eq!(split_decoder.buffered_len(), 0);
        check_frames(&input, &split, Some(stream.version));
    }

    /// (3) decode(encode(p)) == p, and encoding what was decoded gives the same bytes.
    #[test]
    fn generated_packets_round_trip((version, packet) in any_packet()) {
        let raw = encode(&packet, version).unwrap();
        let decoded = decode_packet(&raw, version).unwrap();
        prop_assert_eq!(&decoded, &packet);
        prop_assert_eq!(encode(&decoded, version).unwrap(), raw);
    }
}
