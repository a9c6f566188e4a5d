//! Decoding: a bounds-checked reader, one parser per packet type, and the incremental
//! [`Decoder`] that frames a byte stream and enforces the order of packets on a connection.

use std::collections::BTreeMap;

use super::properties::{read_properties, Property, PropertyContext};
use super::{
    packet_type_name, Auth, ConnAck, Connect, Disconnect, ErrorKind, Limits, MqttError, Packet,
    Properties, ProtocolVersion, Publish, PublishResponse, QoS, SubAck, Subscribe, Subscription,
    SubscriptionOptions, UnsubAck, Unsubscribe, Will, BRIDGE_FLAG,
};

/// Reads the fields of one packet; every read past the end is a malformed-packet error.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
}

fn truncated() -> MqttError {
    MqttError::malformed("packet ends inside a field")
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub(crate) fn take(&mut self, count: usize) -> Result<&'a [u8], MqttError> {
        let (head, tail) = self.bytes.split_at_checked(count).ok_or_else(truncated)?;
        self.bytes = tail;
        Ok(head)
    }

    /// Everything left (a PUBLISH payload, SUBACK codes).
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, MqttError> {
        let (&byte, tail) = self.bytes.split_first().ok_or_else(truncated)?;
        self.bytes = tail;
        Ok(byte)
    }

    pub(crate) fn u16(&mut self) -> Result<u16, MqttError> {
        let bytes: [u8; 2] = self.take(2)?.try_into().map_err(|_| truncated())?;
        Ok(u16::from_be_bytes(bytes))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, MqttError> {
        let bytes: [u8; 4] = self.take(4)?.try_into().map_err(|_| truncated())?;
        Ok(u32::from_be_bytes(bytes))
    }

    pub(crate) fn variable_int(&mut self) -> Result<u32, MqttError> {
        let (value, length) = parse_variable_int(self.bytes)?.ok_or_else(truncated)?;
        self.take(length)?;
        Ok(value)
    }

    /// A UTF-8 encoded string (section 1.5.4): valid UTF-8 (which excludes surrogates and
    /// overlong forms, MQTT-1.5.3-1) without U+0000 (MQTT-1.5.3-2).
    pub(crate) fn string(&mut self) -> Result<String, MqttError> {
        let length = self.u16()?;
        let bytes = self.take(usize::from(length))?;
        let text = std::str::from_utf8(bytes)
            .map_err(|_| MqttError::malformed("string is not valid UTF-8"))?;
        if text.contains('\0') {
            return Err(MqttError::malformed("string contains U+0000"));
        }
        Ok(text.to_owned())
    }

    pub(crate) fn binary(&mut self) -> Result<Vec<u8>, MqttError> {
        let length = self.u16()?;
        Ok(self.take(usize::from(length))?.to_vec())
    }

    /// A packet identifier, which is never 0 (MQTT-2.3.1-1).
    fn packet_id(&mut self) -> Result<u16, MqttError> {
        match self.u16()? {
            0 => Err(MqttError::malformed("packet identifier 0")),
            id => Ok(id),
        }
    }

    /// The packet must end here: bytes left over mean sender and receiver disagree on a length.
    fn finish(&self) -> Result<(), MqttError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(MqttError::malformed(
                "bytes left over at the end of the packet",
            ))
        }
    }
}

/// A variable byte integer at the start of `bytes` (section 1.5.5): its value and length, or
/// `None` when `bytes` ends before it does. At most 4 bytes, and the shortest encoding only
/// (MQTT-1.5.5-1): a longer one would let two readers disagree on where a packet starts.
pub(crate) fn parse_variable_int(bytes: &[u8]) -> Result<Option<(u32, usize)>, MqttError> {
    let mut value: u32 = 0;
    for (index, &byte) in bytes.iter().take(4).enumerate() {
        value |= u32::from(byte & 0x7F) << (7 * index);
        if byte & 0x80 == 0 {
            if index > 0 && byte == 0 {
                return Err(MqttError::malformed(
                    "variable byte integer not in its shortest form",
                ));
            }
            return Ok(Some((value, index + 1)));
        }
    }
    if bytes.len() >= 4 {
        Err(MqttError::malformed(
            "variable byte integer longer than 4 bytes",
        ))
    } else {
        Ok(None)
    }
}

/// A topic name as in PUBLISH and wills: at least one character, no wildcards (MQTT-3.3.2-2).
pub(crate) fn check_topic_name(topic: &str) -> Result<(), MqttError> {
    if topic.is_empty() {
        return Err(MqttError::malformed("empty topic name"));
    }
    if topic.contains(['+', '#']) {
        return Err(MqttError::malformed("wildcard in a topic name"));
    }
    Ok(())
}

/// A topic filter (section 4.7): not empty, `+` alone in its level, `#` alone in the last level;
/// a shared subscription `$share/{name}/{filter}` has a non-empty name without wildcards and a
/// valid filter (mosquitto treats `$share/` as shared in 3.1.1 too, so both versions check it).
pub(crate) fn check_topic_filter(filter: &str) -> Result<(), MqttError> {
    let filter = match filter.strip_prefix("$share/") {
        Some(shared) => {
            let (name, filter) = shared
                .split_once('/')
                .ok_or_else(|| MqttError::malformed("shared subscription without a filter"))?;
            if name.is_empty() || name.contains(['+', '#']) {
                return Err(MqttError::malformed("invalid shared subscription name"));
            }
            filter
        }
        None => filter,
    };
    if filter.is_empty() {
        return Err(MqttError::malformed("empty topic filter"));
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let is_last = levels.peek().is_none();
        if level.contains('#') && (level != "#" || !is_last) {
            return Err(MqttError::malformed("'#' not alone in the last level"));
        }
        if level.contains('+') && level != "+" {
            return Err(MqttError::malformed("'+' not alone in its level"));
        }
    }
    Ok(())
}

/// Checks the fixed header's first byte: a defined packet type with the flags the spec fixes
/// for it (section 2.1.3). Returns the packet type.
fn check_first_byte(first: u8, version: Option<ProtocolVersion>) -> Result<u8, MqttError> {
    let packet_type = first >> 4;
    let flags = first & 0x0F;
    let expected_flags = match packet_type {
        0 => return Err(MqttError::malformed("reserved packet type 0")),
        3 => {
            let qos = (flags >> 1) & 0b11;
            if qos == 3 {
                return Err(MqttError::malformed("PUBLISH with QoS 3"));
            }
            if qos == 0 && flags & 0b1000 != 0 {
                return Err(MqttError::malformed("PUBLISH with DUP set at QoS 0"));
            }
            flags
        }
        6 | 8 | 10 => 0b0010,
        15 if version == Some(ProtocolVersion::V311) => {
            return Err(MqttError::malformed(
                "reserved packet type 15 in MQTT 3.1.1",
            ))
        }
        _ => 0,
    };
    if flags != expected_flags {
        return Err(MqttError::malformed(format!(
            "invalid fixed header flags for {}",
            packet_type_name(packet_type)
        )));
    }
    Ok(packet_type)
}

/// The protocol version a CONNECT body asks for and whether the level carries Mosquitto's
/// bridge flag, or the error that refuses it.
fn connect_version(reader: &mut Reader<'_>) -> Result<(ProtocolVersion, bool), MqttError> {
    let name_length = reader.u16()?;
    let name = reader.take(usize::from(name_length))?;
    let level = reader.u8()?;
    let bridge = level & BRIDGE_FLAG != 0;
    match (name, level & !BRIDGE_FLAG) {
        (b"MQTT", 4) => Ok((ProtocolVersion::V311, bridge)),
        (b"MQTT", 5) => Ok((ProtocolVersion::V5, bridge)),
        (b"MQTT", _) | (b"MQIsdp", _) => Err(MqttError::new(
            ErrorKind::UnsupportedVersion { level },
            "only MQTT 3.1.1 and 5.0 are supported",
        )),
        _ => Err(MqttError::protocol("unknown protocol name")),
    }
}

fn parse_connect(body: &[u8]) -> Result<Connect, MqttError> {
    let mut reader = Reader::new(body);
    let (version, bridge) = connect_version(&mut reader)?;
    let v5 = version == ProtocolVersion::V5;
    let flags = reader.u8()?;
    let has_username = flags & 0x80 != 0;
    let has_password = flags & 0x40 != 0;
    let will_retain = flags & 0x20 != 0;
    let will_qos_bits = (flags >> 3) & 0b11;
    let has_will = flags & 0x04 != 0;
    let clean_start = flags & 0x02 != 0;
    if flags & 0x01 != 0 {
        return Err(MqttError::malformed("CONNECT reserved flag set"));
    }
    if !has_will && (will_qos_bits != 0 || will_retain) {
        return Err(MqttError::malformed("will QoS or retain without a will"));
    }
    let will_qos =
        QoS::from_bits(will_qos_bits).ok_or_else(|| MqttError::malformed("will QoS 3"))?;
    if !v5 && has_password && !has_username {
        return Err(MqttError::malformed(
            "password without user name (MQTT-3.1.2-22)",
        ));
    }
    let keep_alive = reader.u16()?;
    let properties = if v5 {
        read_properties(&mut reader, PropertyContext::Connect)?
    } else {
        Properties::new()
    };
    if properties.authentication_data().is_some() && properties.authentication_method().is_none() {
        return Err(MqttError::protocol(
            "authentication data without authentication method",
        ));
    }
    let client_id = reader.string()?;
    let will = if has_will {
        let will_properties = if v5 {
            read_properties(&mut reader, PropertyContext::Will)?
        } else {
            Properties::new()
        };
        let topic = reader.string()?;
        check_topic_name(&topic)?;
        let payload = reader.binary()?;
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            properties: will_properties,
        })
    } else {
        None
    };
    let username = if has_username {
        Some(reader.string()?)
    } else {
        None
    };
    let password = if has_password {
        Some(reader.binary()?)
    } else {
        None
    };
    reader.finish()?;
    Ok(Connect {
        version,
        bridge,
        client_id,
        clean_start,
        keep_alive,
        username,
        password,
        will,
        properties,
    })
}

fn read_v5_properties(
    reader: &mut Reader<'_>,
    version: ProtocolVersion,
    context: PropertyContext,
) -> Result<Properties, MqttError> {
    match version {
        ProtocolVersion::V5 => read_properties(reader, context),
        ProtocolVersion::V311 => Ok(Properties::new()),
    }
}

/// v5 reason code and properties that may be left out when 0 / empty (PUBACK..PUBCOMP,
/// DISCONNECT, AUTH). 3.1.1 has neither.
fn optional_reason_and_properties(
    reader: &mut Reader<'_>,
    version: ProtocolVersion,
    context: PropertyContext,
) -> Result<(u8, Properties), MqttError> {
    if version == ProtocolVersion::V311 || reader.is_empty() {
        return Ok((0, Properties::new()));
    }
    let reason_code = reader.u8()?;
    if reader.is_empty() {
        return Ok((reason_code, Properties::new()));
    }
    Ok((reason_code, read_properties(reader, context)?))
}

fn parse_publish(
    flags: u8,
    reader: &mut Reader<'_>,
    version: ProtocolVersion,
) -> Result<Publish, MqttError> {
    let qos = QoS::from_bits((flags >> 1) & 0b11)
        .ok_or_else(|| MqttError::malformed("PUBLISH with QoS 3"))?;
    let topic = reader.string()?;
    let packet_id = if qos == QoS::AtMostOnce {
        None
    } else {
        Some(reader.packet_id()?)
    };
    let properties = read_v5_properties(reader, version, PropertyContext::Publish)?;
    // v5: an empty topic name stands for the topic of the alias (section 3.3.2.3.4).
    if !(topic.is_empty() && properties.topic_alias().is_some()) {
        check_topic_name(&topic)?;
    }
    Ok(Publish {
        dup: flags & 0b1000 != 0,
        qos,
        retain: flags & 0b0001 != 0,
        topic,
        packet_id,
        properties,
        payload: reader.rest().to_vec(),
    })
}

fn parse_subscription_options(
    options: u8,
    filter: &str,
    version: ProtocolVersion,
) -> Result<SubscriptionOptions, MqttError> {
    let reserved_bits = match version {
        ProtocolVersion::V311 => 0b1111_1100,
        ProtocolVersion::V5 => 0b1100_0000,
    };
    if options & reserved_bits != 0 {
        return Err(MqttError::malformed(
            "reserved subscription option bits set",
        ));
    }
    let qos = QoS::from_bits(options & 0b11)
        .ok_or_else(|| MqttError::malformed("subscription with QoS 3"))?;
    let no_local = options & 0b0100 != 0;
    let retain_handling = (options >> 4) & 0b11;
    if retain_handling == 3 {
        return Err(MqttError::protocol("retain handling 3"));
    }
    if no_local && super::shared_subscription(filter).is_some() {
        return Err(MqttError::protocol(
            "no local on a shared subscription (MQTT-3.8.3-4)",
        ));
    }
    Ok(SubscriptionOptions {
        qos,
        no_local,
        retain_as_published: options & 0b1000 != 0,
        retain_handling,
    })
}

fn parse_subscribe(
    reader: &mut Reader<'_>,
    version: ProtocolVersion,
) -> Result<Subscribe, MqttError> {
    let packet_id = reader.packet_id()?;
    let properties = read_v5_properties(reader, version, PropertyContext::Subscribe)?;
    let mut filters = Vec::new();
    while !reader.is_empty() {
        let filter = reader.string()?;
        check_topic_filter(&filter)?;
        let options = parse_subscription_options(reader.u8()?, &filter, version)?;
        filters.push(Subscription { filter, options });
    }
    if filters.is_empty() {
        return Err(MqttError::protocol("SUBSCRIBE without topic filters"));
    }
    Ok(Subscribe {
        packet_id,
        properties,
        filters,
    })
}

fn parse_suback(reader: &mut Reader<'_>, version: ProtocolVersion) -> Result<SubAck, MqttError> {
    let packet_id = reader.packet_id()?;
    let properties = read_v5_properties(reader, version, PropertyContext::SubAck)?;
    let codes = reader.rest().to_vec();
    if codes.is_empty() {
        return Err(MqttError::protocol("SUBACK without return codes"));
    }
    // 3.1.1 defines only these return codes (MQTT-3.9.3-2).
    if version == ProtocolVersion::V311
        && codes
            .iter()
            .any(|code| !matches!(code, 0x00 | 0x01 | 0x02 | 0x80))
    {
        return Err(MqttError::malformed("reserved SUBACK return code"));
    }
    Ok(SubAck {
        packet_id,
        properties,
        codes,
    })
}

fn parse_unsubscribe(
    reader: &mut Reader<'_>,
    version: ProtocolVersion,
) -> Result<Unsubscribe, MqttError> {
    let packet_id = reader.packet_id()?;
    let properties = read_v5_properties(reader, version, PropertyContext::Unsubscribe)?;
    let mut filters = Vec::new();
    while !reader.is_empty() {
        let filter = reader.string()?;
        check_topic_filter(&filter)?;
        filters.push(filter);
    }
    if filters.is_empty() {
        return Err(MqttError::protocol("UNSUBSCRIBE without topic filters"));
    }
    Ok(Unsubscribe {
        packet_id,
        properties,
        filters,
    })
}

fn parse_unsuback(
    reader: &mut Reader<'_>,
    version: ProtocolVersion,
) -> Result<UnsubAck, MqttError> {
    let packet_id = reader.packet_id()?;
    // 3.1.1's UNSUBACK is just the packet identifier: what follows is left over.
    if version == ProtocolVersion::V311 {
        return Ok(UnsubAck {
            packet_id,
            properties: Properties::new(),
            codes: Vec::new(),
        });
    }
    let properties = read_properties(reader, PropertyContext::UnsubAck)?;
    let codes = reader.rest().to_vec();
    if codes.is_empty() {
        return Err(MqttError::protocol("UNSUBACK without reason codes"));
    }
    Ok(UnsubAck {
        packet_id,
        properties,
        codes,
    })
}

fn parse_connack(reader: &mut Reader<'_>, version: ProtocolVersion) -> Result<ConnAck, MqttError> {
    let flags = reader.u8()?;
    if flags & 0xFE != 0 {
        return Err(MqttError::malformed("CONNACK reserved flags set"));
    }
    let session_present = flags & 0x01 != 0;
    let code = reader.u8()?;
    if session_present && code != 0 {
        return Err(MqttError::protocol(
            "session present with a refusing CONNACK",
        ));
    }
    let properties = read_v5_properties(reader, version, PropertyContext::ConnAck)?;
    Ok(ConnAck {
        session_present,
        code,
        properties,
    })
}

/// Decodes the body of a packet other than CONNECT, whose first byte was checked.
fn parse_body(first: u8, body: &[u8], version: ProtocolVersion) -> Result<Packet, MqttError> {
    let mut reader = Reader::new(body);
    let reader = &mut reader;
    let publish_response = |reader: &mut Reader<'_>| -> Result<PublishResponse, MqttError> {
        let packet_id = reader.packet_id()?;
        let (reason_code, properties) =
            optional_reason_and_properties(reader, version, PropertyContext::PublishResponse)?;
        Ok(PublishResponse {
            packet_id,
            reason_code,
            properties,
        })
    };
    let packet = match first >> 4 {
        1 => Packet::Connect(parse_connect(body)?),
        2 => Packet::ConnAck(parse_connack(reader, version)?),
        3 => Packet::Publish(parse_publish(first & 0x0F, reader, version)?),
        4 => Packet::PubAck(publish_response(reader)?),
        5 => Packet::PubRec(publish_response(reader)?),
        6 => Packet::PubRel(publish_response(reader)?),
        7 => Packet::PubComp(publish_response(reader)?),
        8 => Packet::Subscribe(parse_subscribe(reader, version)?),
        9 => Packet::SubAck(parse_suback(reader, version)?),
        10 => Packet::Unsubscribe(parse_unsubscribe(reader, version)?),
        11 => Packet::UnsubAck(parse_unsuback(reader, version)?),
        12 => Packet::PingReq,
        13 => Packet::PingResp,
        14 => {
            let (reason_code, properties) =
                optional_reason_and_properties(reader, version, PropertyContext::Disconnect)?;
            Packet::Disconnect(Disconnect {
                reason_code,
                properties,
            })
        }
        15 if version == ProtocolVersion::V5 => {
            let (reason_code, properties) =
                optional_reason_and_properties(reader, version, PropertyContext::Auth)?;
            Packet::Auth(Auth {
                reason_code,
                properties,
            })
        }
        _ => return Err(MqttError::malformed("reserved packet type")),
    };
    if !matches!(packet, Packet::Connect(_)) {
        reader.finish()?;
    }
    Ok(packet)
}

/// Decodes one complete packet, `raw` being exactly its bytes. A CONNECT is decoded by the
/// protocol level it carries; every other packet by `version`. No connection state (order of
/// packets, topic aliases): that is the [`Decoder`]'s.
pub fn decode_packet(raw: &[u8], version: ProtocolVersion) -> Result<Packet, MqttError> {
    let (&first, after_first) = raw.split_first().ok_or_else(truncated)?;
    check_first_byte(first, Some(version))?;
    let (remaining, length_size) = parse_variable_int(after_first)?.ok_or_else(truncated)?;
    let body = after_first.get(length_size..).ok_or_else(truncated)?;
    if usize::try_from(remaining).ok() != Some(body.len()) {
        return Err(MqttError::malformed(
            "remaining length does not match the packet",
        ));
    }
    parse_body(first, body, version)
}

/// Which way the bytes a [`Decoder`] reads travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ClientToBroker,
    BrokerToClient,
}

/// One decoded packet and the exact bytes it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub packet: Packet,
    /// The packet's bytes, fixed header included: what to forward when it is allowed.
    pub raw: Vec<u8>,
    /// For PUBLISH: the topic the message goes to, the topic alias resolved (v5). The topic
    /// ACLs must check. `None` for other packets.
    pub effective_topic: Option<String>,
}

/// Frames the bytes of one direction of a connection into packets.
///
/// Feed it what arrives ([`Decoder::feed`]), then call [`Decoder::next_frame`] until it returns
/// `Ok(None)` (more bytes needed). It buffers at most one incomplete packet, refuses a packet
/// larger than [`Limits::max_packet_bytes`] as soon as its length is known, and after an error
/// stays failed (every later call returns the same error; bytes fed are dropped).
///
/// Topic aliases (v5): a PUBLISH with a topic and an alias records the alias when it is decoded,
/// one with an empty topic and an alias is resolved from it ([`Frame::effective_topic`]). If the
/// filter does not forward a PUBLISH that set an alias, the broker's map and this one differ:
/// call [`Decoder::forget_topic_alias`] so that a later use of the alias is refused rather than
/// resolved to a topic the broker never saw.
#[derive(Debug, Clone)]
pub struct Decoder {
    direction: Direction,
    limits: Limits,
    version: Option<ProtocolVersion>,
    buffer: Vec<u8>,
    /// Bytes at the start of `buffer` that belong to packets already returned.
    consumed: usize,
    /// CONNECT (client→broker) or CONNACK (broker→client) was seen.
    connection_opened: bool,
    /// DISCONNECT was seen: nothing may follow it (MQTT-3.14.4-1).
    disconnected: bool,
    topic_aliases: BTreeMap<u16, String>,
    failure: Option<MqttError>,
}

impl Decoder {
    /// For the client's bytes: the first packet must be CONNECT, which sets the version.
    pub fn client_to_broker(limits: Limits) -> Self {
        Self::new(Direction::ClientToBroker, limits)
    }

    /// For the broker's bytes: call [`Decoder::set_version`] (with the CONNECT's version) before
    /// asking for frames; the first packet must be CONNACK (or AUTH in v5).
    pub fn broker_to_client(limits: Limits) -> Self {
        Self::new(Direction::BrokerToClient, limits)
    }

    fn new(direction: Direction, limits: Limits) -> Self {
        Decoder {
            direction,
            limits,
            version: None,
            buffer: Vec::new(),
            consumed: 0,
            connection_opened: false,
            disconnected: false,
            topic_aliases: BTreeMap::new(),
            failure: None,
        }
    }

    pub fn direction(&self) -> Direction {
        self.direction
    }

    /// The connection's protocol version: known once CONNECT was read (client→broker; also
    /// when that CONNECT turned out invalid after its protocol level) or set.
    pub fn version(&self) -> Option<ProtocolVersion> {
        self.version
    }

    pub fn set_version(&mut self, version: ProtocolVersion) {
        self.version = Some(version);
    }

    /// Appends bytes that arrived. Ignored once the decoder has failed.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.failure.is_some() {
            return;
        }
        if self.consumed > 0 {
            self.buffer.drain(..self.consumed);
            self.consumed = 0;
        }
        self.buffer.extend_from_slice(bytes);
    }

    /// Bytes fed but not yet returned in a frame.
    pub fn buffered_len(&self) -> usize {
        self.buffer.len().saturating_sub(self.consumed)
    }

    /// The error the decoder failed with, if it did.
    pub fn failure(&self) -> Option<&MqttError> {
        self.failure.as_ref()
    }

    /// Forgets a topic alias (see the type's docs).
    pub fn forget_topic_alias(&mut self, alias: u16) {
        self.topic_aliases.remove(&alias);
    }

    /// The next complete packet, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, MqttError> {
        if let Some(failure) = &self.failure {
            return Err(failure.clone());
        }
        let result = self.decode_next();
        if let Err(error) = &result {
            self.failure = Some(error.clone());
            self.buffer = Vec::new();
            self.consumed = 0;
        }
        result
    }

    fn decode_next(&mut self) -> Result<Option<Frame>, MqttError> {
        let pending = self.buffer.get(self.consumed..).unwrap_or_default();
        let Some((&first, after_first)) = pending.split_first() else {
            return Ok(None);
        };
        // Refuse a packet that may not come here before waiting for its body.
        let packet_type = self.check_packet_allowed(first)?;
        let Some((remaining, length_size)) = parse_variable_int(after_first)? else {
            return Ok(None);
        };
        let header_size = 1 + length_size;
        let total = usize::try_from(remaining)
            .ok()
            .and_then(|remaining| remaining.checked_add(header_size))
            .filter(|total| *total <= self.limits.max_packet_bytes)
            .ok_or_else(|| {
                MqttError::new(
                    ErrorKind::TooLarge,
                    format!(
                        "{} of {remaining} bytes after its fixed header, limit {} in all",
                        packet_type_name(packet_type),
                        self.limits.max_packet_bytes
                    ),
                )
            })?;
        let Some(raw) = pending.get(..total) else {
            return Ok(None);
        };
        let raw = raw.to_vec();
        let body = raw.get(header_size..).unwrap_or_default();
        let packet = if packet_type == 1 {
            // Learn the version before the rest of CONNECT, so the filter can refuse an invalid
            // CONNECT with a CONNACK of the client's version.
            if let Ok((version, _)) = connect_version(&mut Reader::new(body)) {
                self.version = Some(version);
            }
            Packet::Connect(parse_connect(body)?)
        } else {
            let version = self
                .version
                .ok_or_else(|| MqttError::protocol("protocol version not known yet"))?;
            parse_body(first, body, version)?
        };
        self.consumed += total;
        if self.consumed == self.buffer.len() {
            self.buffer.clear();
            self.consumed = 0;
        }
        let effective_topic = self.after_packet(&packet)?;
        Ok(Some(Frame {
            packet,
            raw,
            effective_topic,
        }))
    }

    /// Refuses packet types that may not come in this direction or at this point of the
    /// connection, and invalid fixed-header flags. Returns the packet type.
    fn check_packet_allowed(&self, first: u8) -> Result<u8, MqttError> {
        let packet_type = check_first_byte(first, self.version)?;
        let name = packet_type_name(packet_type);
        if self.disconnected {
            return Err(MqttError::protocol(format!("{name} after DISCONNECT")));
        }
        match self.direction {
            Direction::ClientToBroker => {
                if !self.connection_opened && packet_type != 1 {
                    return Err(MqttError::protocol(format!(
                        "first packet is {name}, not CONNECT"
                    )));
                }
                match packet_type {
                    1 if self.connection_opened => {
                        Err(MqttError::protocol("second CONNECT (MQTT-3.1.0-2)"))
                    }
                    2 | 9 | 11 | 13 => Err(MqttError::protocol(format!(
                        "{name} is sent by brokers, not clients"
                    ))),
                    _ => Ok(packet_type),
                }
            }
            Direction::BrokerToClient => {
                let version = self
                    .version
                    .ok_or_else(|| MqttError::protocol("protocol version not set"))?;
                match packet_type {
                    1 | 8 | 10 | 12 => {
                        return Err(MqttError::protocol(format!(
                            "{name} is sent by clients, not brokers"
                        )))
                    }
                    14 if version == ProtocolVersion::V311 => {
                        return Err(MqttError::protocol("DISCONNECT from a 3.1.1 broker"))
                    }
                    _ => {}
                }
                // A broker sends CONNACK before anything but AUTH (MQTT-3.2.0-1), and once.
                if !self.connection_opened && packet_type != 2 && packet_type != 15 {
                    return Err(MqttError::protocol(format!("{name} before CONNACK")));
                }
                if self.connection_opened && packet_type == 2 {
                    return Err(MqttError::protocol("second CONNACK"));
                }
                Ok(packet_type)
            }
        }
    }

    /// Connection state after a packet; returns the effective topic of a PUBLISH.
    fn after_packet(&mut self, packet: &Packet) -> Result<Option<String>, MqttError> {
        match packet {
            Packet::Connect(connect) => {
                self.version = Some(connect.version);
                self.connection_opened = true;
                Ok(None)
            }
            Packet::ConnAck(_) => {
                self.connection_opened = true;
                Ok(None)
            }
            Packet::Disconnect(_) => {
                self.disconnected = true;
                Ok(None)
            }
            Packet::Publish(publish) => self.resolve_topic(publish).map(Some),
            _ => Ok(None),
        }
    }

    fn resolve_topic(&mut self, publish: &Publish) -> Result<String, MqttError> {
        if self.direction == Direction::ClientToBroker
            && publish
                .properties
                .iter()
                .any(|p| matches!(p, Property::SubscriptionIdentifier(_)))
        {
            return Err(MqttError::protocol(
                "subscription identifier in a client's PUBLISH (MQTT-3.3.4-6)",
            ));
        }
        let Some(alias) = publish.properties.topic_alias() else {
            return Ok(publish.topic.clone());
        };
        if alias == 0 || alias > self.limits.max_topic_aliases {
            return Err(MqttError::new(
                ErrorKind::TopicAliasInvalid,
                format!(
                    "topic alias {alias} outside 1..={}",
                    self.limits.max_topic_aliases
                ),
            ));
        }
        if publish.topic.is_empty() {
            self.topic_aliases.get(&alias).cloned().ok_or_else(|| {
                MqttError::new(
                    ErrorKind::TopicAliasInvalid,
                    format!("topic alias {alias} is not set"),
                )
            })
        } else {
            self.topic_aliases.insert(alias, publish.topic.clone());
            Ok(publish.topic.clone())
        }
    }
}
