//! device-ownership: only a device's owner, or whom the owner delegates, reads or writes the
//! entities of its device. The rules are `policy::ownership`'s (see its module docs and this
//! crate's README); this crate reads the request, runs the ownership lookups and claims as
//! callouts, rewrites create bodies and filters list responses.
//!
//! Callouts. A lookup of one entity in one source is shared: concurrent requests for the same
//! tenant+entity wait on one callout (`Lookup.waiters`). The stream that starts it makes the
//! call; on the answer every waiter is resumed through `proxy_set_effective_context`. If that
//! stream goes away first (Envoy cancels its callouts), the root re-issues the lookup on its
//! next tick. Zero headers, a non-2xx/404 status, a timeout or an unparsable answer is an
//! error: the waiting requests fail closed with 503. Errors are never cached.
//!
//! The filter decides on the body (creates, batches), so it needs Envoy's
//! `allow_on_headers_stop_iteration: true`; it holds headers and body until the decision.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::time::Duration;

use policy::access::RequestAccess;
use policy::enforcement::{summarize_accesses, Mode};
use policy::header_pairs::status_of;
use policy::log_text::{bounded, bounded_debug};
use policy::ngsi::{classify, NgsiRequest};
use policy::ownership::config::BrokerApi;
use policy::ownership::wire::{self, Endpoint, ListAnswer, ListFormat, Listed};
use policy::ownership::{scope, ScopeInput};
use policy::ownership::{EntityKey, Eval, Ownership, OwnershipConfig, Record, Resolve};
use policy::ownership::{SourceConfig, Verdict};
use policy::{Decision, DenyReason, Identity};
use proxy_glue::host;
use proxy_glue::{apply_decision, now_secs, send_deny, Counter, Decided, DecisionMetrics};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType};

const FILTER: &str = "device-ownership";

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_glue::install_panic_hook();
    proxy_wasm::set_root_context(|id| Box::new(Root { id, state: None }));
}}

struct Metrics {
    decisions: DecisionMetrics,
    cache_hits: Counter,
    cache_misses: Counter,
    callouts: Counter,
    callout_failures: Counter,
    claims: Counter,
    lists_filtered: Counter,
    list_removed: Counter,
    list_failed: Counter,
    /// A lookup answered 2xx with something that is not the entity looked up.
    lookup_invalid: Counter,
}

impl Metrics {
    fn define() -> Self {
        let c = |name: &str| Counter::define(&format!("device_ownership.{name}"));
        Metrics {
            decisions: DecisionMetrics::define("device_ownership"),
            cache_hits: c("cache.hit"),
            cache_misses: c("cache.miss"),
            callouts: c("callout.sent"),
            callout_failures: c("callout.failed"),
            claims: c("claim.sent"),
            lists_filtered: c("list.filtered"),
            list_removed: c("list.removed"),
            list_failed: c("list.failed"),
            lookup_invalid: c("lookup.invalid"),
        }
    }
}

/// One lookup: an entity in one remote source.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct LookupKey {
    key: EntityKey,
    source: usize,
    api: BrokerApi,
}

struct Lookup {
    /// The stream whose callout is in flight, or None when the root made it.
    owner: Option<u32>,
    in_flight: bool,
    waiters: Vec<u32>,
}

enum Purpose {
    Lookup(LookupKey),
    Claim { ctx: u32, key: EntityKey },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Collecting the request body.
    Request,
    /// Waiting for lookups or claims of the request.
    Deciding,
    /// Decided; the request went on (or was denied).
    Forwarded,
    /// Holding a list response to filter.
    Response,
    /// Waiting for lookups of listed entities.
    ResponseLookups,
    Done,
}

struct ListState {
    format: ListFormat,
    /// Attributes the filter added to the query, removed from the response.
    strip: Vec<String>,
    doc: Option<serde_json::Value>,
    listed: Listed,
    /// Per listed entity: provably out of scope by its type, passed as is.
    out_of_scope: Vec<bool>,
}

struct StreamState {
    phase: Phase,
    identity: Option<Identity>,
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    req: Option<RequestAccess>,
    endpoint: Option<Endpoint>,
    records: HashMap<EntityKey, Option<Record>>,
    pending: HashSet<LookupKey>,
    claims_pending: usize,
    failure: Option<DenyReason>,
    verdict: Option<Verdict>,
    new_body: Option<Vec<u8>>,
    list: Option<ListState>,
    invalidate: Vec<EntityKey>,
    /// An NGSI-LD request with its own JSON-LD context (types can't be scoped).
    ld_context: bool,
}

struct State {
    own: Ownership,
    metrics: Metrics,
    lookups: HashMap<LookupKey, Lookup>,
    callouts: HashMap<u32, Purpose>,
    streams: HashMap<u32, StreamState>,
    last_cache: policy::cache::CacheStats,
}

type Shared = Rc<RefCell<State>>;

struct Root {
    id: u32,
    state: Option<Shared>,
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, _: usize, _: usize, _: usize) {
        if let Some(state) = &self.state {
            handle_callout_response(state, self.id, token);
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(own) = proxy_glue::load_config::<OwnershipConfig, _>(FILTER, Ownership::new)
        else {
            return false;
        };
        let remote = own.can_record_owner();
        self.state = Some(Rc::new(RefCell::new(State {
            own,
            metrics: Metrics::define(),
            lookups: HashMap::new(),
            callouts: HashMap::new(),
            streams: HashMap::new(),
            last_cache: Default::default(),
        })));
        if remote {
            self.set_tick_period(Duration::from_secs(1));
        }
        true
    }

    fn on_tick(&mut self) {
        let Some(state) = self.state.clone() else {
            return;
        };
        // Lookups whose owning stream went away: the root asks again for the waiters.
        let orphans: Vec<LookupKey> = state
            .borrow()
            .lookups
            .iter()
            .filter(|(_, l)| !l.in_flight && !l.waiters.is_empty())
            .map(|(k, _)| k.clone())
            .collect();
        for lk in orphans {
            if !start_lookup(&state, &lk, None) {
                fail_lookup(&state, self.id, &lk, "cannot call the ownership source");
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            id: context_id,
            state: self.state.clone(),
            body_len: 0,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    id: u32,
    state: Option<Shared>,
    /// Bytes of request body buffered so far (read once, when it is complete).
    body_len: usize,
}

impl Context for Stream {
    fn on_http_call_response(&mut self, token: u32, _: usize, _: usize, _: usize) {
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
    fn on_http_request_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        let Some(state) = self.state.clone() else {
            send_deny(
                &DenyReason::Unavailable("filter not configured".into()),
                &[],
            );
            return Action::Pause;
        };
        let headers = {
            let s = state.borrow();
            proxy_glue::request_text_headers(FILTER, |name| s.own.reads_header(name))
        };
        let (headers, unreadable) = match headers {
            Ok(headers) => (headers, None),
            Err(reason) => (Vec::new(), Some(reason)),
        };
        let get = |name: &str| proxy_glue::first_header(&headers, name);
        let (method, path) = (get(":method"), get(":path"));
        let identity = match unreadable {
            Some(reason) => Err(reason),
            None => state
                .borrow()
                .own
                .config()
                .identity_headers
                .parse(&headers)
                .map_err(DenyReason::BadRequest),
        };
        let mut stream = StreamState {
            phase: Phase::Request,
            identity: None,
            method,
            path,
            headers: Vec::new(),
            body: Vec::new(),
            req: None,
            endpoint: None,
            records: HashMap::new(),
            pending: HashSet::new(),
            claims_pending: 0,
            failure: None,
            verdict: None,
            new_body: None,
            list: None,
            invalidate: Vec::new(),
            ld_context: false,
        };
        let identity = match identity {
            Ok(i) => i,
            Err(reason) => {
                state.borrow_mut().streams.insert(self.id, stream);
                return deny_early(&state, self.id, reason);
            }
        };
        stream.identity = identity;
        let max = state.borrow().own.config().max_body_bytes;
        let declared: Option<usize> = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.trim().parse().ok());
        stream.headers = headers;
        state.borrow_mut().streams.insert(self.id, stream);
        if declared.is_some_and(|n| n > max) {
            return deny_early(&state, self.id, too_large(max));
        }
        if end_of_stream {
            return decide(&state, self.id);
        }
        Action::Pause
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(state) = self.state.clone() else {
            return Action::Pause;
        };
        let phase = state.borrow().streams.get(&self.id).map(|s| s.phase);
        match phase {
            Some(Phase::Request) => {}
            // Still deciding, or denied (the local reply is on its way): nothing goes on.
            Some(Phase::Deciding | Phase::Done) => return Action::Pause,
            _ => return Action::Continue,
        }
        let max = state.borrow().own.config().max_body_bytes;
        if body_size > max {
            return deny_early(&state, self.id, too_large(max));
        }
        self.body_len = body_size;
        if !end_of_stream {
            return Action::Pause;
        }
        self.decide_with_body(&state)
    }

    fn on_http_request_trailers(&mut self, _trailers: usize) -> Action {
        let Some(state) = self.state.clone() else {
            return Action::Pause;
        };
        let phase = state.borrow().streams.get(&self.id).map(|s| s.phase);
        match phase {
            // The body ended with trailers: decide now (its size was checked chunk by chunk).
            Some(Phase::Request) => self.decide_with_body(&state),
            Some(Phase::Deciding | Phase::Done) => Action::Pause,
            _ => Action::Continue,
        }
    }

    fn on_http_response_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        let Some(state) = self.state.clone() else {
            return Action::Continue;
        };
        let (filtering, invalidate) = {
            let mut s = state.borrow_mut();
            let Some(stream) = s.streams.get_mut(&self.id) else {
                return Action::Continue;
            };
            (
                stream.list.is_some() && stream.phase == Phase::Forwarded,
                std::mem::take(&mut stream.invalidate),
            )
        };
        // The broker acted on creates/deletes/owner changes: forget what was cached.
        for key in &invalidate {
            state.borrow_mut().own.forget(key);
        }
        if !filtering {
            return Action::Continue;
        }
        let status = host::header_map(MapType::HttpResponseHeaders)
            .ok()
            .and_then(|h| status_of(&h));
        match wire::list_answer(status) {
            ListAnswer::Unreadable => {
                return fail_list(&state, self.id, "the answer has no readable :status")
            }
            ListAnswer::PassThrough => {
                if let Some(s) = state.borrow_mut().streams.get_mut(&self.id) {
                    s.list = None;
                }
                return Action::Continue;
            }
            // A 2xx without a body (204, or a 200 ending at the headers) lists nothing.
            ListAnswer::Filter if end_of_stream => {
                if let Some(s) = state.borrow_mut().streams.get_mut(&self.id) {
                    s.list = None;
                }
                return Action::Continue;
            }
            ListAnswer::Filter => {}
        }
        let _ = host::set_header(MapType::HttpResponseHeaders, "content-length", None);
        if let Some(s) = state.borrow_mut().streams.get_mut(&self.id) {
            s.phase = Phase::Response;
        }
        Action::Pause
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(state) = self.state.clone() else {
            return Action::Continue;
        };
        let phase = state.borrow().streams.get(&self.id).map(|s| s.phase);
        match phase {
            Some(Phase::Response) => {}
            Some(Phase::ResponseLookups) => return Action::Pause,
            _ => return Action::Continue,
        }
        let max = state.borrow().own.config().max_response_bytes;
        if body_size > max {
            return fail_list(&state, self.id, &format!("list response over {max} bytes"));
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = match host::read_buffer(BufferType::HttpResponseBody, 0, body_size) {
            Ok(body) => body.unwrap_or_default(),
            Err(status) => {
                return fail_list(&state, self.id, &format!("cannot read the list: {status}"))
            }
        };
        start_list(&state, self.id, &body)
    }
}

fn too_large(max: usize) -> DenyReason {
    DenyReason::PayloadTooLarge(format!("request body larger than {max} bytes"))
}

fn mode(state: &Shared) -> Mode {
    state.borrow().own.config().mode
}

/// Applies a decision for stream `ctx` (effective) with the shared conventions. Returns true
/// when the request may go on.
fn conclude(state: &Shared, ctx: u32, decision: &Decision) -> bool {
    let (identity, operation, entities) = {
        let s = state.borrow();
        let Some(stream) = s.streams.get(&ctx) else {
            return false;
        };
        let (op, ents) = match &stream.req {
            Some(r) => (r.operation.clone(), summarize_accesses(&r.accesses)),
            None => (
                format!("{} {}", stream.method, stream.path),
                "[]".to_string(),
            ),
        };
        (stream.identity.clone(), op, ents)
    };
    let metrics = state.borrow().metrics.decisions;
    let about = Decided {
        filter: FILTER,
        mode: mode(state),
        log_allows: state.borrow().own.config().log_allows,
        identity: identity.as_ref(),
        operation: &operation,
        entities: &entities,
        request_headers: None,
    };
    let go_on = apply_decision(&about, decision, &metrics);
    if let Some(s) = state.borrow_mut().streams.get_mut(&ctx) {
        s.phase = if go_on { Phase::Forwarded } else { Phase::Done };
    }
    go_on
}

/// A denial before classification (bad identity headers, body too large).
fn deny_early(state: &Shared, ctx: u32, reason: DenyReason) -> Action {
    if conclude(state, ctx, &Decision::Deny(reason)) {
        Action::Continue
    } else {
        Action::Pause
    }
}

/// Classifies the request of `ctx` (effective) and starts deciding it.
fn decide(state: &Shared, ctx: u32) -> Action {
    let classified = {
        let s = state.borrow();
        let Some(stream) = s.streams.get(&ctx) else {
            return Action::Pause;
        };
        let req = NgsiRequest {
            broker: s.own.config().broker,
            method: &stream.method,
            path: &stream.path,
            headers: &stream.headers,
            body: &stream.body,
        };
        classify(&req).and_then(|r| Endpoint::of(&stream.method, &stream.path).map(|e| (r, e)))
    };
    match classified {
        Ok((req, endpoint)) => {
            let out_of_scope = {
                let mut s = state.borrow_mut();
                let State { own, streams, .. } = &mut *s;
                let Some(stream) = streams.get_mut(&ctx) else {
                    return Action::Pause;
                };
                stream.ld_context =
                    scope::carries_ld_context(&stream.headers, &stream.path, &stream.body);
                let input = ScopeInput {
                    dialect: endpoint.dialect,
                    ld_context: stream.ld_context,
                };
                let why = own.out_of_scope(&req, input);
                stream.req = Some(req);
                stream.endpoint = Some(endpoint);
                stream.phase = Phase::Deciding;
                why
            };
            if let Some(why) = out_of_scope {
                // Not ownership's business: passed untouched, without a lookup.
                return done(state, ctx, &Decision::Allow(why));
            }
            advance(state, ctx)
        }
        Err(reason) => deny_early(state, ctx, reason),
    }
}

fn count_cache(state: &Shared) {
    let mut s = state.borrow_mut();
    let stats = s.own.cache_stats();
    s.metrics
        .cache_hits
        .add(stats.hits.saturating_sub(s.last_cache.hits));
    s.metrics
        .cache_misses
        .add(stats.misses.saturating_sub(s.last_cache.misses));
    s.last_cache = stats;
}

/// Evaluates the request of `ctx` with the records at hand; starts lookups for what is missing.
/// Returns Pause while something is pending.
fn advance(state: &Shared, ctx: u32) -> Action {
    let Some(now) = now_secs() else {
        return finish_request(
            state,
            ctx,
            deny_verdict(DenyReason::Unavailable("no clock".into())),
        );
    };
    loop {
        let eval = {
            let s = state.borrow();
            let Some(stream) = s.streams.get(&ctx) else {
                return Action::Pause;
            };
            if let Some(f) = &stream.failure {
                let f = f.clone();
                drop(s);
                return finish_request(state, ctx, deny_verdict(f));
            }
            let Some(req) = &stream.req else {
                return Action::Pause;
            };
            let list = stream.endpoint.as_ref().is_some_and(|e| e.list.is_some());
            s.own
                .evaluate(stream.identity.as_ref(), req, list, &stream.records)
        };
        match eval {
            Eval::Done(verdict) => return finish_request(state, ctx, verdict),
            Eval::Need(keys) => {
                let api = request_api(state, ctx);
                let mut waiting = false;
                for (key, fresh) in keys {
                    let resolved = state.borrow_mut().own.resolve(&key, 0, now, fresh);
                    count_cache(state);
                    match resolved {
                        Resolve::Known(r) => {
                            if let Some(s) = state.borrow_mut().streams.get_mut(&ctx) {
                                s.records.insert(key, r);
                            }
                        }
                        Resolve::Fetch(i) => {
                            let lk = LookupKey {
                                key,
                                source: i,
                                api,
                            };
                            if !join_lookup(state, ctx, lk) {
                                return finish_request(
                                    state,
                                    ctx,
                                    deny_verdict(DenyReason::Unavailable(
                                        "cannot reach the ownership source".into(),
                                    )),
                                );
                            }
                            waiting = true;
                        }
                    }
                }
                if waiting {
                    return Action::Pause;
                }
            }
        }
    }
}

fn deny_verdict(reason: DenyReason) -> Verdict {
    Verdict {
        decision: Decision::Deny(reason),
        new_entities: Vec::new(),
        invalidate: Vec::new(),
        filter_list: false,
    }
}

fn request_api(state: &Shared, ctx: u32) -> BrokerApi {
    let s = state.borrow();
    let configured = match s.own.broker() {
        Some((_, SourceConfig::Broker { api, .. })) => *api,
        _ => BrokerApi::Auto,
    };
    let dialect = s
        .streams
        .get(&ctx)
        .and_then(|st| st.endpoint.as_ref())
        .map(|e| e.dialect)
        .unwrap_or(wire::Dialect::V2);
    wire::broker_api(configured, dialect)
}

/// Makes `ctx` wait for lookup `lk`, starting its callout if none is in flight. False if the
/// callout could not be made.
fn join_lookup(state: &Shared, ctx: u32, lk: LookupKey) -> bool {
    let in_flight = {
        let mut s = state.borrow_mut();
        if let Some(stream) = s.streams.get_mut(&ctx) {
            stream.pending.insert(lk.clone());
        }
        let lookup = s.lookups.entry(lk.clone()).or_insert(Lookup {
            owner: None,
            in_flight: false,
            waiters: Vec::new(),
        });
        if !lookup.waiters.contains(&ctx) {
            lookup.waiters.push(ctx);
        }
        lookup.in_flight
    };
    if in_flight {
        return true;
    }
    if start_lookup(state, &lk, Some(ctx)) {
        return true;
    }
    let mut s = state.borrow_mut();
    if let Some(l) = s.lookups.get_mut(&lk) {
        l.waiters.retain(|w| *w != ctx);
        if l.waiters.is_empty() {
            s.lookups.remove(&lk);
        }
    }
    if let Some(stream) = s.streams.get_mut(&ctx) {
        stream.pending.remove(&lk);
    }
    false
}

fn dispatch(
    state: &Shared,
    cluster: &str,
    headers: Vec<(&str, &str)>,
    body: Option<&[u8]>,
    timeout_ms: u64,
) -> Option<u32> {
    match hostcalls::dispatch_http_call(
        cluster,
        headers,
        body,
        vec![],
        Duration::from_millis(timeout_ms),
    ) {
        Ok(token) => {
            state.borrow().metrics.callouts.inc();
            Some(token)
        }
        Err(status) => {
            state.borrow().metrics.callout_failures.inc();
            log::error!("{FILTER}: cannot call cluster {cluster}: {status:?}");
            None
        }
    }
}

/// Sends the callout of lookup `lk` from the effective context (`owner`: that stream, or None
/// for the root).
fn start_lookup(state: &Shared, lk: &LookupKey, owner: Option<u32>) -> bool {
    let (source, owner_attr, deleg_attr) = {
        let s = state.borrow();
        let c = s.own.config();
        let Some(source) = c.sources.get(lk.source).cloned() else {
            return false;
        };
        (
            source,
            c.owner_attribute.clone(),
            c.delegations_attribute.clone(),
        )
    };
    let token = match &source {
        SourceConfig::Broker {
            cluster,
            authority,
            timeout_ms,
            ..
        } => {
            let (path, extra) = wire::broker_lookup(lk.api, &lk.key, &owner_attr, &deleg_attr);
            let authority = authority.clone().unwrap_or_else(|| cluster.clone());
            let mut headers = vec![
                (":method", "GET"),
                (":path", path.as_str()),
                (":authority", authority.as_str()),
            ];
            headers.extend(extra.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            dispatch(state, cluster, headers, None, *timeout_ms)
        }
        SourceConfig::Registry {
            cluster,
            authority,
            lookup_path,
            timeout_ms,
            ..
        } => {
            let body = wire::registry_lookup_body(&lk.key);
            let authority = authority.clone().unwrap_or_else(|| cluster.clone());
            let headers = vec![
                (":method", "POST"),
                (":path", lookup_path.as_str()),
                (":authority", authority.as_str()),
                ("content-type", "application/json"),
                ("accept", "application/json"),
            ];
            dispatch(state, cluster, headers, Some(body.as_bytes()), *timeout_ms)
        }
        SourceConfig::Static { .. } => None,
    };
    let Some(token) = token else {
        return false;
    };
    let mut s = state.borrow_mut();
    s.callouts.insert(token, Purpose::Lookup(lk.clone()));
    if let Some(l) = s.lookups.get_mut(lk) {
        l.owner = owner;
        l.in_flight = true;
    }
    true
}

fn handle_callout_response(state: &Shared, current: u32, token: u32) {
    let Some(purpose) = state.borrow_mut().callouts.remove(&token) else {
        return;
    };
    let (status, body) = proxy_glue::callout_answer(FILTER);
    if !(200..300).contains(&status) && status != 404 {
        state.borrow().metrics.callout_failures.inc();
    }
    match purpose {
        Purpose::Lookup(lk) => lookup_answered(state, current, lk, status, &body),
        Purpose::Claim { ctx, key } => {
            let outcome = wire::claim_outcome(status, &key);
            on_stream(current, ctx, || claim_answered(state, ctx, key, outcome));
        }
    }
}

fn lookup_answered(state: &Shared, current: u32, lk: LookupKey, status: u32, body: &[u8]) {
    let parsed = {
        let s = state.borrow();
        let c = s.own.config();
        match c.sources.get(lk.source) {
            Some(SourceConfig::Broker { .. }) => wire::parse_broker_lookup(
                lk.api,
                &lk.key.id,
                status,
                body,
                &c.owner_attribute,
                &c.delegations_attribute,
            ),
            Some(SourceConfig::Registry { .. }) => wire::parse_registry_lookup(status, body),
            _ => Err("not a remote source".into()),
        }
    };
    let record = match parsed {
        Ok(r) => r,
        Err(e) => {
            if (200..300).contains(&status) {
                // Non-2xx answers are counted as callout failures already.
                state.borrow().metrics.lookup_invalid.inc();
            }
            log::warn!(
                "{FILTER}: ownership lookup of {} in sources[{}] failed: {}",
                bounded_debug(&lk.key.to_string()),
                lk.source,
                bounded(&e.to_string())
            );
            return fail_lookup(state, current, &lk, "the ownership source failed");
        }
    };
    let now = now_secs().unwrap_or(0);
    let next = match record {
        Some(r) => Resolve::Known(Some(r)),
        None => state
            .borrow_mut()
            .own
            .resolve(&lk.key, lk.source + 1, now, true),
    };
    let waiters = take_waiters(state, &lk);
    match next {
        Resolve::Known(r) => {
            state.borrow_mut().own.remember(&lk.key, &r, now);
            for ctx in waiters {
                on_stream(current, ctx, || {
                    if let Some(s) = state.borrow_mut().streams.get_mut(&ctx) {
                        s.pending.remove(&lk);
                        s.records.insert(lk.key.clone(), r.clone());
                    }
                    resume_if_ready(state, ctx);
                });
            }
        }
        Resolve::Fetch(i) => {
            let next_lk = LookupKey {
                key: lk.key.clone(),
                source: i,
                api: lk.api,
            };
            for ctx in waiters {
                on_stream(current, ctx, || {
                    if let Some(s) = state.borrow_mut().streams.get_mut(&ctx) {
                        s.pending.remove(&lk);
                    }
                    if !join_lookup(state, ctx, next_lk.clone()) {
                        if let Some(s) = state.borrow_mut().streams.get_mut(&ctx) {
                            s.failure = Some(DenyReason::Unavailable(
                                "cannot reach the ownership source".into(),
                            ));
                        }
                        resume_if_ready(state, ctx);
                    }
                });
            }
        }
    }
}

/// Every waiter of `lk` fails closed (503).
fn fail_lookup(state: &Shared, current: u32, lk: &LookupKey, why: &str) {
    for ctx in take_waiters(state, lk) {
        on_stream(current, ctx, || {
            if let Some(s) = state.borrow_mut().streams.get_mut(&ctx) {
                s.pending.remove(lk);
                if s.failure.is_none() {
                    s.failure = Some(DenyReason::Unavailable(why.to_string()));
                }
            }
            resume_if_ready(state, ctx);
        });
    }
}

/// Continues stream `ctx` (effective) once nothing it waits for is pending.
fn resume_if_ready(state: &Shared, ctx: u32) {
    let phase = {
        let s = state.borrow();
        let Some(st) = s.streams.get(&ctx) else {
            return;
        };
        if !st.pending.is_empty() || st.claims_pending > 0 {
            return;
        }
        st.phase
    };
    match phase {
        Phase::Deciding => {
            let claims_done = state
                .borrow()
                .streams
                .get(&ctx)
                .is_some_and(|s| s.verdict.is_some());
            let action = if claims_done {
                after_claims(state, ctx)
            } else {
                advance(state, ctx)
            };
            if action == Action::Continue {
                if let Err(status) = host::resume_request() {
                    log::warn!("{FILTER}: ctx={ctx} cannot resume the request: {status}");
                }
            }
        }
        Phase::ResponseLookups if continue_list(state, ctx) == Action::Continue => {
            if let Err(status) = host::resume_response() {
                log::warn!("{FILTER}: ctx={ctx} cannot resume the response: {status}");
            }
        }
        _ => {}
    }
}

/// A decision was reached for the request of `ctx` (effective).
fn finish_request(state: &Shared, ctx: u32, verdict: Verdict) -> Action {
    let Decision::Allow(_) = &verdict.decision else {
        return done(state, ctx, &verdict.decision);
    };
    if verdict.new_entities.is_empty() {
        if let Some(s) = state.borrow_mut().streams.get_mut(&ctx) {
            s.verdict = Some(verdict);
        }
        return after_claims(state, ctx);
    }
    // The caller becomes the owner: check and rewrite the body, then claim.
    let prepared = prepare_create(state, ctx, &verdict);
    if let Err(reason) = prepared {
        return done(state, ctx, &Decision::Deny(reason));
    }
    let registry = state.borrow().own.registry().map(|(_, s)| s.clone());
    let claims = match registry {
        Some(SourceConfig::Registry {
            cluster,
            authority,
            claim_path,
            timeout_ms,
            ..
        }) => {
            let mut sent = 0;
            for key in &verdict.new_entities {
                let body = {
                    let s = state.borrow();
                    let Some(st) = s.streams.get(&ctx) else {
                        return Action::Pause;
                    };
                    let kind = st.endpoint.as_ref().and_then(|e| e.create_body);
                    let ty = kind.and_then(|k| wire::created_type(k, &st.body, &key.id));
                    let sp = st
                        .req
                        .as_ref()
                        .and_then(|r| r.accesses.first())
                        .and_then(|a| a.tenant.service_paths.first().cloned())
                        .unwrap_or_else(|| "/".into());
                    let caller = st
                        .identity
                        .as_ref()
                        .map(|i| i.subject.clone())
                        .unwrap_or_default();
                    wire::registry_claim_body(key, ty.as_deref(), &sp, &caller)
                };
                let authority = authority.clone().unwrap_or_else(|| cluster.clone());
                let headers = vec![
                    (":method", "POST"),
                    (":path", claim_path.as_str()),
                    (":authority", authority.as_str()),
                    ("content-type", "application/json"),
                ];
                let Some(token) =
                    dispatch(state, &cluster, headers, Some(body.as_bytes()), timeout_ms)
                else {
                    return done(
                        state,
                        ctx,
                        &Decision::Deny(DenyReason::Unavailable(
                            "cannot reach the ownership registry".into(),
                        )),
                    );
                };
                state.borrow().metrics.claims.inc();
                state.borrow_mut().callouts.insert(
                    token,
                    Purpose::Claim {
                        ctx,
                        key: key.clone(),
                    },
                );
                sent += 1;
            }
            sent
        }
        _ => 0,
    };
    if let Some(s) = state.borrow_mut().streams.get_mut(&ctx) {
        s.verdict = Some(verdict);
        s.claims_pending = claims;
    }
    if claims > 0 {
        return Action::Pause;
    }
    after_claims(state, ctx)
}

/// Checks the owner attribute in a create body and injects it (broker source).
fn prepare_create(state: &Shared, ctx: u32, verdict: &Verdict) -> Result<(), DenyReason> {
    let mut s = state.borrow_mut();
    let has_broker = s.own.broker().is_some();
    let owner_attr = s.own.config().owner_attribute.clone();
    let Some(st) = s.streams.get_mut(&ctx) else {
        return Ok(());
    };
    let Some(endpoint) = st.endpoint.clone() else {
        return Ok(());
    };
    let Some(kind) = endpoint.create_body else {
        return Ok(());
    };
    let caller = st
        .identity
        .as_ref()
        .map(|i| i.subject.clone())
        .ok_or_else(|| DenyReason::Forbidden("anonymous create".into()))?;
    let ids: HashSet<String> = verdict.new_entities.iter().map(|k| k.id.clone()).collect();
    let rewritten = wire::inject_owner(
        kind,
        &st.body,
        endpoint.key_values,
        &owner_attr,
        &caller,
        &ids,
    )?;
    if has_broker {
        st.new_body = rewritten;
    }
    Ok(())
}

fn claim_answered(state: &Shared, ctx: u32, key: EntityKey, outcome: Result<(), DenyReason>) {
    let now = now_secs().unwrap_or(0);
    {
        let mut s = state.borrow_mut();
        let caller = s
            .streams
            .get(&ctx)
            .and_then(|st| st.identity.as_ref().map(|i| i.subject.clone()));
        match (&outcome, caller) {
            (Ok(()), Some(caller)) => s.own.remember(&key, &Some(Record::owned_by(caller)), now),
            _ => s.own.forget(&key),
        }
        let Some(st) = s.streams.get_mut(&ctx) else {
            return;
        };
        st.claims_pending = st.claims_pending.saturating_sub(1);
        if let Err(reason) = outcome {
            log::warn!(
                "{FILTER}: claim of {} refused: {}",
                bounded_debug(&key.to_string()),
                bounded(&reason.to_string())
            );
            // A conflict (403) wins over an unavailable registry: it is definite.
            let replace = matches!(
                (&st.failure, &reason),
                (None, _) | (Some(DenyReason::Unavailable(_)), DenyReason::Forbidden(_))
            );
            if replace {
                st.failure = Some(reason);
            }
        }
    }
    resume_if_ready(state, ctx);
}

/// The decision is final (claims done): apply it and prepare the forwarded request.
fn after_claims(state: &Shared, ctx: u32) -> Action {
    let (verdict, failure) = {
        let mut s = state.borrow_mut();
        let Some(st) = s.streams.get_mut(&ctx) else {
            return Action::Pause;
        };
        (st.verdict.take(), st.failure.take())
    };
    let Some(verdict) = verdict else {
        return Action::Pause;
    };
    if let Some(reason) = failure {
        return done(state, ctx, &Decision::Deny(reason));
    }
    if !conclude(state, ctx, &verdict.decision) {
        return Action::Pause;
    }
    let shadow = mode(state) == Mode::Shadow;
    let (new_body, old_len) = {
        let mut s = state.borrow_mut();
        for key in &verdict.invalidate {
            s.own.forget(key);
        }
        let Some(st) = s.streams.get_mut(&ctx) else {
            return Action::Continue;
        };
        st.invalidate = verdict.invalidate.clone();
        (st.new_body.take(), st.body.len())
    };
    let mut body = new_body;
    if verdict.filter_list && !shadow {
        if let Err(reason) = prepare_list(state, ctx, &mut body) {
            send_deny(&reason, &[]);
            return Action::Pause;
        }
    }
    if let Some(b) = body {
        let ok = host::write_buffer(BufferType::HttpRequestBody, 0, old_len, &b).is_ok();
        if !ok {
            log::error!("{FILTER}: cannot rewrite the request body");
            send_deny(
                &DenyReason::Unavailable("cannot rewrite the request".into()),
                &[],
            );
            return Action::Pause;
        }
        let has_length = host::header_map(MapType::HttpRequestHeaders)
            .is_ok_and(|h| h.first("content-length").is_some());
        if has_length {
            let _ = host::set_header(
                MapType::HttpRequestHeaders,
                "content-length",
                Some(&b.len().to_string()),
            );
        }
    }
    Action::Continue
}

/// Sets up response filtering; with the broker source, widens an attribute restriction so
/// the owner attributes come back (and are stripped again).
fn prepare_list(state: &Shared, ctx: u32, body: &mut Option<Vec<u8>>) -> Result<(), DenyReason> {
    let mut s = state.borrow_mut();
    let has_broker = s.own.broker().is_some();
    let names = [
        s.own.config().owner_attribute.clone(),
        s.own.config().delegations_attribute.clone(),
    ];
    let Some(st) = s.streams.get_mut(&ctx) else {
        return Ok(());
    };
    let Some((format, attrs_in)) = st.endpoint.as_ref().and_then(|e| e.list) else {
        return Ok(());
    };
    let mut strip = Vec::new();
    if has_broker {
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        match attrs_in {
            wire::AttrsIn::Query => {
                if let Some((path, added)) = wire::widen_attrs_path(&st.path, &names) {
                    host::set_header(MapType::HttpRequestHeaders, ":path", Some(&path)).map_err(
                        |_| DenyReason::Unavailable("cannot rewrite the request".into()),
                    )?;
                    strip = added;
                }
            }
            wire::AttrsIn::Body(member) => {
                if let Some((b, added)) = wire::widen_attrs_body(&st.body, member, &names) {
                    *body = Some(b);
                    strip = added;
                }
            }
        }
    }
    st.list = Some(ListState {
        format,
        strip,
        doc: None,
        listed: Vec::new(),
        out_of_scope: Vec::new(),
    });
    Ok(())
}

/// A final decision for `ctx`'s request (deny or allow without more work).
fn done(state: &Shared, ctx: u32, decision: &Decision) -> Action {
    if conclude(state, ctx, decision) {
        Action::Continue
    } else {
        Action::Pause
    }
}

// ---- list responses ----

fn fail_list(state: &Shared, ctx: u32, why: &str) -> Action {
    log::warn!(
        "{FILTER}: ctx={ctx} cannot filter the list response: {}",
        bounded(why)
    );
    state.borrow().metrics.list_failed.inc();
    if let Some(s) = state.borrow_mut().streams.get_mut(&ctx) {
        s.phase = Phase::Done;
    }
    send_deny(
        &DenyReason::Unavailable("the response could not be checked".into()),
        &[],
    );
    Action::Pause
}

fn start_list(state: &Shared, ctx: u32, body: &[u8]) -> Action {
    let parsed = {
        let s = state.borrow();
        let c = s.own.config();
        let Some(format) = s
            .streams
            .get(&ctx)
            .and_then(|st| st.list.as_ref())
            .map(|l| l.format)
        else {
            return Action::Continue;
        };
        wire::list_entities(format, body, &c.owner_attribute, &c.delegations_attribute)
    };
    let (doc, listed) = match parsed {
        Ok(p) => p,
        Err(e) => return fail_list(state, ctx, &e),
    };
    {
        let mut s = state.borrow_mut();
        let State { own, streams, .. } = &mut *s;
        if let Some(st) = streams.get_mut(&ctx) {
            if let Some(l) = st.list.as_mut() {
                l.out_of_scope = wire::list_items(l.format, &doc)
                    .map(|items| {
                        items
                            .into_iter()
                            .map(|e| own.listed_out_of_scope(l.format, e, st.ld_context))
                            .collect()
                    })
                    .unwrap_or_default();
                l.doc = Some(doc);
                l.listed = listed;
            }
            st.phase = Phase::ResponseLookups;
        }
    }
    continue_list(state, ctx)
}

/// Resolves every listed entity (registry lookups as needed), then filters the response.
fn continue_list(state: &Shared, ctx: u32) -> Action {
    let Some(now) = now_secs() else {
        return fail_list(state, ctx, "no clock");
    };
    let failure = state
        .borrow_mut()
        .streams
        .get_mut(&ctx)
        .and_then(|s| s.failure.take());
    if let Some(f) = failure {
        return fail_list(state, ctx, &f.to_string());
    }
    let (service, listed, out_of_scope) = {
        let s = state.borrow();
        let Some(st) = s.streams.get(&ctx) else {
            return Action::Pause;
        };
        let service = st
            .req
            .as_ref()
            .and_then(|r| r.accesses.first())
            .map(|a| a.tenant.service.clone())
            .unwrap_or_default();
        let (listed, out_of_scope): (Listed, Vec<bool>) = st
            .list
            .as_ref()
            .map(|l| (l.listed.clone(), l.out_of_scope.clone()))
            .unwrap_or_default();
        (service, listed, out_of_scope)
    };
    let max = state.borrow().own.config().max_list_lookups;
    let mut to_fetch: Vec<LookupKey> = Vec::new();
    for (i, (id, embedded)) in listed.iter().enumerate() {
        if out_of_scope.get(i).copied().unwrap_or(false) {
            // Passed as is: no record needed.
            continue;
        }
        let key = EntityKey::new(service.clone(), id.clone());
        let known = state
            .borrow()
            .streams
            .get(&ctx)
            .is_some_and(|s| s.records.contains_key(&key));
        if known {
            continue;
        }
        let step = state
            .borrow_mut()
            .own
            .resolve_listed(&key, embedded, 0, now);
        count_cache(state);
        match step {
            Ok(Resolve::Known(r)) => {
                if let Some(s) = state.borrow_mut().streams.get_mut(&ctx) {
                    s.records.insert(key, r);
                }
            }
            Ok(Resolve::Fetch(i)) => {
                let lk = LookupKey {
                    key,
                    source: i,
                    api: BrokerApi::Auto,
                };
                if !to_fetch.contains(&lk) {
                    to_fetch.push(lk);
                }
            }
            Err(e) => return fail_list(state, ctx, &format!("entity {id:?}: {e}")),
        }
    }
    if to_fetch.len() > max {
        return fail_list(
            state,
            ctx,
            &format!(
                "{} lookups needed, more than max_list_lookups {max}",
                to_fetch.len()
            ),
        );
    }
    if !to_fetch.is_empty() {
        for lk in to_fetch {
            if !join_lookup(state, ctx, lk) {
                return fail_list(state, ctx, "cannot reach the ownership source");
            }
        }
        return Action::Pause;
    }
    finish_list(state, ctx, &service)
}

fn finish_list(state: &Shared, ctx: u32, service: &str) -> Action {
    let result = {
        let mut s = state.borrow_mut();
        let Some(st) = s.streams.get_mut(&ctx) else {
            return Action::Continue;
        };
        st.phase = Phase::Done;
        let Some(list) = st.list.take() else {
            return Action::Continue;
        };
        let keep: Vec<bool> = list
            .listed
            .iter()
            .enumerate()
            .map(|(i, (id, _))| {
                list.out_of_scope.get(i).copied().unwrap_or(false)
                    || st
                        .records
                        .get(&EntityKey::new(service, id.clone()))
                        .and_then(Option::as_ref)
                        .is_some_and(|r| r.read_by(st.identity.as_ref()).is_some())
            })
            .collect();
        let total = keep.len();
        list.doc
            .ok_or_else(|| "no document".to_string())
            .and_then(|doc| wire::filter_list(list.format, doc, &keep, &list.strip))
            .map(|(body, kept)| (body, kept, total))
    };
    let (body, kept, total) = match result {
        Ok(r) => r,
        Err(e) => return fail_list(state, ctx, &e),
    };
    let response_headers = host::header_map(MapType::HttpResponseHeaders).unwrap_or_default();
    for header in ["fiware-total-count", "ngsild-results-count"] {
        // A count that is not text can't be a number: it is dropped like an unparsable one.
        if let Some(v) = response_headers.first(header) {
            let v = std::str::from_utf8(v).unwrap_or("");
            let new = wire::filtered_count(Some(v), total, kept);
            let _ = host::set_header(MapType::HttpResponseHeaders, header, new.as_deref());
        }
    }
    let old = host::read_buffer(BufferType::HttpResponseBody, 0, usize::MAX)
        .ok()
        .flatten()
        .map_or(0, |b| b.len());
    if host::write_buffer(BufferType::HttpResponseBody, 0, old, &body).is_err() {
        return fail_list(state, ctx, "cannot rewrite the response");
    }
    {
        let s = state.borrow();
        s.metrics.lists_filtered.inc();
        s.metrics.list_removed.add((total - kept) as u64);
    }
    log::info!("{FILTER}: ctx={ctx} list filtered: kept {kept} of {total} entities");
    Action::Continue
}

// ---- bookkeeping ----

/// Ends a lookup and returns its waiters.
fn take_waiters(state: &Shared, lk: &LookupKey) -> Vec<u32> {
    state
        .borrow_mut()
        .lookups
        .remove(lk)
        .map(|l| l.waiters)
        .unwrap_or_default()
}

/// Runs `f` with `ctx` as the effective context, then restores `current`. A
/// stream that no longer exists is skipped.
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
    if let Some(st) = s.streams.remove(&ctx) {
        for key in &st.invalidate {
            s.own.forget(key);
        }
        for lk in st.pending {
            if let Some(l) = s.lookups.get_mut(&lk) {
                l.waiters.retain(|w| *w != ctx);
            }
        }
    }
    s.callouts
        .retain(|_, p| !matches!(p, Purpose::Claim { ctx: c, .. } if *c == ctx));
    let orphaned: Vec<LookupKey> = s
        .lookups
        .iter()
        .filter(|(_, l)| l.owner == Some(ctx) && l.in_flight)
        .map(|(k, _)| k.clone())
        .collect();
    for lk in orphaned {
        // Envoy cancels the owner's callouts; the root re-issues the lookup on its next tick.
        s.callouts
            .retain(|_, p| !matches!(p, Purpose::Lookup(k) if *k == lk));
        let empty = match s.lookups.get_mut(&lk) {
            Some(l) => {
                l.owner = None;
                l.in_flight = false;
                l.waiters.is_empty()
            }
            None => false,
        };
        if empty {
            s.lookups.remove(&lk);
        }
    }
    // Lookups nobody waits for any more and that are not in flight.
    s.lookups
        .retain(|_, l| l.in_flight || !l.waiters.is_empty());
}

impl Stream {
    /// Reads the whole buffered request body (once: copying it per chunk would be quadratic)
    /// and decides.
    fn decide_with_body(&self, state: &Shared) -> Action {
        let body = match host::read_buffer(BufferType::HttpRequestBody, 0, self.body_len) {
            Ok(body) => body.unwrap_or_default(),
            Err(status) => {
                log::error!("{FILTER}: cannot read the request body: {status}");
                let reason = DenyReason::Unavailable("the request body could not be read".into());
                return deny_early(state, self.id, reason);
            }
        };
        if let Some(s) = state.borrow_mut().streams.get_mut(&self.id) {
            s.body = body;
        }
        decide(state, self.id)
    }
}
