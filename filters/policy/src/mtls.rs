//! Identity from a client certificate, as Envoy exposes it (`connection.subject_peer_certificate`
//! in RFC 2253 form, the first URI and DNS SANs) — what thin-edge and Mosquitto's
//! `use_identity_as_username` do with a device certificate.

use serde::Deserialize;

use crate::identity::{Identity, IdentityKind};

/// Which part of the certificate names the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CertificateName {
    /// The subject's common name (`CN=lamp-01,O=Acme` → `lamp-01`).
    SubjectCn,
    /// The first URI SAN (e.g. `spiffe://city/devices/lamp-01`).
    UriSan,
    /// The first DNS SAN.
    DnsSan,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MtlsConfig {
    pub identity_from: CertificateName,
    /// Only names with this prefix are accepted, and the prefix is removed
    /// (e.g. `spiffe://city/devices/`).
    #[serde(default)]
    pub strip_prefix: Option<String>,
    /// Roles every certificate identity gets (e.g. `device`).
    #[serde(default)]
    pub roles: Vec<String>,
}

/// What Envoy says about the peer certificate of the connection.
#[derive(Debug, Clone, Default)]
pub struct PeerCertificate {
    pub subject: Option<String>,
    pub uri_san: Option<String>,
    pub dns_san: Option<String>,
}

/// The common name of an RFC 2253 subject. Escaped commas (`\,`) stay in the value; a subject
/// with several CNs is ambiguous and yields none.
pub fn subject_common_name(subject: &str) -> Option<String> {
    let mut names = Vec::new();
    let mut current = String::new();
    let mut escaped = false;
    let mut parts = Vec::new();
    for c in subject.chars() {
        match c {
            _ if escaped => {
                current.push(c);
                escaped = false;
            }
            '\\' => escaped = true,
            ',' | '+' => parts.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    parts.push(current);
    for part in parts {
        if let Some((key, value)) = part.split_once('=') {
            if key.trim().eq_ignore_ascii_case("CN") {
                names.push(value.trim().to_string());
            }
        }
    }
    match names.as_slice() {
        [one] if !one.is_empty() => Some(one.clone()),
        _ => None,
    }
}

impl MtlsConfig {
    /// The identity a verified client certificate proves, or None if the configured name is
    /// missing, empty or outside the accepted prefix.
    pub fn identity(&self, cert: &PeerCertificate) -> Option<Identity> {
        let name = match self.identity_from {
            CertificateName::SubjectCn => cert.subject.as_deref().and_then(subject_common_name),
            CertificateName::UriSan => cert.uri_san.clone(),
            CertificateName::DnsSan => cert.dns_san.clone(),
        }?;
        let name = match &self.strip_prefix {
            Some(prefix) => name.strip_prefix(prefix.as_str())?.to_string(),
            None => name,
        };
        if name.is_empty() || name.chars().any(char::is_control) {
            return None;
        }
        let mut identity = Identity::new(IdentityKind::ClientCertificate, name);
        identity.roles = self.roles.clone();
        Some(identity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_name_from_rfc2253_subjects() {
        assert_eq!(
            subject_common_name("CN=lamp-01,O=Acme"),
            Some("lamp-01".into())
        );
        assert_eq!(
            subject_common_name("O=Acme,CN=lamp-01"),
            Some("lamp-01".into())
        );
        assert_eq!(
            subject_common_name("cn = lamp-01 , O=Acme"),
            Some("lamp-01".into())
        );
        assert_eq!(
            subject_common_name(r"CN=lamp\,01,O=Acme"),
            Some("lamp,01".into()),
            "an escaped comma is part of the name"
        );
        assert_eq!(subject_common_name("O=Acme"), None);
        assert_eq!(
            subject_common_name("CN=a,CN=b"),
            None,
            "two CNs are ambiguous"
        );
        assert_eq!(subject_common_name("CN=,O=Acme"), None);
        assert_eq!(
            subject_common_name("OU=CN=evil,CN=lamp-01"),
            Some("lamp-01".into()),
            "a value that contains CN= is not a CN"
        );
    }

    #[test]
    fn identity_by_configured_name_and_prefix() {
        let cert = PeerCertificate {
            subject: Some("CN=lamp-01,O=Acme".into()),
            uri_san: Some("spiffe://city/devices/lamp-01".into()),
            dns_san: None,
        };
        let by_cn = MtlsConfig {
            identity_from: CertificateName::SubjectCn,
            strip_prefix: None,
            roles: vec!["device".into()],
        };
        let id = by_cn.identity(&cert).unwrap();
        assert_eq!(id.subject, "lamp-01");
        assert_eq!(id.kind, IdentityKind::ClientCertificate);
        assert!(id.has_role("device"));

        let by_uri = MtlsConfig {
            identity_from: CertificateName::UriSan,
            strip_prefix: Some("spiffe://city/devices/".into()),
            roles: vec![],
        };
        assert_eq!(by_uri.identity(&cert).unwrap().subject, "lamp-01");
        let foreign = PeerCertificate {
            uri_san: Some("spiffe://other/devices/lamp-01".into()),
            ..cert.clone()
        };
        assert!(by_uri.identity(&foreign).is_none(), "outside the prefix");
        let by_dns = MtlsConfig {
            identity_from: CertificateName::DnsSan,
            strip_prefix: None,
            roles: vec![],
        };
        assert!(by_dns.identity(&cert).is_none(), "no DNS SAN");
    }
}
