//! JWT verification for the token-auth filter: several providers at once, chosen by the
//! token's `iss`; keys from inline or fetched JWKS, PEM public keys or an HMAC secret; a
//! per-provider algorithm allow-list; claims mapped onto an [`Identity`].
//!
//! Pure: no I/O and no clock. The filter passes the current time in, fetches remote JWKS and
//! discovery documents itself and hands their text to [`KeySet::from_jwks_json`],
//! [`OidcDiscovery::parse`] and [`JwtProvider::set_remote_keys`].
//!
//! # Hardening (RFC 8725)
//!
//! * The header `alg` must be in the provider's allow-list; `none` can never be configured.
//! * A key only verifies algorithms of its own kind (an RSA key never verifies HS256), so
//!   algorithm confusion fails.
//! * Tokens with a `crit` header, or carrying key material or key locations in the header
//!   (`jwk`, `jku`, `x5u`, `x5c`), are refused; keys only ever come from the configuration.
//! * When the token has a `kid`, only keys with that kid are tried (keys configured without a
//!   kid, e.g. PEM keys, are tried when no key has it). A kid that names nothing is
//!   [`TokenError::UnknownKid`] so the filter can refresh a remote JWKS.
//! * `iss` must equal the provider's issuer; `aud` must intersect the configured audiences
//!   (required, unless the provider opts out with `allow_any_audience`); `exp` is required
//!   unless `require_exp` is false; `nbf` and `iat` may not be in the future. NumericDates
//!   are integers up to [`MAX_NUMERIC_DATE`] (2100). The clock skew is 60 s by default (at
//!   most 300 s), not jwt-simple's 15 minutes; tokens are at most 8 KiB by default.
//! * Header and claims with a repeated member (at any depth) are refused.
//! * Fetched keys are trusted for `remote.max_stale_secs` after their last successful fetch.
//!
//! # Configuration of one provider
//!
//! ```json
//! {
//!   "issuer": "https://keycloak.example.org/realms/fiware",
//!   "audiences": ["orion"],
//!   "algorithms": ["RS256", "ES256"],
//!   "clock_skew_secs": 60,
//!   "max_token_bytes": 8192,
//!   "max_lifetime_secs": 86400,
//!   "claims": {
//!     "subject": "sub",
//!     "display_name": ["name", "preferred_username"],
//!     "roles": ["realm_access.roles", "resource_access.orion.roles"],
//!     "groups": ["groups"],
//!     "tenant": "fiware_service"
//!   },
//!   "remote": {
//!     "cluster": "keycloak",
//!     "authority": "keycloak.example.org",
//!     "path": "/realms/fiware/.well-known/openid-configuration",
//!     "discovery": true,
//!     "refresh_secs": 600
//!   }
//! }
//! ```
//!
//! Instead of (or besides) `remote`: `"jwks": {"keys": [...]}` (or the JWKS as a JSON
//! string), `"pem": "-----BEGIN PUBLIC KEY-----\n..."`, or `"hmac_secret": "<base64>"`
//! (at least 32 bytes once decoded for HS256, 48 for HS384, 64 for HS512).
//! `require_exp` (default true) may be set to false for issuers whose tokens have no `exp`.

mod algorithm;
mod claims;
mod config;
mod discovery;
mod error;
mod keys;
#[cfg(test)]
mod tests;

use std::collections::HashSet;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jwt_simple::prelude::{Duration, UnixTimeStamp, VerificationOptions};
use serde_json::{Map, Value};

pub use algorithm::{Algorithm, KeyKind};
pub use claims::ClaimPath;
pub use config::{
    ClaimMappingConfig, HmacSecret, InlineJwks, JwtProviderConfig, RemoteJwksConfig,
    DEFAULT_CLOCK_SKEW_SECS, DEFAULT_MAX_STALE_SECS, DEFAULT_MAX_TOKEN_BYTES, DEFAULT_REFRESH_SECS,
    MAX_CLOCK_SKEW_SECS, MAX_MAX_STALE_SECS, MAX_MAX_TOKEN_BYTES, MAX_REFRESH_SECS,
    MIN_MAX_TOKEN_BYTES, MIN_REFRESH_SECS,
};
pub use discovery::{
    issuer_from_discovery, jwks_uri_from_discovery, split_url, OidcDiscovery, UrlParts,
    MAX_DISCOVERY_BYTES,
};
pub use error::{ConfigError, KeyError, TokenError};
pub use keys::{KeySet, VerificationKey, MAX_JWKS_BYTES, MAX_JWKS_KEYS};

use crate::identity::Identity;
use crate::strict_json::{self, StrictJsonError};
use claims::ClaimMapping;

/// The latest "now" used: later times are clamped, so that time arithmetic in the
/// verification library (32.32 fixed point) cannot overflow.
const MAX_NOW: u64 = u32::MAX as u64 - MAX_CLOCK_SKEW_SECS - 1;

/// Header parameters that carry or locate a key. Keys only ever come from the configuration,
/// so a token with one of these is refused.
const EMBEDDED_KEY_PARAMS: [&str; 4] = ["jwk", "jku", "x5u", "x5c"];

/// A token that verified, and the identity it establishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    pub identity: Identity,
    /// `exp`, seconds since the epoch.
    pub expires_at: Option<u64>,
    /// The provider's issuer (equal to the token's `iss`).
    pub issuer: String,
    /// When verified with fetched keys: the time they go stale. A verdict cached past it
    /// would outlive the keys it was made with.
    pub keys_fresh_until: Option<u64>,
}

/// A compact JWS split and decoded, not verified.
struct ParsedToken {
    header: Map<String, Value>,
    payload: Map<String, Value>,
}

fn decode_segment(segment: &str, what: &'static str) -> Result<Vec<u8>, TokenError> {
    URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| TokenError::Malformed(what))
}

/// Decodes a header or payload. A repeated member (at any depth) is refused: readers that keep
/// the first or the last copy would disagree on what the token says.
fn json_object(
    bytes: &[u8],
    what: &'static str,
    part: &'static str,
) -> Result<Map<String, Value>, TokenError> {
    match strict_json::parse_object(bytes) {
        Ok(obj) => Ok(obj),
        Err(StrictJsonError::DuplicateMember) => Err(TokenError::DuplicateMember(part)),
        Err(_) => Err(TokenError::Malformed(what)),
    }
}

fn parse_token(token: &str) -> Result<ParsedToken, TokenError> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed("not three dot-separated parts"));
    };
    if header.is_empty() || payload.is_empty() {
        return Err(TokenError::Malformed("empty header or payload"));
    }
    let header = json_object(
        &decode_segment(header, "header is not base64url")?,
        "header is not a JSON object",
        "header",
    )?;
    let payload = json_object(
        &decode_segment(payload, "payload is not base64url")?,
        "payload is not a JSON object",
        "claims",
    )?;
    decode_segment(signature, "signature is not base64url")?;
    Ok(ParsedToken { header, payload })
}

/// Reads the token's `iss` without verifying anything, to choose the provider. Tokens larger
/// than [`MAX_MAX_TOKEN_BYTES`] are refused before being decoded.
pub fn peek_issuer(token: &str) -> Result<String, TokenError> {
    if token.len() > MAX_MAX_TOKEN_BYTES {
        return Err(TokenError::TooLarge {
            limit: MAX_MAX_TOKEN_BYTES,
        });
    }
    let parsed = parse_token(token)?;
    match parsed.payload.get("iss") {
        Some(Value::String(iss)) if !iss.is_empty() => Ok(iss.clone()),
        Some(Value::String(_)) | None => Err(TokenError::MissingIssuer),
        Some(_) => Err(TokenError::MalformedClaims("iss is not a string")),
    }
}

/// The header parameters that matter before a key is chosen: `alg` and `kid`.
fn check_header(header: &Map<String, Value>) -> Result<(&str, Option<&str>), TokenError> {
    if header.contains_key("crit") {
        return Err(TokenError::CriticalHeader);
    }
    if EMBEDDED_KEY_PARAMS.iter().any(|p| header.contains_key(*p)) {
        return Err(TokenError::EmbeddedKey);
    }
    let alg = match header.get("alg") {
        Some(Value::String(alg)) => alg.as_str(),
        _ => return Err(TokenError::Malformed("header has no alg string")),
    };
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(kid)) => Some(kid.as_str()),
        Some(_) => return Err(TokenError::Malformed("kid is not a string")),
    };
    if !matches!(header.get("typ"), None | Some(Value::String(_))) {
        return Err(TokenError::Malformed("typ is not a string"));
    }
    Ok((alg, kid))
}

/// The time claims, as whole seconds.
#[derive(Debug, Clone, Copy)]
struct TimeClaims {
    exp: Option<u64>,
    nbf: Option<u64>,
    iat: Option<u64>,
}

/// The latest NumericDate accepted (`exp`, `nbf`, `iat`): 2100-01-01T00:00:00Z. Later dates
/// are absurd for a token, and beyond 2^32 s the verification library's fixed-point time
/// saturates, so a token with `exp` 1e20 would never expire.
pub const MAX_NUMERIC_DATE: u64 = 4_102_444_800;

/// A NumericDate: an integer number of seconds in `0..=MAX_NUMERIC_DATE`. Fractions,
/// exponents that are not whole numbers, negative and absurd values are refused.
fn timestamp(payload: &Map<String, Value>, name: &str) -> Result<Option<u64>, TokenError> {
    let Some(value) = payload.get(name) else {
        return Ok(None);
    };
    let malformed = match name {
        "exp" => "exp is not an integer NumericDate before 2100",
        "nbf" => "nbf is not an integer NumericDate before 2100",
        _ => "iat is not an integer NumericDate before 2100",
    };
    match value.as_u64() {
        Some(secs) if secs <= MAX_NUMERIC_DATE => Ok(Some(secs)),
        _ => Err(TokenError::MalformedClaims(malformed)),
    }
}

/// Checks the types of the registered claims (so that the verification library cannot fail
/// on them after the signature check) and returns the time claims.
fn check_registered_claims(payload: &Map<String, Value>) -> Result<TimeClaims, TokenError> {
    for (name, message) in [
        ("iss", "iss is not a string"),
        ("sub", "sub is not a string"),
        ("jti", "jti is not a string"),
        ("nonce", "nonce is not a string"),
    ] {
        if !matches!(payload.get(name), None | Some(Value::String(_))) {
            return Err(TokenError::MalformedClaims(message));
        }
    }
    match payload.get("aud") {
        None | Some(Value::String(_)) => {}
        Some(Value::Array(items)) if items.iter().all(Value::is_string) => {}
        Some(_) => {
            return Err(TokenError::MalformedClaims(
                "aud is not a string or an array of strings",
            ))
        }
    }
    Ok(TimeClaims {
        exp: timestamp(payload, "exp")?,
        nbf: timestamp(payload, "nbf")?,
        iat: timestamp(payload, "iat")?,
    })
}

/// The outcome of one key's attempt, as far as the key loop is concerned.
fn classify(err: &jwt_simple::Error, max_token_bytes: usize) -> Option<TokenError> {
    use jwt_simple::JWTError as E;
    // `None`: the signature did not verify with this key; try the next one. Errors that are
    // not the library's own (a signature of the wrong length, a codec error) are counted as
    // a signature failure too: they can only make a token fail.
    let mapped = match err.downcast_ref::<E>()? {
        E::InvalidSignature | E::InvalidAuthenticationTag => return None,
        E::TokenHasExpired => TokenError::Expired,
        E::TokenNotValidYet => TokenError::NotYetValid,
        E::ClockDrift => TokenError::IssuedInFuture,
        E::RequiredIssuerMismatch | E::RequiredIssuerMissing => TokenError::IssuerMismatch,
        E::RequiredAudienceMismatch | E::RequiredAudienceMissing => TokenError::AudienceMismatch,
        E::TokenTooLong | E::HeaderTooLarge => TokenError::TooLarge {
            limit: max_token_bytes,
        },
        E::AlgorithmMismatch => TokenError::AlgorithmNotAllowed,
        E::UnknownCriticalExtension => TokenError::CriticalHeader,
        E::NotJWT => TokenError::NotJwt,
        E::CompactEncodingError => TokenError::Malformed("not a compact JWS"),
        E::MissingSalt => TokenError::Rejected("unsupported salt header"),
        _ => TokenError::Rejected("verification failed"),
    };
    Some(mapped)
}

/// One provider (issuer), ready to verify its tokens.
#[derive(Debug, Clone)]
pub struct JwtProvider {
    issuer: String,
    audiences: Vec<String>,
    algorithms: Vec<Algorithm>,
    require_exp: bool,
    clock_skew_secs: u64,
    max_token_bytes: usize,
    max_lifetime_secs: Option<u64>,
    claims: ClaimMapping,
    static_keys: KeySet,
    remote_keys: KeySet,
    /// When the fetched keys were last fetched (or fetched again unchanged).
    remote_fetched_at: Option<u64>,
    remote: Option<RemoteJwksConfig>,
}

impl JwtProvider {
    /// Validates `config` and parses its inline keys. The error names the field at fault.
    pub fn new(config: &JwtProviderConfig) -> Result<JwtProvider, ConfigError> {
        let algorithms = config.check_fields()?;
        let claims = ClaimMapping::from_config(&config.claims)?;

        let mut static_keys = KeySet::empty();
        if let Some(jwks) = &config.jwks {
            let parsed = match jwks {
                InlineJwks::Text(text) => KeySet::from_jwks_json(text),
                InlineJwks::Document(doc) => KeySet::from_jwks_value(&Value::Object(doc.clone())),
            };
            static_keys.merge(parsed.map_err(|e| ConfigError::new("jwks", e.to_string()))?);
        }
        if let Some(pem) = &config.pem {
            static_keys
                .merge(KeySet::from_pem(pem).map_err(|e| ConfigError::new("pem", e.to_string()))?);
        }
        if let Some(secret) = &config.hmac_secret {
            let bytes = secret
                .decode()
                .map_err(|message| ConfigError::new("hmac_secret", message))?;
            for alg in algorithms.iter().filter(|a| a.is_hmac()) {
                if bytes.len() < alg.min_secret_len() {
                    return Err(ConfigError::new(
                        "hmac_secret",
                        format!(
                            "decodes to {} bytes; {} needs at least {}",
                            bytes.len(),
                            alg.name(),
                            alg.min_secret_len()
                        ),
                    ));
                }
            }
            static_keys.merge(
                KeySet::from_hmac_secret(&bytes)
                    .map_err(|e| ConfigError::new("hmac_secret", e.to_string()))?,
            );
        }

        if static_keys.is_empty() && config.remote.is_none() {
            return Err(ConfigError::new(
                "jwks",
                "no keys: set `jwks`, `pem`, `hmac_secret` or `remote`",
            ));
        }
        // HMAC keys never come from a remote JWKS (it is public), so an allowed HS algorithm
        // needs a configured secret.
        for (i, alg) in algorithms.iter().enumerate() {
            if alg.is_hmac() && !static_keys.supports(*alg) {
                return Err(ConfigError::new(
                    format!("algorithms[{i}]"),
                    format!(
                        "{} needs an HMAC key: set `hmac_secret` (or an oct key in `jwks`)",
                        alg.name()
                    ),
                ));
            }
        }
        if config.remote.is_none() && !algorithms.iter().any(|a| static_keys.supports(*a)) {
            return Err(ConfigError::new(
                "algorithms",
                "no configured key can verify any of the allowed algorithms",
            ));
        }

        Ok(JwtProvider {
            issuer: config.issuer.clone(),
            audiences: config.audiences.clone(),
            algorithms,
            require_exp: config.require_exp,
            clock_skew_secs: config.clock_skew_secs,
            max_token_bytes: config.max_token_bytes,
            max_lifetime_secs: config.max_lifetime_secs,
            claims,
            static_keys,
            remote_keys: KeySet::empty(),
            remote_fetched_at: None,
            remote: config.remote.clone(),
        })
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn algorithms(&self) -> &[Algorithm] {
        &self.algorithms
    }

    pub fn max_token_bytes(&self) -> usize {
        self.max_token_bytes
    }

    /// Where the filter fetches this provider's JWKS, if anywhere.
    pub fn remote(&self) -> Option<&RemoteJwksConfig> {
        self.remote.as_ref()
    }

    /// The keys from the configuration.
    pub fn static_keys(&self) -> &KeySet {
        &self.static_keys
    }

    /// The keys last fetched (empty until the first successful fetch).
    pub fn remote_keys(&self) -> &KeySet {
        &self.remote_keys
    }

    /// True once the provider has any key to verify with.
    pub fn has_keys(&self) -> bool {
        !self.static_keys.is_empty() || !self.remote_keys.is_empty()
    }

    /// Configuration choices worth a warning at configure time.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.audiences.is_empty() {
            out.push(format!(
                "provider {:?}: allow_any_audience is set: tokens issued for any client of \
                 this issuer are accepted (RFC 8725 §3.9)",
                self.issuer
            ));
        }
        out
    }

    /// The last time the fetched keys may be used (None without fetched keys).
    fn remote_keys_fresh_until(&self) -> Option<u64> {
        match (&self.remote, self.remote_fetched_at) {
            (Some(remote), Some(at)) if !self.remote_keys.is_empty() => {
                Some(at.saturating_add(remote.effective_max_stale_secs()))
            }
            _ => None,
        }
    }

    /// True when fetched keys are loaded but were last fetched more than
    /// `remote.max_stale_secs` before `now`.
    pub fn remote_keys_stale(&self, now: u64) -> bool {
        self.remote_keys_fresh_until()
            .is_some_and(|until| now > until)
    }

    /// The fetch at `fetched_at` returned the keys already in force: they are fresh again.
    pub fn confirm_remote_keys(&mut self, fetched_at: u64) {
        if !self.remote_keys.is_empty() {
            self.remote_fetched_at = Some(fetched_at);
        }
    }

    /// Replaces the fetched keys (a refresh or a rotation), fetched at `fetched_at`. HMAC
    /// keys are dropped (a fetched JWKS is public). If nothing usable for the allowed
    /// algorithms remains, the previous keys stay and the error says why.
    pub fn set_remote_keys(&mut self, keys: KeySet, fetched_at: u64) -> Result<(), KeyError> {
        let keys = keys.without_symmetric();
        if !self.algorithms.iter().any(|a| keys.supports(*a)) {
            let mut skipped = keys.skipped().to_vec();
            let allowed: Vec<&str> = self.algorithms.iter().map(|a| a.name()).collect();
            skipped.push(format!(
                "no key for the allowed algorithms ({})",
                allowed.join(", ")
            ));
            return Err(KeyError::NoUsableKeys { skipped });
        }
        self.remote_keys = keys;
        self.remote_fetched_at = Some(fetched_at);
        Ok(())
    }

    /// Parses a discovery document fetched for this provider and checks that its `issuer` is
    /// the configured one (OpenID Connect Discovery §4.3).
    pub fn check_discovery(&self, json: &str) -> Result<OidcDiscovery, KeyError> {
        let discovery = OidcDiscovery::parse(json)?;
        if discovery.issuer != self.issuer {
            return Err(KeyError::DiscoveryIssuerMismatch {
                expected: self.issuer.clone(),
                found: discovery.issuer,
            });
        }
        Ok(discovery)
    }

    fn options(&self, now: u64) -> VerificationOptions {
        VerificationOptions {
            accept_future: false,
            allowed_issuers: Some(HashSet::from([self.issuer.clone()])),
            allowed_audiences: if self.audiences.is_empty() {
                None
            } else {
                Some(self.audiences.iter().cloned().collect())
            },
            // Always explicit: the library's default is 15 minutes.
            time_tolerance: Some(Duration::from_secs(self.clock_skew_secs)),
            max_token_length: Some(self.max_token_bytes),
            max_header_length: Some(self.max_token_bytes),
            artificial_time: Some(UnixTimeStamp::from_secs(now)),
            ..VerificationOptions::default()
        }
    }

    /// The keys to try for `alg` and `kid` at `now`, and whether they were chosen because no
    /// key has the token's kid. Stale fetched keys are not used: a token that would need
    /// them is [`TokenError::KeysStale`].
    fn candidates(
        &self,
        alg: Algorithm,
        kid: Option<&str>,
        now: u64,
    ) -> Result<(Vec<&VerificationKey>, bool), TokenError> {
        let stale = self.remote_keys_stale(now);
        let remote: &[VerificationKey] = if stale { &[] } else { self.remote_keys.keys() };
        let all: Vec<&VerificationKey> = self.static_keys.keys().iter().chain(remote).collect();
        let chosen = Self::choose(all, alg, kid);
        match chosen {
            Err(_) if stale => Err(TokenError::KeysStale),
            other => other,
        }
    }

    fn choose<'k>(
        all: Vec<&'k VerificationKey>,
        alg: Algorithm,
        kid: Option<&str>,
    ) -> Result<(Vec<&'k VerificationKey>, bool), TokenError> {
        if all.is_empty() {
            return Err(TokenError::KeysUnavailable);
        }
        let Some(kid) = kid else {
            let usable: Vec<_> = all.into_iter().filter(|k| k.can_verify(alg)).collect();
            if usable.is_empty() {
                return Err(TokenError::KeyTypeMismatch);
            }
            return Ok((usable, false));
        };
        let named: Vec<_> = all
            .iter()
            .copied()
            .filter(|k| k.kid() == Some(kid))
            .collect();
        if !named.is_empty() {
            let usable: Vec<_> = named.into_iter().filter(|k| k.can_verify(alg)).collect();
            if usable.is_empty() {
                return Err(TokenError::KeyTypeMismatch);
            }
            return Ok((usable, false));
        }
        let anonymous: Vec<_> = all
            .into_iter()
            .filter(|k| k.kid().is_none() && k.can_verify(alg))
            .collect();
        if anonymous.is_empty() {
            return Err(TokenError::UnknownKid);
        }
        Ok((anonymous, true))
    }

    /// Verifies `token` at time `now` (seconds since the epoch) and maps its claims.
    pub fn verify(&self, token: &str, now: u64) -> Result<VerifiedToken, TokenError> {
        if token.len() > self.max_token_bytes {
            return Err(TokenError::TooLarge {
                limit: self.max_token_bytes,
            });
        }
        let parsed = parse_token(token)?;
        let (alg_name, kid) = check_header(&parsed.header)?;
        let alg = Algorithm::from_name(alg_name)
            .filter(|alg| self.algorithms.contains(alg))
            .ok_or(TokenError::AlgorithmNotAllowed)?;
        let times = check_registered_claims(&parsed.payload)?;
        match parsed.payload.get("iss") {
            Some(Value::String(iss)) if *iss == self.issuer => {}
            Some(_) => return Err(TokenError::IssuerMismatch),
            None => return Err(TokenError::MissingIssuer),
        }
        let now = now.min(MAX_NOW);
        let (candidates, kid_unmatched) = self.candidates(alg, kid, now)?;

        let options = self.options(now);
        for key in candidates {
            match key.verify(alg, token, options.clone()) {
                Ok(_) => {
                    let mut verified = self.finish(&parsed.payload, times, now)?;
                    let fetched = self.remote_keys.keys().iter().any(|k| std::ptr::eq(k, key));
                    if fetched {
                        verified.keys_fresh_until = self.remote_keys_fresh_until();
                    }
                    return Ok(verified);
                }
                Err(err) => {
                    if let Some(error) = classify(&err, self.max_token_bytes) {
                        return Err(error);
                    }
                }
            }
        }
        Err(if kid_unmatched && self.remote_keys_stale(now) {
            TokenError::KeysStale
        } else if kid_unmatched {
            TokenError::UnknownKid
        } else {
            TokenError::InvalidSignature
        })
    }

    /// The checks after the signature and the library's claim checks passed.
    fn finish(
        &self,
        payload: &Map<String, Value>,
        times: TimeClaims,
        now: u64,
    ) -> Result<VerifiedToken, TokenError> {
        if self.require_exp && times.exp.is_none() {
            return Err(TokenError::MissingExpiry);
        }
        // The library checked these too, in its fixed-point time; checked again here on the
        // bounded whole seconds, so no saturation anywhere can make a token valid.
        let skew = self.clock_skew_secs;
        if times.exp.is_some_and(|exp| exp.saturating_add(skew) < now) {
            return Err(TokenError::Expired);
        }
        if times.nbf.is_some_and(|nbf| nbf > now.saturating_add(skew)) {
            return Err(TokenError::NotYetValid);
        }
        if times.iat.is_some_and(|iat| iat > now.saturating_add(skew)) {
            return Err(TokenError::IssuedInFuture);
        }
        if let Some(max) = self.max_lifetime_secs {
            let exp = times.exp.ok_or(TokenError::MissingExpiry)?;
            let start = times.iat.unwrap_or(now);
            if exp.saturating_sub(start) > max {
                return Err(TokenError::LifetimeTooLong);
            }
        }
        let identity = self.claims.identity(payload, times.exp)?;
        Ok(VerifiedToken {
            identity,
            expires_at: times.exp,
            issuer: self.issuer.clone(),
            keys_fresh_until: None,
        })
    }
}

/// All providers of a filter, chosen by the token's `iss`.
#[derive(Debug, Clone)]
pub struct JwtVerifier {
    providers: Vec<JwtProvider>,
}

impl JwtVerifier {
    /// Builds every provider; refuses an empty list and two providers with the same issuer.
    pub fn new(configs: &[JwtProviderConfig]) -> Result<JwtVerifier, ConfigError> {
        let providers = configs
            .iter()
            .enumerate()
            .map(|(i, config)| {
                JwtProvider::new(config)
                    .map_err(|e| ConfigError::new(format!("providers[{i}].{}", e.field), e.message))
            })
            .collect::<Result<Vec<_>, _>>()?;
        JwtVerifier::from_providers(providers)
    }

    pub fn from_providers(providers: Vec<JwtProvider>) -> Result<JwtVerifier, ConfigError> {
        if providers.is_empty() {
            return Err(ConfigError::new(
                "providers",
                "at least one provider is required",
            ));
        }
        for (i, provider) in providers.iter().enumerate() {
            if providers[..i].iter().any(|p| p.issuer == provider.issuer) {
                return Err(ConfigError::new(
                    format!("providers[{i}].issuer"),
                    format!("issuer {:?} is configured twice", provider.issuer),
                ));
            }
        }
        Ok(JwtVerifier { providers })
    }

    pub fn providers(&self) -> &[JwtProvider] {
        &self.providers
    }

    /// Every provider's configure-time warnings.
    pub fn warnings(&self) -> Vec<String> {
        self.providers
            .iter()
            .flat_map(JwtProvider::warnings)
            .collect()
    }

    pub fn provider(&self, issuer: &str) -> Option<&JwtProvider> {
        self.providers.iter().find(|p| p.issuer == issuer)
    }

    /// For installing fetched keys.
    pub fn provider_mut(&mut self, issuer: &str) -> Option<&mut JwtProvider> {
        self.providers.iter_mut().find(|p| p.issuer == issuer)
    }

    /// Chooses the provider by the token's (unverified) `iss`, then verifies with it.
    pub fn verify(&self, token: &str, now: u64) -> Result<VerifiedToken, TokenError> {
        let limit = self
            .providers
            .iter()
            .map(|p| p.max_token_bytes)
            .max()
            .unwrap_or(DEFAULT_MAX_TOKEN_BYTES);
        if token.len() > limit {
            return Err(TokenError::TooLarge { limit });
        }
        let issuer = peek_issuer(token)?;
        self.provider(&issuer)
            .ok_or(TokenError::UnknownIssuer)?
            .verify(token, now)
    }
}
