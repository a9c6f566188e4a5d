//! The token-auth stage: the first of the chain. It authenticates every request and hands the
//! caller's identity to later stages in memory and to later filters and the broker as request
//! headers, after removing any copy the client sent.
//!
//! The decisions are `policy::token_auth`'s; this stage reads the request, executes outcomes,
//! and runs the callouts the engine asks for.
//!
//! Callouts. A JWKS fetch (per issuer), an introspection (per token digest) or a device
//! registry lookup (per device id) is one lookup ([`policy::lookups::Lookups`]): concurrent
//! requests with the same token or device id share one callout,
//! the driver resumes every waiter on the answer, and a lookup whose owning stream went away is
//! re-issued from the root on the next tick. While a stream waits, the driver holds its body
//! and trailers, so nothing reaches the broker before the decision.
//!
//! Keys. Remote JWKS (optionally via OIDC discovery) are fetched at configure time, refreshed
//! on a timer, and re-fetched once on an unknown `kid` (at most every 30 s per issuer), by
//! `proxy_glue::remote_keys` (shared with mqtt-acl). Fetched key sets go into Envoy shared data
//! so every worker uses the same keys; a failed fetch keeps the last good set.

use std::collections::HashMap;

use policy::cache::{token_digest, TokenDigest};
use policy::client_credentials::{Fetched, TokenKeeper, TokenNeed};
use policy::decision_line::{DecisionLine, Reason};
use policy::device_registry::LookupResult;
use policy::enforcement::Mode;
use policy::introspection::SHED_RETRY_AFTER_SECS;
use policy::mtls::PeerCertificate;
use policy::token_auth::{
    is_client_envoy_header, IntrospectionOutcome, Outcome, RequestFacts, TokenAuth, TokenAuthConfig,
};
use policy::upstream::HttpCall;
use policy::{Decision, DenyReason};
use proxy_glue::remote_keys::{KeyMetrics, Progress, RemoteKeys};
use proxy_glue::{now_secs, string_property, Counter};

use crate::registry_token::{
    self, adopt_shared, init_shared, send_token_request, sync_shared, token_answered, TokenCounters,
};
use crate::{ByStream, Caller, Request, Stage, Step};
use policy::lookups::Lookups;

pub const NAME: &str = "token-auth";
const SHARED_KEYS_PREFIX: &str = "token_auth.jwks.";

struct Metrics {
    allowed: Counter,
    public: Counter,
    denied_bad_request: Counter,
    denied_unauthenticated: Counter,
    denied_forbidden: Counter,
    denied_unavailable: Counter,
    cache_hits: Counter,
    cache_misses: Counter,
    callouts: Counter,
    callout_failures: Counter,
    jwks_fetched: Counter,
    jwks_failed: Counter,
    jwks_stale: Counter,
    introspection_malformed: Counter,
    introspection_shed: Counter,
    registry_malformed: Counter,
    registry_shed: Counter,
    registry_token: TokenCounters,
}

impl Metrics {
    fn define() -> Self {
        let c = |name: &str| Counter::define(&format!("token_auth.{name}"));
        let (callouts, callout_failures) = (c("callout.sent"), c("callout.failed"));
        Metrics {
            allowed: c("allowed"),
            public: c("public"),
            denied_bad_request: c("denied.bad_request"),
            denied_unauthenticated: c("denied.unauthenticated"),
            denied_forbidden: c("denied.forbidden"),
            denied_unavailable: c("denied.unavailable"),
            cache_hits: c("cache.hit"),
            cache_misses: c("cache.miss"),
            callouts,
            callout_failures,
            jwks_fetched: c("jwks.fetched"),
            jwks_failed: c("jwks.failed"),
            jwks_stale: c("jwks.stale"),
            introspection_malformed: c("introspection.malformed"),
            introspection_shed: c("introspection.shed"),
            registry_malformed: c("device_registry.malformed"),
            registry_shed: c("device_registry.shed"),
            registry_token: TokenCounters {
                fetched: c("device_registry.token.fetched"),
                failed: c("device_registry.token.failed"),
                shared: c("device_registry.token.shared"),
                callouts,
                callout_failures,
            },
        }
    }

    fn denied(&self, reason: &DenyReason) -> &Counter {
        match reason {
            DenyReason::BadRequest(_) | DenyReason::PayloadTooLarge(_) => &self.denied_bad_request,
            DenyReason::Unauthenticated(_) => &self.denied_unauthenticated,
            DenyReason::Forbidden(_) => &self.denied_forbidden,
            DenyReason::Unavailable(_) => &self.denied_unavailable,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum LookupKey {
    Keys(String),
    Introspection(TokenDigest),
    /// A device registry lookup, by device id.
    Device(String),
    /// The device registry's access token (client credentials; only in `callouts`).
    RegistryToken,
}

/// How a settled stream is decided when the driver resumes it.
enum Settled {
    /// The keys it waited for were fetched (or the fetch failed): decide with the keys at hand.
    KeysFetched,
    /// Its token was introspected.
    Introspected(IntrospectionOutcome),
    /// Its device was looked up in the registry.
    DeviceLookedUp(LookupResult),
}

pub struct TokenAuthStage {
    auth: TokenAuth,
    metrics: Metrics,
    /// Lookups, with the token being introspected (kept only while the lookup lives).
    lookups: Lookups<LookupKey, String>,
    /// Introspection and device registry callouts in flight (key fetches are `keys`').
    callouts: HashMap<u32, LookupKey>,
    keys: RemoteKeys,
    settled: ByStream<Settled>,
    last_cache: policy::cache::CacheStats,
    last_counters: policy::token_auth::AuthCounters,
    /// The device registry's access token (`device_keys.registry.auth`): its device lookups
    /// (by device id) wait for it and are made again after a 401 as it says.
    registry_token: Option<TokenKeeper<String, String>>,
}

impl TokenAuthStage {
    /// The stage of the separate token-auth filter, from its plugin configuration.
    pub fn from_plugin_config() -> Option<Self> {
        proxy_glue::load_config::<TokenAuthConfig, _>(NAME, Self::new)
    }

    /// Builds the stage from a parsed configuration, with the environment variables it names
    /// read from the VM's environment (once, here, at configure time).
    pub fn new(mut config: TokenAuthConfig) -> Result<Self, String> {
        config.read_environment(&proxy_glue::env_var);
        TokenAuth::new(config).map(Self::with)
    }

    /// Builds the stage and starts the first key fetches (from the root, in `on_configure`).
    fn with(auth: TokenAuth) -> Self {
        for warning in auth.warnings() {
            log::warn!("{NAME}: {warning}");
        }
        let metrics = Metrics::define();
        let registry_token = auth
            .device_registry()
            .and_then(|r| r.config().auth.as_ref())
            .map(|a| TokenKeeper::new(a.client_credentials.clone()));
        if let Some(keeper) = &registry_token {
            init_shared(keeper);
        }
        let keys = RemoteKeys::new(
            NAME,
            SHARED_KEYS_PREFIX,
            KeyMetrics {
                fetched: metrics.jwks_fetched,
                failed: metrics.jwks_failed,
                callouts: metrics.callouts,
                callout_failures: metrics.callout_failures,
            },
        );
        let mut stage = TokenAuthStage {
            auth,
            metrics,
            lookups: Lookups::default(),
            callouts: HashMap::new(),
            keys,
            settled: ByStream::default(),
            last_cache: Default::default(),
            last_counters: Default::default(),
            registry_token,
        };
        // Keys another worker already fetched, then the first fetch for issuers without keys.
        let now = now_secs().unwrap_or(0);
        stage.keys.sync_shared(&mut stage.auth);
        for issuer in RemoteKeys::without_keys(&stage.auth) {
            stage.start_key_fetch(&issuer, None, now);
        }
        stage
    }

    /// Removes every identity header and every `x-envoy-*` header the client sent: only this
    /// stage sets them (by name: a copy is removed whatever its bytes).
    ///
    /// Only names present in the request as read are removed (one host call each): the copy
    /// holds every header the client sent. Its names are lowercase, as the identity header
    /// names are (sorted: each request header is looked up once, not every name in every
    /// header).
    fn strip_client_identity(&self, req: &mut Request) {
        let listed = self.auth.identity_header_names();
        let mut sent: Vec<usize> = req
            .headers()
            .iter()
            .filter_map(|(n, _)| listed.binary_search_by(|l| l.as_bytes().cmp(n)).ok())
            .collect();
        sent.sort_unstable();
        sent.dedup();
        let mut names: Vec<String> = sent
            .into_iter()
            .filter_map(|i| listed.get(i).cloned())
            .collect();
        names.extend(
            req.headers()
                .iter()
                .filter(|(n, _)| is_client_envoy_header(n))
                .map(|(n, _)| String::from_utf8_lossy(n).into_owned()),
        );
        for name in names {
            let _ = req.set_header(&name, None);
        }
    }

    /// Runs `f` on the facts of the request. The headers the engine reads must be text:
    /// otherwise the request is refused (400) without asking the engine.
    fn with_request<R>(
        &mut self,
        req: &Request,
        f: impl FnOnce(&mut Self, &RequestFacts) -> R,
    ) -> Result<R, DenyReason> {
        let headers = req.text_headers(NAME, |name| self.auth.reads_header(name))?;
        let method = proxy_glue::header_text(headers, ":method");
        let path = proxy_glue::header_text(headers, ":path");
        let wants_peer = self.auth.config().mtls.is_some();
        let peer = (wants_peer && proxy_glue::bool_property(&["connection", "mtls"])).then(|| {
            PeerCertificate {
                subject: string_property(&["connection", "subject_peer_certificate"]),
                uri_san: string_property(&["connection", "uri_san_peer_certificate"]),
                dns_san: string_property(&["connection", "dns_san_peer_certificate"]),
            }
        });
        let facts = RequestFacts {
            method,
            path,
            headers,
            peer,
        };
        Ok(f(self, &facts))
    }

    /// Decides the request and executes the outcome. `may_fetch` is false once a fetch for it
    /// has been tried: then it is decided with the keys at hand.
    fn decide(&mut self, req: &mut Request, may_fetch: bool) -> Step {
        let Some(now) = now_secs() else {
            return self.execute(req, deny(DenyReason::Unavailable("no clock".into())));
        };
        let outcome = self.with_request(req, |stage, facts| {
            let outcome = if may_fetch {
                stage.auth.authenticate(facts, now)
            } else {
                stage.auth.authenticate_without_fetch(facts, now)
            };
            stage.count_engine_events();
            outcome
        });
        let outcome = outcome.unwrap_or_else(deny);
        match outcome {
            Outcome::FetchKeys { issuer } => {
                let key = LookupKey::Keys(issuer.clone());
                let in_flight = self.lookups.in_flight(&key);
                if self.keys.fetched_recently(&issuer, now) && !in_flight {
                    return self.decide(req, false);
                }
                self.lookups.join(key.clone(), req.ctx, None);
                if !in_flight && !self.start_key_fetch(&issuer, Some(req.ctx), now) {
                    self.lookups.leave(&key, req.ctx);
                    return self.decide(req, false);
                }
                Step::Wait
            }
            Outcome::Introspect { token, .. } => {
                let admitted = self.admit_introspection();
                self.wait_for_lookup(
                    req,
                    LookupKey::Introspection(token_digest(&token)),
                    token,
                    (
                        admitted,
                        self.metrics.introspection_shed,
                        Some(Reason::IntrospectionShed),
                    ),
                    |stage, token, owner| stage.start_introspection(token, owner),
                    "the identity provider cannot be reached",
                )
            }
            Outcome::LookupDevice { device_id, .. } => {
                let admitted = self.admit_device_lookup();
                self.wait_for_lookup(
                    req,
                    LookupKey::Device(device_id.clone()),
                    device_id,
                    (admitted, self.metrics.registry_shed, None),
                    |stage, device_id, owner| stage.start_device_lookup(device_id, owner),
                    "the device registry cannot be reached",
                )
            }
            other => self.execute(req, other),
        }
    }

    /// Whether one more introspection callout may start now (`introspection.max_in_flight`).
    fn admit_introspection(&self) -> Result<(), DenyReason> {
        match &self.auth.config().introspection {
            Some(intro) => intro.admit(self.callouts.len()),
            None => Ok(()),
        }
    }

    /// Whether one more device registry lookup may start now (`registry.max_in_flight`).
    fn admit_device_lookup(&self) -> Result<(), DenyReason> {
        let in_flight = self
            .callouts
            .values()
            .filter(|k| matches!(k, LookupKey::Device(_)))
            .count();
        match self.auth.device_registry() {
            Some(registry) => registry.admit(in_flight),
            None => Ok(()),
        }
    }

    /// Makes `req` wait for lookup `key` (of `value`: the token, the device id): it joins a
    /// lookup in flight for free; a new one must be admitted (else it is shed: 503 with
    /// `Retry-After`) and started with `start` (else the request fails closed with 503,
    /// `unreachable`).
    fn wait_for_lookup(
        &mut self,
        req: &mut Request,
        key: LookupKey,
        value: String,
        (admitted, shed_counter, shed_reason): (Result<(), DenyReason>, Counter, Option<Reason>),
        start: impl FnOnce(&mut Self, &str, Option<u32>) -> bool,
        unreachable: &str,
    ) -> Step {
        let in_flight = self.lookups.in_flight(&key);
        if !in_flight {
            if let Err(reason) = admitted {
                shed_counter.inc();
                return self.shed(req, reason, shed_reason);
            }
        }
        self.lookups.join(key.clone(), req.ctx, Some(value.clone()));
        if !in_flight && !start(self, &value, Some(req.ctx)) {
            self.lookups.leave(&key, req.ctx);
            return self.execute(req, deny(DenyReason::Unavailable(unreachable.into())));
        }
        Step::Wait
    }

    /// Refuses a request that would need one callout too many: 503 with `Retry-After` and a
    /// log line (`line_reason`: the decision line's reason, if it has one).
    fn shed(&self, req: &Request, reason: DenyReason, line_reason: Option<Reason>) -> Step {
        self.metrics.denied(&reason).inc();
        let decision = Decision::Deny(reason.clone());
        let line = DecisionLine::new(NAME, Mode::Enforce, &decision);
        self.emit(
            req,
            match line_reason {
                Some(why) => line.reason(why),
                None => line,
            },
        );
        Step::Deny {
            reason,
            headers: vec![("retry-after", SHED_RETRY_AFTER_SECS.to_string())],
        }
    }

    /// Adds what the engine counted since the last call (cache hits and misses, stale keys,
    /// malformed introspection answers) to the metrics.
    fn count_engine_events(&mut self) {
        let stats = self.auth.cache_stats();
        self.metrics
            .cache_hits
            .add(stats.hits.saturating_sub(self.last_cache.hits));
        self.metrics
            .cache_misses
            .add(stats.misses.saturating_sub(self.last_cache.misses));
        self.last_cache = stats;
        let counters = self.auth.counters();
        self.metrics.jwks_stale.add(
            counters
                .stale_keys
                .saturating_sub(self.last_counters.stale_keys),
        );
        self.metrics.introspection_malformed.add(
            counters
                .malformed_introspection
                .saturating_sub(self.last_counters.malformed_introspection),
        );
        self.metrics.registry_malformed.add(
            counters
                .malformed_registry
                .saturating_sub(self.last_counters.malformed_registry),
        );
        self.last_counters = counters;
    }

    /// Logs, exports and counts a decision on the current stream, with the request's facts.
    fn emit(&self, req: &Request, line: DecisionLine) {
        self.emit_with(req, line, |line| line);
    }

    /// [`Self::emit`], with fields only the logged line shows (added when it is logged).
    fn emit_with(
        &self,
        req: &Request,
        line: DecisionLine,
        details: impl FnOnce(DecisionLine) -> DecisionLine,
    ) {
        let log_allows = self.auth.config().log_allows;
        proxy_glue::emit_decision_from(line, req.headers(), log_allows, details);
    }

    /// Executes a final outcome.
    fn execute(&mut self, req: &mut Request, outcome: Outcome) -> Step {
        match outcome {
            Outcome::Public {
                strip_headers,
                new_path,
            } => {
                remove_credentials(req, &strip_headers, new_path.as_deref());
                req.caller = Caller::Known(None);
                self.metrics.public.inc();
                let decision = Decision::Allow("public route".into());
                self.emit(
                    req,
                    DecisionLine::new(NAME, Mode::Enforce, &decision).reason(Reason::Public),
                );
                Step::Next
            }
            Outcome::Allow {
                identity,
                strip_headers,
                new_path,
            } => {
                remove_credentials(req, &strip_headers, new_path.as_deref());
                for (name, value) in self.auth.render_identity(&identity) {
                    if req.set_header_text(name, value).is_err() {
                        // Without its identity headers the request must not go on.
                        return self.execute(
                            req,
                            deny(DenyReason::Unavailable("cannot set identity".into())),
                        );
                    }
                }
                self.metrics.allowed.inc();
                let kind = identity.kind.as_str();
                let decision = Decision::Allow(format!("verified {kind} credential"));
                self.emit_with(
                    req,
                    DecisionLine::new(NAME, Mode::Enforce, &decision)
                        .subject(Some(&identity.subject)),
                    |line| line.literal("kind", kind),
                );
                req.caller = Caller::Known(Some(identity));
                Step::Next
            }
            Outcome::Deny {
                reason,
                challenge,
                subject,
            } => {
                self.metrics.denied(&reason).inc();
                self.emit(
                    req,
                    DecisionLine::new(NAME, Mode::Enforce, &Decision::Deny(reason.clone()))
                        .subject(subject.as_deref()),
                );
                Step::Deny {
                    reason,
                    headers: challenge
                        .map(|c| vec![("www-authenticate", c)])
                        .unwrap_or_default(),
                }
            }
            // Data requests are handled by `decide`; reaching here is a bug: fail closed.
            Outcome::FetchKeys { .. }
            | Outcome::Introspect { .. }
            | Outcome::LookupDevice { .. } => {
                self.execute(req, deny(DenyReason::Unavailable("internal error".into())))
            }
        }
    }

    /// Starts fetching an issuer's keys. `owner` is the stream making the call (None: the
    /// root). Returns false if the call could not be made.
    fn start_key_fetch(&mut self, issuer: &str, owner: Option<u32>, now: u64) -> bool {
        if self.keys.start(&self.auth, issuer, now).is_none() {
            return false;
        }
        self.lookups
            .started(LookupKey::Keys(issuer.to_string()), owner);
        true
    }

    /// Sends one of the stage's callouts, counted as sent or failed.
    fn send(&self, call: &HttpCall) -> Option<u32> {
        proxy_glue::dispatch_call(
            NAME,
            call,
            self.metrics.callouts,
            self.metrics.callout_failures,
        )
    }

    fn start_introspection(&mut self, token: &str, owner: Option<u32>) -> bool {
        let Some(intro) = self.auth.config().introspection.clone() else {
            return false;
        };
        let call = intro.build_request(token);
        let Some(sent) = self.send(&call) else {
            return false;
        };
        let key = LookupKey::Introspection(token_digest(token));
        self.callouts.insert(sent, key.clone());
        self.lookups.started(key, owner);
        true
    }

    /// Asks the device registry about `device_id` from `owner`'s context (None: the root).
    /// With `auth`, a lookup without a usable token waits for one (the token request sent now
    /// unless one is in flight). Returns false if no call could be made.
    fn start_device_lookup(&mut self, device_id: &str, owner: Option<u32>) -> bool {
        let key = LookupKey::Device(device_id.to_string());
        let now = now_secs().unwrap_or(0);
        let counters = self.metrics.registry_token;
        let need = self.registry_token.as_mut().map(|t| {
            adopt_shared(t, now, counters);
            t.need(device_id.to_string(), now)
        });
        let authorization = match need {
            None => None,
            Some(TokenNeed::Ready(authorization)) => Some(authorization),
            Some(TokenNeed::Fetch) if !self.start_token_fetch(owner) => {
                if let Some(t) = self.registry_token.as_mut() {
                    t.leave(&device_id.to_string());
                }
                return false;
            }
            Some(TokenNeed::Fetch | TokenNeed::Wait) => {
                self.lookups.started(key, owner);
                return true;
            }
        };
        let Some(registry) = self.auth.device_registry() else {
            return false;
        };
        let mut call = registry.call(device_id);
        if let Some(authorization) = authorization {
            call = call.with_header("authorization", authorization);
        }
        let Some(sent) = self.send(&call) else {
            return false;
        };
        self.callouts.insert(sent, key.clone());
        self.lookups.started(key, owner);
        true
    }

    /// Sends the registry token's request from `owner`'s context (None: the root), unless
    /// another worker's VM is fetching it (then the lookups wait for its token). False if
    /// the request could not be sent.
    fn start_token_fetch(&mut self, owner: Option<u32>) -> bool {
        let counters = self.metrics.registry_token;
        send_token_request(NAME, self.registry_token.as_mut(), owner, counters).recorded(|sent| {
            self.callouts.insert(sent, LookupKey::RegistryToken);
        })
    }

    /// The IdP answered: with a token, the waiting lookups are sent (from the context that
    /// fetched it); without, they fail closed (503). Returns the streams to resume.
    fn token_answered(&mut self, status: u32, body: &[u8]) -> Vec<u32> {
        let counters = self.metrics.registry_token;
        match token_answered(
            NAME,
            self.registry_token.as_mut(),
            (status, body),
            counters,
            "device registry",
        ) {
            Some(fetched) => self.token_released(fetched),
            None => Vec::new(),
        }
    }

    /// The lookups that waited for the token: sent with it (from the context that fetched
    /// it), or failed closed without (503). Returns the streams to resume.
    fn token_released(&mut self, fetched: Fetched<String>) -> Vec<u32> {
        let mut ready = Vec::new();
        for device_id in fetched.waiters {
            if fetched.failure.is_some() || !self.start_device_lookup(&device_id, fetched.sent_by) {
                ready.extend(self.fail_device_lookup(&device_id));
            }
        }
        ready
    }

    fn fail_device_lookup(&mut self, device_id: &str) -> Vec<u32> {
        let failed: LookupResult = Err(DenyReason::Unavailable(
            "the device registry cannot be reached".into(),
        ));
        self.settle(&LookupKey::Device(device_id.to_string()), || {
            Settled::DeviceLookedUp(failed.clone())
        })
    }

    /// The registry refused the token (401) for the first time for this device: the lookup
    /// waits for a new token (fetched from the root on the next tick). False: `status` is the
    /// lookup's answer.
    fn retry_after_401(&mut self, device_id: &str, status: u32) -> bool {
        let Some(token) = self.registry_token.as_mut() else {
            return false;
        };
        if !token.retry_with_new_token(device_id.to_string(), status) {
            return false;
        }
        log::info!("{NAME}: the device registry refused the access token (401): fetching another");
        token.wait(device_id.to_string());
        true
    }

    /// Ends a lookup; its waiters are settled as `how`.
    fn settle(&mut self, key: &LookupKey, how: impl Fn() -> Settled) -> Vec<u32> {
        let waiters = self.lookups.finish(key);
        for ctx in &waiters {
            self.settled.insert(*ctx, how());
        }
        waiters
    }
}

fn deny(reason: DenyReason) -> Outcome {
    Outcome::Deny {
        reason,
        challenge: None,
        subject: None,
    }
}

/// Removes the credential headers and, if it changed, rewrites `:path` (query credentials).
fn remove_credentials(req: &mut Request, strip_headers: &[String], new_path: Option<&str>) {
    for name in strip_headers {
        let _ = req.set_header(name, None);
    }
    if let Some(path) = new_path {
        let _ = req.set_header(":path", Some(path));
    }
}

impl Stage for TokenAuthStage {
    fn name(&self) -> &'static str {
        NAME
    }

    fn on_request(&mut self, req: &mut Request) -> Step {
        self.strip_client_identity(req);
        self.decide(req, true)
    }

    fn refuse(&mut self, req: &mut Request, reason: DenyReason) -> Step {
        self.metrics.denied(&reason).inc();
        self.emit(
            req,
            DecisionLine::new(NAME, Mode::Enforce, &Decision::Deny(reason.clone())),
        );
        Step::deny(reason)
    }

    fn resume(&mut self, req: &mut Request) -> Step {
        match self.settled.remove(&req.ctx) {
            Some(Settled::KeysFetched) => self.decide(req, false),
            Some(Settled::Introspected(decided)) => {
                let outcome = self
                    .with_request(req, |stage, facts| stage.auth.outcome_for(&decided, facts))
                    .unwrap_or_else(deny);
                self.execute(req, outcome)
            }
            Some(Settled::DeviceLookedUp(looked_up)) => {
                let outcome = self
                    .with_request(req, |stage, facts| {
                        stage.auth.outcome_for_device(&looked_up, facts)
                    })
                    .unwrap_or_else(deny);
                self.execute(req, outcome)
            }
            None => self.execute(req, deny(DenyReason::Unavailable("internal error".into()))),
        }
    }

    fn on_callout(&mut self, token: u32) -> Option<Vec<u32>> {
        match self.keys.on_response(&mut self.auth, token) {
            Progress::Continuing => return Some(Vec::new()),
            Progress::Done { issuer, .. } => {
                return Some(self.settle(&LookupKey::Keys(issuer), || Settled::KeysFetched));
            }
            Progress::NotOurs => {}
        }
        let key = self.callouts.remove(&token)?;
        // Status 0: the call was reset. Any non-2xx is a failure too, except the registry's
        // 404 (an answer: no such device).
        let (status, body) = proxy_glue::callout_answer(NAME);
        let answered = match key {
            LookupKey::Device(_) => (200..300).contains(&status) || status == 404,
            LookupKey::RegistryToken => (200..300).contains(&status),
            _ => (200..300).contains(&status),
        };
        if !answered {
            self.metrics.callout_failures.inc();
        }
        let now = now_secs().unwrap_or(0);
        if key == LookupKey::RegistryToken {
            return Some(self.token_answered(status, &body));
        }
        if let LookupKey::Device(device_id) = &key {
            if self.retry_after_401(device_id, status) {
                return Some(Vec::new());
            }
            let looked_up = self
                .auth
                .finish_device_lookup(device_id, status, &body, now);
            self.count_engine_events();
            return Some(self.settle(&key, || Settled::DeviceLookedUp(looked_up.clone())));
        }
        let Some(token) = self.lookups.data(&key).cloned() else {
            return Some(Vec::new());
        };
        let decided = self.auth.finish_introspection(&token, status, &body, now);
        self.count_engine_events();
        Some(self.settle(&key, || Settled::Introspected(decided.clone())))
    }

    fn needs_ticks(&self) -> bool {
        self.auth.config().introspection.is_some()
            || self.auth.device_registry().is_some()
            || self.auth.providers().iter().any(|p| p.remote().is_some())
    }

    fn on_tick(&mut self) -> Vec<u32> {
        let Some(now) = now_secs() else {
            return Vec::new();
        };
        self.keys.sync_shared(&mut self.auth);
        for issuer in self.keys.due(&self.auth, now) {
            self.start_key_fetch(&issuer, None, now);
        }
        // A token another worker's VM fetched (or failed to) releases the lookups that waited
        // for it; then lookups waiting for a registry token that nobody is fetching (its
        // fetcher went away, or the registry refused the last one): the root fetches it.
        let mut ready = Vec::new();
        let counters = self.metrics.registry_token;
        if let Some(fetched) = self
            .registry_token
            .as_mut()
            .and_then(|t| sync_shared(t, now, counters))
        {
            ready.extend(self.token_released(fetched));
        }
        if self
            .registry_token
            .as_ref()
            .is_some_and(TokenKeeper::orphaned)
            && !self.start_token_fetch(None)
        {
            ready.extend(self.token_answered(0, b""));
        }
        // Lookups whose owning stream went away: the root asks again for the waiters.
        for key in self.lookups.orphans() {
            match &key {
                LookupKey::Keys(issuer) => {
                    self.start_key_fetch(issuer, None, now);
                }
                LookupKey::Introspection(_) => {
                    let token = self.lookups.data(&key).cloned();
                    // Over the cap, the waiters wait for the next tick (or their timeout).
                    if let (Some(token), Ok(())) = (token, self.admit_introspection()) {
                        self.start_introspection(&token, None);
                    }
                }
                LookupKey::Device(device_id) => {
                    if self.admit_device_lookup().is_ok() {
                        self.start_device_lookup(device_id, None);
                    }
                }
                LookupKey::RegistryToken => {}
            }
        }
        ready
    }

    fn forget(&mut self, ctx: u32) {
        self.settled.remove(&ctx);
        if self
            .registry_token
            .as_mut()
            .is_some_and(|t| registry_token::forget_stream(t, ctx))
        {
            // Envoy cancels its token fetch; the root fetches again on the next tick.
            self.callouts.retain(|_, k| *k != LookupKey::RegistryToken);
        }
        for key in self.lookups.forget_stream(ctx) {
            // Envoy cancels the owner's callouts; the root re-issues the lookup on its next tick.
            self.callouts.retain(|_, k| *k != key);
            if let LookupKey::Keys(issuer) = &key {
                self.keys.cancelled(issuer);
            }
        }
    }
}
