//! mqtt-acl: MQTT CONNECT authentication and topic ACLs for an Envoy network filter in front of
//! an MQTT broker (Mosquitto). Pure logic: the configuration ([`MqttAclConfig`], validated by
//! [`MqttAcl::new`]) and a per-connection state machine ([`Session`]) that reads the bytes of
//! each direction and says what to forward in their place, what it decided and when to close.
//! The filter (`filters/mqtt-acl`) only moves bytes, writes log lines and counts.
//!
//! # Authentication (CONNECT)
//!
//! In order, with the same verification code and configuration schema as token-auth:
//! 1. a user name that is a JWT (three dot-separated parts) and no or an empty password: the
//!    token is verified with `jwt_providers` (inline keys only: `jwks`, `pem`, `hmac_secret`);
//!    the connection lasts at most until the token's `exp`;
//! 2. a user name and a non-empty password: a device key (`device_keys`, user name = device id,
//!    password = key); a device `device_keys.devices` does not list is looked up in
//!    `device_keys.registry` (cached per VM; no usable answer is "server unavailable", never
//!    cached; concurrent CONNECTs of the same unknown device share one lookup:
//!    [`SharedAsks`]); such a connection is re-checked before the registry answer
//!    it runs on expires, and closed once the key is no longer listed ([`RegistryRechecks`]);
//! 3. a verified client certificate (`mtls`): the identity its CN or SAN names; the client may
//!    send no user name or one equal to that identity (LAMPI sends its CN);
//! 4. nothing: refused unless `allow_anonymous` (then ACL subjects `anonymous`/`anyone` apply).
//!
//! Remote JWKS (a provider's `remote`) are fetched by the filter as token-auth fetches them
//! (`proxy_glue::remote_keys`); a token whose keys are not there yet, or whose `kid` is
//! unknown, is refused as "server unavailable" and the keys are fetched. With `introspection`
//! (token-auth's schema: RFC 7662 or Keyrock), a user name no other method takes is an opaque
//! token (the password is ignored): introspected, cached per VM ([`OpaqueTokens`]), its `exp`
//! the connection's deadline; no usable answer is "server unavailable", never cached;
//! concurrent CONNECTs with the same token share one call ([`SharedAsks`], which also bounds
//! the connections waiting: one over `max_waiting_connections` or an endpoint's
//! `max_in_flight` is refused as "server busy", 3.1.1 0x03, 5.0 0x89).
//! A will message is checked like a PUBLISH to its topic at CONNECT: a forbidden will refuses
//! the CONNECT. The client id must fit `client_ids` (default `%u`, `%u-*`): nobody takes over
//! another device's session. An accepted CONNECT goes on with the verified subject as user name
//! and no password: no credential reaches the broker.
//!
//! # What the client sees
//!
//! Envoy lets a network filter write to the client only by replacing bytes that flow from the
//! broker, so every answer is a broker packet turned into ours:
//! * refused CONNECT: a harmless CONNECT (same protocol version, clean start, keep-alive kept,
//!   no will, no credentials, client id `mqtt-acl-refused-<n>`) goes to `refusal_cluster` (the
//!   sidecar's in-process echo stand-in; the broker only without it), and the answer is
//!   replaced by ours — 3.1.1: 0x04 bad user name or password (a credential that
//!   does not verify), 0x05 not authorized (no credential, forbidden will), 0x02 identifier
//!   rejected (`client_ids`), 0x03 server unavailable, 0x01 unacceptable protocol version
//!   (MQTT 3.1 and unknown levels); 5.0: 0x86, 0x87, 0x85, 0x88, 0x8C bad authentication
//!   method (enhanced authentication) — and the connection
//!   is closed once it is written. Everything else the client sent is dropped; its CONNECT
//!   (credentials, will) never reaches the broker.
//! * forbidden SUBSCRIBE filters: the broker gets the SUBSCRIBE without them and the client a
//!   SUBACK with 0x80 (3.1.1) / 0x87 (5.0) in their places; when every filter is refused the
//!   broker gets a PINGREQ and its PINGRESP becomes the all-failure SUBACK.
//! * forbidden PUBLISH, `on_forbidden_publish: "drop"` (default): QoS 0 is dropped; QoS 1 is
//!   answered with a PUBACK (5.0: reason 0x87; 3.1.1: a plain PUBACK, as Mosquitto answers a
//!   denied publish), made from the PINGRESP of a PINGREQ sent in its place; QoS 2 closes the
//!   connection. `"close"`: the connection is closed (no DISCONNECT: nothing from the broker
//!   is in flight to carry it).
//! * a message the broker delivers on a topic the client may not read (a subscription stored
//!   in a persistent session before the policy changed): QoS 0 dropped, QoS 1/2 close.
//! * token expiry, a registry key revoked or not confirmed in time: the connection is closed
//!   (by the next packet or the filter's tick).
//! * malformed packets, protocol errors, packets over `max_packet_bytes`: closed; what was
//!   allowed before it in the same read still goes on, nothing from the bad packet on.
//!
//! # Device ownership
//!
//! With `ownership.topic_template` (e.g. `devices/{device}/#`) a topic the template matches
//! names a device: a device identity (device key, client certificate) may publish and
//! subscribe only under its own id; a user only where the device's record (`ownership.devices`)
//! makes it the owner, a delegate (`read` / `read_write`) or (for reading) the device is
//! public; `admin_roles` bypass. A subscription filter whose device level is a wildcard spans
//! several devices and is refused (except for admins). Both the ACL and ownership must allow.

use std::collections::{BTreeMap, HashMap, VecDeque};

mod backend;
mod opaque;
mod recheck;
mod shared;
mod transport;
pub use backend::{
    BackendAnswer, BackendRequest, BackendVerdict, Check, HttpBackend, HttpBackendConfig, ACC_READ,
    ACC_SUBSCRIBE, ACC_WRITE,
};
pub use opaque::OpaqueTokens;
pub use recheck::{RecheckCall, RegistryRechecks};
pub use shared::{AskKey, AskLimits, Joined, SharedAsks, Shed, Waiter, Whom};
pub use transport::{Connection, Transport};

use serde::Deserialize;

use crate::acl::mosquitto::import_acl_file;
use crate::acl::topic::{Level, TopicFilter};
use crate::acl::{Acl, AclConfig, TopicAccess};
use crate::decision::{Decision, DenyReason};
use crate::decision_line::DecisionLine;
use crate::device_keys::{DeviceKeys, DeviceKeysConfig, KeyCheck};
use crate::device_registry::LookupResult;
use crate::enforcement::Mode;
use crate::identity::{Identity, IdentityKind};
use crate::introspection::{HttpCall, IntrospectionConfig};
use crate::jwt::{JwtProviderConfig, JwtVerifier, TokenError};
use crate::log_text::bounded_debug;
use crate::mqtt::{
    encode, encode_connack, encode_suback, encode_subscribe, reason, shared_subscription,
    splice_suback_codes, v3_connack, v3_suback, Connect, Decoder, ErrorKind, Frame, Limits, Packet,
    Properties, ProtocolVersion, PublishResponse, QoS, Subscribe,
};
use crate::mtls::{MtlsConfig, PeerCertificate};
use crate::ownership::config::DelegationConfig;
use crate::ownership::{DelegatedAccess, Delegation, Grantee, Record};

/// The filter's name in log lines.
pub const FILTER: &str = "mqtt-acl";

/// The shortest `device_keys.registry.cache.positive_ttl_s` mqtt-acl takes: a connection needs
/// time to ask again before its answer expires ([`RegistryRechecks`]).
pub const MIN_REGISTRY_POSITIVE_TTL_S: u64 = 2;

// ------------------------------------------------------------------------------------------
// Configuration
// ------------------------------------------------------------------------------------------

/// The plugin configuration (JSON).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttAclConfig {
    /// `enforce` (default) or `shadow`.
    #[serde(default)]
    pub mode: Mode,
    /// Allowed requests are logged at `debug` (default), `info`, or not at all (`off`).
    /// Denials are always logged, at warning.
    #[serde(default)]
    pub log_allows: crate::decision_line::LogAllows,
    /// As token-auth's `jwt_providers`, inline keys only.
    #[serde(default)]
    pub jwt_providers: Vec<JwtProviderConfig>,
    /// As token-auth's `device_keys`: user name = device id, password = key.
    #[serde(default)]
    pub device_keys: Option<DeviceKeysConfig>,
    /// As token-auth's `mtls`: identity from the verified client certificate.
    #[serde(default)]
    pub mtls: Option<MtlsConfig>,
    /// Clients without credentials connect (ACL subjects `anonymous` and `anyone`).
    #[serde(default)]
    pub allow_anonymous: bool,
    /// MQTT rules (`{"rules": [...]}`, NGSI rules refused).
    #[serde(default)]
    pub acl: Option<AclConfig>,
    /// Or the text of a Mosquitto `acl_file`.
    #[serde(default)]
    pub acl_file: Option<String>,
    #[serde(default)]
    pub ownership: Option<OwnershipConfig>,
    #[serde(default)]
    pub on_forbidden_publish: OnForbiddenPublish,
    /// Largest packet accepted in either direction, fixed header included (default 256 KiB).
    #[serde(default = "default_max_packet")]
    pub max_packet_bytes: usize,
    /// Largest topic alias a client may use (default 10, Mosquitto's `max_topic_alias`).
    #[serde(default = "default_topic_aliases")]
    pub max_topic_aliases: u16,
    /// The Envoy cluster a refused connection goes to instead of the broker (the sidecar's
    /// stand-in answers it; default `mqtt_acl_refusal`); `null`: the broker gets a harmless
    /// CONNECT and answers the refusal.
    #[serde(default = "default_refusal_cluster")]
    pub refusal_cluster: Option<String>,
    /// The client ids an identity may use: `%u` is its subject, a final `*` any rest (default
    /// `["%u", "%u-*"]`). Others are refused, so no client takes over another's session.
    #[serde(default = "default_client_ids")]
    pub client_ids: Vec<String>,
    /// Seconds a client has to complete its CONNECT after opening the connection (default 10).
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// An HTTP auth/ACL backend speaking mosquitto-go-auth's protocol (`user`, `superuser`,
    /// `acl`), asked through an Envoy cluster in addition to the local rules.
    #[serde(default)]
    pub http_backend: Option<HttpBackendConfig>,
    /// Opaque tokens as user names, checked by token-auth's introspection (RFC 7662 or
    /// Keyrock; its schema).
    #[serde(default)]
    pub introspection: Option<IntrospectionConfig>,
    /// `mqtt` (default: raw MQTT) or `websocket` (MQTT over WebSockets; see
    /// [`transport`](self::Connection)).
    #[serde(default)]
    pub transport: Transport,
    /// Connections that may wait for a callout at once per VM (default 1024): concurrent
    /// CONNECTs that need the same answer share one call ([`SharedAsks`]); one more waiting
    /// connection is refused as "server busy".
    #[serde(default = "default_max_waiting_connections")]
    pub max_waiting_connections: usize,
}

fn default_connect_timeout() -> u64 {
    10
}

fn default_max_waiting_connections() -> usize {
    1024
}

/// Bound on `max_waiting_connections`.
const MAX_MAX_WAITING_CONNECTIONS: usize = 1_000_000;

fn default_client_ids() -> Vec<String> {
    vec!["%u".into(), "%u-*".into()]
}

/// One `client_ids` pattern: literal text with `%u` (the subject) and an optional final `*`.
#[derive(Debug, Clone)]
struct ClientIdPattern {
    /// The literal pieces between `%u`s.
    pieces: Vec<String>,
    any_rest: bool,
}

impl ClientIdPattern {
    fn parse(text: &str) -> Result<ClientIdPattern, String> {
        let (body, any_rest) = match text.strip_suffix('*') {
            Some(body) => (body, true),
            None => (text, false),
        };
        if text.is_empty() || body.contains('*') {
            return Err(format!(
                "client_ids pattern {text:?}: give literal text with %u, '*' only at the end"
            ));
        }
        let pieces: Vec<String> = body.split("%u").map(str::to_string).collect();
        if pieces.iter().any(|p| p.contains('%')) {
            return Err(format!(
                "client_ids pattern {text:?}: %u is the only placeholder"
            ));
        }
        Ok(ClientIdPattern { pieces, any_rest })
    }

    /// `subject` None (anonymous): patterns with `%u` never match.
    fn matches(&self, client_id: &str, subject: Option<&str>) -> bool {
        let mut expected = String::new();
        for (i, piece) in self.pieces.iter().enumerate() {
            if i > 0 {
                match subject {
                    Some(subject) => expected.push_str(subject),
                    None => return false,
                }
            }
            expected.push_str(piece);
        }
        if self.any_rest {
            client_id.starts_with(&expected)
        } else {
            client_id == expected
        }
    }
}

/// The cluster of envoy/mqtt-sidecar.yaml's refusal stand-in.
pub const DEFAULT_REFUSAL_CLUSTER: &str = "mqtt_acl_refusal";

fn default_refusal_cluster() -> Option<String> {
    Some(DEFAULT_REFUSAL_CLUSTER.into())
}

fn default_max_packet() -> usize {
    256 * 1024
}

fn default_topic_aliases() -> u16 {
    10
}

/// What happens to a forbidden PUBLISH.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnForbiddenPublish {
    /// QoS 0 dropped, QoS 1 answered with PUBACK (0x87 in 5.0), QoS 2 closes.
    #[default]
    Drop,
    /// The connection is closed.
    Close,
}

/// Device ownership through a topic template.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OwnershipConfig {
    /// A topic filter with one level `{device}`, e.g. `devices/{device}/#`.
    pub topic_template: String,
    /// Device id → its record.
    #[serde(default)]
    pub devices: BTreeMap<String, DeviceRecordConfig>,
    /// Callers with one of these roles bypass ownership (not the ACL).
    #[serde(default)]
    pub admin_roles: Vec<String>,
}

/// One device's record, the shape of device-ownership's static entities.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceRecordConfig {
    pub owner: String,
    #[serde(default)]
    pub delegations: Vec<DelegationConfig>,
    /// Everyone may read (subscribe).
    #[serde(default)]
    pub public: bool,
}

/// The template, split at its `{device}` level.
#[derive(Debug, Clone)]
struct Template {
    text: String,
    /// The levels before `{device}` (literals).
    before: Vec<String>,
    /// The levels after it: literals, the last possibly `#`.
    after: Vec<Level>,
}

impl Template {
    fn parse(text: &str) -> Result<Template, String> {
        let bad = |why: &str| format!("ownership.topic_template {text:?}: {why}");
        let levels: Vec<&str> = text.split('/').collect();
        let at = levels
            .iter()
            .position(|l| *l == "{device}")
            .ok_or_else(|| bad("needs a level that is exactly {device}"))?;
        if levels.iter().filter(|l| l.contains("{device}")).count() != 1 {
            return Err(bad("{device} must be a whole level, exactly once"));
        }
        let mut before = Vec::new();
        for l in &levels[..at] {
            if l.contains(['+', '#', '\0']) || (l.starts_with('$') && before.is_empty()) {
                return Err(bad("levels before {device} must be plain literals"));
            }
            before.push((*l).to_string());
        }
        let rest = levels[at + 1..].join("/");
        let after = if rest.is_empty() {
            Vec::new()
        } else {
            let parsed = TopicFilter::parse(&rest, true).map_err(|e| bad(&e))?;
            if parsed.0.contains(&Level::Plus) {
                return Err(bad("only '#' (last) may follow {device}, not '+'"));
            }
            parsed.0
        };
        Ok(Template {
            text: text.to_string(),
            before,
            after,
        })
    }

    /// The template with `+` for the device: every topic it names.
    fn space(&self) -> TopicFilter {
        let mut levels: Vec<Level> = self.before.iter().cloned().map(Level::Lit).collect();
        levels.push(Level::Plus);
        levels.extend(self.after.iter().cloned());
        TopicFilter(levels)
    }

    /// For a topic or filter the template may name: None when it names no device topic,
    /// Some(Some(id)) for one device, Some(None) when it spans several devices.
    fn device_of(&self, filter: &TopicFilter) -> Option<Option<String>> {
        if !self.space().intersects(filter) {
            return None;
        }
        let literal_prefix = filter
            .0
            .iter()
            .take(self.before.len())
            .all(|l| matches!(l, Level::Lit(_)));
        match filter.0.get(self.before.len()) {
            Some(Level::Lit(id)) if literal_prefix => Some(Some(id.clone())),
            _ => Some(None),
        }
    }
}

/// The validated ownership part.
#[derive(Debug, Clone)]
struct Ownership {
    template: Template,
    records: HashMap<String, Record>,
    admin_roles: Vec<String>,
}

impl Ownership {
    fn new(config: &OwnershipConfig) -> Result<Ownership, String> {
        let template = Template::parse(&config.topic_template)?;
        let mut records = HashMap::new();
        for (id, entry) in &config.devices {
            let what = format!("ownership.devices.{id}");
            if id.is_empty() || id.contains(['/', '+', '#', '\0']) {
                return Err(format!(
                    "{what}: a device id must be one non-empty topic level"
                ));
            }
            if entry.owner.is_empty() {
                return Err(format!("{what}: owner must not be empty"));
            }
            let mut delegations = Vec::new();
            for (i, d) in entry.delegations.iter().enumerate() {
                let what = format!("{what}.delegations[{i}]");
                let access = DelegatedAccess::parse(&d.access).ok_or_else(|| {
                    format!(
                        "{what}: access {:?} must be read, read_write, READ_ACCESS or READ_WRITE",
                        d.access
                    )
                })?;
                let grantee = match (&d.user, &d.group) {
                    (Some(u), None) if !u.is_empty() => Grantee::User(u.clone()),
                    (None, Some(g)) if !g.is_empty() => Grantee::Group(g.clone()),
                    _ => return Err(format!("{what}: give exactly one non-empty user or group")),
                };
                delegations.push(Delegation { grantee, access });
            }
            records.insert(
                id.clone(),
                Record {
                    owner: entry.owner.clone(),
                    delegations,
                    public: entry.public,
                },
            );
        }
        if config.admin_roles.iter().any(String::is_empty) {
            return Err("ownership.admin_roles must not contain an empty role".into());
        }
        Ok(Ownership {
            template,
            records,
            admin_roles: config.admin_roles.clone(),
        })
    }

    fn check(&self, identity: Option<&Identity>, filter: &str, access: TopicAccess) -> Decision {
        let parsed = match TopicFilter::parse(filter, access == TopicAccess::Read) {
            Ok(parsed) => parsed,
            Err(e) => return Decision::Deny(DenyReason::BadRequest(e)),
        };
        let Some(device) = self.template.device_of(&parsed) else {
            return Decision::Allow("ownership:not-a-device-topic".into());
        };
        if let Some(role) = identity.and_then(|i| {
            self.admin_roles
                .iter()
                .find(|r| i.has_role(r))
                .map(String::as_str)
        }) {
            return Decision::Allow(format!("ownership:admin role {role}"));
        }
        let template = &self.template.text;
        let Some(device) = device else {
            return forbidden(format!("{filter:?} spans several devices of {template:?}"));
        };
        if let Some(id) = identity.filter(|i| {
            matches!(
                i.kind,
                IdentityKind::DeviceKey | IdentityKind::ClientCertificate
            )
        }) {
            return if id.subject == device {
                Decision::Allow("ownership:own device".into())
            } else {
                forbidden(format!(
                    "device {:?} may only use its own topics, not those of {device:?}",
                    id.subject
                ))
            };
        }
        let Some(record) = self.records.get(&device) else {
            return forbidden(format!("device {device:?} has no ownership record"));
        };
        let why = match access {
            TopicAccess::Read => record.read_by(identity),
            TopicAccess::Write => record.write_by(identity),
        };
        match why {
            Some(why) => Decision::Allow(format!("ownership:{why} of {device}")),
            None => forbidden(format!(
                "not the owner of device {device:?} nor delegated to {}",
                match access {
                    TopicAccess::Read => "read",
                    TopicAccess::Write => "write",
                }
            )),
        }
    }
}

fn forbidden(message: String) -> Decision {
    Decision::Deny(DenyReason::Forbidden(message))
}

/// The validated configuration, shared by every connection of a VM.
#[derive(Debug, Clone)]
pub struct MqttAcl {
    mode: Mode,
    log_allows: crate::decision_line::LogAllows,
    jwt: Option<JwtVerifier>,
    device_keys: Option<DeviceKeys>,
    mtls: Option<MtlsConfig>,
    allow_anonymous: bool,
    /// The local rules; None when only the HTTP backend's `acl` decides topics.
    acl: Option<Acl>,
    ownership: Option<Ownership>,
    backend: Option<HttpBackend>,
    opaque: Option<OpaqueTokens>,
    on_forbidden_publish: OnForbiddenPublish,
    limits: Limits,
    refusal_cluster: Option<String>,
    client_ids: Vec<ClientIdPattern>,
    connect_timeout_secs: u64,
    transport: Transport,
    max_waiting_connections: usize,
}

impl MqttAclConfig {
    /// Reads the environment variables the configuration names (`client_secret_env` of
    /// `introspection.credentials`) from `env`, the VM's environment; call it once at configure
    /// time, before [`MqttAcl::new`] (which refuses one unset).
    pub fn read_environment(&mut self, env: &dyn Fn(&str) -> Option<String>) {
        if let Some(introspection) = &mut self.introspection {
            introspection.read_environment(env);
        }
    }
}

impl MqttAcl {
    /// The JWT providers, for installing fetched remote keys.
    pub fn jwt_mut(&mut self) -> Option<&mut JwtVerifier> {
        self.jwt.as_mut()
    }

    pub fn jwt(&self) -> Option<&JwtVerifier> {
        self.jwt.as_ref()
    }

    /// Parses and validates the plugin configuration; the error says what is wrong.
    pub fn from_json(bytes: &[u8]) -> Result<MqttAcl, String> {
        let config: MqttAclConfig = crate::config_error::parse(bytes).map_err(|e| e.to_string())?;
        MqttAcl::new(config)
    }

    pub fn new(config: MqttAclConfig) -> Result<MqttAcl, String> {
        let jwt = if config.jwt_providers.is_empty() {
            None
        } else {
            Some(
                JwtVerifier::new(&config.jwt_providers)
                    .map_err(|e| format!("jwt_providers: {e}"))?,
            )
        };
        // Before the registry's own checks (which would ask for its secret).
        if config
            .device_keys
            .as_ref()
            .and_then(|k| k.registry.as_ref())
            .is_some_and(|r| r.auth.is_some())
        {
            return Err(
                "device_keys.registry.auth: not supported by mqtt-acl (its callouts are \
                        not authenticated by the filter); put the sidecar's client certificate \
                        on the registry's cluster instead (mTLS)"
                    .into(),
            );
        }
        let device_keys = config
            .device_keys
            .as_ref()
            .map(DeviceKeys::new)
            .transpose()
            .map_err(|e| e.detail())?;
        if let Some(ttl) = config
            .device_keys
            .as_ref()
            .and_then(|k| k.registry.as_ref())
            .map(|r| r.cache.positive_ttl_s)
            .filter(|ttl| *ttl < MIN_REGISTRY_POSITIVE_TTL_S)
        {
            return Err(format!(
                "device_keys.registry.cache.positive_ttl_s: {ttl} is too short for mqtt-acl, \
                 give at least {MIN_REGISTRY_POSITIVE_TTL_S} (an open connection asks the \
                 registry again before the answer it runs on expires, and is closed if no \
                 fresh answer confirms its key by then)"
            ));
        }
        if let Some(mtls) = &config.mtls {
            if mtls.strip_prefix.as_deref() == Some("") {
                return Err("mtls.strip_prefix must not be empty (leave it out)".into());
            }
        }
        let backend = config
            .http_backend
            .as_ref()
            .map(HttpBackend::new)
            .transpose()?;
        let opaque = config
            .introspection
            .clone()
            .map(OpaqueTokens::new)
            .transpose()?;
        let backend_users = backend.as_ref().is_some_and(HttpBackend::checks_users);
        let backend_topics = backend.as_ref().is_some_and(HttpBackend::checks_topics);
        if backend_users
            && device_keys
                .as_ref()
                .and_then(DeviceKeys::registry)
                .is_some()
        {
            return Err(
                "device_keys.registry cannot be combined with http_backend.user: every user \
                 name with a password would be a device id for the registry and never reach \
                 the backend"
                    .into(),
            );
        }
        if jwt.is_none()
            && device_keys.is_none()
            && config.mtls.is_none()
            && opaque.is_none()
            && !config.allow_anonymous
            && !backend_users
        {
            return Err(
                "configure at least one of jwt_providers, device_keys, mtls, introspection, \
                 http_backend.user (or allow_anonymous): otherwise every CONNECT is refused"
                    .into(),
            );
        }
        let acl_config = match (&config.acl, &config.acl_file) {
            (Some(_), Some(_)) => {
                return Err("give either acl or acl_file, not both".into());
            }
            (None, None) if backend_topics => None,
            (None, None) => {
                return Err(
                    "give acl ({\"rules\": [...]}) or acl_file (the text of a Mosquitto \
                     acl_file), or http_backend.acl; without rules every topic is denied"
                        .into(),
                )
            }
            (Some(acl), None) => {
                for (i, rule) in acl.rules.iter().enumerate() {
                    if rule.ngsi.is_some() || rule.mqtt.is_none() {
                        return Err(format!(
                            "acl rule #{} {:?}: mqtt-acl takes only mqtt rules \
                             ({{\"mqtt\": {{\"topic\": ...}}}}); NGSI rules belong to entity-acl",
                            i + 1,
                            rule.name
                        ));
                    }
                }
                Some(acl.clone())
            }
            (None, Some(text)) => Some(import_acl_file(text).map_err(|e| e.to_string())?),
        };
        let acl = acl_config
            .as_ref()
            .map(Acl::from_config)
            .transpose()
            .map_err(|e| e.to_string())?;
        let ownership = config.ownership.as_ref().map(Ownership::new).transpose()?;
        let client_ids = config
            .client_ids
            .iter()
            .map(|p| ClientIdPattern::parse(p))
            .collect::<Result<Vec<_>, _>>()?;
        if !(1..=3600).contains(&config.connect_timeout_secs) {
            return Err(format!(
                "connect_timeout_secs {} must be between 1 and 3600",
                config.connect_timeout_secs
            ));
        }
        let refusal_cluster = config.refusal_cluster.clone();
        if refusal_cluster
            .as_deref()
            .is_some_and(|c| c.is_empty() || !c.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(format!(
                "refusal_cluster {:?} must be an Envoy cluster name (or null)",
                refusal_cluster.as_deref().unwrap_or_default()
            ));
        }
        if config.max_packet_bytes < 64 || config.max_packet_bytes > 16 * 1024 * 1024 {
            return Err(format!(
                "max_packet_bytes {} must be between 64 and 16777216",
                config.max_packet_bytes
            ));
        }
        if !(1..=MAX_MAX_WAITING_CONNECTIONS).contains(&config.max_waiting_connections) {
            return Err(format!(
                "max_waiting_connections {} must be between 1 and {MAX_MAX_WAITING_CONNECTIONS}",
                config.max_waiting_connections
            ));
        }
        transport::check(&config)?;
        Ok(MqttAcl {
            mode: config.mode,
            log_allows: config.log_allows,
            jwt,
            device_keys,
            mtls: config.mtls,
            allow_anonymous: config.allow_anonymous,
            acl,
            ownership,
            backend,
            opaque,
            on_forbidden_publish: config.on_forbidden_publish,
            limits: Limits {
                max_packet_bytes: config.max_packet_bytes,
                max_topic_aliases: config.max_topic_aliases,
            },
            refusal_cluster,
            client_ids,
            connect_timeout_secs: config.connect_timeout_secs,
            transport: config.transport,
            max_waiting_connections: config.max_waiting_connections,
        })
    }

    /// The bounds on shared callouts: `max_waiting_connections` and each endpoint's
    /// `max_in_flight`.
    pub fn ask_limits(&self) -> AskLimits {
        AskLimits {
            max_waiting_connections: self.max_waiting_connections,
            backend_in_flight: self.backend.as_ref().map_or(0, HttpBackend::max_in_flight),
            introspection_in_flight: self.opaque.as_ref().map_or(0, |o| o.config().max_in_flight),
            registry_in_flight: self
                .device_keys
                .as_ref()
                .and_then(DeviceKeys::registry)
                .map_or(0, |r| r.config().max_in_flight),
        }
    }

    /// At which level allowed packets are logged.
    pub fn log_allows(&self) -> crate::decision_line::LogAllows {
        self.log_allows
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The HTTP backend, if configured.
    pub fn backend(&self) -> Option<&HttpBackend> {
        self.backend.as_ref()
    }

    /// The introspection of opaque tokens, if configured.
    pub fn opaque_tokens(&self) -> Option<&OpaqueTokens> {
        self.opaque.as_ref()
    }

    /// The local rules: ACL and ownership; both must allow (deny wins). Without local ACL
    /// rules (only `http_backend.acl`) the ACL part allows and the backend decides.
    pub fn check_topic(
        &self,
        identity: Option<&Identity>,
        client_id: &str,
        filter: &str,
        access: TopicAccess,
    ) -> Decision {
        let by_acl = match &self.acl {
            Some(acl) => acl.check_topic(identity, client_id, filter, access),
            None => match TopicFilter::parse(filter, access == TopicAccess::Read) {
                Ok(_) => Decision::Allow("no local acl".into()),
                Err(e) => Decision::Deny(DenyReason::BadRequest(e)),
            },
        };
        let Decision::Allow(acl_by) = by_acl else {
            return by_acl;
        };
        match &self.ownership {
            None => Decision::Allow(acl_by),
            Some(ownership) => match ownership.check(identity, filter, access) {
                Decision::Allow(own_by) => Decision::Allow(format!("{acl_by} {own_by}")),
                deny => deny,
            },
        }
    }
}

// ------------------------------------------------------------------------------------------
// Per-connection session
// ------------------------------------------------------------------------------------------

/// What the session needs from the outside world for one call.
pub struct Env<'a> {
    pub policy: &'a MqttAcl,
    /// Seconds since the epoch.
    pub now: u64,
}

/// Why a connection is closed; [`CloseReason::metric`] names its counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// Malformed packet, protocol error, too large, bad topic alias.
    Malformed(String),
    /// A forbidden PUBLISH (`on_forbidden_publish: close`, or QoS 2), or a forbidden delivery.
    Forbidden(String),
    /// The token the client authenticated with expired.
    Expired,
    /// The device registry no longer lists the key the client authenticated with.
    Revoked,
    /// The registry answer the connection ran on expired and no fresh one confirmed the key.
    Unconfirmed,
    /// The refusing CONNACK was written.
    Refused,
}

impl CloseReason {
    /// The counter (after `mqtt_acl.`).
    pub fn metric(&self) -> &'static str {
        match self {
            CloseReason::Malformed(_) => "closed.malformed",
            CloseReason::Forbidden(_) => "closed.forbidden",
            CloseReason::Expired => "closed.expired",
            CloseReason::Revoked => "closed.revoked",
            CloseReason::Unconfirmed => "closed.unconfirmed",
            CloseReason::Refused => "closed.refused",
        }
    }
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::Malformed(why) => write!(f, "closing: {why}"),
            CloseReason::Forbidden(why) => write!(f, "closing: {why}"),
            CloseReason::Expired => write!(f, "closing: the client's token expired"),
            CloseReason::Revoked => write!(
                f,
                "closing: the device registry no longer lists the client's key"
            ),
            CloseReason::Unconfirmed => write!(
                f,
                "closing: the device registry did not confirm the client's key in time"
            ),
            CloseReason::Refused => write!(f, "closing after the refusing CONNACK"),
        }
    }
}

/// One decision, for the decision log and the counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decided {
    /// The decision line (`filter=mqtt-acl decision=... operation="mqtt PUBLISH a/b" ...`).
    pub line: DecisionLine,
    pub decision: Decision,
    /// Counters to increment (after `mqtt_acl.`), e.g. `publish.denied`, `shadow.denied`.
    pub counters: Vec<&'static str>,
}

impl Decided {
    pub fn is_allowed(&self) -> bool {
        self.decision.is_allowed()
    }
}

/// What to do after bytes of one direction were read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    /// The bytes to pass on in the same direction, in place of those that arrived.
    pub forward: Vec<u8>,
    pub decisions: Vec<Decided>,
    /// Close the connection now; `forward` is not to be written.
    pub close: Option<CloseReason>,
    /// Close as soon as `forward` is written (Envoy loses data written by a callback that also
    /// closes): on the next callback or tick.
    pub close_after_write: bool,
    /// A token's issuer whose remote keys lack its `kid` (or are not fetched yet): the filter
    /// fetches them (rate-limited); the CONNECT was refused as "server unavailable".
    pub keys_wanted: Option<String>,
    /// The CONNECT was refused: send this connection (and the harmless CONNECT in `forward`) to
    /// this Envoy cluster, a stand-in that answers in the broker's place (`refusal_cluster`).
    pub refusal_cluster: Option<String>,
    /// Requests for the HTTP backend: the filter sends each and hands its answer to
    /// [`Session::on_backend_answer`]. Until every one is answered the session reads no
    /// further client packet (the filter holds the client's data back).
    pub asks: Vec<Ask>,
}

/// A callout, numbered within its session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ask {
    pub id: u32,
    pub request: AskRequest,
}

/// What a callout asks.
#[derive(Clone, PartialEq, Eq)]
pub enum AskRequest {
    /// The HTTP auth/ACL backend (`http_backend`).
    Backend(BackendRequest),
    /// The introspection endpoint, about the CONNECT's opaque token.
    Introspect { token: String, call: HttpCall },
    /// The device registry, about the CONNECT's device (`device_keys.registry`).
    DeviceLookup { device_id: String, call: HttpCall },
}

impl AskRequest {
    /// What identifies the question (one ask per key at a time).
    fn key(&self) -> &str {
        match self {
            AskRequest::Backend(request) => request.key(),
            AskRequest::Introspect { token, .. } => token,
            AskRequest::DeviceLookup { device_id, .. } => device_id,
        }
    }
}

impl std::fmt::Debug for AskRequest {
    /// Never prints a token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AskRequest::Backend(request) => f.debug_tuple("Backend").field(request).finish(),
            AskRequest::Introspect { call, .. } => f.debug_tuple("Introspect").field(call).finish(),
            AskRequest::DeviceLookup { call, .. } => {
                f.debug_tuple("DeviceLookup").field(call).finish()
            }
        }
    }
}

impl From<BackendRequest> for AskRequest {
    fn from(request: BackendRequest) -> AskRequest {
        AskRequest::Backend(request)
    }
}

/// What became of one client packet.
enum Step {
    Done,
    Close(CloseReason),
    /// It needs the answers to these requests first.
    Ask(Vec<AskRequest>),
}

/// What authentication established.
struct Authenticated {
    identity: Option<Identity>,
    /// The password the backend's `user` check gets: the client's when the backend is the one
    /// to verify it, empty for an identity verified here (its credential goes nowhere).
    backend_password: String,
}

/// Subscription filters the backend allowed that a connection remembers (deliveries they
/// cover are not asked again); older ones are forgotten first.
const MAX_GRANTS: usize = 256;

impl Output {
    fn closing(mut self, reason: CloseReason) -> Output {
        self.forward.clear();
        self.close = Some(reason);
        self
    }
}

/// A PINGREQ sent to the broker, and what its PINGRESP becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ping {
    /// The client's own.
    Client,
    /// In place of a forbidden QoS 1 PUBLISH: answer PUBACK.
    PubAck(u16),
    /// In place of a SUBSCRIBE whose filters were all refused: answer SUBACK.
    SubAck { packet_id: u16, filters: usize },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Nothing decided yet.
    AwaitConnect,
    /// CONNECT allowed and forwarded.
    Open,
    /// A harmless CONNECT went to the broker; its CONNACK becomes this one.
    Refused { connack: Vec<u8> },
    /// Bytes handed over last are to be written before the close (the refusing CONNACK, or
    /// the allowed packets read before a bad one): close on the next callback or tick.
    Closing(CloseReason),
    /// Closed by the session.
    Closed,
}

/// Why a CONNECT is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    BadCredentials,
    NotAuthorized,
    Unavailable,
    /// Over a bound on callouts (`max_waiting_connections`, `max_in_flight`).
    Busy,
    BadAuthMethod,
    BadClientId,
}

fn refusal_code(refusal: Refusal, version: ProtocolVersion) -> u8 {
    match (version, refusal) {
        (ProtocolVersion::V311, Refusal::BadCredentials) => v3_connack::BAD_USERNAME_OR_PASSWORD,
        (ProtocolVersion::V311, Refusal::NotAuthorized | Refusal::BadAuthMethod) => {
            v3_connack::NOT_AUTHORIZED
        }
        (ProtocolVersion::V311, Refusal::Unavailable | Refusal::Busy) => {
            v3_connack::SERVER_UNAVAILABLE
        }
        (ProtocolVersion::V5, Refusal::BadCredentials) => reason::BAD_USER_NAME_OR_PASSWORD,
        (ProtocolVersion::V5, Refusal::NotAuthorized) => reason::NOT_AUTHORIZED,
        (ProtocolVersion::V5, Refusal::Unavailable) => reason::SERVER_UNAVAILABLE,
        (ProtocolVersion::V5, Refusal::Busy) => reason::SERVER_BUSY,
        (ProtocolVersion::V5, Refusal::BadAuthMethod) => reason::BAD_AUTHENTICATION_METHOD,
        (ProtocolVersion::V311, Refusal::BadClientId) => v3_connack::IDENTIFIER_REJECTED,
        (ProtocolVersion::V5, Refusal::BadClientId) => reason::CLIENT_IDENTIFIER_NOT_VALID,
    }
}

/// The issuer of `token` (unverified), if its provider fetches remote keys.
fn remote_issuer(jwt: &JwtVerifier, token: &str) -> Option<String> {
    let issuer = crate::jwt::peek_issuer(token).ok()?;
    jwt.provider(&issuer)?.remote()?;
    Some(issuer)
}

fn looks_like_jwt(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() == 3 && parts.iter().all(|p| !p.is_empty())
}

/// One MQTT connection through the filter.
#[derive(Debug)]
pub struct Session {
    client: Decoder,
    broker: Option<Decoder>,
    phase: Phase,
    version: Option<ProtocolVersion>,
    identity: Option<Identity>,
    client_id: String,
    peer: Option<PeerCertificate>,
    connection_id: u64,
    /// When the connection opened (seconds), for `connect_timeout_secs`.
    opened_at: Option<u64>,
    pings: VecDeque<Ping>,
    /// SUBSCRIBE packet id → which of its filters were refused, until the SUBACK.
    partial_subacks: HashMap<u16, Vec<bool>>,
    /// The backend's `superuser` check allowed: its `acl` is not asked.
    superuser: bool,
    /// Subscription filters the backend allowed in this connection.
    granted: VecDeque<TopicFilter>,
    /// Asks sent and not answered yet.
    waiting: HashMap<u32, AskRequest>,
    /// The introspection's verdict on the CONNECT's opaque token, once answered.
    introspected: Option<Result<Identity, DenyReason>>,
    /// What the device registry said about the CONNECT's device, once answered.
    looked_up: Option<LookupResult>,
    /// The registry answer a connection admitted on a registry key runs on (re-checked
    /// before it expires: [`recheck`]).
    registry: Option<recheck::Standing>,
    /// The answers for the packet being decided, by request key.
    answers: HashMap<String, BackendVerdict>,
    /// The packet waiting for the backend; nothing after it is read until it is decided.
    stalled: Option<Frame>,
    next_ask: u32,
    /// An ask of the packet being decided was shed (over a bound), and why: a CONNECT it
    /// leaves unavailable is refused as "server busy".
    busy: Option<String>,
}

impl Session {
    /// `peer`: the verified client certificate, if any; `connection_id` names the harmless
    /// CONNECT of a refused client.
    pub fn new(policy: &MqttAcl, peer: Option<PeerCertificate>, connection_id: u64) -> Session {
        Session {
            client: Decoder::client_to_broker(policy.limits),
            broker: None,
            phase: Phase::AwaitConnect,
            version: None,
            identity: None,
            client_id: String::new(),
            peer,
            connection_id,
            opened_at: None,
            pings: VecDeque::new(),
            partial_subacks: HashMap::new(),
            superuser: false,
            granted: VecDeque::new(),
            waiting: HashMap::new(),
            introspected: None,
            looked_up: None,
            registry: None,
            answers: HashMap::new(),
            stalled: None,
            next_ask: 0,
            busy: None,
        }
    }

    /// Asks are out: the client's data is to be held back until they are answered.
    pub fn waiting_for_backend(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// The backend's answer to ask `id`: the packet that waited for it is decided (and those
    /// read after it), as if it had just arrived.
    pub fn on_backend_answer(&mut self, id: u32, answer: &BackendAnswer, env: &Env<'_>) -> Output {
        let out = Output::default();
        match self.waiting.remove(&id) {
            None => return out,
            Some(AskRequest::Backend(request)) => {
                let verdict = match env.policy.backend() {
                    Some(backend) => backend.remember(&request, answer, env.now),
                    None => BackendVerdict::Unavailable,
                };
                self.answers.insert(request.key().to_string(), verdict);
            }
            Some(AskRequest::Introspect { token, .. }) => {
                self.introspected = Some(match env.policy.opaque_tokens() {
                    Some(opaque) => opaque.remember(&token, answer, env.now).outcome,
                    None => Err(DenyReason::Unavailable(
                        "introspection is not configured".into(),
                    )),
                });
            }
            Some(AskRequest::DeviceLookup { device_id, .. }) => {
                self.looked_up = Some(match &env.policy.device_keys {
                    Some(keys) => {
                        let decided = keys.finish_lookup(
                            &device_id,
                            answer.status.unwrap_or(0),
                            &answer.body,
                            env.now,
                        );
                        decided.result
                    }
                    None => Err(DenyReason::Unavailable(
                        "no device registry is configured".into(),
                    )),
                });
            }
        }
        if !self.waiting.is_empty() || !matches!(self.phase, Phase::AwaitConnect | Phase::Open) {
            return out;
        }
        self.drain_client(env, out)
    }

    /// Ask `id` could not be asked (over a bound on callouts): decided as no answer, and a
    /// CONNECT that leaves unavailable is refused as "server busy".
    pub fn on_ask_shed(&mut self, id: u32, why: &str, env: &Env<'_>) -> Output {
        if self.waiting.contains_key(&id) {
            self.busy = Some(why.to_string());
        }
        self.on_backend_answer(id, &BackendAnswer::none(), env)
    }

    /// Sends the requests not asked yet and keeps `frame` until they are answered.
    fn stall(&mut self, frame: Frame, missing: Vec<AskRequest>, out: &mut Output) {
        for request in missing {
            if self.waiting.values().any(|r| r.key() == request.key()) {
                continue;
            }
            self.next_ask = self.next_ask.wrapping_add(1);
            let id = self.next_ask;
            self.waiting.insert(id, request.clone());
            out.asks.push(Ask { id, request });
        }
        self.stalled = Some(frame);
    }

    /// The answer to `request`: given for the packet being decided, or cached. None: it is to
    /// be asked (pushed on `missing`).
    fn backend_verdict(
        &self,
        env: &Env<'_>,
        request: BackendRequest,
        missing: &mut Vec<AskRequest>,
    ) -> Option<BackendVerdict> {
        if let Some(verdict) = self.answers.get(request.key()) {
            return Some(*verdict);
        }
        if let Some(verdict) = env
            .policy
            .backend()
            .and_then(|b| b.cached(&request, env.now))
        {
            return Some(verdict);
        }
        missing.push(request.into());
        None
    }

    /// The local rules, then, if they allow, the backend's `acl` check (`acc`): both must
    /// allow. A local deny is final (the backend is not asked); a superuser skips the backend.
    fn topic_decision(
        &self,
        env: &Env<'_>,
        identity: Option<&Identity>,
        topic: &str,
        access: TopicAccess,
        acc: u8,
        missing: &mut Vec<AskRequest>,
    ) -> Decision {
        let policy = env.policy;
        let local = policy.check_topic(identity, &self.client_id, topic, access);
        let Decision::Allow(by) = local else {
            return local;
        };
        let Some(backend) = policy.backend().filter(|b| b.checks_topics()) else {
            return Decision::Allow(by);
        };
        if self.superuser {
            return Decision::Allow(format!("{by} backend:superuser"));
        }
        let username = identity.map_or("", |i| i.subject.as_str());
        let Some(request) = backend.acl_request(username, &self.client_id, topic, acc) else {
            return Decision::Allow(by);
        };
        match self.backend_verdict(env, request, missing) {
            Some(BackendVerdict::Allow) => Decision::Allow(format!("{by} backend:acl")),
            Some(BackendVerdict::Deny) => forbidden(format!(
                "the auth backend denied {} (acc {acc})",
                bounded_debug(topic)
            )),
            Some(BackendVerdict::Unavailable) => Decision::Deny(DenyReason::Unavailable(format!(
                "the auth backend gave no answer for {} (acc {acc})",
                bounded_debug(topic)
            ))),
            None => Decision::Deny(DenyReason::Unavailable(
                "waiting for the auth backend".into(),
            )),
        }
    }

    /// A message the broker delivers: the local rules, then the backend. The broker's stream
    /// cannot wait for an answer, so the backend's part is what it already said: a
    /// subscription it allowed in this connection covers the topic, or a cached read (acc 1)
    /// allow; otherwise the delivery is refused.
    fn delivery_decision(&self, env: &Env<'_>, topic: &str) -> Decision {
        let policy = env.policy;
        let identity = self.identity.as_ref();
        let local = policy.check_topic(identity, &self.client_id, topic, TopicAccess::Read);
        let Decision::Allow(by) = local else {
            return local;
        };
        let Some(backend) = policy.backend().filter(|b| b.checks_topics()) else {
            return Decision::Allow(by);
        };
        if self.superuser {
            return Decision::Allow(format!("{by} backend:superuser"));
        }
        if self.granted.iter().any(|f| f.matches_topic(topic)) {
            return Decision::Allow(format!("{by} backend:subscription"));
        }
        let username = identity.map_or("", |i| i.subject.as_str());
        let cached = backend
            .acl_request(username, &self.client_id, topic, ACC_READ)
            .and_then(|r| backend.cached(&r, env.now));
        if cached == Some(BackendVerdict::Allow) {
            return Decision::Allow(format!("{by} backend:acl"));
        }
        forbidden(format!(
            "no subscription the auth backend allowed in this connection covers {}",
            bounded_debug(topic)
        ))
    }

    /// When the connection opened: a client that has not completed its CONNECT
    /// `connect_timeout_secs` later is closed ([`Session::check_connect_timeout`]).
    pub fn set_opened_at(&mut self, now: u64) {
        self.opened_at = Some(now);
    }

    /// No complete CONNECT within `connect_timeout_secs`: the connection is to be closed (a
    /// silent or slow client holds no broker connection, but it holds Envoy's).
    pub fn check_connect_timeout(&mut self, env: &Env<'_>) -> Option<CloseReason> {
        let opened_at = self.opened_at?;
        if self.phase != Phase::AwaitConnect
            || env.now < opened_at.saturating_add(env.policy.connect_timeout_secs)
        {
            return None;
        }
        self.phase = Phase::Closed;
        Some(CloseReason::Malformed(format!(
            "no CONNECT within {} s",
            env.policy.connect_timeout_secs
        )))
    }

    /// The verified client certificate, when it is known only after the connection opened
    /// (Envoy completes the TLS handshake after its new-connection callback).
    pub fn set_peer(&mut self, peer: Option<PeerCertificate>) {
        self.peer = peer;
    }

    pub fn identity(&self) -> Option<&Identity> {
        self.identity.as_ref()
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// When the identity stops being trusted (the token's `exp`).
    pub fn expires_at(&self) -> Option<u64> {
        self.identity.as_ref().and_then(|i| i.expires_at)
    }

    /// No CONNECT decided yet (nothing may go upstream).
    pub fn awaiting_connect(&self) -> bool {
        self.phase == Phase::AwaitConnect
    }

    /// Why the connection is to be closed now that its last bytes were handed over (the
    /// refusing CONNACK, or what was allowed before a bad packet).
    pub fn closing(&self) -> Option<&CloseReason> {
        match &self.phase {
            Phase::Closing(reason) => Some(reason),
            _ => None,
        }
    }

    /// Closes for `reason`. What this read already allowed still goes on first: the close
    /// then waits for the next callback or tick (Envoy drops bytes handed over by a callback
    /// that also closes).
    fn close_after_forward(&mut self, mut out: Output, reason: CloseReason) -> Output {
        if out.forward.is_empty() {
            self.phase = Phase::Closed;
            return out.closing(reason);
        }
        self.phase = Phase::Closing(reason);
        out.close_after_write = true;
        out
    }

    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    fn decided(
        &self,
        mode: Mode,
        operation: &str,
        what: &str,
        decision: Decision,
        kind: &'static str,
    ) -> Decided {
        let packet = match kind {
            "connect" => "CONNECT",
            "publish" => "PUBLISH",
            "subscribe" => "SUBSCRIBE",
            _ => "DELIVER",
        };
        let identity = self.identity.as_ref();
        let line = DecisionLine::new(FILTER, mode, &decision)
            .subject(identity.map(|i| i.subject.as_str()))
            .request(
                Some(packet),
                None,
                identity.and_then(|i| i.tenant.as_deref()),
                None,
            )
            .text("operation", operation)
            .literal("entities", what)
            .text("client_id", &self.client_id);
        let mut counters = Vec::new();
        match (&decision, kind) {
            (Decision::Allow(_), "connect") => counters.push("connect.allowed"),
            (Decision::Allow(_), "publish") => counters.push("publish.allowed"),
            (Decision::Allow(_), "subscribe") => counters.push("subscribe.allowed"),
            (Decision::Allow(_), _) => {}
            (Decision::Deny(_), "connect") => counters.push("connect.refused"),
            (Decision::Deny(_), "publish") => counters.push("publish.denied"),
            (Decision::Deny(_), "subscribe") => counters.push("subscribe.denied"),
            (Decision::Deny(_), _) => counters.push("deliver.denied"),
        }
        if !decision.is_allowed() && mode == Mode::Shadow {
            counters.push("shadow.denied");
        }
        Decided {
            line,
            decision,
            counters,
        }
    }

    /// The token expired: in enforce mode the connection is to be closed (returned with the
    /// close reason and a decision line); in shadow mode only logged (once).
    pub fn check_expiry(&mut self, env: &Env<'_>) -> Option<Output> {
        let identity = self.identity.as_ref()?;
        if !identity.is_expired(env.now) || self.phase == Phase::Closed {
            return None;
        }
        let mode = env.policy.mode;
        let decision = Decision::Deny(DenyReason::Unauthenticated(
            "the token the connection authenticated with expired".into(),
        ));
        let mut decided = self.decided(mode, "mqtt session", "[]", decision, "connect");
        // Counted by the close reason (`closed.expired`), or as a shadow denial.
        decided.counters = Vec::new();
        if mode == Mode::Shadow {
            decided.counters = vec!["shadow.denied"];
            // Logged once: the identity no longer expires.
            if let Some(identity) = self.identity.as_mut() {
                identity.expires_at = None;
            }
            return Some(Output {
                decisions: vec![decided],
                ..Output::default()
            });
        }
        self.phase = Phase::Closed;
        Some(Output {
            decisions: vec![decided],
            close: Some(CloseReason::Expired),
            ..Output::default()
        })
    }

    /// Reads bytes from the client.
    pub fn on_client_bytes(&mut self, bytes: &[u8], env: &Env<'_>) -> Output {
        let mut out = Output::default();
        match &self.phase {
            Phase::Closed => {
                return out.closing(CloseReason::Malformed("connection closed".into()))
            }
            Phase::Closing(reason) => {
                let reason = reason.clone();
                self.phase = Phase::Closed;
                return out.closing(reason);
            }
            // The client's CONNECT was refused: whatever follows is dropped.
            Phase::Refused { .. } => return out,
            Phase::AwaitConnect | Phase::Open => {}
        }
        for check in [Session::check_expiry, Session::check_registry_deadline] {
            if let Some(ended) = check(self, env) {
                if ended.close.is_some() {
                    return ended;
                }
                out.decisions.extend(ended.decisions);
            }
        }
        self.client.feed(bytes);
        let held_limit = env.policy.limits.max_packet_bytes.saturating_mul(2);
        if self.waiting_for_backend() && self.client.buffered_len() > held_limit {
            self.phase = Phase::Closed;
            return out.closing(CloseReason::Malformed(format!(
                "more than {held_limit} bytes arrived while the auth backend was asked"
            )));
        }
        self.drain_client(env, out)
    }

    /// Decides the client's packets in order until the data runs out or one waits for the
    /// backend.
    fn drain_client(&mut self, env: &Env<'_>, mut out: Output) -> Output {
        loop {
            if self.waiting_for_backend() {
                return out;
            }
            let frame = match self.stalled.take() {
                Some(frame) => frame,
                None => match self.client.next_frame() {
                    Ok(Some(frame)) => frame,
                    Ok(None) => return out,
                    Err(error) => {
                        if self.phase == Phase::AwaitConnect {
                            if let ErrorKind::UnsupportedVersion { .. } = error.kind {
                                self.refuse_version(&mut out, env, &error.to_string());
                                return out;
                            }
                        }
                        let reason = CloseReason::Malformed(format!("client sent {error}"));
                        return self.close_after_forward(out, reason);
                    }
                },
            };
            match self.phase {
                Phase::AwaitConnect => {
                    let Packet::Connect(connect) = &frame.packet else {
                        self.phase = Phase::Closed;
                        return out
                            .closing(CloseReason::Malformed("first packet is not CONNECT".into()));
                    };
                    let connect = connect.clone();
                    if let Some(missing) = self.on_connect(&connect, env, &mut out) {
                        self.stall(frame, missing, &mut out);
                        return out;
                    }
                    self.answers.clear();
                    self.introspected = None;
                    self.busy = None;
                    if !matches!(self.phase, Phase::Open) {
                        // Refused: nothing more of what the client sent goes anywhere.
                        return out;
                    }
                }
                Phase::Open => match self.on_client_packet(&frame, env, &mut out) {
                    Step::Done => {
                        self.answers.clear();
                        self.busy = None;
                    }
                    Step::Close(close) => return self.close_after_forward(out, close),
                    Step::Ask(missing) => {
                        self.stall(frame, missing, &mut out);
                        return out;
                    }
                },
                _ => return out,
            }
        }
    }

    fn broker_decoder(&mut self, env: &Env<'_>, version: ProtocolVersion, aliases: u16) {
        let mut decoder = Decoder::broker_to_client(Limits {
            max_packet_bytes: env.policy.limits.max_packet_bytes,
            max_topic_aliases: aliases,
        });
        decoder.set_version(version);
        self.broker = Some(decoder);
    }

    /// MQTT 3.1 or an unknown level: CONNACK 0x01 in 3.1.1's form.
    fn refuse_version(&mut self, out: &mut Output, env: &Env<'_>, why: &str) {
        let decision = Decision::Deny(DenyReason::BadRequest(why.to_string()));
        out.decisions
            .push(self.decided(Mode::Enforce, "mqtt CONNECT", "[]", decision, "connect"));
        self.start_refusal(
            out,
            env,
            ProtocolVersion::V311,
            60,
            encode_connack(
                ProtocolVersion::V311,
                v3_connack::UNACCEPTABLE_PROTOCOL_VERSION,
            ),
        );
    }

    fn start_refusal(
        &mut self,
        out: &mut Output,
        env: &Env<'_>,
        version: ProtocolVersion,
        keep_alive: u16,
        connack: Vec<u8>,
    ) {
        let harmless = Connect {
            version,
            bridge: false,
            client_id: format!("mqtt-acl-refused-{}", self.connection_id),
            clean_start: true,
            keep_alive,
            username: None,
            password: None,
            will: None,
            properties: Properties::new(),
        };
        match encode(&Packet::Connect(harmless), version) {
            Ok(bytes) => {
                out.forward = bytes;
                out.refusal_cluster = env.policy.refusal_cluster.clone();
                self.version = Some(version);
                self.phase = Phase::Refused { connack };
            }
            Err(e) => {
                self.phase = Phase::Closed;
                out.forward.clear();
                out.close = Some(CloseReason::Malformed(format!(
                    "cannot build the CONNECT that stands in for a refused one: {e}"
                )));
            }
        }
    }

    /// Who the CONNECT's credentials say the client is. Local methods verify what they are
    /// configured for; a credential none of them takes goes to the backend's `user` check
    /// (an identity of kind `HttpBackend`, verified once the backend answers).
    fn authenticate(
        &self,
        connect: &Connect,
        env: &Env<'_>,
        missing: &mut Vec<AskRequest>,
    ) -> Result<Authenticated, (Refusal, String)> {
        let local = |identity: Option<Identity>| Authenticated {
            identity,
            backend_password: String::new(),
        };
        let backend_users = env.policy.backend().is_some_and(HttpBackend::checks_users);
        let by_backend = |username: &str, password: Option<&[u8]>| {
            let password = std::str::from_utf8(password.unwrap_or_default()).map_err(|_| {
                (
                    Refusal::BadCredentials,
                    "a password that is not UTF-8 (the auth backend takes text)".to_string(),
                )
            })?;
            Ok(Authenticated {
                identity: Some(Identity::new(IdentityKind::HttpBackend, username)),
                backend_password: password.to_string(),
            })
        };
        let password = connect.password.as_deref().filter(|p| !p.is_empty());
        let takes_device_key = |username: &str| {
            env.policy
                .device_keys
                .as_ref()
                .is_some_and(|keys| keys.takes(username))
        };
        if let Some(username) = connect.username.as_deref() {
            let local_jwt =
                password.is_none() && looks_like_jwt(username) && env.policy.jwt.is_some();
            let local_key = password.is_some() && takes_device_key(username);
            let local_cert = password.is_none() && env.policy.mtls.is_some() && self.peer.is_some();
            let taken_locally = local_jwt || local_key || local_cert;
            // An opaque token: any user name no other method takes (a JWT-shaped one only
            // without jwt_providers, as token-auth does); the password is ignored.
            let jwt_shaped = looks_like_jwt(username) && env.policy.jwt.is_some();
            if let Some(opaque) = env.policy.opaque_tokens() {
                if !taken_locally && !jwt_shaped {
                    return self.introspected(opaque, username, env, missing).map(local);
                }
            }
            if backend_users && !taken_locally {
                return by_backend(username, password);
            }
            if let (true, Some(keys), Some(password)) =
                (local_key, &env.policy.device_keys, password)
            {
                if connect.properties.authentication_method().is_none() {
                    return self
                        .device_key(keys, username, password, env, missing)
                        .map(local);
                }
            }
        }
        self.authenticate_locally(connect, env).map(local)
    }

    /// The identity a device key stands for: from the configured digests, or from what the
    /// registry said (answered for this CONNECT, or cached); else the lookup is to be asked
    /// (pushed on `missing`; the error is a placeholder).
    fn device_key(
        &self,
        keys: &DeviceKeys,
        device_id: &str,
        password: &[u8],
        env: &Env<'_>,
        missing: &mut Vec<AskRequest>,
    ) -> Result<Option<Identity>, (Refusal, String)> {
        let Ok(key) = std::str::from_utf8(password) else {
            return Err((Refusal::BadCredentials, "invalid device key".into()));
        };
        let checked = match &self.looked_up {
            Some(looked_up) => keys.check_record(looked_up, device_id, key),
            None => keys.check(device_id, key, env.now),
        };
        match checked {
            KeyCheck::Verified(identity) => Ok(Some(identity)),
            KeyCheck::Refused(reason) => {
                let refusal = match &reason {
                    DenyReason::Unavailable(_) => Refusal::Unavailable,
                    _ => Refusal::BadCredentials,
                };
                Err((refusal, format!("device key: {}", reason.description())))
            }
            KeyCheck::Lookup { device_id, call } => {
                missing.push(AskRequest::DeviceLookup { device_id, call });
                Err((
                    Refusal::Unavailable,
                    "waiting for the device registry".into(),
                ))
            }
        }
    }

    /// The identity an opaque token stands for: answered for this CONNECT, or cached; else the
    /// introspection is to be asked (pushed on `missing`; the error is a placeholder).
    fn introspected(
        &self,
        opaque: &OpaqueTokens,
        token: &str,
        env: &Env<'_>,
        missing: &mut Vec<AskRequest>,
    ) -> Result<Option<Identity>, (Refusal, String)> {
        let verdict = match self.introspected.clone() {
            Some(verdict) => verdict,
            None => match opaque.cached(token, env.now) {
                Some(verdict) => verdict,
                None => {
                    missing.push(AskRequest::Introspect {
                        token: token.to_string(),
                        call: opaque.call(token),
                    });
                    return Err((
                        Refusal::Unavailable,
                        "waiting for the introspection endpoint".into(),
                    ));
                }
            },
        };
        verdict.map(Some).map_err(|reason| {
            let refusal = match &reason {
                DenyReason::Unavailable(_) => Refusal::Unavailable,
                DenyReason::Forbidden(_) => Refusal::NotAuthorized,
                _ => Refusal::BadCredentials,
            };
            (refusal, format!("opaque token: {}", reason.description()))
        })
    }

    fn authenticate_locally(
        &self,
        connect: &Connect,
        env: &Env<'_>,
    ) -> Result<Option<Identity>, (Refusal, String)> {
        let policy = env.policy;
        if connect.properties.authentication_method().is_some() {
            return Err((
                Refusal::BadAuthMethod,
                "enhanced authentication (v5 authentication method) is not supported".into(),
            ));
        }
        let password = connect.password.as_deref().filter(|p| !p.is_empty());
        if let Some(username) = connect.username.as_deref() {
            if password.is_none() && looks_like_jwt(username) {
                let Some(jwt) = &policy.jwt else {
                    return Err((
                        Refusal::BadCredentials,
                        "a token as user name, but no jwt_providers are configured".into(),
                    ));
                };
                return match jwt.verify(username, env.now) {
                    // Remote keys that may have rotated, or not arrived yet: "server
                    // unavailable" (the client retries), and the filter fetches them.
                    Err(
                        e @ (TokenError::UnknownKid
                        | TokenError::KeysUnavailable
                        | TokenError::KeysStale),
                    ) if remote_issuer(jwt, username).is_some() => {
                        Err((Refusal::Unavailable, e.to_string()))
                    }
                    Ok(verified) => {
                        let mut identity = verified.identity;
                        if identity.expires_at.is_none() {
                            identity.expires_at = verified.expires_at;
                        }
                        Ok(Some(identity))
                    }
                    Err(TokenError::KeysUnavailable) => Err((
                        Refusal::Unavailable,
                        TokenError::KeysUnavailable.to_string(),
                    )),
                    Err(e) => Err((Refusal::BadCredentials, e.to_string())),
                };
            }
            if let Some(password) = password {
                let Some(keys) = &policy.device_keys else {
                    return Err((
                        Refusal::BadCredentials,
                        "a user name and password, but no device_keys are configured".into(),
                    ));
                };
                let Ok(key) = std::str::from_utf8(password) else {
                    return Err((Refusal::BadCredentials, "invalid device key".into()));
                };
                return keys
                    .verify(username, key)
                    .map(Some)
                    .ok_or((Refusal::BadCredentials, "invalid device key".into()));
            }
        } else if password.is_some() {
            return Err((
                Refusal::BadCredentials,
                "a password without user name".into(),
            ));
        }
        let from_cert = match (&policy.mtls, &self.peer) {
            (Some(mtls), Some(peer)) => mtls.identity(peer),
            _ => None,
        };
        if let Some(identity) = from_cert {
            return match connect.username.as_deref() {
                None => Ok(Some(identity)),
                Some(name) if name == identity.subject => Ok(Some(identity)),
                Some(_) => Err((
                    Refusal::BadCredentials,
                    "the user name is not the identity of the client certificate".into(),
                )),
            };
        }
        if connect.username.is_some() {
            return Err((
                Refusal::BadCredentials,
                "a user name that is neither a token nor a device with a key".into(),
            ));
        }
        if policy.allow_anonymous {
            return Ok(None);
        }
        Err((Refusal::NotAuthorized, "no credentials".into()))
    }

    /// The backend's `user` and `superuser` checks of an authenticated CONNECT: a refusal, if
    /// the backend refuses, and whether the identity is a superuser.
    fn backend_connect_checks(
        &self,
        auth: &Authenticated,
        client_id: &str,
        env: &Env<'_>,
        missing: &mut Vec<AskRequest>,
    ) -> (Option<(Refusal, String)>, bool) {
        let (Some(backend), Some(identity)) = (env.policy.backend(), auth.identity.as_ref()) else {
            return (None, false);
        };
        let subject = bounded_debug(&identity.subject);
        let mut refusal = None;
        if let Some(request) =
            backend.user_request(&identity.subject, &auth.backend_password, client_id)
        {
            refusal = match self.backend_verdict(env, request, missing) {
                Some(BackendVerdict::Allow) | None => None,
                // A credential only the backend could verify is a bad one; an identity
                // verified here that the backend refuses is not authorized.
                Some(BackendVerdict::Deny) if identity.kind == IdentityKind::HttpBackend => Some((
                    Refusal::BadCredentials,
                    format!("the auth backend refused user {subject}"),
                )),
                Some(BackendVerdict::Deny) => Some((
                    Refusal::NotAuthorized,
                    format!("the auth backend refused user {subject}"),
                )),
                Some(BackendVerdict::Unavailable) => Some((
                    Refusal::Unavailable,
                    format!("the auth backend gave no answer for user {subject}"),
                )),
            };
        }
        let superuser = backend
            .superuser_request(&identity.subject)
            .and_then(|request| self.backend_verdict(env, request, missing))
            == Some(BackendVerdict::Allow);
        (refusal, superuser)
    }

    /// Decides a CONNECT; Some(requests): the backend is to be asked first (nothing was
    /// decided or written).
    fn on_connect(
        &mut self,
        connect: &Connect,
        env: &Env<'_>,
        out: &mut Output,
    ) -> Option<Vec<AskRequest>> {
        let policy = env.policy;
        let version = connect.version;
        self.version = Some(version);
        self.client_id = connect.client_id.clone();
        let mut missing = Vec::new();
        let mut verdict = self.authenticate(connect, env, &mut missing);
        if !missing.is_empty() {
            return Some(missing);
        }
        if let (Err((Refusal::Unavailable, _)), Some(jwt), Some(username)) =
            (&verdict, &policy.jwt, connect.username.as_deref())
        {
            out.keys_wanted = remote_issuer(jwt, username);
        }
        if let Ok(auth) = &verdict {
            let subject = auth.identity.as_ref().map(|i| i.subject.as_str());
            // An empty client id is the broker's to assign: nobody's session.
            let bound = connect.client_id.is_empty()
                || policy
                    .client_ids
                    .iter()
                    .any(|p| p.matches(&connect.client_id, subject));
            if !bound {
                verdict = Err((
                    Refusal::BadClientId,
                    format!(
                        "client id {} is not one {} may use (client_ids)",
                        bounded_debug(&connect.client_id),
                        subject.map_or("an anonymous client".into(), bounded_debug)
                    ),
                ));
            }
        }
        self.superuser = false;
        if let Ok(auth) = &verdict {
            let (refusal, superuser) =
                self.backend_connect_checks(auth, &connect.client_id, env, &mut missing);
            self.superuser = superuser;
            if let Some(refusal) = refusal {
                verdict = Err(refusal);
            }
        }
        if let (Ok(auth), Some(will)) = (&verdict, &connect.will) {
            let decision = self.topic_decision(
                env,
                auth.identity.as_ref(),
                &will.topic,
                TopicAccess::Write,
                ACC_WRITE,
                &mut missing,
            );
            if let Decision::Deny(reason) = decision {
                verdict = Err((
                    Refusal::NotAuthorized,
                    format!("will message: {}", reason.description()),
                ));
            }
        }
        if !missing.is_empty() {
            return Some(missing);
        }
        match verdict {
            Ok(auth) => {
                self.identity = auth.identity;
                self.registry = recheck::admitted(connect, self, env);
                let mut by = match &self.identity {
                    Some(i) => format!("{:?}", i.kind).to_lowercase(),
                    None => "anonymous".into(),
                };
                if self.superuser {
                    by.push_str(" backend:superuser");
                }
                if connect.bridge {
                    by.push_str(" bridge");
                }
                let decided = self.decided(
                    policy.mode,
                    "mqtt CONNECT",
                    "[]",
                    Decision::Allow(format!("authenticated:{by}")),
                    "connect",
                );
                out.decisions.push(decided);
                self.accept_connect(connect, env, out);
            }
            Err((refusal, why)) => {
                // An answer the filter could not ask for (over a bound) left it unavailable.
                let (refusal, why) = match (refusal, &self.busy) {
                    (Refusal::Unavailable, Some(busy)) => (Refusal::Busy, busy.clone()),
                    (other, _) => (other, why),
                };
                let reason = match refusal {
                    Refusal::BadCredentials | Refusal::BadAuthMethod => {
                        DenyReason::Unauthenticated(why)
                    }
                    Refusal::NotAuthorized | Refusal::BadClientId => DenyReason::Forbidden(why),
                    Refusal::Unavailable | Refusal::Busy => DenyReason::Unavailable(why),
                };
                let decided = self.decided(
                    policy.mode,
                    "mqtt CONNECT",
                    "[]",
                    Decision::Deny(reason),
                    "connect",
                );
                out.decisions.push(decided);
                if policy.mode == Mode::Shadow {
                    self.identity = None;
                    self.accept_connect(connect, env, out);
                    return None;
                }
                let connack = encode_connack(version, refusal_code(refusal, version));
                self.start_refusal(out, env, version, connect.keep_alive, connack);
            }
        }
        None
    }

    fn accept_connect(&mut self, connect: &Connect, env: &Env<'_>, out: &mut Output) {
        let aliases = connect.properties.topic_alias_maximum().unwrap_or(0);
        // The broker gets the verified identity as user name and no password: a token or
        // device key never reaches it (nor its log).
        let forwarded = Connect {
            username: self.identity.as_ref().map(|i| i.subject.clone()),
            password: None,
            ..connect.clone()
        };
        match encode(&Packet::Connect(forwarded), connect.version) {
            Ok(bytes) => out.forward.extend_from_slice(&bytes),
            Err(e) => {
                self.phase = Phase::Closed;
                out.forward.clear();
                out.close = Some(CloseReason::Malformed(format!(
                    "cannot re-encode the CONNECT: {e}"
                )));
                return;
            }
        }
        self.broker_decoder(env, connect.version, aliases);
        self.phase = Phase::Open;
    }

    fn failure_code(&self) -> u8 {
        match self.version {
            Some(ProtocolVersion::V5) => reason::NOT_AUTHORIZED,
            _ => v3_suback::FAILURE,
        }
    }

    /// One packet after an accepted CONNECT.
    fn on_client_packet(&mut self, frame: &Frame, env: &Env<'_>, out: &mut Output) -> Step {
        match self.client_packet(frame, env, out) {
            Ok(None) => Step::Done,
            Ok(Some(close)) => Step::Close(close),
            Err(missing) => Step::Ask(missing),
        }
    }

    /// One packet after an accepted CONNECT: Ok(Some(reason)) closes; Err: the backend is to
    /// be asked first (nothing was decided or written).
    fn client_packet(
        &mut self,
        frame: &Frame,
        env: &Env<'_>,
        out: &mut Output,
    ) -> Result<Option<CloseReason>, Vec<AskRequest>> {
        let policy = env.policy;
        let mode = policy.mode;
        let mut missing = Vec::new();
        Ok(match &frame.packet {
            Packet::Publish(publish) => {
                let topic = frame.effective_topic.clone().unwrap_or_default();
                let decision = self.topic_decision(
                    env,
                    self.identity.as_ref(),
                    &topic,
                    TopicAccess::Write,
                    ACC_WRITE,
                    &mut missing,
                );
                if !missing.is_empty() {
                    return Err(missing);
                }
                let allowed = decision.is_allowed();
                out.decisions.push(self.decided(
                    mode,
                    &format!("mqtt PUBLISH {topic}"),
                    &format!("[write {}]", bounded_debug(&topic)),
                    decision,
                    "publish",
                ));
                if allowed || mode == Mode::Shadow {
                    out.forward.extend_from_slice(&frame.raw);
                    return Ok(None);
                }
                if let Some(alias) = publish.properties.topic_alias() {
                    if !publish.topic.is_empty() {
                        self.client.forget_topic_alias(alias);
                    }
                }
                if policy.on_forbidden_publish == OnForbiddenPublish::Close {
                    return Ok(Some(CloseReason::Forbidden(format!(
                        "forbidden PUBLISH to {} (on_forbidden_publish: close)",
                        bounded_debug(&topic)
                    ))));
                }
                match (publish.qos, publish.packet_id) {
                    (QoS::AtMostOnce, _) => {}
                    (QoS::AtLeastOnce, Some(packet_id)) => {
                        out.forward.extend_from_slice(&[0xC0, 0x00]);
                        self.pings.push_back(Ping::PubAck(packet_id));
                    }
                    _ => {
                        return Ok(Some(CloseReason::Forbidden(format!(
                            "forbidden QoS 2 PUBLISH to {}",
                            bounded_debug(&topic)
                        ))))
                    }
                }
                None
            }
            Packet::Subscribe(subscribe) => {
                let subscribe_acc = policy
                    .backend()
                    .map_or(ACC_SUBSCRIBE, |b| b.subscribe_acc());
                let filters: Vec<&str> = subscribe
                    .filters
                    .iter()
                    .map(|sub| {
                        shared_subscription(&sub.filter)
                            .map(|(_, f)| f)
                            .unwrap_or(&sub.filter)
                    })
                    .collect();
                let decisions: Vec<Decision> = filters
                    .iter()
                    .map(|filter| {
                        self.topic_decision(
                            env,
                            self.identity.as_ref(),
                            filter,
                            TopicAccess::Read,
                            subscribe_acc,
                            &mut missing,
                        )
                    })
                    .collect();
                if !missing.is_empty() {
                    return Err(missing);
                }
                let asks_backend = policy.backend().is_some_and(|b| b.checks_topics());
                let mut refused = Vec::with_capacity(subscribe.filters.len());
                for ((sub, filter), decision) in
                    subscribe.filters.iter().zip(&filters).zip(decisions)
                {
                    if asks_backend && decision.is_allowed() {
                        if let Ok(parsed) = TopicFilter::parse(filter, true) {
                            if self.granted.len() >= MAX_GRANTS {
                                self.granted.pop_front();
                            }
                            self.granted.push_back(parsed);
                        }
                    }
                    refused.push(!decision.is_allowed() && mode == Mode::Enforce);
                    out.decisions.push(self.decided(
                        mode,
                        &format!("mqtt SUBSCRIBE {}", sub.filter),
                        &format!("[read {}]", bounded_debug(filter)),
                        decision,
                        "subscribe",
                    ));
                }
                if !refused.iter().any(|r| *r) {
                    out.forward.extend_from_slice(&frame.raw);
                    return Ok(None);
                }
                if refused.iter().all(|r| *r) {
                    out.forward.extend_from_slice(&[0xC0, 0x00]);
                    self.pings.push_back(Ping::SubAck {
                        packet_id: subscribe.packet_id,
                        filters: refused.len(),
                    });
                    return Ok(None);
                }
                let kept = Subscribe {
                    packet_id: subscribe.packet_id,
                    properties: subscribe.properties.clone(),
                    filters: subscribe
                        .filters
                        .iter()
                        .zip(&refused)
                        .filter(|(_, r)| !**r)
                        .map(|(f, _)| f.clone())
                        .collect(),
                };
                let version = self.version.unwrap_or(ProtocolVersion::V311);
                match encode_subscribe(version, &kept) {
                    Ok(bytes) => {
                        out.forward.extend_from_slice(&bytes);
                        self.partial_subacks.insert(subscribe.packet_id, refused);
                        None
                    }
                    Err(e) => Some(CloseReason::Malformed(format!(
                        "cannot re-encode SUBSCRIBE: {e}"
                    ))),
                }
            }
            // An UNSUBSCRIBE only takes access away, so it is not an ACL check: Mosquitto 2.0
            // asks nothing of acl_file or of a legacy plugin such as mosquitto-go-auth, whose
            // HTTP backend never sees one. The decoder has validated it (flags, packet id, UTF-8
            // filters, wildcards, limits); a malformed one closed the connection before here.
            Packet::Unsubscribe(_) => {
                out.forward.extend_from_slice(&frame.raw);
                None
            }
            Packet::PingReq => {
                self.pings.push_back(Ping::Client);
                out.forward.extend_from_slice(&frame.raw);
                None
            }
            Packet::Auth(_) => Some(CloseReason::Malformed(
                "AUTH without enhanced authentication".into(),
            )),
            _ => {
                out.forward.extend_from_slice(&frame.raw);
                None
            }
        })
    }

    /// Reads bytes from the broker.
    pub fn on_broker_bytes(&mut self, bytes: &[u8], env: &Env<'_>) -> Output {
        let mut out = Output::default();
        match &self.phase {
            Phase::Closed => {
                return out.closing(CloseReason::Malformed("connection closed".into()))
            }
            Phase::Closing(reason) => {
                let reason = reason.clone();
                self.phase = Phase::Closed;
                return out.closing(reason);
            }
            Phase::AwaitConnect => {
                self.phase = Phase::Closed;
                return out.closing(CloseReason::Malformed(
                    "the broker spoke before the client's CONNECT".into(),
                ));
            }
            Phase::Refused { connack } => {
                // The stand-in (or the broker answering the harmless CONNECT) spoke: whatever it
                // sent is replaced by the refusing CONNACK.
                if !bytes.is_empty() {
                    out.forward = connack.clone();
                    out.close_after_write = true;
                    self.phase = Phase::Closing(CloseReason::Refused);
                }
                return out;
            }
            Phase::Open => {}
        }
        for check in [Session::check_expiry, Session::check_registry_deadline] {
            if let Some(ended) = check(self, env) {
                if ended.close.is_some() {
                    return ended;
                }
                out.decisions.extend(ended.decisions);
            }
        }
        let Some(broker) = self.broker.as_mut() else {
            self.phase = Phase::Closed;
            return out.closing(CloseReason::Malformed("no broker decoder".into()));
        };
        broker.feed(bytes);
        loop {
            let frame = match self.broker.as_mut().map(Decoder::next_frame) {
                Some(Ok(Some(frame))) => frame,
                Some(Ok(None)) => return out,
                Some(Err(error)) => {
                    let reason = CloseReason::Malformed(format!("broker sent {error}"));
                    return self.close_after_forward(out, reason);
                }
                None => return out,
            };
            if let Some(close) = self.on_broker_packet(frame, env, &mut out) {
                return self.close_after_forward(out, close);
            }
        }
    }

    fn on_broker_packet(
        &mut self,
        frame: Frame,
        env: &Env<'_>,
        out: &mut Output,
    ) -> Option<CloseReason> {
        let version = self.version.unwrap_or(ProtocolVersion::V311);
        match &frame.packet {
            Packet::ConnAck(connack) => {
                if self.client_id.is_empty() {
                    if let Some(assigned) = connack.properties.iter().find_map(|p| match p {
                        crate::mqtt::Property::AssignedClientIdentifier(id) => Some(id.clone()),
                        _ => None,
                    }) {
                        self.client_id = assigned;
                    }
                }
                out.forward.extend_from_slice(&frame.raw);
                None
            }
            Packet::PingResp => {
                let answer = match self.pings.pop_front() {
                    None | Some(Ping::Client) => frame.raw.clone(),
                    Some(Ping::PubAck(packet_id)) => {
                        let reason_code = match version {
                            ProtocolVersion::V5 => reason::NOT_AUTHORIZED,
                            ProtocolVersion::V311 => 0,
                        };
                        let puback = Packet::PubAck(PublishResponse {
                            packet_id,
                            reason_code,
                            properties: Properties::new(),
                        });
                        match encode(&puback, version) {
                            Ok(bytes) => bytes,
                            Err(e) => {
                                return Some(CloseReason::Malformed(format!(
                                    "cannot encode PUBACK: {e}"
                                )))
                            }
                        }
                    }
                    Some(Ping::SubAck { packet_id, filters }) => {
                        let codes = vec![self.failure_code(); filters];
                        match encode_suback(version, packet_id, &codes) {
                            Ok(bytes) => bytes,
                            Err(e) => {
                                return Some(CloseReason::Malformed(format!(
                                    "cannot encode SUBACK: {e}"
                                )))
                            }
                        }
                    }
                };
                out.forward.extend_from_slice(&answer);
                None
            }
            Packet::SubAck(suback) => {
                let Some(refused) = self.partial_subacks.remove(&suback.packet_id) else {
                    out.forward.extend_from_slice(&frame.raw);
                    return None;
                };
                let spliced = splice_suback_codes(&suback.codes, &refused, self.failure_code());
                let Some(codes) = spliced else {
                    return Some(CloseReason::Malformed(
                        "the broker's SUBACK does not match the SUBSCRIBE forwarded".into(),
                    ));
                };
                match encode_suback(version, suback.packet_id, &codes) {
                    Ok(bytes) => {
                        out.forward.extend_from_slice(&bytes);
                        None
                    }
                    Err(e) => Some(CloseReason::Malformed(format!("cannot encode SUBACK: {e}"))),
                }
            }
            Packet::Publish(publish) => {
                let policy = env.policy;
                let topic = frame.effective_topic.clone().unwrap_or_default();
                let decision = self.delivery_decision(env, &topic);
                if decision.is_allowed() {
                    out.forward.extend_from_slice(&frame.raw);
                    return None;
                }
                // Only denials are logged: deliveries are not the client's requests.
                out.decisions.push(self.decided(
                    policy.mode,
                    &format!("mqtt deliver PUBLISH {topic}"),
                    &format!("[read {}]", bounded_debug(&topic)),
                    decision,
                    "deliver",
                ));
                if policy.mode == Mode::Shadow {
                    out.forward.extend_from_slice(&frame.raw);
                    return None;
                }
                let sets_alias = publish.properties.topic_alias().is_some();
                if publish.qos == QoS::AtMostOnce && !sets_alias {
                    return None;
                }
                Some(CloseReason::Forbidden(format!(
                    "the broker delivered a message on {}, which the client may not read",
                    bounded_debug(&topic)
                )))
            }
            _ => {
                out.forward.extend_from_slice(&frame.raw);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests;
