//! Opaque tokens: asking the identity provider whether a token is active, and what it says about
//! the caller.
//!
//! Two protocols are supported. For both, this module only builds the HTTP call as plain data
//! ([`HttpCall`]: cluster, method, authority, path, headers, body, timeout; the filter hands it to
//! `dispatch_http_call`) and parses the answer ([`IntrospectionConfig::parse_response`]) into a
//! [`Verdict`] or an [`IntrospectionError`]. The two outcomes are kept apart on purpose:
//!
//! * [`Verdict::Inactive`] — the IdP answered and the token is not valid: `401`, cached for the
//!   short negative TTL;
//! * [`Verdict::WrongApplication`] — Keyrock only: the token is valid but for another
//!   application: `403`, cached like a negative answer;
//! * [`IntrospectionError`] — the IdP could not be asked (no answer, a non-2xx where a 2xx is
//!   expected): `503`, never cached; or its answer is not what the protocol says
//!   ([`IntrospectionError::Malformed`]: not JSON, a duplicate member, `active` missing or not
//!   a boolean, a malformed `exp`): the token engine decides that as inactive (`401`, cached
//!   for the negative TTL, counted), since nothing in it shows the token is valid.
//!
//! # RFC 7662 (Keycloak, WSO2, Ory, ...)
//!
//! `POST <path>` with `Content-Type: application/x-www-form-urlencoded`, body
//! `token=<token>&token_type_hint=access_token`, and the resource server's client credentials as
//! HTTP Basic (`client_secret_basic`, RFC 6749 §2.3.1: id and secret are each form-urlencoded
//! before being joined by `:` and base64-encoded). The answer must be 2xx with a JSON object
//! whose `active` is the JSON boolean `true`; `"active": "true"` is an error, not an active
//! token. Mapping to [`Identity`] (kind [`IdentityKind::OpaqueToken`]):
//!
//! * subject = `sub`, else `username`, else `client_id` (a client-credentials token with no
//!   `sub`); an active answer with none of them is treated as inactive (nobody to attribute the
//!   request to);
//! * display name = `username`;
//! * `exp` → `expires_at`; an `exp` at or before `now` makes the token inactive whatever
//!   `active` says (the IdP's clock or cache may lag); `nbf`/`iat` are left to the IdP;
//! * `scope` (space-separated; an array of strings is accepted too), `client_id`, `iss`, `aud`
//!   (string or array) go to [`TokenInfo`];
//! * roles and groups come from optional claim paths (`roles_claim`, e.g.
//!   `realm_access.roles` for Keycloak, `groups_claim`, e.g. `groups`): dot-separated keys
//!   leading to an array of strings or a space-separated string;
//! * if `audience` is configured, `aud` must contain it, otherwise the token is inactive for this
//!   resource server.
//!
//! A non-2xx answer is always an error here (RFC 7662 §2.2 answers an invalid token with
//! `200 {"active": false}`; a 401 means *our* client credentials were refused).
//!
//! # Keyrock (FIWARE IdM), as Wilma (the FIWARE PEP proxy) uses it
//!
//! Read in `ging/fiware-pep-proxy` (commit 475474a): `lib/pdp/keyrock.js` (`getPath`,
//! `authenticateUser`, `checkApplication`, `authenticatePEP`) and `controllers/root.js`
//! (`getTokens`, `setHeaders`); and in `ging/fiware-idm` (commit 195853f) the server side:
//! `app.js` (route `GET /user`), `controllers/oauth2/oauth2.js` (`authenticate_token`,
//! `authenticate_bearer`), `models/model_oauth_server.js` (`create_oauth_response`,
//! `search_user_info`, `user_roles`, `trusted_applications`) and
//! `templates/oauth_response/oauth_user_response.json`. What they do:
//!
//! * **Request.** Wilma calls `GET {idm}/user?access_token=<encodeURIComponent(token)>&app_id=
//!   <app_id>` with `Accept: application/json`, and also `X-Auth-Token: <the PEP's own token>`
//!   from `POST /v3/auth/tokens` (`{"name": <pep id>, "password": <pep password>}`, token in the
//!   `X-Subject-Token` answer header). Keyrock does not require it: `GET /user` has no
//!   middleware but `force_ssl` (`app.js`), and `authenticate_token` never reads
//!   `X-Auth-Token` (it reads the query and `Authorization`). So this filter sends no PEP token,
//!   and `pep_id`/`pep_password` are refused at configure time rather than accepted and
//!   ignored (a setting that looks like authentication but does nothing). The
//!   token is sent in the query (not as `Authorization: Bearer`) because Keyrock's JWT path
//!   (`authenticate_jwt`) reads only `req.query.access_token`.
//! * **Answer.** 200 with a JSON object built from `oauth_user_response.json`: `id` (the user's
//!   id, a UUID), `username` and `email` (only filled in if the user shared them with the
//!   application, otherwise `""`), `displayName` (always `""` for users in that version),
//!   `app_id` (the application the token was issued to), `trusted_apps` (the ids of the
//!   applications that the *requested* `app_id` trusts), `roles` (`[{id, name}]`, roles granted
//!   to the user directly in the requested application), `organizations`
//!   (`[{id, name, description, website, roles: [{id, name}]}]`, organizations through which the
//!   user holds roles in that application), plus `sub`, `given_name`, `family_name`,
//!   `authorization_decision`, `app_azf_domain`, `eidas_profile`, `attributes`, ... An IoT
//!   agent's token gives `{id, app_id, roles: [], trusted_apps, displayName: ""}`; a
//!   client-credentials (application) token gives just `{"app_id": ...}`.
//!   An invalid or expired token is `401` with a JSON *string* body such as
//!   `"Invalid token: access token is invalid"`; a token of an application that `app_id` does
//!   not trust is `401 "User not authorized in application"`; a database error is 500. The
//!   answer has no expiry: cached entries live for `positive_ttl_s` (Wilma's `cache_time`, 300 s
//!   by default).
//! * **Wilma's checks.** Any non-2xx → 401 `InvalidAuthenticationToken`. On 200,
//!   `checkApplication`: `user.app_id === pep.app_id || user.trusted_apps includes it ||
//!   pep.trusted_apps includes it`, otherwise denied (`InvalidRole`). This module does the same
//!   check ([`KeyrockUser::is_for_application`]); a mismatch is [`Verdict::WrongApplication`]
//!   (403), and so is Keyrock's own `401 "User not authorized in application"`.
//! * **Headers Wilma sets upstream** (`setHeaders`): `X-Nick-Name` = `user.id` (the id, *not*
//!   the username, despite the name), `X-Display-Name` = `displayName`, `X-Roles` =
//!   `JSON.stringify(user.roles)`, `X-Organizations` = `JSON.stringify(user.organizations)`,
//!   `X-Eidas-Profile`, `X-App-Id` = `user.app_id`. No `X-Email`. [`KeyrockUser::wilma_headers`]
//!   reproduces them (organizations reduced to `{id, name, roles}`, JSON with non-ASCII
//!   escaped).
//!
//! Mapping to [`Identity`] (kind [`IdentityKind::OpaqueToken`]): subject = `id`, as in
//! `X-Nick-Name` (for an application token, which has no `id`, the subject is its `app_id`);
//! display name = `displayName`, else `username`; roles = the names of the direct roles and of
//! the roles held through organizations, without duplicates (Keyrock's own PDP decides on both,
//! `user_roles(...).all`); groups = the organization names. Keyrock answers with no expiry, so
//! `expires_at` stays empty.
//!
//! Not reproduced from Wilma: the `Bearer: <base64>` fallback of `getTokens` (a malformed
//! `Authorization` is refused by `credentials`), the "magic key", and Keyrock-as-PDP
//! (`action`/`resource` parameters, `authorization_decision`).

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use url::form_urlencoded;

use crate::client_credentials::{basic_auth, ClientSecret};
use crate::decision::DenyReason;
use crate::identity::{Identity, IdentityKind, KeyrockJson};
pub use crate::upstream::HttpCall;
use crate::upstream::{Authority, ClusterName, Target, TimeoutMs, UpstreamPath};

/// The largest introspection answer parsed; a larger one is an error.
pub const MAX_RESPONSE_BYTES: usize = 256 * 1024;

/// Keyrock's answer body when the token's application is not the requested one nor trusted by it.
const KEYROCK_WRONG_APP_MESSAGE: &str = "User not authorized in application";

// ------------------------------------------------------------------------------------------------
// Configuration

/// Which protocol the endpoint speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IntrospectionKind {
    /// RFC 7662 token introspection.
    Rfc7662,
    /// Keyrock's `GET /user`, as Wilma calls it.
    Keyrock,
}

/// The credentials the filter presents to the IdP. `Debug` never prints the secrets.
///
/// * `rfc7662`: `client_id` and the client's secret (required): `client_secret`, or
///   `client_secret_env` naming the VM's environment variable that holds it ([`ClientSecret`],
///   as the client-credentials grant takes it), sent as HTTP Basic.
/// * `keyrock`: none. `pep_id` and `pep_password` (Wilma's PEP credentials) are refused:
///   Keyrock's `GET /user` does not authenticate the PEP (see the module documentation).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntrospectionCredentials {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(flatten)]
    pub secret: ClientSecret,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pep_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pep_password: Option<String>,
}

impl fmt::Debug for IntrospectionCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redact = |s: &Option<String>| s.as_ref().map(|_| "<redacted>");
        f.debug_struct("IntrospectionCredentials")
            .field("client_id", &self.client_id)
            .field("secret", &self.secret)
            .field("pep_id", &self.pep_id)
            .field("pep_password", &redact(&self.pep_password))
            .finish()
    }
}

/// An introspection endpoint.
///
/// ```json
/// {"kind": "rfc7662", "cluster": "keycloak", "authority": "keycloak.example",
///  "path": "/realms/city/protocol/openid-connect/token/introspect",
///  "credentials": {"client_id": "envoy", "client_secret": "..."},
///  "timeout_ms": 2000, "positive_ttl_s": 300, "negative_ttl_s": 10,
///  "roles_claim": "realm_access.roles"}
/// ```
///
/// ```json
/// {"kind": "keyrock", "cluster": "keyrock", "authority": "keyrock:3000",
///  "app_id": "8ca5f3c0-...", "trusted_apps": []}
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntrospectionConfig {
    pub kind: IntrospectionKind,
    /// The Envoy cluster of the IdP.
    pub cluster: ClusterName,
    /// The `:authority` of the call (the IdP's host name, as its virtual host expects it).
    pub authority: Authority,
    /// Required for `rfc7662`; `/user` by default for `keyrock`. No query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<UpstreamPath>,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: TimeoutMs,
    #[serde(default)]
    pub credentials: IntrospectionCredentials,
    /// How long an active answer is trusted (also bounded by the token's `exp`). 0: not cached.
    #[serde(default = "default_positive_ttl_s")]
    pub positive_ttl_s: u64,
    /// How long an inactive answer is remembered. Short: a token just issued may be refused by a
    /// lagging replica.
    #[serde(default = "default_negative_ttl_s")]
    pub negative_ttl_s: u64,
    /// `rfc7662`: if set, `aud` must contain it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// `rfc7662`: dot-separated path of the roles in the answer (e.g. `realm_access.roles`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roles_claim: Option<String>,
    /// `rfc7662`: dot-separated path of the groups in the answer (e.g. `groups`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups_claim: Option<String>,
    /// `keyrock`: the application (OAuth client id) this PEP protects. Required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_id: Option<String>,
    /// `keyrock`: other applications whose tokens are accepted (Wilma's `pep.trusted_apps`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_apps: Vec<String>,
    /// The most introspection callouts in flight per VM. Every distinct unknown token costs
    /// one; beyond this, a request needing a new one is shed (503, `Retry-After: 1`) instead
    /// of piling callouts on the IdP. Requests sharing a lookup in flight still join it.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
}

fn default_timeout_ms() -> TimeoutMs {
    TimeoutMs::default_of(2000)
}
fn default_positive_ttl_s() -> u64 {
    300
}
fn default_negative_ttl_s() -> u64 {
    10
}
fn default_max_in_flight() -> usize {
    DEFAULT_MAX_IN_FLIGHT
}

/// The default of `max_in_flight`.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 64;
/// Bound enforced on `max_in_flight`.
pub const MAX_MAX_IN_FLIGHT: usize = 10_000;
/// What a shed request is told (`Retry-After`, seconds).
pub const SHED_RETRY_AFTER_SECS: u32 = 1;

/// Bounds enforced by [`IntrospectionConfig::validate`] (the endpoint's own fields are
/// checked as they are read: [`crate::upstream`]).
pub const MAX_POSITIVE_TTL_S: u64 = 86_400;
pub const MAX_NEGATIVE_TTL_S: u64 = 300;

/// The default Keyrock path.
pub const KEYROCK_USER_PATH: &str = "/user";

/// An invalid introspection configuration, with a message naming the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("introspection: {0}")]
pub struct IntrospectionConfigError(pub String);

impl IntrospectionConfig {
    /// Reads `credentials.client_secret_env` (if given) from `env`, the VM's environment: call
    /// it once at configure time, before [`IntrospectionConfig::validate`] (which refuses a
    /// variable unset or empty).
    pub fn read_environment(&mut self, env: &dyn Fn(&str) -> Option<String>) {
        self.credentials.secret.read_environment(env);
    }

    /// Whether one more introspection callout may start while `in_flight` are: Err is the
    /// refusal to answer (503; the caller adds `Retry-After`).
    pub fn admit(&self, in_flight: usize) -> Result<(), DenyReason> {
        if in_flight < self.max_in_flight {
            Ok(())
        } else {
            Err(DenyReason::Unavailable(format!(
                "{in_flight} token introspections in flight (max_in_flight); retry shortly"
            )))
        }
    }

    /// Checks the configuration; the message names the offending field.
    pub fn validate(&self) -> Result<(), IntrospectionConfigError> {
        let err = |m: String| Err(IntrospectionConfigError(m));
        let kind = match self.kind {
            IntrospectionKind::Rfc7662 => "rfc7662",
            IntrospectionKind::Keyrock => "keyrock",
        };
        match (&self.path, self.kind) {
            (None, IntrospectionKind::Rfc7662) => {
                return err("path: required for kind rfc7662 (e.g. /realms/<realm>/protocol/openid-connect/token/introspect)".into());
            }
            // Keyrock's call appends its own query.
            (Some(p), _) if p.has_query() => {
                return err(format!("path: {:?} must have no query", p.as_str()));
            }
            _ => {}
        }
        if self.positive_ttl_s > MAX_POSITIVE_TTL_S {
            return err(format!("positive_ttl_s: at most {MAX_POSITIVE_TTL_S}"));
        }
        if self.max_in_flight == 0 || self.max_in_flight > MAX_MAX_IN_FLIGHT {
            return err(format!(
                "max_in_flight: must be between 1 and {MAX_MAX_IN_FLIGHT}, not {}",
                self.max_in_flight
            ));
        }
        if self.negative_ttl_s > MAX_NEGATIVE_TTL_S {
            return err(format!(
                "negative_ttl_s: at most {MAX_NEGATIVE_TTL_S} (a refused token must not stay refused for long)"
            ));
        }
        let c = &self.credentials;
        let field_ok = |v: &Option<String>| {
            v.as_ref()
                .is_some_and(|s| !s.is_empty() && !s.chars().any(char::is_control))
        };
        if c.pep_id.is_some() || c.pep_password.is_some() {
            return err(
                "credentials: pep_id and pep_password are not supported: Keyrock's \
                 GET /user does not authenticate the PEP (it never reads X-Auth-Token), so \
                 they would protect nothing; remove them"
                    .into(),
            );
        }
        match self.kind {
            IntrospectionKind::Rfc7662 => {
                if !field_ok(&c.client_id) {
                    return err("credentials.client_id: required for kind rfc7662 (non-empty, no control characters)".into());
                }
                c.secret
                    .validate("credentials")
                    .map_err(IntrospectionConfigError)?;
                if self.app_id.is_some() || !self.trusted_apps.is_empty() {
                    return err("app_id and trusted_apps are only for kind keyrock".into());
                }
                if self.audience.as_ref().is_some_and(|a| a.is_empty()) {
                    return err("audience: must be non-empty when set".into());
                }
                for (name, v) in [
                    ("roles_claim", &self.roles_claim),
                    ("groups_claim", &self.groups_claim),
                ] {
                    if let Some(v) = v {
                        if v.split('.').any(str::is_empty) {
                            return err(format!(
                                "{name}: {v:?} must be keys separated by single dots"
                            ));
                        }
                    }
                }
            }
            IntrospectionKind::Keyrock => {
                if c.client_id.is_some() || c.secret.is_given() {
                    return err("credentials: client_id and client_secret (or client_secret_env) are only for kind rfc7662; Keyrock needs no credentials".into());
                }
                if !self.app_id.as_ref().is_some_and(|a| valid_app_id(a)) {
                    return err(format!("app_id: required for kind {kind}, the OAuth client id of the protected application"));
                }
                if let Some(bad) = self.trusted_apps.iter().find(|a| !valid_app_id(a)) {
                    return err(format!("trusted_apps: {bad:?} is not an application id"));
                }
                if self.audience.is_some()
                    || self.roles_claim.is_some()
                    || self.groups_claim.is_some()
                {
                    return err(
                        "audience, roles_claim and groups_claim are only for kind rfc7662".into(),
                    );
                }
            }
        }
        Ok(())
    }

    /// The path of the introspection call.
    pub fn path(&self) -> &str {
        match (&self.path, self.kind) {
            (Some(p), _) => p.as_str(),
            (None, IntrospectionKind::Keyrock) => KEYROCK_USER_PATH,
            (None, IntrospectionKind::Rfc7662) => "/",
        }
    }

    /// Where the IdP is called.
    pub fn target(&self) -> Target<'_> {
        Target {
            cluster: &self.cluster,
            authority: Some(&self.authority),
            timeout: self.timeout_ms,
        }
    }

    /// The call that introspects `token`.
    pub fn build_request(&self, token: &str) -> HttpCall {
        match self.kind {
            IntrospectionKind::Rfc7662 => {
                let body = form_urlencoded::Serializer::new(String::new())
                    .append_pair("token", token)
                    .append_pair("token_type_hint", "access_token")
                    .finish()
                    .into_bytes();
                let mut call = self
                    .target()
                    .call("POST", self.path().to_string())
                    .with_header("content-type", "application/x-www-form-urlencoded")
                    .with_header("accept", "application/json")
                    .with_header("content-length", body.len().to_string());
                if let (Some(id), Some(secret)) =
                    (&self.credentials.client_id, self.credentials.secret.value())
                {
                    call = call.with_header("authorization", basic_auth(id, secret));
                }
                call.with_body(body)
            }
            IntrospectionKind::Keyrock => {
                let query = form_urlencoded::Serializer::new(String::new())
                    .append_pair("access_token", token)
                    .append_pair("app_id", self.app_id.as_deref().unwrap_or(""))
                    .finish();
                self.target()
                    .call("GET", format!("{}?{query}", self.path()))
                    .with_header("accept", "application/json")
            }
        }
    }

    /// Parses the IdP's answer to [`IntrospectionConfig::build_request`]. `now` is seconds since
    /// the epoch.
    pub fn parse_response(
        &self,
        status: u32,
        body: &[u8],
        now: u64,
    ) -> Result<Verdict, IntrospectionError> {
        match self.kind {
            IntrospectionKind::Rfc7662 => self.parse_rfc7662(status, body, now),
            IntrospectionKind::Keyrock => self.parse_keyrock(status, body),
        }
    }

    /// How long `verdict` may be cached, in seconds; the cache also caps it at the token's
    /// `exp` ([`Verdict::expires_at`]).
    pub fn cache_ttl(&self, verdict: &Verdict) -> u64 {
        match verdict {
            Verdict::Active(_) => self.positive_ttl_s,
            Verdict::Inactive { .. } | Verdict::WrongApplication { .. } => self.negative_ttl_s,
        }
    }

    /// What an answer (`status` 0: none) decides, and how long that may be remembered: the
    /// one reading of an answer that token-auth and mqtt-acl share.
    pub fn decide(&self, status: u32, body: &[u8], now: u64) -> AnswerDecision {
        match self.parse_response(status, body, now) {
            Ok(verdict) => {
                let cache_ttl = Some(self.cache_ttl(&verdict));
                let outcome = match verdict {
                    Verdict::Active(info) => Ok(info.identity),
                    other => Err(other
                        .deny_reason()
                        .unwrap_or_else(|| DenyReason::Unauthenticated("invalid token".into()))),
                };
                AnswerDecision {
                    outcome,
                    cache_ttl,
                    malformed: false,
                }
            }
            // An answer that is not what the protocol says is no evidence the token is valid:
            // inactive, remembered as briefly as any refusal, and counted by the caller.
            Err(IntrospectionError::Malformed(_)) => AnswerDecision {
                outcome: Err(DenyReason::Unauthenticated(
                    "invalid token (malformed introspection answer)".into(),
                )),
                cache_ttl: Some(self.negative_ttl_s),
                malformed: true,
            },
            // The IdP could not be asked: never remembered, the next request asks again.
            Err(e) => AnswerDecision {
                outcome: Err(e.deny_reason()),
                cache_ttl: None,
                malformed: false,
            },
        }
    }

    fn parse_rfc7662(
        &self,
        status: u32,
        body: &[u8],
        now: u64,
    ) -> Result<Verdict, IntrospectionError> {
        if !(200..300).contains(&status) {
            return Err(IntrospectionError::Status(status));
        }
        let obj = parse_object(body)?;
        match obj.get("active") {
            Some(Value::Bool(true)) => {}
            Some(Value::Bool(false)) => return Ok(Verdict::inactive("token is not active")),
            Some(_) => return Err(malformed("\"active\" is not a boolean")),
            None => return Err(malformed("\"active\" is missing")),
        }
        let exp = opt_numeric_date(&obj, "exp")?;
        if exp.is_some_and(|e| e <= now) {
            return Ok(Verdict::inactive("token has expired"));
        }
        let sub = opt_string(&obj, "sub")?;
        let username = opt_string(&obj, "username")?;
        let client_id = opt_string(&obj, "client_id")?;
        let issuer = opt_string(&obj, "iss")?;
        let scopes = match obj.get("scope") {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => string_list(v).ok_or_else(|| malformed("\"scope\" is not a string"))?,
        };
        let audiences = match obj.get("aud") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| malformed("\"aud\" is not a string or an array of strings"))?,
            Some(_) => return Err(malformed("\"aud\" is not a string or an array of strings")),
        };
        if let Some(wanted) = &self.audience {
            if !audiences.iter().any(|a| a == wanted) {
                return Ok(Verdict::inactive("token is not for this audience"));
            }
        }
        let Some(subject) = sub
            .clone()
            .or_else(|| username.clone())
            .or_else(|| client_id.clone())
        else {
            return Ok(Verdict::inactive("token has no subject"));
        };
        let mut identity = Identity::new(IdentityKind::OpaqueToken, subject);
        identity.display_name = username;
        identity.app_id = client_id.clone();
        identity.expires_at = exp;
        if let Some(path) = &self.roles_claim {
            identity.roles = claim_list(&obj, path)?;
        }
        if let Some(path) = &self.groups_claim {
            identity.groups = claim_list(&obj, path)?;
        }
        Ok(Verdict::Active(Box::new(TokenInfo {
            identity,
            scopes,
            client_id,
            issuer,
            audiences,
            keyrock: None,
        })))
    }

    fn parse_keyrock(&self, status: u32, body: &[u8]) -> Result<Verdict, IntrospectionError> {
        if status == 401 {
            // Keyrock answers `res.status(401).json(message)`: a JSON string.
            let message: Option<String> = serde_json::from_slice(body).ok();
            if message.as_deref() == Some(KEYROCK_WRONG_APP_MESSAGE) {
                return Ok(Verdict::WrongApplication { app_id: None });
            }
            return Ok(Verdict::inactive("token is not valid"));
        }
        if !(200..300).contains(&status) {
            return Err(IntrospectionError::Status(status));
        }
        let user = KeyrockUser::parse(body)?;
        let app = self.app_id.as_deref().unwrap_or("");
        if !user.is_for_application(app, &self.trusted_apps) {
            return Ok(Verdict::WrongApplication {
                app_id: Some(user.app_id),
            });
        }
        let identity = user.to_identity();
        Ok(Verdict::Active(Box::new(TokenInfo {
            identity,
            scopes: Vec::new(),
            client_id: Some(user.app_id.clone()),
            issuer: None,
            audiences: Vec::new(),
            keyrock: Some(user),
        })))
    }
}

fn valid_app_id(a: &str) -> bool {
    !a.is_empty() && a.len() <= 256 && a.chars().all(|c| c.is_ascii_graphic())
}

// ------------------------------------------------------------------------------------------------
// Outcomes

/// What the IdP said about a token. Cacheable (serde) for the verdict cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// Valid: who the caller is (boxed: it is much larger than the other variants).
    Active(Box<TokenInfo>),
    /// Not valid (unknown, revoked, expired, wrong audience). `reason` is for logs.
    Inactive { reason: String },
    /// Keyrock: valid, but issued to an application this PEP does not accept. `app_id` is the
    /// token's application when Keyrock said which.
    WrongApplication {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        app_id: Option<String>,
    },
}

impl Verdict {
    fn inactive(reason: &str) -> Verdict {
        Verdict::Inactive {
            reason: reason.to_string(),
        }
    }

    /// `None` when active; otherwise what the client is told (401 or 403).
    pub fn deny_reason(&self) -> Option<DenyReason> {
        match self {
            Verdict::Active(_) => None,
            Verdict::Inactive { .. } => Some(DenyReason::Unauthenticated("invalid token".into())),
            Verdict::WrongApplication { .. } => Some(DenyReason::Forbidden(
                "token is not valid for this application".into(),
            )),
        }
    }

    pub fn identity(&self) -> Option<&Identity> {
        match self {
            Verdict::Active(info) => Some(&info.identity),
            _ => None,
        }
    }

    /// The token's own expiry, when the IdP gave one (for the cache).
    pub fn expires_at(&self) -> Option<u64> {
        self.identity().and_then(|i| i.expires_at)
    }
}

/// What one introspection answer decides ([`IntrospectionConfig::decide`]).
#[derive(Debug, Clone, PartialEq)]
pub struct AnswerDecision {
    /// Who the caller is, or why not: `Unauthenticated` (inactive, malformed answer),
    /// `Forbidden` (Keyrock: another application's token), `Unavailable` (no usable answer).
    pub outcome: Result<Identity, DenyReason>,
    /// How long it may be cached, in seconds (an active token also no longer than its
    /// `expires_at`); `None`: not at all.
    pub cache_ttl: Option<u64>,
    /// The answer was not what the protocol says (decided as inactive).
    pub malformed: bool,
}

/// An active token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub identity: Identity,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// RFC 7662 `client_id`; Keyrock's `app_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// Keyrock's full answer (for Wilma-compatible headers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyrock: Option<KeyrockUser>,
}

impl TokenInfo {
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }
}

/// The IdP could not give a usable answer: the filter answers 503 and caches nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IntrospectionError {
    /// The call failed or timed out (set by the filter: no answer at all).
    #[error("introspection call failed: {0}")]
    NoResponse(String),
    /// An unexpected HTTP status.
    #[error("introspection endpoint answered HTTP {0}")]
    Status(u32),
    /// The body is not what the protocol says.
    #[error("introspection answer is malformed: {0}")]
    Malformed(String),
}

impl IntrospectionError {
    /// What the client is told: 503, naming no internals.
    pub fn deny_reason(&self) -> DenyReason {
        DenyReason::Unavailable("identity provider unavailable".into())
    }
}

fn malformed(m: &str) -> IntrospectionError {
    IntrospectionError::Malformed(m.to_string())
}

// ------------------------------------------------------------------------------------------------
// Keyrock

/// A role in Keyrock's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyrockRole {
    pub id: String,
    pub name: String,
}

/// An organization in Keyrock's answer, with the roles the user holds through it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyrockOrganization {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub roles: Vec<KeyrockRole>,
}

/// Keyrock's answer to `GET /user`, the fields Wilma uses. Empty strings (Keyrock's template
/// defaults) are read as absent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyrockUser {
    /// The user's (or IoT agent's) id; empty for an application token.
    #[serde(default)]
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// The application the token was issued to.
    pub app_id: String,
    /// Applications trusted by the requested application.
    #[serde(default)]
    pub trusted_apps: Vec<String>,
    #[serde(default)]
    pub roles: Vec<KeyrockRole>,
    #[serde(default)]
    pub organizations: Vec<KeyrockOrganization>,
    /// The eIDAS profile of a user registered through eIDAS (Wilma's `X-Eidas-Profile`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eidas_profile: Option<Value>,
}

impl KeyrockUser {
    /// Parses a 2xx body of `GET /user`.
    pub fn parse(body: &[u8]) -> Result<KeyrockUser, IntrospectionError> {
        let obj = parse_object(body)?;
        let app_id = match obj.get("app_id") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(malformed("\"app_id\" is missing or not a string")),
        };
        let non_empty = |key: &str| -> Result<Option<String>, IntrospectionError> {
            Ok(opt_string(&obj, key)?.filter(|s| !s.is_empty()))
        };
        let trusted_apps = match obj.get("trusted_apps") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| malformed("\"trusted_apps\" is not an array of strings"))?,
            Some(_) => return Err(malformed("\"trusted_apps\" is not an array of strings")),
        };
        let roles = match obj.get("roles") {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => parse_roles(v)
                .ok_or_else(|| malformed("\"roles\" is not an array of {id, name}"))?,
        };
        let organizations = match obj.get("organizations") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(parse_organization)
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    malformed("\"organizations\" is not an array of {id, name, roles}")
                })?,
            Some(_) => return Err(malformed("\"organizations\" is not an array")),
        };
        Ok(KeyrockUser {
            id: non_empty("id")?.unwrap_or_default(),
            username: non_empty("username")?,
            display_name: non_empty("displayName")?,
            email: non_empty("email")?,
            app_id,
            trusted_apps,
            roles,
            organizations,
            // Keyrock's template gives `{}` to users without eIDAS; Wilma forwards that too.
            eidas_profile: obj.get("eidas_profile").filter(|p| p.is_object()).cloned(),
        })
    }

    /// Wilma's `checkApplication`: the token's application is the configured one, or one the
    /// configuration trusts, or one Keyrock says the configured application trusts.
    pub fn is_for_application(&self, app_id: &str, trusted_apps: &[String]) -> bool {
        !self.app_id.is_empty()
            && (self.app_id == app_id
                || trusted_apps.contains(&self.app_id)
                || self.trusted_apps.contains(&self.app_id))
    }

    /// The identity; see the module documentation for the mapping.
    pub fn to_identity(&self) -> Identity {
        let subject = if self.id.is_empty() {
            &self.app_id
        } else {
            &self.id
        };
        let mut identity = Identity::new(IdentityKind::OpaqueToken, subject.clone());
        identity.display_name = self.display_name.clone().or_else(|| self.username.clone());
        let mut roles: Vec<String> = Vec::new();
        let all_roles = self
            .roles
            .iter()
            .chain(self.organizations.iter().flat_map(|o| o.roles.iter()));
        for role in all_roles {
            if !roles.contains(&role.name) {
                roles.push(role.name.clone());
            }
        }
        identity.roles = roles;
        let mut groups: Vec<String> = Vec::new();
        for org in &self.organizations {
            if !groups.contains(&org.name) {
                groups.push(org.name.clone());
            }
        }
        identity.groups = groups;
        identity.app_id = Some(self.app_id.clone());
        identity.keyrock = Some(Box::new(self.wilma_json()));
        identity
    }

    /// Roles, organizations and eIDAS profile as Wilma forwards them (`JSON.stringify`).
    fn wilma_json(&self) -> KeyrockJson {
        let organizations: Vec<Value> = self
            .organizations
            .iter()
            .map(|o| serde_json::json!({"id": o.id, "name": o.name, "roles": roles_json(&o.roles)}))
            .collect();
        KeyrockJson {
            roles: ascii_json(&Value::Array(roles_json(&self.roles))),
            organizations: ascii_json(&Value::Array(organizations)),
            eidas_profile: self.eidas_profile.as_ref().map(ascii_json),
        }
    }

    /// The headers Wilma sets upstream (`controllers/root.js`, `setHeaders`): `X-Nick-Name`
    /// (the id), `X-Display-Name`, `X-Roles`, `X-Organizations`, `X-App-Id`. JSON values have
    /// non-ASCII characters escaped so that they are valid header values.
    pub fn wilma_headers(&self) -> Vec<(&'static str, String)> {
        let json = self.wilma_json();
        let mut headers = vec![
            ("x-nick-name", self.id.clone()),
            (
                "x-display-name",
                self.display_name.clone().unwrap_or_default(),
            ),
            ("x-roles", json.roles),
            ("x-organizations", json.organizations),
            ("x-app-id", self.app_id.clone()),
        ];
        if let Some(profile) = json.eidas_profile {
            headers.push(("x-eidas-profile", profile));
        }
        headers
    }
}

fn roles_json(roles: &[KeyrockRole]) -> Vec<Value> {
    roles
        .iter()
        .map(|r| serde_json::json!({"id": r.id, "name": r.name}))
        .collect()
}

/// Compact JSON with every non-ASCII character as `\uXXXX` (UTF-16 surrogate pairs beyond the
/// BMP), which is still the same JSON value.
pub(crate) fn ascii_json(value: &Value) -> String {
    let json = value.to_string();
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

fn parse_roles(v: &Value) -> Option<Vec<KeyrockRole>> {
    v.as_array()?
        .iter()
        .map(|r| {
            Some(KeyrockRole {
                id: r.get("id")?.as_str()?.to_string(),
                name: r.get("name")?.as_str()?.to_string(),
            })
        })
        .collect()
}

fn parse_organization(v: &Value) -> Option<KeyrockOrganization> {
    Some(KeyrockOrganization {
        id: v.get("id")?.as_str()?.to_string(),
        name: v.get("name")?.as_str()?.to_string(),
        roles: match v.get("roles") {
            None | Some(Value::Null) => Vec::new(),
            Some(r) => parse_roles(r)?,
        },
    })
}

// ------------------------------------------------------------------------------------------------
// JSON helpers

fn parse_object(body: &[u8]) -> Result<Map<String, Value>, IntrospectionError> {
    if body.len() > MAX_RESPONSE_BYTES {
        return Err(malformed("answer too large"));
    }
    // A repeated member (two `active`s) has no single meaning: malformed.
    crate::strict_json::parse_object(body).map_err(|e| malformed(&e.to_string()))
}

fn opt_string(obj: &Map<String, Value>, key: &str) -> Result<Option<String>, IntrospectionError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(IntrospectionError::Malformed(format!(
            "\"{key}\" is not a string"
        ))),
    }
}

/// A NumericDate (RFC 7519): a non-negative number of seconds, fractions truncated.
fn opt_numeric_date(
    obj: &Map<String, Value>,
    key: &str,
) -> Result<Option<u64>, IntrospectionError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(u) = n.as_u64() {
                Ok(Some(u))
            } else {
                match n.as_f64() {
                    // `as` saturates; the range check keeps it meaningful.
                    Some(f) if (0.0..1.8e19).contains(&f) => Ok(Some(f as u64)),
                    _ => Err(IntrospectionError::Malformed(format!(
                        "\"{key}\" is not a valid date"
                    ))),
                }
            }
        }
        Some(_) => Err(IntrospectionError::Malformed(format!(
            "\"{key}\" is not a number"
        ))),
    }
}

/// A space-separated string or an array of strings.
fn string_list(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::String(s) => Some(
            s.split(' ')
                .filter(|p| !p.is_empty())
                .map(str::to_string)
                .collect(),
        ),
        Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().map(str::to_string))
            .collect(),
        _ => None,
    }
}

/// The list at a dot-separated claim path; absent → empty.
fn claim_list(obj: &Map<String, Value>, path: &str) -> Result<Vec<String>, IntrospectionError> {
    let mut parts = path.split('.');
    let mut current = match parts.next().and_then(|first| obj.get(first)) {
        Some(v) => v,
        None => return Ok(Vec::new()),
    };
    for part in parts {
        match current.get(part) {
            Some(v) => current = v,
            None => return Ok(Vec::new()),
        }
    }
    if current.is_null() {
        return Ok(Vec::new());
    }
    string_list(current).ok_or_else(|| {
        IntrospectionError::Malformed(format!("claim {path:?} is not a list of strings"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use serde_json::json;

    const NOW: u64 = 1_700_000_000;

    fn rfc() -> IntrospectionConfig {
        serde_json::from_value(json!({
            "kind": "rfc7662",
            "cluster": "keycloak",
            "authority": "keycloak.example",
            "path": "/realms/city/protocol/openid-connect/token/introspect",
            "credentials": {"client_id": "envoy", "client_secret": "s3cret"},
        }))
        .unwrap()
    }

    fn keyrock() -> IntrospectionConfig {
        serde_json::from_value(json!({
            "kind": "keyrock",
            "cluster": "keyrock",
            "authority": "keyrock:3000",
            "app_id": "app-1",
            "trusted_apps": ["app-cfg-trusted"],
        }))
        .unwrap()
    }

    #[test]
    fn introspections_in_flight_are_capped() {
        let config = rfc();
        assert_eq!(config.max_in_flight, DEFAULT_MAX_IN_FLIGHT);
        assert!(config.admit(DEFAULT_MAX_IN_FLIGHT - 1).is_ok());
        let shed = config.admit(DEFAULT_MAX_IN_FLIGHT).unwrap_err();
        assert_eq!(shed.status(), 503);
        for bad in [0, MAX_MAX_IN_FLIGHT + 1] {
            let config = IntrospectionConfig {
                max_in_flight: bad,
                ..rfc()
            };
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains("max_in_flight"), "{err}");
        }
    }

    fn form(body: &[u8]) -> Vec<(String, String)> {
        form_urlencoded::parse(body).into_owned().collect()
    }

    #[test]
    fn config_defaults() {
        let c = rfc();
        c.validate().unwrap();
        assert_eq!(
            (c.timeout_ms.millis(), c.positive_ttl_s, c.negative_ttl_s),
            (2000, 300, 10)
        );
        let k = keyrock();
        k.validate().unwrap();
        assert_eq!(k.path(), "/user");
        // Round trip.
        let json = serde_json::to_value(&k).unwrap();
        assert_eq!(
            serde_json::from_value::<IntrospectionConfig>(json).unwrap(),
            k
        );
    }

    #[test]
    fn config_rejects_unknown_fields() {
        for bad in [
            json!({"kind": "rfc7662", "cluster": "c", "authority": "a", "path": "/i", "credentials": {"client_id": "x", "client_secret": "y"}, "ttl": 5}),
            json!({"kind": "rfc7662", "cluster": "c", "authority": "a", "path": "/i", "credentials": {"client_id": "x", "secret": "y"}}),
            json!({"kind": "oidc", "cluster": "c", "authority": "a"}),
            json!({"kind": "keyrock", "authority": "a", "app_id": "x"}),
        ] {
            assert!(
                serde_json::from_value::<IntrospectionConfig>(bad.clone()).is_err(),
                "{bad}"
            );
        }
    }

    #[rustfmt::skip]
    #[test]
    fn config_validation_table() {
        type Base = fn() -> IntrospectionConfig;
        type Edit = fn(&mut IntrospectionConfig);
        let cases: Vec<(&str, Base, Edit, Option<&str>)> = vec![
            ("rfc ok", rfc, |_| {}, None),
            ("keyrock ok", keyrock, |_| {}, None),
            ("keyrock without pep credentials", keyrock, |c| c.credentials = IntrospectionCredentials::default(), None),
            ("rfc without path", rfc, |c| c.path = None, Some("path: required")),
            ("path with query", keyrock, |c| c.path = UpstreamPath::try_from("/user?x=1".to_string()).ok(), Some("path")),
            ("long positive ttl", rfc, |c| c.positive_ttl_s = 100_000, Some("positive_ttl_s")),
            ("long negative ttl", rfc, |c| c.negative_ttl_s = 3600, Some("negative_ttl_s")),
            ("zero positive ttl", rfc, |c| c.positive_ttl_s = 0, None),
            ("rfc without secret", rfc, |c| c.credentials.secret.client_secret = None, Some("credentials.client_secret: missing")),
            ("rfc empty id", rfc, |c| c.credentials.client_id = Some(String::new()), Some("credentials.client_id: required")),
            ("rfc empty secret", rfc, |c| c.credentials.secret.client_secret = Some(String::new()), Some("credentials.client_secret: must be non-empty")),
            ("rfc secret and env", rfc, |c| c.credentials.secret.client_secret_env = Some("S".into()), Some("credentials.client_secret_env: give client_secret or client_secret_env, not both")),
            ("rfc with pep", rfc, |c| c.credentials.pep_id = Some("p".into()), Some("not supported")),
            ("rfc with app_id", rfc, |c| c.app_id = Some("a".into()), Some("only for kind keyrock")),
            ("rfc empty claim segment", rfc, |c| c.roles_claim = Some("realm_access..roles".into()), Some("roles_claim")),
            ("rfc empty groups claim", rfc, |c| c.groups_claim = Some(String::new()), Some("groups_claim")),
            ("rfc empty audience", rfc, |c| c.audience = Some(String::new()), Some("audience")),
            ("rfc dotted audience", rfc, |c| c.audience = Some("orion.example.".into()), None),
            ("keyrock without app_id", keyrock, |c| c.app_id = None, Some("app_id: required")),
            ("keyrock blank app_id", keyrock, |c| c.app_id = Some(" ".into()), Some("app_id: required")),
            ("keyrock bad trusted app", keyrock, |c| c.trusted_apps = vec![String::new()], Some("trusted_apps")),
            ("keyrock with pep id", keyrock, |c| c.credentials.pep_id = Some("pep_proxy_1".into()), Some("pep_id and pep_password are not supported")),
            ("keyrock with pep password", keyrock, |c| c.credentials.pep_password = Some("pw".into()), Some("not supported")),
            ("keyrock with client secret", keyrock, |c| c.credentials.secret.client_secret = Some("x".into()), Some("only for kind rfc7662")),
            ("keyrock with client secret env", keyrock, |c| c.credentials.secret.client_secret_env = Some("S".into()), Some("only for kind rfc7662")),
            ("keyrock with audience", keyrock, |c| c.audience = Some("x".into()), Some("only for kind rfc7662")),
        ];
        for (name, base, edit, want) in cases {
            let mut c = base();
            edit(&mut c);
            match (want, c.validate()) {
                (None, Ok(())) => {}
                (Some(msg), Err(e)) => assert!(e.to_string().contains(msg), "{name}: {e}"),
                (want, got) => panic!("{name}: wanted {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn the_endpoint_is_checked_as_it_is_read() {
        let base = json!({"kind": "rfc7662", "cluster": "c", "authority": "a", "path": "/i",
                          "credentials": {"client_id": "x", "client_secret": "y"}});
        for (field, bad) in [
            ("cluster", json!("")),
            ("cluster", json!("a b")),
            ("authority", json!("a/b")),
            ("authority", json!("u@a")),
            ("path", json!("introspect")),
            ("timeout_ms", json!(0)),
            ("timeout_ms", json!(60_001)),
        ] {
            let mut config = base.clone();
            config[field] = bad.clone();
            let refused =
                crate::config_error::parse::<IntrospectionConfig>(config.to_string().as_bytes())
                    .unwrap_err();
            assert!(
                matches!(&refused, crate::config_error::ConfigError::At { path, .. } if path == field),
                "{field} = {bad}: {refused}"
            );
        }
    }

    /// An rfc7662 configuration whose secret is named by `client_secret_env`, read from `env`.
    fn rfc_from_env(env: &[(&str, &str)]) -> Result<IntrospectionConfig, String> {
        let mut config: IntrospectionConfig = serde_json::from_value(json!({
            "kind": "rfc7662", "cluster": "keycloak", "authority": "keycloak.example",
            "path": "/introspect",
            "credentials": {"client_id": "envoy", "client_secret_env": "PEP_SECRET"}}))
        .map_err(|e| e.to_string())?;
        config.read_environment(&|name: &str| {
            env.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        });
        config
            .validate()
            .map(|()| config)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_client_secret_may_come_from_the_environment() {
        let config = rfc_from_env(&[("PEP_SECRET", "s3cret")]).unwrap();
        // The same Basic authorization as with the secret inline (base64 "envoy:s3cret").
        assert_eq!(
            config.build_request("tok").header("authorization"),
            rfc().build_request("tok").header("authorization")
        );
        assert_eq!(
            config.build_request("tok").header("authorization"),
            Some("Basic ZW52b3k6czNjcmV0")
        );
        assert!(!format!("{config:?}").contains("s3cret"), "{config:?}");
        // Unset, empty, or not an environment variable name: refused, naming the field.
        for env in [&[][..], &[("PEP_SECRET", "")], &[("OTHER", "s3cret")]] {
            let err = rfc_from_env(env).unwrap_err();
            assert!(
                err.starts_with(
                    "introspection: credentials.client_secret_env: the environment variable \
                     PEP_SECRET is not set or is empty"
                ),
                "{err}"
            );
        }
        let err = rfc_from_env(&[("PEP_SECRET", "a\tb")]).unwrap_err();
        assert!(
            err.contains("control characters") && !err.contains("a\tb"),
            "{err}"
        );
        // A configuration never given the environment is refused as unset.
        let mut unread = rfc();
        unread.credentials.secret =
            serde_json::from_value(json!({"client_secret_env": "S"})).unwrap();
        assert!(unread.validate().is_err());
        // Any other key in credentials is still refused (the secret's keys are flattened in).
        let refused = serde_json::from_value::<IntrospectionCredentials>(
            json!({"client_id": "x", "client_secret_env": "S", "secret_env": "S"}),
        )
        .unwrap_err();
        assert!(
            refused.to_string().contains("unknown field `secret_env`"),
            "{refused}"
        );
    }

    #[test]
    fn credentials_are_not_debug_printed() {
        let dbg = format!("{:?} {:?}", rfc(), keyrock());
        assert!(!dbg.contains("s3cret") && !dbg.contains("\"pw\""), "{dbg}");
        assert!(dbg.contains("envoy"));
        let call = keyrock().build_request("tok3n");
        let dbg = format!("{call:?}");
        assert!(!dbg.contains("tok3n"), "{dbg}");
        let call = rfc().build_request("tok3n");
        let dbg = format!("{call:?}");
        assert!(
            !dbg.contains("tok3n") && !dbg.contains("ZW52b3k6czNjcmV0"),
            "{dbg}"
        );
    }

    #[test]
    fn rfc7662_request() {
        let call = rfc().build_request("a+b/c=");
        assert_eq!(call.method, "POST");
        assert_eq!(call.cluster, "keycloak");
        assert_eq!(
            call.path,
            "/realms/city/protocol/openid-connect/token/introspect"
        );
        assert_eq!(call.timeout_ms, 2000);
        assert_eq!(
            call.header("content-type"),
            Some("application/x-www-form-urlencoded")
        );
        assert_eq!(call.header("accept"), Some("application/json"));
        assert_eq!(
            call.header("content-length"),
            Some(call.body.len().to_string().as_str())
        );
        assert_eq!(
            String::from_utf8(call.body.clone()).unwrap(),
            "token=a%2Bb%2Fc%3D&token_type_hint=access_token"
        );
        assert_eq!(
            form(&call.body),
            vec![
                ("token".into(), "a+b/c=".into()),
                ("token_type_hint".into(), "access_token".into())
            ]
        );
        // base64("envoy:s3cret")
        assert_eq!(call.header("authorization"), Some("Basic ZW52b3k6czNjcmV0"));
        let h = call.envoy_headers();
        assert_eq!(
            &h[..3],
            &[
                (":method", "POST"),
                (":path", call.path.as_str()),
                (":authority", "keycloak.example")
            ]
        );
    }

    #[test]
    fn basic_auth_form_encodes_id_and_secret() {
        // RFC 6749 §2.3.1: "a b:c" / "p&ss" → "a+b%3Ac:p%26ss".
        let got = basic_auth("a b:c", "p&ss");
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(got.trim_start_matches("Basic "))
            .unwrap();
        assert_eq!(String::from_utf8(decoded).unwrap(), "a+b%3Ac:p%26ss");
    }

    #[test]
    fn keyrock_request_matches_wilma() {
        let call = keyrock().build_request("0b5a4b8a-3a4e");
        assert_eq!(call.method, "GET");
        assert_eq!(call.path, "/user?access_token=0b5a4b8a-3a4e&app_id=app-1");
        assert_eq!(call.header("accept"), Some("application/json"));
        assert!(call.body.is_empty());
        let call = keyrock().build_request("a+b/=");
        assert_eq!(call.path, "/user?access_token=a%2Bb%2F%3D&app_id=app-1");
        assert_eq!(call.header("x-auth-token"), None);
        let mut c = keyrock();
        c.path = UpstreamPath::try_from("/idm/user".to_string()).ok();
        c.app_id = Some("a&b".into());
        assert_eq!(
            c.build_request("t").path,
            "/idm/user?access_token=t&app_id=a%26b"
        );
    }

    #[derive(Debug)]
    enum Want {
        Active(&'static str),
        Inactive,
        WrongApp,
        Error,
    }

    fn check(
        name: &str,
        config: &IntrospectionConfig,
        status: u32,
        body: &str,
        want: Want,
    ) -> Option<TokenInfo> {
        let got = config.parse_response(status, body.as_bytes(), NOW);
        match (&want, &got) {
            (Want::Active(subject), Ok(Verdict::Active(info))) => {
                assert_eq!(info.identity.subject, *subject, "{name}");
                assert_eq!(info.identity.kind, IdentityKind::OpaqueToken, "{name}");
                return Some((**info).clone());
            }
            (Want::Inactive, Ok(v @ Verdict::Inactive { .. })) => {
                assert_eq!(v.deny_reason().unwrap().status(), 401, "{name}");
            }
            (Want::WrongApp, Ok(v @ Verdict::WrongApplication { .. })) => {
                assert_eq!(v.deny_reason().unwrap().status(), 403, "{name}");
            }
            (Want::Error, Err(e)) => assert_eq!(e.deny_reason().status(), 503, "{name}"),
            _ => panic!("{name}: wanted {want:?}, got {got:?}"),
        }
        None
    }

    #[rustfmt::skip]
    #[test]
    fn rfc7662_answers_table() {
        let c = rfc();
        let future = NOW + 600;
        let cases: Vec<(&str, u32, String, Want)> = vec![
            ("active minimal", 200, r#"{"active": true, "sub": "alice"}"#.into(), Want::Active("alice")),
            ("active username only", 200, r#"{"active": true, "username": "bob"}"#.into(), Want::Active("bob")),
            ("active client only", 200, r#"{"active": true, "client_id": "svc"}"#.into(), Want::Active("svc")),
            ("sub wins over username", 200, r#"{"active": true, "sub": "u-1", "username": "carol"}"#.into(), Want::Active("u-1")),
            ("active future exp", 200, format!(r#"{{"active": true, "sub": "a", "exp": {future}}}"#), Want::Active("a")),
            ("float exp", 200, format!(r#"{{"active": true, "sub": "a", "exp": {future}.5}}"#), Want::Active("a")),
            ("201 is 2xx", 201, r#"{"active": true, "sub": "a"}"#.into(), Want::Active("a")),
            ("inactive", 200, r#"{"active": false}"#.into(), Want::Inactive),
            ("inactive with claims", 200, r#"{"active": false, "sub": "alice"}"#.into(), Want::Inactive),
            ("expired exp", 200, format!(r#"{{"active": true, "sub": "a", "exp": {}}}"#, NOW - 1), Want::Inactive),
            ("exp equals now", 200, format!(r#"{{"active": true, "sub": "a", "exp": {NOW}}}"#), Want::Inactive),
            ("no subject", 200, r#"{"active": true}"#.into(), Want::Inactive),
            ("active string", 200, r#"{"active": "true", "sub": "a"}"#.into(), Want::Error),
            ("active number", 200, r#"{"active": 1, "sub": "a"}"#.into(), Want::Error),
            ("active null", 200, r#"{"active": null}"#.into(), Want::Error),
            ("active missing", 200, r#"{"sub": "a"}"#.into(), Want::Error),
            ("not json", 200, "<html>oops</html>".into(), Want::Error),
            ("empty body", 200, "".into(), Want::Error),
            ("array", 200, "[true]".into(), Want::Error),
            ("truncated", 200, r#"{"active": tr"#.into(), Want::Error),
            ("401 (our credentials)", 401, r#"{"error": "invalid_client"}"#.into(), Want::Error),
            ("500", 500, r#"{"active": true, "sub": "a"}"#.into(), Want::Error),
            ("302", 302, "".into(), Want::Error),
            ("sub not string", 200, r#"{"active": true, "sub": 42}"#.into(), Want::Error),
            ("exp string", 200, r#"{"active": true, "sub": "a", "exp": "soon"}"#.into(), Want::Error),
            ("exp negative", 200, r#"{"active": true, "sub": "a", "exp": -5}"#.into(), Want::Error),
            ("aud number", 200, r#"{"active": true, "sub": "a", "aud": 5}"#.into(), Want::Error),
            ("scope number", 200, r#"{"active": true, "sub": "a", "scope": 5}"#.into(), Want::Error),
            ("duplicate-free null fields", 200, r#"{"active": true, "sub": "a", "scope": null, "aud": null, "exp": null}"#.into(), Want::Active("a")),
        ];
        for (name, status, body, want) in cases {
            check(name, &c, status, &body, want);
        }
    }

    #[test]
    fn rfc7662_maps_claims() {
        let mut c = rfc();
        c.roles_claim = Some("realm_access.roles".into());
        c.groups_claim = Some("groups".into());
        let body = json!({
            "active": true, "sub": "f1b2", "username": "alice", "client_id": "portal",
            "scope": "openid  orion:read orion:write", "exp": NOW + 60, "iss": "https://kc/realms/city",
            "aud": ["orion", "account"], "realm_access": {"roles": ["admin", "operator"]},
            "groups": ["/city-a"]
        })
        .to_string();
        let info = check("full", &c, 200, &body, Want::Active("f1b2")).unwrap();
        assert_eq!(info.identity.display_name.as_deref(), Some("alice"));
        assert_eq!(info.identity.expires_at, Some(NOW + 60));
        assert_eq!(info.identity.roles, vec!["admin", "operator"]);
        assert_eq!(info.identity.groups, vec!["/city-a"]);
        assert_eq!(info.scopes, vec!["openid", "orion:read", "orion:write"]);
        assert!(info.has_scope("orion:write") && !info.has_scope("orion"));
        assert_eq!(info.client_id.as_deref(), Some("portal"));
        assert_eq!(info.issuer.as_deref(), Some("https://kc/realms/city"));
        assert_eq!(info.audiences, vec!["orion", "account"]);
        let v = c.parse_response(200, body.as_bytes(), NOW).unwrap();
        assert_eq!(v.expires_at(), Some(NOW + 60));
        assert_eq!(c.cache_ttl(&v), 300);

        // Absent claim paths give empty lists; wrong types are errors.
        let info = check(
            "no roles",
            &c,
            200,
            r#"{"active": true, "sub": "a", "realm_access": {}}"#,
            Want::Active("a"),
        )
        .unwrap();
        assert!(info.identity.roles.is_empty() && info.identity.groups.is_empty());
        check(
            "roles not list",
            &c,
            200,
            r#"{"active": true, "sub": "a", "realm_access": {"roles": 3}}"#,
            Want::Error,
        );
        let info = check(
            "scope array",
            &rfc(),
            200,
            r#"{"active": true, "sub": "a", "scope": ["x", "y"], "aud": "orion"}"#,
            Want::Active("a"),
        )
        .unwrap();
        assert_eq!(info.scopes, vec!["x", "y"]);
        assert_eq!(info.audiences, vec!["orion"]);
    }

    #[test]
    fn rfc7662_audience() {
        let mut c = rfc();
        c.audience = Some("orion".into());
        check(
            "match string",
            &c,
            200,
            r#"{"active": true, "sub": "a", "aud": "orion"}"#,
            Want::Active("a"),
        );
        check(
            "match array",
            &c,
            200,
            r#"{"active": true, "sub": "a", "aud": ["x", "orion"]}"#,
            Want::Active("a"),
        );
        check(
            "no aud",
            &c,
            200,
            r#"{"active": true, "sub": "a"}"#,
            Want::Inactive,
        );
        check(
            "other aud",
            &c,
            200,
            r#"{"active": true, "sub": "a", "aud": ["orion2"]}"#,
            Want::Inactive,
        );
    }

    /// An answer as Keyrock's `create_oauth_response` builds it for a user.
    fn keyrock_user_answer(app_id: &str) -> Value {
        json!({
            "organizations": [
                {"id": "org-1", "name": "City of A", "description": "d", "website": "w",
                 "roles": [{"id": "r-op", "name": "operator"}, {"id": "r-adm", "name": "admin"}]}
            ],
            "displayName": "",
            "roles": [{"id": "r-adm", "name": "admin"}, {"id": "r-view", "name": "viewer"}],
            "app_id": app_id,
            "trusted_apps": ["app-keyrock-trusted"],
            "isGravatarEnabled": false,
            "id": "2d6f5391-6130-48d8-a9d0-01f20699a7eb",
            "authorization_decision": "",
            "app_azf_domain": "",
            "eidas_profile": {},
            "attributes": {},
            "shared_attributes": "",
            "username": "alice",
            "email": "",
            "given_name": "alice",
            "family_name": "alice",
            "image": "",
            "gravatar": "",
            "extra": ""
        })
    }

    #[rustfmt::skip]
    #[test]
    fn keyrock_answers_table() {
        let k = keyrock();
        let user = "2d6f5391-6130-48d8-a9d0-01f20699a7eb";
        let cases: Vec<(&str, u32, String, Want)> = vec![
            ("user of the app", 200, keyrock_user_answer("app-1").to_string(), Want::Active(user)),
            ("app trusted by config", 200, keyrock_user_answer("app-cfg-trusted").to_string(), Want::Active(user)),
            ("app trusted by keyrock", 200, keyrock_user_answer("app-keyrock-trusted").to_string(), Want::Active(user)),
            ("other app", 200, keyrock_user_answer("app-2").to_string(), Want::WrongApp),
            ("application token", 200, r#"{"app_id": "app-1"}"#.into(), Want::Active("app-1")),
            ("iot agent", 200, r#"{"displayName": "", "roles": [], "app_id": "app-1", "trusted_apps": [], "id": "iot_sensor_1", "app_azf_domain": ""}"#.into(), Want::Active("iot_sensor_1")),
            ("invalid token", 401, r#""Invalid token: access token is invalid""#.into(), Want::Inactive),
            ("invalid token, empty body", 401, "".into(), Want::Inactive),
            ("wrong app per keyrock", 401, r#""User not authorized in application""#.into(), Want::WrongApp),
            ("keyrock 500", 500, r#""Internal error""#.into(), Want::Error),
            ("keyrock 400", 400, r#"{"message": "Cannot handle 2 authentications levels at the same time"}"#.into(), Want::Error),
            ("keyrock 404", 404, "".into(), Want::Error),
            ("no app_id", 200, r#"{"id": "u"}"#.into(), Want::Error),
            ("empty app_id", 200, r#"{"id": "u", "app_id": ""}"#.into(), Want::Error),
            ("roles malformed", 200, r#"{"id": "u", "app_id": "app-1", "roles": ["admin"]}"#.into(), Want::Error),
            ("orgs malformed", 200, r#"{"id": "u", "app_id": "app-1", "organizations": {}}"#.into(), Want::Error),
            ("trusted malformed", 200, r#"{"id": "u", "app_id": "app-1", "trusted_apps": [1]}"#.into(), Want::Error),
            ("id not string", 200, r#"{"id": 7, "app_id": "app-1"}"#.into(), Want::Error),
            ("html", 200, "<html/>".into(), Want::Error),
        ];
        for (name, status, body, want) in cases {
            check(name, &k, status, &body, want);
        }
    }

    #[test]
    fn keyrock_maps_identity_and_wilma_headers() {
        let k = keyrock();
        let body = keyrock_user_answer("app-1").to_string();
        let v = k.parse_response(200, body.as_bytes(), NOW).unwrap();
        assert_eq!(k.cache_ttl(&v), 300);
        assert_eq!(v.expires_at(), None);
        let Verdict::Active(info) = v else { panic!() };
        let id = &info.identity;
        assert_eq!(id.subject, "2d6f5391-6130-48d8-a9d0-01f20699a7eb");
        assert_eq!(id.display_name.as_deref(), Some("alice"));
        assert_eq!(id.roles, vec!["admin", "viewer", "operator"]);
        assert_eq!(id.groups, vec!["City of A"]);
        assert_eq!(info.client_id.as_deref(), Some("app-1"));
        let user = info.keyrock.as_ref().unwrap();
        assert_eq!(user.email, None, "empty strings are absent");
        assert_eq!(user.username.as_deref(), Some("alice"));
        let headers = user.wilma_headers();
        let get = |n: &str| {
            headers
                .iter()
                .find(|(h, _)| *h == n)
                .map(|(_, v)| v.as_str())
                .unwrap()
        };
        assert_eq!(get("x-nick-name"), "2d6f5391-6130-48d8-a9d0-01f20699a7eb");
        assert_eq!(get("x-display-name"), "");
        assert_eq!(get("x-app-id"), "app-1");
        let roles: Value = serde_json::from_str(get("x-roles")).unwrap();
        assert_eq!(
            roles,
            json!([{"id": "r-adm", "name": "admin"}, {"id": "r-view", "name": "viewer"}])
        );
        let orgs: Value = serde_json::from_str(get("x-organizations")).unwrap();
        assert_eq!(orgs[0]["name"], "City of A");
        assert_eq!(orgs[0]["roles"][0]["name"], "operator");

        // A display name wins over the username; non-ASCII is escaped in JSON headers.
        let mut answer = keyrock_user_answer("app-1");
        answer["displayName"] = json!("Alicia");
        answer["organizations"][0]["name"] = json!("Città 🏙");
        let v = k
            .parse_response(200, answer.to_string().as_bytes(), NOW)
            .unwrap();
        let Verdict::Active(info) = v else { panic!() };
        assert_eq!(info.identity.display_name.as_deref(), Some("Alicia"));
        let user = info.keyrock.unwrap();
        let orgs = user
            .wilma_headers()
            .into_iter()
            .find(|(h, _)| *h == "x-organizations")
            .unwrap()
            .1;
        assert!(orgs.is_ascii(), "{orgs}");
        let parsed: Value = serde_json::from_str(&orgs).unwrap();
        assert_eq!(parsed[0]["name"], "Città 🏙");
    }

    #[test]
    fn keyrock_wrong_application_names_the_app() {
        let v = keyrock()
            .parse_response(
                200,
                keyrock_user_answer("app-2").to_string().as_bytes(),
                NOW,
            )
            .unwrap();
        assert_eq!(
            v,
            Verdict::WrongApplication {
                app_id: Some("app-2".into())
            }
        );
        assert_eq!(keyrock().cache_ttl(&v), 10);
        assert!(v.identity().is_none());
    }

    #[test]
    fn oversized_answer_is_an_error() {
        let big = format!(
            r#"{{"active": true, "sub": "a", "pad": "{}"}}"#,
            "x".repeat(MAX_RESPONSE_BYTES)
        );
        check("big", &rfc(), 200, &big, Want::Error);
    }

    #[test]
    fn verdicts_round_trip_through_json() {
        let k = keyrock();
        for v in [
            k.parse_response(
                200,
                keyrock_user_answer("app-1").to_string().as_bytes(),
                NOW,
            )
            .unwrap(),
            k.parse_response(
                200,
                keyrock_user_answer("app-2").to_string().as_bytes(),
                NOW,
            )
            .unwrap(),
            k.parse_response(401, b"", NOW).unwrap(),
            rfc()
                .parse_response(200, br#"{"active": true, "sub": "a", "scope": "x"}"#, NOW)
                .unwrap(),
        ] {
            let bytes = serde_json::to_vec(&v).unwrap();
            assert_eq!(serde_json::from_slice::<Verdict>(&bytes).unwrap(), v);
        }
    }
}
