//! Errors of JWT verification, key parsing and provider configuration.
//!
//! [`TokenError`] is what a request gets: its [`Display`](std::fmt::Display) text is for logs
//! (it never contains key material or claim values), [`TokenError::description`] is what the
//! client may see, and [`TokenError::error_code`] is the RFC 6750 `error` attribute.

use crate::decision::DenyReason;

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a compact JWS: wrong number of parts, bad base64url, header or payload not a JSON
    /// object. RFC 6750 `invalid_request`.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// Larger than the provider's (or the global) size limit. RFC 6750 `invalid_request`.
    #[error("token is larger than the {limit}-byte limit")]
    TooLarge { limit: usize },
    /// The payload has no string `iss`, so no provider can be chosen.
    #[error("token has no iss claim")]
    MissingIssuer,
    /// No provider is configured for the token's `iss`.
    #[error("no provider is configured for the token issuer")]
    UnknownIssuer,
    /// `iss` is not the provider's issuer.
    #[error("token issuer does not match the provider")]
    IssuerMismatch,
    /// The header `alg` is `none`, unknown, or not in the provider's allow-list.
    #[error("token algorithm is not allowed")]
    AlgorithmNotAllowed,
    /// The header has a `crit` parameter; no extension is supported.
    #[error("token header has a crit parameter")]
    CriticalHeader,
    /// The header carries key material or a key location (`jwk`, `jku`, `x5u`, `x5c`).
    /// Such keys are never used; the token is refused outright.
    #[error("token header carries its own key (jwk/jku/x5u/x5c)")]
    EmbeddedKey,
    /// The header `kid` names no configured key. The filter may refresh a remote JWKS
    /// (rate-limited) and retry.
    #[error("token kid matches no known key")]
    UnknownKid,
    /// No key of the type the header `alg` needs (e.g. an HS256 token whose kid names an RSA
    /// key).
    #[error("no key of the type the token algorithm needs")]
    KeyTypeMismatch,
    /// The provider has no keys yet (its remote JWKS has not been fetched). The filter
    /// answers 503, not 401.
    #[error("no keys are loaded for this issuer yet")]
    KeysUnavailable,
    /// The token needs the fetched keys, and they were last fetched longer ago than the
    /// provider's `remote.max_stale_secs`: the filter fetches again, and answers 503 if that
    /// fails (a key the IdP rotated out must stop working even while the IdP is unreachable).
    #[error("the fetched keys for this issuer are stale")]
    KeysStale,
    /// The header or the claims repeat a member (at any depth): readers that keep the first
    /// or the last copy would disagree on what the token says.
    #[error("token {0} has a duplicate member")]
    DuplicateMember(&'static str),
    /// No candidate key verifies the signature.
    #[error("token signature does not verify")]
    InvalidSignature,
    /// A registered claim has the wrong type (`exp` a string, `aud` an object, ...).
    #[error("malformed token claims: {0}")]
    MalformedClaims(&'static str),
    /// `exp` is past, beyond the clock skew.
    #[error("token has expired")]
    Expired,
    /// `nbf` is in the future, beyond the clock skew.
    #[error("token is not valid yet (nbf)")]
    NotYetValid,
    /// `iat` is in the future, beyond the clock skew.
    #[error("token was issued in the future (iat)")]
    IssuedInFuture,
    /// No `exp` and the provider requires one.
    #[error("token has no exp claim")]
    MissingExpiry,
    /// `exp - iat` (or `exp - now` without `iat`) exceeds the provider's maximum lifetime.
    #[error("token lifetime exceeds the provider's maximum")]
    LifetimeTooLong,
    /// `aud` is missing or does not intersect the configured audiences.
    #[error("token audience is not accepted")]
    AudienceMismatch,
    /// The configured subject claim is missing, not a string, empty or has control characters.
    #[error("token has no usable subject claim")]
    MissingSubject,
    /// The header `typ` is neither `JWT` nor `...+jwt`.
    #[error("token type is not JWT")]
    NotJwt,
    /// Any other refusal by the verification library.
    #[error("token rejected: {0}")]
    Rejected(&'static str),
}

impl TokenError {
    /// The RFC 6750 `error` code: `invalid_request` for input that is not a well-formed token,
    /// `invalid_token` for everything else.
    pub fn error_code(&self) -> &'static str {
        match self {
            TokenError::Malformed(_) | TokenError::TooLarge { .. } => "invalid_request",
            _ => "invalid_token",
        }
    }

    /// A short description for the client (`error_description`, NGSI `description`). It names
    /// no key, algorithm, claim value or library detail.
    pub fn description(&self) -> &'static str {
        match self {
            TokenError::Malformed(_) => "malformed token",
            TokenError::TooLarge { .. } => "token too large",
            TokenError::MissingIssuer | TokenError::UnknownIssuer | TokenError::IssuerMismatch => {
                "token issuer not accepted"
            }
            TokenError::Expired => "token expired",
            TokenError::NotYetValid | TokenError::IssuedInFuture => "token not yet valid",
            TokenError::MissingExpiry | TokenError::LifetimeTooLong => {
                "token lifetime not accepted"
            }
            TokenError::AudienceMismatch => "token audience not accepted",
            TokenError::MissingSubject
            | TokenError::MalformedClaims(_)
            | TokenError::DuplicateMember(_) => "token claims not accepted",
            TokenError::KeysUnavailable | TokenError::KeysStale => {
                "token cannot be verified at the moment"
            }
            TokenError::AlgorithmNotAllowed
            | TokenError::CriticalHeader
            | TokenError::EmbeddedKey
            | TokenError::UnknownKid
            | TokenError::KeyTypeMismatch
            | TokenError::InvalidSignature
            | TokenError::NotJwt
            | TokenError::Rejected(_) => "invalid token",
        }
    }

    /// True for [`TokenError::UnknownKid`]: the filter may refresh the JWKS and retry.
    pub fn is_unknown_kid(&self) -> bool {
        matches!(self, TokenError::UnknownKid)
    }

    /// A short, fixed label for metrics and log lines.
    pub fn label(&self) -> &'static str {
        match self {
            TokenError::Malformed(_) => "malformed",
            TokenError::TooLarge { .. } => "too_large",
            TokenError::MissingIssuer => "missing_iss",
            TokenError::UnknownIssuer => "unknown_iss",
            TokenError::IssuerMismatch => "iss_mismatch",
            TokenError::AlgorithmNotAllowed => "alg_not_allowed",
            TokenError::CriticalHeader => "crit",
            TokenError::EmbeddedKey => "embedded_key",
            TokenError::UnknownKid => "unknown_kid",
            TokenError::KeyTypeMismatch => "key_type_mismatch",
            TokenError::KeysUnavailable => "keys_unavailable",
            TokenError::KeysStale => "keys_stale",
            TokenError::DuplicateMember(_) => "duplicate_member",
            TokenError::InvalidSignature => "bad_signature",
            TokenError::MalformedClaims(_) => "malformed_claims",
            TokenError::Expired => "expired",
            TokenError::NotYetValid => "not_yet_valid",
            TokenError::IssuedInFuture => "iat_future",
            TokenError::MissingExpiry => "missing_exp",
            TokenError::LifetimeTooLong => "lifetime_too_long",
            TokenError::AudienceMismatch => "aud_mismatch",
            TokenError::MissingSubject => "missing_sub",
            TokenError::NotJwt => "not_jwt",
            TokenError::Rejected(_) => "rejected",
        }
    }

    /// The decision this error leads to: 400 for `invalid_request`, 503 while keys are not
    /// loaded or stale, 401 otherwise. The description is [`TokenError::description`].
    pub fn deny_reason(&self) -> DenyReason {
        let description = self.description().to_string();
        match self {
            TokenError::KeysUnavailable | TokenError::KeysStale => {
                DenyReason::Unavailable(description)
            }
            _ if self.error_code() == "invalid_request" => DenyReason::BadRequest(description),
            _ => DenyReason::Unauthenticated(description),
        }
    }
}

/// Why a key set (JWKS, PEM, HMAC secret) or an OIDC discovery document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    #[error("document is larger than the {limit}-byte limit")]
    TooLarge { limit: usize },
    #[error("JWKS has more than {limit} keys")]
    TooManyKeys { limit: usize },
    /// Two keys share a `kid`: which one a token means would be a guess, so the whole set is
    /// refused (a fetched one leaves the last good set in force).
    #[error("JWKS has more than one key with kid {kid:?}")]
    DuplicateKid { kid: String },
    /// No entry could be used; `skipped` says why each was skipped.
    #[error("no usable key{}", format_skipped(.skipped))]
    NoUsableKeys { skipped: Vec<String> },
    #[error("invalid PEM: {0}")]
    InvalidPem(String),
    #[error("HMAC secret is {len} bytes; at least {min} are required")]
    WeakHmacSecret { len: usize, min: usize },
    #[error("invalid discovery document: {0}")]
    InvalidDiscovery(String),
    #[error("discovery issuer {found:?} is not the configured issuer {expected:?}")]
    DiscoveryIssuerMismatch { expected: String, found: String },
    #[error("invalid URL: {0}")]
    InvalidUrl(String),
}

fn format_skipped(skipped: &[String]) -> String {
    if skipped.is_empty() {
        String::new()
    } else {
        format!(" (skipped: {})", skipped.join("; "))
    }
}

/// A provider configuration that was refused, naming the field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("JWT provider config: `{field}`: {message}")]
pub struct ConfigError {
    /// The offending field, e.g. `algorithms[1]` or `remote.path`.
    pub field: String,
    pub message: String,
}

impl ConfigError {
    pub(crate) fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            message: message.into(),
        }
    }
}
