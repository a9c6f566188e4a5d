//! Device key pairs (Snap4city's K1/K2): a device presents its id and a secret key. The
//! configuration holds only SHA-256 digests of the keys (`devices`), so a leaked configuration
//! does not leak keys; a device it does not list may be looked up in a registry (`registry`,
//! [`crate::device_registry`]), which returns digests too. Comparison is constant-time.

use std::collections::BTreeMap;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config_error::ConfigError;
use crate::decision::DenyReason;
use crate::device_registry::{
    valid_device_id, DeviceRecord, DeviceRegistry, LookupResult, RegistryConfig,
};
use crate::identity::{Identity, IdentityKind};
use crate::introspection::HttpCall;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceKeysConfig {
    /// Device id → its key digests (small deployments; listed devices are never looked up).
    #[serde(default)]
    pub devices: BTreeMap<String, DeviceEntry>,
    /// Where devices not listed in `devices` are looked up.
    #[serde(default)]
    pub registry: Option<RegistryConfig>,
    /// Roles every device identity gets.
    #[serde(default = "device_role")]
    pub roles: Vec<String>,
}

fn device_role() -> Vec<String> {
    vec!["device".into()]
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceEntry {
    /// Hex SHA-256 of each accepted key (a device may have two during a rotation).
    pub key_sha256: Vec<String>,
}

/// A validated set of device keys, and the registry for the others.
#[derive(Debug, Clone)]
pub struct DeviceKeys {
    devices: BTreeMap<String, Vec<[u8; 32]>>,
    roles: Vec<String>,
    registry: Option<DeviceRegistry>,
}

/// What checking a device's key needs or found.
#[derive(Debug, Clone, PartialEq)]
pub enum KeyCheck {
    Verified(Identity),
    /// 401 (wrong key, unknown device) or 503 (the registry could not say).
    Refused(DenyReason),
    /// The device is not listed and not cached: make this call, hand the answer to
    /// [`DeviceKeys::finish_lookup`], then check the key with [`DeviceKeys::check_record`].
    Lookup {
        device_id: String,
        call: HttpCall,
    },
}

/// Parses a hex SHA-256 digest (64 hex digits).
pub fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

fn at(path: String, message: impl Into<String>) -> ConfigError {
    ConfigError::At {
        path,
        message: message.into(),
    }
}

/// The SHA-256 digest of a key: what the configuration and the registry list. A connection
/// admitted on a registry key keeps this (not the key) to re-check it.
pub fn key_digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Whether `digest` is one of `digests`, in constant time over the digests.
fn digest_matches(digests: &[[u8; 32]], digest: &[u8; 32]) -> bool {
    let mut matched = subtle::Choice::from(0);
    for known in digests {
        matched |= known.ct_eq(digest);
    }
    bool::from(matched)
}

/// Whether `key`'s digest is one of `digests`, in constant time over the digests.
fn key_matches(digests: &[[u8; 32]], key: &str) -> bool {
    digest_matches(digests, &key_digest(key))
}

fn invalid_key() -> DenyReason {
    DenyReason::Unauthenticated("invalid device key".into())
}

impl DeviceKeys {
    /// Validates the configuration; the error names the JSON path (under `device_keys`).
    pub fn new(config: &DeviceKeysConfig) -> Result<Self, ConfigError> {
        if config.devices.is_empty() && config.registry.is_none() {
            return Err(at(
                "device_keys".into(),
                "give devices (key digests), a registry, or both",
            ));
        }
        let mut devices = BTreeMap::new();
        for (id, entry) in &config.devices {
            let path = format!("device_keys.devices.{id}");
            if id.is_empty() || id.chars().any(|c| c.is_control() || c == ',') {
                return Err(at(path, format!("invalid device id {id:?}")));
            }
            if entry.key_sha256.is_empty() {
                return Err(at(format!("{path}.key_sha256"), "no key_sha256"));
            }
            let digests = entry
                .key_sha256
                .iter()
                .enumerate()
                .map(|(i, h)| {
                    parse_digest(h).ok_or_else(|| {
                        at(format!("{path}.key_sha256[{i}]"), "must be 64 hex digits")
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            devices.insert(id.clone(), digests);
        }
        let registry = config
            .registry
            .clone()
            .map(DeviceRegistry::new)
            .transpose()?;
        Ok(DeviceKeys {
            devices,
            roles: config.roles.clone(),
            registry,
        })
    }

    /// Whether `device_id` is listed in the configuration.
    pub fn knows(&self, device_id: &str) -> bool {
        self.devices.contains_key(device_id)
    }

    /// Whether a credential with this device id is this table's to verify: listed, or any id
    /// when a registry is configured.
    pub fn takes(&self, device_id: &str) -> bool {
        self.knows(device_id) || self.registry.is_some()
    }

    pub fn registry(&self) -> Option<&DeviceRegistry> {
        self.registry.as_ref()
    }

    fn identity(&self, device_id: &str, extra_roles: &[String]) -> Identity {
        let mut identity = Identity::new(IdentityKind::DeviceKey, device_id);
        identity.roles = self.roles.clone();
        for role in extra_roles {
            if !identity.roles.contains(role) {
                identity.roles.push(role.clone());
            }
        }
        identity
    }

    /// The device's identity if `key` is one of its configured keys. Unknown devices and wrong
    /// keys are indistinguishable to the caller. (The configuration only; see [`Self::check`].)
    pub fn verify(&self, device_id: &str, key: &str) -> Option<Identity> {
        let digests = self.devices.get(device_id)?;
        key_matches(digests, key).then(|| self.identity(device_id, &[]))
    }

    /// Checks a device's key: against the configuration if it lists the device, else against
    /// what the registry said (cached), else says which lookup to make.
    pub fn check(&self, device_id: &str, key: &str, now: u64) -> KeyCheck {
        if self.knows(device_id) {
            return match self.verify(device_id, key) {
                Some(identity) => KeyCheck::Verified(identity),
                None => KeyCheck::Refused(invalid_key()),
            };
        }
        let Some(registry) = &self.registry else {
            return KeyCheck::Refused(invalid_key());
        };
        if !valid_device_id(device_id) {
            return KeyCheck::Refused(DenyReason::Unauthenticated("invalid device id".into()));
        }
        match registry.cached(device_id, now) {
            Some(result) => self.check_record(&result, device_id, key),
            None => KeyCheck::Lookup {
                device_id: device_id.to_string(),
                call: registry.call(device_id),
            },
        }
    }

    /// Decides the registry's answer about `device_id` (`status` 0: no answer) and caches it;
    /// every request waiting on the lookup then checks its key with [`Self::check_record`].
    pub fn finish_lookup(
        &self,
        device_id: &str,
        status: u32,
        body: &[u8],
        now: u64,
    ) -> crate::device_registry::LookupDecision {
        match &self.registry {
            Some(registry) => registry.remember(device_id, status, body, now),
            None => crate::device_registry::LookupDecision {
                result: Err(DenyReason::Unavailable(
                    "no device registry is configured".into(),
                )),
                malformed: false,
            },
        }
    }

    /// Checks `key` against what the registry said about `device_id` (a lookup result is never
    /// a `Lookup`).
    pub fn check_record(&self, result: &LookupResult, device_id: &str, key: &str) -> KeyCheck {
        match result {
            Ok(DeviceRecord { digests, roles }) if key_matches(digests, key) => {
                KeyCheck::Verified(self.identity(device_id, roles))
            }
            Ok(_) => KeyCheck::Refused(invalid_key()),
            Err(reason) => KeyCheck::Refused(reason.clone()),
        }
    }

    /// As [`Self::check_record`], for a key known by its digest ([`key_digest`]): a
    /// connection's re-check of the key it was admitted with.
    pub fn check_record_digest(
        &self,
        result: &LookupResult,
        device_id: &str,
        digest: &[u8; 32],
    ) -> KeyCheck {
        match result {
            Ok(DeviceRecord { digests, roles }) if digest_matches(digests, digest) => {
                KeyCheck::Verified(self.identity(device_id, roles))
            }
            Ok(_) => KeyCheck::Refused(invalid_key()),
            Err(reason) => KeyCheck::Refused(reason.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(key: &str) -> String {
        Sha256::digest(key.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn keys() -> DeviceKeys {
        let json = format!(
            r#"{{"devices": {{"lamp-01": {{"key_sha256": ["{}", "{}"]}}}}}}"#,
            sha("k1-old"),
            sha("k1-new")
        );
        DeviceKeys::new(&serde_json::from_str(&json).unwrap()).unwrap()
    }

    #[test]
    fn accepts_either_key_of_a_rotation() {
        let k = keys();
        let id = k.verify("lamp-01", "k1-new").unwrap();
        assert_eq!(id.subject, "lamp-01");
        assert_eq!(id.kind, IdentityKind::DeviceKey);
        assert!(id.has_role("device"));
        assert!(k.verify("lamp-01", "k1-old").is_some());
    }

    #[test]
    fn refuses_wrong_keys_and_unknown_devices() {
        let k = keys();
        assert!(k.verify("lamp-01", "k1").is_none());
        assert!(k.verify("lamp-01", "").is_none());
        assert!(k.verify("lamp-02", "k1-new").is_none());
        assert!(k.verify("LAMP-01", "k1-new").is_none(), "ids are exact");
    }

    #[test]
    fn bad_configuration_says_what_is_wrong() {
        let bad = |json: &str| DeviceKeys::new(&serde_json::from_str(json).unwrap()).unwrap_err();
        assert!(bad(r#"{"devices": {}}"#).detail().contains("devices"));
        assert_eq!(
            bad(r#"{"devices": {"d": {"key_sha256": []}}}"#).detail(),
            "device_keys.devices.d.key_sha256: no key_sha256"
        );
        assert_eq!(
            bad(r#"{"devices": {"d": {"key_sha256": ["abc"]}}}"#).detail(),
            "device_keys.devices.d.key_sha256[0]: must be 64 hex digits"
        );
        assert!(serde_json::from_str::<DeviceKeysConfig>(r#"{"devices": {}, "x": 1}"#).is_err());
    }

    fn with_registry() -> DeviceKeys {
        let json = format!(
            r#"{{"devices": {{"lamp-01": {{"key_sha256": ["{}"]}}}},
                "registry": {{"cluster": "iot-directory", "authority": "iotdirectory",
                              "path": "/device-keys"}}}}"#,
            sha("k1-static")
        );
        DeviceKeys::new(&serde_json::from_str(&json).unwrap()).unwrap()
    }

    #[test]
    fn listed_devices_are_never_looked_up() {
        let k = with_registry();
        assert!(matches!(
            k.check("lamp-01", "k1-static", 0),
            KeyCheck::Verified(_)
        ));
        assert!(matches!(
            k.check("lamp-01", "k1-other", 0),
            KeyCheck::Refused(DenyReason::Unauthenticated(_))
        ));
        assert!(k.takes("lamp-02") && !k.knows("lamp-02"));
    }

    #[test]
    fn other_devices_are_looked_up_then_checked_from_the_cache() {
        let k = with_registry();
        let KeyCheck::Lookup { device_id, call } = k.check("lamp-02", "k2", 100) else {
            panic!("not a lookup");
        };
        assert_eq!(device_id, "lamp-02");
        assert_eq!(call.path, "/device-keys?id=lamp-02");
        let answer = format!(
            r#"{{"id": "lamp-02", "key_sha256": ["{}"], "roles": ["lamp", "device"]}}"#,
            sha("k2")
        );
        let decided = k.finish_lookup("lamp-02", 200, answer.as_bytes(), 100);
        match k.check_record(&decided.result, "lamp-02", "k2") {
            KeyCheck::Verified(identity) => {
                assert_eq!(identity.subject, "lamp-02");
                assert_eq!(identity.kind, IdentityKind::DeviceKey);
                assert_eq!(
                    identity.roles,
                    vec!["device".to_string(), "lamp".to_string()]
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            k.check("lamp-02", "k2", 101),
            KeyCheck::Verified(_)
        ));
        assert!(matches!(
            k.check("lamp-02", "wrong", 101),
            KeyCheck::Refused(DenyReason::Unauthenticated(_))
        ));
        // After the positive TTL (60 s by default) the registry is asked again.
        assert!(matches!(
            k.check("lamp-02", "k2", 160),
            KeyCheck::Lookup { .. }
        ));
    }

    #[test]
    fn unknown_devices_are_401_and_a_registry_down_503() {
        let k = with_registry();
        let unknown = k.finish_lookup("ghost", 404, b"", 100);
        assert!(matches!(
            k.check_record(&unknown.result, "ghost", "k"),
            KeyCheck::Refused(DenyReason::Unauthenticated(_))
        ));
        assert!(matches!(
            k.check("ghost", "k", 101),
            KeyCheck::Refused(DenyReason::Unauthenticated(_))
        ));
        let down = k.finish_lookup("lamp-03", 0, b"", 100);
        assert!(matches!(
            k.check_record(&down.result, "lamp-03", "k"),
            KeyCheck::Refused(DenyReason::Unavailable(_))
        ));
        assert!(matches!(
            k.check("lamp-03", "k", 100),
            KeyCheck::Lookup { .. }
        ));
        assert!(matches!(
            k.check("bad\nid", "k", 100),
            KeyCheck::Refused(DenyReason::Unauthenticated(_))
        ));
        assert!(matches!(
            k.check("bad\u{7}id", "k", 100),
            KeyCheck::Refused(DenyReason::Unauthenticated(_))
        ));
    }

    #[test]
    fn a_registry_alone_is_enough() {
        let json = r#"{"registry": {"cluster": "c", "authority": "a", "path": "/k"}}"#;
        assert!(DeviceKeys::new(&serde_json::from_str(json).unwrap()).is_ok());
        let bad = r#"{"registry": {"cluster": "c", "authority": "a", "path": "/k",
                      "cache": {"positive_ttl_s": 86400}}}"#;
        let err = DeviceKeys::new(&serde_json::from_str(bad).unwrap()).unwrap_err();
        assert_eq!(
            err,
            ConfigError::At {
                path: "device_keys.registry.cache.positive_ttl_s".into(),
                message: err.detail().split_once(": ").unwrap().1.to_string()
            }
        );
    }
}
