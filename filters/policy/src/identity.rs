//! Who is calling, as token-auth establishes it and later filters read it.

use serde::{Deserialize, Serialize};

/// How the caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentityKind {
    /// A user or client with an OIDC/OAuth2 JWT.
    Jwt,
    /// An opaque token checked by introspection (RFC 7662, Keyrock).
    OpaqueToken,
    /// A device with its own key pair.
    DeviceKey,
    /// A client certificate presented over mTLS.
    ClientCertificate,
    /// A user name and password an HTTP auth backend accepted (mqtt-acl's `http_backend`,
    /// mosquitto-go-auth's `user` check).
    HttpBackend,
}

impl IdentityKind {
    /// The kind's snake_case name (`jwt`, `opaque_token`, ...), as serde writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            IdentityKind::Jwt => "jwt",
            IdentityKind::OpaqueToken => "opaque_token",
            IdentityKind::DeviceKey => "device_key",
            IdentityKind::ClientCertificate => "client_certificate",
            IdentityKind::HttpBackend => "http_backend",
        }
    }
}

/// An authenticated caller. Only token-auth creates one; the other filters read it from the
/// identity headers token-auth sets (after removing any copy the client sent).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Identity {
    pub kind: IdentityKind,
    /// The stable subject: `sub`, a username, a device id or a certificate name.
    pub subject: String,
    /// A human-readable name, if the credential carries one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    /// Groups or organizations (Keyrock's organizations, Keycloak's groups).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The client (application) the credential was issued to: a JWT's `azp` (else
    /// `client_id`), an introspection answer's `client_id`, Keyrock's `app_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_id: Option<String>,
    /// What Keyrock said in Wilma's JSON shapes, forwarded as is by the `wilma` header format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyrock: Option<Box<KeyrockJson>>,
    /// Seconds since the epoch after which this identity must not be trusted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

/// Keyrock's own JSON for what Wilma forwards upstream (compact, non-ASCII escaped): the
/// role objects `[{id, name}]`, the organization objects `[{id, name, roles}]` and the eIDAS
/// profile, so a Wilma replacement sends the backend the same values.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KeyrockJson {
    pub roles: String,
    pub organizations: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eidas_profile: Option<String>,
}

impl Identity {
    pub fn new(kind: IdentityKind, subject: impl Into<String>) -> Self {
        Identity {
            kind,
            subject: subject.into(),
            display_name: None,
            roles: Vec::new(),
            groups: Vec::new(),
            tenant: None,
            app_id: None,
            keyrock: None,
            expires_at: None,
        }
    }

    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }

    pub fn in_group(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }

    /// True once `now` (seconds since the epoch) has reached the expiry.
    pub fn is_expired(&self, now: u64) -> bool {
        self.expires_at.is_some_and(|exp| now >= exp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_is_inclusive() {
        let mut id = Identity::new(IdentityKind::Jwt, "alice");
        assert!(!id.is_expired(u64::MAX), "no expiry means not expired");
        id.expires_at = Some(100);
        assert!(!id.is_expired(99));
        assert!(id.is_expired(100));
    }

    #[test]
    fn roles_and_groups_match_exactly() {
        let mut id = Identity::new(IdentityKind::OpaqueToken, "bob");
        id.roles = vec!["admin".into()];
        id.groups = vec!["city-of-a".into()];
        assert!(id.has_role("admin"));
        assert!(!id.has_role("admi"));
        assert!(id.in_group("city-of-a"));
        assert!(!id.in_group("city"));
    }

    #[test]
    fn serializes_without_empty_fields() {
        let id = Identity::new(IdentityKind::DeviceKey, "lamp-01");
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, r#"{"kind":"device_key","subject":"lamp-01"}"#);
        assert_eq!(serde_json::from_str::<Identity>(&json).unwrap(), id);
    }
}

#[cfg(test)]
mod kind_tests {
    use super::IdentityKind;

    #[test]
    fn a_kinds_name_is_its_serde_form() {
        for kind in [
            IdentityKind::Jwt,
            IdentityKind::OpaqueToken,
            IdentityKind::DeviceKey,
            IdentityKind::ClientCertificate,
            IdentityKind::HttpBackend,
        ] {
            assert_eq!(
                serde_json::to_value(kind).unwrap(),
                serde_json::Value::from(kind.as_str())
            );
        }
    }
}
