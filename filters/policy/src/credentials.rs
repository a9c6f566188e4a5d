//! Finding the caller's credential in a request, and refusing requests that are ambiguous about
//! it.
//!
//! The token-auth filter hands [`CredentialConfig::extract`] a [`RequestView`] (the request
//! headers and the `:path`) and gets back either nothing, exactly one [`FoundCredential`] with the
//! source it came from, or a [`DenyReason`].
//!
//! # Sources
//!
//! The configured sources ([`TokenSource`]) are, in any order and any combination:
//!
//! * `bearer`: `Authorization: Bearer <token>` (RFC 6750 §2.1);
//! * `header`: a header whose whole value is the token, `X-Auth-Token` by default (FIWARE Wilma
//!   and Keyrock);
//! * `query`: a query parameter, `access_token` by default (RFC 6750 §2.3; browsers can't set
//!   headers on WebSocket upgrades);
//! * `device_key`: a device id and a device key (Snap4city's K1/K2), both in headers or both in
//!   query parameters, under configurable names.
//!
//! The default is `bearer` then `header: x-auth-token`.
//!
//! # Rules
//!
//! * Every configured source is examined, in the configured order. A credential found in two
//!   places is refused with `400 BadRequest`, even when both copies are equal: an intermediary or
//!   an upstream might read the other one. The order therefore only decides which problem is
//!   reported first; it never lets one source silently win over another.
//! * A header repeated (two `Authorization`, two `X-Auth-Token`, two device-key headers) or a
//!   configured query parameter repeated is `400 BadRequest`. Header names are compared without
//!   regard to case; query parameter names are compared exactly, after percent-decoding
//!   (`access%5Ftoken` *is* `access_token`, `ACCESS_TOKEN` is not).
//! * A token must be non-empty, at most [`MAX_TOKEN_BYTES`] long and match RFC 6750's `b64token`
//!   (`1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`), otherwise
//!   `400 BadRequest` (RFC 6750 §3.1 `invalid_request`). A `+` in a query string is a space
//!   (form encoding), so `access_token=a+b` is the token `a b` and is refused; a real plus must be
//!   sent as `%2B`.
//! * **Decision on non-Bearer `Authorization`:** when `bearer` is a configured source and the
//!   request carries `Authorization` with another scheme (`Basic ...`, `Digest ...`,
//!   `Bearer:xyz`), the answer is `401 Unauthenticated`, not 400. RFC 6750 §3.1 says a request
//!   that "lacks any authentication information" for this scheme — which is what a request
//!   authenticated with another scheme is — gets a 401 challenge *without* an error code; it is
//!   not a malformed request. It is refused rather than ignored even if another source carries a
//!   token, because the foreign `Authorization` header would otherwise be forwarded upstream. An
//!   `Authorization` header that is empty, or is `Bearer` with no token, is `400` (malformed).
//!   When `bearer` is *not* configured, `Authorization` is not looked at.
//! * Only the query of the `:path` is searched: everything before the first `?` is the path and
//!   anything from a `#` on is ignored (a fragment should never reach a proxy; if it does, it is
//!   not a place credentials come from), so `/v2/entities/access_token=x` carries no token.
//! * A device id and a device key must come together: one without the other is `400`. They must
//!   be visible ASCII (no spaces, no control characters), at most [`MAX_DEVICE_FIELD_BYTES`].
//!
//! # Removing credentials before forwarding
//!
//! [`strip_query_params`] and [`FoundCredential::query_params`] / [`FoundCredential::headers`]
//! let the filter remove a credential it has consumed so that it is not forwarded upstream (a
//! token in a URL ends up in upstream access logs).

use std::fmt;

use serde::{Deserialize, Serialize};
use url::form_urlencoded;

use crate::decision::DenyReason;

/// The longest token accepted, in bytes. Large Keycloak access tokens with many roles are a few
/// KiB; anything longer is refused rather than sent to an IdP or hashed.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The longest device id or device key accepted, in bytes.
pub const MAX_DEVICE_FIELD_BYTES: usize = 512;

/// The most sources a configuration may list.
pub const MAX_SOURCES: usize = 8;

/// What the filter sees of the request: header pairs as proxy-wasm gives them (lowercase names,
/// possibly repeated) and the `:path` pseudo-header, query included.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub headers: &'a [(String, String)],
    pub path: &'a str,
}

impl<'a> RequestView<'a> {
    pub fn new(headers: &'a [(String, String)], path: &'a str) -> Self {
        RequestView { headers, path }
    }

    /// Every value of the header `name` (compared without regard to case).
    fn header_values(&self, name: &str) -> Vec<&'a str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// Every decoded value of the query parameter `name` (exact match after percent-decoding).
    fn query_values(&self, name: &str) -> Vec<String> {
        form_urlencoded::parse(raw_query(self.path).as_bytes())
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
            .collect()
    }
}

/// Where a device key pair is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyLocation {
    Header,
    Query,
}

/// One place a credential may come from.
///
/// `{"type": "bearer"}`, `{"type": "header", "name": "x-auth-token"}`,
/// `{"type": "query", "name": "access_token"}`,
/// `{"type": "device_key", "in": "query", "id": "k1", "key": "k2"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "snake_case",
    deny_unknown_fields,
    from = "RawTokenSource"
)]
pub enum TokenSource {
    /// `Authorization: Bearer <token>`.
    Bearer,
    /// A header whose whole value is the token; `x-auth-token` unless named.
    Header {
        #[serde(default = "default_header_name")]
        name: String,
    },
    /// A query parameter; `access_token` unless named.
    Query {
        #[serde(default = "default_query_name")]
        name: String,
    },
    /// A device id and key (Snap4city's K1/K2), both in headers or both in query parameters.
    DeviceKey {
        #[serde(rename = "in")]
        location: KeyLocation,
        /// The header or parameter carrying the device id.
        id: String,
        /// The header or parameter carrying the device key.
        key: String,
    },
}

/// What is deserialized: serde ignores unknown fields of a unit variant of an internally tagged
/// enum (`{"type": "bearer", "nme": "x"}` would pass), so `bearer` is an empty struct here.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum RawTokenSource {
    Bearer {},
    Header {
        #[serde(default = "default_header_name")]
        name: String,
    },
    Query {
        #[serde(default = "default_query_name")]
        name: String,
    },
    DeviceKey {
        #[serde(rename = "in")]
        location: KeyLocation,
        id: String,
        key: String,
    },
}

impl From<RawTokenSource> for TokenSource {
    fn from(raw: RawTokenSource) -> Self {
        match raw {
            RawTokenSource::Bearer {} => TokenSource::Bearer,
            RawTokenSource::Header { name } => TokenSource::Header { name },
            RawTokenSource::Query { name } => TokenSource::Query { name },
            RawTokenSource::DeviceKey { location, id, key } => {
                TokenSource::DeviceKey { location, id, key }
            }
        }
    }
}

fn default_header_name() -> String {
    "x-auth-token".to_string()
}

fn default_query_name() -> String {
    "access_token".to_string()
}

impl TokenSource {
    /// A short label for logs and metrics (`bearer`, `header:x-auth-token`, `query:access_token`,
    /// `device_key:query`).
    pub fn label(&self) -> String {
        match self {
            TokenSource::Bearer => "bearer".to_string(),
            TokenSource::Header { name } => format!("header:{}", name.to_ascii_lowercase()),
            TokenSource::Query { name } => format!("query:{name}"),
            TokenSource::DeviceKey { location, .. } => match location {
                KeyLocation::Header => "device_key:header".to_string(),
                KeyLocation::Query => "device_key:query".to_string(),
            },
        }
    }

    /// The header names this source reads, as configured (any case), without allocating: the
    /// per-request header check asks this for every header of every request.
    fn configured_header_names(&self) -> impl Iterator<Item = &str> {
        let names = match self {
            TokenSource::Bearer => [Some("authorization"), None],
            TokenSource::Header { name } => [Some(name.as_str()), None],
            TokenSource::DeviceKey {
                location: KeyLocation::Header,
                id,
                key,
            } => [Some(id.as_str()), Some(key.as_str())],
            TokenSource::Query { .. } | TokenSource::DeviceKey { .. } => [None, None],
        };
        names.into_iter().flatten()
    }

    /// The header names this source reads, lowercase.
    fn header_names(&self) -> Vec<String> {
        self.configured_header_names()
            .map(str::to_ascii_lowercase)
            .collect()
    }

    /// The query parameter names this source reads.
    fn query_names(&self) -> Vec<String> {
        match self {
            TokenSource::Query { name } => vec![name.clone()],
            TokenSource::DeviceKey {
                location: KeyLocation::Query,
                id,
                key,
            } => vec![id.clone(), key.clone()],
            _ => Vec::new(),
        }
    }
}

/// A credential as presented. `Debug` never prints the secret parts.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// A bearer-style token: a JWT or an opaque token.
    Token(String),
    /// A device id and its key.
    DeviceKey { id: String, key: String },
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Token(t) => write!(f, "Token(<{} bytes>)", t.len()),
            Credential::DeviceKey { id, key } => {
                write!(f, "DeviceKey {{ id: {id:?}, key: <{} bytes> }}", key.len())
            }
        }
    }
}

/// The one credential of a request and where it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundCredential {
    pub credential: Credential,
    pub source: TokenSource,
}

impl FoundCredential {
    /// The headers (lowercase) that carried the credential: remove them before forwarding if the
    /// upstream must not see it.
    pub fn headers(&self) -> Vec<String> {
        self.source.header_names()
    }

    /// The query parameters that carried the credential; see [`strip_query_params`].
    pub fn query_params(&self) -> Vec<String> {
        self.source.query_names()
    }

    /// The `:path` without the query parameters that carried this credential (unchanged if it
    /// came from a header).
    pub fn strip_from_path(&self, path: &str) -> String {
        let names = self.query_params();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        strip_query_params(path, &refs)
    }
}

/// An invalid credential configuration, with a message naming the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("credentials: {0}")]
pub struct CredentialConfigError(pub String);

/// Where the token-auth filter looks for credentials.
///
/// ```json
/// {"sources": [{"type": "bearer"}, {"type": "header", "name": "x-auth-token"}]}
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialConfig {
    /// Examined in this order; see the module documentation.
    #[serde(default = "default_sources")]
    pub sources: Vec<TokenSource>,
}

fn default_sources() -> Vec<TokenSource> {
    vec![
        TokenSource::Bearer,
        TokenSource::Header {
            name: default_header_name(),
        },
    ]
}

impl Default for CredentialConfig {
    fn default() -> Self {
        CredentialConfig {
            sources: default_sources(),
        }
    }
}

impl CredentialConfig {
    /// Whether a request header named `name` can carry a credential of these sources (then
    /// token-auth needs it as text).
    pub fn reads_header(&self, name: &str) -> bool {
        self.sources
            .iter()
            .flat_map(TokenSource::configured_header_names)
            .any(|header| name.eq_ignore_ascii_case(header))
    }

    /// Every header any source reads (lowercase, each once): what a public route removes,
    /// so a credential sent there never reaches the broker either.
    pub fn all_header_names(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for name in self.sources.iter().flat_map(TokenSource::header_names) {
            if !out.contains(&name) {
                out.push(name);
            }
        }
        out
    }

    /// `path` without any query parameter a source reads.
    pub fn strip_all_from_path(&self, path: &str) -> String {
        let names: Vec<String> = self
            .sources
            .iter()
            .flat_map(TokenSource::query_names)
            .collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        strip_query_params(path, &refs)
    }

    /// Checks the configuration; the message names the offending source.
    pub fn validate(&self) -> Result<(), CredentialConfigError> {
        let err = |m: String| Err(CredentialConfigError(m));
        if self.sources.is_empty() {
            return err("sources: at least one source is required".into());
        }
        if self.sources.len() > MAX_SOURCES {
            return err(format!(
                "sources: at most {MAX_SOURCES} sources are allowed"
            ));
        }
        let mut headers: Vec<String> = Vec::new();
        let mut params: Vec<String> = Vec::new();
        for (i, source) in self.sources.iter().enumerate() {
            let at = format!("sources[{i}] ({})", source.label());
            match source {
                TokenSource::Bearer => {}
                TokenSource::Header { name } => {
                    check_header_name(name)
                        .map_err(|m| CredentialConfigError(format!("{at}: {m}")))?;
                    if name.eq_ignore_ascii_case("authorization") {
                        return err(format!(
                            "{at}: use {{\"type\": \"bearer\"}} for the Authorization header"
                        ));
                    }
                }
                TokenSource::Query { name } => {
                    check_param_name(name)
                        .map_err(|m| CredentialConfigError(format!("{at}: {m}")))?;
                }
                TokenSource::DeviceKey { location, id, key } => {
                    for (field, name) in [("id", id), ("key", key)] {
                        let checked = match location {
                            KeyLocation::Header => check_header_name(name),
                            KeyLocation::Query => check_param_name(name),
                        };
                        checked
                            .map_err(|m| CredentialConfigError(format!("{at}: {field}: {m}")))?;
                        if *location == KeyLocation::Header
                            && name.eq_ignore_ascii_case("authorization")
                        {
                            return err(format!(
                                "{at}: {field}: the Authorization header can't carry a device key"
                            ));
                        }
                    }
                    let same = match location {
                        KeyLocation::Header => id.eq_ignore_ascii_case(key),
                        KeyLocation::Query => id == key,
                    };
                    if same {
                        return err(format!("{at}: id and key must be different names"));
                    }
                }
            }
            for h in source.header_names() {
                if headers.contains(&h) {
                    return err(format!("{at}: header {h:?} is read by two sources"));
                }
                headers.push(h);
            }
            for p in source.query_names() {
                if params.contains(&p) {
                    return err(format!(
                        "{at}: query parameter {p:?} is read by two sources"
                    ));
                }
                params.push(p);
            }
        }
        Ok(())
    }

    /// Finds the request's credential.
    ///
    /// `Ok(None)`: no configured source carries one (the filter answers 401 or lets an anonymous
    /// route through). `Err`: the request is ambiguous or malformed; see the module documentation.
    pub fn extract(&self, req: &RequestView<'_>) -> Result<Option<FoundCredential>, DenyReason> {
        let mut found: Option<FoundCredential> = None;
        for source in &self.sources {
            let Some(credential) = read_source(source, req)? else {
                continue;
            };
            if let Some(first) = &found {
                return Err(DenyReason::BadRequest(format!(
                    "credentials in more than one place ({} and {})",
                    first.source.label(),
                    source.label()
                )));
            }
            found = Some(FoundCredential {
                credential,
                source: source.clone(),
            });
        }
        Ok(found)
    }
}

fn check_header_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("header name is empty".into());
    }
    if name.starts_with(':') {
        return Err(format!("{name:?} is a pseudo-header"));
    }
    let tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if !name.chars().all(tchar) {
        return Err(format!("{name:?} is not a valid header name"));
    }
    Ok(())
}

fn check_param_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("query parameter name is empty".into());
    }
    if name.len() > 64 {
        return Err(format!(
            "query parameter name {name:?} is longer than 64 bytes"
        ));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_graphic() && !"&=#?+%".contains(c))
    {
        return Err(format!(
            "query parameter name {name:?} must be visible ASCII without & = # ? + % (it is matched after percent-decoding)"
        ));
    }
    Ok(())
}

/// The raw (still percent-encoded) query of a `:path`: after the first `?`, before any `#`.
fn raw_query(path: &str) -> &str {
    let before_fragment = path.split('#').next().unwrap_or("");
    match before_fragment.split_once('?') {
        Some((_, q)) => q,
        None => "",
    }
}

/// Where a credential was looked for, as error messages name it (`x-auth-token header`):
/// formatted only into an error, so a request that has its credential allocates nothing for it.
#[derive(Clone, Copy)]
struct Place<'a>(&'a str, &'static str);

impl fmt::Display for Place<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.0, self.1)
    }
}

/// Reads one source: `Ok(None)` if it is absent.
fn read_source(
    source: &TokenSource,
    req: &RequestView<'_>,
) -> Result<Option<Credential>, DenyReason> {
    match source {
        TokenSource::Bearer => {
            let what = Place("Authorization", "header");
            let Some(value) = single(req.header_values("authorization"), what)? else {
                return Ok(None);
            };
            let token = bearer_token(value)?;
            check_token(token, what)?;
            Ok(Some(Credential::Token(token.to_string())))
        }
        TokenSource::Header { name } => {
            let what = Place(name, "header");
            let Some(value) = single(req.header_values(name), what)? else {
                return Ok(None);
            };
            check_token(value, what)?;
            Ok(Some(Credential::Token(value.to_string())))
        }
        TokenSource::Query { name } => {
            let what = Place(name, "query parameter");
            let Some(value) = single(req.query_values(name), what)? else {
                return Ok(None);
            };
            check_token(&value, what)?;
            Ok(Some(Credential::Token(value)))
        }
        TokenSource::DeviceKey { location, id, key } => {
            let (id_value, key_value) = match location {
                KeyLocation::Header => (
                    single(req.header_values(id), Place(id, "header"))?.map(str::to_string),
                    single(req.header_values(key), Place(key, "header"))?.map(str::to_string),
                ),
                KeyLocation::Query => (
                    single(req.query_values(id), Place(id, "query parameter"))?,
                    single(req.query_values(key), Place(key, "query parameter"))?,
                ),
            };
            match (id_value, key_value) {
                (None, None) => Ok(None),
                (Some(i), Some(k)) => {
                    check_device_field(&i, id)?;
                    check_device_field(&k, key)?;
                    Ok(Some(Credential::DeviceKey { id: i, key: k }))
                }
                _ => Err(DenyReason::BadRequest(format!(
                    "device key incomplete: {id} and {key} must be sent together"
                ))),
            }
        }
    }
}

/// At most one value: two are ambiguous.
fn single<T>(mut values: Vec<T>, what: Place) -> Result<Option<T>, DenyReason> {
    if values.len() > 1 {
        return Err(DenyReason::BadRequest(format!("{what} repeated")));
    }
    Ok(values.pop())
}

/// The token of an `Authorization` value, which must use the Bearer scheme.
fn bearer_token(value: &str) -> Result<&str, DenyReason> {
    let value = value.trim_matches(|c| c == ' ' || c == '\t');
    if value.is_empty() {
        return Err(DenyReason::BadRequest("empty Authorization header".into()));
    }
    let (scheme, rest) = match value.split_once(' ') {
        Some((s, r)) => (s, r),
        None => (value, ""),
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(DenyReason::Unauthenticated(
            "unsupported authorization scheme: use Bearer".into(),
        ));
    }
    // RFC 6750: "Bearer" 1*SP b64token.
    Ok(rest.trim_start_matches(' '))
}

/// RFC 6750 §2.1 b64token: `1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`.
pub fn is_b64token(token: &str) -> bool {
    let body = token.trim_end_matches('=');
    let allowed = |ok: bool, b: &u8| ok & B64TOKEN_CHAR[usize::from(*b)];
    // Sixteen bytes at a time without a branch per byte: every request's token is checked.
    let (chunks, rest) = body.as_bytes().as_chunks::<16>();
    !body.is_empty()
        && chunks.iter().all(|chunk| chunk.iter().fold(true, allowed))
        && rest.iter().fold(true, allowed)
}

/// The bytes of RFC 6750's b64token (letters, digits, `-._~+/`), as a table: every request's
/// token (often 1 KB) is checked byte by byte.
const B64TOKEN_CHAR: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] =
            c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~' | b'+' | b'/');
        b += 1;
    }
    table
};

fn check_token(token: &str, what: Place) -> Result<(), DenyReason> {
    if token.is_empty() {
        return Err(DenyReason::BadRequest(format!("empty token in {what}")));
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(DenyReason::BadRequest(format!(
            "token in {what} is too long"
        )));
    }
    if !is_b64token(token) {
        return Err(DenyReason::BadRequest(format!("malformed token in {what}")));
    }
    Ok(())
}

fn check_device_field(value: &str, name: &str) -> Result<(), DenyReason> {
    if value.is_empty() {
        return Err(DenyReason::BadRequest(format!("empty {name}")));
    }
    if value.len() > MAX_DEVICE_FIELD_BYTES {
        return Err(DenyReason::BadRequest(format!("{name} is too long")));
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(DenyReason::BadRequest(format!("malformed {name}")));
    }
    Ok(())
}

/// Removes from the query of `path` every parameter whose percent-decoded name is in `names`,
/// and returns the new `:path`.
///
/// The other parameters are kept byte for byte (not re-encoded), in order; a query left empty
/// loses its `?`; a path with none of the parameters is returned unchanged. Names are compared
/// after decoding, so `access%5Ftoken=...` goes too.
pub fn strip_query_params(path: &str, names: &[&str]) -> String {
    if names.is_empty() {
        return path.to_string();
    }
    let (before_fragment, fragment) = match path.find('#') {
        Some(i) => (&path[..i], &path[i..]),
        None => (path, ""),
    };
    let Some((base, query)) = before_fragment.split_once('?') else {
        return path.to_string();
    };
    let mut removed = false;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|piece| {
            let drop = form_urlencoded::parse(piece.as_bytes())
                .next()
                .is_some_and(|(k, _)| names.iter().any(|n| *n == k));
            removed |= drop;
            !drop
        })
        .collect();
    if !removed {
        return path.to_string();
    }
    let query = kept.join("&");
    let mut out = String::with_capacity(path.len());
    out.push_str(base);
    if !query.is_empty() {
        out.push('?');
        out.push_str(&query);
    }
    out.push_str(fragment);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    fn token(t: &str) -> Option<Credential> {
        Some(Credential::Token(t.to_string()))
    }

    fn device(id: &str, key: &str) -> Option<Credential> {
        Some(Credential::DeviceKey {
            id: id.to_string(),
            key: key.to_string(),
        })
    }

    fn all_sources() -> CredentialConfig {
        CredentialConfig {
            sources: vec![
                TokenSource::Bearer,
                TokenSource::Header {
                    name: "x-auth-token".into(),
                },
                TokenSource::Query {
                    name: "access_token".into(),
                },
            ],
        }
    }

    fn devices(location: KeyLocation) -> CredentialConfig {
        CredentialConfig {
            sources: vec![
                TokenSource::Bearer,
                TokenSource::DeviceKey {
                    location,
                    id: "k1".into(),
                    key: "k2".into(),
                },
            ],
        }
    }

    /// (name, configuration, headers, `:path`, expected outcome)
    type Case<'a> = (
        &'a str,
        &'a CredentialConfig,
        Vec<(&'a str, &'a str)>,
        &'a str,
        Want,
    );

    #[derive(Debug)]
    enum Want {
        None,
        Found(Option<Credential>, &'static str),
        Status(u32),
    }

    fn run(
        config: &CredentialConfig,
        hs: &[(&str, &str)],
        path: &str,
    ) -> Result<Option<FoundCredential>, DenyReason> {
        let hs = headers(hs);
        config.extract(&RequestView::new(&hs, path))
    }

    fn check(name: &str, config: &CredentialConfig, hs: &[(&str, &str)], path: &str, want: Want) {
        let got = run(config, hs, path);
        match (&want, &got) {
            (Want::None, Ok(None)) => {}
            (Want::Found(cred, label), Ok(Some(f))) => {
                assert_eq!(Some(&f.credential), cred.as_ref(), "{name}");
                assert_eq!(f.source.label(), *label, "{name}");
            }
            (Want::Status(s), Err(reason)) => assert_eq!(reason.status(), *s, "{name}: {reason}"),
            _ => panic!("{name}: wanted {want:?}, got {got:?}"),
        }
    }

    #[rustfmt::skip]
    #[test]
    fn extraction_table() {
        let all = all_sources();
        let def = CredentialConfig::default();
        let jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln-_";
        let bearer_jwt = format!("Bearer {jwt}");
        let x_auth_only = CredentialConfig {
            sources: vec![TokenSource::Header {
                name: "x-auth-token".into(),
            }],
        };
        let cases: Vec<Case> = vec![
            ("nothing", &all, vec![], "/v2/entities", Want::None),
            ("unrelated headers", &all, vec![("accept", "*/*")], "/v2/entities?type=Room", Want::None),
            ("bearer", &all, vec![("authorization", "Bearer abc.def")], "/", Want::Found(token("abc.def"), "bearer")),
            ("bearer jwt", &all, vec![("authorization", &bearer_jwt)], "/", Want::Found(token(jwt), "bearer")),
            ("bearer scheme case", &all, vec![("authorization", "bEaReR abc")], "/", Want::Found(token("abc"), "bearer")),
            ("bearer header name case", &all, vec![("Authorization", "Bearer abc")], "/", Want::Found(token("abc"), "bearer")),
            ("bearer extra spaces", &all, vec![("authorization", "Bearer   abc")], "/", Want::Found(token("abc"), "bearer")),
            ("bearer padding", &all, vec![("authorization", "Bearer YWJj==")], "/", Want::Found(token("YWJj=="), "bearer")),
            ("x-auth-token", &all, vec![("x-auth-token", "0b5a4b8a-3a4e-4b1e-9d7e-1d2c3b4a5f6e")], "/", Want::Found(token("0b5a4b8a-3a4e-4b1e-9d7e-1d2c3b4a5f6e"), "header:x-auth-token")),
            ("x-auth-token case", &all, vec![("X-Auth-Token", "abc")], "/", Want::Found(token("abc"), "header:x-auth-token")),
            ("query", &all, vec![], "/ws?access_token=abc", Want::Found(token("abc"), "query:access_token")),
            ("query among others", &all, vec![], "/v2/entities?type=Room&access_token=abc&limit=10", Want::Found(token("abc"), "query:access_token")),
            ("query percent-encoded name", &all, vec![], "/ws?access%5Ftoken=abc", Want::Found(token("abc"), "query:access_token")),
            ("query percent-encoded plus", &all, vec![], "/ws?access_token=a%2Bb%2F%3D", Want::Found(token("a+b/="), "query:access_token")),
            ("query literal plus is space", &all, vec![], "/ws?access_token=a+b", Want::Status(400)),
            ("query %20", &all, vec![], "/ws?access_token=a%20b", Want::Status(400)),
            ("query name case differs", &all, vec![], "/ws?ACCESS_TOKEN=abc", Want::None),
            ("query name in path", &all, vec![], "/v2/entities/access_token=abc", Want::None),
            ("query name in path segment with query", &all, vec![], "/access_token=abc/x?type=Room", Want::None),
            ("query name in fragment", &all, vec![], "/ws?type=Room#access_token=abc", Want::None),
            ("query name in fragment no query", &all, vec![], "/ws#?access_token=abc", Want::None),
            ("query in value of other param", &all, vec![], "/ws?q=access_token%3Dabc", Want::None),
            ("query bad percent", &all, vec![], "/ws?access_token=ab%zz", Want::Status(400)),
            ("query invalid utf8", &all, vec![], "/ws?access_token=ab%FF", Want::Status(400)),
            ("query empty value", &all, vec![], "/ws?access_token=", Want::Status(400)),
            ("query no value", &all, vec![], "/ws?access_token", Want::Status(400)),
            ("query repeated", &all, vec![], "/ws?access_token=a&access_token=a", Want::Status(400)),
            ("query repeated via encoding", &all, vec![], "/ws?access_token=a&access%5ftoken=b", Want::Status(400)),
            ("query not configured", &def, vec![], "/ws?access_token=abc", Want::None),
            ("two authorization", &all, vec![("authorization", "Bearer a"), ("authorization", "Bearer a")], "/", Want::Status(400)),
            ("two authorization mixed case", &all, vec![("authorization", "Bearer a"), ("Authorization", "Bearer b")], "/", Want::Status(400)),
            ("two x-auth-token", &all, vec![("x-auth-token", "a"), ("x-auth-token", "b")], "/", Want::Status(400)),
            ("bearer and x-auth-token equal", &all, vec![("authorization", "Bearer a"), ("x-auth-token", "a")], "/", Want::Status(400)),
            ("bearer and query", &all, vec![("authorization", "Bearer a")], "/?access_token=b", Want::Status(400)),
            ("x-auth-token and query", &all, vec![("x-auth-token", "a")], "/?access_token=a", Want::Status(400)),
            ("basic scheme", &all, vec![("authorization", "Basic dXNlcjpwYXNz")], "/", Want::Status(401)),
            ("basic scheme with x-auth-token", &all, vec![("authorization", "Basic dXNlcjpwYXNz"), ("x-auth-token", "a")], "/", Want::Status(401)),
            ("wilma-style Bearer colon", &all, vec![("authorization", "Bearer: YWJj")], "/", Want::Status(401)),
            ("bearer tab", &all, vec![("authorization", "Bearer\tabc")], "/", Want::Status(401)),
            ("scheme only", &all, vec![("authorization", "Bearer")], "/", Want::Status(400)),
            ("scheme and space", &all, vec![("authorization", "Bearer ")], "/", Want::Status(400)),
            ("empty authorization", &all, vec![("authorization", "")], "/", Want::Status(400)),
            ("two tokens in one header", &all, vec![("authorization", "Bearer a, Bearer b")], "/", Want::Status(400)),
            ("token with space", &all, vec![("authorization", "Bearer a b")], "/", Want::Status(400)),
            ("token with quote", &all, vec![("authorization", "Bearer \"abc\"")], "/", Want::Status(400)),
            ("token only padding", &all, vec![("authorization", "Bearer ==")], "/", Want::Status(400)),
            ("padding in the middle", &all, vec![("authorization", "Bearer ab=c")], "/", Want::Status(400)),
            ("non-ascii token", &all, vec![("x-auth-token", "abcé")], "/", Want::Status(400)),
            ("empty x-auth-token", &all, vec![("x-auth-token", "")], "/", Want::Status(400)),
            ("authorization ignored when bearer not configured", &x_auth_only, vec![("authorization", "Basic abc"), ("x-auth-token", "t")], "/", Want::Found(token("t"), "header:x-auth-token")),
        ];
        for (name, config, hs, path, want) in cases {
            check(name, config, &hs, path, want);
        }
    }

    #[test]
    fn too_long_token_is_refused() {
        let long = "a".repeat(MAX_TOKEN_BYTES + 1);
        let ok = "a".repeat(MAX_TOKEN_BYTES);
        let all = all_sources();
        check(
            "max",
            &all,
            &[("x-auth-token", &ok)],
            "/",
            Want::Found(token(&ok), "header:x-auth-token"),
        );
        check(
            "max+1",
            &all,
            &[("x-auth-token", &long)],
            "/",
            Want::Status(400),
        );
    }

    #[rustfmt::skip]
    #[test]
    fn device_keys_table() {
        let q = devices(KeyLocation::Query);
        let h = devices(KeyLocation::Header);
        let cases: Vec<Case> = vec![
            ("query pair", &q, vec![], "/v2/entities?k1=lamp-01&k2=s3cr3t", Want::Found(device("lamp-01", "s3cr3t"), "device_key:query")),
            ("query pair decoded", &q, vec![], "/x?k%31=lamp%2D01&k2=a%2Bb", Want::Found(device("lamp-01", "a+b"), "device_key:query")),
            ("query id only", &q, vec![], "/x?k1=lamp-01", Want::Status(400)),
            ("query key only", &q, vec![], "/x?k2=s", Want::Status(400)),
            ("query repeated id", &q, vec![], "/x?k1=a&k1=a&k2=s", Want::Status(400)),
            ("query empty key", &q, vec![], "/x?k1=a&k2=", Want::Status(400)),
            ("query key with space", &q, vec![], "/x?k1=a&k2=b+c", Want::Status(400)),
            ("query pair and bearer", &q, vec![("authorization", "Bearer t")], "/x?k1=a&k2=b", Want::Status(400)),
            ("query pair in fragment", &q, vec![], "/x#?k1=a&k2=b", Want::None),
            ("header pair", &h, vec![("K1", "lamp-01"), ("k2", "s3cr3t")], "/", Want::Found(device("lamp-01", "s3cr3t"), "device_key:header")),
            ("header pair ignores query", &h, vec![], "/x?k1=a&k2=b", Want::None),
            ("header repeated key", &h, vec![("k1", "a"), ("k2", "b"), ("k2", "b")], "/", Want::Status(400)),
            ("header key only", &h, vec![("k2", "b")], "/", Want::Status(400)),
            ("header control char", &h, vec![("k1", "a\u{7f}"), ("k2", "b")], "/", Want::Status(400)),
        ];
        for (name, config, hs, path, want) in cases {
            check(name, config, &hs, path, want);
        }
    }

    #[test]
    fn order_decides_which_error_is_reported() {
        let config = CredentialConfig {
            sources: vec![
                TokenSource::Header {
                    name: "x-auth-token".into(),
                },
                TokenSource::Bearer,
            ],
        };
        // x-auth-token is examined first: its repetition is reported before the foreign scheme.
        let err = run(
            &config,
            &[
                ("x-auth-token", "a"),
                ("x-auth-token", "b"),
                ("authorization", "Basic x"),
            ],
            "/",
        )
        .unwrap_err();
        assert_eq!(err.status(), 400);
        let err = run(
            &all_sources(),
            &[
                ("x-auth-token", "a"),
                ("x-auth-token", "b"),
                ("authorization", "Basic x"),
            ],
            "/",
        )
        .unwrap_err();
        assert_eq!(err.status(), 401);
    }

    #[test]
    fn errors_do_not_echo_tokens() {
        let secret = "sup3rs3cret";
        let cases: Vec<(Vec<(&str, &str)>, String)> = vec![
            (
                vec![
                    ("authorization", "Bearer sup3rs3cret"),
                    ("x-auth-token", "sup3rs3cret"),
                ],
                "/".into(),
            ),
            (vec![("x-auth-token", "sup3rs3cret!")], "/".into()),
            (
                vec![],
                format!("/?access_token={secret}&access_token={secret}"),
            ),
        ];
        for (hs, path) in cases {
            let err = run(&all_sources(), &hs, &path).unwrap_err();
            assert!(!err.description().contains(secret), "{err}");
        }
        let found = run(&all_sources(), &[("x-auth-token", secret)], "/")
            .unwrap()
            .unwrap();
        assert!(!format!("{found:?}").contains(secret));
        let found = run(
            &devices(KeyLocation::Query),
            &[],
            "/?k1=lamp&k2=sup3rs3cret",
        )
        .unwrap()
        .unwrap();
        let dbg = format!("{found:?}");
        assert!(!dbg.contains(secret) && dbg.contains("lamp"), "{dbg}");
    }

    #[rustfmt::skip]
    #[test]
    fn strip_table() {
        let at = ["access_token"];
        let cases: Vec<(&str, &[&str], &str)> = vec![
            ("/ws?access_token=abc", &at, "/ws"),
            ("/ws?a=1&access_token=abc&b=2", &at, "/ws?a=1&b=2"),
            ("/ws?access_token=abc&b=2", &at, "/ws?b=2"),
            ("/ws?a=1&access_token=abc", &at, "/ws?a=1"),
            ("/ws?access%5Ftoken=abc&b=2", &at, "/ws?b=2"),
            ("/ws?access_token&b=2", &at, "/ws?b=2"),
            // Others are kept exactly as sent, not re-encoded.
            ("/ws?q=a%20b+c&access_token=x&z=%7E", &at, "/ws?q=a%20b+c&z=%7E"),
            ("/ws?a=1&&access_token=x", &at, "/ws?a=1&"),
            // Untouched when absent, byte for byte.
            ("/ws?a=1&&b=%41", &at, "/ws?a=1&&b=%41"),
            ("/ws", &at, "/ws"),
            ("/ws?", &at, "/ws?"),
            ("/access_token=abc", &at, "/access_token=abc"),
            ("/ws?ACCESS_TOKEN=abc", &at, "/ws?ACCESS_TOKEN=abc"),
            ("/ws?a=1#access_token=x", &at, "/ws?a=1#access_token=x"),
            ("/ws?access_token=x#frag", &at, "/ws#frag"),
            ("/x?k1=a&t=1&k2=b", &["k1", "k2"], "/x?t=1"),
        ];
        for (path, names, want) in cases {
            assert_eq!(strip_query_params(path, names), want, "{path}");
        }
    }

    #[test]
    fn found_credential_knows_what_to_remove() {
        let found = run(&all_sources(), &[], "/ws?x=1&access_token=abc")
            .unwrap()
            .unwrap();
        assert_eq!(found.strip_from_path("/ws?x=1&access_token=abc"), "/ws?x=1");
        assert!(found.headers().is_empty());
        let found = run(&all_sources(), &[("X-Auth-Token", "abc")], "/ws?access=1")
            .unwrap()
            .unwrap();
        assert_eq!(found.headers(), vec!["x-auth-token".to_string()]);
        assert_eq!(found.strip_from_path("/ws?access=1"), "/ws?access=1");
        let found = run(&devices(KeyLocation::Query), &[], "/x?k1=a&k2=b&c=d")
            .unwrap()
            .unwrap();
        assert_eq!(found.strip_from_path("/x?k1=a&k2=b&c=d"), "/x?c=d");
    }

    #[test]
    fn b64token_syntax() {
        for ok in ["a", "A-Z.0_9~+/", "abc=", "abc==", "eyJ.eyJ.sig"] {
            assert!(is_b64token(ok), "{ok}");
        }
        for bad in [
            "", "=", "a=b", "a b", "a,b", "a;b", "a\"", "a%20", "é", "a\tb", "a:b",
        ] {
            assert!(!is_b64token(bad), "{bad}");
        }
        // A bad byte anywhere in a long token (whole 16-byte chunks and the rest), or one
        // bad byte of every kind, fails it.
        let long = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln_-~+/";
        assert!(is_b64token(long));
        for at in 0..long.len() {
            for bad in [' ', ',', '=', '%', '\0', '\u{7f}'] {
                if bad == '=' && at == long.len() - 1 {
                    continue; // padding at the end is allowed
                }
                let mut token = long.to_string();
                token.replace_range(at..=at, &bad.to_string());
                assert!(!is_b64token(&token), "{token:?}");
            }
        }
        for b in 0..=255u8 {
            let token = format!("{}{}", "a".repeat(40), char::from(b));
            let expected = b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b);
            assert_eq!(is_b64token(&token), expected, "{b}");
        }
    }

    #[test]
    fn config_defaults_and_formats() {
        let config: CredentialConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(config, CredentialConfig::default());
        assert_eq!(
            config.sources,
            vec![
                TokenSource::Bearer,
                TokenSource::Header {
                    name: "x-auth-token".into()
                }
            ]
        );
        config.validate().unwrap();

        let config: CredentialConfig = serde_json::from_str(
            r#"{"sources": [
                {"type": "bearer"},
                {"type": "header"},
                {"type": "query"},
                {"type": "device_key", "in": "query", "id": "k1", "key": "k2"}
            ]}"#,
        )
        .unwrap();
        config.validate().unwrap();
        assert_eq!(
            config.sources[2],
            TokenSource::Query {
                name: "access_token".into()
            }
        );
        assert_eq!(
            config.sources[3],
            TokenSource::DeviceKey {
                location: KeyLocation::Query,
                id: "k1".into(),
                key: "k2".into()
            }
        );
        // Round trip.
        let json = serde_json::to_string(&config).unwrap();
        assert_eq!(
            serde_json::from_str::<CredentialConfig>(&json).unwrap(),
            config
        );
    }

    #[test]
    fn config_rejects_unknown_and_malformed() {
        for bad in [
            r#"{"source": []}"#,
            r#"{"sources": [{"type": "cookie"}]}"#,
            r#"{"sources": [{"type": "header", "nam": "x"}]}"#,
            r#"{"sources": [{"type": "bearer", "name": "x"}]}"#,
            r#"{"sources": [{"type": "device_key", "in": "body", "id": "a", "key": "b"}]}"#,
            r#"{"sources": [{"type": "device_key", "in": "query", "id": "a"}]}"#,
        ] {
            assert!(
                serde_json::from_str::<CredentialConfig>(bad).is_err(),
                "{bad}"
            );
        }
    }

    #[rustfmt::skip]
    #[test]
    fn config_validation_table() {
        let h = |n: &str| TokenSource::Header { name: n.into() };
        let q = |n: &str| TokenSource::Query { name: n.into() };
        let d = |l, i: &str, k: &str| TokenSource::DeviceKey {
            location: l,
            id: i.into(),
            key: k.into(),
        };
        let cases: Vec<(Vec<TokenSource>, Option<&str>)> = vec![
            (vec![TokenSource::Bearer], None),
            (vec![h("X-Auth-Token"), q("token")], None),
            (vec![], Some("at least one source")),
            (vec![TokenSource::Bearer; 9], Some("at most 8")),
            (vec![TokenSource::Bearer, TokenSource::Bearer], Some("\"authorization\" is read by two sources")),
            (vec![h("x-auth-token"), h("X-AUTH-TOKEN")], Some("read by two sources")),
            (vec![h("authorization")], Some("use {\"type\": \"bearer\"}")),
            (vec![h("")], Some("header name is empty")),
            (vec![h(":path")], Some("pseudo-header")),
            (vec![h("x auth")], Some("not a valid header name")),
            (vec![q("")], Some("query parameter name is empty")),
            (vec![q("a b")], Some("visible ASCII")),
            (vec![q("a=b")], Some("visible ASCII")),
            (vec![q("a%5Fb")], Some("visible ASCII")),
            (vec![q("access_token"), q("access_token")], Some("query parameter \"access_token\" is read by two sources")),
            (vec![d(KeyLocation::Query, "k1", "k1")], Some("id and key must be different")),
            (vec![d(KeyLocation::Header, "K1", "k1")], Some("id and key must be different")),
            (vec![d(KeyLocation::Header, "authorization", "k2")], Some("Authorization header can't carry")),
            (vec![q("k1"), d(KeyLocation::Query, "k1", "k2")], Some("read by two sources")),
            (vec![h("k1"), d(KeyLocation::Query, "k1", "k2")], None),
            (vec![h("k1"), d(KeyLocation::Header, "k1", "k2")], Some("read by two sources")),
        ];
        for (sources, want) in cases {
            let got = CredentialConfig {
                sources: sources.clone(),
            }
            .validate();
            match (want, got) {
                (None, Ok(())) => {}
                (Some(msg), Err(e)) => assert!(e.to_string().contains(msg), "{sources:?}: {e}"),
                (want, got) => panic!("{sources:?}: wanted {want:?}, got {got:?}"),
            }
        }
    }
}
