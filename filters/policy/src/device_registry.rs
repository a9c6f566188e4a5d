//! Device keys from a registry (Snap4city's IoT Directory keeps K1/K2 with the device's owner in
//! "MyPersonalData"): a device the configuration does not list is looked up by id through an
//! Envoy cluster, and the answer is cached for a bounded time.
//!
//! # The contract
//!
//! `GET <path>?id=<device id, form-urlencoded>` with `Accept: application/json`. Answers:
//!
//! * `200` with a JSON object `{"id": "<the device id asked>", "key_sha256": ["<64 hex>", ...],
//!   "roles": ["..."]}`: the device is registered; `key_sha256` are the SHA-256 digests of its
//!   accepted keys (two during a rotation, none when every key is revoked: then every key is
//!   refused); `roles` (optional) are added to the configured `roles`. Other members (an
//!   `owner`, say) are ignored. The registry returns digests, never keys.
//! * `404`: no such device. The key is refused (401) and the refusal cached for `negative_ttl_s`.
//! * anything else (another status, no answer, a timeout, a body that is not UTF-8 or not the
//!   object above, an `id` that is not the one asked, a duplicate member): the registry could
//!   not say, 503, never cached and never an allow.
//!
//! A registered device's digests are cached for `positive_ttl_s`: a key revoked in the registry
//! stops working within that long (at most [`MAX_POSITIVE_TTL_S`]); an unknown id is asked again
//! after `negative_ttl_s` (at most [`MAX_NEGATIVE_TTL_S`]).
//!
//! This module is sans-IO: it builds the call as plain data ([`HttpCall`]) and reads the answer
//! it is handed; the filters make the call with the callout mechanism they use for
//! introspection.

use std::cell::RefCell;

use serde::Deserialize;
use serde_json::Value;
use url::form_urlencoded;

use crate::cache::VerdictCache;
use crate::client_credentials::UpstreamAuth;
use crate::config_error::ConfigError;
use crate::decision::DenyReason;
use crate::upstream::{Authority, ClusterName, HttpCall, Target, TimeoutMs, UpstreamPath};

/// Bounds enforced at configure time (the endpoint's own: [`crate::upstream`]).
pub const MAX_POSITIVE_TTL_S: u64 = 3_600;
pub const MAX_NEGATIVE_TTL_S: u64 = 300;
pub const MAX_CACHE_ENTRIES: usize = 1_000_000;
pub const MAX_MAX_IN_FLIGHT: usize = 10_000;
/// The largest answer read; a larger one is "no usable answer".
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// The most digests one device may have.
pub const MAX_KEYS_PER_DEVICE: usize = 16;
/// The longest device id sent to the registry; a longer one is refused without asking.
pub const MAX_DEVICE_ID_BYTES: usize = 256;

/// `device_keys.registry`.
///
/// ```json
/// {"cluster": "iot-directory", "authority": "iotdirectory.example", "path": "/api/device-keys",
///  "timeout_ms": 2000, "max_in_flight": 64,
///  "cache": {"max_entries": 10000, "positive_ttl_s": 60, "negative_ttl_s": 10}}
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// The Envoy cluster of the registry.
    pub cluster: ClusterName,
    /// The `:authority` of the call.
    pub authority: Authority,
    /// The lookup path (no query: the filter adds `?id=`).
    pub path: UpstreamPath,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: TimeoutMs,
    /// Lookups in flight per VM (token-auth); beyond it a request needing a new one gets 503
    /// with `Retry-After`.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    #[serde(default)]
    pub cache: RegistryCacheConfig,
    /// How the filter authenticates its calls: a client-credentials token (token-auth only;
    /// mqtt-acl refuses it and relies on mTLS on the cluster). Absent: not by the filter.
    #[serde(default)]
    pub auth: Option<UpstreamAuth>,
}

/// `device_keys.registry.cache`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryCacheConfig {
    /// Devices remembered per VM (least recently used dropped first).
    pub max_entries: usize,
    /// How long a registered device's digests are trusted: a revoked key works at most this long.
    pub positive_ttl_s: u64,
    /// How long an unknown device id is remembered as unknown.
    pub negative_ttl_s: u64,
}

impl Default for RegistryCacheConfig {
    fn default() -> Self {
        RegistryCacheConfig {
            max_entries: 10_000,
            positive_ttl_s: 60,
            negative_ttl_s: 10,
        }
    }
}

fn default_timeout_ms() -> TimeoutMs {
    TimeoutMs::default_of(2000)
}

fn default_max_in_flight() -> usize {
    64
}

/// What the registry said about a device (cached).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    /// SHA-256 digests of the accepted keys (empty: every key revoked).
    pub digests: Vec<[u8; 32]>,
    /// Roles the registry grants, beside the configured ones.
    pub roles: Vec<String>,
}

/// A lookup's result: the record, or why there is none (401 unknown, 503 no usable answer).
pub type LookupResult = Result<DeviceRecord, DenyReason>;

/// A lookup decided from an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookupDecision {
    pub result: LookupResult,
    /// The answer was there but not what the contract says (counted by the filter).
    pub malformed: bool,
}

/// The registry and what it answered (per VM). The cache sits behind a `RefCell` because
/// mqtt-acl consults its policy through a shared reference (as its introspection cache does).
#[derive(Debug)]
pub struct DeviceRegistry {
    config: RegistryConfig,
    cache: RefCell<VerdictCache<LookupResult>>,
}

impl Clone for DeviceRegistry {
    /// The configuration, with an empty cache.
    fn clone(&self) -> Self {
        DeviceRegistry {
            config: self.config.clone(),
            cache: RefCell::new(VerdictCache::new(self.config.cache.max_entries)),
        }
    }
}

/// A configuration error at `device_keys.registry.<field>`.
fn refused(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::At {
        path: format!("device_keys.registry.{field}"),
        message: message.into(),
    }
}

impl DeviceRegistry {
    /// Validates `config`; the error names the JSON path of the bad value.
    pub fn new(config: RegistryConfig) -> Result<DeviceRegistry, ConfigError> {
        // The endpoint was checked as it was read (crate::upstream); the filter adds the query.
        if config.path.has_query() {
            return Err(refused(
                "path",
                format!("{:?} must have no query", config.path.as_str()),
            ));
        }
        if let Some(auth) = &config.auth {
            auth.client_credentials.validate().map_err(|e| {
                let (field, message) = e.split_once(": ").unwrap_or((e.as_str(), ""));
                refused(field, message)
            })?;
        }
        if !(1..=MAX_MAX_IN_FLIGHT).contains(&config.max_in_flight) {
            return Err(refused(
                "max_in_flight",
                format!("must be between 1 and {MAX_MAX_IN_FLIGHT}"),
            ));
        }
        let cache = &config.cache;
        if !(1..=MAX_CACHE_ENTRIES).contains(&cache.max_entries) {
            return Err(refused(
                "cache.max_entries",
                format!("must be between 1 and {MAX_CACHE_ENTRIES}"),
            ));
        }
        if cache.positive_ttl_s > MAX_POSITIVE_TTL_S {
            return Err(refused(
                "cache.positive_ttl_s",
                format!(
                    "at most {MAX_POSITIVE_TTL_S} (a key revoked in the registry works until \
                     its entry expires)"
                ),
            ));
        }
        if cache.negative_ttl_s > MAX_NEGATIVE_TTL_S {
            return Err(refused(
                "cache.negative_ttl_s",
                format!(
                    "at most {MAX_NEGATIVE_TTL_S} (a device just registered is refused until \
                     its entry expires)"
                ),
            ));
        }
        Ok(DeviceRegistry {
            cache: RefCell::new(VerdictCache::new(cache.max_entries)),
            config,
        })
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.config
    }

    /// Whether one more lookup may start while `in_flight` are (Err: the 503 to answer).
    pub fn admit(&self, in_flight: usize) -> Result<(), DenyReason> {
        if in_flight < self.config.max_in_flight {
            Ok(())
        } else {
            Err(DenyReason::Unavailable(format!(
                "{in_flight} device registry lookups in flight (max_in_flight); retry shortly"
            )))
        }
    }

    /// The call that looks `device_id` up.
    pub fn call(&self, device_id: &str) -> HttpCall {
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("id", device_id)
            .finish();
        let target = Target {
            cluster: &self.config.cluster,
            authority: Some(&self.config.authority),
            timeout: self.config.timeout_ms,
        };
        target
            .call("GET", format!("{}?{query}", self.config.path.as_str()))
            .with_header("accept", "application/json")
    }

    /// What the cache says about `device_id`, if it has a fresh entry.
    pub fn cached(&self, device_id: &str, now: u64) -> Option<LookupResult> {
        self.cache.borrow_mut().get(device_id, now)
    }

    /// Like [`Self::cached`], with the instant the entry expires (a connection admitted on it
    /// is re-checked then: mqtt-acl).
    pub fn cached_until(&self, device_id: &str, now: u64) -> Option<(LookupResult, u64)> {
        self.cache.borrow_mut().get_with_expiry(device_id, now)
    }

    /// How long a registered device's answer is trusted (`cache.positive_ttl_s`).
    pub fn positive_ttl_s(&self) -> u64 {
        self.config.cache.positive_ttl_s
    }

    /// How many seconds before the answer a long-lived connection runs on expires the registry
    /// is asked again (mqtt-acl): the call's timeout rounded up to whole seconds, plus one
    /// (the filter's timer ticks within it), so that a registry that answers in time confirms
    /// the key before the old answer expires.
    pub fn recheck_lead_s(&self) -> u64 {
        self.config.timeout_ms.millis().div_ceil(1000) + 1
    }

    /// Decides the answer to a lookup of `device_id` (`status` 0: no answer) and remembers it
    /// for its TTL; an unusable answer is never remembered.
    pub fn remember(&self, device_id: &str, status: u32, body: &[u8], now: u64) -> LookupDecision {
        let decision = decide(device_id, status, body);
        let ttl = match &decision.result {
            Ok(_) => Some(self.config.cache.positive_ttl_s),
            Err(DenyReason::Unauthenticated(_)) => Some(self.config.cache.negative_ttl_s),
            Err(_) => None,
        };
        if let Some(ttl) = ttl.filter(|t| *t > 0) {
            self.cache
                .borrow_mut()
                .insert(device_id, decision.result.clone(), now, ttl, None);
        }
        decision
    }

    pub fn cache_stats(&self) -> crate::cache::CacheStats {
        self.cache.borrow().stats()
    }
}

/// Whether `device_id` may be sent to the registry (else it is refused without asking).
pub fn valid_device_id(device_id: &str) -> bool {
    !device_id.is_empty()
        && device_id.len() <= MAX_DEVICE_ID_BYTES
        && !device_id.chars().any(char::is_control)
}

fn unusable(why: impl Into<String>) -> LookupDecision {
    LookupDecision {
        result: Err(DenyReason::Unavailable(format!(
            "the device registry gave no usable answer: {}",
            why.into()
        ))),
        malformed: false,
    }
}

fn malformed(why: &str) -> LookupDecision {
    LookupDecision {
        malformed: true,
        ..unusable(format!("the answer is not the contract's ({why})"))
    }
}

/// The one reading of a registry answer.
fn decide(device_id: &str, status: u32, body: &[u8]) -> LookupDecision {
    match status {
        // Said as a wrong key is: the client must not learn which device ids exist.
        404 => {
            return LookupDecision {
                result: Err(DenyReason::Unauthenticated("invalid device key".into())),
                malformed: false,
            }
        }
        0 => return unusable("no answer"),
        200..=299 => {}
        other => return unusable(format!("status {other}")),
    }
    if body.len() > MAX_ANSWER_BYTES {
        return malformed("too large");
    }
    if std::str::from_utf8(body).is_err() {
        return malformed("not UTF-8");
    }
    let object = match crate::strict_json::parse_object(body) {
        Ok(object) => object,
        Err(e) => return malformed(&e.to_string()),
    };
    if object.get("id").and_then(Value::as_str) != Some(device_id) {
        return malformed("\"id\" is not the device asked for");
    }
    let Some(Value::Array(keys)) = object.get("key_sha256") else {
        return malformed("\"key_sha256\" is not an array");
    };
    if keys.len() > MAX_KEYS_PER_DEVICE {
        return malformed("too many keys");
    }
    let Some(digests) = keys
        .iter()
        .map(|k| k.as_str().and_then(crate::device_keys::parse_digest))
        .collect::<Option<Vec<_>>>()
    else {
        return malformed("a digest is not 64 hex digits");
    };
    let roles = match object.get("roles") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(roles)) => {
            let Some(roles) = roles
                .iter()
                .map(|r| r.as_str().filter(|r| valid_role(r)).map(str::to_string))
                .collect::<Option<Vec<_>>>()
            else {
                return malformed("a role is not a non-empty string without commas");
            };
            roles
        }
        Some(_) => return malformed("\"roles\" is not an array"),
    };
    LookupDecision {
        result: Ok(DeviceRecord { digests, roles }),
        malformed: false,
    }
}

/// A role as identity headers carry them (comma-separated).
fn valid_role(role: &str) -> bool {
    !role.is_empty() && !role.contains(',') && !role.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "4fb871485c80f49dae1ba02def42c5aab66a2b8e96a4ac3ec5d5734a09cdf2dc";

    fn registry(extra: serde_json::Value) -> Result<DeviceRegistry, ConfigError> {
        let mut config = serde_json::json!({"cluster": "iot-directory",
            "authority": "iotdirectory.example", "path": "/api/device-keys"});
        if let (Some(c), Some(e)) = (config.as_object_mut(), extra.as_object()) {
            c.extend(e.clone());
        }
        #[derive(Deserialize)]
        struct Plugin {
            device_keys: DeviceKeys,
        }
        #[derive(Deserialize)]
        struct DeviceKeys {
            registry: RegistryConfig,
        }
        let json = serde_json::json!({"device_keys": {"registry": config}}).to_string();
        let plugin: Plugin = crate::config_error::parse(json.as_bytes())?;
        DeviceRegistry::new(plugin.device_keys.registry)
    }

    #[test]
    fn the_call_is_a_get_by_id() {
        let r = registry(serde_json::json!({})).unwrap();
        let call = r.call("lamp 01&x=1");
        assert_eq!(call.method, "GET");
        assert_eq!(call.cluster, "iot-directory");
        assert_eq!(call.authority, "iotdirectory.example");
        assert_eq!(call.path, "/api/device-keys?id=lamp+01%26x%3D1");
        assert_eq!(call.header("accept"), Some("application/json"));
        assert_eq!(call.timeout_ms, 2000);
        assert!(call.body.is_empty());
    }

    #[test]
    fn answers_are_read_as_the_contract_says() {
        let ok = format!(
            r#"{{"id": "lamp-01", "key_sha256": ["{DIGEST}"], "owner": "alice", "roles": ["lamp"]}}"#
        );
        let decided = decide("lamp-01", 200, ok.as_bytes());
        let record = decided.result.unwrap();
        assert_eq!(record.digests.len(), 1);
        assert_eq!(record.roles, vec!["lamp".to_string()]);
        let revoked = decide("lamp-01", 200, br#"{"id": "lamp-01", "key_sha256": []}"#);
        assert_eq!(revoked.result.unwrap().digests.len(), 0);
        assert_eq!(
            decide("lamp-01", 404, b"").result.unwrap_err().status(),
            401
        );
        for (status, body, is_malformed) in [
            (0, &b""[..], false),
            (500, ok.as_bytes(), false),
            (401, ok.as_bytes(), false),
            (403, b"", false),
            (200, b"not json", true),
            (200, b"\xff\xfe{}", true),
            (200, br#"{"id": "lamp-02", "key_sha256": []}"#, true),
            (200, br#"{"key_sha256": []}"#, true),
            (200, br#"{"id": "lamp-01"}"#, true),
            (200, br#"{"id": "lamp-01", "key_sha256": ["abc"]}"#, true),
            (200, br#"{"id": "lamp-01", "key_sha256": "x"}"#, true),
            (
                200,
                br#"{"id": "lamp-01", "key_sha256": [], "roles": "admin"}"#,
                true,
            ),
            (
                200,
                br#"{"id": "lamp-01", "key_sha256": [], "roles": ["a,b"]}"#,
                true,
            ),
            (
                200,
                br#"{"id": "lamp-01", "id": "lamp-01", "key_sha256": []}"#,
                true,
            ),
            (200, br#"["lamp-01"]"#, true),
        ] {
            let decided = decide("lamp-01", status, body);
            let text = String::from_utf8_lossy(body);
            assert_eq!(
                decided.result.as_ref().map(|_| ()).unwrap_err().status(),
                503,
                "{status} {text}"
            );
            assert_eq!(decided.malformed, is_malformed, "{status} {text}");
        }
    }

    #[test]
    fn records_and_unknown_ids_are_cached_for_their_ttls_failures_never() {
        let r = registry(serde_json::json!({"cache": {"max_entries": 10,
            "positive_ttl_s": 60, "negative_ttl_s": 10}}))
        .unwrap();
        let ok = format!(r#"{{"id": "lamp-01", "key_sha256": ["{DIGEST}"]}}"#);
        r.remember("lamp-01", 200, ok.as_bytes(), 1000);
        assert!(matches!(r.cached("lamp-01", 1059), Some(Ok(_))));
        assert_eq!(r.cached("lamp-01", 1060), None, "positive TTL over");
        r.remember("ghost", 404, b"", 1000);
        assert!(matches!(r.cached("ghost", 1009), Some(Err(_))));
        assert_eq!(r.cached("ghost", 1010), None, "negative TTL over");
        r.remember("lamp-02", 503, b"", 1000);
        r.remember("lamp-03", 200, b"junk", 1000);
        assert_eq!(r.cached("lamp-02", 1000), None);
        assert_eq!(r.cached("lamp-03", 1000), None);
    }

    #[test]
    fn the_cache_is_bounded() {
        let r = registry(serde_json::json!({"cache": {"max_entries": 2,
            "positive_ttl_s": 60, "negative_ttl_s": 10}}))
        .unwrap();
        for id in ["a", "b", "c"] {
            r.remember(id, 404, b"", 1000);
        }
        assert_eq!(r.cache.borrow().len(), 2);
        assert_eq!(
            r.cached("a", 1000),
            None,
            "the least recently used went first"
        );
    }

    #[test]
    fn bad_configuration_names_the_json_path() {
        let path = |extra: serde_json::Value| match registry(extra) {
            Err(ConfigError::At { path, .. }) => path,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            path(serde_json::json!({"cluster": ""})),
            "device_keys.registry.cluster"
        );
        assert_eq!(
            path(serde_json::json!({"authority": "a/b"})),
            "device_keys.registry.authority"
        );
        assert_eq!(
            path(serde_json::json!({"path": "/keys?id="})),
            "device_keys.registry.path"
        );
        assert_eq!(
            path(serde_json::json!({"path": "keys"})),
            "device_keys.registry.path"
        );
        assert_eq!(
            path(serde_json::json!({"timeout_ms": 0})),
            "device_keys.registry.timeout_ms"
        );
        assert_eq!(
            path(serde_json::json!({"max_in_flight": 0})),
            "device_keys.registry.max_in_flight"
        );
        assert_eq!(
            path(serde_json::json!({"cache": {"max_entries": 0}})),
            "device_keys.registry.cache.max_entries"
        );
        assert_eq!(
            path(serde_json::json!({"cache": {"positive_ttl_s": 3601}})),
            "device_keys.registry.cache.positive_ttl_s"
        );
        assert_eq!(
            path(serde_json::json!({"cache": {"negative_ttl_s": 301}})),
            "device_keys.registry.cache.negative_ttl_s"
        );
        assert!(registry(serde_json::json!({"cache": {"positive_ttl_s": 3600}})).is_ok());
    }

    #[test]
    fn device_ids_sent_to_the_registry_are_bounded_text() {
        assert!(valid_device_id("lamp-01"));
        assert!(!valid_device_id(""));
        assert!(!valid_device_id("lamp\n01"));
        assert!(!valid_device_id(&"x".repeat(MAX_DEVICE_ID_BYTES + 1)));
    }
}
