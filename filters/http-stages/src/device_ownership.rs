//! The device-ownership stage: only a device's owner, or whom the owner delegates, reads or
//! writes the entities of its device. The decisions are `policy::ownership`'s (the decision
//! table, the source calls and their answers, create bodies, list filtering); this stage reads
//! the request, sends the lookups and claims the engine asks for, and executes the outcome.
//!
//! Request. The stage decides on the whole body (creates, batches): the driver holds the
//! request until it arrived, up to `max_body_bytes` (413 beyond). Envoy must run the filter
//! with `allow_on_headers_stop_iteration: true`.
//!
//! Callouts. A lookup of one entity in one source is one [`Lookups`] entry: concurrent
//! requests for the same tenant+entity wait on one callout, the driver resumes every waiter on
//! the answer, and a lookup whose owning stream went away is re-issued from the root on the
//! next tick. When a source does not know the entity, each waiter asks the next source from its
//! own context when the driver resumes it. Zero headers, a non-2xx/404 status, a timeout or an
//! unparsable answer is an error: the waiting requests fail closed with 503 (never cached).
//! Claims (registry) are per request: the request waits for all of them.
//!
//! Response. A list request the caller may make goes upstream with its attribute restriction
//! widened (broker source) and its answer is held (up to `max_response_bytes`), filtered to
//! what the caller may read (registry lookups as needed, at most `max_list_lookups`), count
//! headers corrected; an answer that can't be filtered is replaced by 503. An answer filtering
//! leaves as it is goes as it came (no body or header written), and a list the caller may
//! read in full (ids it may each read: `Ownership::settle_list`) is not held at all. The
//! cached records of entities a request created, deleted or re-owned are dropped when its
//! answer arrives.

use std::collections::{HashMap, HashSet};

use policy::access::RequestAccess;
use policy::client_credentials::{Fetched, TokenKeeper, TokenNeed};
use policy::enforcement::Mode;
use policy::log_text::{bounded, bounded_debug};
use policy::ngsi::memo::ClassifyMemo;
use policy::ngsi::NgsiRequest;
use policy::ownership::config::BrokerApi;
use policy::ownership::wire::{self, Endpoint, ListAnswer};
use policy::ownership::{
    graver, scope, EntityKey, Eval, ListFilter, ListPlan, Lookup, Ownership, OwnershipConfig,
    Record, Resolve, ScopeInput, Verdict,
};
use policy::upstream::HttpCall;
use policy::{Decision, DenyReason, Identity};

use crate::registry_token::{
    self, adopt_shared, init_shared, send_token_request, sync_shared, token_answered, TokenCounters,
};
use proxy_glue::{now_secs, record_decision, Counter, Decided, DecisionMetrics, Entities};

use crate::{ByStream, Caller, Request, Response, Stage, Step};
use policy::lookups::Lookups;

pub const NAME: &str = "device-ownership";

/// Bodiless requests whose classification the stage remembers (per VM).
const CLASSIFY_MEMO_ENTRIES: usize = 1024;

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
    /// Access tokens fetched for the registry's calls (client credentials), and failed fetches.
    registry_token: TokenCounters,
}

impl Metrics {
    fn define() -> Self {
        let c = |name: &str| Counter::define(&format!("device_ownership.{name}"));
        let (callouts, callout_failures) = (c("callout.sent"), c("callout.failed"));
        Metrics {
            decisions: DecisionMetrics::define("device_ownership"),
            cache_hits: c("cache.hit"),
            cache_misses: c("cache.miss"),
            callouts,
            callout_failures,
            claims: c("claim.sent"),
            lists_filtered: c("list.filtered"),
            list_removed: c("list.removed"),
            list_failed: c("list.failed"),
            lookup_invalid: c("lookup.invalid"),
            registry_token: TokenCounters {
                fetched: c("registry_token.fetched"),
                failed: c("registry_token.failed"),
                shared: c("registry_token.shared"),
                callouts,
                callout_failures,
            },
        }
    }
}

/// What a callout in flight is for.
enum Purpose {
    Lookup(Lookup),
    Claim {
        ctx: u32,
        key: EntityKey,
    },
    /// The registry's access token, from the IdP.
    Token,
}

/// What the stage keeps of one stream between callbacks.
#[derive(Default)]
struct StreamState {
    identity: Option<Identity>,
    method: String,
    path: String,
    access: Option<RequestAccess>,
    endpoint: Option<Endpoint>,
    /// An NGSI-LD request with its own JSON-LD context (types can't be scoped).
    ld_context: bool,
    records: HashMap<EntityKey, Option<Record>>,
    /// Lookups this stream waits for.
    pending: HashSet<Lookup>,
    /// Lookups to join from this stream's context when it resumes (the next source of an
    /// entity the previous source did not know, or a registry lookup that waited for its
    /// access token).
    deferred: Vec<Lookup>,
    /// It waits for the registry's access token.
    awaiting_token: bool,
    claims_pending: usize,
    failure: Option<DenyReason>,
    /// An allowed verdict waiting for its claims.
    verdict: Option<Verdict>,
    /// The create body to send upstream once the claims are done.
    new_body: Option<Vec<u8>>,
    /// The list answer to filter (request allowed in enforce mode).
    plan: Option<ListPlan>,
    /// The list answer being filtered.
    list: Option<ListFilter>,
    /// Cached records to drop when the answer arrives (the broker acted on them).
    invalidate: Vec<EntityKey>,
}

impl StreamState {
    /// Nothing is in flight for it: the driver may resume it.
    fn settled(&self) -> bool {
        self.pending.is_empty() && self.claims_pending == 0 && !self.awaiting_token
    }

    /// The tenant of a list request.
    fn service(&self) -> String {
        self.access
            .as_ref()
            .and_then(|r| r.accesses.first())
            .map(|a| a.tenant.service.clone())
            .unwrap_or_default()
    }
}

pub struct DeviceOwnershipStage {
    own: Ownership,
    metrics: Metrics,
    lookups: Lookups<Lookup>,
    callouts: HashMap<u32, Purpose>,
    streams: ByStream<StreamState>,
    /// Bodiless requests seen before are not classified again.
    classified: ClassifyMemo,
    last_cache: policy::cache::CacheStats,
    /// The registry's access token (client credentials): streams wait for it, and lookups
    /// are made again after a 401 as it says.
    registry_token: Option<TokenKeeper<u32, Lookup>>,
}

/// Whether a call to a source may go now as far as the registry's token is concerned.
enum TokenWait {
    /// The source wants no token, or one is at hand.
    Ready,
    /// The stream waits for the token.
    Waiting,
    /// The token request could not be sent.
    Unreachable,
}

fn deny_verdict(reason: DenyReason) -> Verdict {
    Verdict {
        decision: Decision::Deny(reason),
        new_entities: Vec::new(),
        invalidate: Vec::new(),
        filter_list: false,
    }
}

fn unavailable(why: &str) -> DenyReason {
    DenyReason::Unavailable(why.into())
}

impl DeviceOwnershipStage {
    /// The stage of the separate device-ownership filter, from its plugin configuration.
    pub fn from_plugin_config() -> Option<Self> {
        proxy_glue::load_config::<OwnershipConfig, _>(NAME, Self::new)
    }

    /// Builds the stage from a parsed configuration, with the environment variables it names
    /// read from the VM's environment (once, here, at configure time).
    pub fn new(mut config: OwnershipConfig) -> Result<Self, String> {
        config.read_environment(&proxy_glue::env_var);
        Ownership::new(config).map(Self::with)
    }

    fn with(own: Ownership) -> Self {
        let registry_token = own
            .registry()
            .and_then(|(source, _)| own.source_auth(source))
            .map(|grant| TokenKeeper::new(grant.clone()));
        if let Some(keeper) = &registry_token {
            init_shared(keeper);
        }
        DeviceOwnershipStage {
            own,
            metrics: Metrics::define(),
            lookups: Lookups::default(),
            callouts: HashMap::new(),
            streams: ByStream::default(),
            classified: ClassifyMemo::new(CLASSIFY_MEMO_ENTRIES),
            last_cache: Default::default(),
            registry_token,
        }
    }

    fn stream(&mut self, ctx: u32) -> &mut StreamState {
        self.streams.entry(ctx).or_default()
    }

    /// Logs and counts a decision on `req`'s stream (the effective context); Err: the request
    /// must stop with this client-facing reason (a denial in enforce mode).
    fn conclude(&self, req: &Request, decision: &Decision) -> Result<(), DenyReason> {
        let st = self.streams.get(&req.ctx);
        let unclassified;
        let (operation, entities) = match st.and_then(|s| s.access.as_ref()) {
            Some(r) => (r.operation.as_str(), Entities::Of(&r.accesses)),
            None => {
                unclassified = st
                    .map(|s| format!("{} {}", s.method, s.path))
                    .unwrap_or_else(|| " ".into());
                (unclassified.as_str(), Entities::Summary("[]"))
            }
        };
        let about = Decided {
            filter: NAME,
            mode: self.own.config().mode,
            log_allows: self.own.config().log_allows,
            identity: st.and_then(|s| s.identity.as_ref()),
            operation,
            entities,
            request_headers: req.headers(),
        };
        record_decision(&about, decision, &self.metrics.decisions)
    }

    /// A final decision: Next (allowed, or shadow mode) or the denial.
    fn done(&self, req: &Request, decision: &Decision) -> Step {
        match self.conclude(req, decision) {
            Ok(()) => Step::Next,
            Err(reason) => Step::deny(reason),
        }
    }

    fn count_cache(&mut self) {
        let stats = self.own.cache_stats();
        self.metrics
            .cache_hits
            .add(stats.hits.saturating_sub(self.last_cache.hits));
        self.metrics
            .cache_misses
            .add(stats.misses.saturating_sub(self.last_cache.misses));
        self.last_cache = stats;
    }

    /// Classifies the request (whole body at hand) and starts deciding it.
    fn classify(&mut self, req: &mut Request) -> Step {
        let ctx = req.ctx;
        let broker = self.own.config().broker;
        // Checked as text in `on_request` (a header set since is text).
        let headers = match req.text_headers(NAME, |name| self.own.reads_header(name)) {
            Ok(headers) => headers,
            Err(reason) => return self.done(req, &Decision::Deny(reason)),
        };
        let st = self.streams.entry(ctx).or_default();
        let ngsi = NgsiRequest {
            broker,
            method: &st.method,
            path: &st.path,
            headers,
            body: &req.body,
        };
        let classified = self
            .classified
            .classify_with_path(&ngsi)
            .and_then(|(r, canon)| Endpoint::of_canonical(&st.method, &canon).map(|e| (r, e)));
        let (access, endpoint) = match classified {
            Ok(c) => c,
            Err(reason) => return self.done(req, &Decision::Deny(reason)),
        };
        st.ld_context = scope::carries_ld_context(headers, &st.path, &req.body);
        let input = ScopeInput {
            dialect: endpoint.dialect,
            ld_context: st.ld_context,
        };
        let out_of_scope = self.own.out_of_scope(&access, input);
        let st = self.stream(ctx);
        st.access = Some(access);
        st.endpoint = Some(endpoint);
        if let Some(why) = out_of_scope {
            // Not ownership's business: passed untouched, without a lookup.
            return self.done(req, &Decision::Allow(why));
        }
        self.advance(req)
    }

    /// Evaluates the request with the records at hand; starts lookups for what is missing.
    fn advance(&mut self, req: &mut Request) -> Step {
        let ctx = req.ctx;
        let Some(now) = now_secs() else {
            return self.finish_request(req, deny_verdict(unavailable("no clock")));
        };
        loop {
            let st = self.stream(ctx);
            if let Some(failure) = st.failure.clone() {
                return self.finish_request(req, deny_verdict(failure));
            }
            let Some((st, access, endpoint)) = self.streams.get(&ctx).and_then(|st| {
                let (access, endpoint) = (st.access.as_ref()?, st.endpoint.as_ref()?);
                Some((st, access, endpoint))
            }) else {
                return self.finish_request(req, deny_verdict(unavailable("internal error")));
            };
            let eval = self.own.evaluate(
                st.identity.as_ref(),
                access,
                endpoint.list.is_some(),
                &st.records,
            );
            let api = self.own.lookup_api(endpoint.dialect);
            let keys = match eval {
                Eval::Done(verdict) if !verdict.new_entities.is_empty() => {
                    // The claims go to the registry with its token: it comes first.
                    let registry = self.own.registry().map(|(source, _)| source);
                    match registry.map(|source| self.await_token(ctx, source, now)) {
                        Some(TokenWait::Waiting) => return Step::Wait,
                        Some(TokenWait::Unreachable) => {
                            let reason =
                                unavailable("cannot reach the IdP for the registry's token");
                            return self.finish_request(req, deny_verdict(reason));
                        }
                        Some(TokenWait::Ready) | None => return self.finish_request(req, verdict),
                    }
                }
                Eval::Done(verdict) => return self.finish_request(req, verdict),
                Eval::Need(keys) => keys,
            };
            let mut waiting = false;
            for (key, fresh) in keys {
                let resolved = self.own.resolve(&key, 0, now, fresh);
                self.count_cache();
                match resolved {
                    Resolve::Known(r) => {
                        self.stream(ctx).records.insert(key, r);
                    }
                    Resolve::Fetch(source) => {
                        if !self.join_lookup(ctx, Lookup { key, source, api }) {
                            let reason = unavailable("cannot reach the ownership source");
                            return self.finish_request(req, deny_verdict(reason));
                        }
                        waiting = true;
                    }
                }
            }
            if waiting {
                return Step::Wait;
            }
        }
    }

    /// Makes `ctx` wait for `lookup`, starting its callout (from `ctx`, the effective
    /// context) if none is in flight. False if the callout could not be made.
    fn join_lookup(&mut self, ctx: u32, lookup: Lookup) -> bool {
        match self.await_token(ctx, lookup.source, now_secs().unwrap_or(0)) {
            TokenWait::Ready => {}
            TokenWait::Waiting => {
                // Asked once the token is there (the stream resumes and joins what it deferred).
                self.stream(ctx).deferred.push(lookup);
                return true;
            }
            TokenWait::Unreachable => return false,
        }
        self.stream(ctx).pending.insert(lookup.clone());
        if self.lookups.join(lookup.clone(), ctx, None) || self.start_lookup(&lookup, Some(ctx)) {
            return true;
        }
        self.lookups.leave(&lookup, ctx);
        self.stream(ctx).pending.remove(&lookup);
        false
    }

    fn send(&self, call: &HttpCall) -> Option<u32> {
        proxy_glue::dispatch_call(
            NAME,
            call,
            self.metrics.callouts,
            self.metrics.callout_failures,
        )
    }

    /// The registry's token, if calls to source `source` carry it (the registry source's, when
    /// it has `auth`: there is at most one).
    fn token_for(&self, source: usize) -> Option<&TokenKeeper<u32, Lookup>> {
        self.own
            .source_auth(source)
            .and(self.registry_token.as_ref())
    }

    /// Whether a call to source `source` needs a token that is not at hand.
    fn needs_token(&self, source: usize, now: u64) -> bool {
        self.token_for(source)
            .is_some_and(|t| t.authorization(now).is_none())
    }

    /// `call` to source `source` with the registry's token when its calls are authenticated.
    fn authorized(&self, source: usize, call: HttpCall) -> HttpCall {
        let now = now_secs().unwrap_or(0);
        match self.token_for(source).and_then(|t| t.authorization(now)) {
            Some(authorization) => call.with_header("authorization", authorization),
            None => call,
        }
    }

    /// Whether `ctx` may call source `source` now as far as its token goes: else it waits for
    /// the token (the request sent from `ctx` unless one is in flight).
    fn await_token(&mut self, ctx: u32, source: usize, now: u64) -> TokenWait {
        if self.own.source_auth(source).is_none() {
            return TokenWait::Ready;
        }
        let counters = self.metrics.registry_token;
        let Some(need) = self.registry_token.as_mut().map(|t| {
            adopt_shared(t, now, counters);
            t.need(ctx, now)
        }) else {
            return TokenWait::Unreachable;
        };
        match need {
            TokenNeed::Ready(_) => return TokenWait::Ready,
            TokenNeed::Fetch if !self.start_token_fetch(Some(ctx)) => {
                if let Some(t) = self.registry_token.as_mut() {
                    t.leave(&ctx);
                }
                return TokenWait::Unreachable;
            }
            TokenNeed::Fetch | TokenNeed::Wait => {}
        }
        self.stream(ctx).awaiting_token = true;
        TokenWait::Waiting
    }

    /// Sends the registry token's request from `owner`'s context (None: the root), unless
    /// another worker's VM is fetching it (then the streams wait for its token). False if the
    /// request could not be sent.
    fn start_token_fetch(&mut self, owner: Option<u32>) -> bool {
        let counters = self.metrics.registry_token;
        send_token_request(NAME, self.registry_token.as_mut(), owner, counters).recorded(|sent| {
            self.callouts.insert(sent, Purpose::Token);
        })
    }

    /// The IdP answered the token request: release the streams that waited (without a token
    /// they fail closed: 503).
    fn token_answered(&mut self, status: u32, body: &[u8]) -> Vec<u32> {
        let counters = self.metrics.registry_token;
        match token_answered(
            NAME,
            self.registry_token.as_mut(),
            (status, body),
            counters,
            "ownership registry",
        ) {
            Some(fetched) => self.token_released(fetched),
            None => Vec::new(),
        }
    }

    /// The streams that waited for the token, released: they resume (without a token they
    /// fail closed: 503).
    fn token_released(&mut self, fetched: Fetched<u32>) -> Vec<u32> {
        let mut ready = Vec::new();
        for ctx in fetched.waiters {
            let Some(st) = self.streams.get_mut(&ctx) else {
                continue;
            };
            st.awaiting_token = false;
            if fetched.failure.is_some() {
                st.deferred.clear();
                st.failure.get_or_insert_with(|| {
                    unavailable("the IdP gave no token for the ownership registry")
                });
            }
            if st.settled() {
                ready.push(ctx);
            }
        }
        ready
    }

    /// Sends the callout of `lookup` from the effective context (`owner`: that stream, or
    /// None for the root).
    fn start_lookup(&mut self, lookup: &Lookup, owner: Option<u32>) -> bool {
        if self.needs_token(lookup.source, now_secs().unwrap_or(0)) {
            return false;
        }
        let call = self
            .own
            .lookup_call(lookup)
            .map(|c| self.authorized(lookup.source, c));
        let Some(token) = call.and_then(|c| self.send(&c)) else {
            return false;
        };
        self.callouts.insert(token, Purpose::Lookup(lookup.clone()));
        self.lookups.started(lookup.clone(), owner);
        true
    }

    /// Joins the lookups deferred to this stream's context; true if it now waits.
    fn join_deferred(&mut self, ctx: u32) -> bool {
        let deferred = std::mem::take(&mut self.stream(ctx).deferred);
        for lookup in deferred {
            if !self.join_lookup(ctx, lookup) {
                let st = self.stream(ctx);
                st.failure = Some(unavailable("cannot reach the ownership source"));
            }
        }
        !self.stream(ctx).settled()
    }

    /// A decision was reached for the request (the caller becomes the owner of what it
    /// creates: the create body is checked, then the registry claims are sent).
    fn finish_request(&mut self, req: &mut Request, verdict: Verdict) -> Step {
        let ctx = req.ctx;
        if let Decision::Deny(_) = &verdict.decision {
            return self.done(req, &verdict.decision);
        }
        // A list the caller may read in full is not filtered (its answer is not held).
        let verdict = match (self.streams.get(&ctx), now_secs()) {
            (Some(st), Some(now)) if verdict.filter_list => match &st.access {
                Some(access) => self
                    .own
                    .settle_list(verdict, st.identity.as_ref(), access, now),
                None => verdict,
            },
            _ => verdict,
        };
        let Some((st, access, endpoint)) = self.streams.get(&ctx).and_then(|st| {
            let (access, endpoint) = (st.access.as_ref()?, st.endpoint.as_ref()?);
            Some((st, access, endpoint))
        }) else {
            return self.done(req, &Decision::Deny(unavailable("internal error")));
        };
        let identity = st.identity.as_ref();
        let new_body = match self
            .own
            .create_body(&verdict, identity, endpoint, &req.body)
        {
            Ok(body) => body,
            Err(reason) => return self.done(req, &Decision::Deny(reason)),
        };
        let claims = self
            .own
            .claim_calls(&verdict, identity, access, endpoint, &req.body);
        let registry = self.own.registry().map(|(source, _)| source);
        let mut sent = 0;
        for (key, call) in claims {
            let call = match registry {
                Some(source) => self.authorized(source, call),
                None => call,
            };
            let Some(token) = self.send(&call) else {
                let reason = unavailable("cannot reach the ownership registry");
                return self.done(req, &Decision::Deny(reason));
            };
            self.metrics.claims.inc();
            self.callouts.insert(token, Purpose::Claim { ctx, key });
            sent += 1;
        }
        let st = self.stream(ctx);
        st.new_body = new_body;
        st.verdict = Some(verdict);
        st.claims_pending = sent;
        if sent > 0 {
            return Step::Wait;
        }
        self.after_claims(req)
    }

    /// The decision is final (claims done): record it and prepare the forwarded request.
    fn after_claims(&mut self, req: &mut Request) -> Step {
        let ctx = req.ctx;
        let st = self.stream(ctx);
        let (verdict, failure) = (st.verdict.take(), st.failure.take());
        let Some(verdict) = verdict else {
            return self.done(req, &Decision::Deny(unavailable("internal error")));
        };
        if let Some(reason) = failure {
            return self.done(req, &Decision::Deny(reason));
        }
        if let Err(reason) = self.conclude(req, &verdict.decision) {
            return Step::deny(reason);
        }
        let shadow = self.own.config().mode == Mode::Shadow;
        for key in &verdict.invalidate {
            self.own.forget(key);
        }
        let st = self.streams.entry(ctx).or_default();
        st.invalidate = verdict.invalidate.clone();
        let mut body = st.new_body.take();
        if verdict.filter_list && !shadow {
            let plan = st
                .endpoint
                .as_ref()
                .and_then(|e| self.own.list_plan(e, &st.path, &req.body));
            if let Some(mut plan) = plan {
                if let Some(path) = &plan.new_path {
                    if req.set_header(":path", Some(path)).is_err() {
                        return Step::deny(unavailable("cannot rewrite the request"));
                    }
                }
                if let Some(b) = plan.new_body.take() {
                    body = Some(b);
                }
                st.plan = Some(plan);
            }
        }
        if let Some(body) = body {
            if req.replace_body(body).is_err() {
                log::error!("{NAME}: cannot rewrite the request body");
                return Step::deny(unavailable("cannot rewrite the request"));
            }
        }
        Step::Next
    }

    // ---- callout answers ----

    /// The registry refused the token (401) for the first time for this lookup: its waiters
    /// ask again with a new one. None: `status` is the lookup's answer.
    fn retry_after_401(&mut self, lookup: &Lookup, status: u32) -> Option<Vec<u32>> {
        self.own.source_auth(lookup.source)?;
        if !self
            .registry_token
            .as_mut()?
            .retry_with_new_token(lookup.clone(), status)
        {
            return None;
        }
        log::info!(
            "{NAME}: the ownership registry refused the access token (401): fetching another"
        );
        let mut ready = Vec::new();
        for ctx in self.lookups.finish(lookup) {
            let Some(st) = self.streams.get_mut(&ctx) else {
                continue;
            };
            st.pending.remove(lookup);
            st.deferred.push(lookup.clone());
            if st.settled() {
                ready.push(ctx);
            }
        }
        Some(ready)
    }

    fn lookup_answered(&mut self, lookup: Lookup, status: u32, body: &[u8]) -> Vec<u32> {
        if let Some(ready) = self.retry_after_401(&lookup, status) {
            return ready;
        }
        let record = match self.own.lookup_answer(&lookup, status, body) {
            Ok(record) => record,
            Err(e) => {
                if (200..300).contains(&status) {
                    // Non-2xx answers are counted as callout failures already.
                    self.metrics.lookup_invalid.inc();
                }
                log::warn!(
                    "{NAME}: ownership lookup of {} in sources[{}] failed: {}",
                    bounded_debug(&lookup.key.to_string()),
                    lookup.source,
                    bounded(&e)
                );
                return self.fail_lookup(&lookup, "the ownership source failed");
            }
        };
        let now = now_secs().unwrap_or(0);
        let next = match record {
            Some(r) => Resolve::Known(Some(r)),
            None => self.own.resolve(&lookup.key, lookup.source + 1, now, true),
        };
        if let Resolve::Known(r) = &next {
            self.own.remember(&lookup.key, r, now);
        }
        let mut ready = Vec::new();
        for ctx in self.lookups.finish(&lookup) {
            let Some(st) = self.streams.get_mut(&ctx) else {
                continue;
            };
            st.pending.remove(&lookup);
            match &next {
                Resolve::Known(r) => {
                    st.records.insert(lookup.key.clone(), r.clone());
                }
                Resolve::Fetch(source) => st.deferred.push(Lookup {
                    key: lookup.key.clone(),
                    source: *source,
                    api: lookup.api,
                }),
            }
            if st.settled() {
                ready.push(ctx);
            }
        }
        ready
    }

    /// Every waiter of `lookup` fails closed (503); returns those now settled.
    fn fail_lookup(&mut self, lookup: &Lookup, why: &str) -> Vec<u32> {
        let mut ready = Vec::new();
        for ctx in self.lookups.finish(lookup) {
            let Some(st) = self.streams.get_mut(&ctx) else {
                continue;
            };
            st.pending.remove(lookup);
            st.failure.get_or_insert_with(|| unavailable(why));
            if st.settled() {
                ready.push(ctx);
            }
        }
        ready
    }

    fn claim_answered(&mut self, ctx: u32, key: EntityKey, status: u32) -> Vec<u32> {
        if status == 401 {
            // The token was refused: the next registry call fetches another (this claim fails).
            if let Some(t) = self.registry_token.as_mut() {
                t.refused();
            }
        }
        let outcome = wire::claim_outcome(status, &key);
        let now = now_secs().unwrap_or(0);
        let caller = self
            .streams
            .get(&ctx)
            .and_then(|st| st.identity.as_ref().map(|i| i.subject.clone()));
        match (&outcome, caller) {
            (Ok(()), Some(caller)) => self
                .own
                .remember(&key, &Some(Record::owned_by(caller)), now),
            _ => self.own.forget(&key),
        }
        let Some(st) = self.streams.get_mut(&ctx) else {
            return Vec::new();
        };
        st.claims_pending = st.claims_pending.saturating_sub(1);
        if let Err(reason) = outcome {
            log::warn!(
                "{NAME}: claim of {} refused: {}",
                bounded_debug(&key.to_string()),
                bounded(&reason.to_string())
            );
            st.failure = Some(graver(st.failure.take(), reason));
        }
        if st.settled() {
            vec![ctx]
        } else {
            Vec::new()
        }
    }

    // ---- list answers ----

    /// The list answer cannot be filtered: a 503 with a decision line (the request's allow
    /// line came first; this one, with the cause, is what the access log then shows).
    fn fail_list(&self, req: &Request, why: &str) -> Step {
        self.metrics.list_failed.inc();
        let why = format!("cannot filter the list response: {}", bounded(why));
        self.done(req, &Decision::Deny(unavailable(&why)))
    }

    /// Resolves every listed entity (registry lookups as needed), then filters the answer.
    fn continue_list(&mut self, req: &Request, resp: &mut Response) -> Step {
        let ctx = req.ctx;
        let Some(now) = now_secs() else {
            return self.fail_list(req, "no clock");
        };
        let Some(st) = self.streams.get_mut(&ctx) else {
            return self.fail_list(req, "internal error");
        };
        if let Some(failure) = st.failure.take() {
            return self.fail_list(req, &failure.to_string());
        }
        let service = st.service();
        let Some(list) = st.list.as_ref() else {
            return Step::Next;
        };
        let needed = list.lookups(&mut self.own, &service, &mut st.records, now);
        self.count_cache();
        let to_fetch = match needed {
            Ok(to_fetch) => to_fetch,
            Err(e) => return self.fail_list(req, &e),
        };
        if to_fetch.is_empty() {
            return self.finish_list(req, resp);
        }
        for (key, source) in to_fetch {
            let api = BrokerApi::Auto;
            if !self.join_lookup(ctx, Lookup { key, source, api }) {
                return self.fail_list(req, "cannot reach the ownership source");
            }
        }
        Step::Wait
    }

    fn finish_list(&mut self, req: &Request, resp: &mut Response) -> Step {
        let ctx = req.ctx;
        let Some(st) = self.streams.get_mut(&ctx) else {
            return self.fail_list(req, "internal error");
        };
        let Some(list) = st.list.take() else {
            return Step::Next;
        };
        let service = st.service();
        let filtered = match list.finish(st.identity.as_ref(), &service, &st.records) {
            Ok(filtered) => filtered,
            Err(e) => return self.fail_list(req, &e),
        };
        let (kept, total) = (filtered.kept, filtered.total);
        let headers = resp.headers();
        let edits = filtered.header_edits(|name| headers.first(name));
        for (header, value) in edits {
            if resp.set_header(header, value.as_deref()).is_err() {
                return self.fail_list(req, "cannot rewrite the response headers");
            }
        }
        if let Some(body) = filtered.body {
            if resp.replace_body(body).is_err() {
                return self.fail_list(req, "cannot rewrite the response");
            }
        }
        self.metrics.lists_filtered.inc();
        self.metrics
            .list_removed
            .add(total.saturating_sub(kept) as u64);
        log::info!("{NAME}: ctx={ctx} list filtered: kept {kept} of {total} entities");
        Step::Next
    }
}

impl Stage for DeviceOwnershipStage {
    fn name(&self) -> &'static str {
        NAME
    }

    fn on_request(&mut self, req: &mut Request) -> Step {
        let ctx = req.ctx;
        let headers = match req.text_headers(NAME, |name| self.own.reads_header(name)) {
            Ok(headers) => headers,
            Err(reason) => {
                self.streams.insert(ctx, StreamState::default());
                return self.done(req, &Decision::Deny(reason));
            }
        };
        let get = |name: &str| proxy_glue::header_text(headers, name);
        let identity = match &req.caller {
            Caller::Known(identity) => Ok(identity.clone()),
            Caller::FromHeaders => self
                .own
                .config()
                .identity_headers
                .parse(headers)
                .map_err(DenyReason::BadRequest),
        };
        let declared: Option<usize> = get("content-length").trim().parse().ok();
        let st = StreamState {
            identity: identity.as_ref().ok().cloned().flatten(),
            method: get(":method").to_string(),
            path: get(":path").to_string(),
            ..Default::default()
        };
        self.streams.insert(ctx, st);
        if let Err(reason) = identity {
            return self.done(req, &Decision::Deny(reason));
        }
        if declared.is_some_and(|n| n > self.body_limit()) {
            return self.on_body_too_large(req);
        }
        Step::NeedBody
    }

    fn on_body(&mut self, req: &mut Request) -> Step {
        self.classify(req)
    }

    fn body_limit(&self) -> usize {
        self.own.config().max_body_bytes
    }

    fn refuse(&mut self, req: &mut Request, reason: DenyReason) -> Step {
        self.streams.entry(req.ctx).or_default();
        self.done(req, &Decision::Deny(reason))
    }

    fn resume(&mut self, req: &mut Request) -> Step {
        let ctx = req.ctx;
        if self.join_deferred(ctx) {
            return Step::Wait;
        }
        if self.stream(ctx).verdict.is_some() {
            self.after_claims(req)
        } else {
            self.advance(req)
        }
    }

    fn on_response(&mut self, req: &Request, resp: &mut Response) -> Step {
        let ctx = req.ctx;
        let Some(st) = self.streams.get_mut(&ctx) else {
            return Step::Next;
        };
        // The broker acted on creates/deletes/owner changes: forget what was cached.
        let invalidate = std::mem::take(&mut st.invalidate);
        let filtering = st.plan.is_some();
        for key in &invalidate {
            self.own.forget(key);
        }
        if !filtering {
            return Step::Next;
        }
        match wire::list_answer(resp.status()) {
            ListAnswer::Unreadable => self.fail_list(req, "the answer has no readable :status"),
            // An error or redirect carries no entity; a 2xx without a body lists nothing.
            ListAnswer::PassThrough => {
                self.stream(ctx).plan = None;
                Step::Next
            }
            ListAnswer::Filter if resp.ended_at_headers => {
                self.stream(ctx).plan = None;
                Step::Next
            }
            // Held whole; its headers change (content-length, counts) only if filtering
            // changes the answer.
            ListAnswer::Filter => Step::NeedBody,
        }
    }

    fn on_response_body(&mut self, req: &Request, resp: &mut Response) -> Step {
        let ctx = req.ctx;
        let st = self.stream(ctx);
        let (Some(plan), ld_context) = (st.plan.take(), st.ld_context) else {
            return Step::Next;
        };
        match ListFilter::parse(&self.own, plan.format, plan.strip, &resp.body, ld_context) {
            Ok(list) => {
                self.stream(ctx).list = Some(list);
                self.continue_list(req, resp)
            }
            Err(e) => self.fail_list(req, &e),
        }
    }

    fn response_body_limit(&self) -> usize {
        self.own.config().max_response_bytes
    }

    fn on_response_body_too_large(&mut self, req: &Request, _resp: &mut Response) -> Step {
        let max = self.response_body_limit();
        self.fail_list(req, &format!("list response over {max} bytes"))
    }

    fn resume_response(&mut self, req: &Request, resp: &mut Response) -> Step {
        if self.join_deferred(req.ctx) {
            return Step::Wait;
        }
        self.continue_list(req, resp)
    }

    fn on_callout(&mut self, token: u32) -> Option<Vec<u32>> {
        let purpose = self.callouts.remove(&token)?;
        let (status, body) = proxy_glue::callout_answer(NAME);
        if !(200..300).contains(&status) && status != 404 {
            self.metrics.callout_failures.inc();
        }
        Some(match purpose {
            Purpose::Lookup(lookup) => self.lookup_answered(lookup, status, &body),
            Purpose::Claim { ctx, key } => self.claim_answered(ctx, key, status),
            Purpose::Token => self.token_answered(status, &body),
        })
    }

    fn needs_ticks(&self) -> bool {
        self.own.can_record_owner() || self.registry_token.is_some()
    }

    fn prompt_tick_ms(&self) -> Option<u64> {
        registry_token::prompt_tick_ms(self.registry_token.as_ref())
    }

    fn on_tick(&mut self) -> Vec<u32> {
        // A token another worker's VM fetched (or failed to) releases the streams that waited
        // for it; a token nobody is fetching (its fetcher went away, or the registry refused
        // the last one) is fetched by the root; lookups whose owning stream went away: the
        // root asks again for the waiters.
        let mut ready = Vec::new();
        let now = now_secs().unwrap_or(0);
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
        for lookup in self.lookups.orphans() {
            if !self.start_lookup(&lookup, None) {
                ready.extend(self.fail_lookup(&lookup, "cannot call the ownership source"));
            }
        }
        ready
    }

    fn forget(&mut self, ctx: u32) {
        if let Some(st) = self.streams.remove(&ctx) {
            for key in &st.invalidate {
                self.own.forget(key);
            }
        }
        self.callouts
            .retain(|_, p| !matches!(p, Purpose::Claim { ctx: c, .. } if *c == ctx));
        if let Some(t) = self.registry_token.as_mut() {
            t.leave(&ctx);
            if registry_token::forget_stream(t, ctx) {
                // Envoy cancels its token fetch; the root fetches again on the next tick.
                self.callouts.retain(|_, p| !matches!(p, Purpose::Token));
            }
        }
        for lookup in self.lookups.forget_stream(ctx) {
            // Envoy cancels the owner's callouts; the root re-issues the lookup on its next tick.
            self.callouts
                .retain(|_, p| !matches!(p, Purpose::Lookup(l) if *l == lookup));
        }
    }
}
