//! token-auth: the first filter of the chain. It authenticates every request and hands the
//! caller's identity to the later filters and the broker as request headers, after removing
//! any copy the client sent.
//!
//! The decisions are `policy::token_auth`'s; this crate only talks to Envoy: it reads the
//! request, executes outcomes, and runs the callouts the engine asks for.
//!
//! Callouts. A JWKS fetch (per issuer) or an introspection (per token digest) is one *lookup*
//! with a list of waiting streams: concurrent requests with the same token share one callout.
//! The stream that starts a lookup makes the call (the SDK routes the answer to it) and, on the
//! answer, resumes every waiter through `proxy_set_effective_context`. If that stream goes away
//! first (Envoy then cancels its callout), the root context re-issues the lookup on its next
//! tick, so no waiter is left behind. While a stream waits, its body and trailers are held
//! (Pause), so nothing reaches the broker before the decision.
//!
//! Keys. Remote JWKS (optionally via OIDC discovery) are fetched at configure time, refreshed
//! on a timer, and re-fetched once on an unknown `kid` (at most every 30 s per issuer), by
//! `proxy_glue::remote_keys` (shared with mqtt-acl). Fetched key sets go into Envoy shared data
//! so every worker uses the same keys; a failed fetch keeps the last good set.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use policy::cache::{token_digest, TokenDigest};
use policy::decision_line::{DecisionLine, Reason};
use policy::enforcement::Mode;
use policy::introspection::SHED_RETRY_AFTER_SECS;
use policy::mtls::PeerCertificate;
use policy::token_auth::{
    is_client_envoy_header, IntrospectionOutcome, Outcome, RequestFacts, TokenAuth, TokenAuthConfig,
};
use policy::{Decision, DenyReason};
use proxy_glue::host;
use proxy_glue::remote_keys::{KeyMetrics, Progress, RemoteKeys};
use proxy_glue::{now_secs, send_deny, string_property, Counter};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MapType};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_glue::install_panic_hook();
    proxy_wasm::set_root_context(|id| Box::new(Root { id, state: None }));
}}

const FILTER: &str = "token-auth";
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
}

impl Metrics {
    fn define() -> Self {
        let c = |name: &str| Counter::define(&format!("token_auth.{name}"));
        Metrics {
            allowed: c("allowed"),
            public: c("public"),
            denied_bad_request: c("denied.bad_request"),
            denied_unauthenticated: c("denied.unauthenticated"),
            denied_forbidden: c("denied.forbidden"),
            denied_unavailable: c("denied.unavailable"),
            cache_hits: c("cache.hit"),
            cache_misses: c("cache.miss"),
            callouts: c("callout.sent"),
            callout_failures: c("callout.failed"),
            jwks_fetched: c("jwks.fetched"),
            jwks_failed: c("jwks.failed"),
            jwks_stale: c("jwks.stale"),
            introspection_malformed: c("introspection.malformed"),
            introspection_shed: c("introspection.shed"),
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
}

/// One callout-backed lookup and the streams waiting for it.
struct Lookup {
    /// The stream whose callout is in flight, or None when the root made it.
    owner: Option<u32>,
    in_flight: bool,
    waiters: Vec<u32>,
    /// The token being introspected (kept only while the lookup lives).
    token: Option<String>,
}

struct State {
    auth: TokenAuth,
    metrics: Metrics,
    lookups: HashMap<LookupKey, Lookup>,
    waiting: HashMap<u32, LookupKey>,
    /// Introspection callouts in flight (key fetches are `keys`').
    callouts: HashMap<u32, LookupKey>,
    keys: RemoteKeys,
    last_cache: policy::cache::CacheStats,
    last_counters: policy::token_auth::AuthCounters,
}

type Shared = Rc<RefCell<State>>;

struct Root {
    id: u32,
    state: Option<Shared>,
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _headers: usize,
        _body: usize,
        _trailers: usize,
    ) {
        if let Some(state) = &self.state {
            handle_callout_response(state, self.id, token);
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(auth) = proxy_glue::load_config::<TokenAuthConfig, _>(FILTER, TokenAuth::new)
        else {
            return false;
        };
        for warning in auth.warnings() {
            log::warn!("token-auth: {warning}");
        }
        let needs_ticks = auth.config().introspection.is_some()
            || auth.providers().iter().any(|p| p.remote().is_some());
        let metrics = Metrics::define();
        let keys = RemoteKeys::new(
            "token-auth",
            SHARED_KEYS_PREFIX,
            KeyMetrics {
                fetched: metrics.jwks_fetched,
                failed: metrics.jwks_failed,
                callouts: metrics.callouts,
                callout_failures: metrics.callout_failures,
            },
        );
        let state = Rc::new(RefCell::new(State {
            auth,
            metrics,
            lookups: HashMap::new(),
            waiting: HashMap::new(),
            callouts: HashMap::new(),
            keys,
            last_cache: Default::default(),
            last_counters: Default::default(),
        }));
        self.state = Some(state.clone());
        if needs_ticks {
            self.set_tick_period(Duration::from_secs(1));
        }
        // Keys another worker already fetched, then the first fetch for issuers without keys.
        let now = now_secs().unwrap_or(0);
        sync_shared_keys(&state);
        let without_keys = RemoteKeys::without_keys(&state.borrow().auth);
        for issuer in without_keys {
            start_key_fetch(&state, &issuer, None, now);
        }
        true
    }

    fn on_tick(&mut self) {
        let Some(state) = self.state.clone() else {
            return;
        };
        let Some(now) = now_secs() else { return };
        sync_shared_keys(&state);
        let due = {
            let s = state.borrow();
            s.keys.due(&s.auth, now)
        };
        for issuer in due {
            start_key_fetch(&state, &issuer, None, now);
        }
        // Lookups whose owning stream went away: the root asks again for the waiters.
        let orphans: Vec<LookupKey> = state
            .borrow()
            .lookups
            .iter()
            .filter(|(_, l)| !l.in_flight && !l.waiters.is_empty())
            .map(|(k, _)| k.clone())
            .collect();
        for key in orphans {
            match key {
                LookupKey::Keys(issuer) => {
                    start_key_fetch(&state, &issuer, None, now);
                }
                LookupKey::Introspection(digest) => {
                    let token = state
                        .borrow()
                        .lookups
                        .get(&LookupKey::Introspection(digest))
                        .and_then(|l| l.token.clone());
                    // Over the cap, the waiters wait for the next tick (or their timeout).
                    if let (Some(token), Ok(())) = (token, admit_introspection(&state)) {
                        start_introspection(&state, &token, None);
                    }
                }
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            id: context_id,
            state: self.state.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    id: u32,
    state: Option<Shared>,
}

impl Context for Stream {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _headers: usize,
        _body: usize,
        _trailers: usize,
    ) {
        if let Some(state) = &self.state {
            handle_callout_response(state, self.id, token);
        }
    }

    fn on_done(&mut self) -> bool {
        if let Some(state) = &self.state {
            forget_stream(state, self.id);
        }
        true
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let Some(state) = self.state.clone() else {
            send_deny(
                &DenyReason::Unavailable("filter not configured".into()),
                &[],
            );
            return Action::Pause;
        };
        if let Err(reason) = strip_client_identity(&state) {
            emit(
                &state.borrow(),
                DecisionLine::new(FILTER, Mode::Enforce, &Decision::Deny(reason.clone())),
            );
            send_deny(&reason, &[]);
            return Action::Pause;
        }
        decide(&state, self.id, true)
    }

    // While a decision is pending the body is held: answering Continue here would let the
    // headers and body through before the check is done (Envoy's StopIteration semantics).
    fn on_http_request_body(&mut self, _size: usize, _end_of_stream: bool) -> Action {
        self.hold_while_waiting()
    }

    fn on_http_request_trailers(&mut self, _trailers: usize) -> Action {
        self.hold_while_waiting()
    }
}

impl Stream {
    fn hold_while_waiting(&self) -> Action {
        let waiting = self
            .state
            .as_ref()
            .is_some_and(|s| s.borrow().waiting.contains_key(&self.id));
        if waiting {
            Action::Pause
        } else {
            Action::Continue
        }
    }
}

/// Removes every identity header the client sent: only this filter sets them. Fails (503)
/// when the `x-envoy-*` headers can't be listed: they would reach the broker.
fn strip_client_identity(state: &Shared) -> Result<(), DenyReason> {
    let names = state.borrow().auth.identity_header_names();
    // By name: a copy is removed whatever its bytes (its value is never read).
    for name in names {
        let _ = host::set_header(MapType::HttpRequestHeaders, &name, None);
    }
    strip_client_envoy_headers()
}

/// Removes every `x-envoy-*` header the client sent (see `is_client_envoy_header`).
fn strip_client_envoy_headers() -> Result<(), DenyReason> {
    let headers = host::header_map(MapType::HttpRequestHeaders)
        .map_err(|e| DenyReason::Unavailable(format!("cannot read the request headers: {e:?}")))?;
    let names: Vec<String> = headers
        .iter()
        .filter(|(n, _)| is_client_envoy_header(n))
        .map(|(n, _)| String::from_utf8_lossy(n).into_owned())
        .collect();
    for name in names {
        let _ = host::set_header(MapType::HttpRequestHeaders, &name, None);
    }
    Ok(())
}

/// Runs `f` on the facts of the current (effective) stream's request. The headers the engine
/// reads must be text: otherwise the request is refused (400) without asking the engine.
fn with_request<R>(state: &Shared, f: impl FnOnce(&RequestFacts) -> R) -> Result<R, DenyReason> {
    let headers = {
        let s = state.borrow();
        proxy_glue::request_text_headers(FILTER, |name| s.auth.reads_header(name))?
    };
    let method = proxy_glue::first_header(&headers, ":method");
    let path = proxy_glue::first_header(&headers, ":path");
    let wants_peer = state.borrow().auth.config().mtls.is_some();
    let peer = (wants_peer && proxy_glue::bool_property(&["connection", "mtls"])).then(|| {
        PeerCertificate {
            subject: string_property(&["connection", "subject_peer_certificate"]),
            uri_san: string_property(&["connection", "uri_san_peer_certificate"]),
            dns_san: string_property(&["connection", "dns_san_peer_certificate"]),
        }
    });
    Ok(f(&RequestFacts {
        method: &method,
        path: &path,
        headers: &headers,
        peer,
    }))
}

/// Decides the effective stream `ctx` and executes the outcome. `may_fetch` is false once a
/// fetch for it has been tried: then it is decided with the keys at hand.
fn decide(state: &Shared, ctx: u32, may_fetch: bool) -> Action {
    let Some(now) = now_secs() else {
        return execute(
            state,
            Outcome::Deny {
                reason: DenyReason::Unavailable("no clock".into()),
                challenge: None,
            },
        );
    };
    let outcome = with_request(state, |facts| {
        let mut s = state.borrow_mut();
        let outcome = if may_fetch {
            s.auth.authenticate(facts, now)
        } else {
            s.auth.authenticate_without_fetch(facts, now)
        };
        count_engine_events(&mut s);
        outcome
    });
    let outcome = outcome.unwrap_or_else(|reason| Outcome::Deny {
        reason,
        challenge: None,
    });
    match outcome {
        Outcome::FetchKeys { issuer } => {
            let recently = state.borrow().keys.fetched_recently(&issuer, now);
            let in_flight = state
                .borrow()
                .lookups
                .get(&LookupKey::Keys(issuer.clone()))
                .is_some_and(|l| l.in_flight);
            if recently && !in_flight {
                return decide(state, ctx, false);
            }
            wait_for(state, ctx, LookupKey::Keys(issuer.clone()), None);
            if !in_flight && !start_key_fetch(state, &issuer, Some(ctx), now) {
                return decide(state, ctx, false);
            }
            Action::Pause
        }
        Outcome::Introspect { token, .. } => {
            let key = LookupKey::Introspection(token_digest(&token));
            let in_flight = state
                .borrow()
                .lookups
                .get(&key)
                .is_some_and(|l| l.in_flight);
            // Joining a lookup in flight is free; a new one must fit under max_in_flight.
            if !in_flight {
                if let Err(reason) = admit_introspection(state) {
                    return shed(state, reason);
                }
            }
            wait_for(state, ctx, key.clone(), Some(token.clone()));
            if !in_flight && !start_introspection(state, &token, Some(ctx)) {
                let outcome = Outcome::Deny {
                    reason: DenyReason::Unavailable(
                        "the identity provider cannot be reached".into(),
                    ),
                    challenge: None,
                };
                state.borrow_mut().waiting.remove(&ctx);
                return execute(state, outcome);
            }
            Action::Pause
        }
        other => execute(state, other),
    }
}

/// Whether one more introspection callout may start now (`introspection.max_in_flight`).
fn admit_introspection(state: &Shared) -> Result<(), DenyReason> {
    let s = state.borrow();
    match &s.auth.config().introspection {
        Some(intro) => intro.admit(s.callouts.len()),
        None => Ok(()),
    }
}

/// Refuses a request whose token would need one introspection too many: 503 with
/// `Retry-After`, a log line and `token_auth.introspection.shed`.
fn shed(state: &Shared, reason: DenyReason) -> Action {
    let s = state.borrow();
    s.metrics.introspection_shed.inc();
    s.metrics.denied(&reason).inc();
    let decision = Decision::Deny(reason.clone());
    emit(
        &s,
        DecisionLine::new(FILTER, Mode::Enforce, &decision).reason(Reason::IntrospectionShed),
    );
    let retry_after = SHED_RETRY_AFTER_SECS.to_string();
    send_deny(&reason, &[("retry-after", &retry_after)]);
    Action::Pause
}

/// Adds what the engine counted since the last call (cache hits and misses, stale keys,
/// malformed introspection answers) to the metrics.
fn count_engine_events(s: &mut State) {
    let stats = s.auth.cache_stats();
    s.metrics
        .cache_hits
        .add(stats.hits.saturating_sub(s.last_cache.hits));
    s.metrics
        .cache_misses
        .add(stats.misses.saturating_sub(s.last_cache.misses));
    s.last_cache = stats;
    let counters = s.auth.counters();
    s.metrics.jwks_stale.add(
        counters
            .stale_keys
            .saturating_sub(s.last_counters.stale_keys),
    );
    s.metrics.introspection_malformed.add(
        counters
            .malformed_introspection
            .saturating_sub(s.last_counters.malformed_introspection),
    );
    s.last_counters = counters;
}

/// Removes the credential headers and, if it changed, rewrites `:path` (query credentials).
fn remove_credentials(strip_headers: &[String], new_path: Option<&str>) {
    for name in strip_headers {
        let _ = host::set_header(MapType::HttpRequestHeaders, name, None);
    }
    if let Some(path) = new_path {
        let _ = host::set_header(MapType::HttpRequestHeaders, ":path", Some(path));
    }
}

/// Logs, exports and counts a decision on the current stream, with the request's facts.
fn emit(s: &State, line: DecisionLine) {
    proxy_glue::emit_decision(
        &proxy_glue::with_request_facts(line),
        s.auth.config().log_allows,
    );
}

/// Executes a final outcome on the effective stream; returns the action for its callback.
fn execute(state: &Shared, outcome: Outcome) -> Action {
    let s = state.borrow();
    match outcome {
        Outcome::Public {
            strip_headers,
            new_path,
        } => {
            remove_credentials(&strip_headers, new_path.as_deref());
            s.metrics.public.inc();
            let decision = Decision::Allow("public route".into());
            emit(
                &s,
                DecisionLine::new(FILTER, Mode::Enforce, &decision).reason(Reason::Public),
            );
            Action::Continue
        }
        Outcome::Allow {
            identity,
            strip_headers,
            new_path,
        } => {
            remove_credentials(&strip_headers, new_path.as_deref());
            for (name, value) in s.auth.render_identity(&identity) {
                if host::set_header(MapType::HttpRequestHeaders, &name, Some(&value)).is_err() {
                    // Without its identity headers the request must not go on.
                    drop(s);
                    return execute(
                        state,
                        Outcome::Deny {
                            reason: DenyReason::Unavailable("cannot set identity".into()),
                            challenge: None,
                        },
                    );
                }
            }
            s.metrics.allowed.inc();
            // The kind's snake_case name (`jwt`, `opaque_token`, ...), as its serde form.
            let kind = serde_json::to_value(identity.kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            let decision = Decision::Allow(format!("verified {kind} credential"));
            emit(
                &s,
                DecisionLine::new(FILTER, Mode::Enforce, &decision)
                    .subject(Some(&identity.subject))
                    .literal("kind", &kind),
            );
            Action::Continue
        }
        Outcome::Deny { reason, challenge } => {
            s.metrics.denied(&reason).inc();
            emit(
                &s,
                DecisionLine::new(FILTER, Mode::Enforce, &Decision::Deny(reason.clone())),
            );
            let extra: Vec<(&str, &str)> = challenge
                .as_deref()
                .map(|c| vec![("www-authenticate", c)])
                .unwrap_or_default();
            send_deny(&reason, &extra);
            Action::Pause
        }
        // Data requests are handled by `decide`; reaching here is a bug: fail closed.
        Outcome::FetchKeys { .. } | Outcome::Introspect { .. } => {
            let reason = DenyReason::Unavailable("internal error".into());
            s.metrics.denied(&reason).inc();
            emit(
                &s,
                DecisionLine::new(FILTER, Mode::Enforce, &Decision::Deny(reason.clone())),
            );
            send_deny(&reason, &[]);
            Action::Pause
        }
    }
}

fn wait_for(state: &Shared, ctx: u32, key: LookupKey, token: Option<String>) {
    let mut s = state.borrow_mut();
    let lookup = s.lookups.entry(key.clone()).or_insert(Lookup {
        owner: None,
        in_flight: false,
        waiters: Vec::new(),
        token: None,
    });
    if !lookup.waiters.contains(&ctx) {
        lookup.waiters.push(ctx);
    }
    if token.is_some() {
        lookup.token = token;
    }
    s.waiting.insert(ctx, key);
}

fn dispatch(
    state: &Shared,
    cluster: &str,
    headers: Vec<(&str, &str)>,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Option<u32> {
    match hostcalls::dispatch_http_call(cluster, headers, body, vec![], timeout) {
        Ok(token) => {
            state.borrow().metrics.callouts.inc();
            Some(token)
        }
        Err(status) => {
            state.borrow().metrics.callout_failures.inc();
            log::error!("token-auth: cannot call cluster {cluster}: {status:?}");
            None
        }
    }
}

/// Starts fetching an issuer's keys. `owner` is the stream making the call (None: the root).
/// Returns false if the call could not be made.
fn start_key_fetch(state: &Shared, issuer: &str, owner: Option<u32>, now: u64) -> bool {
    let started = {
        let mut s = state.borrow_mut();
        let s = &mut *s;
        s.keys.start(&s.auth, issuer, now)
    };
    if started.is_none() {
        return false;
    }
    let mut s = state.borrow_mut();
    let lookup = s
        .lookups
        .entry(LookupKey::Keys(issuer.to_string()))
        .or_insert(Lookup {
            owner: None,
            in_flight: false,
            waiters: Vec::new(),
            token: None,
        });
    lookup.owner = owner;
    lookup.in_flight = true;
    true
}

fn start_introspection(state: &Shared, token: &str, owner: Option<u32>) -> bool {
    let Some(intro) = state.borrow().auth.config().introspection.clone() else {
        return false;
    };
    let call = intro.build_request(token);
    let body = (!call.body.is_empty()).then_some(call.body.as_slice());
    let Some(callout) = dispatch(
        state,
        &call.cluster,
        call.envoy_headers(),
        body,
        Duration::from_millis(call.timeout_ms),
    ) else {
        return false;
    };
    let digest = token_digest(token);
    let key = LookupKey::Introspection(digest);
    let mut s = state.borrow_mut();
    s.callouts.insert(callout, key.clone());
    if let Some(lookup) = s.lookups.get_mut(&key) {
        lookup.owner = owner;
        lookup.in_flight = true;
    }
    true
}

/// The answer to one of our callouts arrived in context `current`.
fn handle_callout_response(state: &Shared, current: u32, callout: u32) {
    let progress = {
        let mut s = state.borrow_mut();
        let s = &mut *s;
        s.keys.on_response(&mut s.auth, callout)
    };
    match progress {
        Progress::Continuing => return,
        Progress::Done { issuer, .. } => {
            return key_fetch_done(state, current, &LookupKey::Keys(issuer));
        }
        Progress::NotOurs => {}
    }
    let Some(key) = state.borrow_mut().callouts.remove(&callout) else {
        return;
    };
    // Status 0: the call was reset. Any non-2xx is a failure too.
    let (status, body) = proxy_glue::callout_answer(FILTER);
    if !(200..300).contains(&status) {
        state.borrow().metrics.callout_failures.inc();
    }
    let now = now_secs().unwrap_or(0);
    let token = state
        .borrow()
        .lookups
        .get(&key)
        .and_then(|l| l.token.clone());
    let Some(token) = token else { return };
    let decided = {
        let mut s = state.borrow_mut();
        let decided = s.auth.finish_introspection(&token, status, &body, now);
        count_engine_events(&mut s);
        decided
    };
    for ctx in take_waiters(state, &key) {
        on_stream(current, ctx, || {
            let outcome = with_request(state, |facts| match &decided {
                IntrospectionOutcome::Allowed(_) | IntrospectionOutcome::Refused(_) => {
                    state.borrow().auth.outcome_for(&decided, facts)
                }
            })
            .unwrap_or_else(|reason| Outcome::Deny {
                reason,
                challenge: None,
            });
            if execute(state, outcome) == Action::Continue {
                resume(ctx);
            }
        });
    }
}

/// A key fetch ended (the keys are installed, or the last good set stays): decides every
/// stream that waited for it.
fn key_fetch_done(state: &Shared, current: u32, key: &LookupKey) {
    for ctx in take_waiters(state, key) {
        on_stream(current, ctx, || {
            if decide(state, ctx, false) == Action::Continue {
                resume(ctx);
            }
        });
    }
}

/// Lets a decided, waiting stream go on (a host refusal is logged: the stream then ends as
/// the host decides, never with our allow).
fn resume(ctx: u32) {
    if let Err(status) = host::resume_request() {
        log::warn!("{FILTER}: ctx={ctx} cannot resume the request: {status}");
    }
}

/// Ends a lookup and returns its waiters (they are no longer waiting).
fn take_waiters(state: &Shared, key: &LookupKey) -> Vec<u32> {
    let mut s = state.borrow_mut();
    let waiters = s.lookups.remove(key).map(|l| l.waiters).unwrap_or_default();
    for w in &waiters {
        s.waiting.remove(w);
    }
    waiters
}

/// Runs `f` with `ctx` as the effective context, then restores `current`. A stream that no
/// longer exists is skipped.
fn on_stream(current: u32, ctx: u32, f: impl FnOnce()) {
    if ctx != current && hostcalls::set_effective_context(ctx).is_err() {
        return;
    }
    f();
    if ctx != current {
        let _ = hostcalls::set_effective_context(current);
    }
}

/// A stream ended: it waits for nothing, and a lookup it owned becomes the root's to finish.
fn forget_stream(state: &Shared, ctx: u32) {
    let mut s = state.borrow_mut();
    if let Some(key) = s.waiting.remove(&ctx) {
        if let Some(lookup) = s.lookups.get_mut(&key) {
            lookup.waiters.retain(|w| *w != ctx);
        }
    }
    let orphaned: Vec<LookupKey> = s
        .lookups
        .iter()
        .filter(|(_, l)| l.owner == Some(ctx))
        .map(|(k, _)| k.clone())
        .collect();
    for key in orphaned {
        // Envoy cancels the owner's callouts; the root re-issues the lookup on its next tick.
        s.callouts.retain(|_, k| *k != key);
        if let LookupKey::Keys(issuer) = &key {
            s.keys.cancelled(issuer);
        }
        let empty = match s.lookups.get_mut(&key) {
            Some(lookup) => {
                lookup.owner = None;
                lookup.in_flight = false;
                lookup.waiters.is_empty()
            }
            None => false,
        };
        if empty {
            s.lookups.remove(&key);
        }
    }
}

/// Loads key sets other workers fetched (shared data), when they changed.
fn sync_shared_keys(state: &Shared) {
    let mut s = state.borrow_mut();
    let s = &mut *s;
    s.keys.sync_shared(&mut s.auth);
}
