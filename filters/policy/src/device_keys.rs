//! Device key pairs (Snap4city's K1/K2): a device presents its id and a secret key. The
//! configuration holds only SHA-256 digests of the keys, so a leaked configuration does not
//! leak keys; comparison is constant-time.

use std::collections::BTreeMap;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::identity::{Identity, IdentityKind};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceKeysConfig {
    /// Device id → its key digests.
    pub devices: BTreeMap<String, DeviceEntry>,
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

/// A validated set of device keys.
#[derive(Debug, Clone)]
pub struct DeviceKeys {
    devices: BTreeMap<String, Vec<[u8; 32]>>,
    roles: Vec<String>,
}

fn parse_digest(hex: &str) -> Option<[u8; 32]> {
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

impl DeviceKeys {
    pub fn new(config: &DeviceKeysConfig) -> Result<Self, String> {
        if config.devices.is_empty() {
            return Err("device_keys.devices is empty".into());
        }
        let mut devices = BTreeMap::new();
        for (id, entry) in &config.devices {
            if id.is_empty() || id.chars().any(|c| c.is_control() || c == ',') {
                return Err(format!("device_keys: invalid device id {id:?}"));
            }
            if entry.key_sha256.is_empty() {
                return Err(format!("device_keys: device {id} has no key_sha256"));
            }
            let digests = entry
                .key_sha256
                .iter()
                .map(|h| {
                    parse_digest(h).ok_or_else(|| {
                        format!("device_keys: device {id}: key_sha256 must be 64 hex digits")
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            devices.insert(id.clone(), digests);
        }
        Ok(DeviceKeys {
            devices,
            roles: config.roles.clone(),
        })
    }

    /// Whether `device_id` is listed (its credentials are this table's to verify).
    pub fn knows(&self, device_id: &str) -> bool {
        self.devices.contains_key(device_id)
    }

    /// The device's identity if `key` is one of its keys. Unknown devices and wrong keys are
    /// indistinguishable to the caller.
    pub fn verify(&self, device_id: &str, key: &str) -> Option<Identity> {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let digests = self.devices.get(device_id)?;
        let mut matched = subtle::Choice::from(0);
        for known in digests {
            matched |= known.ct_eq(&digest);
        }
        if !bool::from(matched) {
            return None;
        }
        let mut identity = Identity::new(IdentityKind::DeviceKey, device_id);
        identity.roles = self.roles.clone();
        Some(identity)
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
        assert!(bad(r#"{"devices": {}}"#).contains("empty"));
        assert!(bad(r#"{"devices": {"d": {"key_sha256": []}}}"#).contains("no key_sha256"));
        assert!(bad(r#"{"devices": {"d": {"key_sha256": ["abc"]}}}"#).contains("64 hex"));
        assert!(serde_json::from_str::<DeviceKeysConfig>(r#"{"devices": {}, "x": 1}"#).is_err());
    }
}
