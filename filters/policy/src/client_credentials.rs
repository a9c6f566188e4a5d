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
/// The shared-data keys of the grants' tokens start with this ([`ClientCredentials::shared_key`]).
pub const SHARED_KEY_PREFIX: &str = "client_credentials.token:";
/// Seconds a VM's claim to fetch the token outlives the token request's timeout: a claim whose
/// fetcher is gone (its VM trapped, its answer lost) is void after that, and another VM claims.
pub const CLAIM_MARGIN_S: u64 = 2;
/// The root's tick period (milliseconds) while calls wait for a token that no request of this
/// VM's own will bring ([`TokenKeeper::wants_prompt_tick`]); once a second otherwise.
pub const PROMPT_TICK_MS: u64 = 20;

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
    /// When the IdP gave it (seconds since the epoch) and for how long (`expires_in`, capped):
    /// what another VM needs to compute its own `refresh_at` from a shared token.
    obtained_at: u64,
    lifetime: u64,
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("value", &"<redacted>")
            .field("refresh_at", &self.refresh_at)
            .field("obtained_at", &self.obtained_at)
            .field("lifetime", &self.lifetime)
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
        Ok(self.token(value, now, lifetime))
    }

    /// A token obtained at `obtained_at` for `lifetime` seconds (at most [`MAX_LIFETIME_S`]),
    /// used until `refresh_margin_s` before it expires (at most half its lifetime is given up).
    fn token(&self, value: String, obtained_at: u64, lifetime: u64) -> AccessToken {
        let lifetime = lifetime.min(MAX_LIFETIME_S);
        let margin = self.refresh_margin_s.min(lifetime / 2);
        AccessToken {
            value,
            refresh_at: obtained_at.saturating_add(lifetime - margin),
            obtained_at,
            lifetime,
        }
    }

    /// The key of this grant's token in the data the workers' VMs share (Envoy shared data):
    /// everything the token depends on (the token endpoint's cluster, authority and path, the
    /// client id, the scope), so two grants that differ in any of them never share a token;
    /// never the secret (a client at an endpoint is one identity whatever the copy of its
    /// secret a configuration holds).
    pub fn shared_key(&self) -> String {
        let parts = [
            self.token_endpoint.cluster.as_str(),
            self.token_endpoint
                .authority
                .as_ref()
                .map_or("", |a| a.as_str()),
            self.token_endpoint.path.as_str(),
            self.client_id.as_str(),
            self.scope.as_deref().unwrap_or(""),
        ];
        // JSON: the fields are quoted and escaped, so no two grants make the same key.
        let fields = serde_json::to_string(&parts).unwrap_or_default();
        format!("{SHARED_KEY_PREFIX}{fields}")
    }

    /// How long a VM's claim to fetch the token holds: the request's timeout and a margin.
    fn claim_life_s(&self) -> u64 {
        self.token_endpoint
            .timeout_ms
            .millis()
            .div_ceil(1000)
            .saturating_add(CLAIM_MARGIN_S)
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

/// Where the token request is, while one is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fetching {
    /// Sent by this VM, from a stream's context (None: the root's).
    Here(Option<u32>),
    /// Another VM claimed fetch `seq` in the shared entry, until `until` (seconds): this one
    /// waits for the token it shares ([`TokenKeeper::sync_shared`]).
    Elsewhere { seq: u64, until: u64 },
}

/// The access token a stage keeps for its calls to an upstream that wants one (token-auth's
/// device registry, device-ownership's ownership registry), sans-IO: the stage sends the calls
/// this asks for and reports their answers.
///
/// * One token, used until shortly before it expires ([`AccessToken::usable`]).
/// * One token request at a time: every call needing the token while it is fetched waits for
///   that one request (`W` names a waiter: a device id, a stream).
/// * A 401 from the upstream means it refused the token: the token is dropped, and the call
///   that got it is made again with a new one, once (`C` names the call); a second 401 for the
///   same call is its answer, and it fails closed.
/// * An IdP that gives no token fails every call that waited for it.
/// * The request is sent from a stream's context and Envoy cancels it when that stream ends
///   ([`TokenKeeper::forget_stream`]): the waiters are then [`TokenKeeper::orphaned`], and the
///   root sends the request again on its tick.
///
/// **Shared by the workers' VMs.** With Envoy `--concurrency N` each worker runs its own VM,
/// and each would fetch its own token. The keepers of one grant share it through one entry of
/// Envoy's shared data ([`ClientCredentials::shared_key`]; the stage moves the bytes):
///
/// * before a VM fetches, it claims the fetch ([`TokenKeeper::claim`]), written with the
///   entry's compare-and-swap so that of two VMs claiming at once one wins; the other waits;
/// * the VM that fetched writes the token (or that its fetch failed) and drops the claim
///   ([`TokenKeeper::publish`]);
/// * the others read the entry ([`TokenKeeper::adopt`] before they need a token,
///   [`TokenKeeper::sync_shared`] on their tick): they use the token, computing when to fetch
///   again with their own `refresh_margin_s`; a failed fetch fails their waiters too (closed,
///   as when their own fetch fails). A VM with calls waiting for another VM's fetch has its
///   root tick every [`PROMPT_TICK_MS`] until they are released
///   ([`TokenKeeper::wants_prompt_tick`]), so they go within that much of the token (or the
///   failure) being written, not up to a second later;
/// * a claim holds for the token request's timeout and [`CLAIM_MARGIN_S`]: a fetcher that is
///   gone cannot block the others longer; its waiters keep waiting (and fail closed at their
///   own timeout) until a VM claims again;
/// * a token the upstream refused (401) is not taken from the entry again by the VM it was
///   refused to: that VM claims a new fetch;
/// * without shared data (the host refuses it), each VM fetches its own, as before.
#[derive(Debug)]
pub struct TokenKeeper<W, C> {
    grant: ClientCredentials,
    token: Option<AccessToken>,
    /// The shared fetch that gave `token` (0: none, or not shared).
    token_seq: u64,
    /// The shared fetch whose token the upstream refused (0: none).
    refused_seq: u64,
    fetching: Option<Fetching>,
    /// The shared fetch this VM claimed last (0: none): its claim, written by [`Self::claim`].
    claimed_seq: u64,
    /// The outcome of this VM's fetch `claimed_seq`, until [`Self::publish`] wrote it.
    unpublished: Option<Outcome>,
    waiters: Vec<W>,
    /// Calls the upstream refused with 401 once, being made again with a new token.
    refused_once: HashSet<C>,
}

/// How this VM's claimed fetch ended, for the shared entry ([`TokenKeeper::publish`]).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// A token: shared.
    Token(AccessToken),
    /// No token from the IdP: the VMs waiting for this fetch fail closed.
    Failed,
    /// No answer to wait for (the request was not sent, or Envoy cancelled it with its
    /// stream): the claim is dropped, and the VMs waiting for it claim again.
    Released,
}

/// What to do before sending the token request ([`TokenKeeper::claim`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Write these bytes to the shared entry with the cas it was read with; written, send the
    /// request ([`TokenKeeper::fetch_sent`]); on a cas mismatch, read the entry and claim again.
    Write(Vec<u8>),
    /// Another VM is fetching: wait for its token ([`TokenKeeper::sync_shared`]).
    Elsewhere,
}

/// The shared entry of a grant's token, as text:
/// `v1 <seq> <claimed_until> <failed_seq> <token_seq> <obtained_at> <lifetime>\n<token>`;
/// `seq` numbers the claims, `claimed_until` 0 is no claim, `token_seq` 0 is no token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct SharedEntry {
    seq: u64,
    claimed_until: u64,
    failed_seq: u64,
    token_seq: u64,
    obtained_at: u64,
    lifetime: u64,
    token: String,
}

impl SharedEntry {
    /// An entry that is absent or unreadable (another version's) is an empty one.
    fn parse(bytes: Option<&[u8]>) -> SharedEntry {
        let parsed = || {
            let text = std::str::from_utf8(bytes?).ok()?;
            let (head, token) = text.split_once('\n')?;
            let mut fields = head.split(' ');
            if fields.next()? != "v1" {
                return None;
            }
            let mut next = || fields.next()?.parse::<u64>().ok();
            let entry = SharedEntry {
                seq: next()?,
                claimed_until: next()?,
                failed_seq: next()?,
                token_seq: next()?,
                obtained_at: next()?,
                lifetime: next()?,
                token: token.to_string(),
            };
            let sound = entry.token_seq <= entry.seq
                && entry.failed_seq <= entry.seq
                && (entry.token_seq == 0
                    || (printable(&entry.token) && entry.token.len() <= MAX_TOKEN_BYTES));
            sound.then_some(entry)
        };
        parsed().unwrap_or_default()
    }

    fn to_bytes(&self) -> Vec<u8> {
        format!(
            "v1 {} {} {} {} {} {}\n{}",
            self.seq,
            self.claimed_until,
            self.failed_seq,
            self.token_seq,
            self.obtained_at,
            self.lifetime,
            self.token
        )
        .into_bytes()
    }

    fn claimed_at(&self, now: u64) -> bool {
        now < self.claimed_until
    }
}

impl<W: PartialEq, C: Eq + Hash> TokenKeeper<W, C> {
    pub fn new(grant: ClientCredentials) -> Self {
        TokenKeeper {
            grant,
            token: None,
            token_seq: 0,
            refused_seq: 0,
            fetching: None,
            claimed_seq: 0,
            unpublished: None,
            waiters: Vec::new(),
            refused_once: HashSet::new(),
        }
    }

    /// The shared-data key of the token ([`ClientCredentials::shared_key`]).
    pub fn shared_key(&self) -> String {
        self.grant.shared_key()
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

    /// Takes the token another VM shared, read from the shared entry (`entry`, None: absent)
    /// at `now`, when this one has none usable: a usable token this VM was not refused. True
    /// if one was taken. The calls waiting for a token are released by
    /// [`TokenKeeper::sync_shared`].
    pub fn adopt(&mut self, entry: Option<&[u8]>, now: u64) -> bool {
        if self.authorization(now).is_some() {
            return false;
        }
        let shared = SharedEntry::parse(entry);
        if shared.token_seq == 0
            || shared.token_seq == self.refused_seq
            || shared.token_seq < self.token_seq
        {
            return false;
        }
        let token = self
            .grant
            .token(shared.token, shared.obtained_at, shared.lifetime);
        if !token.usable(now) {
            return false;
        }
        self.token = Some(token);
        self.token_seq = shared.token_seq;
        true
    }

    /// The root's tick: reads the shared entry (`entry`) at `now`. A shared token releases the
    /// calls waiting for one (sent from the root: `sent_by` None); the failure of the fetch
    /// they waited for fails them; a claim that expired leaves them
    /// [`TokenKeeper::orphaned`] (the root claims and fetches).
    pub fn sync_shared(&mut self, entry: Option<&[u8]>, now: u64) -> Option<Fetched<W>> {
        self.adopt(entry, now);
        if matches!(self.fetching, Some(Fetching::Here(_))) || self.waiters.is_empty() {
            return None;
        }
        if self.authorization(now).is_some() {
            self.fetching = None;
            return Some(Fetched {
                waiters: std::mem::take(&mut self.waiters),
                sent_by: None,
                failure: None,
            });
        }
        let Some(Fetching::Elsewhere { seq, until }) = self.fetching else {
            return None;
        };
        let shared = SharedEntry::parse(entry);
        if seq > 0 && shared.failed_seq >= seq {
            self.fetching = None;
            return Some(Fetched {
                waiters: std::mem::take(&mut self.waiters),
                sent_by: None,
                failure: Some("another worker's token request got no token".into()),
            });
        }
        if shared.claimed_at(now) && shared.seq >= seq {
            self.fetching = Some(Fetching::Elsewhere {
                seq: shared.seq,
                until: shared.claimed_until,
            });
        } else if !shared.claimed_at(now) || now >= until {
            // Its fetcher is gone (or dropped the claim without a word): claim it here.
            self.fetching = None;
        }
        None
    }

    /// Before sending the token request at `now`: claims the fetch in the shared entry
    /// (`entry`, read with its cas), unless another VM holds a live claim (then this one waits
    /// for its token: [`Claim::Elsewhere`]).
    pub fn claim(&mut self, entry: Option<&[u8]>, now: u64) -> Claim {
        let mut shared = SharedEntry::parse(entry);
        if shared.claimed_at(now) && shared.seq != self.claimed_seq {
            self.fetching = Some(Fetching::Elsewhere {
                seq: shared.seq,
                until: shared.claimed_until,
            });
            return Claim::Elsewhere;
        }
        shared.seq += 1;
        shared.claimed_until = now.saturating_add(self.grant.claim_life_s());
        self.claimed_seq = shared.seq;
        Claim::Write(shared.to_bytes())
    }

    /// The claim [`TokenKeeper::claim`] returned was not written: another VM wrote the entry
    /// first (compare-and-swap mismatch). That VM's claim may carry the very seq this one
    /// would have, so it must not be taken for this VM's own when the entry is read again.
    pub fn claim_refused(&mut self) {
        self.claimed_seq = 0;
    }

    /// The host has no shared data: this VM fetches its own token, unclaimed.
    pub fn unshared(&mut self) {
        self.claimed_seq = 0;
    }

    /// A claim could not be written (the entry kept changing under it) at `now`: wait as if
    /// another VM fetched, until the tick reads the entry again.
    pub fn claim_lost(&mut self, now: u64) {
        self.claimed_seq = 0;
        self.fetching = Some(Fetching::Elsewhere {
            seq: 0,
            until: now.saturating_add(self.grant.claim_life_s()),
        });
    }

    /// The token request was sent by `sent_by` (a stream; None: the root).
    pub fn fetch_sent(&mut self, sent_by: Option<u32>) {
        self.fetching = Some(Fetching::Here(sent_by));
    }

    /// The token request claimed in the shared entry could not be sent: the claim is to be
    /// dropped ([`TokenKeeper::publish`]) so that the other VMs do not wait for it.
    pub fn fetch_not_sent(&mut self) {
        if self.claimed_seq > 0 {
            self.unpublished = Some(Outcome::Released);
        }
    }

    /// Calls wait for a token but no request is in flight (its stream ended, or a 401 dropped
    /// the token): the root is to send it.
    pub fn orphaned(&self) -> bool {
        self.fetching.is_none() && !self.waiters.is_empty()
    }

    /// Whether the root is to tick promptly (every [`PROMPT_TICK_MS`]) rather than once a
    /// second: calls wait for a token and no request of this VM's own will answer them. Either
    /// another VM is fetching it, and its token (or its failure) reaches this VM only when the
    /// tick reads the shared entry ([`TokenKeeper::sync_shared`]: Envoy tells a VM nothing when
    /// another writes shared data), or nobody is, and the root sends the request on its tick
    /// ([`TokenKeeper::orphaned`]). Once they are released (or gone), once a second again.
    pub fn wants_prompt_tick(&self) -> bool {
        !self.waiters.is_empty() && !matches!(self.fetching, Some(Fetching::Here(_)))
    }

    /// Stream `ctx` ended. True if it had sent the token request, which Envoy cancels: the
    /// stage forgets that callout, the request is [`TokenKeeper::orphaned`], and its claim in
    /// the shared entry is to be dropped ([`TokenKeeper::publish`]) so that the other VMs need
    /// not wait for it to expire.
    pub fn forget_stream(&mut self, ctx: u32) -> bool {
        if self.fetching == Some(Fetching::Here(Some(ctx))) {
            self.fetching = None;
            if self.claimed_seq > 0 {
                self.unpublished = Some(Outcome::Released);
            }
            return true;
        }
        false
    }

    /// The IdP answered the token request (`status` 0: no answer) at `now`.
    pub fn answered(&mut self, status: u32, body: &[u8], now: u64) -> Fetched<W> {
        let sent_by = match self.fetching.take() {
            Some(Fetching::Here(sent_by)) => sent_by,
            _ => None,
        };
        let waiters = std::mem::take(&mut self.waiters);
        let (token, failure) = match self.grant.read_answer(status, body, now) {
            Ok(token) => (Some(token), None),
            Err(why) => (None, Some(why)),
        };
        if self.claimed_seq > 0 {
            self.unpublished = Some(match &token {
                Some(token) => Outcome::Token(token.clone()),
                None => Outcome::Failed,
            });
        }
        self.token_seq = if token.is_some() { self.claimed_seq } else { 0 };
        self.token = token;
        Fetched {
            waiters,
            sent_by,
            failure,
        }
    }

    /// After this VM's fetch ended (or could not be sent): the shared entry to write (with the
    /// cas it was read with; on a mismatch, read it and publish again), or None when there is
    /// nothing to write. The token is shared and the claim dropped; a failure is written so
    /// that the VMs waiting for this fetch fail closed too; a released claim is only dropped.
    /// A newer claim (this one had expired) is kept; a newer token is not overwritten.
    pub fn publish(&mut self, entry: Option<&[u8]>) -> Option<Vec<u8>> {
        let outcome = self.unpublished.as_ref()?;
        let seq = self.claimed_seq;
        let mut shared = SharedEntry::parse(entry);
        let ours = shared.seq == seq;
        match outcome {
            Outcome::Token(token) if shared.token_seq < seq => {
                shared.token_seq = seq;
                shared.obtained_at = token.obtained_at;
                shared.lifetime = token.lifetime;
                shared.token = token.value.clone();
            }
            _ if !ours => {
                self.unpublished = None;
                return None;
            }
            Outcome::Token(_) | Outcome::Released => {}
            Outcome::Failed => shared.failed_seq = seq,
        }
        if ours {
            shared.claimed_until = 0;
        }
        // A newer entry (another VM's claim after this one expired) keeps its number.
        shared.seq = shared.seq.max(seq);
        Some(shared.to_bytes())
    }

    /// The shared entry was written ([`TokenKeeper::publish`]).
    pub fn published(&mut self) {
        self.unpublished = None;
    }

    /// The upstream refused the token (401) on a call that is not made again: the next call
    /// waits for a new one (never the same token from the shared entry).
    pub fn refused(&mut self) {
        if self.token.take().is_some() && self.token_seq > 0 {
            self.refused_seq = self.token_seq;
        }
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

    // ---- one token shared by the workers' VMs ----

    /// The shared entry, as the host keeps it (compare-and-swap is the host's: harness and
    /// Envoy; here, the writes happen in turn).
    struct Shared(Option<Vec<u8>>);

    impl Shared {
        fn new() -> Self {
            Shared(Some(Vec::new())) // created at configure time
        }
        fn get(&self) -> Option<&[u8]> {
            self.0.as_deref()
        }
        fn claim(&mut self, k: &mut TokenKeeper<&'static str, &'static str>, now: u64) -> bool {
            match k.claim(self.get(), now) {
                Claim::Write(bytes) => {
                    self.0 = Some(bytes);
                    true
                }
                Claim::Elsewhere => false,
            }
        }
        fn publish(&mut self, k: &mut TokenKeeper<&'static str, &'static str>) {
            if let Some(bytes) = k.publish(self.get()) {
                self.0 = Some(bytes);
            }
            k.published();
        }
    }

    #[test]
    fn a_vm_that_lost_the_race_to_claim_does_not_take_the_winners_claim_for_its_own() {
        let mut shared = Shared::new();
        let (mut a, mut b) = (keeper(), keeper());
        assert_eq!(a.need("a1", 1000), TokenNeed::Fetch);
        assert_eq!(b.need("b1", 1000), TokenNeed::Fetch);
        // Both read the entry at once; A's write lands, B's loses the compare-and-swap.
        let seen = shared.0.clone();
        assert!(shared.claim(&mut a, 1000));
        a.fetch_sent(Some(1));
        assert!(matches!(b.claim(seen.as_deref(), 1000), Claim::Write(_)));
        b.claim_refused();
        // B reads the entry again: A's claim (the same seq B tried to write) is not B's.
        assert!(!shared.claim(&mut b, 1000), "A holds the claim");
        assert_eq!(b.need("b2", 1000), TokenNeed::Wait);
    }

    #[test]
    fn one_vm_fetches_and_the_others_use_its_token() {
        let mut shared = Shared::new();
        let (mut a, mut b) = (keeper(), keeper());
        // Both workers need the token at once: A claims the fetch, B waits for it.
        assert_eq!(a.need("a1", 1000), TokenNeed::Fetch);
        assert!(shared.claim(&mut a, 1000));
        a.fetch_sent(Some(1));
        assert!(!b.adopt(shared.get(), 1000));
        assert_eq!(b.need("b1", 1000), TokenNeed::Fetch);
        assert!(!shared.claim(&mut b, 1000), "A holds the claim");
        assert_eq!(b.need("b2", 1000), TokenNeed::Wait);
        assert!(!b.orphaned());
        // B's tick before the token: still waiting.
        assert_eq!(b.sync_shared(shared.get(), 1001), None);
        assert!(!b.orphaned());
        // A's fetch ends; it shares the token and drops its claim.
        let fetched = a.answered(200, TOKEN_A, 1001);
        assert_eq!(fetched.waiters, vec!["a1"]);
        shared.publish(&mut a);
        // B's tick: its waiters go with A's token, sent from the root.
        let released = b.sync_shared(shared.get(), 1001).unwrap();
        assert_eq!(
            released,
            Fetched {
                waiters: vec!["b1", "b2"],
                sent_by: None,
                failure: None
            }
        );
        assert_eq!(b.authorization(1002).as_deref(), Some("Bearer tok-a"));
        assert_eq!(b.need("b3", 1002), TokenNeed::Ready("Bearer tok-a".into()));
        // A VM that starts later takes it before it needs one: no request.
        let mut c = keeper();
        assert!(c.adopt(shared.get(), 1100));
        assert_eq!(c.need("c1", 1100), TokenNeed::Ready("Bearer tok-a".into()));
        // Each VM refetches with its own margin: obtained at 1001 for 600 s.
        let mut late = TokenKeeper::<&str, &str>::new(grant(json!({"refresh_margin_s": 100})));
        assert!(late.adopt(shared.get(), 1100));
        assert!(late.authorization(1500).is_some() && late.authorization(1501).is_none());
        assert!(c.authorization(1570).is_some() && c.authorization(1571).is_none());
        // A token past its use is not taken: the VM claims a new fetch.
        let mut d = keeper();
        assert!(!d.adopt(shared.get(), 1571));
        assert_eq!(d.need("d1", 1571), TokenNeed::Fetch);
        assert!(shared.claim(&mut d, 1571));
    }

    #[test]
    fn a_vm_waiting_for_another_vms_fetch_wants_a_prompt_tick_until_its_calls_are_released() {
        let mut shared = Shared::new();
        let (mut a, mut b) = (keeper(), keeper());
        assert!(
            !a.wants_prompt_tick() && !b.wants_prompt_tick(),
            "nothing waits"
        );
        // A fetches: its own answer releases its waiters, no tick needed.
        assert_eq!(a.need("a1", 1000), TokenNeed::Fetch);
        assert!(shared.claim(&mut a, 1000));
        a.fetch_sent(Some(1));
        assert_eq!(a.need("a2", 1000), TokenNeed::Wait);
        assert!(!a.wants_prompt_tick());
        // B's call waits for A's token, which only B's tick can read.
        assert_eq!(b.need("b1", 1000), TokenNeed::Fetch);
        assert!(!shared.claim(&mut b, 1000));
        assert!(b.wants_prompt_tick());
        assert_eq!(b.sync_shared(shared.get(), 1000), None);
        assert!(b.wants_prompt_tick(), "still waiting");
        a.answered(200, TOKEN_A, 1000);
        shared.publish(&mut a);
        assert!(!a.wants_prompt_tick());
        assert!(b.sync_shared(shared.get(), 1000).is_some());
        assert!(!b.wants_prompt_tick(), "released: once a second again");
        // The failure of A's fetch releases B's waiters (closed) just as well.
        let (mut a, mut b) = (keeper(), keeper());
        let mut shared = Shared::new();
        a.need("a1", 1000);
        assert!(shared.claim(&mut a, 1000));
        a.fetch_sent(None);
        b.need("b1", 1000);
        assert!(!shared.claim(&mut b, 1000));
        assert!(b.wants_prompt_tick());
        a.answered(503, b"", 1000);
        shared.publish(&mut a);
        let released = b.sync_shared(shared.get(), 1000).unwrap();
        assert!(released.failure.is_some());
        assert!(!b.wants_prompt_tick());
        // A waiter that leaves (its stream ended) leaves nothing to tick for.
        let mut c = keeper();
        c.need("c1", 1000);
        c.claim_lost(1000);
        assert!(c.wants_prompt_tick());
        c.leave(&"c1");
        assert!(!c.wants_prompt_tick());
    }

    #[test]
    fn calls_that_wait_for_the_roots_request_want_a_prompt_tick_until_it_is_sent() {
        // The stream that sent the request ended: the root sends it again on its tick.
        let mut k = keeper();
        k.need("a", 1000);
        k.fetch_sent(Some(5));
        k.need("b", 1000);
        assert!(k.forget_stream(5));
        assert!(k.orphaned() && k.wants_prompt_tick());
        k.fetch_sent(None);
        assert!(!k.wants_prompt_tick(), "the root's request is in flight");
        k.answered(200, TOKEN_A, 1000);
        assert!(!k.wants_prompt_tick());
        // The upstream refused the token (401): the call waits for the root's new request.
        assert!(k.retry_with_new_token("lookup a", 401));
        k.wait("a");
        assert!(k.orphaned() && k.wants_prompt_tick());
        // Another VM's claim expired: this VM's root claims on its tick.
        let mut shared = Shared::new();
        let (mut a, mut b) = (keeper(), keeper());
        a.need("a1", 1000);
        assert!(shared.claim(&mut a, 1000));
        a.fetch_sent(Some(1));
        b.need("b1", 1000);
        assert!(!shared.claim(&mut b, 1000));
        assert_eq!(b.sync_shared(shared.get(), 1000 + 2 + CLAIM_MARGIN_S), None);
        assert!(b.orphaned() && b.wants_prompt_tick());
    }

    #[test]
    fn a_failed_fetch_fails_the_waiters_of_every_vm_and_the_next_call_claims_again() {
        let mut shared = Shared::new();
        let (mut a, mut b) = (keeper(), keeper());
        a.need("a1", 1000);
        assert!(shared.claim(&mut a, 1000));
        a.fetch_sent(None);
        b.need("b1", 1000);
        assert!(!shared.claim(&mut b, 1000));
        let fetched = a.answered(503, b"", 1001);
        assert!(fetched.failure.is_some());
        shared.publish(&mut a);
        let released = b.sync_shared(shared.get(), 1001).unwrap();
        assert_eq!(released.waiters, vec!["b1"]);
        assert!(
            released.failure.is_some(),
            "fail closed, as after its own fetch"
        );
        assert_eq!(b.authorization(1001), None);
        // Nobody waits or fetches: the next call on either VM claims a new fetch.
        assert!(!b.orphaned());
        assert_eq!(b.need("b2", 1002), TokenNeed::Fetch);
        assert!(shared.claim(&mut b, 1002));
        // A request that could not be sent drops its claim at once.
        b.fetch_not_sent();
        shared.publish(&mut b);
        a.need("a2", 1002);
        assert!(shared.claim(&mut a, 1002), "B's claim was dropped");
    }

    #[test]
    fn a_claim_whose_fetcher_is_gone_expires_and_another_vm_fetches() {
        let mut shared = Shared::new();
        let (mut a, mut b) = (keeper(), keeper());
        a.need("a1", 1000);
        assert!(shared.claim(&mut a, 1000));
        a.fetch_sent(Some(1));
        b.need("b1", 1000);
        assert!(!shared.claim(&mut b, 1000));
        // The claim holds for the request's timeout (2 s) and CLAIM_MARGIN_S.
        let until = 1000 + 2 + CLAIM_MARGIN_S;
        assert_eq!(b.sync_shared(shared.get(), until - 1), None);
        assert!(!b.orphaned(), "waits while the claim holds");
        assert_eq!(b.authorization(until - 1), None, "fail closed meanwhile");
        assert_eq!(b.sync_shared(shared.get(), until), None);
        assert!(b.orphaned(), "the claim expired: B's root fetches");
        assert!(shared.claim(&mut b, until));
        b.fetch_sent(None);
        // A's late answer still shares its token, keeping B's claim.
        a.answered(200, TOKEN_A, until);
        shared.publish(&mut a);
        let mut c = keeper();
        c.need("c1", until);
        assert!(!shared.claim(&mut c, until), "B's claim holds");
        assert!(c.adopt(shared.get(), until));
        // B's answer replaces it and drops the claim.
        b.answered(200, TOKEN_B, until + 1);
        shared.publish(&mut b);
        let mut d = keeper();
        assert!(d.adopt(shared.get(), until + 1));
        assert_eq!(d.authorization(until + 1).as_deref(), Some("Bearer tok-b"));
        assert_eq!(d.need("d1", 1600), TokenNeed::Fetch);
        assert!(shared.claim(&mut d, 1600), "no claim left behind");
        // A VM whose request was cancelled with its stream claims again over its own claim.
        d.fetch_sent(Some(9));
        assert!(d.forget_stream(9));
        assert!(d.orphaned());
        assert!(shared.claim(&mut d, 1600));
    }

    #[test]
    fn a_request_cancelled_with_its_stream_drops_the_claim_without_failing_the_others() {
        let mut shared = Shared::new();
        let (mut a, mut b) = (keeper(), keeper());
        a.need("a1", 1000);
        assert!(shared.claim(&mut a, 1000));
        a.fetch_sent(Some(5));
        b.need("b1", 1000);
        assert!(!shared.claim(&mut b, 1000));
        // A's stream ends: Envoy cancels its request; A drops its claim at once.
        a.leave(&"a1");
        assert!(a.forget_stream(5));
        shared.publish(&mut a);
        // B's next tick (long before the claim would have expired): not a failure; B claims.
        assert_eq!(b.sync_shared(shared.get(), 1001), None);
        assert!(b.orphaned(), "B fetches");
        assert!(shared.claim(&mut b, 1001));
        b.fetch_sent(None);
        assert!(b.answered(200, TOKEN_A, 1001).failure.is_none());
        shared.publish(&mut b);
        assert!(a.adopt(shared.get(), 1002));
    }

    #[test]
    fn a_token_the_upstream_refused_is_not_taken_again_from_the_shared_entry() {
        let mut shared = Shared::new();
        let (mut a, mut b) = (keeper(), keeper());
        a.need("a1", 1000);
        assert!(shared.claim(&mut a, 1000));
        a.fetch_sent(None);
        a.answered(200, TOKEN_A, 1000);
        shared.publish(&mut a);
        assert!(b.adopt(shared.get(), 1001));
        // The registry refuses it to B: B fetches a new one, not tok-a again.
        assert!(b.retry_with_new_token("lookup", 401));
        b.wait("lookup");
        assert_eq!(b.sync_shared(shared.get(), 1001), None);
        assert!(!b.adopt(shared.get(), 1001));
        assert!(b.orphaned());
        assert!(shared.claim(&mut b, 1001));
        b.fetch_sent(None);
        b.answered(200, TOKEN_B, 1002);
        shared.publish(&mut b);
        // A takes the newer token once its own is refused too.
        assert!(a.retry_with_new_token("other", 401));
        assert!(a.adopt(shared.get(), 1003));
        assert_eq!(a.authorization(1003).as_deref(), Some("Bearer tok-b"));
    }

    #[test]
    fn a_lost_claim_waits_for_the_tick_and_a_bad_entry_is_an_empty_one() {
        let mut k = keeper();
        k.need("a", 1000);
        k.claim_lost(1000);
        assert_eq!(k.need("b", 1000), TokenNeed::Wait);
        // The tick reads an entry without a live claim: the root claims.
        assert_eq!(k.sync_shared(Some(b""), 1000), None);
        assert!(k.orphaned());
        for junk in [
            &b"v1 1 2"[..],
            b"v2 1 0 0 0 0 0\ntok",
            b"v1 1 0 0 5 0 60\ntok",
            b"v1 1 0 0 1 0 60\nt o k",
            b"\xff\xfe",
        ] {
            let mut k = keeper();
            assert!(!k.adopt(Some(junk), 1), "{junk:?}");
            k.need("a", 1);
            assert!(
                matches!(k.claim(Some(junk), 1), Claim::Write(_)),
                "{junk:?}"
            );
        }
    }

    #[test]
    fn the_shared_key_covers_what_the_token_depends_on_and_never_the_secret() {
        let key = |extra: Value| grant(extra).shared_key();
        let base = key(json!({}));
        assert!(base.starts_with(SHARED_KEY_PREFIX), "{base}");
        assert!(!base.contains("s3cret"), "{base}");
        for extra in [
            json!({"token_endpoint": {"cluster": "idp2", "authority": "idp.example",
                                      "path": "/token"}}),
            json!({"token_endpoint": {"cluster": "idp", "authority": "other.example",
                                      "path": "/token"}}),
            json!({"token_endpoint": {"cluster": "idp", "path": "/token"}}),
            json!({"token_endpoint": {"cluster": "idp", "authority": "idp.example",
                                      "path": "/token2"}}),
            json!({"client_id": "another"}),
            json!({"scope": "ownership"}),
            json!({"scope": "ownership read"}),
        ] {
            assert_ne!(key(extra.clone()), base, "{extra}");
        }
        // Not part of the token: the secret's copy, the margin, the request's timeout.
        for extra in [
            json!({"client_secret": "other"}),
            json!({"refresh_margin_s": 5}),
            json!({"token_endpoint": {"cluster": "idp", "authority": "idp.example",
                                      "path": "/token", "timeout_ms": 500}}),
        ] {
            assert_eq!(key(extra.clone()), base, "{extra}");
        }
        // Fields cannot run into each other.
        assert_ne!(
            key(json!({"client_id": "a b", "scope": "c"})),
            key(json!({"client_id": "a", "scope": "b c"}))
        );
        assert!(!format!("{:?}", keeper()).contains("s3cret"));
    }
}
