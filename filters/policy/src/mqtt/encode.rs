//! Encoding: every packet type, for the packets the filter writes itself (refusing CONNACKs,
//! SUBACKs, DISCONNECTs) and the ones it rewrites (a SUBSCRIBE with refused filters removed).
//! Optional v5 fields are written in their shortest form.

use super::properties::write_properties;
use super::{
    ConnAck, Connect, MqttError, Packet, Properties, ProtocolVersion, Publish, PublishResponse,
    QoS, SubAck, Subscribe, SubscriptionOptions, UnsubAck, Unsubscribe, BRIDGE_FLAG,
    MAX_VARIABLE_BYTE_INTEGER,
};

/// Bytes being written; strings and lengths that don't fit are errors, never truncated.
pub(crate) struct Writer {
    bytes: Vec<u8>,
}

impl Writer {
    pub(crate) fn new() -> Self {
        Writer { bytes: Vec::new() }
    }

    pub(crate) fn len(&self) -> usize {
        self.bytes.len()
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        &self.bytes
    }

    pub(crate) fn u8(&mut self, value: u8) {
        self.bytes.push(value);
    }

    pub(crate) fn u16(&mut self, value: u16) {
        self.bytes.extend_from_slice(&value.to_be_bytes());
    }

    pub(crate) fn u32(&mut self, value: u32) {
        self.bytes.extend_from_slice(&value.to_be_bytes());
    }

    pub(crate) fn bytes(&mut self, bytes: &[u8]) {
        self.bytes.extend_from_slice(bytes);
    }

    pub(crate) fn variable_int(&mut self, value: u32) -> Result<(), MqttError> {
        if value > MAX_VARIABLE_BYTE_INTEGER {
            return Err(MqttError::cannot_encode(
                "value too large for a variable byte integer",
            ));
        }
        let mut rest = value;
        loop {
            // Seven bits per byte, least significant first; the high bit says "more follows".
            let low_bits = (rest & 0x7F) as u8;
            rest >>= 7;
            if rest == 0 {
                self.u8(low_bits);
                return Ok(());
            }
            self.u8(low_bits | 0x80);
        }
    }

    pub(crate) fn binary(&mut self, bytes: &[u8]) -> Result<(), MqttError> {
        let length = u16::try_from(bytes.len())
            .map_err(|_| MqttError::cannot_encode("string or binary data over 65,535 bytes"))?;
        self.u16(length);
        self.bytes(bytes);
        Ok(())
    }

    pub(crate) fn string(&mut self, text: &str) -> Result<(), MqttError> {
        self.binary(text.as_bytes())
    }

    /// The finished packet: first byte, remaining length, then what was written.
    fn into_packet(self, first_byte: u8) -> Result<Vec<u8>, MqttError> {
        let remaining = u32::try_from(self.bytes.len())
            .map_err(|_| MqttError::cannot_encode("packet too large"))?;
        let mut packet = Writer::new();
        packet.u8(first_byte);
        packet.variable_int(remaining)?;
        packet.bytes(&self.bytes);
        Ok(packet.bytes)
    }
}

fn properties_if_v5(
    properties: &Properties,
    version: ProtocolVersion,
    out: &mut Writer,
) -> Result<(), MqttError> {
    match version {
        ProtocolVersion::V5 => write_properties(properties, out),
        ProtocolVersion::V311 if properties.is_empty() => Ok(()),
        ProtocolVersion::V311 => Err(MqttError::cannot_encode("properties in MQTT 3.1.1")),
    }
}

/// Reason code and properties that v5 lets out when 0 / empty; 3.1.1 has neither.
fn optional_reason_and_properties(
    reason_code: u8,
    properties: &Properties,
    version: ProtocolVersion,
    out: &mut Writer,
) -> Result<(), MqttError> {
    match version {
        ProtocolVersion::V311 if reason_code == 0 && properties.is_empty() => Ok(()),
        ProtocolVersion::V311 => Err(MqttError::cannot_encode(
            "reason code or properties in MQTT 3.1.1",
        )),
        ProtocolVersion::V5 => {
            if reason_code != 0 || !properties.is_empty() {
                out.u8(reason_code);
            }
            if !properties.is_empty() {
                write_properties(properties, out)?;
            }
            Ok(())
        }
    }
}

fn connect_body(connect: &Connect, out: &mut Writer) -> Result<(), MqttError> {
    let version = connect.version;
    out.string("MQTT")?;
    let bridge_flag = if connect.bridge { BRIDGE_FLAG } else { 0 };
    out.u8(version.level() | bridge_flag);
    let mut flags = 0u8;
    if connect.username.is_some() {
        flags |= 0x80;
    }
    if connect.password.is_some() {
        if version == ProtocolVersion::V311 && connect.username.is_none() {
            return Err(MqttError::cannot_encode(
                "password without user name in MQTT 3.1.1",
            ));
        }
        flags |= 0x40;
    }
    if let Some(will) = &connect.will {
        flags |= 0x04 | (will.qos.bits() << 3);
        if will.retain {
            flags |= 0x20;
        }
    }
    if connect.clean_start {
        flags |= 0x02;
    }
    out.u8(flags);
    out.u16(connect.keep_alive);
    properties_if_v5(&connect.properties, version, out)?;
    out.string(&connect.client_id)?;
    if let Some(will) = &connect.will {
        properties_if_v5(&will.properties, version, out)?;
        out.string(&will.topic)?;
        out.binary(&will.payload)?;
    }
    if let Some(username) = &connect.username {
        out.string(username)?;
    }
    if let Some(password) = &connect.password {
        out.binary(password)?;
    }
    Ok(())
}

fn connack_body(
    connack: &ConnAck,
    version: ProtocolVersion,
    out: &mut Writer,
) -> Result<(), MqttError> {
    out.u8(u8::from(connack.session_present));
    out.u8(connack.code);
    properties_if_v5(&connack.properties, version, out)
}

fn publish_first_byte_and_body(
    publish: &Publish,
    version: ProtocolVersion,
    out: &mut Writer,
) -> Result<u8, MqttError> {
    let mut first = 0x30 | (publish.qos.bits() << 1);
    if publish.dup {
        first |= 0x08;
    }
    if publish.retain {
        first |= 0x01;
    }
    out.string(&publish.topic)?;
    match (publish.qos, publish.packet_id) {
        (QoS::AtMostOnce, None) => {}
        (QoS::AtLeastOnce | QoS::ExactlyOnce, Some(packet_id)) => out.u16(packet_id),
        _ => {
            return Err(MqttError::cannot_encode(
                "PUBLISH needs a packet identifier exactly when QoS > 0",
            ))
        }
    }
    properties_if_v5(&publish.properties, version, out)?;
    out.bytes(&publish.payload);
    Ok(first)
}

fn publish_response_body(
    response: &PublishResponse,
    version: ProtocolVersion,
    out: &mut Writer,
) -> Result<(), MqttError> {
    out.u16(response.packet_id);
    optional_reason_and_properties(response.reason_code, &response.properties, version, out)
}

fn subscription_options_byte(
    options: &SubscriptionOptions,
    version: ProtocolVersion,
) -> Result<u8, MqttError> {
    let mut byte = options.qos.bits();
    if options.no_local {
        byte |= 0x04;
    }
    if options.retain_as_published {
        byte |= 0x08;
    }
    if options.retain_handling > 2 {
        return Err(MqttError::cannot_encode("retain handling above 2"));
    }
    byte |= options.retain_handling << 4;
    if version == ProtocolVersion::V311 && byte > 0b11 {
        return Err(MqttError::cannot_encode(
            "v5 subscription options in MQTT 3.1.1",
        ));
    }
    Ok(byte)
}

fn subscribe_body(
    subscribe: &Subscribe,
    version: ProtocolVersion,
    out: &mut Writer,
) -> Result<(), MqttError> {
    out.u16(subscribe.packet_id);
    properties_if_v5(&subscribe.properties, version, out)?;
    for subscription in &subscribe.filters {
        out.string(&subscription.filter)?;
        out.u8(subscription_options_byte(&subscription.options, version)?);
    }
    Ok(())
}

fn suback_body(
    suback: &SubAck,
    version: ProtocolVersion,
    out: &mut Writer,
) -> Result<(), MqttError> {
    out.u16(suback.packet_id);
    properties_if_v5(&suback.properties, version, out)?;
    out.bytes(&suback.codes);
    Ok(())
}

fn unsubscribe_body(
    unsubscribe: &Unsubscribe,
    version: ProtocolVersion,
    out: &mut Writer,
) -> Result<(), MqttError> {
    out.u16(unsubscribe.packet_id);
    properties_if_v5(&unsubscribe.properties, version, out)?;
    for filter in &unsubscribe.filters {
        out.string(filter)?;
    }
    Ok(())
}

fn unsuback_body(
    unsuback: &UnsubAck,
    version: ProtocolVersion,
    out: &mut Writer,
) -> Result<(), MqttError> {
    out.u16(unsuback.packet_id);
    if version == ProtocolVersion::V311 && !unsuback.codes.is_empty() {
        return Err(MqttError::cannot_encode(
            "UNSUBACK reason codes in MQTT 3.1.1",
        ));
    }
    properties_if_v5(&unsuback.properties, version, out)?;
    out.bytes(&unsuback.codes);
    Ok(())
}

/// Encodes a packet for a connection of `version` (a CONNECT uses its own version).
pub fn encode(packet: &Packet, version: ProtocolVersion) -> Result<Vec<u8>, MqttError> {
    let mut body = Writer::new();
    let out = &mut body;
    let first_byte = match packet {
        Packet::Connect(connect) => {
            connect_body(connect, out)?;
            0x10
        }
        Packet::ConnAck(connack) => {
            connack_body(connack, version, out)?;
            0x20
        }
        Packet::Publish(publish) => publish_first_byte_and_body(publish, version, out)?,
        Packet::PubAck(response) => {
            publish_response_body(response, version, out)?;
            0x40
        }
        Packet::PubRec(response) => {
            publish_response_body(response, version, out)?;
            0x50
        }
        Packet::PubRel(response) => {
            publish_response_body(response, version, out)?;
            0x62
        }
        Packet::PubComp(response) => {
            publish_response_body(response, version, out)?;
            0x70
        }
        Packet::Subscribe(subscribe) => {
            subscribe_body(subscribe, version, out)?;
            0x82
        }
        Packet::SubAck(suback) => {
            suback_body(suback, version, out)?;
            0x90
        }
        Packet::Unsubscribe(unsubscribe) => {
            unsubscribe_body(unsubscribe, version, out)?;
            0xA2
        }
        Packet::UnsubAck(unsuback) => {
            unsuback_body(unsuback, version, out)?;
            0xB0
        }
        Packet::PingReq => 0xC0,
        Packet::PingResp => 0xD0,
        Packet::Disconnect(disconnect) => {
            optional_reason_and_properties(
                disconnect.reason_code,
                &disconnect.properties,
                version,
                out,
            )?;
            0xE0
        }
        Packet::Auth(auth) => {
            if version == ProtocolVersion::V311 {
                return Err(MqttError::cannot_encode("AUTH in MQTT 3.1.1"));
            }
            optional_reason_and_properties(auth.reason_code, &auth.properties, version, out)?;
            0xF0
        }
    };
    body.into_packet(first_byte)
}

/// A CONNACK without session and (v5) without properties: what refuses a CONNECT with `code`
/// ([`super::v3_connack`] or [`super::reason`]).
pub fn encode_connack(version: ProtocolVersion, code: u8) -> Vec<u8> {
    match version {
        ProtocolVersion::V311 => vec![0x20, 0x02, 0x00, code],
        ProtocolVersion::V5 => vec![0x20, 0x03, 0x00, code, 0x00],
    }
}

/// A SUBACK without properties.
pub fn encode_suback(
    version: ProtocolVersion,
    packet_id: u16,
    codes: &[u8],
) -> Result<Vec<u8>, MqttError> {
    let mut body = Writer::new();
    body.u16(packet_id);
    properties_if_v5(&Properties::new(), version, &mut body)?;
    body.bytes(codes);
    body.into_packet(0x90)
}

/// A v5 DISCONNECT with a reason code and no properties (3.1.1 brokers send no DISCONNECT:
/// they just close).
pub fn encode_disconnect_v5(reason_code: u8) -> Vec<u8> {
    if reason_code == 0 {
        vec![0xE0, 0x00]
    } else {
        vec![0xE0, 0x01, reason_code]
    }
}

/// A SUBSCRIBE, e.g. one whose refused filters were removed (options and properties kept).
pub fn encode_subscribe(
    version: ProtocolVersion,
    subscribe: &Subscribe,
) -> Result<Vec<u8>, MqttError> {
    let mut body = Writer::new();
    subscribe_body(subscribe, version, &mut body)?;
    body.into_packet(0x82)
}

/// Rebuilds the SUBACK codes the client expects after the filter forwarded only some of its
/// filters: `refused[i]` says whether filter `i` of the client's SUBSCRIBE was refused (and
/// gets `failure_code`); the others take the broker's codes in order. `None` when the broker
/// returned a different number of codes than filters were forwarded.
pub fn splice_suback_codes(
    forwarded_codes: &[u8],
    refused: &[bool],
    failure_code: u8,
) -> Option<Vec<u8>> {
    let mut broker_codes = forwarded_codes.iter();
    let codes = refused
        .iter()
        .map(|&was_refused| {
            if was_refused {
                Some(failure_code)
            } else {
                broker_codes.next().copied()
            }
        })
        .collect::<Option<Vec<u8>>>()?;
    broker_codes.next().is_none().then_some(codes)
}
