//! Where a filter calls out: an Envoy cluster, the `:authority` and `:path` of the request,
//! and how long to wait. Every stage that calls out takes its endpoint in these types —
//! token-auth's JWKS fetch and introspection, mqtt-acl's introspection and HTTP backend,
//! device-ownership's broker and registry sources — so each value is checked once, here,
//! while the configuration is read: serde runs the checks (`try_from`), and
//! [`crate::config_error::parse`] names the JSON path of a bad value
//! (`configuration refused at sources[1].authority: ...`).
//!
//! The configurations users already have keep their keys (`cluster`, `authority`, `path`,
//! `timeout_ms`, next to the stage's other settings). They hold the field types below rather
//! than one nested struct: serde's `flatten` does not work with `deny_unknown_fields` and loses
//! the JSON path of an error. A setting that names a whole endpoint (e.g. an IdP's token
//! endpoint) takes an [`Upstream`] object. Either way, [`Target::call`] is the one place that
//! turns an endpoint into an [`HttpCall`].

use std::fmt;
use std::net::Ipv6Addr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Why an endpoint value is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    #[error(
        "cluster {0:?} must be a non-empty Envoy cluster name without spaces or control characters"
    )]
    Cluster(String),
    #[error("authority {0:?} must be a host[:port] (a host name, an IPv4 address or a bracketed IPv6 address; a port from 1 to 65535)")]
    Authority(String),
    #[error("path {0:?} must start with '/' and hold no spaces, control characters, non-ASCII characters or '#'")]
    Path(String),
    #[error("timeout_ms {0} must be between {min} and {max}", min = TimeoutMs::MIN, max = TimeoutMs::MAX)]
    Timeout(u64),
}

/// An Envoy cluster name: non-empty, printable ASCII without spaces.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ClusterName(String);

impl ClusterName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ClusterName {
    type Error = UpstreamError;
    fn try_from(name: String) -> Result<Self, UpstreamError> {
        if name.is_empty() || name.len() > 256 || !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(UpstreamError::Cluster(name));
        }
        Ok(ClusterName(name))
    }
}

impl From<ClusterName> for String {
    fn from(name: ClusterName) -> String {
        name.0
    }
}

impl fmt::Display for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The `:authority` of a call: `host[:port]`, no user info, path, query or fragment.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Authority(String);

impl Authority {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Authority {
    type Error = UpstreamError;
    fn try_from(text: String) -> Result<Self, UpstreamError> {
        if valid_authority(&text) {
            Ok(Authority(text))
        } else {
            Err(UpstreamError::Authority(text))
        }
    }
}

impl From<Authority> for String {
    fn from(authority: Authority) -> String {
        authority.0
    }
}

fn valid_authority(text: &str) -> bool {
    let (host, port) = match text.strip_prefix('[') {
        Some(bracketed) => {
            let Some((v6, rest)) = bracketed.split_once(']') else {
                return false;
            };
            if v6.parse::<Ipv6Addr>().is_err() {
                return false;
            }
            match rest {
                "" => return true,
                _ => ("", rest.strip_prefix(':').unwrap_or("not a port")),
            }
        }
        None => match text.split_once(':') {
            Some((host, port)) => (host, port),
            None => (text, ""),
        },
    };
    let host_ok = text.starts_with('[')
        || (!host.is_empty()
            && host.len() <= 253
            && !host.starts_with(['.', '-'])
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)));
    let port_ok = port.is_empty() && !text.ends_with(':')
        || (port.len() <= 5
            && port.bytes().all(|b| b.is_ascii_digit())
            && port.parse::<u16>().is_ok_and(|p| p > 0));
    host_ok && port_ok
}

/// The `:path` of a call: absolute, printable ASCII, no fragment (a query is allowed; a stage
/// that appends its own refuses one).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UpstreamPath(String);

impl UpstreamPath {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A default written in the code (each one is checked by a test of its configuration).
    pub fn default_of(path: &'static str) -> UpstreamPath {
        UpstreamPath(path.to_string())
    }

    pub fn has_query(&self) -> bool {
        self.0.contains('?')
    }
}

impl TryFrom<String> for UpstreamPath {
    type Error = UpstreamError;
    fn try_from(path: String) -> Result<Self, UpstreamError> {
        if !path.starts_with('/')
            || path.len() > 4096
            || !path.bytes().all(|b| b.is_ascii_graphic() && b != b'#')
        {
            return Err(UpstreamError::Path(path));
        }
        Ok(UpstreamPath(path))
    }
}

impl From<UpstreamPath> for String {
    fn from(path: UpstreamPath) -> String {
        path.0
    }
}

/// How long a call may take, in milliseconds: from [`TimeoutMs::MIN`] to [`TimeoutMs::MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct TimeoutMs(u64);

impl TimeoutMs {
    pub const MIN: u64 = 1;
    pub const MAX: u64 = 60_000;

    /// A default written in the code, brought within the bounds.
    pub const fn default_of(ms: u64) -> TimeoutMs {
        if ms < Self::MIN {
            TimeoutMs(Self::MIN)
        } else if ms > Self::MAX {
            TimeoutMs(Self::MAX)
        } else {
            TimeoutMs(ms)
        }
    }

    pub fn millis(self) -> u64 {
        self.0
    }

    pub fn duration(self) -> Duration {
        Duration::from_millis(self.0)
    }
}

impl TryFrom<u64> for TimeoutMs {
    type Error = UpstreamError;
    fn try_from(ms: u64) -> Result<Self, UpstreamError> {
        if (Self::MIN..=Self::MAX).contains(&ms) {
            Ok(TimeoutMs(ms))
        } else {
            Err(UpstreamError::Timeout(ms))
        }
    }
}

impl From<TimeoutMs> for u64 {
    fn from(timeout: TimeoutMs) -> u64 {
        timeout.0
    }
}

/// A whole endpoint as one object, for settings that name one:
/// `{"cluster": "keycloak", "authority": "keycloak:8080", "path": "/token", "timeout_ms": 2000}`
/// (`authority` defaults to the cluster name, `timeout_ms` to 2000).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub cluster: ClusterName,
    #[serde(default)]
    pub authority: Option<Authority>,
    pub path: UpstreamPath,
    #[serde(default = "default_timeout")]
    pub timeout_ms: TimeoutMs,
}

fn default_timeout() -> TimeoutMs {
    TimeoutMs::default_of(2000)
}

impl Upstream {
    pub fn target(&self) -> Target<'_> {
        Target {
            cluster: &self.cluster,
            authority: self.authority.as_ref(),
            timeout: self.timeout_ms,
        }
    }

    /// A call to this endpoint's path.
    pub fn call(&self, method: &'static str) -> HttpCall {
        self.target().call(method, self.path.as_str().to_string())
    }
}

/// Where a call goes (the endpoint without its path), borrowed from a configuration.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub cluster: &'a ClusterName,
    /// None: the cluster name is the `:authority`.
    pub authority: Option<&'a Authority>,
    pub timeout: TimeoutMs,
}

impl Target<'_> {
    /// A call with no headers but the pseudo-headers and no body; the stage adds them.
    pub fn call(&self, method: &'static str, path: String) -> HttpCall {
        HttpCall {
            cluster: self.cluster.as_str().to_string(),
            method,
            authority: self
                .authority
                .map_or(self.cluster.as_str(), Authority::as_str)
                .to_string(),
            path,
            headers: Vec::new(),
            body: Vec::new(),
            timeout_ms: self.timeout.millis(),
        }
    }
}

/// An HTTP call for `dispatch_http_call`, as plain data. `Debug` hides the body and the
/// credential headers.
#[derive(Clone, PartialEq, Eq)]
pub struct HttpCall {
    pub cluster: String,
    pub method: &'static str,
    pub authority: String,
    /// The `:path`, query included.
    pub path: String,
    /// Regular headers, lowercase names.
    pub headers: Vec<(String, String)>,
    /// Empty for a GET.
    pub body: Vec<u8>,
    pub timeout_ms: u64,
}

impl HttpCall {
    /// Adds a header (lowercase name).
    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> HttpCall {
        self.headers.push((name.to_string(), value.into()));
        self
    }

    pub fn with_body(mut self, body: Vec<u8>) -> HttpCall {
        self.body = body;
        self
    }

    /// The pseudo-headers `:method`, `:path`, `:authority` followed by the regular headers: what
    /// `dispatch_http_call` takes.
    pub fn envoy_headers(&self) -> Vec<(&str, &str)> {
        let mut out = vec![
            (":method", self.method),
            (":path", self.path.as_str()),
            (":authority", self.authority.as_str()),
        ];
        out.extend(self.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())));
        out
    }

    /// The value of a header, pseudo-headers included (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.envoy_headers()
            .into_iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// The body for `dispatch_http_call` (None when empty).
    pub fn body(&self) -> Option<&[u8]> {
        (!self.body.is_empty()).then_some(self.body.as_slice())
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

impl fmt::Debug for HttpCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(n, v)| match n.as_str() {
                "authorization" | "x-auth-token" => (n.as_str(), "<redacted>"),
                _ => (n.as_str(), v.as_str()),
            })
            .collect();
        // A query may carry a token (Keyrock's `access_token`).
        let path = self.path.split('?').next().unwrap_or("");
        f.debug_struct("HttpCall")
            .field("cluster", &self.cluster)
            .field("method", &self.method)
            .field("authority", &self.authority)
            .field("path", &path)
            .field("headers", &headers)
            .field("body", &format_args!("<{} bytes>", self.body.len()))
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config_error::{parse, ConfigError};

    #[test]
    fn cluster_names_are_non_empty_tokens() {
        for good in ["orion", "outbound|8080||registry.svc", "idp_1"] {
            assert!(ClusterName::try_from(good.to_string()).is_ok(), "{good}");
        }
        for bad in ["", "a b", "tab\t", "é", &"x".repeat(257)] {
            assert_eq!(
                ClusterName::try_from(bad.to_string()),
                Err(UpstreamError::Cluster(bad.to_string())),
                "{bad}"
            );
        }
    }

    #[test]
    fn authorities_are_host_and_optional_port() {
        for good in [
            "orion",
            "orion:1026",
            "keycloak.example.org:8443",
            "127.0.0.1:3000",
            "[::1]",
            "[::1]:8080",
            "owners_registry",
        ] {
            assert!(Authority::try_from(good.to_string()).is_ok(), "{good}");
        }
        for bad in [
            "",
            "a b",
            "a/b",
            "u@a",
            "a?x",
            "a#x",
            "orion:",
            "orion:0",
            "orion:65536",
            "orion:80:80",
            ":80",
            "[::1",
            "[nope]:80",
            "[::1]80",
            ".example",
            "-x",
            "héllo",
        ] {
            assert_eq!(
                Authority::try_from(bad.to_string()),
                Err(UpstreamError::Authority(bad.to_string())),
                "{bad}"
            );
        }
    }

    #[test]
    fn paths_are_absolute_ascii_without_fragment() {
        for good in ["/", "/ownership/lookup", "/certs?realm=a"] {
            assert!(UpstreamPath::try_from(good.to_string()).is_ok(), "{good}");
        }
        assert!(UpstreamPath::try_from("/a?b".to_string())
            .unwrap()
            .has_query());
        for bad in [
            "",
            "relative",
            "/a b",
            "/a\nb",
            "/a#frag",
            "/é",
            "http://x/",
        ] {
            assert_eq!(
                UpstreamPath::try_from(bad.to_string()),
                Err(UpstreamError::Path(bad.to_string())),
                "{bad}"
            );
        }
    }

    #[test]
    fn timeouts_are_bounded() {
        assert_eq!(TimeoutMs::try_from(1).map(TimeoutMs::millis), Ok(1));
        assert_eq!(
            TimeoutMs::try_from(60_000).map(TimeoutMs::millis),
            Ok(60_000)
        );
        assert_eq!(TimeoutMs::try_from(0), Err(UpstreamError::Timeout(0)));
        assert_eq!(
            TimeoutMs::try_from(60_001),
            Err(UpstreamError::Timeout(60_001))
        );
        assert_eq!(TimeoutMs::default_of(0).millis(), 1);
        assert_eq!(TimeoutMs::default_of(u64::MAX).millis(), 60_000);
    }

    #[test]
    fn a_refused_value_is_named_by_its_json_path() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Holder {
            sources: Vec<Upstream>,
        }
        let refused = |json: &str| parse::<Holder>(json.as_bytes()).unwrap_err();
        assert_eq!(
            refused(
                r#"{"sources": [{"cluster": "a", "path": "/"}, {"cluster": "a", "path": "/", "authority": "u@h"}]}"#
            ),
            ConfigError::At {
                path: "sources[1].authority".into(),
                message: UpstreamError::Authority("u@h".into()).to_string(),
            }
        );
        assert_eq!(
            refused(r#"{"sources": [{"cluster": "", "path": "/"}]}"#),
            ConfigError::At {
                path: "sources[0].cluster".into(),
                message: UpstreamError::Cluster(String::new()).to_string(),
            }
        );
        assert!(matches!(
            refused(r#"{"sources": [{"cluster": "a", "path": "x"}]}"#),
            ConfigError::At { path, .. } if path == "sources[0].path"
        ));
        assert!(matches!(
            refused(r#"{"sources": [{"cluster": "a", "path": "/", "timeout_ms": 0}]}"#),
            ConfigError::At { path, message }
                if path == "sources[0].timeout_ms" && message == "timeout_ms 0 must be between 1 and 60000"
        ));
        assert!(matches!(
            refused(r#"{"sources": [{"cluster": "a", "path": "/", "port": 1}]}"#),
            ConfigError::At { path, .. } if path == "sources[0].port"
        ));
    }

    #[test]
    fn a_call_goes_to_the_cluster_with_its_authority() {
        let upstream: Upstream =
            serde_json::from_str(r#"{"cluster": "idp", "path": "/token"}"#).unwrap();
        let call = upstream
            .call("POST")
            .with_header("content-type", "application/x-www-form-urlencoded")
            .with_body(b"grant_type=client_credentials".to_vec());
        assert_eq!(call.cluster, "idp");
        // Without an authority, the cluster name is the :authority.
        assert_eq!(
            call.envoy_headers(),
            vec![
                (":method", "POST"),
                (":path", "/token"),
                (":authority", "idp"),
                ("content-type", "application/x-www-form-urlencoded"),
            ]
        );
        assert_eq!(call.timeout(), Duration::from_millis(2000));
        assert_eq!(call.body(), Some(&b"grant_type=client_credentials"[..]));
        assert_eq!(call.header(":authority"), Some("idp"));
        let with: Upstream = serde_json::from_str(
            r#"{"cluster": "idp", "authority": "idp.example:8443", "path": "/t", "timeout_ms": 700}"#,
        )
        .unwrap();
        let call = with.call("GET");
        assert_eq!(
            (call.authority.as_str(), call.timeout_ms, call.body()),
            ("idp.example:8443", 700, None)
        );
    }
}
