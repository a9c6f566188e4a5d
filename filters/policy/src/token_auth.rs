//! The token-auth decision engine: from a request's facts to an outcome the filter executes.
//!
//! It composes the pieces — public routes, credential extraction, device keys, mTLS identity,
//! JWT providers, opaque-token introspection, the verified-token cache and the required roles —
//! and stays pure: the filter passes in the time and the answers of the callouts it makes, and
//! executes [`Outcome`]s. Every path ends in an allow with an identity, a deny with a reason, or
//! a request for data (keys, introspection) after which the filter asks again.

use serde::Deserialize;

use crate::cache::VerdictCache;
use crate::credentials::{Credential, CredentialConfig, FoundCredential, RequestView};
use crate::decision::DenyReason;
use crate::device_keys::{DeviceKeys, DeviceKeysConfig, KeyCheck};
use crate::device_registry::LookupResult;
use crate::identity::{Identity, IdentityKind};
use crate::identity_headers::IdentityHeaderNames;
use crate::introspection::{HttpCall, IntrospectionConfig};
use crate::jwt::{peek_issuer, JwtProvider, JwtProviderConfig, JwtVerifier, KeySet, TokenError};
use crate::mtls::{MtlsConfig, PeerCertificate};
use crate::routes::PublicRoute;

/// The filter's whole configuration (the JSON in Envoy's plugin `configuration`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenAuthConfig {
    /// Allowed requests are logged at `debug` (default), `info`, or not at all (`off`).
    /// Denials are always logged, at warning.
    #[serde(default)]
    pub log_allows: crate::decision_line::LogAllows,
    /// Where credentials are looked for, in order (default: Bearer, then X-Auth-Token).
    #[serde(default)]
    pub credentials: CredentialConfig,
    /// JWT issuers, chosen by the token's `iss`.
    #[serde(default)]
    pub jwt_providers: Vec<JwtProviderConfig>,
    /// Opaque tokens: RFC 7662 introspection or Keyrock.
    #[serde(default)]
    pub introspection: Option<IntrospectionConfig>,
    /// Device keys: digests in the configuration, or a registry to look them up in.
    #[serde(default)]
    pub device_keys: Option<DeviceKeysConfig>,
    /// Identity from the client certificate, for requests without a credential.
    #[serde(default)]
    pub mtls: Option<MtlsConfig>,
    #[serde(default)]
    pub identity_headers: IdentityHeaderNames,
    /// Forward the credential to the upstream (default: strip it; the broker trusts the
    /// identity headers, and tokens in its logs are a liability).
    #[serde(default)]
    pub forward_token: bool,
    #[serde(default)]
    pub public_routes: Vec<PublicRoute>,
    /// If not empty, the caller must have at least one of these roles (else 403: a valid
    /// credential, not for this application).
    #[serde(default)]
    pub required_roles: Vec<String>,
    /// If not empty, a token (JWT or opaque) must have been issued to one of these clients:
    /// the JWT's `azp` (else `client_id`), the introspection answer's `client_id`, Keyrock's
    /// `app_id`. Else 403. Device keys and client certificates are not tokens and not checked.
    #[serde(default)]
    pub authorized_parties: Vec<String>,
    /// The realm in `WWW-Authenticate` challenges.
    #[serde(default = "default_realm")]
    pub realm: String,
    #[serde(default)]
    pub cache: CacheConfig,
}

/// Headers some brokers' frameworks (Express, Rails, Spring's HiddenHttpMethodFilter...) read
/// to replace the request's method: the filters would check a GET the broker runs as a DELETE.
/// Refused (400) rather than stripped, so a client relying on them learns why.
pub const METHOD_OVERRIDE_HEADERS: [&str; 3] = [
    "x-http-method-override",
    "x-method-override",
    "x-http-method",
];
/// The query (or form) parameter with the same effect.
pub const METHOD_OVERRIDE_PARAM: &str = "_method";

/// A client-sent `x-envoy-*` header: Envoy's own controls and records (`x-envoy-original-path`,
/// printed by the default access log; retry and timeout controls) are trusted by Envoy and
/// upstreams alike, and Envoy only sanitizes some of them for external callers. Envoy's router
/// adds its own after the filter chain, so token-auth (first in the chain) drops every one.
pub fn is_client_envoy_header(name: &[u8]) -> bool {
    name.len() > 8 && name[..8].eq_ignore_ascii_case(b"x-envoy-")
}

/// How the request tries to override its method, if it does (names are lowercase in facts;
/// the query is percent-decoded, so `%5Fmethod` counts).
fn method_override(facts: &RequestFacts<'_>) -> Option<String> {
    if let Some((name, _)) = facts
        .headers
        .iter()
        .find(|(n, _)| METHOD_OVERRIDE_HEADERS.contains(&n.as_str()))
    {
        return Some(format!("header {name}"));
    }
    let query = facts.path.split_once('?').map(|(_, q)| q)?;
    url::form_urlencoded::parse(query.as_bytes())
        .any(|(k, _)| k.eq_ignore_ascii_case(METHOD_OVERRIDE_PARAM))
        .then(|| format!("query parameter {METHOD_OVERRIDE_PARAM}"))
}

fn default_realm() -> String {
    "iot".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Verified tokens kept per VM.
    pub capacity: usize,
    /// Longest a verified JWT stays cached (it never outlives its `exp`).
    pub max_ttl_secs: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            capacity: 10_000,
            max_ttl_secs: 300,
        }
    }
}

/// What the filter must do with a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A public route: no identity, continue, without any credential the client sent (unless
    /// `forward_token`): the headers to remove and the `:path` without query credentials.
    Public {
        strip_headers: Vec<String>,
        new_path: Option<String>,
    },
    /// Authenticated: set the identity headers, remove the credential unless forwarded.
    Allow {
        identity: Identity,
        /// Request headers to remove (the credential's), and the `:path` without a query
        /// token, if it changes.
        strip_headers: Vec<String>,
        new_path: Option<String>,
    },
    /// Refused: the status, NGSI body and log line come from the reason.
    Deny {
        reason: DenyReason,
        /// The `WWW-Authenticate` value, for 400/401/403.
        challenge: Option<String>,
        /// Who was refused, when the credential was verified (a 403 for a missing role or
        /// an unauthorized party), for the decision line; `None` when nobody was verified.
        subject: Option<String>,
    },
    /// The keys of this issuer are not loaded (or a kid is unknown): fetch them, then ask
    /// again with [`TokenAuth::authenticate`].
    FetchKeys { issuer: String },
    /// An opaque token: make this callout, then hand the answer to
    /// [`TokenAuth::finish_introspection`].
    Introspect { token: String, call: HttpCall },
    /// A device the configuration does not list: look it up in the registry with this call,
    /// then hand the answer to [`TokenAuth::finish_device_lookup`].
    LookupDevice { device_id: String, call: HttpCall },
}

/// A verdict as cached: identity or a (short-lived) refusal.
#[derive(Debug, Clone, PartialEq)]
enum Cached {
    Allowed(Identity),
    Refused(DenyReason),
}

/// The request facts the engine needs, read by the filter.
pub struct RequestFacts<'a> {
    pub method: &'a str,
    /// `:path` with its query.
    pub path: &'a str,
    /// Lowercase names; repeats kept.
    pub headers: &'a [(String, String)],
    /// The verified client certificate, if the connection has one.
    pub peer: Option<PeerCertificate>,
}

/// Events the filter counts (monotonic, per VM), beside the decisions themselves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuthCounters {
    /// Requests refused (503) because the fetched keys they need are stale.
    pub stale_keys: u64,
    /// Introspection answers that were not what the protocol says (decided as inactive).
    pub malformed_introspection: u64,
    /// Device registry answers that were not what the contract says (503).
    pub malformed_registry: u64,
}

/// The validated configuration and the per-VM state the decisions use.
pub struct TokenAuth {
    config: TokenAuthConfig,
    /// None when no JWT provider is configured (opaque tokens, device keys or mTLS only).
    jwt: Option<JwtVerifier>,
    device_keys: Option<DeviceKeys>,
    cache: VerdictCache<Cached>,
    counters: AuthCounters,
    /// [`TokenAuth::identity_header_names`], built once (the stage strips them per request).
    identity_header_names: Vec<String>,
}

fn bad_config(what: &str, detail: impl std::fmt::Display) -> String {
    format!("{what}: {detail}")
}

impl TokenAuthConfig {
    /// Reads the environment variables the configuration names (`client_secret_env` of
    /// `introspection.credentials` and of the device registry's `auth.client_credentials`) from
    /// `env`, the VM's environment; call it once at configure time, before [`TokenAuth::new`]
    /// (which refuses one unset).
    pub fn read_environment(&mut self, env: &dyn Fn(&str) -> Option<String>) {
        if let Some(introspection) = &mut self.introspection {
            introspection.read_environment(env);
        }
        let registry = self.device_keys.as_mut().and_then(|d| d.registry.as_mut());
        if let Some(auth) = registry.and_then(|r| r.auth.as_mut()) {
            auth.client_credentials.read_environment(env);
        }
    }
}

impl TokenAuth {
    /// Validates everything; the message says what is wrong.
    pub fn new(config: TokenAuthConfig) -> Result<Self, String> {
        config
            .credentials
            .validate()
            .map_err(|e| bad_config("credentials", e))?;
        config.identity_headers.validate()?;
        for route in &config.public_routes {
            route.validate()?;
        }
        if let Some(intro) = &config.introspection {
            // The error names `introspection` itself.
            intro.validate().map_err(|e| e.to_string())?;
        }
        let device_keys = config
            .device_keys
            .as_ref()
            .map(DeviceKeys::new)
            .transpose()
            .map_err(|e| e.detail())?;
        let wants_device_keys = config
            .credentials
            .sources
            .iter()
            .any(|s| matches!(s, crate::credentials::TokenSource::DeviceKey { .. }));
        if wants_device_keys && device_keys.is_none() {
            return Err(
                "credentials has a device_key source but device_keys is not configured".into(),
            );
        }
        let has_token_source = config
            .credentials
            .sources
            .iter()
            .any(|s| !matches!(s, crate::credentials::TokenSource::DeviceKey { .. }));
        if has_token_source && config.jwt_providers.is_empty() && config.introspection.is_none() {
            return Err(
                "credentials look for tokens, but neither jwt_providers nor introspection is configured"
                    .into(),
            );
        }
        if config.realm.is_empty()
            || config.realm.contains(['"', '\\'])
            || config.realm.chars().any(char::is_control)
        {
            return Err(
                "realm must be non-empty text without quotes, backslashes or control characters"
                    .into(),
            );
        }
        if config.authorized_parties.iter().any(|p| p.is_empty()) {
            return Err("authorized_parties: a client id must not be empty".into());
        }
        if config.cache.capacity == 0 {
            return Err("cache.capacity must be at least 1".into());
        }
        let jwt = if config.jwt_providers.is_empty() {
            None
        } else {
            Some(
                JwtVerifier::new(&config.jwt_providers)
                    .map_err(|e| bad_config("jwt_providers", e))?,
            )
        };
        Ok(TokenAuth {
            cache: VerdictCache::new(config.cache.capacity),
            jwt,
            device_keys,
            identity_header_names: identity_header_names(&config.identity_headers),
            config,
            counters: AuthCounters::default(),
        })
    }

    pub fn config(&self) -> &TokenAuthConfig {
        &self.config
    }

    /// Accepted choices worth a warning in the log at configure time.
    pub fn warnings(&self) -> Vec<String> {
        self.jwt
            .as_ref()
            .map(JwtVerifier::warnings)
            .unwrap_or_default()
    }

    pub fn counters(&self) -> AuthCounters {
        self.counters
    }

    /// The configured JWT providers (none if only other credentials are configured).
    pub fn providers(&self) -> &[JwtProvider] {
        self.jwt.as_ref().map(|j| j.providers()).unwrap_or_default()
    }

    pub fn provider(&self, issuer: &str) -> Option<&JwtProvider> {
        self.jwt.as_ref().and_then(|j| j.provider(issuer))
    }

    /// Installs a key set fetched for an issuer at `fetched_at`.
    pub fn set_remote_keys(
        &mut self,
        issuer: &str,
        keys: KeySet,
        fetched_at: u64,
    ) -> Result<(), String> {
        let provider = self
            .jwt
            .as_mut()
            .and_then(|j| j.provider_mut(issuer))
            .ok_or_else(|| format!("no provider for issuer {issuer}"))?;
        provider
            .set_remote_keys(keys, fetched_at)
            .map_err(|e| e.to_string())?;
        // A changed key set clears every verdict: a token verified with a withdrawn key must
        // not outlive the rotation, and a refusal for lack of keys must not outlive new keys.
        // (The filter installs a set only when it differs from the one in force.)
        self.cache.clear();
        Ok(())
    }

    /// The keys in force for `issuer` were fetched again, unchanged, at `fetched_at`.
    pub fn confirm_remote_keys(&mut self, issuer: &str, fetched_at: u64) {
        if let Some(provider) = self.jwt.as_mut().and_then(|j| j.provider_mut(issuer)) {
            provider.confirm_remote_keys(fetched_at);
        }
    }

    fn challenge(&self, error: Option<(&str, &str)>) -> String {
        match error {
            None => format!("Bearer realm=\"{}\"", self.config.realm),
            Some((code, description)) => format!(
                "Bearer realm=\"{}\", error=\"{code}\", error_description=\"{}\"",
                self.config.realm,
                description.replace(['"', '\\'], "'")
            ),
        }
    }

    fn deny(&self, reason: DenyReason) -> Outcome {
        self.deny_as(reason, None)
    }

    /// A refusal; `verified` names the caller when the credential was verified (a 403).
    fn deny_as(&self, reason: DenyReason, verified: Option<&Identity>) -> Outcome {
        let code = match reason {
            DenyReason::BadRequest(_) => Some("invalid_request"),
            DenyReason::Unauthenticated(_) => Some("invalid_token"),
            DenyReason::Forbidden(_) => Some("insufficient_scope"),
            _ => None,
        };
        let challenge = code.map(|c| self.challenge(Some((c, reason.description()))));
        Outcome::Deny {
            reason,
            challenge,
            subject: verified.map(|identity| identity.subject.clone()),
        }
    }

    /// A public route: let it through without whatever credential the client sent, whether
    /// or not it is well-formed (brokers log headers and paths).
    fn public(&self, path: &str) -> Outcome {
        if self.config.forward_token {
            return Outcome::Public {
                strip_headers: Vec::new(),
                new_path: None,
            };
        }
        let credentials = &self.config.credentials;
        let stripped = credentials.strip_all_from_path(path);
        Outcome::Public {
            strip_headers: credentials.all_header_names(),
            new_path: (stripped != path).then_some(stripped),
        }
    }

    /// Allows `identity` if it has a required role, removing the credential as configured.
    fn allow(&self, identity: Identity, found: Option<&FoundCredential>, path: &str) -> Outcome {
        let required = &self.config.required_roles;
        if !required.is_empty() && !required.iter().any(|r| identity.has_role(r)) {
            return self.deny_as(
                DenyReason::Forbidden(
                    "the credential is valid but not for this application".into(),
                ),
                Some(&identity),
            );
        }
        let parties = &self.config.authorized_parties;
        let is_token = matches!(identity.kind, IdentityKind::Jwt | IdentityKind::OpaqueToken);
        if is_token
            && !parties.is_empty()
            && !identity
                .app_id
                .as_ref()
                .is_some_and(|a| parties.contains(a))
        {
            return self.deny_as(
                DenyReason::Forbidden(
                    "the token was issued to a client that is not an authorized party".into(),
                ),
                Some(&identity),
            );
        }
        let (strip_headers, new_path) = match found {
            Some(found) if !self.config.forward_token => {
                let stripped = found.strip_from_path(path);
                (found.headers(), (stripped != path).then_some(stripped))
            }
            _ => (Vec::new(), None),
        };
        Outcome::Allow {
            identity,
            strip_headers,
            new_path,
        }
    }

    /// Decides a request, or says what data is missing.
    pub fn authenticate(&mut self, facts: &RequestFacts<'_>, now: u64) -> Outcome {
        if let Some(how) = method_override(facts) {
            return self.deny(DenyReason::BadRequest(format!(
                "method override ({how}) refused: it changes the request's meaning upstream"
            )));
        }
        if self
            .config
            .public_routes
            .iter()
            .any(|r| r.matches(facts.method, facts.path))
        {
            return self.public(facts.path);
        }
        let view = RequestView::new(facts.headers, facts.path);
        let found = match self.config.credentials.extract(&view) {
            Ok(found) => found,
            Err(reason) => return self.deny(reason),
        };
        let Some(found) = found else {
            // No credential: a verified client certificate may identify the caller.
            if let (Some(mtls), Some(peer)) = (&self.config.mtls, &facts.peer) {
                if let Some(identity) = mtls.identity(peer) {
                    return self.allow(identity, None, facts.path);
                }
            }
            return Outcome::Deny {
                reason: DenyReason::Unauthenticated("missing credential".into()),
                challenge: Some(self.challenge(None)),
                subject: None,
            };
        };
        match &found.credential {
            Credential::DeviceKey { id, key } => {
                let checked = match &self.device_keys {
                    Some(keys) => keys.check(id, key, now),
                    None => {
                        KeyCheck::Refused(DenyReason::Unauthenticated("invalid device key".into()))
                    }
                };
                self.key_outcome(checked, &found, facts.path)
            }
            Credential::Token(token) => self.authenticate_token(token, &found, facts.path, now),
        }
    }

    fn authenticate_token(
        &mut self,
        token: &str,
        found: &FoundCredential,
        path: &str,
        now: u64,
    ) -> Outcome {
        match self.cache.get(token, now) {
            Some(Cached::Allowed(identity)) => return self.allow(identity, Some(found), path),
            Some(Cached::Refused(reason)) => return self.deny(reason),
            None => {}
        }
        let looks_like_jwt = token.split('.').count() == 3;
        let issuer = if looks_like_jwt && self.jwt.is_some() {
            match peek_issuer(token) {
                Ok(issuer) => Some(issuer),
                // Refused before any provider is chosen: say why.
                Err(e @ TokenError::DuplicateMember(_)) => return self.deny(e.deny_reason()),
                Err(_) => None,
            }
        } else {
            None
        };
        let issuer_known = issuer
            .as_deref()
            .is_some_and(|iss| self.provider(iss).is_some());
        if issuer_known {
            return self.verify_jwt(token, found, path, now);
        }
        // A JWT from an issuer no provider names is refused here: sending it to the
        // introspection endpoint would let anyone make the IdP work (and answer 503s) at will.
        // Without JWT providers, JWT-shaped tokens are introspected (Keyrock can issue JWTs).
        if looks_like_jwt && self.jwt.is_some() {
            return self.deny(TokenError::UnknownIssuer.deny_reason());
        }
        if let Some(intro) = &self.config.introspection {
            return Outcome::Introspect {
                token: token.to_string(),
                call: intro.build_request(token),
            };
        }
        let reason = if looks_like_jwt {
            TokenError::UnknownIssuer.deny_reason()
        } else {
            DenyReason::Unauthenticated("invalid token".into())
        };
        self.deny(reason)
    }

    fn verify_jwt(
        &mut self,
        token: &str,
        found: &FoundCredential,
        path: &str,
        now: u64,
    ) -> Outcome {
        let verified = match &self.jwt {
            Some(jwt) => jwt.verify(token, now),
            None => Err(TokenError::UnknownIssuer),
        };
        match verified {
            Ok(verified) => {
                // Never cached past the freshness of the keys that verified it.
                let ttl =
                    verified
                        .keys_fresh_until
                        .map_or(self.config.cache.max_ttl_secs, |until| {
                            until
                                .saturating_sub(now)
                                .min(self.config.cache.max_ttl_secs)
                        });
                self.cache.insert(
                    token,
                    Cached::Allowed(verified.identity.clone()),
                    now,
                    ttl,
                    verified.expires_at,
                );
                self.allow(verified.identity, Some(found), path)
            }
            Err(TokenError::UnknownKid | TokenError::KeysUnavailable | TokenError::KeysStale) => {
                match peek_issuer(token) {
                    Ok(issuer) if self.provider(&issuer).is_some_and(|p| p.remote().is_some()) => {
                        Outcome::FetchKeys { issuer }
                    }
                    _ => self.deny(TokenError::UnknownKid.deny_reason()),
                }
            }
            Err(e) => self.deny(e.deny_reason()),
        }
    }

    /// After the keys could not be (re)fetched: decide with what is loaded. A token whose
    /// key is still unknown is refused; if no keys at all are available, the IdP is down: 503.
    pub fn authenticate_without_fetch(&mut self, facts: &RequestFacts<'_>, now: u64) -> Outcome {
        match self.authenticate(facts, now) {
            Outcome::FetchKeys { issuer } => {
                let provider = self.provider(&issuer);
                let stale = provider.is_some_and(|p| p.remote_keys_stale(now));
                let has_keys = provider.is_some_and(|p| p.has_keys());
                if stale {
                    self.counters.stale_keys += 1;
                    Outcome::Deny {
                        reason: TokenError::KeysStale.deny_reason(),
                        challenge: None,
                        subject: None,
                    }
                } else if has_keys {
                    self.deny(TokenError::UnknownKid.deny_reason())
                } else {
                    Outcome::Deny {
                        reason: DenyReason::Unavailable(
                            "the identity provider's keys are not available".into(),
                        ),
                        challenge: None,
                        subject: None,
                    }
                }
            }
            other => other,
        }
    }

    /// Decides an opaque token from the introspection answer (`status` 0 = no answer).
    /// Returns the outcome for every request waiting on this token.
    pub fn finish_introspection(
        &mut self,
        token: &str,
        status: u32,
        body: &[u8],
        now: u64,
    ) -> IntrospectionOutcome {
        let Some(intro) = self.config.introspection.clone() else {
            return IntrospectionOutcome::Refused(DenyReason::Unavailable(
                "introspection is not configured".into(),
            ));
        };
        let decided = intro.decide(status, body, now);
        if decided.malformed {
            self.counters.malformed_introspection += 1;
        }
        if let Some(ttl) = decided.cache_ttl {
            let (cached, token_exp) = match &decided.outcome {
                Ok(identity) => (Cached::Allowed(identity.clone()), identity.expires_at),
                Err(reason) => (Cached::Refused(reason.clone()), None),
            };
            self.cache.insert(token, cached, now, ttl, token_exp);
        }
        match decided.outcome {
            Ok(identity) => IntrospectionOutcome::Allowed(identity),
            Err(reason) => IntrospectionOutcome::Refused(reason),
        }
    }

    fn key_outcome(&self, checked: KeyCheck, found: &FoundCredential, path: &str) -> Outcome {
        match checked {
            KeyCheck::Verified(identity) => self.allow(identity, Some(found), path),
            KeyCheck::Refused(reason) => self.deny(reason),
            KeyCheck::Lookup { device_id, call } => Outcome::LookupDevice { device_id, call },
        }
    }

    /// Decides the device registry's answer about `device_id` (`status` 0: no answer) and
    /// caches it. Returns the result every request waiting on this device is decided with.
    pub fn finish_device_lookup(
        &mut self,
        device_id: &str,
        status: u32,
        body: &[u8],
        now: u64,
    ) -> LookupResult {
        let Some(keys) = &self.device_keys else {
            return Err(DenyReason::Unavailable(
                "no device registry is configured".into(),
            ));
        };
        let decided = keys.finish_lookup(device_id, status, body, now);
        if decided.malformed {
            self.counters.malformed_registry += 1;
        }
        decided.result
    }

    /// The outcome for one waiting request once its device's lookup is decided: its own key
    /// is checked against what the registry said.
    pub fn outcome_for_device(
        &self,
        looked_up: &LookupResult,
        facts: &RequestFacts<'_>,
    ) -> Outcome {
        let view = RequestView::new(facts.headers, facts.path);
        let found = match self.config.credentials.extract(&view) {
            Ok(Some(found)) => found,
            Ok(None) => return self.deny(DenyReason::Unauthenticated("missing credential".into())),
            Err(reason) => return self.deny(reason),
        };
        let (Credential::DeviceKey { id, key }, Some(keys)) =
            (&found.credential, &self.device_keys)
        else {
            return self.deny(DenyReason::Unavailable("internal error".into()));
        };
        let checked = keys.check_record(looked_up, id, key);
        self.key_outcome(checked, &found, facts.path)
    }

    /// The device registry, if device keys are looked up.
    pub fn device_registry(&self) -> Option<&crate::device_registry::DeviceRegistry> {
        self.device_keys.as_ref().and_then(DeviceKeys::registry)
    }

    /// The outcome for one waiting request once its token's introspection is decided.
    pub fn outcome_for(&self, decided: &IntrospectionOutcome, facts: &RequestFacts<'_>) -> Outcome {
        match decided {
            IntrospectionOutcome::Allowed(identity) => {
                let view = RequestView::new(facts.headers, facts.path);
                let found = self.config.credentials.extract(&view).ok().flatten();
                self.allow(identity.clone(), found.as_ref(), facts.path)
            }
            IntrospectionOutcome::Refused(DenyReason::Unavailable(d)) => Outcome::Deny {
                reason: DenyReason::Unavailable(d.clone()),
                challenge: None,
                subject: None,
            },
            IntrospectionOutcome::Refused(reason) => self.deny(reason.clone()),
        }
    }

    /// The request headers this engine reads, which must be text: pseudo-headers and the
    /// configured credential headers. (Identity headers are removed by name, whatever their
    /// bytes; every other header goes upstream untouched.)
    pub fn reads_header(&self, name: &str) -> bool {
        crate::header_pairs::is_pseudo(name)
            || self.config.credentials.reads_header(name)
            || METHOD_OVERRIDE_HEADERS.contains(&name)
    }

    /// Every identity header name to strip from what the client sent: the configured ones and
    /// the defaults, lowercase (as configured names must be), sorted, without repeats. A later filter left with the default names (entity-acl, device-ownership)
    /// then never reads a client's `x-auth-subject` as an identity: it sees an anonymous caller.
    pub fn identity_header_names(&self) -> &[String] {
        &self.identity_header_names
    }

    pub fn render_identity(&self, identity: &Identity) -> Vec<(String, String)> {
        self.config.identity_headers.render(identity)
    }

    pub fn cache_stats(&self) -> crate::cache::CacheStats {
        self.cache.stats()
    }
}

/// The configured identity header names and the defaults, sorted, without repeats.
fn identity_header_names(configured: &IdentityHeaderNames) -> Vec<String> {
    let defaults = IdentityHeaderNames::default();
    let mut names: Vec<String> = configured
        .all()
        .iter()
        .chain(defaults.all().iter())
        .map(|n| n.to_string())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// An introspection's decision, shared by every request that waited on the same token.
#[derive(Debug, Clone, PartialEq)]
pub enum IntrospectionOutcome {
    Allowed(Identity),
    Refused(DenyReason),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::IdentityKind;

    const TOKENS: &str = include_str!("../../../tests/fixtures/jwt/tokens.json");
    const JWKS: &str = include_str!("../../../tests/fixtures/jwt/jwks.json");
    const README: &str = include_str!("../../../README.md");
    const ISS: &str = "https://idp.example/realms/city";
    const NOW: u64 = 1_767_225_600;

    fn token(name: &str) -> String {
        let all: serde_json::Value = serde_json::from_str(TOKENS).unwrap();
        all[name].as_str().unwrap().to_string()
    }

    fn auth(extra: serde_json::Value) -> TokenAuth {
        let mut config = serde_json::json!({
            "jwt_providers": [{
                "issuer": ISS, "audiences": ["orion"], "algorithms": ["RS256", "ES256"],
                "jwks": serde_json::from_str::<serde_json::Value>(JWKS).unwrap(),
                "claims": {"subject": "sub", "roles": ["realm_access.roles"]}
            }],
            "public_routes": [{"path": "/version"}],
            "realm": "orion"
        });
        if let (Some(c), Some(e)) = (config.as_object_mut(), extra.as_object()) {
            c.extend(e.clone());
        }
        TokenAuth::new(serde_json::from_value(config).unwrap()).unwrap()
    }

    fn decide(auth: &mut TokenAuth, path: &str, headers: &[(&str, &str)]) -> Outcome {
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let facts = RequestFacts {
            method: "GET",
            path,
            headers: &headers,
            peer: None,
        };
        auth.authenticate(&facts, NOW)
    }

    #[test]
    fn renamed_identity_headers_still_strip_the_default_names() {
        let a = auth(serde_json::json!({"identity_headers": {"subject": "x-user"}}));
        let names = a.identity_header_names();
        for n in [
            "x-user",
            "x-auth-subject",
            "x-auth-kind",
            "x-roles",
            "x-auth-tenant",
        ] {
            assert!(names.iter().any(|m| m == n), "{n} not stripped: {names:?}");
        }
    }

    #[test]
    fn client_envoy_headers_are_recognised_by_prefix() {
        for n in [
            "x-envoy-original-path",
            "X-Envoy-Retry-On",
            "x-envoy-internal",
        ] {
            assert!(is_client_envoy_header(n.as_bytes()), "{n}");
        }
        for n in ["x-envoy-", "x-envoyx", "x-forwarded-for", "envoy-x"] {
            assert!(!is_client_envoy_header(n.as_bytes()), "{n}");
        }
    }

    #[test]
    fn method_overrides_are_refused_even_on_public_routes_and_with_a_valid_token() {
        let mut auth = auth(serde_json::json!({}));
        let bearer = format!("Bearer {}", token("valid_rs256"));
        for (path, headers) in [
            (
                "/v2/entities",
                vec![
                    ("authorization", bearer.as_str()),
                    ("x-http-method-override", "DELETE"),
                ],
            ),
            (
                "/v2/entities",
                vec![
                    ("authorization", bearer.as_str()),
                    ("x-method-override", "PUT"),
                ],
            ),
            (
                "/v2/entities",
                vec![
                    ("authorization", bearer.as_str()),
                    ("x-http-method", "DELETE"),
                ],
            ),
            (
                "/v2/entities?type=T&_method=DELETE",
                vec![("authorization", bearer.as_str())],
            ),
            (
                "/v2/entities?%5Fmethod=DELETE",
                vec![("authorization", bearer.as_str())],
            ),
            ("/version?_METHOD=POST", vec![]),
        ] {
            match decide(&mut auth, path, &headers) {
                Outcome::Deny {
                    reason: DenyReason::BadRequest(why),
                    ..
                } => {
                    assert!(why.contains("method override"), "{why}")
                }
                other => panic!("{path} {headers:?}: {other:?}"),
            }
        }
        let ok = decide(
            &mut auth,
            "/v2/entities?q=_method==x",
            &[("authorization", &bearer)],
        );
        assert!(matches!(ok, Outcome::Allow { .. }), "{ok:?}");
    }

    #[test]
    fn the_readme_configuration_example_is_valid() {
        let section = README
            .split("### Configuration")
            .nth(1)
            .expect("README has a token-auth configuration section");
        let json = section
            .split("```json")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("a json block");
        let config: TokenAuthConfig = serde_json::from_str(json).expect("the example parses");
        TokenAuth::new(config).expect("the example validates");
    }

    #[test]
    fn a_valid_jwt_is_allowed_and_its_credential_stripped() {
        let mut a = auth(serde_json::json!({}));
        let bearer = format!("Bearer {}", token("valid_rs256"));
        match decide(&mut a, "/v2/entities", &[("authorization", &bearer)]) {
            Outcome::Allow {
                identity,
                strip_headers,
                new_path,
            } => {
                assert_eq!(identity.subject, "5f0c-alice");
                assert_eq!(identity.kind, IdentityKind::Jwt);
                assert!(identity.has_role("operator"));
                assert_eq!(strip_headers, vec!["authorization".to_string()]);
                assert_eq!(new_path, None);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(a.cache_stats().misses, 1);
        assert!(matches!(
            decide(&mut a, "/v2/entities", &[("authorization", &bearer)]),
            Outcome::Allow { .. }
        ));
        assert_eq!(a.cache_stats().hits, 1, "the second request is a cache hit");
    }

    #[test]
    fn missing_and_bad_credentials_are_refused_with_challenges() {
        let mut a = auth(serde_json::json!({}));
        match decide(&mut a, "/v2/entities", &[]) {
            Outcome::Deny {
                reason, challenge, ..
            } => {
                assert_eq!(reason.status(), 401);
                assert_eq!(challenge.as_deref(), Some("Bearer realm=\"orion\""));
            }
            other => panic!("{other:?}"),
        }
        let expired = format!("Bearer {}", token("expired"));
        match decide(&mut a, "/v2/entities", &[("authorization", &expired)]) {
            Outcome::Deny {
                reason, challenge, ..
            } => {
                assert_eq!(reason.status(), 401);
                assert!(challenge.unwrap().contains("error=\"invalid_token\""));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decide(&mut a, "/version", &[]),
            Outcome::Public { .. }
        ));
    }

    #[test]
    fn public_routes_strip_every_credential_the_client_sent() {
        let mut a = auth(serde_json::json!({"credentials": {"sources": [
            {"type": "bearer"}, {"type": "header", "name": "X-Auth-Token"},
            {"type": "query", "name": "access_token"},
            {"type": "device_key", "in": "header", "id": "x-device-id", "key": "x-device-key"}]},
            "device_keys": {"devices": {"lamp": {"key_sha256": [
                "4fb871485c80f49dae1ba02def42c5aab66a2b8e96a4ac3ec5d5734a09cdf2dc"]}}}}));
        let bearer = format!("Bearer {}", token("valid_rs256"));
        // Well-formed or not, one credential or an ambiguous pair: nothing reaches the broker.
        let outcome = decide(
            &mut a,
            "/version?access_token=abc&x=1",
            &[("authorization", &bearer), ("x-auth-token", "opaque")],
        );
        assert_eq!(
            outcome,
            Outcome::Public {
                strip_headers: vec![
                    "authorization".to_string(),
                    "x-auth-token".to_string(),
                    "x-device-id".to_string(),
                    "x-device-key".to_string()
                ],
                new_path: Some("/version?x=1".to_string()),
            }
        );
        let mut forwarding = auth(serde_json::json!({"forward_token": true}));
        assert_eq!(
            decide(&mut forwarding, "/version", &[("authorization", &bearer)]),
            Outcome::Public {
                strip_headers: Vec::new(),
                new_path: None
            }
        );
    }

    fn remote_auth() -> TokenAuth {
        let config = serde_json::json!({
            "jwt_providers": [{
                "issuer": ISS, "audiences": ["orion"], "algorithms": ["RS256", "ES256"],
                "remote": {"cluster": "idp", "authority": "idp", "path": "/certs",
                           "refresh_secs": 600, "max_stale_secs": 3600}
            }],
            "cache": {"capacity": 10, "max_ttl_secs": 60}
        });
        TokenAuth::new(serde_json::from_value(config).unwrap()).unwrap()
    }

    #[test]
    fn stale_fetched_keys_are_503_and_counted_until_fetched_again() {
        let mut a = remote_auth();
        let keys = KeySet::from_jwks_json(JWKS).unwrap();
        a.set_remote_keys(ISS, keys, NOW).unwrap();
        let headers = vec![(
            "authorization".to_string(),
            format!("Bearer {}", token("valid_rs256")),
        )];
        let facts = RequestFacts {
            method: "GET",
            path: "/v2/entities",
            headers: &headers,
            peer: None,
        };
        assert!(matches!(
            a.authenticate(&facts, NOW + 3590),
            Outcome::Allow { .. }
        ));
        // Past max_stale_secs: fetch first (the verdict cached 11 s earlier is not used: it
        // never outlives the keys); if that fails, 503.
        let later = NOW + 3601;
        assert_eq!(
            a.authenticate(&facts, later),
            Outcome::FetchKeys {
                issuer: ISS.to_string()
            }
        );
        match a.authenticate_without_fetch(&facts, later) {
            Outcome::Deny {
                reason, challenge, ..
            } => {
                assert_eq!(reason.status(), 503);
                assert_eq!(challenge, None);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(a.counters().stale_keys, 1);
        // The same set fetched again renews it.
        a.confirm_remote_keys(ISS, later);
        assert!(matches!(
            a.authenticate(&facts, later),
            Outcome::Allow { .. }
        ));
    }

    #[test]
    fn an_answer_that_is_not_rfc7662_is_inactive_cached_and_counted() {
        for body in [
            &br#"{"sub": "alice"}"#[..],
            br#"{"active": "true", "sub": "alice"}"#,
            br#"{"active": 1}"#,
            br#"{"active": true, "sub": "alice", "exp": "tomorrow"}"#,
            br#"{"active": true, "sub": "alice", "exp": -5}"#,
            br#"{"active": false, "active": true, "sub": "alice"}"#,
            b"<html>",
        ] {
            let mut a = introspecting();
            let ask =
                |a: &mut TokenAuth| decide(a, "/v2/entities", &[("x-auth-token", "opaque-3")]);
            assert!(matches!(ask(&mut a), Outcome::Introspect { .. }));
            let decided = a.finish_introspection("opaque-3", 200, body, NOW);
            let text = String::from_utf8_lossy(body);
            assert!(
                matches!(
                    decided,
                    IntrospectionOutcome::Refused(DenyReason::Unauthenticated(_))
                ),
                "{text}: {decided:?}"
            );
            assert_eq!(a.counters().malformed_introspection, 1, "{text}");
            match ask(&mut a) {
                Outcome::Deny { reason, .. } => assert_eq!(reason.status(), 401, "{text}"),
                other => panic!("{text}: not cached: {other:?}"),
            }
            // Remembered for the negative TTL only.
            let facts_headers = vec![("x-auth-token".to_string(), "opaque-3".to_string())];
            let facts = RequestFacts {
                method: "GET",
                path: "/v2/entities",
                headers: &facts_headers,
                peer: None,
            };
            assert!(matches!(
                a.authenticate(&facts, NOW + 11),
                Outcome::Introspect { .. }
            ));
        }
    }

    #[test]
    fn required_roles_make_a_valid_token_forbidden() {
        let mut a = auth(serde_json::json!({"required_roles": ["city-admin"]}));
        let bearer = format!("Bearer {}", token("valid_rs256"));
        match decide(&mut a, "/v2/entities", &[("authorization", &bearer)]) {
            Outcome::Deny {
                reason,
                challenge,
                subject,
            } => {
                assert_eq!(reason.status(), 403);
                assert!(challenge.unwrap().contains("insufficient_scope"));
                // The token was verified: the refusal names its subject.
                assert_eq!(subject.as_deref(), Some("5f0c-alice"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn query_tokens_leave_the_path() {
        let mut a = auth(serde_json::json!({"credentials": {"sources": [
            {"type": "query", "name": "access_token"}]}}));
        let path = format!(
            "/v2/entities?type=Room&access_token={}",
            token("valid_es256")
        );
        match decide(&mut a, &path, &[]) {
            Outcome::Allow { new_path, .. } => {
                assert_eq!(new_path.as_deref(), Some("/v2/entities?type=Room"))
            }
            other => panic!("{other:?}"),
        }
    }

    fn introspecting() -> TokenAuth {
        let config = serde_json::json!({"introspection": {
            "kind": "rfc7662", "cluster": "idp", "authority": "idp.example",
            "path": "/introspect", "credentials": {"client_id": "envoy", "client_secret": "s"},
            "negative_ttl_s": 10}, "realm": "orion"});
        TokenAuth::new(serde_json::from_value(config).unwrap()).unwrap()
    }

    #[test]
    fn authorized_parties_refuse_tokens_of_other_clients() {
        let config = serde_json::json!({"introspection": {
            "kind": "rfc7662", "cluster": "idp", "authority": "idp.example",
            "path": "/introspect", "credentials": {"client_id": "envoy", "client_secret": "s"}},
            "realm": "orion", "authorized_parties": ["portal"]});
        let mut a = TokenAuth::new(serde_json::from_value(config).unwrap()).unwrap();
        let answers: [(&str, &[u8], u32); 3] = [
            (
                "from-portal",
                br#"{"active": true, "sub": "alice", "client_id": "portal"}"#,
                200,
            ),
            (
                "from-other",
                br#"{"active": true, "sub": "alice", "client_id": "other"}"#,
                403,
            ),
            ("no-client", br#"{"active": true, "sub": "alice"}"#, 403),
        ];
        for (token, answer, want) in answers {
            let decided = a.finish_introspection(token, 200, answer, NOW);
            let headers = vec![("x-auth-token".to_string(), token.to_string())];
            let facts = RequestFacts {
                method: "GET",
                path: "/v2/entities",
                headers: &headers,
                peer: None,
            };
            let status = match a.outcome_for(&decided, &facts) {
                Outcome::Allow { identity, .. } => {
                    assert_eq!(identity.app_id.as_deref(), Some("portal"));
                    200
                }
                Outcome::Deny { reason, .. } => reason.status(),
                other => panic!("{other:?}"),
            };
            assert_eq!(status, want, "{token}");
        }
        let empty = serde_json::json!({"introspection": {
            "kind": "rfc7662", "cluster": "idp", "authority": "idp.example",
            "path": "/introspect", "credentials": {"client_id": "envoy", "client_secret": "s"}},
            "authorized_parties": [""]});
        let Err(refused) = TokenAuth::new(serde_json::from_value(empty).unwrap()) else {
            panic!("an empty authorized party was accepted");
        };
        assert!(refused.contains("authorized_parties"), "{refused}");
    }

    #[test]
    fn opaque_tokens_are_introspected_then_cached() {
        let mut a = introspecting();
        let ask = |a: &mut TokenAuth| decide(a, "/v2/entities", &[("x-auth-token", "opaque-1")]);
        assert!(matches!(ask(&mut a), Outcome::Introspect { .. }));
        let decided = a.finish_introspection(
            "opaque-1",
            200,
            br#"{"active": true, "sub": "alice", "exp": 1767229200}"#,
            NOW,
        );
        assert!(matches!(decided, IntrospectionOutcome::Allowed(ref id) if id.subject == "alice"));
        assert!(matches!(ask(&mut a), Outcome::Allow { .. }), "cached");
        let past_exp = NOW + 3601;
        let facts_headers = vec![("x-auth-token".to_string(), "opaque-1".to_string())];
        let facts = RequestFacts {
            method: "GET",
            path: "/v2/entities",
            headers: &facts_headers,
            peer: None,
        };
        assert!(
            matches!(a.authenticate(&facts, past_exp), Outcome::Introspect { .. }),
            "the cache never outlives the token's exp"
        );
    }

    #[test]
    fn idp_failures_are_503_and_not_cached_refusals_are() {
        let mut a = introspecting();
        let failed = a.finish_introspection("opaque-2", 0, b"", NOW);
        assert!(matches!(
            failed,
            IntrospectionOutcome::Refused(DenyReason::Unavailable(_))
        ));
        assert!(matches!(
            decide(&mut a, "/v2/entities", &[("x-auth-token", "opaque-2")]),
            Outcome::Introspect { .. }
        ));
        let inactive = a.finish_introspection("opaque-2", 200, br#"{"active": false}"#, NOW);
        assert!(matches!(
            inactive,
            IntrospectionOutcome::Refused(DenyReason::Unauthenticated(_))
        ));
        assert!(matches!(
            decide(&mut a, "/v2/entities", &[("x-auth-token", "opaque-2")]),
            Outcome::Deny { .. }
        ));
    }

    #[test]
    fn an_unknown_issuer_is_refused_without_asking_the_idp() {
        let mut a = auth(serde_json::json!({"introspection": {"kind": "rfc7662",
            "cluster": "idp", "authority": "idp", "path": "/i",
            "credentials": {"client_id": "envoy", "client_secret": "s"}}}));
        let bearer = format!("Bearer {}", token("unknown_issuer"));
        match decide(&mut a, "/v2/entities", &[("authorization", &bearer)]) {
            Outcome::Deny { reason, .. } => assert_eq!(reason.status(), 401),
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(
                decide(
                    &mut a,
                    "/v2/entities",
                    &[("authorization", "Bearer opaque-1")]
                ),
                Outcome::Introspect { .. }
            ),
            "opaque tokens still go to introspection"
        );
    }

    #[test]
    fn configuration_errors_say_what_is_wrong() {
        let err = |json: serde_json::Value| {
            TokenAuth::new(serde_json::from_value(json).unwrap())
                .err()
                .unwrap_or_default()
        };
        assert!(err(serde_json::json!({})).contains("neither jwt_providers nor introspection"));
        assert!(err(serde_json::json!({"credentials": {"sources": [
            {"type": "device_key", "in": "header", "id": "x-id", "key": "x-key"}]}}))
        .contains("device_keys is not configured"));
        let mut bad_realm = serde_json::json!({"introspection": {"kind": "rfc7662",
            "cluster": "idp", "authority": "idp", "path": "/i",
            "credentials": {"client_id": "envoy", "client_secret": "s"}}});
        bad_realm["realm"] = "a\"b".into();
        assert!(err(bad_realm).contains("realm"));
    }

    #[test]
    fn the_introspection_secret_may_come_from_the_environment() {
        let build = |env: Option<&str>| {
            let mut config: TokenAuthConfig = serde_json::from_value(serde_json::json!({
                "introspection": {"kind": "rfc7662", "cluster": "idp", "authority": "idp",
                    "path": "/introspect",
                    "credentials": {"client_id": "envoy", "client_secret_env": "PEP_SECRET"}},
                "realm": "orion"}))
            .unwrap();
            config.read_environment(&|name: &str| {
                (name == "PEP_SECRET")
                    .then(|| env.map(str::to_string))
                    .flatten()
            });
            TokenAuth::new(config)
        };
        let a = build(Some("s3cret")).unwrap();
        let intro = a.config.introspection.as_ref().unwrap();
        assert_eq!(
            intro.build_request("tok").header("authorization"),
            Some("Basic ZW52b3k6czNjcmV0") // base64("envoy:s3cret")
        );
        for env in [None, Some("")] {
            let refused = build(env).map(|_| ()).unwrap_err();
            assert!(
                refused.starts_with(
                    "introspection: credentials.client_secret_env: the environment variable \
                     PEP_SECRET is not set"
                ),
                "{refused}"
            );
        }
    }

    #[test]
    fn the_device_registrys_secret_may_come_from_the_environment() {
        let build = |env: Option<&str>| {
            let mut config: TokenAuthConfig = serde_json::from_value(serde_json::json!({
                "credentials": {"sources": [
                    {"type": "device_key", "in": "header", "id": "x-id", "key": "x-key"}]},
                "device_keys": {"registry": {
                    "cluster": "reg", "authority": "reg", "path": "/keys",
                    "auth": {"client_credentials": {
                        "token_endpoint": {"cluster": "idp", "path": "/token"},
                        "client_id": "envoy", "client_secret_env": "REGISTRY_SECRET"}}}},
                "realm": "devices"}))
            .unwrap();
            config.read_environment(&|name: &str| {
                (name == "REGISTRY_SECRET")
                    .then(|| env.map(str::to_string))
                    .flatten()
            });
            TokenAuth::new(config)
        };
        let a = build(Some("s3cret")).unwrap();
        let grant = a.device_registry().unwrap().config().auth.as_ref().unwrap();
        assert_eq!(
            grant
                .client_credentials
                .token_request()
                .header("authorization"),
            Some("Basic ZW52b3k6czNjcmV0") // base64("envoy:s3cret")
        );
        for env in [None, Some("")] {
            let refused = build(env).map(|_| ()).unwrap_err();
            assert!(
                refused.starts_with(
                    "device_keys.registry.auth.client_credentials.client_secret_env: the \
                     environment variable REGISTRY_SECRET is not set"
                ),
                "{refused}"
            );
        }
    }
}
