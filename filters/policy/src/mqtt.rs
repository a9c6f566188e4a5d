//! MQTT 3.1.1 and 5.0 codec for the mqtt-acl network filter: an incremental decoder per
//! direction that yields each packet together with its exact bytes (allowed packets are
//! forwarded byte for byte), and encoders for the packets the filter writes itself.
//!
//! # Supported
//! - MQTT 3.1.1 (protocol level 4) and MQTT 5.0 (level 5), every packet type, both directions.
//! - Mosquitto's bridge flag: a bridge with `try_private true` (Mosquitto's default) sends
//!   protocol level 0x84 (0x80 | 4) so that the remote broker knows it is a bridge (loop
//!   detection, retained flags kept). Levels 0x84 and 0x85 are read as 3.1.1 and 5.0 with
//!   [`Connect::bridge`] set, and re-encoded with the bit (see [`Connect::bridge`]).
//! - Packets split across reads at any byte, several packets in one read.
//! - v5 properties: every property of the spec, checked against the packets that may carry it,
//!   with duplicates of single-valued properties refused.
//! - v5 topic aliases: the [`Decoder`] of each direction keeps the alias map of that direction and
//!   gives each PUBLISH's effective topic in [`Frame::effective_topic`] (the packet itself keeps
//!   the topic as sent, empty when only an alias was sent). ACL checks must use the effective
//!   topic. See [`Decoder::forget_topic_alias`] for PUBLISHes the filter does not forward.
//!
//! # Refused, and why
//! - MQTT 3.1 (`MQIsdp`, level 3, also with the bridge flag: 0x83) and unknown levels:
//!   [`ErrorKind::UnsupportedVersion`], so the filter can answer with CONNACK 0x01 / 0x84.
//!   Nothing here is checked for 3.1.
//! - Packets larger than [`Limits::max_packet_bytes`] (counted with their fixed header): refused
//!   as soon as the remaining length is read, before buffering the body.
//! - Anything the specs call malformed or a protocol error that matters for an ACL decision:
//!   invalid UTF-8 or U+0000 in strings (MQTT-1.5.3-1/2), wildcards or empty topic names in
//!   PUBLISH and wills, invalid topic filters, SUBSCRIBE/UNSUBSCRIBE without filters, wrong
//!   fixed-header flags, QoS 3, DUP on QoS 0, zero packet identifiers, CONNECT reserved flag and
//!   will flag rules, a password without a user name in 3.1.1, reserved bits in subscription
//!   options, non-minimal or 5-byte variable byte integers, bytes left over or missing inside a
//!   packet, a first packet other than CONNECT, a second CONNECT, anything after DISCONNECT,
//!   packets sent in the wrong direction. A parser that is stricter than the broker can only refuse; one that is laxer
//!   could be made to read a packet differently than the broker does.
//! - After an error the decoder stays failed: the connection is to be closed.
//!
//! Reason codes the filter reacts with and any further error handling live in the filter;
//! [`MqttError::disconnect_reason_code`] and [`MqttError::connack_code`] suggest them.

mod decode;
mod encode;
mod properties;
#[cfg(test)]
mod tests;

pub use decode::{decode_packet, Decoder, Direction, Frame};
pub use encode::{
    encode, encode_connack, encode_disconnect_v5, encode_suback, encode_subscribe,
    splice_suback_codes,
};
pub use properties::{Properties, Property};

/// The largest value of a variable byte integer (4 bytes), hence the largest remaining length.
pub const MAX_VARIABLE_BYTE_INTEGER: u32 = 268_435_455;

/// CONNACK return codes of MQTT 3.1.1 (section 3.2.2.3).
pub mod v3_connack {
    pub const ACCEPTED: u8 = 0x00;
    pub const UNACCEPTABLE_PROTOCOL_VERSION: u8 = 0x01;
    pub const IDENTIFIER_REJECTED: u8 = 0x02;
    pub const SERVER_UNAVAILABLE: u8 = 0x03;
    pub const BAD_USERNAME_OR_PASSWORD: u8 = 0x04;
    pub const NOT_AUTHORIZED: u8 = 0x05;
}

/// SUBACK return codes of MQTT 3.1.1 (section 3.9.3): the granted QoS or failure.
pub mod v3_suback {
    pub const FAILURE: u8 = 0x80;
}

/// MQTT 5.0 reason codes (section 2.4) the filter writes or reads.
pub mod reason {
    pub const SUCCESS: u8 = 0x00;
    pub const NORMAL_DISCONNECTION: u8 = 0x00;
    pub const GRANTED_QOS_0: u8 = 0x00;
    pub const GRANTED_QOS_1: u8 = 0x01;
    pub const GRANTED_QOS_2: u8 = 0x02;
    pub const NO_MATCHING_SUBSCRIBERS: u8 = 0x10;
    pub const CONTINUE_AUTHENTICATION: u8 = 0x18;
    pub const RE_AUTHENTICATE: u8 = 0x19;
    pub const UNSPECIFIED_ERROR: u8 = 0x80;
    pub const MALFORMED_PACKET: u8 = 0x81;
    pub const PROTOCOL_ERROR: u8 = 0x82;
    pub const IMPLEMENTATION_SPECIFIC_ERROR: u8 = 0x83;
    pub const UNSUPPORTED_PROTOCOL_VERSION: u8 = 0x84;
    pub const CLIENT_IDENTIFIER_NOT_VALID: u8 = 0x85;
    pub const BAD_USER_NAME_OR_PASSWORD: u8 = 0x86;
    pub const NOT_AUTHORIZED: u8 = 0x87;
    pub const SERVER_UNAVAILABLE: u8 = 0x88;
    pub const SERVER_BUSY: u8 = 0x89;
    pub const BANNED: u8 = 0x8A;
    pub const BAD_AUTHENTICATION_METHOD: u8 = 0x8C;
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    pub const PACKET_IDENTIFIER_IN_USE: u8 = 0x91;
    pub const PACKET_IDENTIFIER_NOT_FOUND: u8 = 0x92;
    pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    pub const ADMINISTRATIVE_ACTION: u8 = 0x98;
    pub const PAYLOAD_FORMAT_INVALID: u8 = 0x99;
    pub const QOS_NOT_SUPPORTED: u8 = 0x9B;
    pub const SHARED_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0x9E;
    pub const CONNECTION_RATE_EXCEEDED: u8 = 0x9F;
    /// DISCONNECT when the connection may not last longer, e.g. the token expired.
    pub const MAXIMUM_CONNECT_TIME: u8 = 0xA0;
    pub const SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED: u8 = 0xA1;
    pub const WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0xA2;
}

/// The bit of the protocol level byte a Mosquitto bridge sets with `try_private true`.
pub const BRIDGE_FLAG: u8 = 0x80;

/// The protocol versions this codec speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProtocolVersion {
    /// MQTT 3.1.1, protocol level 4.
    V311,
    /// MQTT 5.0, protocol level 5.
    V5,
}

impl ProtocolVersion {
    /// The protocol level byte of CONNECT (without the bridge flag).
    pub fn level(self) -> u8 {
        match self {
            ProtocolVersion::V311 => 4,
            ProtocolVersion::V5 => 5,
        }
    }
}

/// Bounds on what a decoder buffers and remembers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest packet accepted, fixed header included (like v5's Maximum Packet Size).
    pub max_packet_bytes: usize,
    /// Largest v5 topic alias accepted: the Topic Alias Maximum the receiver announces (the
    /// broker's in its CONNACK for client→broker, the client's in its CONNECT for
    /// broker→client); 0 refuses all aliases. Bounds the alias map to this many topics.
    pub max_topic_aliases: u16,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_packet_bytes: 256 * 1024,
            // Mosquitto's default max_topic_alias.
            max_topic_aliases: 10,
        }
    }
}

/// Quality of service of a message or a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QoS {
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    /// The QoS of two bits; 3 is not a QoS.
    pub fn from_bits(bits: u8) -> Option<QoS> {
        match bits {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }

    pub fn bits(self) -> u8 {
        self as u8
    }
}

/// One MQTT control packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Connect(Connect),
    ConnAck(ConnAck),
    Publish(Publish),
    PubAck(PublishResponse),
    PubRec(PublishResponse),
    PubRel(PublishResponse),
    PubComp(PublishResponse),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(UnsubAck),
    PingReq,
    PingResp,
    Disconnect(Disconnect),
    /// v5 only.
    Auth(Auth),
}

impl Packet {
    /// The packet type of the fixed header (1 = CONNECT ... 15 = AUTH).
    pub fn packet_type(&self) -> u8 {
        match self {
            Packet::Connect(_) => 1,
            Packet::ConnAck(_) => 2,
            Packet::Publish(_) => 3,
            Packet::PubAck(_) => 4,
            Packet::PubRec(_) => 5,
            Packet::PubRel(_) => 6,
            Packet::PubComp(_) => 7,
            Packet::Subscribe(_) => 8,
            Packet::SubAck(_) => 9,
            Packet::Unsubscribe(_) => 10,
            Packet::UnsubAck(_) => 11,
            Packet::PingReq => 12,
            Packet::PingResp => 13,
            Packet::Disconnect(_) => 14,
            Packet::Auth(_) => 15,
        }
    }

    /// The packet's name for logs and metrics.
    pub fn name(&self) -> &'static str {
        packet_type_name(self.packet_type())
    }
}

/// The name of a packet type, "RESERVED" for 0 and anything above 15.
pub fn packet_type_name(packet_type: u8) -> &'static str {
    match packet_type {
        1 => "CONNECT",
        2 => "CONNACK",
        3 => "PUBLISH",
        4 => "PUBACK",
        5 => "PUBREC",
        6 => "PUBREL",
        7 => "PUBCOMP",
        8 => "SUBSCRIBE",
        9 => "SUBACK",
        10 => "UNSUBSCRIBE",
        11 => "UNSUBACK",
        12 => "PINGREQ",
        13 => "PINGRESP",
        14 => "DISCONNECT",
        15 => "AUTH",
        _ => "RESERVED",
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub version: ProtocolVersion,
    /// The protocol level carried [`BRIDGE_FLAG`] (0x84 / 0x85): a Mosquitto bridge
    /// (`try_private true`) announcing itself. Not part of the MQTT specs; Mosquitto, the
    /// broker this filter is tested with, accepts it and treats the client as a bridge. Encoded
    /// back as it came, so the broker sees the same flag.
    pub bridge: bool,
    /// May be empty (the broker then assigns one or refuses).
    pub client_id: String,
    /// "Clean Session" in 3.1.1.
    pub clean_start: bool,
    pub keep_alive: u16,
    pub username: Option<String>,
    pub password: Option<Vec<u8>>,
    pub will: Option<Will>,
    /// Empty in 3.1.1.
    pub properties: Properties,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: QoS,
    pub retain: bool,
    /// v5 will properties; empty in 3.1.1.
    pub properties: Properties,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAck {
    pub session_present: bool,
    /// 3.1.1 return code ([`v3_connack`]) or v5 reason code ([`reason`]).
    pub code: u8,
    pub properties: Properties,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    /// The topic name as sent: empty in v5 when only a topic alias was sent. ACL checks use
    /// [`Frame::effective_topic`], which resolves the alias.
    pub topic: String,
    /// Present exactly when QoS > 0.
    pub packet_id: Option<u16>,
    pub properties: Properties,
    pub payload: Vec<u8>,
}

/// PUBACK, PUBREC, PUBREL and PUBCOMP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishResponse {
    pub packet_id: u16,
    /// v5 reason code; always 0 in 3.1.1.
    pub reason_code: u8,
    pub properties: Properties,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    pub packet_id: u16,
    pub properties: Properties,
    /// At least one.
    pub filters: Vec<Subscription>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// A valid topic filter; may be a shared subscription (see [`shared_subscription`]).
    pub filter: String,
    pub options: SubscriptionOptions,
}

/// The subscription options byte. In 3.1.1 only `qos` exists; the other fields are false/0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionOptions {
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    /// 0 = send retained messages at subscribe, 1 = only for new subscriptions, 2 = never.
    pub retain_handling: u8,
}

impl SubscriptionOptions {
    /// Options with only a maximum QoS, as in 3.1.1.
    pub fn qos(qos: QoS) -> Self {
        SubscriptionOptions {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    pub packet_id: u16,
    pub properties: Properties,
    /// One per filter of the SUBSCRIBE, in order: granted QoS or a failure code.
    pub codes: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    pub packet_id: u16,
    pub properties: Properties,
    /// At least one.
    pub filters: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsubAck {
    pub packet_id: u16,
    pub properties: Properties,
    /// v5: one reason code per filter; empty in 3.1.1 (which has none).
    pub codes: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnect {
    /// v5 reason code; 0 in 3.1.1.
    pub reason_code: u8,
    pub properties: Properties,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    pub reason_code: u8,
    pub properties: Properties,
}

/// Splits a shared subscription `$share/{ShareName}/{filter}` into its share name and the topic
/// filter the ACL must check; `None` for an ordinary filter. Only meaningful for filters that
/// were decoded (their syntax is checked then).
pub fn shared_subscription(filter: &str) -> Option<(&str, &str)> {
    let rest = filter.strip_prefix("$share/")?;
    rest.split_once('/')
}

/// What went wrong, and so how the filter reacts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The bytes are not a valid packet: close the connection (v5: DISCONNECT 0x81).
    Malformed,
    /// Valid packet, but not allowed here (wrong order, direction, duplicate property...): close
    /// (v5: DISCONNECT 0x82).
    ProtocolError,
    /// Larger than [`Limits::max_packet_bytes`]: close (v5: 0x95).
    TooLarge,
    /// A topic alias that is 0, above the limit, or unknown (v5: DISCONNECT 0x94).
    TopicAliasInvalid,
    /// CONNECT with a protocol level this codec does not speak (answer CONNACK 0x01 / 0x84).
    UnsupportedVersion { level: u8 },
    /// A packet that can't be encoded (a string over 65,535 bytes, a v5 field in 3.1.1...).
    CannotEncode,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {detail}", kind_description(.kind))]
pub struct MqttError {
    pub kind: ErrorKind,
    pub detail: String,
}

fn kind_description(kind: &ErrorKind) -> String {
    match kind {
        ErrorKind::Malformed => "malformed MQTT packet".into(),
        ErrorKind::ProtocolError => "MQTT protocol error".into(),
        ErrorKind::TooLarge => "MQTT packet too large".into(),
        ErrorKind::TopicAliasInvalid => "invalid MQTT topic alias".into(),
        ErrorKind::UnsupportedVersion { level } => {
            format!("unsupported MQTT protocol level {level}")
        }
        ErrorKind::CannotEncode => "cannot encode MQTT packet".into(),
    }
}

impl MqttError {
    pub fn new(kind: ErrorKind, detail: impl Into<String>) -> Self {
        MqttError {
            kind,
            detail: detail.into(),
        }
    }

    pub(crate) fn malformed(detail: impl Into<String>) -> Self {
        Self::new(ErrorKind::Malformed, detail)
    }

    pub(crate) fn protocol(detail: impl Into<String>) -> Self {
        Self::new(ErrorKind::ProtocolError, detail)
    }

    pub(crate) fn cannot_encode(detail: impl Into<String>) -> Self {
        Self::new(ErrorKind::CannotEncode, detail)
    }

    /// The v5 DISCONNECT reason code that reports this error to the peer.
    pub fn disconnect_reason_code(&self) -> u8 {
        match self.kind {
            ErrorKind::Malformed => reason::MALFORMED_PACKET,
            ErrorKind::ProtocolError => reason::PROTOCOL_ERROR,
            ErrorKind::TooLarge => reason::PACKET_TOO_LARGE,
            ErrorKind::TopicAliasInvalid => reason::TOPIC_ALIAS_INVALID,
            ErrorKind::UnsupportedVersion { .. } => reason::UNSUPPORTED_PROTOCOL_VERSION,
            ErrorKind::CannotEncode => reason::IMPLEMENTATION_SPECIFIC_ERROR,
        }
    }

    /// The CONNACK code that refuses a CONNECT failing with this error, if the version has one
    /// (3.1.1 only has a code for the version; for the rest the connection is just closed).
    pub fn connack_code(&self, version: ProtocolVersion) -> Option<u8> {
        match (version, self.kind) {
            (ProtocolVersion::V311, ErrorKind::UnsupportedVersion { .. }) => {
                Some(v3_connack::UNACCEPTABLE_PROTOCOL_VERSION)
            }
            (ProtocolVersion::V311, _) => None,
            (ProtocolVersion::V5, _) => Some(self.disconnect_reason_code()),
        }
    }
}
