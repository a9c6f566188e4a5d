//! The request headers that carry the caller's identity to the broker and to the later filters.
//! Names default to FIWARE Wilma's (`X-Nick-Name`, `X-Display-Name`, `X-Roles`,
//! `X-Organizations`, `X-App-Id`, `X-Eidas-Profile`); the subject header is what
//! device-ownership and entity-acl read. token-auth removes every one of them from the client's
//! request before setting its own.
//!
//! Two value formats ([`HeaderFormat`]): `list` (the default) sends role and organization names
//! comma-separated and percent-encoded; `wilma` sends what Wilma (ging/fiware-pep-proxy,
//! `setHeaders`) sends, so backends written for Wilma keep working: `X-Roles` and
//! `X-Organizations` as JSON arrays of objects (`[{"id", "name"}]`, organizations with their
//! `roles`), always present (`[]` when empty), `X-Display-Name` always present (empty when
//! unknown), `X-App-Id` and `X-Eidas-Profile` (JSON) when known. Keyrock's own objects are sent
//! as Keyrock gave them; for other IdPs, which name roles without ids, `id` is the name.

use serde::Deserialize;
use serde_json::Value;

use crate::identity::{Identity, IdentityKind};

/// How role, organization and profile values are written (see the module documentation).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HeaderFormat {
    /// Names, comma-separated, percent-encoded.
    #[default]
    List,
    /// FIWARE Wilma's JSON values.
    Wilma,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityHeaderNames {
    /// The value format: `list` (default) or `wilma`.
    pub format: HeaderFormat,
    /// The stable subject the other filters key on.
    pub subject: String,
    /// How the caller authenticated: jwt, opaque_token, device_key, client_certificate.
    pub kind: String,
    /// Wilma's nickname header (the subject).
    pub nick_name: String,
    pub display_name: String,
    pub roles: String,
    pub organizations: String,
    pub tenant: String,
    /// The client the credential was issued to (Wilma's `X-App-Id`).
    pub app_id: String,
    /// Keyrock's eIDAS profile, JSON (Wilma's `X-Eidas-Profile`).
    pub eidas_profile: String,
}

impl Default for IdentityHeaderNames {
    fn default() -> Self {
        IdentityHeaderNames {
            subject: "x-auth-subject".into(),
            kind: "x-auth-kind".into(),
            nick_name: "x-nick-name".into(),
            display_name: "x-display-name".into(),
            roles: "x-roles".into(),
            organizations: "x-organizations".into(),
            tenant: "x-auth-tenant".into(),
            app_id: "x-app-id".into(),
            eidas_profile: "x-eidas-profile".into(),
            format: HeaderFormat::default(),
        }
    }
}

/// Header names must be plain lowercase tokens: no pseudo-headers, nothing that changes how
/// the request is routed or authenticated.
fn check_name(name: &str) -> Result<(), String> {
    const RESERVED: [&str; 8] = [
        "authorization",
        "x-auth-token",
        "host",
        "content-length",
        "content-type",
        "transfer-encoding",
        "connection",
        "cookie",
    ];
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !valid {
        return Err(format!(
            "identity header name {name:?} must be lowercase letters, digits, '-' or '_'"
        ));
    }
    if RESERVED.contains(&name) {
        return Err(format!("identity header name {name:?} is reserved"));
    }
    Ok(())
}

impl IdentityHeaderNames {
    /// Whether `name` is one of the identity headers.
    pub fn contains(&self, name: &str) -> bool {
        self.all().iter().any(|h| h.eq_ignore_ascii_case(name))
    }

    pub fn all(&self) -> [&str; 9] {
        [
            &self.subject,
            &self.kind,
            &self.nick_name,
            &self.display_name,
            &self.roles,
            &self.organizations,
            &self.tenant,
            &self.app_id,
            &self.eidas_profile,
        ]
    }

    pub fn validate(&self) -> Result<(), String> {
        let all = self.all();
        for (i, name) in all.iter().enumerate() {
            check_name(name)?;
            if all[..i].contains(name) {
                return Err(format!("identity header name {name:?} is used twice"));
            }
        }
        Ok(())
    }

    /// The headers to set for an identity. Absent facts produce no header.
    pub fn render(&self, identity: &Identity) -> Vec<(String, String)> {
        let kind = identity.kind.as_str();
        let mut out = vec![
            (self.subject.clone(), encode_value(&identity.subject, false)),
            (self.kind.clone(), kind.to_string()),
            (
                self.nick_name.clone(),
                encode_value(&identity.subject, false),
            ),
        ];
        match self.format {
            HeaderFormat::List => {
                if let Some(name) = &identity.display_name {
                    out.push((self.display_name.clone(), encode_value(name, false)));
                }
                if !identity.roles.is_empty() {
                    out.push((self.roles.clone(), encode_list(&identity.roles)));
                }
                if !identity.groups.is_empty() {
                    out.push((self.organizations.clone(), encode_list(&identity.groups)));
                }
            }
            HeaderFormat::Wilma => {
                let display_name = identity.display_name.as_deref().unwrap_or_default();
                out.push((self.display_name.clone(), encode_value(display_name, false)));
                let (roles, organizations) = match &identity.keyrock {
                    Some(k) => (k.roles.clone(), k.organizations.clone()),
                    None => (
                        wilma_objects(&identity.roles, None),
                        wilma_objects(&identity.groups, Some(&[])),
                    ),
                };
                out.push((self.roles.clone(), roles));
                out.push((self.organizations.clone(), organizations));
                if let Some(profile) = identity
                    .keyrock
                    .as_ref()
                    .and_then(|k| k.eidas_profile.clone())
                {
                    out.push((self.eidas_profile.clone(), profile));
                }
            }
        }
        if let Some(app_id) = &identity.app_id {
            out.push((self.app_id.clone(), encode_value(app_id, false)));
        }
        if let Some(tenant) = &identity.tenant {
            out.push((self.tenant.clone(), encode_value(tenant, false)));
        }
        out
    }
}

impl IdentityHeaderNames {
    /// Reads back the identity token-auth set, for the filters after it, from the request
    /// headers (names lowercase, repeats kept). No subject header means no identity (a public
    /// route token-auth let through). A repeated identity header, a kind this crate does not
    /// know or a value that does not decode is an error (the filter answers 400): these
    /// headers only ever come from token-auth, which sets each once.
    pub fn parse(&self, headers: &[(String, String)]) -> Result<Option<Identity>, String> {
        // The one value of an identity header, still encoded.
        let raw = |name: &str| -> Result<Option<&str>, String> {
            let mut values = headers.iter().filter(|(k, _)| k == name).map(|(_, v)| v);
            match (values.next(), values.next()) {
                (None, _) => Ok(None),
                (Some(v), None) => Ok(Some(v.as_str())),
                (Some(_), Some(_)) => Err(format!("identity header {name} is repeated")),
            }
        };
        let single = |name: &str| -> Result<Option<String>, String> {
            raw(name)?
                .map(|v| {
                    decode_value(v).ok_or_else(|| format!("identity header {name} does not decode"))
                })
                .transpose()
        };
        let list = |name: &str| -> Result<Vec<String>, String> {
            let Some(raw) = raw(name)? else {
                return Ok(Vec::new());
            };
            if self.format == HeaderFormat::Wilma {
                return wilma_names(raw)
                    .ok_or_else(|| format!("identity header {name} is not Wilma's JSON"));
            }
            raw.split(',')
                .filter(|item| !item.is_empty())
                .map(|item| {
                    decode_value(item)
                        .ok_or_else(|| format!("identity header {name} does not decode"))
                })
                .collect()
        };
        let Some(subject) = single(&self.subject)? else {
            return Ok(None);
        };
        if subject.is_empty() {
            return Err(format!("identity header {} is empty", self.subject));
        }
        let kind = match single(&self.kind)?.as_deref() {
            Some("jwt") => IdentityKind::Jwt,
            Some("opaque_token") => IdentityKind::OpaqueToken,
            Some("device_key") => IdentityKind::DeviceKey,
            Some("client_certificate") => IdentityKind::ClientCertificate,
            Some(other) => {
                return Err(format!(
                    "identity header {}: unknown kind {other:?}",
                    self.kind
                ))
            }
            None => return Err(format!("identity header {} is missing", self.kind)),
        };
        let mut identity = Identity::new(kind, subject);
        identity.display_name = single(&self.display_name)?;
        identity.roles = list(&self.roles)?;
        identity.groups = list(&self.organizations)?;
        if self.format == HeaderFormat::Wilma {
            // Roles held through an organization count as the user's (Keyrock's own PDP
            // decides on both), as they did in token-auth.
            let through_organizations = raw(&self.organizations)?
                .and_then(wilma_organization_roles)
                .unwrap_or_default();
            for role in through_organizations {
                if !identity.roles.contains(&role) {
                    identity.roles.push(role);
                }
            }
            // Wilma sends an empty display name rather than none.
            identity.display_name = identity.display_name.filter(|n| !n.is_empty());
        }
        identity.tenant = single(&self.tenant)?;
        identity.app_id = single(&self.app_id)?;
        Ok(Some(identity))
    }
}

/// The inverse of [`encode_value`]: `None` for a bad escape or bytes that are not UTF-8.
pub fn decode_value(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Percent-encodes what must not appear raw in a header value: control characters, `%`
/// itself (so decoding is exact), and in list items the `,` separator. A claim value can never
/// inject a header or an extra list item.
pub fn encode_value(value: &str, in_list: bool) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if c.is_control() || c == '%' || (in_list && c == ',') {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Wilma's JSON for names without ids (`id` = name); organizations get `roles` when given.
fn wilma_objects(names: &[String], organization_roles: Option<&[Value]>) -> String {
    let items: Vec<Value> = names
        .iter()
        .map(|n| match organization_roles {
            None => serde_json::json!({"id": n, "name": n}),
            Some(roles) => serde_json::json!({"id": n, "name": n, "roles": roles}),
        })
        .collect();
    crate::introspection::ascii_json(&Value::Array(items))
}

/// The `name`s of a Wilma JSON array of objects; `None` if it is not one.
fn wilma_names(raw: &str) -> Option<Vec<String>> {
    let items: Vec<Value> = serde_json::from_str(raw).ok()?;
    items
        .iter()
        .map(|item| item.get("name")?.as_str().map(str::to_string))
        .collect()
}

/// The role names inside Wilma's organizations JSON.
fn wilma_organization_roles(raw: &str) -> Option<Vec<String>> {
    let items: Vec<Value> = serde_json::from_str(raw).ok()?;
    let mut names = Vec::new();
    for org in &items {
        if let Some(roles) = org.get("roles") {
            names.extend(wilma_names(&roles.to_string())?);
        }
    }
    Some(names)
}

fn encode_list(items: &[String]) -> String {
    items
        .iter()
        .map(|i| encode_value(i, true))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilma_compatible_defaults() {
        let names = IdentityHeaderNames::default();
        assert!(names.validate().is_ok());
        let mut id = Identity::new(IdentityKind::OpaqueToken, "alice");
        id.display_name = Some("Alice A.".into());
        id.roles = vec!["admin".into(), "operator".into()];
        id.groups = vec!["city-a".into()];
        let h = names.render(&id);
        let get = |n: &str| h.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(get("x-nick-name"), Some("alice"));
        assert_eq!(get("x-auth-subject"), Some("alice"));
        assert_eq!(get("x-display-name"), Some("Alice A."));
        assert_eq!(get("x-roles"), Some("admin,operator"));
        assert_eq!(get("x-organizations"), Some("city-a"));
        assert_eq!(get("x-auth-kind"), Some("opaque_token"));
        assert_eq!(get("x-auth-tenant"), None);
    }

    #[test]
    fn claim_values_cannot_inject_headers_or_list_items() {
        let mut id = Identity::new(IdentityKind::Jwt, "eve\r\nx-roles: admin");
        id.roles = vec!["user,admin".into(), "50%".into()];
        let h = IdentityHeaderNames::default().render(&id);
        for (_, v) in &h {
            assert!(!v.chars().any(char::is_control), "{v:?}");
        }
        let roles = &h.iter().find(|(k, _)| k == "x-roles").unwrap().1;
        assert_eq!(roles, "user%2Cadmin,50%25");
        assert_eq!(roles.split(',').count(), 2);
    }

    fn parse_from(headers: &[(String, String)]) -> Result<Option<Identity>, String> {
        IdentityHeaderNames::default().parse(headers)
    }

    #[test]
    fn parse_reads_back_what_render_wrote() {
        let mut id = Identity::new(IdentityKind::Jwt, "eve%\r\n,x");
        id.display_name = Some("Eve, the 100%".into());
        id.roles = vec!["user,admin".into(), "50%".into()];
        id.groups = vec!["city-a".into()];
        id.tenant = Some("smartcity".into());
        let h = IdentityHeaderNames::default().render(&id);
        assert_eq!(parse_from(&h).unwrap(), Some(id));
    }

    #[test]
    fn parse_without_subject_is_no_identity_and_rejects_tampering() {
        assert_eq!(parse_from(&[]).unwrap(), None);
        let h = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let twice = h(&[
            ("x-auth-subject", "a"),
            ("x-auth-subject", "b"),
            ("x-auth-kind", "jwt"),
        ]);
        assert!(parse_from(&twice).unwrap_err().contains("repeated"));
        let no_kind = h(&[("x-auth-subject", "a")]);
        assert!(parse_from(&no_kind).unwrap_err().contains("missing"));
        let odd_kind = h(&[("x-auth-subject", "a"), ("x-auth-kind", "root")]);
        assert!(parse_from(&odd_kind).unwrap_err().contains("unknown kind"));
        let bad_escape = h(&[("x-auth-subject", "a%G1"), ("x-auth-kind", "jwt")]);
        assert!(parse_from(&bad_escape).unwrap_err().contains("decode"));
        let roles_twice = h(&[
            ("x-auth-subject", "a"),
            ("x-auth-kind", "jwt"),
            ("x-roles", "x"),
            ("x-roles", "admin"),
        ]);
        assert!(parse_from(&roles_twice).unwrap_err().contains("repeated"));
    }

    fn wilma() -> IdentityHeaderNames {
        IdentityHeaderNames {
            format: HeaderFormat::Wilma,
            ..Default::default()
        }
    }

    #[test]
    fn wilma_format_sends_keyrocks_json_as_wilma_does() {
        let user = crate::introspection::KeyrockUser::parse(
            br#"{"id": "u-1", "app_id": "app-9", "displayName": "",
                 "username": "alice", "roles": [{"id": "r1", "name": "admin"}],
                 "organizations": [{"id": "o1", "name": "City", "description": "d",
                                    "roles": [{"id": "r2", "name": "operator"}]}],
                 "eidas_profile": {}}"#,
        )
        .unwrap();
        let h = wilma().render(&user.to_identity());
        let get = |n: &str| h.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(get("x-nick-name"), Some("u-1"));
        assert_eq!(get("x-roles"), Some(r#"[{"id":"r1","name":"admin"}]"#));
        assert_eq!(
            get("x-organizations"),
            Some(r#"[{"id":"o1","name":"City","roles":[{"id":"r2","name":"operator"}]}]"#)
        );
        assert_eq!(get("x-app-id"), Some("app-9"));
        assert_eq!(get("x-eidas-profile"), Some("{}"));
        // The same values as the Wilma header builder of the introspection module.
        for (name, value) in user.wilma_headers() {
            if name != "x-display-name" {
                assert_eq!(get(name), Some(value.as_str()), "{name}");
            }
        }
        // Read back by the later filters: roles held through organizations count.
        let back = wilma().parse(&h).unwrap().unwrap();
        assert_eq!(back.subject, "u-1");
        assert_eq!(back.roles, vec!["admin".to_string(), "operator".into()]);
        assert_eq!(back.groups, vec!["City".to_string()]);
        assert_eq!(back.app_id.as_deref(), Some("app-9"));
    }

    #[test]
    fn wilma_format_for_identities_without_role_ids() {
        let mut id = Identity::new(IdentityKind::Jwt, "5f0c-alice");
        id.roles = vec!["operator".into(), "caf\u{e9}\"x".into()];
        let h = wilma().render(&id);
        let get = |n: &str| h.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(
            get("x-roles"),
            Some(
                r#"[{"id":"operator","name":"operator"},{"id":"caf\u00e9\"x","name":"caf\u00e9\"x"}]"#
            )
        );
        // Always sent, as Wilma does: empty arrays and an empty display name.
        assert_eq!(get("x-organizations"), Some("[]"));
        assert_eq!(get("x-display-name"), Some(""));
        assert_eq!(get("x-app-id"), None);
        assert_eq!(get("x-eidas-profile"), None);
        for (_, v) in &h {
            assert!(v.is_ascii() && !v.chars().any(char::is_control), "{v:?}");
        }
        let back = wilma().parse(&h).unwrap().unwrap();
        assert_eq!(back.roles, id.roles);
        assert_eq!(back.display_name, None);
        // A list-format value where JSON is expected does not decode.
        let mut bad = h.clone();
        for (k, v) in bad.iter_mut() {
            if k == "x-roles" {
                *v = "admin".into();
            }
        }
        assert!(wilma()
            .parse(&bad)
            .unwrap_err()
            .contains("not Wilma's JSON"));
    }

    #[test]
    fn the_wilma_names_are_identity_headers() {
        let names = IdentityHeaderNames::default();
        for n in [
            "x-app-id",
            "x-eidas-profile",
            "x-nick-name",
            "x-organizations",
        ] {
            assert!(names.contains(n), "{n}");
        }
    }

    #[test]
    fn bad_names_are_refused() {
        let mut names = IdentityHeaderNames {
            roles: "X-Roles".into(),
            ..Default::default()
        };
        assert!(names.validate().unwrap_err().contains("lowercase"));
        names.roles = "authorization".into();
        assert!(names.validate().unwrap_err().contains("reserved"));
        names.roles = "x-nick-name".into();
        assert!(names.validate().unwrap_err().contains("twice"));
        names.roles = ":path".into();
        assert!(names.validate().is_err());
    }
}
