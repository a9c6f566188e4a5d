//! The configuration of one JWT provider, as it appears in a filter's JSON configuration.
//! See the module documentation of [`crate::jwt`] for an example.

use std::fmt;

use base64::Engine;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::algorithm::Algorithm;
use super::error::ConfigError;
use super::keys::{B64_STD_LENIENT, B64_URL_LENIENT};
use crate::upstream::{Authority, ClusterName, Target, TimeoutMs, UpstreamPath};

/// Clock skew tolerated on `exp`, `nbf` and `iat` unless configured.
pub const DEFAULT_CLOCK_SKEW_SECS: u64 = 60;
/// Largest clock skew a provider may configure.
pub const MAX_CLOCK_SKEW_SECS: u64 = 300;
/// Token size limit unless configured.
pub const DEFAULT_MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Bounds of the configurable token size limit.
pub const MIN_MAX_TOKEN_BYTES: usize = 256;
pub const MAX_MAX_TOKEN_BYTES: usize = 64 * 1024;
/// JWKS refresh period unless configured, and its bounds.
pub const DEFAULT_REFRESH_SECS: u64 = 600;
pub const MIN_REFRESH_SECS: u64 = 30;
pub const MAX_REFRESH_SECS: u64 = 86_400;
/// How long fetched keys are trusted after their last successful fetch, unless configured
/// (4 hours; never less than two refresh periods), and the largest value allowed (7 days).
pub const DEFAULT_MAX_STALE_SECS: u64 = 4 * 3_600;
pub const MAX_MAX_STALE_SECS: u64 = 7 * 86_400;

/// One token issuer: how its tokens are verified and mapped onto an identity.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtProviderConfig {
    /// The exact `iss` of the provider's tokens (and of its discovery document). Required.
    pub issuer: String,
    /// Accepted `aud` values; a token's `aud` (string or array) must contain one of them.
    /// Required unless `allow_any_audience` is true: in a realm shared by several clients,
    /// a token issued for another API must not get in (RFC 8725 §3.9).
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Accept tokens whatever their `aud` (or none). An explicit opt-out, logged as a warning
    /// at configure time; exclusive with `audiences`.
    #[serde(default)]
    pub allow_any_audience: bool,
    /// The algorithm allow-list, e.g. `["RS256"]`. Required, non-empty. Supported: RS256,
    /// RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA, HS256, HS384, HS512.
    pub algorithms: Vec<String>,
    /// Refuse tokens without `exp` (default true).
    #[serde(default = "default_true")]
    pub require_exp: bool,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds (default 60, at most 300).
    #[serde(default = "default_skew")]
    pub clock_skew_secs: u64,
    /// Largest token accepted, in bytes (default 8192, 256..=65536).
    #[serde(default = "default_max_token_bytes")]
    pub max_token_bytes: usize,
    /// Refuse tokens whose `exp - iat` (or `exp - now` without `iat`) is longer than this.
    #[serde(default)]
    pub max_lifetime_secs: Option<u64>,
    /// How claims become the identity.
    #[serde(default)]
    pub claims: ClaimMappingConfig,
    /// An inline JWKS: a JSON object, or a string holding one.
    #[serde(default)]
    pub jwks: Option<InlineJwks>,
    /// One or more PEM public keys (RSA, EC P-256/P-384, Ed25519).
    #[serde(default)]
    pub pem: Option<String>,
    /// An HMAC secret, base64 (standard or URL-safe alphabet, padding optional). It must
    /// decode to at least the hash size of every HS algorithm allowed: 32 bytes for HS256,
    /// 48 for HS384, 64 for HS512. (Generate one with `openssl rand -base64 32`.)
    #[serde(default)]
    pub hmac_secret: Option<HmacSecret>,
    /// A JWKS the filter fetches and refreshes.
    #[serde(default)]
    pub remote: Option<RemoteJwksConfig>,
}

fn default_true() -> bool {
    true
}

fn default_skew() -> u64 {
    DEFAULT_CLOCK_SKEW_SECS
}

fn default_max_token_bytes() -> usize {
    DEFAULT_MAX_TOKEN_BYTES
}

fn default_refresh_secs() -> u64 {
    DEFAULT_REFRESH_SECS
}

fn default_fetch_timeout() -> TimeoutMs {
    TimeoutMs::default_of(5000)
}

/// An inline JWKS, as a JSON object or as a string holding the JSON text.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged, expecting = "a JWKS object or a string holding JWKS JSON")]
pub enum InlineJwks {
    Text(String),
    Document(Map<String, Value>),
}

/// An HMAC secret in base64. Its `Debug` output is redacted.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct HmacSecret(String);

impl HmacSecret {
    pub fn new(base64: impl Into<String>) -> HmacSecret {
        HmacSecret(base64.into())
    }

    /// The secret bytes: standard or URL-safe base64, padding optional, surrounding
    /// whitespace ignored.
    pub fn decode(&self) -> Result<Vec<u8>, String> {
        let text = self.0.trim();
        B64_STD_LENIENT
            .decode(text)
            .or_else(|_| B64_URL_LENIENT.decode(text))
            .map_err(|_| "is not valid base64".to_string())
    }
}

impl fmt::Debug for HmacSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HmacSecret(<redacted>)")
    }
}

/// Where the filter fetches the provider's JWKS (or its discovery document).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteJwksConfig {
    /// The Envoy cluster to call.
    pub cluster: ClusterName,
    /// The request path: of the JWKS, or of the discovery document when `discovery` is true.
    pub path: UpstreamPath,
    /// The `:authority` of the request.
    pub authority: Authority,
    /// Milliseconds to wait for each fetch (default 5000).
    #[serde(default = "default_fetch_timeout")]
    pub timeout_ms: TimeoutMs,
    /// Refresh period in seconds (default 600, 30..=86400).
    #[serde(default = "default_refresh_secs")]
    pub refresh_secs: u64,
    /// `path` is an OIDC discovery document whose `jwks_uri` names the JWKS.
    #[serde(default)]
    pub discovery: bool,
    /// How long the last fetched keys are trusted when fetching them again fails, counted
    /// from their last successful fetch (default 4 hours, or two refresh periods if longer;
    /// at most 7 days). After it, tokens that need those keys get 503.
    #[serde(default)]
    pub max_stale_secs: Option<u64>,
}

/// Which claims fill which identity fields. Paths are dot-separated object keys
/// (`realm_access.roles`); a segment in double quotes may contain dots
/// (`resource_access."my.app".roles`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimMappingConfig {
    /// The subject claim (default `sub`). A token without it, as a non-empty string, is
    /// refused.
    #[serde(default = "default_subject")]
    pub subject: String,
    /// Claims tried in order for the display name (default `name`, then
    /// `preferred_username`).
    #[serde(default = "default_display_name")]
    pub display_name: Vec<String>,
    /// Role claims, merged in order: arrays of strings, or space-separated strings (`scope`).
    /// Default none: roles come only from claims the operator chose.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Group/organization claims, merged in order: arrays of strings, or single strings.
    #[serde(default)]
    pub groups: Vec<String>,
    /// The tenant claim (a string), e.g. a FIWARE service.
    #[serde(default)]
    pub tenant: Option<String>,
}

fn default_subject() -> String {
    "sub".into()
}

fn default_display_name() -> Vec<String> {
    vec!["name".into(), "preferred_username".into()]
}

impl Default for ClaimMappingConfig {
    fn default() -> Self {
        ClaimMappingConfig {
            subject: default_subject(),
            display_name: default_display_name(),
            roles: Vec::new(),
            groups: Vec::new(),
            tenant: None,
        }
    }
}

impl JwtProviderConfig {
    /// Checks the whole configuration, keys included, exactly as
    /// [`JwtProvider::new`](super::JwtProvider::new) does.
    pub fn validate(&self) -> Result<(), ConfigError> {
        super::JwtProvider::new(self).map(|_| ())
    }

    /// The checks that need no key parsing; returns the allow-list, deduplicated.
    pub(crate) fn check_fields(&self) -> Result<Vec<Algorithm>, ConfigError> {
        if self.issuer.is_empty() {
            return Err(ConfigError::new("issuer", "must not be empty"));
        }
        if self.issuer.trim() != self.issuer || self.issuer.chars().any(char::is_control) {
            return Err(ConfigError::new(
                "issuer",
                "has leading/trailing whitespace or control characters",
            ));
        }
        match (self.audiences.is_empty(), self.allow_any_audience) {
            (true, false) => {
                return Err(ConfigError::new(
                    "audiences",
                    "required: list the `aud` values of tokens for this API, or set \
                     \"allow_any_audience\": true to accept tokens for any audience \
                     (not recommended: RFC 8725 §3.9)",
                ))
            }
            (false, true) => {
                return Err(ConfigError::new(
                    "allow_any_audience",
                    "cannot be combined with `audiences`",
                ))
            }
            _ => {}
        }
        for (i, aud) in self.audiences.iter().enumerate() {
            if aud.is_empty() {
                return Err(ConfigError::new(
                    format!("audiences[{i}]"),
                    "must not be empty",
                ));
            }
        }
        let algorithms = self.check_algorithms()?;
        if self.clock_skew_secs > MAX_CLOCK_SKEW_SECS {
            return Err(ConfigError::new(
                "clock_skew_secs",
                format!(
                    "{} s is more than the maximum of {MAX_CLOCK_SKEW_SECS} s",
                    self.clock_skew_secs
                ),
            ));
        }
        if !(MIN_MAX_TOKEN_BYTES..=MAX_MAX_TOKEN_BYTES).contains(&self.max_token_bytes) {
            return Err(ConfigError::new(
                "max_token_bytes",
                format!(
                    "{} is outside {MIN_MAX_TOKEN_BYTES}..={MAX_MAX_TOKEN_BYTES}",
                    self.max_token_bytes
                ),
            ));
        }
        if self.max_lifetime_secs == Some(0) {
            return Err(ConfigError::new("max_lifetime_secs", "must be positive"));
        }
        if let Some(remote) = &self.remote {
            remote.check()?;
        }
        Ok(algorithms)
    }

    fn check_algorithms(&self) -> Result<Vec<Algorithm>, ConfigError> {
        if self.algorithms.is_empty() {
            return Err(ConfigError::new(
                "algorithms",
                "must list at least one algorithm, e.g. [\"RS256\"]",
            ));
        }
        let mut out = Vec::new();
        for (i, name) in self.algorithms.iter().enumerate() {
            let field = format!("algorithms[{i}]");
            if name.is_empty() {
                return Err(ConfigError::new(field, "empty algorithm name"));
            }
            if name.eq_ignore_ascii_case("none") {
                return Err(ConfigError::new(field, "\"none\" is never allowed"));
            }
            let alg = Algorithm::from_name(name).ok_or_else(|| {
                let supported: Vec<&str> = Algorithm::ALL.iter().map(|a| a.name()).collect();
                ConfigError::new(
                    field,
                    format!(
                        "unknown algorithm {name:?}; supported: {}",
                        supported.join(", ")
                    ),
                )
            })?;
            if !out.contains(&alg) {
                out.push(alg);
            }
        }
        Ok(out)
    }
}

impl RemoteJwksConfig {
    /// Where the keys (or the discovery document) are fetched.
    pub fn target(&self) -> Target<'_> {
        Target {
            cluster: &self.cluster,
            authority: Some(&self.authority),
            timeout: self.timeout_ms,
        }
    }

    fn check(&self) -> Result<(), ConfigError> {
        // The endpoint (cluster, path, authority, timeout) was checked as it was read.
        if !(MIN_REFRESH_SECS..=MAX_REFRESH_SECS).contains(&self.refresh_secs) {
            return Err(ConfigError::new(
                "remote.refresh_secs",
                format!(
                    "{} is outside {MIN_REFRESH_SECS}..={MAX_REFRESH_SECS}",
                    self.refresh_secs
                ),
            ));
        }
        if let Some(max_stale) = self.max_stale_secs {
            if max_stale < self.refresh_secs || max_stale > MAX_MAX_STALE_SECS {
                return Err(ConfigError::new(
                    "remote.max_stale_secs",
                    format!(
                        "{max_stale} is outside refresh_secs..={MAX_MAX_STALE_SECS} \
                         ({}..={MAX_MAX_STALE_SECS})",
                        self.refresh_secs
                    ),
                ));
            }
        }
        Ok(())
    }

    /// How long fetched keys stay usable after their last successful fetch.
    pub fn effective_max_stale_secs(&self) -> u64 {
        self.max_stale_secs
            .unwrap_or(DEFAULT_MAX_STALE_SECS.max(2 * self.refresh_secs))
    }
}
