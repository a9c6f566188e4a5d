//! MQTT 5.0 properties (section 2.2.2): every property of the spec, which packets may carry it,
//! and the value rules whose violation is a protocol error.

use super::decode::Reader;
use super::encode::Writer;
use super::{MqttError, MAX_VARIABLE_BYTE_INTEGER};

/// One v5 property with its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Property {
    PayloadFormatIndicator(u8),
    MessageExpiryInterval(u32),
    ContentType(String),
    ResponseTopic(String),
    CorrelationData(Vec<u8>),
    SubscriptionIdentifier(u32),
    SessionExpiryInterval(u32),
    AssignedClientIdentifier(String),
    ServerKeepAlive(u16),
    AuthenticationMethod(String),
    AuthenticationData(Vec<u8>),
    RequestProblemInformation(u8),
    WillDelayInterval(u32),
    RequestResponseInformation(u8),
    ResponseInformation(String),
    ServerReference(String),
    ReasonString(String),
    ReceiveMaximum(u16),
    TopicAliasMaximum(u16),
    TopicAlias(u16),
    MaximumQos(u8),
    RetainAvailable(u8),
    UserProperty(String, String),
    MaximumPacketSize(u32),
    WildcardSubscriptionAvailable(u8),
    SubscriptionIdentifierAvailable(u8),
    SharedSubscriptionAvailable(u8),
}

/// The property list of a packet, in wire order (so re-encoding gives the same bytes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties(pub Vec<Property>);

impl Properties {
    pub fn new() -> Self {
        Properties(Vec::new())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Property> {
        self.0.iter()
    }

    pub fn session_expiry_interval(&self) -> Option<u32> {
        self.iter().find_map(|p| match p {
            Property::SessionExpiryInterval(v) => Some(*v),
            _ => None,
        })
    }

    pub fn authentication_method(&self) -> Option<&str> {
        self.iter().find_map(|p| match p {
            Property::AuthenticationMethod(v) => Some(v.as_str()),
            _ => None,
        })
    }

    pub fn authentication_data(&self) -> Option<&[u8]> {
        self.iter().find_map(|p| match p {
            Property::AuthenticationData(v) => Some(v.as_slice()),
            _ => None,
        })
    }

    pub fn topic_alias(&self) -> Option<u16> {
        self.iter().find_map(|p| match p {
            Property::TopicAlias(v) => Some(*v),
            _ => None,
        })
    }

    pub fn topic_alias_maximum(&self) -> Option<u16> {
        self.iter().find_map(|p| match p {
            Property::TopicAliasMaximum(v) => Some(*v),
            _ => None,
        })
    }

    pub fn reason_string(&self) -> Option<&str> {
        self.iter().find_map(|p| match p {
            Property::ReasonString(v) => Some(v.as_str()),
            _ => None,
        })
    }

    pub fn subscription_identifiers(&self) -> impl Iterator<Item = u32> + '_ {
        self.iter().filter_map(|p| match p {
            Property::SubscriptionIdentifier(v) => Some(*v),
            _ => None,
        })
    }

    pub fn user_properties(&self) -> impl Iterator<Item = (&str, &str)> {
        self.iter().filter_map(|p| match p {
            Property::UserProperty(k, v) => Some((k.as_str(), v.as_str())),
            _ => None,
        })
    }
}

/// Where a property list sits; each property is allowed in some of these (table 2-4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PropertyContext {
    Connect,
    Will,
    ConnAck,
    Publish,
    /// PUBACK, PUBREC, PUBREL, PUBCOMP.
    PublishResponse,
    Subscribe,
    SubAck,
    Unsubscribe,
    UnsubAck,
    Disconnect,
    Auth,
}

impl PropertyContext {
    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

/// How a property's value is encoded (section 1.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ValueType {
    Byte,
    TwoByteInteger,
    FourByteInteger,
    VariableByteInteger,
    Utf8String,
    BinaryData,
    Utf8StringPair,
}

struct PropertyRule {
    id: u8,
    value_type: ValueType,
    /// Bits of the [`PropertyContext`]s that may carry it.
    contexts: u16,
}

const fn contexts(list: &[PropertyContext]) -> u16 {
    let mut bits = 0u16;
    let mut i = 0;
    while i < list.len() {
        bits |= 1 << (list[i] as u16);
        i += 1;
    }
    bits
}

use PropertyContext as C;
use ValueType as T;

const PUBLISH_AND_WILL: u16 = contexts(&[C::Publish, C::Will]);
const EVERY_CONTEXT: u16 = contexts(&[
    C::Connect,
    C::Will,
    C::ConnAck,
    C::Publish,
    C::PublishResponse,
    C::Subscribe,
    C::SubAck,
    C::Unsubscribe,
    C::UnsubAck,
    C::Disconnect,
    C::Auth,
]);

/// Table 2-4 of MQTT 5.0: identifier, type, packets.
const PROPERTY_RULES: &[PropertyRule] = &[
    rule(0x01, T::Byte, PUBLISH_AND_WILL),
    rule(0x02, T::FourByteInteger, PUBLISH_AND_WILL),
    rule(0x03, T::Utf8String, PUBLISH_AND_WILL),
    rule(0x08, T::Utf8String, PUBLISH_AND_WILL),
    rule(0x09, T::BinaryData, PUBLISH_AND_WILL),
    rule(
        0x0B,
        T::VariableByteInteger,
        contexts(&[C::Publish, C::Subscribe]),
    ),
    rule(
        0x11,
        T::FourByteInteger,
        contexts(&[C::Connect, C::ConnAck, C::Disconnect]),
    ),
    rule(0x12, T::Utf8String, contexts(&[C::ConnAck])),
    rule(0x13, T::TwoByteInteger, contexts(&[C::ConnAck])),
    rule(
        0x15,
        T::Utf8String,
        contexts(&[C::Connect, C::ConnAck, C::Auth]),
    ),
    rule(
        0x16,
        T::BinaryData,
        contexts(&[C::Connect, C::ConnAck, C::Auth]),
    ),
    rule(0x17, T::Byte, contexts(&[C::Connect])),
    rule(0x18, T::FourByteInteger, contexts(&[C::Will])),
    rule(0x19, T::Byte, contexts(&[C::Connect])),
    rule(0x1A, T::Utf8String, contexts(&[C::ConnAck])),
    rule(0x1C, T::Utf8String, contexts(&[C::ConnAck, C::Disconnect])),
    rule(
        0x1F,
        T::Utf8String,
        contexts(&[
            C::ConnAck,
            C::PublishResponse,
            C::SubAck,
            C::UnsubAck,
            C::Disconnect,
            C::Auth,
        ]),
    ),
    rule(0x21, T::TwoByteInteger, contexts(&[C::Connect, C::ConnAck])),
    rule(0x22, T::TwoByteInteger, contexts(&[C::Connect, C::ConnAck])),
    rule(0x23, T::TwoByteInteger, contexts(&[C::Publish])),
    rule(0x24, T::Byte, contexts(&[C::ConnAck])),
    rule(0x25, T::Byte, contexts(&[C::ConnAck])),
    rule(0x26, T::Utf8StringPair, EVERY_CONTEXT),
    rule(
        0x27,
        T::FourByteInteger,
        contexts(&[C::Connect, C::ConnAck]),
    ),
    rule(0x28, T::Byte, contexts(&[C::ConnAck])),
    rule(0x29, T::Byte, contexts(&[C::ConnAck])),
    rule(0x2A, T::Byte, contexts(&[C::ConnAck])),
];

const fn rule(id: u8, value_type: ValueType, contexts: u16) -> PropertyRule {
    PropertyRule {
        id,
        value_type,
        contexts,
    }
}

fn rule_for(id: u8) -> Option<&'static PropertyRule> {
    PROPERTY_RULES.iter().find(|rule| rule.id == id)
}

impl Property {
    pub fn id(&self) -> u8 {
        match self {
            Property::PayloadFormatIndicator(_) => 0x01,
            Property::MessageExpiryInterval(_) => 0x02,
            Property::ContentType(_) => 0x03,
            Property::ResponseTopic(_) => 0x08,
            Property::CorrelationData(_) => 0x09,
            Property::SubscriptionIdentifier(_) => 0x0B,
            Property::SessionExpiryInterval(_) => 0x11,
            Property::AssignedClientIdentifier(_) => 0x12,
            Property::ServerKeepAlive(_) => 0x13,
            Property::AuthenticationMethod(_) => 0x15,
            Property::AuthenticationData(_) => 0x16,
            Property::RequestProblemInformation(_) => 0x17,
            Property::WillDelayInterval(_) => 0x18,
            Property::RequestResponseInformation(_) => 0x19,
            Property::ResponseInformation(_) => 0x1A,
            Property::ServerReference(_) => 0x1C,
            Property::ReasonString(_) => 0x1F,
            Property::ReceiveMaximum(_) => 0x21,
            Property::TopicAliasMaximum(_) => 0x22,
            Property::TopicAlias(_) => 0x23,
            Property::MaximumQos(_) => 0x24,
            Property::RetainAvailable(_) => 0x25,
            Property::UserProperty(_, _) => 0x26,
            Property::MaximumPacketSize(_) => 0x27,
            Property::WildcardSubscriptionAvailable(_) => 0x28,
            Property::SubscriptionIdentifierAvailable(_) => 0x29,
            Property::SharedSubscriptionAvailable(_) => 0x2A,
        }
    }

    /// The value rules of section 3 whose violation is a protocol error.
    fn check_value(&self) -> Result<(), MqttError> {
        let bad = |what: &str| Err(MqttError::protocol(format!("invalid {what} property")));
        match self {
            // Boolean-like bytes: 0 or 1 (Maximum QoS too: 2 is expressed by its absence).
            Property::PayloadFormatIndicator(v)
            | Property::RequestProblemInformation(v)
            | Property::RequestResponseInformation(v)
            | Property::MaximumQos(v)
            | Property::RetainAvailable(v)
            | Property::WildcardSubscriptionAvailable(v)
            | Property::SubscriptionIdentifierAvailable(v)
            | Property::SharedSubscriptionAvailable(v)
                if *v > 1 =>
            {
                bad("boolean")
            }
            Property::SubscriptionIdentifier(0) => bad("subscription identifier"),
            Property::ReceiveMaximum(0) => bad("receive maximum"),
            Property::TopicAlias(0) => bad("topic alias"),
            Property::MaximumPacketSize(0) => bad("maximum packet size"),
            Property::ResponseTopic(topic) => super::decode::check_topic_name(topic),
            _ => Ok(()),
        }
    }

    fn read(id: u8, value_type: ValueType, reader: &mut Reader<'_>) -> Result<Self, MqttError> {
        let property = match value_type {
            T::Byte => {
                let v = reader.u8()?;
                match id {
                    0x01 => Property::PayloadFormatIndicator(v),
                    0x17 => Property::RequestProblemInformation(v),
                    0x19 => Property::RequestResponseInformation(v),
                    0x24 => Property::MaximumQos(v),
                    0x25 => Property::RetainAvailable(v),
                    0x28 => Property::WildcardSubscriptionAvailable(v),
                    0x29 => Property::SubscriptionIdentifierAvailable(v),
                    _ => Property::SharedSubscriptionAvailable(v),
                }
            }
            T::TwoByteInteger => {
                let v = reader.u16()?;
                match id {
                    0x13 => Property::ServerKeepAlive(v),
                    0x21 => Property::ReceiveMaximum(v),
                    0x22 => Property::TopicAliasMaximum(v),
                    _ => Property::TopicAlias(v),
                }
            }
            T::FourByteInteger => {
                let v = reader.u32()?;
                match id {
                    0x02 => Property::MessageExpiryInterval(v),
                    0x11 => Property::SessionExpiryInterval(v),
                    0x18 => Property::WillDelayInterval(v),
                    _ => Property::MaximumPacketSize(v),
                }
            }
            T::VariableByteInteger => Property::SubscriptionIdentifier(reader.variable_int()?),
            T::Utf8String => {
                let v = reader.string()?;
                match id {
                    0x03 => Property::ContentType(v),
                    0x08 => Property::ResponseTopic(v),
                    0x12 => Property::AssignedClientIdentifier(v),
                    0x15 => Property::AuthenticationMethod(v),
                    0x1A => Property::ResponseInformation(v),
                    0x1C => Property::ServerReference(v),
                    _ => Property::ReasonString(v),
                }
            }
            T::BinaryData => {
                let v = reader.binary()?;
                match id {
                    0x09 => Property::CorrelationData(v),
                    _ => Property::AuthenticationData(v),
                }
            }
            T::Utf8StringPair => {
                let key = reader.string()?;
                let value = reader.string()?;
                Property::UserProperty(key, value)
            }
        };
        Ok(property)
    }

    fn write(&self, out: &mut Writer) -> Result<(), MqttError> {
        out.u8(self.id());
        match self {
            Property::PayloadFormatIndicator(v)
            | Property::RequestProblemInformation(v)
            | Property::RequestResponseInformation(v)
            | Property::MaximumQos(v)
            | Property::RetainAvailable(v)
            | Property::WildcardSubscriptionAvailable(v)
            | Property::SubscriptionIdentifierAvailable(v)
            | Property::SharedSubscriptionAvailable(v) => out.u8(*v),
            Property::ServerKeepAlive(v)
            | Property::ReceiveMaximum(v)
            | Property::TopicAliasMaximum(v)
            | Property::TopicAlias(v) => out.u16(*v),
            Property::MessageExpiryInterval(v)
            | Property::SessionExpiryInterval(v)
            | Property::WillDelayInterval(v)
            | Property::MaximumPacketSize(v) => out.u32(*v),
            Property::SubscriptionIdentifier(v) => out.variable_int(*v)?,
            Property::ContentType(v)
            | Property::ResponseTopic(v)
            | Property::AssignedClientIdentifier(v)
            | Property::AuthenticationMethod(v)
            | Property::ResponseInformation(v)
            | Property::ServerReference(v)
            | Property::ReasonString(v) => out.string(v)?,
            Property::CorrelationData(v) | Property::AuthenticationData(v) => out.binary(v)?,
            Property::UserProperty(key, value) => {
                out.string(key)?;
                out.string(value)?;
            }
        }
        Ok(())
    }
}

/// Reads a property list (length, then properties) and checks it for `context`. Only User
/// Property, and Subscription Identifier in PUBLISH (broker→client), may appear more than once.
pub(crate) fn read_properties(
    reader: &mut Reader<'_>,
    context: PropertyContext,
) -> Result<Properties, MqttError> {
    let length = reader.variable_int()?;
    let bytes = reader.take(usize::try_from(length).unwrap_or(usize::MAX))?;
    let mut inner = Reader::new(bytes);
    let mut properties = Vec::new();
    let mut seen: u64 = 0;
    while !inner.is_empty() {
        // Identifiers are variable byte integers, but every defined one fits in 7 bits; a byte
        // with the continuation bit is no known identifier.
        let id = inner.u8()?;
        let rule = rule_for(id)
            .ok_or_else(|| MqttError::malformed(format!("unknown property 0x{id:02X}")))?;
        if rule.contexts & context.bit() == 0 {
            return Err(MqttError::malformed(format!(
                "property 0x{id:02X} is not allowed in {context:?}"
            )));
        }
        let property = Property::read(id, rule.value_type, &mut inner)?;
        property.check_value()?;
        let repeatable = id == 0x26 || (id == 0x0B && context == PropertyContext::Publish);
        let bit = 1u64 << id;
        if seen & bit != 0 && !repeatable {
            return Err(MqttError::protocol(format!(
                "property 0x{id:02X} included more than once"
            )));
        }
        seen |= bit;
        properties.push(property);
    }
    Ok(Properties(properties))
}

/// Writes a property list: its length, then the properties in order.
pub(crate) fn write_properties(properties: &Properties, out: &mut Writer) -> Result<(), MqttError> {
    let mut body = Writer::new();
    for property in properties.iter() {
        property.write(&mut body)?;
    }
    let length = u32::try_from(body.len())
        .ok()
        .filter(|len| *len <= MAX_VARIABLE_BYTE_INTEGER)
        .ok_or_else(|| MqttError::cannot_encode("properties too long"))?;
    out.variable_int(length)?;
    out.bytes(body.as_slice());
    Ok(())
}
