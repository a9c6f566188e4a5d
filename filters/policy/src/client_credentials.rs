//! `auth` of an upstream endpoint: the filter authenticates its own calls with an OAuth2
//! access token it gets from the IdP with the client-credentials grant (RFC 6749 §4.4).
//!
//! ```json
//! "auth": {"client_credentials": {
//!   "token_endpoint": {"cluster": "idp", "authority": "idp.example",
//!                      "path": "/realms/city/protocol/openid-connect/token", "timeout_ms": 2000},
//!   "client_id": "envoy-sidecar", "client_secret": "...", "scope": "ownership"}}
//! ```
//!
//! The secret is either in the configuration (`client_secret`) or in an environment variable of
//! the VM (`client_secret_env`: its name; Envoy exposes a variable of its own environment to the
//! VM with `vm_config.environment_variables.host_env_keys`, through WASI). The filter reads the
//! variable once, at configure time ([`ClientCredentials::read_environment`], handed the
//! environment by the glue: this crate reads none); a variable that is unset or empty refuses
//! the configuration, as does giving both or neither.
//!
//! Sans-IO: [`ClientCredentials::token_request`] is the call (`POST`, form body
//! `grant_type=client_credentials[&scope=...]`, the client authenticated with HTTP Basic,
//! `client_secret_basic`, RFC 6749 §2.3.1); [`ClientCredentials::read_answer`] reads the IdP's
//! answer into an [`AccessToken`] that is used until shortly before its `expires_in` runs out
//! ([`AccessToken::usable`]). [`TokenKeeper`] keeps the token for a stage (token-auth's device
//! registry, device-ownership's ownership registry): one fetch shared by the calls that wait for
//! it, fetched again before it expires, and after a 401 from the upstream (the call made again,
//! once); the stage only sends the calls it asks for. Anything but a 2xx JSON answer with a
//! `Bearer` `access_token` is an error: the calls that needed the token fail closed (503).

use std::collections::HashSet;
use std::fmt;
use std::hash::Hash;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use url::form_urlencoded;

use crate::upstream::{HttpCall, Upstream};

/// The largest token answer read.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// The longest access token accepted (it goes into a request header).
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Lifetime assumed when the IdP gives no `expires_in` (RFC 6749 §5.1 makes it optional).
pub const DEFAULT_EXPIRES_IN_S: u64 = 60;
/// The most a token is used before it is fetched again, whatever `expires_in` says.
pub const MAX_LIFETIME_S: u64 = 86_400;

/// `auth` of an upstream endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamAuth {
    pub client_credentials: ClientCredentials,
}

/// The client-credentials grant. The secret ([`ClientSecret`]) is in the configuration or in
/// an environment variable of the VM. `Debug` redacts it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientCredentials {
    pub token_endpoint: Upstream,
    pub client_id: String,
    /// `client_secret` or `client_secret_env`.
    #[serde(flatten)]
    pub secret: ClientSecret,
    /// Space-separated scopes asked for (absent: the IdP's default for the client).
    #[serde(default)]
    pub scope: Option<String>,
    /// Seconds before `expires_in` ends at which a new token is fetched (default 30; at most
    /// half the token's lifetime is given up).
    #[serde(default = "default_refresh_margin_s")]
    pub refresh_margin_s: u64,
}

fn default_refresh_margin_s() -> u64 {
    30
}

/// A client secret: the keys `client_secret` (the secret itself) or `client_secret_env` (the
/// name of the VM's environment variable holding it) of the object that holds the client's id,
/// the client-credentials grant's and token introspection's `credentials`; the one place that
/// reads, checks and redacts them. In the configuration, the secret travels as a
/// secret-bearing resource (file or ECDS) and shows in Envoy's config dump; from the
/// environment (a proxy-wasm module in Envoy has no file system), only its name does.
///
/// Flattened into its holder (`#[serde(flatten)]`): the holder's `deny_unknown_fields` still
/// refuses any other key.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientSecret {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_env: Option<String>,
    /// The value of `client_secret_env`, once [`ClientSecret::read_environment`] read it.
    #[serde(skip)]
    from_env: Option<String>,
}

impl fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redact = |s: &Option<String>| s.as_ref().map(|_| "<redacted>");
        f.debug_struct("ClientSecret")
            .field("client_secret", &redact(&self.client_secret))
            .field("client_secret_env", &self.client_secret_env)
            .field("from_env", &redact(&self.from_env))
            .finish()
    }
}

/// An access token and when to stop using it.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessToken {
    value: String,
    /// Seconds since the epoch from which it is fetched again.
    refresh_at: u64,
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("value", &"<redacted>")
            .field("refresh_at", &self.refresh_at)
            .finish()
    }
}

impl AccessToken {
    /// Whether it may still be sent at `now`.
    pub fn usable(&self, now: u64) -> bool {
        now < self.refresh_at
    }

    /// The `Authorization` header value.
    pub fn authorization(&self) -> String {
        format!("Bearer {}", self.value)
    }

    pub fn refresh_at(&self) -> u64 {
        self.refresh_at
    }
}

fn printable(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_graphic())
}

/// Whether `name` is a portable environment variable name (POSIX: letters, digits and `_`, not
/// starting with a digit).
fn env_name(name: &str) -> bool {
    name.len() <= 256
        && name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl ClientSecret {
    /// Whether either key is given.
    pub fn is_given(&self) -> bool {
        self.client_secret.is_some() || self.client_secret_env.is_some()
    }

    /// Reads `client_secret_env` (if given) from `env`, the VM's environment, once: call it at
    /// configure time, before [`ClientSecret::validate`], which refuses a variable that was
    /// unset or empty. `env` answers None for an unset variable.
    pub fn read_environment(&mut self, env: &dyn Fn(&str) -> Option<String>) {
        self.from_env = self
            .client_secret_env
            .as_deref()
            .filter(|name| env_name(name))
            .and_then(env)
            .filter(|value| !value.is_empty());
    }

    /// The secret: the configured one, or the environment variable's value once read.
    pub fn value(&self) -> Option<&str> {
        self.client_secret.as_deref().or(self.from_env.as_deref())
    }

    /// Exactly one of the two keys, and a usable secret; `at` is the JSON path of the object
    /// holding them, which the message starts with.
    pub fn validate(&self, at: &str) -> Result<(), String> {
        match (&self.client_secret, &self.client_secret_env) {
            (Some(_), Some(_)) => Err(format!(
                "{at}.client_secret_env: give client_secret or client_secret_env, not both"
            )),
            (None, None) => Err(format!(
                "{at}.client_secret: missing (give client_secret, or client_secret_env \
                 naming an environment variable that holds it)"
            )),
            (Some(secret), None) => {
                if secret.is_empty() || secret.chars().any(char::is_control) {
                    return Err(format!(
                        "{at}.client_secret: must be non-empty, without control characters"
                    ));
                }
                Ok(())
            }
            (None, Some(name)) => {
                if !env_name(name) {
                    return Err(format!(
                        "{at}.client_secret_env: {name:?} is not an environment variable name \
                         (letters, digits and _, not starting with a digit)"
                    ));
                }
                match &self.from_env {
                    None => Err(format!(
                        "{at}.client_secret_env: the environment variable {name} is not set \
                         or is empty in the VM (in Envoy, start Envoy with it and list it in \
                         vm_config.environment_variables.host_env_keys)"
                    )),
                    Some(value) if value.chars().any(char::is_control) => Err(format!(
                        "{at}.client_secret_env: the value of {name} has control characters"
                    )),
                    Some(_) => Ok(()),
                }
            }
        }
    }
}

impl ClientCredentials {
    /// Reads the secret's environment variable, if it names one
    /// ([`ClientSecret::read_environment`]).
    pub fn read_environment(&mut self, env: &dyn Fn(&str) -> Option<String>) {
        self.secret.read_environment(env);
    }

    /// Checks what serde could not; the message names the field (below `auth`).
    pub fn validate(&self) -> Result<(), String> {
        let at = "auth.client_credentials";
        // RFC 6749 §2.3.1 / appendix A.1: VSCHAR (printable ASCII and space).
        let vschar = |t: &str| !t.is_empty() && t.bytes().all(|b| (0x20..=0x7e).contains(&b));
        if !vschar(&self.client_id) || self.client_id.len() > 256 {
            return Err(format!(
                "{at}.client_id: must be 1 to 256 printable ASCII characters or spaces"
            ));
        }
        self.secret.validate(at)?;
        if let Some(scope) = &self.scope {
            let ok = !scope.is_empty()
                && scope
                    .split(' ')
                    .all(|s| printable(s) && !s.contains(['"', '\\']));
            if !ok {
                return Err(format!(
                    "{at}.scope: {scope:?} must be scope tokens separated by single spaces"
                ));
            }
        }
        if self.refresh_margin_s > 3600 {
            return Err(format!("{at}.refresh_margin_s: at most 3600"));
        }
        Ok(())
    }

    /// The call that asks the IdP for a token.
    pub fn token_request(&self) -> HttpCall {
        let mut form = form_urlencoded::Serializer::new(String::new());
        form.append_pair("grant_type", "client_credentials");
        if let Some(scope) = &self.scope {
            form.append_pair("scope", scope);
        }
        let body = form.finish().into_bytes();
        self.token_endpoint
            .call("POST")
            .with_header("content-type", "application/x-www-form-urlencoded")
            .with_header("accept", "application/json")
            .with_header(
                "authorization",
                basic_auth(&self.client_id, self.secret.value().unwrap_or_default()),
            )
            .with_header("content-length", body.len().to_string())
            .with_body(body)
    }

    /// Reads the IdP's answer (`status` 0: none) at `now`; Err says why there is no token.
    pub fn read_answer(&self, status: u32, body: &[u8], now: u64) -> Result<AccessToken, String> {
        if status == 0 {
            return Err("the IdP did not answer".into());
        }
        if !(200..300).contains(&status) {
            return Err(format!("the IdP answered {status}"));
        }
        if body.len() > MAX_ANSWER_BYTES {
            return Err(format!("the answer is over {MAX_ANSWER_BYTES} bytes"));
        }
        let answer = crate::strict_json::parse_object(body)
            .map_err(|e| format!("the answer is not a JSON object: {e}"))?;
        let value = match answer.get("access_token") {
            Some(Value::String(t)) if printable(t) && t.len() <= MAX_TOKEN_BYTES => t.clone(),
            _ => return Err("access_token is missing or not a printable string".into()),
        };
        match answer.get("token_type") {
            Some(Value::String(t)) if t.eq_ignore_ascii_case("bearer") => {}
            _ => return Err("token_type is not Bearer".into()),
        }
        let lifetime = match answer.get("expires_in") {
            None => DEFAULT_EXPIRES_IN_S,
            Some(v) => match v.as_u64() {
                Some(s) if s > 0 => s.min(MAX_LIFETIME_S),
                _ => return Err("expires_in is not a positive integer".into()),
            },
        };
        let margin = self.refresh_margin_s.min(lifetime / 2);
        Ok(AccessToken {
            value,
            refresh_at: now.saturating_add(lifetime - margin),
        })
    }
}

/// `Basic base64(urlencode(id) ":" urlencode(secret))`, RFC 6749 §2.3.1.
pub fn basic_auth(id: &str, secret: &str) -> String {
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let pair = format!("{}:{}", enc(id), enc(secret));
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    )
}

// ------------------------------------------------------------------------------------------------
// The token a stage keeps for its authenticated calls

/// What a call that needs the token is to do ([`TokenKeeper::need`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenNeed {
    /// A usable token: send the call with this `Authorization` value.
    Ready(String),
    /// Wait for the token request in flight.
    Wait,
    /// Wait, and send the token request ([`TokenKeeper::request`]) now: then
    /// [`TokenKeeper::fetch_sent`], or [`TokenKeeper::leave`] if it could not be sent.
    Fetch,
}

/// The IdP's answer to the token request ([`TokenKeeper::answered`]).
#[derive(Debug, PartialEq, Eq)]
pub struct Fetched<W> {
    /// The calls that waited: with a token, they are sent now; without, they fail closed.
    pub waiters: Vec<W>,
    /// The stream that sent the request (None: the root): the answer arrives in its context.
    pub sent_by: Option<u32>,
    /// Why there is no token; None when one was fetched.
    pub failure: Option<String>,
}

/// The access token a stage keeps for its calls to an upstream that wants one (token-auth's
/// device registry, device-ownership's ownership registry), sans-IO: the stage sends the calls
/// this asks for and reports their answers.
///
/// * One token per VM, used until shortly before it expires ([`AccessToken::usable`]).
/// * One token request at a time: every call needing the token while it is fetched waits for
///   that one request (`W` names a waiter: a device id, a stream).
/// * A 401 from the upstream means it refused the token: the token is dropped, and the call
///   that got it is made again with a new one, once (`C` names the call); a second 401 for the
///   same call is its answer, and it fails closed.
/// * An IdP that gives no token fails every call that waited for it.
/// * The request is sent from a stream's context and Envoy cancels it when that stream ends
///   ([`TokenKeeper::forget_stream`]): the waiters are then [`TokenKeeper::orphaned`], and the
///   root sends the request again on its tick.
#[derive(Debug)]
pub struct TokenKeeper<W, C> {
    grant: ClientCredentials,
    token: Option<AccessToken>,
    /// While the token request is in flight: the stream that sent it (None: the root).
    fetching: Option<Option<u32>>,
    waiters: Vec<W>,
    /// Calls the upstream refused with 401 once, being made again with a new token.
    refused_once: HashSet<C>,
}

impl<W: PartialEq, C: Eq + Hash> TokenKeeper<W, C> {
    pub fn new(grant: ClientCredentials) -> Self {
        TokenKeeper {
            grant,
            token: None,
            fetching: None,
            waiters: Vec::new(),
            refused_once: HashSet::new(),
        }
    }

    /// The `Authorization` value for a call made at `now`, if a usable token is at hand.
    pub fn authorization(&self, now: u64) -> Option<String> {
        self.token
            .as_ref()
            .filter(|t| t.usable(now))
            .map(AccessToken::authorization)
    }

    /// `waiter`'s call needs the token at `now`.
    pub fn need(&mut self, waiter: W, now: u64) -> TokenNeed {
        if let Some(authorization) = self.authorization(now) {
            return TokenNeed::Ready(authorization);
        }
        self.wait(waiter);
        if self.fetching.is_some() {
            TokenNeed::Wait
        } else {
            TokenNeed::Fetch
        }
    }

    /// `waiter` waits for the next token without sending the request now: unless one is in
    /// flight, the root sends it on its tick ([`TokenKeeper::orphaned`]).
    pub fn wait(&mut self, waiter: W) {
        if !self.waiters.contains(&waiter) {
            self.waiters.push(waiter);
        }
    }

    /// `waiter` no longer waits (its stream ended, or the request it was to send could not be).
    pub fn leave(&mut self, waiter: &W) {
        self.waiters.retain(|w| w != waiter);
    }

    /// The token request.
    pub fn request(&self) -> HttpCall {
        self.grant.token_request()
    }

    /// The token request was sent by `sent_by` (a stream; None: the root).
    pub fn fetch_sent(&mut self, sent_by: Option<u32>) {
        self.fetching = Some(sent_by);
    }

    /// Calls wait for a token but no request is in flight (its stream ended, or a 401 dropped
    /// the token): the root is to send it.
    pub fn orphaned(&self) -> bool {
        self.fetching.is_none() && !self.waiters.is_empty()
    }

    /// Stream `ctx` ended. True if it had sent the token request, which Envoy cancels: the
    /// stage forgets that callout, and the request is [`TokenKeeper::orphaned`].
    pub fn forget_stream(&mut self, ctx: u32) -> bool {
        if self.fetching == Some(Some(ctx)) {
            self.fetching = None;
            return true;
        }
        false
    }

    /// The IdP answered the token request (`status` 0: no answer) at `now`.
    pub fn answered(&mut self, status: u32, body: &[u8], now: u64) -> Fetched<W> {
        let sent_by = self.fetching.take().flatten();
        let waiters = std::mem::take(&mut self.waiters);
        let (token, failure) = match self.grant.read_answer(status, body, now) {
            Ok(token) => (Some(token), None),
            Err(why) => (None, Some(why)),
        };
        self.token = token;
        Fetched {
            waiters,
            sent_by,
            failure,
        }
    }

    /// The upstream refused the token (401) on a call that is not made again: the next call
    /// waits for a new one.
    pub fn refused(&mut self) {
        self.token = None;
    }

    /// The upstream answered `status` to `call`, made with the token. True: it refused the
    /// token (401) for the first time for `call`, so the call is to wait for a new token and be
    /// made again. False: `status` is the call's answer (a second 401 fails it closed).
    pub fn retry_with_new_token(&mut self, call: C, status: u32) -> bool {
        if status != 401 {
            self.refused_once.remove(&call);
            return false;
        }
        self.refused();
        if self.refused_once.remove(&call) {
            return false;
        }
        self.refused_once.insert(call);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn grant(extra: Value) -> ClientCredentials {
        let mut config = json!({
            "token_endpoint": {"cluster": "idp", "authority": "idp.example", "path": "/token"},
            "client_id": "envoy sidecar", "client_secret": "s3cret:x"});
        if let (Some(c), Some(e)) = (config.as_object_mut(), extra.as_object()) {
            c.extend(e.clone());
        }
        let grant: ClientCredentials = serde_json::from_value(config).unwrap();
        grant.validate().unwrap();
        grant
    }

    #[test]
    fn the_request_is_a_form_post_with_basic_client_authentication() {
        let call = grant(json!({"scope": "ownership read"})).token_request();
        assert_eq!((call.cluster.as_str(), call.method), ("idp", "POST"));
        assert_eq!(call.header(":path"), Some("/token"));
        assert_eq!(call.header(":authority"), Some("idp.example"));
        assert_eq!(
            call.header("content-type"),
            Some("application/x-www-form-urlencoded")
        );
        assert_eq!(
            call.body,
            b"grant_type=client_credentials&scope=ownership+read"
        );
        // RFC 6749 §2.3.1: each part form-encoded before base64.
        let basic = call.header("authorization").unwrap();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(basic.strip_prefix("Basic ").unwrap())
            .unwrap();
        assert_eq!(decoded, b"envoy+sidecar:s3cret%3Ax");
        assert_eq!(call.header("content-length"), Some("50"));
        assert!(!format!("{call:?} {:?}", grant(json!({}))).contains("s3cret"));
        assert_eq!(
            grant(json!({})).token_request().body,
            b"grant_type=client_credentials"
        );
    }

    #[test]
    fn a_token_is_used_until_shortly_before_it_expires() {
        let g = grant(json!({}));
        let t = g
            .read_answer(
                200,
                br#"{"access_token": "abc.def", "token_type": "Bearer", "expires_in": 600}"#,
                1000,
            )
            .unwrap();
        assert_eq!(t.authorization(), "Bearer abc.def");
        assert!(t.usable(1569) && !t.usable(1570), "{t:?}");
        // A short-lived token gives up at most half its lifetime.
        let t = g
            .read_answer(
                200,
                br#"{"access_token": "a", "token_type": "bearer", "expires_in": 10}"#,
                1000,
            )
            .unwrap();
        assert_eq!(t.refresh_at(), 1005);
        // No expires_in: a minute.
        let t = g
            .read_answer(200, br#"{"access_token": "a", "token_type": "Bearer"}"#, 0)
            .unwrap();
        assert_eq!(t.refresh_at(), 30);
        assert!(!format!("{t:?}").contains("\"a\""));
    }

    #[test]
    fn anything_but_a_bearer_token_is_an_error() {
        let g = grant(json!({}));
        for (status, body) in [
            (0, &b""[..]),
            (401, br#"{"error": "invalid_client"}"#),
            (503, b""),
            (200, b"not json"),
            (200, b"[]"),
            (200, br#"{"token_type": "Bearer"}"#),
            (200, br#"{"access_token": "", "token_type": "Bearer"}"#),
            (200, br#"{"access_token": "a b", "token_type": "Bearer"}"#),
            (200, br#"{"access_token": "a\n", "token_type": "Bearer"}"#),
            (200, br#"{"access_token": 5, "token_type": "Bearer"}"#),
            (200, br#"{"access_token": "a", "token_type": "mac"}"#),
            (200, br#"{"access_token": "a"}"#),
            (
                200,
                br#"{"access_token": "a", "token_type": "Bearer", "expires_in": 0}"#,
            ),
            (
                200,
                br#"{"access_token": "a", "token_type": "Bearer", "expires_in": "60"}"#,
            ),
            (
                200,
                br#"{"access_token": "a", "access_token": "b", "token_type": "Bearer"}"#,
            ),
        ] {
            assert!(
                g.read_answer(status, body, 0).is_err(),
                "{status} {}",
                String::from_utf8_lossy(body)
            );
        }
    }

    /// A grant from `config` after reading `env` (name, value) as the VM's environment.
    fn from_env(config: Value, env: &[(&str, &str)]) -> Result<ClientCredentials, String> {
        let mut grant: ClientCredentials =
            serde_json::from_value(config).map_err(|e| e.to_string())?;
        let lookup = |name: &str| {
            env.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        };
        grant.read_environment(&lookup);
        grant.validate().map(|()| grant)
    }

    #[test]
    fn the_secret_may_come_from_an_environment_variable() {
        let config = json!({"token_endpoint": {"cluster": "idp", "path": "/token"},
                            "client_id": "envoy", "client_secret_env": "REGISTRY_SECRET"});
        let grant = from_env(config.clone(), &[("REGISTRY_SECRET", "fr0m:env")]).unwrap();
        let basic = grant.token_request();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(
                basic
                    .header("authorization")
                    .unwrap()
                    .strip_prefix("Basic ")
                    .unwrap(),
            )
            .unwrap();
        assert_eq!(decoded, b"envoy:fr0m%3Aenv");
        assert!(!format!("{grant:?}").contains("fr0m"), "{grant:?}");
        // Unset, empty, or never read: refused, naming the variable, never a value.
        for env in [&[][..], &[("REGISTRY_SECRET", "")], &[("OTHER", "x")]] {
            let err = from_env(config.clone(), env).unwrap_err();
            assert!(
                err.starts_with(
                    "auth.client_credentials.client_secret_env: the environment \
                                 variable REGISTRY_SECRET is not set or is empty"
                ),
                "{err}"
            );
        }
        let unread: ClientCredentials = serde_json::from_value(config.clone()).unwrap();
        assert!(unread.validate().is_err());
        let err = from_env(config, &[("REGISTRY_SECRET", "a\nb")]).unwrap_err();
        assert!(
            err.contains("control characters") && !err.contains("a\nb"),
            "{err}"
        );
    }

    #[test]
    fn the_secret_is_given_once_and_the_variable_name_is_checked() {
        let base = json!({"token_endpoint": {"cluster": "idp", "path": "/token"},
                          "client_id": "envoy"});
        let with = |extra: Value| {
            let mut c = base.clone();
            if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
                c.extend(e.clone());
            }
            from_env(c, &[("S", "x"), ("1S", "x")])
        };
        let both = with(json!({"client_secret": "x", "client_secret_env": "S"})).unwrap_err();
        assert!(
            both.starts_with(
                "auth.client_credentials.client_secret_env: give client_secret or \
                              client_secret_env, not both"
            ),
            "{both}"
        );
        let neither = with(json!({})).unwrap_err();
        assert!(
            neither.starts_with("auth.client_credentials.client_secret: missing"),
            "{neither}"
        );
        for name in ["", "1S", "A=B", "A B", "Ä"] {
            let err = with(json!({"client_secret_env": name})).unwrap_err();
            assert!(
                err.contains("is not an environment variable name"),
                "{name}: {err}"
            );
        }
        assert!(with(json!({"client_secret_env": "_S1"})).is_err()); // unset
        assert!(with(json!({"client_secret_env": "S"})).is_ok());
    }

    #[test]
    fn bad_grants_are_refused_with_the_field() {
        let config = |extra: Value| {
            let mut c = json!({"token_endpoint": {"cluster": "idp", "path": "/token"},
                               "client_id": "a", "client_secret": "b"});
            if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
                c.extend(e.clone());
            }
            serde_json::from_value::<ClientCredentials>(c)
                .map_err(|e| e.to_string())
                .and_then(|g| g.validate())
        };
        assert!(config(json!({})).is_ok());
        for (extra, field) in [
            (json!({"client_id": ""}), "client_id"),
            (json!({"client_secret": ""}), "client_secret"),
            (json!({"scope": "a  b"}), "scope"),
            (json!({"refresh_margin_s": 4000}), "refresh_margin_s"),
            (
                json!({"token_endpoint": {"cluster": "idp", "path": "token"}}),
                "path",
            ),
            (json!({"secret": "x"}), "unknown field"),
        ] {
            let err = config(extra.clone()).unwrap_err();
            assert!(err.contains(field), "{extra}: {err}");
        }
    }

    fn keeper() -> TokenKeeper<&'static str, &'static str> {
        TokenKeeper::new(grant(json!({})))
    }

    const TOKEN_A: &[u8] =
        br#"{"access_token": "tok-a", "token_type": "Bearer", "expires_in": 600}"#;
    const TOKEN_B: &[u8] =
        br#"{"access_token": "tok-b", "token_type": "Bearer", "expires_in": 600}"#;

    #[test]
    fn concurrent_waiters_share_one_token_request() {
        let mut k = keeper();
        assert_eq!(k.need("lamp-1", 1000), TokenNeed::Fetch);
        assert_eq!(k.request().header(":path"), Some("/token"));
        k.fetch_sent(Some(7));
        assert_eq!(k.need("lamp-2", 1000), TokenNeed::Wait);
        assert_eq!(k.need("lamp-1", 1000), TokenNeed::Wait); // waits once
        assert!(!k.orphaned());
        let fetched = k.answered(200, TOKEN_A, 1001);
        assert_eq!(
            fetched,
            Fetched {
                waiters: vec!["lamp-1", "lamp-2"],
                sent_by: Some(7),
                failure: None
            }
        );
        // Later calls use it without asking the IdP.
        assert_eq!(
            k.need("lamp-3", 1002),
            TokenNeed::Ready("Bearer tok-a".into())
        );
        assert_eq!(k.authorization(1002).as_deref(), Some("Bearer tok-a"));
        assert!(!k.orphaned());
    }

    #[test]
    fn the_token_is_fetched_again_refresh_margin_before_it_expires() {
        let mut k = keeper();
        assert_eq!(k.need("a", 1000), TokenNeed::Fetch);
        k.fetch_sent(None);
        assert!(k.answered(200, TOKEN_A, 1000).failure.is_none());
        // expires_in 600, refresh_margin_s 30: used until 1569, fetched again from 1570.
        assert_eq!(k.need("b", 1569), TokenNeed::Ready("Bearer tok-a".into()));
        assert_eq!(k.need("c", 1570), TokenNeed::Fetch);
        k.fetch_sent(None);
        assert_eq!(k.authorization(1570), None);
        let fetched = k.answered(200, TOKEN_B, 1570);
        assert_eq!(fetched.waiters, vec!["c"]);
        assert_eq!(k.authorization(1571).as_deref(), Some("Bearer tok-b"));
    }

    #[test]
    fn a_401_refetches_once_then_the_call_fails_closed() {
        let mut k = keeper();
        k.need("lamp-1", 1000);
        k.fetch_sent(Some(1));
        k.answered(200, TOKEN_A, 1000);
        // Other answers are the call's answer; the token stays.
        assert!(!k.retry_with_new_token("lookup lamp-1", 404));
        assert!(!k.retry_with_new_token("lookup lamp-1", 403));
        assert!(k.authorization(1001).is_some());
        // A first 401: the token is dropped, the call waits for a new one.
        assert!(k.retry_with_new_token("lookup lamp-1", 401));
        assert_eq!(k.authorization(1001), None);
        k.wait("lamp-1");
        assert!(k.orphaned(), "the root fetches it");
        k.fetch_sent(None);
        let fetched = k.answered(200, TOKEN_B, 1002);
        assert_eq!((fetched.waiters, fetched.sent_by), (vec!["lamp-1"], None));
        // A second 401 for the same call: its answer (fail closed), no third token.
        assert!(!k.retry_with_new_token("lookup lamp-1", 401));
        assert_eq!(k.authorization(1003), None);
        // Then the call starts afresh: a later 401 is retried once again.
        assert!(k.retry_with_new_token("lookup lamp-1", 401));
        // A claim refused (401) is not made again, but the next call needs a new token.
        let mut k = keeper();
        k.need("x", 1000);
        k.fetch_sent(None);
        k.answered(200, TOKEN_A, 1000);
        k.refused();
        assert_eq!(k.need("y", 1001), TokenNeed::Fetch);
    }

    #[test]
    fn no_token_from_the_idp_fails_every_waiter() {
        for (status, body) in [
            (0, &b""[..]),
            (503, b""),
            (401, br#"{"error": "invalid_client"}"#),
            (200, br#"{"access_token": "a", "token_type": "mac"}"#),
        ] {
            let mut k = keeper();
            assert_eq!(k.need("a", 1000), TokenNeed::Fetch);
            k.fetch_sent(Some(3));
            assert_eq!(k.need("b", 1000), TokenNeed::Wait);
            let fetched = k.answered(status, body, 1000);
            assert_eq!(fetched.waiters, vec!["a", "b"], "{status}");
            assert!(fetched.failure.is_some(), "{status}");
            assert_eq!(k.authorization(1000), None);
            // Nothing left waiting; the next call asks the IdP again.
            assert!(!k.orphaned());
            assert_eq!(k.need("c", 1001), TokenNeed::Fetch);
        }
    }

    #[test]
    fn a_request_cancelled_with_its_stream_is_sent_again_by_the_root() {
        let mut k = keeper();
        assert_eq!(k.need("a", 1000), TokenNeed::Fetch);
        k.fetch_sent(Some(5));
        assert_eq!(k.need("b", 1000), TokenNeed::Wait);
        assert!(!k.forget_stream(6));
        assert!(k.forget_stream(5));
        k.leave(&"a");
        assert!(k.orphaned());
        k.fetch_sent(None);
        let fetched = k.answered(200, TOKEN_A, 1000);
        assert_eq!((fetched.waiters, fetched.sent_by), (vec!["b"], None));
        // A waiter that could not send the request leaves; with nobody waiting, nothing is due.
        let mut k = keeper();
        assert_eq!(k.need("a", 1000), TokenNeed::Fetch);
        k.leave(&"a");
        assert!(!k.orphaned());
    }
}
