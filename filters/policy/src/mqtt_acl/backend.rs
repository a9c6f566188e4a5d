//! An HTTP auth/ACL backend as a policy source for mqtt-acl, speaking the protocol of
//! mosquitto-go-auth's HTTP backend (`backends/http.go`), which is also mosquitto-auth-plug's:
//!
//! * `user` (`http_getuser_uri`): `username`, `password`, `clientid` — may this client connect;
//! * `superuser` (`http_superuser_uri`): `username` — a superuser passes every `acl` check;
//! * `acl` (`http_aclcheck_uri`): `username`, `clientid`, `topic`, `acc` — `acc` is Mosquitto's
//!   access value: 1 read (a message delivered to the client), 2 write (PUBLISH), 4 subscribe
//!   (SUBSCRIBE; mosquitto-auth-plug and brokers before Mosquitto 1.5 send 1 there).
//!
//! Bodies are JSON (`params_mode: json`, go-auth's default; `acc` a JSON integer) or an HTML
//! form (`form`), always POSTed. The answer allows when its status is 2xx (go-auth's
//! `status` response mode); with `response_mode: text` the body must also be `ok`, with `json`
//! `{"ok": true}`. Anything else — another status, a reset, a timeout — denies.
//!
//! Pure logic: [`HttpBackend`] builds the requests ([`BackendRequest`]), reads the answers and
//! holds the bounded cache of answers (definitive answers only: 2xx or 4xx; a 5xx or no answer
//! is never cached). The network filter sends the requests through an Envoy cluster.

use std::cell::RefCell;

use serde::Deserialize;

use crate::cache::VerdictCache;
use crate::upstream::{Authority, ClusterName, HttpCall, Target, TimeoutMs, UpstreamPath};

/// Mosquitto's access values (`MOSQ_ACL_READ`, `MOSQ_ACL_WRITE`, `MOSQ_ACL_SUBSCRIBE`).
pub const ACC_READ: u8 = 1;
pub const ACC_WRITE: u8 = 2;
pub const ACC_SUBSCRIBE: u8 = 4;

/// `http_backend` in the plugin configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpBackendConfig {
    /// The Envoy cluster of the backend (the web app).
    pub cluster: ClusterName,
    /// The `:authority` of the requests.
    pub authority: Authority,
    /// Milliseconds to wait for an answer (default 5000, go-auth's `http_timeout`); no answer
    /// in time denies.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: TimeoutMs,
    #[serde(default)]
    pub params_mode: ParamsMode,
    #[serde(default)]
    pub response_mode: ResponseMode,
    /// `{"path": "/auth"}`: asked at every CONNECT.
    #[serde(default)]
    pub user: Option<EndpointConfig>,
    /// `{"path": "/superuser"}`: asked at CONNECT; a superuser's topics are not asked.
    #[serde(default)]
    pub superuser: Option<EndpointConfig>,
    /// `{"path": "/acl"}`: asked for PUBLISH, SUBSCRIBE and the will.
    #[serde(default)]
    pub acl: Option<EndpointConfig>,
    /// The `acc` of a SUBSCRIBE check: 4 (Mosquitto 1.5+, go-auth; default) or 1
    /// (mosquitto-auth-plug).
    #[serde(default = "default_subscribe_acc")]
    pub subscribe_acc: u8,
    #[serde(default)]
    pub cache: BackendCacheConfig,
    /// Calls to the backend in flight per VM (default 64); a connection whose question would
    /// need one more is refused as "server busy" (CONNECT) or denied (a topic).
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
}

/// One endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    pub path: UpstreamPath,
}

/// How the parameters are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamsMode {
    /// `application/json`.
    #[default]
    Json,
    /// `application/x-www-form-urlencoded`.
    Form,
}

/// How an answer allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResponseMode {
    /// A 2xx status.
    #[default]
    Status,
    /// A 2xx status and the body `ok`.
    Text,
    /// A 2xx status and a JSON body whose `ok` is true.
    Json,
}

/// The answer cache.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendCacheConfig {
    /// Entries kept (default 10000; 0 turns the cache off).
    #[serde(default = "default_max_entries")]
    pub max_entries: usize,
    /// Seconds an allow is reused (default 60).
    #[serde(default = "default_allow_ttl")]
    pub allow_ttl_secs: u64,
    /// Seconds a denial is reused (default 10).
    #[serde(default = "default_deny_ttl")]
    pub deny_ttl_secs: u64,
}

impl Default for BackendCacheConfig {
    fn default() -> Self {
        BackendCacheConfig {
            max_entries: default_max_entries(),
            allow_ttl_secs: default_allow_ttl(),
            deny_ttl_secs: default_deny_ttl(),
        }
    }
}

fn default_timeout_ms() -> TimeoutMs {
    TimeoutMs::default_of(5000)
}
fn default_subscribe_acc() -> u8 {
    ACC_SUBSCRIBE
}
fn default_max_entries() -> usize {
    10_000
}
fn default_max_in_flight() -> usize {
    64
}
fn default_allow_ttl() -> u64 {
    60
}
fn default_deny_ttl() -> u64 {
    10
}

/// Which endpoint a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    User,
    Superuser,
    Acl,
}

impl Check {
    pub fn name(self) -> &'static str {
        match self {
            Check::User => "user",
            Check::Superuser => "superuser",
            Check::Acl => "acl",
        }
    }
}

/// One request to the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendRequest {
    pub check: Check,
    pub path: String,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    /// What the answer is cached under (the path and the body; the cache keeps only its
    /// SHA-256 digest, so no password is kept in memory).
    key: String,
}

impl BackendRequest {
    /// The key of this request's answer (unique per path and parameters).
    pub fn key(&self) -> &str {
        &self.key
    }
}

/// What an answer means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendVerdict {
    Allow,
    /// A definitive no (a 2xx that does not allow in the response mode, or a 3xx/4xx).
    Deny,
    /// No usable answer (reset, timeout, 5xx): denies too, and is never cached.
    Unavailable,
}

/// What the backend answered: a status (None: reset, timeout, unreadable) and the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendAnswer {
    pub status: Option<u32>,
    pub body: Vec<u8>,
}

impl BackendAnswer {
    pub fn none() -> BackendAnswer {
        BackendAnswer {
            status: None,
            body: Vec::new(),
        }
    }
}

/// The validated backend and its answer cache (one per VM: every connection of a worker).
#[derive(Debug)]
pub struct HttpBackend {
    cluster: ClusterName,
    authority: Authority,
    timeout_ms: TimeoutMs,
    params_mode: ParamsMode,
    response_mode: ResponseMode,
    user: Option<String>,
    superuser: Option<String>,
    acl: Option<String>,
    subscribe_acc: u8,
    allow_ttl_secs: u64,
    deny_ttl_secs: u64,
    max_in_flight: usize,
    cache: RefCell<VerdictCache<bool>>,
}

impl Clone for HttpBackend {
    /// The configuration, with an empty cache of the same size.
    fn clone(&self) -> Self {
        HttpBackend {
            cluster: self.cluster.clone(),
            authority: self.authority.clone(),
            timeout_ms: self.timeout_ms,
            params_mode: self.params_mode,
            response_mode: self.response_mode,
            user: self.user.clone(),
            superuser: self.superuser.clone(),
            acl: self.acl.clone(),
            subscribe_acc: self.subscribe_acc,
            allow_ttl_secs: self.allow_ttl_secs,
            deny_ttl_secs: self.deny_ttl_secs,
            max_in_flight: self.max_in_flight,
            cache: RefCell::new(VerdictCache::new(self.cache.borrow().capacity())),
        }
    }
}

impl HttpBackend {
    /// Validates `http_backend`; errors name the JSON path.
    pub fn new(config: &HttpBackendConfig) -> Result<HttpBackend, String> {
        // The endpoint (cluster, authority, timeout, paths) was checked as it was read.
        let at = "http_backend";
        let path = |e: &Option<EndpointConfig>| e.as_ref().map(|e| e.path.as_str().to_string());
        let (user, superuser, acl) = (
            path(&config.user),
            path(&config.superuser),
            path(&config.acl),
        );
        if user.is_none() && acl.is_none() {
            return Err(format!(
                "{at}: give user and/or acl ({{\"path\": ...}}): without them the backend is \
                 never asked"
            ));
        }
        if superuser.is_some() && acl.is_none() {
            return Err(format!(
                "{at}.superuser: a superuser only skips acl checks; configure acl too"
            ));
        }
        if ![ACC_READ, ACC_SUBSCRIBE].contains(&config.subscribe_acc) {
            return Err(format!(
                "{at}.subscribe_acc {} must be 4 (Mosquitto 1.5+, mosquitto-go-auth) or 1 \
                 (mosquitto-auth-plug)",
                config.subscribe_acc
            ));
        }
        let most = crate::introspection::MAX_MAX_IN_FLIGHT;
        if !(1..=most).contains(&config.max_in_flight) {
            return Err(format!(
                "{at}.max_in_flight {} must be between 1 and {most}",
                config.max_in_flight
            ));
        }
        let cache = &config.cache;
        if cache.max_entries > 1_000_000 {
            return Err(format!(
                "{at}.cache.max_entries {} must be at most 1000000",
                cache.max_entries
            ));
        }
        for (name, ttl) in [
            ("allow_ttl_secs", cache.allow_ttl_secs),
            ("deny_ttl_secs", cache.deny_ttl_secs),
        ] {
            if ttl > 86_400 {
                return Err(format!(
                    "{at}.cache.{name} {ttl} must be at most 86400 (a day)"
                ));
            }
        }
        Ok(HttpBackend {
            cluster: config.cluster.clone(),
            authority: config.authority.clone(),
            timeout_ms: config.timeout_ms,
            params_mode: config.params_mode,
            response_mode: config.response_mode,
            user,
            superuser,
            acl,
            subscribe_acc: config.subscribe_acc,
            allow_ttl_secs: cache.allow_ttl_secs,
            deny_ttl_secs: cache.deny_ttl_secs,
            max_in_flight: config.max_in_flight,
            cache: RefCell::new(VerdictCache::new(cache.max_entries)),
        })
    }

    /// Calls in flight per VM (`max_in_flight`).
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    pub fn subscribe_acc(&self) -> u8 {
        self.subscribe_acc
    }

    pub fn checks_users(&self) -> bool {
        self.user.is_some()
    }

    pub fn checks_superusers(&self) -> bool {
        self.superuser.is_some()
    }

    pub fn checks_topics(&self) -> bool {
        self.acl.is_some()
    }

    /// The `user` request, if that endpoint is configured.
    pub fn user_request(
        &self,
        username: &str,
        password: &str,
        clientid: &str,
    ) -> Option<BackendRequest> {
        let path = self.user.as_ref()?;
        Some(self.request(
            Check::User,
            path,
            &[
                ("username", Param::Text(username)),
                ("password", Param::Text(password)),
                ("clientid", Param::Text(clientid)),
            ],
        ))
    }

    /// The `superuser` request, if that endpoint is configured.
    pub fn superuser_request(&self, username: &str) -> Option<BackendRequest> {
        let path = self.superuser.as_ref()?;
        Some(self.request(
            Check::Superuser,
            path,
            &[("username", Param::Text(username))],
        ))
    }

    /// The `acl` request, if that endpoint is configured.
    pub fn acl_request(
        &self,
        username: &str,
        clientid: &str,
        topic: &str,
        acc: u8,
    ) -> Option<BackendRequest> {
        let path = self.acl.as_ref()?;
        Some(self.request(
            Check::Acl,
            path,
            &[
                ("username", Param::Text(username)),
                ("clientid", Param::Text(clientid)),
                ("topic", Param::Text(topic)),
                ("acc", Param::Number(acc)),
            ],
        ))
    }

    fn request(&self, check: Check, path: &str, params: &[(&str, Param<'_>)]) -> BackendRequest {
        let (content_type, body) = match self.params_mode {
            ParamsMode::Json => {
                let map: serde_json::Map<String, serde_json::Value> = params
                    .iter()
                    .map(|(name, value)| {
                        let value = match value {
                            Param::Text(text) => serde_json::Value::from(*text),
                            Param::Number(n) => serde_json::Value::from(*n),
                        };
                        ((*name).to_string(), value)
                    })
                    .collect();
                (
                    "application/json",
                    serde_json::Value::Object(map).to_string(),
                )
            }
            ParamsMode::Form => {
                let mut form = url::form_urlencoded::Serializer::new(String::new());
                for (name, value) in params {
                    match value {
                        Param::Text(text) => form.append_pair(name, text),
                        Param::Number(n) => form.append_pair(name, &n.to_string()),
                    };
                }
                ("application/x-www-form-urlencoded", form.finish())
            }
        };
        BackendRequest {
            check,
            path: path.to_string(),
            content_type,
            key: format!("{path}\n{body}"),
            body: body.into_bytes(),
        }
    }

    /// The call that sends `request` (POST to the endpoint's path).
    pub fn call(&self, request: &BackendRequest) -> HttpCall {
        let target = Target {
            cluster: &self.cluster,
            authority: Some(&self.authority),
            timeout: self.timeout_ms,
        };
        target
            .call("POST", request.path.clone())
            .with_header("content-type", request.content_type)
            .with_header("user-agent", "mqtt-acl")
            .with_body(request.body.clone())
    }

    /// Whether `answer` allows (see the module documentation).
    pub fn allows(&self, answer: &BackendAnswer) -> bool {
        let Some(status) = answer.status else {
            return false;
        };
        if !(200..300).contains(&status) {
            return false;
        }
        match self.response_mode {
            ResponseMode::Status => true,
            ResponseMode::Text => answer.body == b"ok",
            ResponseMode::Json => serde_json::from_slice::<serde_json::Value>(&answer.body)
                .ok()
                .and_then(|v| v.get("ok").and_then(serde_json::Value::as_bool))
                .unwrap_or(false),
        }
    }

    /// A cached answer to `request`, if one is still fresh.
    pub fn cached(&self, request: &BackendRequest, now: u64) -> Option<BackendVerdict> {
        let allowed = self.cache.borrow_mut().get(&request.key, now)?;
        Some(if allowed {
            BackendVerdict::Allow
        } else {
            BackendVerdict::Deny
        })
    }

    /// What `answer` means; a definitive one (2xx or 4xx) is remembered for its TTL. A 5xx or
    /// no answer denies this time and is not remembered: the next check asks again.
    pub fn remember(
        &self,
        request: &BackendRequest,
        answer: &BackendAnswer,
        now: u64,
    ) -> BackendVerdict {
        let allowed = self.allows(answer);
        let definitive = answer.status.is_some_and(|s| (100..500).contains(&s));
        if !allowed && !definitive {
            return BackendVerdict::Unavailable;
        }
        let ttl = if allowed {
            self.allow_ttl_secs
        } else {
            self.deny_ttl_secs
        };
        if ttl > 0 {
            self.cache.borrow_mut().insert_until(
                &request.key,
                allowed,
                now,
                now.saturating_add(ttl),
            );
        }
        if allowed {
            BackendVerdict::Allow
        } else {
            BackendVerdict::Deny
        }
    }

    /// The cache's counters.
    pub fn cache_stats(&self) -> crate::cache::CacheStats {
        self.cache.borrow().stats()
    }

    /// Entries in the cache.
    pub fn cache_len(&self) -> usize {
        self.cache.borrow().len()
    }
}

enum Param<'a> {
    Text(&'a str),
    Number(u8),
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn backend(config: serde_json::Value) -> Result<HttpBackend, String> {
        #[derive(Deserialize)]
        struct Plugin {
            http_backend: HttpBackendConfig,
        }
        let json = json!({ "http_backend": config }).to_string();
        let plugin: Plugin =
            crate::config_error::parse(json.as_bytes()).map_err(|e| e.to_string())?;
        HttpBackend::new(&plugin.http_backend)
    }

    fn base() -> serde_json::Value {
        json!({"cluster": "webapp", "authority": "webapp.internal",
               "user": {"path": "/auth"}, "superuser": {"path": "/superuser"},
               "acl": {"path": "/acl"}})
    }

    #[test]
    fn json_bodies_are_go_auth_s() {
        let b = backend(base()).unwrap();
        let user = b.user_request("alice", "pw", "c1").unwrap();
        assert_eq!(user.content_type, "application/json");
        let body: serde_json::Value = serde_json::from_slice(&user.body).unwrap();
        assert_eq!(
            body,
            json!({"username": "alice", "password": "pw", "clientid": "c1"})
        );
        let acl = b.acl_request("alice", "c1", "a/b", ACC_WRITE).unwrap();
        let body: serde_json::Value = serde_json::from_slice(&acl.body).unwrap();
        // acc is a JSON integer, as go-auth's dataMap marshals its int32.
        assert_eq!(
            body,
            json!({"username": "alice", "clientid": "c1", "topic": "a/b", "acc": 2})
        );
        let su = b.superuser_request("alice").unwrap();
        assert_eq!(su.path, "/superuser");
        assert_eq!(su.body, br#"{"username":"alice"}"#);
        assert_eq!(
            b.call(&acl).envoy_headers(),
            vec![
                (":method", "POST"),
                (":path", "/acl"),
                (":authority", "webapp.internal"),
                ("content-type", "application/json"),
                ("user-agent", "mqtt-acl"),
            ]
        );
    }

    #[test]
    fn form_bodies_are_url_encoded() {
        let mut config = base();
        config["params_mode"] = json!("form");
        let b = backend(config).unwrap();
        let acl = b.acl_request("a b", "c&1", "x/+/#", ACC_SUBSCRIBE).unwrap();
        assert_eq!(acl.content_type, "application/x-www-form-urlencoded");
        assert_eq!(
            String::from_utf8(acl.body).unwrap(),
            "username=a+b&clientid=c%261&topic=x%2F%2B%2F%23&acc=4"
        );
    }

    #[test]
    fn only_2xx_allows_and_the_response_mode_reads_the_body() {
        let b = backend(base()).unwrap();
        let answer = |status: Option<u32>, body: &[u8]| BackendAnswer {
            status,
            body: body.to_vec(),
        };
        assert!(b.allows(&answer(Some(200), b"")));
        assert!(b.allows(&answer(Some(204), b"")));
        for status in [
            None,
            Some(0),
            Some(302),
            Some(401),
            Some(403),
            Some(500),
            Some(503),
        ] {
            assert!(!b.allows(&answer(status, b"ok")), "{status:?}");
        }
        let mut config = base();
        config["response_mode"] = json!("text");
        let text = backend(config).unwrap();
        assert!(text.allows(&answer(Some(200), b"ok")));
        assert!(!text.allows(&answer(Some(200), b"denied")));
        let mut config = base();
        config["response_mode"] = json!("json");
        let j = backend(config).unwrap();
        assert!(j.allows(&answer(Some(200), br#"{"ok": true, "error": ""}"#)));
        assert!(!j.allows(&answer(Some(200), br#"{"ok": false, "error": "no"}"#)));
        assert!(!j.allows(&answer(Some(200), b"not json")));
    }

    #[test]
    fn the_cache_keeps_allows_and_denials_for_their_own_ttls_and_never_failures() {
        let mut config = base();
        config["cache"] = json!({"max_entries": 10, "allow_ttl_secs": 60, "deny_ttl_secs": 5});
        let b = backend(config).unwrap();
        let now = 1_000;
        let allowed = b.acl_request("u", "c", "a", ACC_WRITE).unwrap();
        let denied = b.acl_request("u", "c", "b", ACC_WRITE).unwrap();
        let failed = b.acl_request("u", "c", "c", ACC_WRITE).unwrap();
        let ok = BackendAnswer {
            status: Some(200),
            body: Vec::new(),
        };
        let no = BackendAnswer {
            status: Some(403),
            body: Vec::new(),
        };
        let down = BackendAnswer {
            status: Some(503),
            body: Vec::new(),
        };
        assert_eq!(b.remember(&allowed, &ok, now), BackendVerdict::Allow);
        assert_eq!(b.remember(&denied, &no, now), BackendVerdict::Deny);
        assert_eq!(b.remember(&failed, &down, now), BackendVerdict::Unavailable);
        assert_eq!(
            b.remember(&failed, &BackendAnswer::none(), now),
            BackendVerdict::Unavailable
        );
        assert_eq!(b.cached(&allowed, now + 59), Some(BackendVerdict::Allow));
        assert_eq!(b.cached(&denied, now + 4), Some(BackendVerdict::Deny));
        assert_eq!(b.cached(&failed, now), None);
        assert_eq!(b.cached(&denied, now + 5), None);
        assert_eq!(b.cached(&allowed, now + 60), None);
        // Another acc, client or user is another question.
        let read = b.acl_request("u", "c", "a", ACC_READ).unwrap();
        assert_eq!(b.cached(&read, now), None);
    }

    #[test]
    fn the_cache_is_bounded_and_keeps_no_password() {
        let mut config = base();
        config["cache"] = json!({"max_entries": 2});
        let b = backend(config).unwrap();
        let ok = BackendAnswer {
            status: Some(200),
            body: Vec::new(),
        };
        for i in 0..5 {
            let r = b
                .user_request(&format!("u{i}"), "secret-password", "c")
                .unwrap();
            b.remember(&r, &ok, 1);
        }
        assert_eq!(b.cache_len(), 2);
        assert!(!format!("{b:?}").contains("secret-password"));
    }

    #[test]
    fn bad_configurations_are_refused_with_their_path() {
        let cases = [
            (json!({"cluster": ""}), "http_backend.cluster"),
            (json!({"authority": "a b"}), "http_backend.authority"),
            (json!({"timeout_ms": 0}), "http_backend.timeout_ms"),
            (json!({"acl": {"path": "acl"}}), "http_backend.acl.path"),
            (json!({"subscribe_acc": 2}), "http_backend.subscribe_acc"),
            (json!({"max_in_flight": 0}), "http_backend.max_in_flight"),
            (
                json!({"max_in_flight": 10_001}),
                "http_backend.max_in_flight",
            ),
            (
                json!({"cache": {"allow_ttl_secs": 100000}}),
                "http_backend.cache.allow_ttl_secs",
            ),
            (
                json!({"user": null, "acl": null, "superuser": null}),
                "http_backend: give user",
            ),
            (json!({"acl": null}), "http_backend.superuser"),
        ];
        for (patch, expected) in cases {
            let mut config = base();
            for (k, v) in patch.as_object().unwrap() {
                if v.is_null() {
                    config.as_object_mut().unwrap().remove(k);
                } else {
                    config[k] = v.clone();
                }
            }
            let err = backend(config).unwrap_err();
            assert!(err.contains(expected), "{err} (expected {expected})");
        }
    }
}
