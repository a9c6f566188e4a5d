//! The device-ownership configuration: serde types (unknown fields refused) and their
//! validation, which names what is wrong.

use std::collections::HashMap;

use serde::de::{self, DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

use super::{DelegatedAccess, Delegation, EntityKey, Grantee, Record};
use crate::client_credentials::UpstreamAuth;
use crate::enforcement::Mode;
use crate::identity_headers::IdentityHeaderNames;
use crate::ngsi::Broker;
use crate::upstream::{Authority, ClusterName, Target, TimeoutMs, UpstreamPath};

/// The whole filter configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OwnershipConfig {
    /// `enforce` (default) or `shadow`.
    #[serde(default)]
    pub mode: Mode,
    /// Allowed requests are logged at `debug` (default), `info`, or not at all (`off`).
    /// Denials are always logged, at warning.
    #[serde(default)]
    pub log_allows: crate::decision_line::LogAllows,
    /// Where token-auth put the identity (defaults as token-auth's).
    #[serde(default)]
    pub identity_headers: IdentityHeaderNames,
    /// Callers with any of these roles bypass ownership.
    #[serde(default)]
    pub admin_roles: Vec<String>,
    /// Ownership sources, consulted in this order.
    pub sources: Vec<SourceConfig>,
    /// The entity attribute naming the owner (broker source, create bodies, tampering).
    #[serde(default = "default_owner_attribute")]
    pub owner_attribute: String,
    /// The entity attribute holding the delegations (broker source, tampering).
    #[serde(default = "default_delegations_attribute")]
    pub delegations_attribute: String,
    /// The entity id a device identity may write; `{device}` is its subject.
    #[serde(default = "default_device_entity_id")]
    pub device_entity_id: String,
    /// Largest request body buffered (bytes); larger → 413.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Largest list response filtered (bytes); larger → 503.
    #[serde(default = "default_max_response")]
    pub max_response_bytes: usize,
    /// At most this many registry lookups to filter one list response; more → 503.
    #[serde(default = "default_max_list_lookups")]
    pub max_list_lookups: usize,
    #[serde(default)]
    pub cache: CacheConfig,
    /// The broker behind the sidecar: `orion` (default), `ngsi-ld` or `fogflow` (see
    /// [`crate::ngsi::Broker`]): which routes exist and what a request really does there.
    #[serde(default)]
    pub broker: Broker,
    /// Which entities ownership decides (absent: every entity); the others pass untouched.
    #[serde(default)]
    pub scope: Option<ScopeConfig>,
}

/// `scope`: an entity is in scope when it matches every list given (see
/// [`super::scope`] for what each dialect can prove). An empty list is refused.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopeConfig {
    /// Entity types (NGSI v2 exact; NGSI-LD by local name).
    #[serde(default)]
    pub entity_types: Option<Vec<String>>,
    /// Service paths, `/a` or `/a/#` (that path and its subtree); NGSI v2 only.
    #[serde(default)]
    pub service_paths: Option<Vec<String>>,
    /// Tenants (`fiware-service` / `NGSILD-Tenant`, lowercase; `""` is the default tenant).
    #[serde(default)]
    pub services: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Entries held at most (0: no cache).
    pub max_entries: usize,
    /// Seconds a known owner is cached.
    pub ttl_secs: u64,
    /// Seconds "no source knows this entity" is cached.
    pub negative_ttl_secs: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_entries: 10_000,
            ttl_secs: 60,
            negative_ttl_secs: 10,
        }
    }
}

/// One ownership source: `{"kind": "static" | "broker" | "registry", ...}`.
#[derive(Debug, Clone)]
pub enum SourceConfig {
    /// Owners listed in the configuration.
    Static(StaticSource),
    /// The owner attribute of the entity itself, read from the broker.
    Broker(BrokerSource),
    /// An external ownership registry (see the README for the JSON contract).
    Registry(RegistrySource),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticSource {
    pub entities: Vec<StaticEntity>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerSource {
    /// The Envoy cluster of the broker.
    pub cluster: ClusterName,
    /// `:authority` of the lookups (default: the cluster name).
    #[serde(default)]
    pub authority: Option<Authority>,
    /// Which API to read with: `auto` (the request's dialect), `v2`, `ngsi-ld`, `ngsi10`.
    #[serde(default)]
    pub api: BrokerApi,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: TimeoutMs,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrySource {
    pub cluster: ClusterName,
    #[serde(default)]
    pub authority: Option<Authority>,
    #[serde(default = "default_lookup_path")]
    pub lookup_path: UpstreamPath,
    #[serde(default = "default_claim_path")]
    pub claim_path: UpstreamPath,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: TimeoutMs,
    /// How the filter authenticates its calls (absent: it does not; mTLS on the cluster
    /// needs nothing here).
    #[serde(default)]
    pub auth: Option<Box<UpstreamAuth>>,
}

impl<'de> Deserialize<'de> for SourceConfig {
    /// By `kind`, as `#[serde(tag = "kind")]` would, but keeping the path of a bad field:
    /// serde reads a tagged enum through a buffer that forgets it, so the variant's fields
    /// are read here through `serde_path_to_error` (`sources[1]: claim_path: path ...`).
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        const KINDS: &[&str] = &["static", "broker", "registry"];
        let mut fields = Map::<String, Value>::deserialize(deserializer)?;
        let kind = match fields.remove("kind") {
            Some(Value::String(kind)) => kind,
            Some(_) => return Err(D::Error::custom("kind: must be a string")),
            None => return Err(D::Error::missing_field("kind")),
        };
        fn read<T: DeserializeOwned, E: de::Error>(fields: Map<String, Value>) -> Result<T, E> {
            serde_path_to_error::deserialize(Value::Object(fields)).map_err(|e| {
                let path = e.path().to_string();
                match path.as_str() {
                    "." => E::custom(e.into_inner()),
                    _ => E::custom(format!("{path}: {}", e.into_inner())),
                }
            })
        }
        match kind.as_str() {
            "static" => read(fields).map(SourceConfig::Static),
            "broker" => read(fields).map(SourceConfig::Broker),
            "registry" => read(fields).map(SourceConfig::Registry),
            other => Err(D::Error::unknown_variant(other, KINDS)),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
pub enum BrokerApi {
    #[default]
    #[serde(rename = "auto")]
    Auto,
    #[serde(rename = "v2")]
    V2,
    #[serde(rename = "ngsi-ld")]
    Ld,
    #[serde(rename = "ngsi10")]
    Ngsi10,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticEntity {
    pub id: String,
    /// The tenant (`fiware-service` / `NGSILD-Tenant`, lowercase); default: the default tenant.
    #[serde(default)]
    pub service: String,
    pub owner: String,
    #[serde(default)]
    pub delegations: Vec<DelegationConfig>,
    #[serde(default)]
    pub public: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DelegationConfig {
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub group: Option<String>,
    /// `read` / `read_write` (or `READ_ACCESS` / `READ_WRITE`).
    pub access: String,
}

fn default_owner_attribute() -> String {
    "owner".into()
}
fn default_delegations_attribute() -> String {
    "delegations".into()
}
fn default_device_entity_id() -> String {
    "{device}".into()
}
fn default_max_body() -> usize {
    1 << 20
}
/// 768 KiB: under Envoy's default buffer limit (`per_connection_buffer_limit_bytes`, 1 MiB) by
/// a read's worth. Envoy answers a held response over its limit with its own 500, and the body
/// size it tells the filter leaves out the chunk being delivered, so the stage's own limit
/// (503 with its log line) must be reached a chunk before Envoy's.
fn default_max_response() -> usize {
    768 << 10
}
fn default_max_list_lookups() -> usize {
    100
}
fn default_timeout_ms() -> TimeoutMs {
    TimeoutMs::default_of(1000)
}
fn default_lookup_path() -> UpstreamPath {
    UpstreamPath::default_of("/ownership/lookup")
}
fn default_claim_path() -> UpstreamPath {
    UpstreamPath::default_of("/ownership/claim")
}

fn check_attr(name: &str, what: &str) -> Result<(), String> {
    if name.is_empty() || name.chars().any(|c| c.is_control() || c == ',') {
        return Err(format!(
            "{what} {name:?} must be a non-empty attribute name without ',' or control characters"
        ));
    }
    if matches!(name, "id" | "type" | "@context" | "*") {
        return Err(format!("{what} {name:?} is reserved"));
    }
    Ok(())
}

impl SourceConfig {
    /// Where a remote source is called (None: the static source).
    pub fn target(&self) -> Option<Target<'_>> {
        let (cluster, authority, timeout) = match self {
            SourceConfig::Broker(b) => (&b.cluster, &b.authority, b.timeout_ms),
            SourceConfig::Registry(r) => (&r.cluster, &r.authority, r.timeout_ms),
            SourceConfig::Static(_) => return None,
        };
        Some(Target {
            cluster,
            authority: authority.as_ref(),
            timeout,
        })
    }
}

impl DelegationConfig {
    fn to_delegation(&self, what: &str) -> Result<Delegation, String> {
        let access = DelegatedAccess::parse(&self.access).ok_or_else(|| {
            format!(
                "{what}: access {:?} must be read, read_write, READ_ACCESS or READ_WRITE",
                self.access
            )
        })?;
        let grantee = match (&self.user, &self.group) {
            (Some(u), None) if !u.is_empty() => Grantee::User(u.clone()),
            (None, Some(g)) if !g.is_empty() => Grantee::Group(g.clone()),
            _ => return Err(format!("{what}: give exactly one non-empty user or group")),
        };
        Ok(Delegation { grantee, access })
    }
}

impl OwnershipConfig {
    /// Reads the environment variables the configuration names (a registry source's
    /// `auth.client_credentials.client_secret_env`) from `env`, the VM's environment; call it
    /// once at configure time, before building the engine (which refuses one unset).
    pub fn read_environment(&mut self, env: &dyn Fn(&str) -> Option<String>) {
        for source in &mut self.sources {
            if let SourceConfig::Registry(RegistrySource {
                auth: Some(auth), ..
            }) = source
            {
                auth.client_credentials.read_environment(env);
            }
        }
    }

    /// Checks everything and builds the static map.
    pub fn validate(&self) -> Result<HashMap<EntityKey, Record>, String> {
        self.identity_headers.validate()?;
        if self.sources.is_empty() {
            return Err("sources must name at least one ownership source".into());
        }
        check_attr(&self.owner_attribute, "owner_attribute")?;
        check_attr(&self.delegations_attribute, "delegations_attribute")?;
        if self.owner_attribute == self.delegations_attribute {
            return Err("owner_attribute and delegations_attribute must differ".into());
        }
        if self.device_entity_id.matches("{device}").count() != 1 {
            return Err(format!(
                "device_entity_id {:?} must contain {{device}} exactly once",
                self.device_entity_id
            ));
        }
        for role in &self.admin_roles {
            if role.is_empty() {
                return Err("admin_roles must not contain an empty role".into());
            }
        }
        if self.max_body_bytes == 0 || self.max_response_bytes == 0 {
            return Err("max_body_bytes and max_response_bytes must be positive".into());
        }
        if self.max_list_lookups == 0 || self.max_list_lookups > 1000 {
            return Err("max_list_lookups must be between 1 and 1000".into());
        }
        if self.cache.ttl_secs == 0 && self.cache.max_entries > 0 {
            return Err("cache.ttl_secs must be positive (or set cache.max_entries to 0)".into());
        }
        if self.cache.negative_ttl_secs > self.cache.ttl_secs {
            return Err(format!(
                "cache.negative_ttl_secs ({}) must not exceed cache.ttl_secs ({})",
                self.cache.negative_ttl_secs, self.cache.ttl_secs
            ));
        }
        let mut statics = HashMap::new();
        let (mut brokers, mut registries) = (0, 0);
        for (i, source) in self.sources.iter().enumerate() {
            let what = format!("sources[{i}]");
            match source {
                SourceConfig::Static(StaticSource { entities }) => {
                    for (j, e) in entities.iter().enumerate() {
                        let what = format!("{what}.entities[{j}]");
                        if e.id.is_empty() || e.id.chars().any(char::is_control) {
                            return Err(format!("{what}: id must be a non-empty entity id"));
                        }
                        if e.owner.is_empty() {
                            return Err(format!("{what}: owner must not be empty"));
                        }
                        if e.service != e.service.to_ascii_lowercase() {
                            return Err(format!(
                                "{what}: service {:?} must be lowercase (as the broker stores it)",
                                e.service
                            ));
                        }
                        let mut delegations = Vec::new();
                        for (k, d) in e.delegations.iter().enumerate() {
                            delegations.push(d.to_delegation(&format!("{what}.delegations[{k}]"))?);
                        }
                        let key = EntityKey::new(e.service.clone(), e.id.clone());
                        let record = Record {
                            owner: e.owner.clone(),
                            delegations,
                            public: e.public,
                        };
                        if statics.insert(key, record).is_some() {
                            return Err(format!(
                                "{what}: entity {:?} (service {:?}) is listed twice",
                                e.id, e.service
                            ));
                        }
                    }
                }
                // Their endpoints were checked as they were read (crate::upstream).
                SourceConfig::Broker { .. } => brokers += 1,
                SourceConfig::Registry(registry) => {
                    registries += 1;
                    if let Some(auth) = &registry.auth {
                        auth.client_credentials
                            .validate()
                            .map_err(|e| format!("{what}.{e}"))?;
                    }
                }
            }
        }
        if brokers > 1 || registries > 1 {
            return Err("at most one broker source and one registry source".into());
        }
        Ok(statics)
    }
}
