//! A filter chain driven as Envoy's filter manager drives it.
//!
//! Request frames (headers, data, trailers) go through the filters in order, response frames
//! in reverse. A filter that answers Pause holds everything after it: a paused header callback
//! still receives the body (Envoy's StopIteration), and answering Continue from that body
//! callback lets headers and body go on together; a paused body callback buffers
//! (StopIterationAndBuffer) and sees the accumulated body next time. Local responses and
//! continue calls take effect after the callback returns. Callouts are answered after all the
//! downstream data has arrived, the order a fast client and a slower IdP produce in Envoy.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use anyhow::Result;

use crate::abi::{Action, MetricType, Pairs, StreamType, PEER_REMOTE};
use crate::host::{CallResponse, Deferred, LocalResponse, PendingCall, SharedStream, StreamData};
use crate::shared::{lock, Shared};
use crate::vm::{PluginSpec, PluginVm, Runtime, VmFailure};

/// How a callout is answered.
#[derive(Debug, Clone)]
pub enum CalloutAnswer {
    Response(CallResponse),
    /// The connection was reset: the guest sees zero headers.
    Reset,
}

/// Answers HTTP callouts: scripted, or forwarded to a real server.
pub trait CalloutResolver {
    fn resolve(&mut self, call: &PendingCall, shared: &Shared) -> CalloutAnswer;
}

/// A resolver for chains that make no callouts: every call is reset.
pub struct NoCallouts;

impl CalloutResolver for NoCallouts {
    fn resolve(&mut self, _: &PendingCall, _: &Shared) -> CalloutAnswer {
        CalloutAnswer::Reset
    }
}

#[derive(Debug, Clone, Default)]
pub struct HttpRequest {
    /// Including pseudo-headers (`:method`, `:path`, `:authority`, `:scheme`).
    pub headers: Pairs,
    /// Body as it arrives, chunk by chunk.
    pub body: Vec<Vec<u8>>,
    pub trailers: Pairs,
    /// Stream properties (connection, source, TLS peer), already encoded.
    pub properties: BTreeMap<String, Vec<u8>>,
}

#[derive(Debug, Clone)]
pub struct UpstreamResponse {
    pub status: u32,
    pub headers: Pairs,
    pub body: Vec<u8>,
    pub trailers: Pairs,
}

impl Default for UpstreamResponse {
    fn default() -> Self {
        UpstreamResponse {
            status: 200,
            headers: vec![("content-type".into(), b"application/json".to_vec())],
            body: b"{}".to_vec(),
            trailers: Vec::new(),
        }
    }
}

/// What reached the upstream.
#[derive(Debug, Clone, Default)]
pub struct UpstreamRequest {
    pub headers: Pairs,
    pub body: Vec<u8>,
    pub trailers: Pairs,
    pub complete: bool,
}

#[derive(Debug, Clone, Default)]
pub struct CalloutRecord {
    pub cluster: String,
    pub headers: Pairs,
    pub body: Vec<u8>,
}

impl CalloutRecord {
    fn of(call: &crate::host::PendingCall) -> CalloutRecord {
        CalloutRecord {
            cluster: call.cluster.clone(),
            headers: call.headers.clone(),
            body: call.body.clone(),
        }
    }
}

/// What the client saw, and what happened on the way.
#[derive(Debug, Clone, Default)]
pub struct HttpOutcome {
    /// `:status` the client received; 0 if none (reset or stalled).
    pub status: u32,
    pub headers: Pairs,
    pub body: Vec<u8>,
    pub trailers: Pairs,
    pub upstream: Option<UpstreamRequest>,
    pub local_reply: Option<LocalResponse>,
    pub reset: bool,
    /// The stream neither completed nor was reset: a filter paused and nothing resumed it.
    pub stalled: bool,
    /// Why it stalled, as far as the host can tell (set with `stalled`).
    pub stall_reason: Option<String>,
    /// ABI contract breaches by a filter on this stream (e.g. a second local response).
    /// Envoy would not say so; a test must.
    pub contract_violations: Vec<String>,
    /// What may explain an unexpected outcome (e.g. a body Envoy held back from a filter),
    /// shown when a step's expectation fails.
    pub hints: Vec<String>,
    pub callouts: Vec<CalloutRecord>,
}

impl HttpOutcome {
    pub fn header(&self, name: &str) -> Option<String> {
        header(&self.headers, name)
    }
}

pub fn header(pairs: &Pairs, name: &str) -> Option<String> {
    pairs
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Request,
    Response,
}

#[derive(Debug, Clone)]
enum Frame {
    Headers { eos: bool },
    Data { chunk: Vec<u8>, eos: bool },
    Trailers,
}

/// What a stopped filter holds back.
#[derive(Debug, Default, Clone)]
struct Hold {
    stopped: bool,
    headers: Option<bool>,
    /// The filter buffers body (its data lives in StreamData's body field).
    buffering: bool,
    eos: bool,
    trailers: bool,
    /// Stopped at headers with `allow_on_headers_stop_iteration` false: later body and
    /// trailers are held back from this filter and go through it when it continues.
    stop_all: bool,
    unseen_body: Option<Vec<u8>>,
    unseen_eos: bool,
    unseen_trailers: bool,
    /// What later filters had buffered when this one started buffering: the stream has one
    /// body field, so it waits here until this filter lets its own buffer go on.
    parked_downstream: Option<Vec<u8>>,
}

/// A chain of plugins in one "Envoy": the VMs, the state they share, and the callout answers.
pub struct Chain {
    runtime: Arc<Runtime>,
    pub shared: Arc<Shared>,
    clusters: Arc<HashSet<String>>,
    pub filters: Vec<PluginVm>,
    pub resolver: Box<dyn CalloutResolver>,
    next_connection_id: u64,
    /// Every callout answered, in order.
    callout_log: Vec<CalloutRecord>,
    /// Actions a guest took on another stream than the one being called back.
    spilled: Vec<(usize, u32, Deferred)>,
    /// Connections a guest closed from a background callback (a tick) through
    /// `proxy_set_effective_context`: (filter index, stream context). Envoy closes the
    /// connection then, after flushing what was already written to it.
    background_closes: Vec<(usize, u32)>,
    /// Several connections are open in one step ([`Chain::connections`]): callouts wait for an
    /// explicit answer, and what a callback does to another connection (through
    /// `proxy_set_effective_context`) is routed to it.
    hold_callouts: bool,
    /// Actions a guest took on another connection than the one being called back, and those
    /// of background callbacks while callouts are held: (filter index, context, action).
    net_spilled: Vec<(usize, u32, Deferred)>,
}

/// Envoy's reload events of a FAIL_RELOAD plugin, counted as `wasm.<plugin>.vm_reload_<event>`.
const RELOAD_EVENTS: [&str; 3] = ["success", "failure", "backoff"];

/// The counter Envoy 1.40 keeps for a plugin's reload event (e.g. wasm.token-auth.vm_reload_success).
pub fn reload_metric(plugin: &str, event: &str) -> String {
    format!("wasm.{plugin}.vm_reload_{event}")
}

/// How long a waiting stream lets time pass for ticks before it counts as stalled.
const IDLE_LIMIT_NANOS: u64 = 15_000_000_000;

/// Per-stream bookkeeping of the HTTP driver.
struct HttpRun {
    data: SharedStream,
    ctx: Vec<u32>,
    holds: [Vec<Hold>; 2],
    outcome: HttpOutcome,
    upstream: UpstreamRequest,
    response_started: bool,
    /// The client has its answer (or the stream was reset or failed).
    ended: bool,
    /// The filter contexts were ended (done, log, delete).
    finished: bool,
}

impl Chain {
    pub fn new(
        runtime: Arc<Runtime>,
        shared: Arc<Shared>,
        clusters: HashSet<String>,
        resolver: Box<dyn CalloutResolver>,
    ) -> Self {
        Chain {
            runtime,
            shared,
            clusters: Arc::new(clusters),
            filters: Vec::new(),
            resolver,
            next_connection_id: 0,
            callout_log: Vec::new(),
            spilled: Vec::new(),
            background_closes: Vec::new(),
            hold_callouts: false,
            net_spilled: Vec::new(),
        }
    }

    /// Loads a plugin at the end of the chain and runs its start sequence. The plugin is added
    /// even if it rejects its configuration: Envoy then fails its requests closed.
    pub fn add_filter(&mut self, spec: PluginSpec) -> Result<&PluginVm> {
        let index = self.filters.len();
        // Envoy's per-plugin reload stats, present (at 0) whatever the failure policy.
        for event in RELOAD_EVENTS {
            self.shared
                .define_metric(MetricType::Counter, &reload_metric(&spec.name, event));
        }
        let vm = self.start_vm(spec, index)?;
        self.filters.push(vm);
        self.pump_background();
        Ok(&self.filters[index])
    }

    /// Starts a VM for the filter at `index` in this chain's runtime, shared data and clusters.
    fn start_vm(&self, spec: PluginSpec, index: usize) -> Result<PluginVm> {
        PluginVm::start(
            &self.runtime,
            spec,
            self.shared.clone(),
            self.clusters.clone(),
            index,
        )
    }

    /// Replaces a filter's configuration (or module) as ECDS does: a fresh VM is started with
    /// the new configuration; if it rejects it, the old one stays in force. Returns whether
    /// the new configuration took effect.
    pub fn reconfigure(&mut self, index: usize, spec: PluginSpec) -> Result<Result<(), VmFailure>> {
        let vm = self.start_vm(spec, index)?;
        if let Some(failure) = vm.failure.clone() {
            return Ok(Err(failure));
        }
        let mut old = std::mem::replace(&mut self.filters[index], vm);
        old.root_done();
        self.pump_background();
        Ok(Ok(()))
    }

    /// FAIL_RELOAD: replaces each VM that trapped after it started with a fresh one (same
    /// spec: `_initialize`, a new root context, `proxy_on_vm_start`, `proxy_on_configure`),
    /// if its backoff has passed since the VM was last loaded (as Envoy rate-limits reloads);
    /// otherwise the request is refused as by a dead VM. Counted as Envoy does: `wasm.<plugin>.vm_reload_{success,failure,backoff}`.
    /// Called where a request or connection arrives, before any of its streams exist, so no
    /// stream holds a context id of the VM being replaced. Shared data (per vm_id) survives,
    /// as in Envoy, where it lives outside the VM.
    fn reload_failed_vms(&mut self) -> Result<()> {
        let now = self.shared.now_nanos();
        for index in 0..self.filters.len() {
            let old = &self.filters[index];
            let Some(backoff_ms) = old.reload_backoff_ms() else {
                continue;
            };
            let name = old.spec.name.clone();
            let reload_at = old
                .loaded_at_nanos
                .saturating_add(backoff_ms.saturating_mul(1_000_000));
            if now < reload_at {
                self.shared
                    .increment_metric(&reload_metric(&name, "backoff"), 1);
                continue;
            }
            let (spec, reloads) = (old.spec.clone(), old.reloads);
            let mut fresh = self.start_vm(spec, index)?;
            if fresh.is_serving() {
                fresh.reloads = reloads + 1;
                self.filters[index] = fresh;
                self.shared
                    .increment_metric(&reload_metric(&name, "success"), 1);
                self.shared.log(
                    "host-harness",
                    2,
                    format!("plugin {name}: fresh VM after a failure"),
                );
                self.pump_background();
            } else {
                // Still dead: try again after another backoff.
                self.filters[index].loaded_at_nanos = now;
                self.shared
                    .increment_metric(&reload_metric(&name, "failure"), 1);
            }
        }
        Ok(())
    }

    /// Advances the clock, stepping from tick to tick: each VM's ticks fire when due, and what
    /// a tick starts (a key refresh, say) is answered before the next tick, as in Envoy.
    /// Every filter hands the counts it holds to the host ([`PluginVm::flush_counters`]).
    pub fn flush_counters(&mut self) {
        for vm in &mut self.filters {
            let _ = vm.flush_counters();
        }
    }

    pub fn advance_clock(&mut self, millis: u64) {
        let target = self.shared.now_nanos().saturating_add(millis * 1_000_000);
        while self.tick_once(target) {
            // Before anything else runs a callback (and starts a new deferred list).
            self.collect_background_closes();
            self.pump_background();
        }
        let now = self.shared.now_nanos();
        if target > now {
            self.shared.advance_nanos(target - now);
        }
        self.pump_background();
    }

    /// Answers callouts made outside any stream (ticks, configure) and delivers queue
    /// notifications, until nothing is left.
    pub fn pump_background(&mut self) {
        for _ in 0..1000 {
            let mut progressed = false;
            for (vm_index, root, queue) in self.shared.take_queue_ready() {
                if let Some(vm) = self.filters.get_mut(vm_index) {
                    if vm.is_serving() {
                        let _ = vm.queue_ready(root, queue);
                    }
                }
                progressed = true;
            }
            for i in 0..self.filters.len() {
                if self.hold_callouts {
                    // Answered when the scenario says so (`answer_callouts`).
                    break;
                }
                for call in self.filters[i].take_pending_calls() {
                    self.callout_log.push(CalloutRecord::of(&call));
                    let answer = self.resolver.resolve(&call, &self.shared);
                    let _ = self.filters[i].deliver_call_response(
                        call.context_id,
                        call.token,
                        answer_to_response(answer),
                    );
                    self.collect_background_closes();
                    progressed = true;
                }
            }
            self.collect_background_closes();
            if !progressed {
                return;
            }
        }
    }

    /// Background callbacks have no stream of their own: their deferred stream actions are
    /// void, except closing a connection made effective (network filters).
    fn collect_background_closes(&mut self) {
        for i in 0..self.filters.len() {
            for (ctx, action) in self.filters[i].take_deferred() {
                if self.hold_callouts {
                    self.net_spilled.push((i, ctx, action));
                } else if let Deferred::Close(_) = action {
                    self.background_closes.push((i, ctx));
                }
            }
        }
    }

    fn order(&self, dir: Dir, k: usize) -> usize {
        match dir {
            Dir::Request => k,
            Dir::Response => self.filters.len() - 1 - k,
        }
    }

    fn connection_properties(&mut self, props: &mut BTreeMap<String, Vec<u8>>) {
        self.next_connection_id += 1;
        props
            .entry("connection.id".into())
            .or_insert_with(|| self.next_connection_id.to_le_bytes().to_vec());
        props
            .entry("connection.mtls".into())
            .or_insert_with(|| vec![0]);
        props
            .entry("source.address".into())
            .or_insert_with(|| b"127.0.0.1:50000".to_vec());
        props
            .entry("source.port".into())
            .or_insert_with(|| 50000i64.to_le_bytes().to_vec());
        props
            .entry("destination.address".into())
            .or_insert_with(|| b"127.0.0.1:10000".to_vec());
        props
            .entry("destination.port".into())
            .or_insert_with(|| 10000i64.to_le_bytes().to_vec());
    }

    // ================= HTTP =================

    /// Sends one HTTP request through the chain; `upstream` answers if it gets there.
    pub fn http(&mut self, request: HttpRequest, upstream: &UpstreamResponse) -> HttpOutcome {
        let mut outcomes = self.http_concurrent(vec![(request, false)], upstream);
        outcomes.pop().unwrap_or_default()
    }

    /// Sends several requests at once: every request's downstream data arrives first (in
    /// order), then callouts are answered, so streams can share or wait on each other's
    /// callouts. A request marked `true` is abandoned by its client before any callout is
    /// answered (Envoy then ends its filter contexts; their callouts are still answered).
    pub fn http_concurrent(
        &mut self,
        requests: Vec<(HttpRequest, bool)>,
        upstream: &UpstreamResponse,
    ) -> Vec<HttpOutcome> {
        let log_start = self.callout_log.len();
        if let Err(e) = self.reload_failed_vms() {
            // The module cannot even be instantiated again: the VM stays failed (requests 503).
            self.shared
                .log("host-harness", 4, format!("reloading a failed VM: {e:#}"));
        }
        let mut runs: Vec<HttpRun> = requests.iter().map(|(r, _)| self.start_stream(r)).collect();
        for (run, (request, _)) in runs.iter_mut().zip(&requests) {
            if !run.ended {
                self.send_request(run, request);
            }
        }
        self.route_spilled(&mut runs);
        for (run, (_, abandon)) in runs.iter_mut().zip(&requests) {
            if *abandon && !run.ended {
                run.outcome.reset = true;
                run.ended = true;
                self.finish_http(run);
            }
        }
        self.settle(&mut runs, upstream);
        let made = self.callout_log[log_start..].to_vec();
        runs.into_iter()
            .map(|mut run| {
                if !run.finished {
                    self.finish_http(&mut run);
                }
                run.outcome.callouts = made.clone();
                run.outcome
            })
            .collect()
    }

    /// Creates a stream's contexts in every filter (or fails it closed).
    fn start_stream(&mut self, request: &HttpRequest) -> HttpRun {
        let mut properties = request.properties.clone();
        self.connection_properties(&mut properties);
        add_request_properties(&request.headers, &mut properties, self.shared.now_nanos());
        let data = Arc::new(Mutex::new(StreamData {
            request_headers: request
                .headers
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                .collect(),
            properties,
            ..Default::default()
        }));
        let n = self.filters.len();
        let mut run = HttpRun {
            data: data.clone(),
            ctx: Vec::with_capacity(n),
            holds: [vec![Hold::default(); n], vec![Hold::default(); n]],
            outcome: HttpOutcome::default(),
            upstream: UpstreamRequest::default(),
            response_started: false,
            ended: false,
            finished: false,
        };
        // Envoy fails closed when a plugin is not serving (rejected config or failed VM).
        if let Some(vm) = self.filters.iter().find(|vm| !vm.is_serving()) {
            let why = format!("plugin {} not serving", vm.spec.name);
            self.fail_stream(&mut run, &why);
            run.finished = true;
            return run;
        }
        for i in 0..n {
            match self.filters[i].create_stream(data.clone()) {
                Ok(id) => run.ctx.push(id),
                Err(why) => {
                    self.fail_stream(&mut run, &why);
                    self.finish_http(&mut run);
                    return run;
                }
            }
        }
        run
    }

    /// Delivers the request's headers, body chunks and trailers, as the client sends them.
    fn send_request(&mut self, run: &mut HttpRun, request: &HttpRequest) {
        let has_body = request.body.iter().any(|c| !c.is_empty());
        let has_trailers = !request.trailers.is_empty();
        self.deliver(
            run,
            Dir::Request,
            0,
            Frame::Headers {
                eos: !has_body && !has_trailers,
            },
        );
        let chunks: Vec<&Vec<u8>> = request.body.iter().filter(|c| !c.is_empty()).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let eos = i + 1 == chunks.len() && !has_trailers;
            self.deliver(
                run,
                Dir::Request,
                0,
                Frame::Data {
                    chunk: chunk.to_vec(),
                    eos,
                },
            );
        }
        if has_trailers {
            lock(&run.data).request_trailers = request
                .trailers
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                .collect();
            self.deliver(run, Dir::Request, 0, Frame::Trailers);
        }
    }

    /// Answers callouts and starts responses until every stream ended or nothing moves.
    /// When nothing moves but a VM has a tick period, time passes (tick by tick, up to
    /// Envoy's default route timeout of 15 s), as it would for a waiting client.
    fn settle(&mut self, runs: &mut [HttpRun], upstream: &UpstreamResponse) {
        let deadline = self.shared.now_nanos() + IDLE_LIMIT_NANOS;
        for _ in 0..100_000 {
            self.route_spilled(runs);
            if runs.iter().all(|r| r.ended) {
                return;
            }
            if let Some(run) = runs
                .iter_mut()
                .find(|r| !r.ended && r.upstream.complete && !r.response_started)
            {
                run.response_started = true;
                self.start_upstream_response(run, upstream);
                continue;
            }
            if self.answer_one_callout(runs) {
                continue;
            }
            if self.tick_once(deadline) {
                // What the ticks did to streams (resumed them, answered them) reaches them.
                for i in 0..self.filters.len() {
                    let actions = self.filters[i].take_deferred();
                    self.route_actions(runs, i, actions);
                }
                continue;
            }
            break;
        }
        for run in runs.iter_mut().filter(|r| !r.ended) {
            let reason = self.stall_reason(run);
            self.shared
                .log("host-harness", 3, format!("stream stalled: {reason}"));
            run.outcome.stalled = true;
            run.outcome.stall_reason = Some(reason);
        }
    }

    /// Why `run` is stuck. The usual cause: a filter paused in its request headers to read the
    /// body, but with `allow_on_headers_stop_iteration` false Envoy holds the body back from it
    /// until it continues (StopAllIterationAndWatermark), so it waits for what never comes.
    fn stall_reason(&self, run: &HttpRun) -> String {
        self.body_held_back(run).unwrap_or_else(|| {
            "a filter paused and nothing resumed it (no callout pending, no tick due)".into()
        })
    }

    /// A filter paused in its request headers while the body waits behind it, held back by
    /// `allow_on_headers_stop_iteration` = false: said in those words, since the filter's own
    /// symptom (a stall, or its body timeout's 503) does not name the setting.
    fn body_held_back(&self, run: &HttpRun) -> Option<String> {
        let i = run.holds[Dir::Request as usize]
            .iter()
            .position(|h| h.stopped && h.stop_all && (h.unseen_body.is_some() || h.unseen_eos))?;
        Some(format!(
            "filter {} paused in its request headers and Envoy held the body back from it \
             (allow_on_headers_stop_iteration = false): a filter that reads the body after \
             pausing its headers needs allow_on_headers_stop_iteration = true (scenario \
             [[filter]] key; render.py sets it for the body-reading filters)",
            self.filters[i].spec.name
        ))
    }

    /// Moves the clock to the next tick (if before `deadline`) and fires it. Callouts it
    /// starts are answered by the caller's loop, with their stream actions routed.
    fn tick_once(&mut self, deadline: u64) -> bool {
        let next = self
            .filters
            .iter()
            .filter_map(PluginVm::next_tick_nanos)
            .min();
        let Some(at) = next.filter(|at| *at <= deadline) else {
            return false;
        };
        let now = self.shared.now_nanos();
        if at > now {
            self.shared.advance_nanos(at - now);
        }
        let now = self.shared.now_nanos();
        for vm in &mut self.filters {
            let _ = vm.fire_ticks(now, 1);
        }
        true
    }

    /// Answers the oldest pending callout of the first VM that has one, then applies what the
    /// guest did in response to whichever streams it acted on.
    fn answer_one_callout(&mut self, runs: &mut [HttpRun]) -> bool {
        for i in 0..self.filters.len() {
            let calls = self.filters[i].take_pending_calls();
            if calls.is_empty() {
                continue;
            }
            let mut calls = calls.into_iter();
            let Some(call) = calls.next() else { continue };
            self.filters[i].state_mut().pending_calls.extend(calls);
            self.callout_log.push(CalloutRecord::of(&call));
            let answer = self.resolver.resolve(&call, &self.shared);
            let delivered = self.filters[i].deliver_call_response(
                call.context_id,
                call.token,
                answer_to_response(answer),
            );
            if let Err(why) = delivered {
                // The VM failed: every stream still going through it fails closed.
                for run in runs.iter_mut().filter(|r| !r.ended) {
                    self.fail_stream(run, &why);
                }
                return true;
            }
            let actions = self.filters[i].take_deferred();
            self.route_actions(runs, i, actions);
            return true;
        }
        false
    }

    /// Applies actions a VM deferred to the streams they name (by that VM's context id).
    fn route_actions(&mut self, runs: &mut [HttpRun], i: usize, actions: Vec<(u32, Deferred)>) {
        for (ctx, action) in actions {
            if let Some(run) = runs
                .iter_mut()
                .find(|r| !r.ended && r.ctx.get(i) == Some(&ctx))
            {
                self.apply_action(run, i, action);
            }
        }
    }

    /// Actions a guest took on another stream during one stream's callback.
    fn route_spilled(&mut self, runs: &mut [HttpRun]) {
        while !self.spilled.is_empty() {
            let spilled = std::mem::take(&mut self.spilled);
            for (i, ctx, action) in spilled {
                self.route_actions(runs, i, vec![(ctx, action)]);
            }
        }
    }

    fn start_upstream_response(&mut self, run: &mut HttpRun, upstream: &UpstreamResponse) {
        let mut headers = vec![(
            ":status".to_string(),
            upstream.status.to_string().into_bytes(),
        )];
        headers.extend(
            upstream
                .headers
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone())),
        );
        headers.push((
            "content-length".into(),
            upstream.body.len().to_string().into_bytes(),
        ));
        self.send_response(
            run,
            headers,
            upstream.body.clone(),
            upstream.trailers.clone(),
        );
    }

    fn send_response(&mut self, run: &mut HttpRun, headers: Pairs, body: Vec<u8>, trailers: Pairs) {
        {
            let mut data = lock(&run.data);
            data.response_headers = headers;
            data.response_trailers = trailers.clone();
        }
        let has_body = !body.is_empty();
        let has_trailers = !trailers.is_empty();
        self.deliver(
            run,
            Dir::Response,
            0,
            Frame::Headers {
                eos: !has_body && !has_trailers,
            },
        );
        if has_body {
            self.deliver(
                run,
                Dir::Response,
                0,
                Frame::Data {
                    chunk: body,
                    eos: !has_trailers,
                },
            );
        }
        if has_trailers {
            self.deliver(run, Dir::Response, 0, Frame::Trailers);
        }
    }

    /// Moves a frame through the filters from position `k` on.
    fn deliver(&mut self, run: &mut HttpRun, dir: Dir, mut k: usize, mut frame: Frame) {
        let n = self.filters.len();
        let d = dir as usize;
        loop {
            if run.ended {
                return;
            }
            if k == n {
                self.sink(run, dir, frame);
                return;
            }
            let i = self.order(dir, k);
            let ctx = run.ctx[i];
            if !self.filters[i].is_serving() {
                // A VM that failed mid-stream is skipped, as Envoy does after failStream.
                k += 1;
                continue;
            }
            let stop_all = run.holds[d][k].stop_all;
            match frame {
                // Envoy keeps what arrives after a StopAll away from the filter.
                Frame::Data { chunk, eos } if stop_all => {
                    let hold = &mut run.holds[d][k];
                    hold.unseen_body.get_or_insert_with(Vec::new).extend(chunk);
                    hold.unseen_eos = eos;
                    return;
                }
                Frame::Trailers if stop_all => {
                    run.holds[d][k].unseen_trailers = true;
                    return;
                }
                Frame::Headers { eos } => {
                    self.set_open(i, ctx, dir, Part::Headers, true);
                    let count = {
                        let data = lock(&run.data);
                        match dir {
                            Dir::Request => data.request_headers.len(),
                            Dir::Response => data.response_headers.len(),
                        }
                    };
                    let export = match dir {
                        Dir::Request => "proxy_on_request_headers",
                        Dir::Response => "proxy_on_response_headers",
                    };
                    let action = self.filters[i].call_action(
                        ctx,
                        export,
                        (ctx, count as u32, eos as u32),
                        3,
                    );
                    let Some(resumed) = self.after_callback(run, i, action) else {
                        return;
                    };
                    if resumed {
                        self.set_open(i, ctx, dir, Part::Headers, false);
                        k += 1;
                        continue;
                    }
                    let stop_all = !self.filters[i].spec.allow_on_headers_stop_iteration;
                    let hold = &mut run.holds[d][k];
                    hold.stopped = true;
                    hold.headers = Some(eos);
                    hold.stop_all = stop_all;
                    return;
                }
                Frame::Data { chunk, eos } => {
                    let held = run.holds[d][k].buffering;
                    // A filter that is not buffering sees only the chunk it is passed (as in
                    // Envoy). The body field may hold what a later filter buffered so far: it
                    // is set aside for this call and put back after, never lost.
                    let (size, set_aside) = {
                        let mut data = lock(&run.data);
                        let body = body_mut(&mut data, dir);
                        let set_aside = if held {
                            None
                        } else {
                            Some(std::mem::take(body))
                        };
                        body.extend_from_slice(&chunk);
                        (body.len(), set_aside)
                    };
                    self.set_open(i, ctx, dir, Part::Body, true);
                    let export = match dir {
                        Dir::Request => "proxy_on_request_body",
                        Dir::Response => "proxy_on_response_body",
                    };
                    let action =
                        self.filters[i].call_action(ctx, export, (ctx, size as u32, eos as u32), 3);
                    let Some(resumed) = self.after_callback(run, i, action) else {
                        return;
                    };
                    let set_aside = set_aside.filter(|b| !b.is_empty());
                    if resumed {
                        // Continue: the held headers (if any) go first, then this body.
                        let visible = {
                            let mut data = lock(&run.data);
                            let body = body_mut(&mut data, dir);
                            let visible = std::mem::take(body);
                            if let Some(later) = set_aside {
                                *body = later;
                            }
                            visible
                        };
                        let hold = std::mem::take(&mut run.holds[d][k]);
                        self.set_open(i, ctx, dir, Part::Body, false);
                        self.set_open(i, ctx, dir, Part::Headers, false);
                        if hold.headers.is_some() {
                            self.deliver(run, dir, k + 1, Frame::Headers { eos: false });
                        }
                        frame = Frame::Data {
                            chunk: visible,
                            eos,
                        };
                        k += 1;
                        continue;
                    }
                    let hold = &mut run.holds[d][k];
                    hold.stopped = true;
                    hold.buffering = true;
                    hold.eos = eos;
                    if set_aside.is_some() {
                        hold.parked_downstream = set_aside;
                    }
                    return;
                }
                Frame::Trailers => {
                    let count = {
                        let data = lock(&run.data);
                        match dir {
                            Dir::Request => data.request_trailers.len(),
                            Dir::Response => data.response_trailers.len(),
                        }
                    };
                    self.set_open(i, ctx, dir, Part::Trailers, true);
                    let export = match dir {
                        Dir::Request => "proxy_on_request_trailers",
                        Dir::Response => "proxy_on_response_trailers",
                    };
                    let action =
                        self.filters[i].call_action(ctx, export, (ctx, count as u32, 0), 2);
                    let Some(resumed) = self.after_callback(run, i, action) else {
                        return;
                    };
                    if resumed {
                        self.release(run, dir, k, false);
                        self.set_open(i, ctx, dir, Part::Trailers, false);
                        frame = Frame::Trailers;
                        k += 1;
                        continue;
                    }
                    let hold = &mut run.holds[d][k];
                    hold.stopped = true;
                    hold.trailers = true;
                    return;
                }
            }
        }
    }

    /// Lets what filter position `k` holds go on: headers, buffered body, and (if
    /// `with_trailers`) trailers.
    fn release(&mut self, run: &mut HttpRun, dir: Dir, k: usize, with_trailers: bool) {
        let d = dir as usize;
        let hold = std::mem::take(&mut run.holds[d][k]);
        if !hold.stopped {
            return;
        }
        let i = self.order(dir, k);
        let ctx = run.ctx[i];
        self.set_open(i, ctx, dir, Part::Headers, false);
        self.set_open(i, ctx, dir, Part::Body, false);
        if let Some(eos) = hold.headers {
            self.deliver(run, dir, k + 1, Frame::Headers { eos });
        }
        if hold.stop_all {
            // What Envoy held back now goes through this filter first.
            if let Some(body) = hold.unseen_body {
                self.deliver(
                    run,
                    dir,
                    k,
                    Frame::Data {
                        chunk: body,
                        eos: hold.unseen_eos,
                    },
                );
            }
            if hold.unseen_trailers {
                self.deliver(run, dir, k, Frame::Trailers);
            }
            return;
        }
        if hold.buffering {
            let body = {
                let mut data = lock(&run.data);
                let field = body_mut(&mut data, dir);
                let own = std::mem::take(field);
                if let Some(later) = hold.parked_downstream {
                    *field = later;
                }
                own
            };
            self.deliver(
                run,
                dir,
                k + 1,
                Frame::Data {
                    chunk: body,
                    eos: hold.eos && !hold.trailers,
                },
            );
        }
        if with_trailers && hold.trailers {
            self.set_open(i, ctx, dir, Part::Trailers, false);
            self.deliver(run, dir, k + 1, Frame::Trailers);
        }
    }

    /// Applies what the guest deferred, then says whether iteration goes on (`Some(true)`),
    /// stops at this filter (`Some(false)`), or the stream ended (`None`).
    fn after_callback(
        &mut self,
        run: &mut HttpRun,
        i: usize,
        action: Result<Action, String>,
    ) -> Option<bool> {
        let action = match action {
            Ok(a) => a,
            Err(why) => {
                self.fail_stream(run, &why);
                return None;
            }
        };
        let resumed = self.apply_deferred(run, i);
        if run.ended {
            return None;
        }
        Some(action == Action::Continue || resumed)
    }

    /// Applies a filter's deferred actions for `run`; actions on other streams wait in the
    /// spill queue. Returns true if it asked to continue the direction it is not stopped in
    /// (the callback that made the request then continues).
    fn apply_deferred(&mut self, run: &mut HttpRun, i: usize) -> bool {
        let mut resumed = false;
        for (ctx, action) in self.filters[i].take_deferred() {
            if run.ctx.get(i) == Some(&ctx) {
                resumed |= self.apply_action(run, i, action);
            } else {
                self.spilled.push((i, ctx, action));
            }
        }
        resumed
    }

    fn apply_action(&mut self, run: &mut HttpRun, i: usize, action: Deferred) -> bool {
        if let (Deferred::LocalResponse(second), Some(first)) = (&action, &run.outcome.local_reply)
        {
            // Envoy sends the first and drops the rest; a filter that tries twice has lost
            // track of its own decision.
            run.outcome.contract_violations.push(format!(
                "filter {} sent a second local response ({}) after {} on the same request; \
                 Envoy sends only one local response per stream",
                self.filters[i].spec.name, second.status, first.status
            ));
            return false;
        }
        if run.ended {
            return false;
        }
        match action {
            Deferred::LocalResponse(reply) => self.local_reply(run, reply),
            Deferred::Continue(stream) => {
                let dir = match stream {
                    StreamType::Request => Dir::Request,
                    StreamType::Response => Dir::Response,
                    _ => return false,
                };
                let k = match dir {
                    Dir::Request => i,
                    Dir::Response => self.filters.len() - 1 - i,
                };
                if !run.holds[dir as usize][k].stopped {
                    return true;
                }
                self.release(run, dir, k, true);
            }
            Deferred::Close(_) => {
                run.outcome.reset = true;
                run.ended = true;
            }
        }
        false
    }

    fn local_reply(&mut self, run: &mut HttpRun, reply: LocalResponse) {
        if let Some(hint) = self.body_held_back(run) {
            run.outcome.hints.push(hint);
        }
        let mut headers = vec![(":status".to_string(), reply.status.to_string().into_bytes())];
        let mut extra = reply.headers.clone();
        if !reply.body.is_empty() && header(&extra, "content-type").is_none() {
            extra.push(("content-type".into(), b"text/plain".to_vec()));
        }
        headers.extend(extra);
        headers.push((
            "content-length".into(),
            reply.body.len().to_string().into_bytes(),
        ));
        run.outcome.local_reply = Some(reply.clone());
        if run.response_started {
            if run.outcome.status != 0 {
                // Headers already reached the client: all Envoy can do is reset.
                run.outcome.reset = true;
                run.ended = true;
                return;
            }
            // The upstream response is replaced; it goes straight to the client.
            run.outcome.status = reply.status;
            run.outcome.headers = headers;
            run.outcome.body = reply.body;
            run.ended = true;
            return;
        }
        // Nothing more goes upstream; the reply goes through every filter's response path.
        run.response_started = true;
        for hold in run.holds[0].iter_mut() {
            *hold = Hold::default();
        }
        lock(&run.data).response_body.clear();
        self.send_response(run, headers, reply.body, Vec::new());
        if !run.ended {
            // A filter paused the local reply: Envoy would wait; we record it as stalled.
            run.outcome.stalled = true;
            run.ended = true;
        }
    }

    /// A failed VM or a trap: the stream gets 503 and nothing more goes upstream.
    fn fail_stream(&mut self, run: &mut HttpRun, why: &str) {
        self.shared
            .log("host-harness", 4, format!("failing stream closed: {why}"));
        run.upstream.complete = false;
        run.outcome.upstream = None;
        run.outcome.status = 503;
        run.outcome.headers = vec![
            (":status".into(), b"503".to_vec()),
            ("content-type".into(), b"text/plain".to_vec()),
        ];
        run.outcome.body = b"wasm_fail_stream".to_vec();
        run.outcome.local_reply = Some(LocalResponse {
            status: 503,
            details: "wasm_fail_stream".into(),
            body: Vec::new(),
            headers: Vec::new(),
            grpc_status: -1,
        });
        run.ended = true;
    }

    fn sink(&mut self, run: &mut HttpRun, dir: Dir, frame: Frame) {
        let data = lock(&run.data);
        match dir {
            Dir::Request => {
                let up = &mut run.upstream;
                match frame {
                    Frame::Headers { eos } => {
                        up.headers = data.request_headers.clone();
                        up.complete = eos;
                    }
                    Frame::Data { chunk, eos } => {
                        up.body.extend_from_slice(&chunk);
                        up.complete = eos;
                    }
                    Frame::Trailers => {
                        up.trailers = data.request_trailers.clone();
                        up.complete = true;
                    }
                }
                run.outcome.upstream = Some(up.clone());
            }
            Dir::Response => {
                let out = &mut run.outcome;
                match frame {
                    Frame::Headers { eos } => {
                        out.headers = data.response_headers.clone();
                        out.status = header(&out.headers, ":status")
                            .and_then(|s| s.parse().ok())
                            .unwrap_or(0);
                        run.ended = eos;
                    }
                    Frame::Data { chunk, eos } => {
                        out.body.extend_from_slice(&chunk);
                        run.ended = eos;
                    }
                    Frame::Trailers => {
                        out.trailers = data.response_trailers.clone();
                        run.ended = true;
                    }
                }
            }
        }
    }

    fn set_open(&mut self, i: usize, ctx: u32, dir: Dir, part: Part, value: bool) {
        if let Some(open) = self.filters[i].open_mut(ctx) {
            match (dir, part) {
                (Dir::Request, Part::Headers) => open.request_headers = value,
                (Dir::Request, Part::Body) => open.request_body = value,
                (Dir::Request, Part::Trailers) => open.request_trailers = value,
                (Dir::Response, Part::Headers) => open.response_headers = value,
                (Dir::Response, Part::Body) => open.response_body = value,
                (Dir::Response, Part::Trailers) => open.response_trailers = value,
            }
        }
    }

    /// Ends a stream's contexts (done, log, delete) and drops what it deferred. Its callouts
    /// stay in flight: Envoy does not cancel them (seen in Envoy 1.40's logs: the answer still
    /// arrives), and the SDK discards an answer whose context is gone.
    fn finish_http(&mut self, run: &mut HttpRun) {
        if run.finished {
            return;
        }
        run.finished = true;
        for (i, ctx) in run.ctx.iter().enumerate() {
            self.filters[i].finish_stream(*ctx);
            self.filters[i]
                .state_mut()
                .deferred
                .retain(|(c, _)| c != ctx);
            self.spilled.retain(|(vm, c, _)| !(*vm == i && c == ctx));
        }
    }

    // ================= TCP (network filters) =================

    /// Runs a TCP connection through network filters. Callouts are answered as soon as they
    /// are made.
    pub fn connection(
        &mut self,
        properties: BTreeMap<String, Vec<u8>>,
        events: &[NetEvent],
    ) -> NetOutcome {
        let log_start = self.callout_log.len();
        if let Err(e) = self.reload_failed_vms() {
            self.shared
                .log("host-harness", 4, format!("reloading a failed VM: {e:#}"));
        }
        // Closes of earlier streams no longer matter.
        self.background_closes.clear();
        self.net_spilled.clear();
        let mut run = self.open_connection(properties);
        self.net_callouts(&mut run);
        for event in events {
            if run.outcome.closed_by_filter {
                break;
            }
            match event {
                NetEvent::Downstream { data, end_stream } => {
                    self.net_data(&mut run, NetDir::Downstream, 0, data.clone(), *end_stream)
                }
                NetEvent::Upstream { data, end_stream } => {
                    self.net_data(&mut run, NetDir::Upstream, 0, data.clone(), *end_stream)
                }
                NetEvent::AdvanceClock { millis } => self.advance_clock(*millis),
            }
            self.net_callouts(&mut run);
            self.net_background_closes(&mut run);
        }
        self.close_connection(&mut run);
        self.net_spilled.clear();
        run.outcome.callouts = self.callout_log[log_start..].to_vec();
        run.outcome
    }

    /// Runs several TCP connections through network filters at once, their events
    /// interleaved. Callouts wait until an [`MultiNetEvent::AnswerCallouts`] answers every one
    /// made so far (and what those answers lead to), so connections can share one; a call
    /// whose connection closed first is dropped, as Envoy cancels it with the context. What a
    /// callback does to another connection (through `proxy_set_effective_context`: writing
    /// its buffer, resuming or closing it) reaches that connection. Returns each connection's
    /// outcome and every callout made.
    pub fn connections(
        &mut self,
        properties: Vec<BTreeMap<String, Vec<u8>>>,
        events: &[MultiNetEvent],
    ) -> (Vec<NetOutcome>, Vec<CalloutRecord>) {
        let log_start = self.callout_log.len();
        if let Err(e) = self.reload_failed_vms() {
            self.shared
                .log("host-harness", 4, format!("reloading a failed VM: {e:#}"));
        }
        self.background_closes.clear();
        self.net_spilled.clear();
        self.hold_callouts = true;
        let mut runs: Vec<NetRun> = properties
            .into_iter()
            .map(|p| self.open_connection(p))
            .collect();
        let mut held = Vec::new();
        self.hold_calls(&mut held);
        self.route_net_spilled(&mut runs);
        for event in events {
            match event {
                MultiNetEvent::On(c, NetEvent::Downstream { data, end_stream }) => {
                    if let Some(run) = runs.get_mut(*c).filter(|r| r.live()) {
                        self.net_data(run, NetDir::Downstream, 0, data.clone(), *end_stream);
                    }
                }
                MultiNetEvent::On(c, NetEvent::Upstream { data, end_stream }) => {
                    if let Some(run) = runs.get_mut(*c).filter(|r| r.live()) {
                        self.net_data(run, NetDir::Upstream, 0, data.clone(), *end_stream);
                    }
                }
                MultiNetEvent::On(_, NetEvent::AdvanceClock { millis }) => {
                    self.advance_clock(*millis)
                }
                MultiNetEvent::Close(c) => {
                    if let Some(run) = runs.get_mut(*c).filter(|r| !r.client_closed) {
                        self.close_connection(run);
                    }
                }
                MultiNetEvent::AnswerCallouts => self.answer_held_calls(&mut runs, &mut held),
            }
            self.hold_calls(&mut held);
            self.route_net_spilled(&mut runs);
        }
        for run in runs.iter_mut().filter(|r| !r.client_closed) {
            self.close_connection(run);
        }
        self.hold_callouts = false;
        self.net_spilled.clear();
        let made = self.callout_log[log_start..].to_vec();
        let outcomes = runs.into_iter().map(|r| r.outcome).collect();
        (outcomes, made)
    }

    /// Takes the callouts made since (recorded in the log), to answer later.
    fn hold_calls(&mut self, held: &mut Vec<(usize, crate::host::PendingCall)>) {
        for i in 0..self.filters.len() {
            for call in self.filters[i].take_pending_calls() {
                self.callout_log.push(CalloutRecord::of(&call));
                held.push((i, call));
            }
        }
    }

    /// Answers every held callout, and those the answers lead to, routing what the guest did
    /// to the connections it acted on.
    fn answer_held_calls(
        &mut self,
        runs: &mut [NetRun],
        held: &mut Vec<(usize, crate::host::PendingCall)>,
    ) {
        for _ in 0..1000 {
            self.hold_calls(held);
            if held.is_empty() {
                return;
            }
            for (i, call) in std::mem::take(held) {
                let cancelled = runs
                    .iter()
                    .any(|r| r.client_closed && r.ctx.get(i) == Some(&call.context_id));
                if cancelled {
                    continue;
                }
                let answer = self.resolver.resolve(&call, &self.shared);
                let delivered = self.filters[i].deliver_call_response(
                    call.context_id,
                    call.token,
                    answer_to_response(answer),
                );
                if delivered.is_err() {
                    for run in runs.iter_mut() {
                        run.outcome.closed_by_filter = true;
                    }
                }
                for (ctx, action) in self.filters[i].take_deferred() {
                    self.net_spilled.push((i, ctx, action));
                }
                self.collect_background_closes();
                self.route_net_spilled(runs);
            }
        }
    }

    /// Applies actions taken on other connections than the one called back to those
    /// connections (by filter index and context id).
    fn route_net_spilled(&mut self, runs: &mut [NetRun]) {
        for _ in 0..1000 {
            let spilled = std::mem::take(&mut self.net_spilled);
            if spilled.is_empty() {
                return;
            }
            for (i, ctx, action) in spilled {
                if let Some(run) = runs
                    .iter_mut()
                    .find(|r| r.live() && r.ctx.get(i) == Some(&ctx))
                {
                    self.apply_net_action(run, action);
                }
            }
        }
    }

    /// Opens a connection: creates its contexts and calls `proxy_on_new_connection`.
    fn open_connection(&mut self, mut properties: BTreeMap<String, Vec<u8>>) -> NetRun {
        self.connection_properties(&mut properties);
        // Envoy calls on_new_connection before the TLS handshake: the peer's certificate facts
        // (connection.mtls, connection.*_peer_certificate, ...) appear with the first data.
        let (handshake, before): (BTreeMap<_, _>, BTreeMap<_, _>) = properties
            .into_iter()
            .partition(|(k, _)| is_handshake_property(k));
        let data = Arc::new(Mutex::new(StreamData {
            properties: before,
            ..Default::default()
        }));
        let mut run = NetRun {
            data: data.clone(),
            ctx: Vec::new(),
            held: [
                vec![Vec::new(); self.filters.len()],
                vec![Vec::new(); self.filters.len()],
            ],
            stopped_at: [None, None],
            outcome: NetOutcome::default(),
            client_closed: false,
        };
        if self.filters.iter().any(|vm| !vm.is_serving()) {
            run.outcome.closed_by_filter = true;
            return run;
        }
        for i in 0..self.filters.len() {
            match self.filters[i].create_stream(data.clone()) {
                Ok(id) => run.ctx.push(id),
                Err(_) => {
                    run.outcome.closed_by_filter = true;
                    return run;
                }
            }
        }
        for i in 0..self.filters.len() {
            let ctx = run.ctx[i];
            let r = self.filters[i].call_action(ctx, "proxy_on_new_connection", (ctx, 0, 0), 1);
            if r.is_err() {
                run.outcome.closed_by_filter = true;
                break;
            }
            self.net_deferred(&mut run, i);
        }
        if let Ok(mut d) = data.lock() {
            d.properties.extend(handshake);
        }
        run
    }

    /// The connection ends: close notifications, then its contexts are done.
    fn close_connection(&mut self, run: &mut NetRun) {
        run.client_closed = true;
        let closers = [
            "proxy_on_downstream_connection_close",
            "proxy_on_upstream_connection_close",
        ];
        for (i, ctx) in run.ctx.clone().into_iter().enumerate() {
            for export in closers {
                if self.filters[i].is_serving() {
                    let _ = self.filters[i].call_void(ctx, export, &[ctx, PEER_REMOTE as u32]);
                }
            }
            self.filters[i].finish_stream(ctx);
        }
    }

    fn net_data(&mut self, run: &mut NetRun, dir: NetDir, mut k: usize, chunk: Vec<u8>, eos: bool) {
        let n = self.filters.len();
        let d = dir as usize;
        let mut chunk = chunk;
        self.sync_held(run, dir);
        while k < n {
            if run.outcome.closed_by_filter {
                return;
            }
            let i = match dir {
                NetDir::Downstream => k,
                NetDir::Upstream => n - 1 - k,
            };
            let ctx = run.ctx[i];
            // Data a filter paused on stays in its buffer and grows with the next read.
            let mut buffer = std::mem::take(&mut run.held[d][k]);
            buffer.extend_from_slice(&chunk);
            let size = buffer.len();
            {
                let mut data = lock(&run.data);
                *net_buffer(&mut data, dir) = buffer;
            }
            if let Some(open) = self.filters[i].open_mut(ctx) {
                match dir {
                    NetDir::Downstream => open.downstream = true,
                    NetDir::Upstream => open.upstream = true,
                }
            }
            let export = match dir {
                NetDir::Downstream => "proxy_on_downstream_data",
                NetDir::Upstream => "proxy_on_upstream_data",
            };
            let action =
                self.filters[i].call_action(ctx, export, (ctx, size as u32, eos as u32), 3);
            let paused = matches!(action, Ok(Action::Pause));
            if paused {
                // Envoy keeps the paused filter's handle on the buffer: a later callback
                // (a callout answer, through its context) may still change it.
                run.stopped_at[d] = Some(k);
                run.held[d][k] = lock(&run.data).net_buffer_copy(dir);
            } else if let Some(open) = self.filters[i].open_mut(ctx) {
                match dir {
                    NetDir::Downstream => open.downstream = false,
                    NetDir::Upstream => open.upstream = false,
                }
            }
            let resumed = self.net_deferred(run, i);
            match action {
                Err(_) => {
                    run.outcome.closed_by_filter = true;
                    return;
                }
                Ok(Action::Pause) if !resumed => return,
                Ok(_) => {
                    let buffer = if paused {
                        // Continued from within its own callback.
                        run.stopped_at[d] = None;
                        std::mem::take(&mut run.held[d][k])
                    } else {
                        std::mem::take(net_buffer(&mut lock(&run.data), dir))
                    };
                    chunk = buffer;
                    k += 1;
                }
            }
        }
        if chunk.is_empty() && !eos {
            return;
        }
        match dir {
            NetDir::Downstream => run.outcome.to_upstream.extend_from_slice(&chunk),
            NetDir::Upstream => run.outcome.to_downstream.extend_from_slice(&chunk),
        }
    }

    /// What a paused filter's buffer holds now (it may have been written since the pause).
    fn sync_held(&mut self, run: &mut NetRun, dir: NetDir) {
        let d = dir as usize;
        if let Some(k) = run.stopped_at[d] {
            run.held[d][k] = lock(&run.data).net_buffer_copy(dir);
        }
    }

    /// A tick closed this connection (set_effective_context + close_stream).
    fn net_background_closes(&mut self, run: &mut NetRun) {
        let ctx = &run.ctx;
        let before = self.background_closes.len();
        self.background_closes
            .retain(|(i, c)| ctx.get(*i) != Some(c));
        if self.background_closes.len() != before {
            run.outcome.closed_by_filter = true;
        }
    }

    /// Applies what filter `i` deferred on this connection; actions on other contexts are
    /// kept for [`Self::route_net_spilled`]. True when the filter continued within its own
    /// callback.
    fn net_deferred(&mut self, run: &mut NetRun, i: usize) -> bool {
        let mut resumed = false;
        for (ctx, action) in self.filters[i].take_deferred() {
            if run.ctx.get(i) != Some(&ctx) {
                self.net_spilled.push((i, ctx, action));
                continue;
            }
            resumed |= self.apply_net_action(run, action);
        }
        resumed
    }

    /// One deferred action on this connection; true for a continue with nothing paused (the
    /// filter continued within its own callback).
    fn apply_net_action(&mut self, run: &mut NetRun, action: Deferred) -> bool {
        match action {
            Deferred::Close(_) => run.outcome.closed_by_filter = true,
            Deferred::Continue(stream) => {
                let dir = match stream {
                    StreamType::Upstream => NetDir::Upstream,
                    _ => NetDir::Downstream,
                };
                let d = dir as usize;
                self.sync_held(run, dir);
                match run.stopped_at[d].take() {
                    Some(k) => {
                        let held = std::mem::take(&mut run.held[d][k]);
                        self.net_data(run, dir, k + 1, held, false);
                    }
                    None => return true,
                }
            }
            Deferred::LocalResponse(_) => {}
        }
        false
    }

    fn net_callouts(&mut self, run: &mut NetRun) {
        for _ in 0..1000 {
            let mut any = false;
            for i in 0..self.filters.len() {
                for call in self.filters[i].take_pending_calls() {
                    any = true;
                    self.callout_log.push(CalloutRecord::of(&call));
                    let answer = self.resolver.resolve(&call, &self.shared);
                    if self.filters[i]
                        .deliver_call_response(
                            call.context_id,
                            call.token,
                            answer_to_response(answer),
                        )
                        .is_err()
                    {
                        run.outcome.closed_by_filter = true;
                    }
                    self.net_deferred(run, i);
                }
            }
            if !any {
                return;
            }
        }
    }
}

/// The connection properties Envoy knows only once the TLS handshake is done.
fn is_handshake_property(name: &str) -> bool {
    name == "connection.mtls"
        || name == "connection.tls_version"
        || (name.starts_with("connection.") && name.contains("peer_certificate"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Headers,
    Body,
    Trailers,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NetDir {
    Downstream,
    Upstream,
}

struct NetRun {
    data: SharedStream,
    ctx: Vec<u32>,
    held: [Vec<Vec<u8>>; 2],
    stopped_at: [Option<usize>; 2],
    outcome: NetOutcome,
    /// The connection ended (its contexts are done).
    client_closed: bool,
}

impl NetRun {
    /// Still open on both sides of the filters.
    fn live(&self) -> bool {
        !self.client_closed && !self.outcome.closed_by_filter
    }
}

#[derive(Debug, Clone)]
pub enum NetEvent {
    Downstream { data: Vec<u8>, end_stream: bool },
    Upstream { data: Vec<u8>, end_stream: bool },
    AdvanceClock { millis: u64 },
}

/// What happens on one of several connections ([`Chain::connections`]).
#[derive(Debug, Clone)]
pub enum MultiNetEvent {
    /// On connection n (a clock step is for all).
    On(usize, NetEvent),
    /// The client closes connection n.
    Close(usize),
    /// Every callout made so far is answered (and those the answers lead to).
    AnswerCallouts,
}

#[derive(Debug, Clone, Default)]
pub struct NetOutcome {
    pub to_upstream: Vec<u8>,
    pub to_downstream: Vec<u8>,
    pub closed_by_filter: bool,
    /// Callouts made while the connection ran ([`Chain::connection`]).
    pub callouts: Vec<CalloutRecord>,
}

fn body_mut(data: &mut StreamData, dir: Dir) -> &mut Vec<u8> {
    match dir {
        Dir::Request => &mut data.request_body,
        Dir::Response => &mut data.response_body,
    }
}

impl StreamData {
    fn net_buffer_copy(&self, dir: NetDir) -> Vec<u8> {
        match dir {
            NetDir::Downstream => self.downstream_data.clone(),
            NetDir::Upstream => self.upstream_data.clone(),
        }
    }
}

fn net_buffer(data: &mut StreamData, dir: NetDir) -> &mut Vec<u8> {
    match dir {
        NetDir::Downstream => &mut data.downstream_data,
        NetDir::Upstream => &mut data.upstream_data,
    }
}

fn answer_to_response(answer: CalloutAnswer) -> Option<CallResponse> {
    match answer {
        CalloutAnswer::Response(r) => Some(r),
        CalloutAnswer::Reset => None,
    }
}

/// Envoy's `request.*` attributes, derived from the request headers.
fn add_request_properties(headers: &Pairs, props: &mut BTreeMap<String, Vec<u8>>, now: u64) {
    let get = |name: &str| header(headers, name).unwrap_or_default();
    let path = get(":path");
    let (url_path, query) = match path.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (path.clone(), String::new()),
    };
    let mut set = |key: &str, value: Vec<u8>| {
        props.entry(key.to_string()).or_insert(value);
    };
    set("request.path", path.clone().into_bytes());
    set("request.url_path", url_path.into_bytes());
    set("request.query", query.into_bytes());
    set("request.host", get(":authority").into_bytes());
    set("request.method", get(":method").into_bytes());
    set(
        "request.scheme",
        {
            let s = get(":scheme");
            if s.is_empty() {
                "http".into()
            } else {
                s
            }
        }
        .into_bytes(),
    );
    set("request.protocol", b"HTTP/1.1".to_vec());
    set("request.time", (now as i64).to_le_bytes().to_vec());
    for (prop, name) in [
        ("request.id", "x-request-id"),
        ("request.referer", "referer"),
        ("request.useragent", "user-agent"),
    ] {
        if let Some(v) = header(headers, name) {
            set(prop, v.into_bytes());
        }
    }
}
