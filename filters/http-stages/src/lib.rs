//! The one driver of every HTTP filter. A filter is a list of *stages* (token-auth,
//! device-ownership, entity-acl); the separate filters run one stage each, `ngsi-gateway`
//! runs several in one pass. The driver is the only `RootContext`/`HttpContext` of them all.
//!
//! Per stream the driver reads the request headers once ([`Request`]), runs the stages in
//! order from a cursor, and executes what each returns ([`Step`]):
//! - `Next`: the stage passed; the next one runs (after the last, the request goes on).
//! - `NeedBody`: the stage decides on the whole body. The driver holds the request until the
//!   body (or trailers) arrived, reads it once into [`Request::body`] for every later stage,
//!   answers a body over the stage's limit through [`Stage::on_body_too_large`] and a body
//!   that does not arrive in time through [`Stage::on_body_timeout`] (on the root tick).
//! - `Wait`: the stage made (or joined) a callout; the request (and its body) is held. When
//!   the answer arrives the stage names the streams it settles, and the driver resumes each
//!   one (as the effective context) with [`Stage::resume`], then goes on FROM THE NEXT STAGE.
//! - `Deny`: the driver sends the one local response and the stream stops.
//!
//! Responses. Once the request went upstream, the response passes the stages in REVERSE
//! order (the last stage first), as Envoy runs the encoder side of separate filters, so a chain
//! in one module behaves as the same filters chained in Envoy. Each stage's [`Stage::on_response`]
//! returns the same [`Step`]s, with the response meaning:
//! - `Next`: done with the response; the stage before it runs (after the first, it goes on).
//! - `NeedBody`: the driver holds the response headers until the whole body (or trailers)
//!   arrived, reads it once into [`Response::body`], and calls [`Stage::on_response_body`]
//!   (over [`Stage::response_body_limit`]: [`Stage::on_response_body_too_large`]).
//! - `Wait`: a callout is in flight; the driver resumes the stream with
//!   [`Stage::resume_response`] when the stage names it settled, then goes on from the stage
//!   before it.
//! - `Deny`: the response is replaced by the one local response (e.g. 503 when an answer
//!   can't be checked); no earlier stage sees it.
//!
//! A stage changes what the client gets through [`Response::set_header`] and
//! [`Response::replace_body`]. A response to a request the module denied (its own local
//! response) or never let through passes untouched. Stages that don't override the response
//! hooks cost nothing: the response headers are read only when a stage asks for them.
//!
//! A stage logs and counts its own decision (the decision line names the stage, as the
//! separate filters always did); the driver only moves requests and responses along. Every
//! callback on a stream runs inside `proxy_glue::one_stream_callback`, so the stages that
//! decide in it export their filter state once (the last line's, as Envoy's filter state would
//! keep it) and read the host's clock once. Counters and the log level cost a request no host
//! call: the root's tick flushes the one and re-reads the other (`proxy_glue::on_root_tick`).

pub mod device_ownership;
pub mod entity_acl;
mod registry_token;
mod request;
mod response;
pub mod token_auth;

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::rc::Rc;

use policy::DenyReason;
use proxy_glue::host;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType};

pub use proxy_glue::now_millis;

/// A map keyed by a stream's context id. The ids are the host's (not a client's choice), so
/// they need no keyed hash: SipHash of a `u32` cost more than the rest of a lookup, and the
/// driver and the stages look a stream up several times per callback.
pub type ByStream<V> = HashMap<u32, V, BuildHasherDefault<StreamIdHasher>>;

/// Spreads a context id over the hash with one multiplication (Fibonacci hashing; the map
/// uses both the high and the low bits).
#[derive(Debug, Default, Clone, Copy)]
pub struct StreamIdHasher(u64);

/// 2^64 divided by the golden ratio.
const FIBONACCI: u64 = 0x9E37_79B9_7F4A_7C15;

impl Hasher for StreamIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(FIBONACCI);
        }
    }

    fn write_u32(&mut self, id: u32) {
        self.0 = (self.0 ^ u64::from(id)).wrapping_mul(FIBONACCI);
    }
}
pub use request::{Caller, Request};
pub use response::Response;

/// What a stage wants done with the request (or, from the response hooks, the response).
#[derive(Debug)]
pub enum Step {
    /// Passed: the next stage runs.
    Next,
    /// Call [`Stage::on_body`] once the whole body has arrived.
    NeedBody,
    /// A callout is in flight; the stage names this stream when it is settled.
    Wait,
    /// Stop here with this (client-facing) reason and extra response headers.
    Deny {
        reason: DenyReason,
        headers: Vec<(&'static str, String)>,
    },
}

impl Step {
    pub fn deny(reason: DenyReason) -> Self {
        Step::Deny {
            reason,
            headers: Vec::new(),
        }
    }
}

/// One HTTP concern. Every method runs with the request's stream as the effective context.
pub trait Stage {
    /// The filter name the stage's decision lines and logs carry (`entity-acl`).
    fn name(&self) -> &'static str;

    /// The request headers arrived (and every earlier stage passed).
    fn on_request(&mut self, req: &mut Request) -> Step;

    /// After `NeedBody`: the whole body is in `req.body`.
    fn on_body(&mut self, _req: &mut Request) -> Step {
        Step::Next
    }

    /// The largest body this stage takes (after `NeedBody`).
    fn body_limit(&self) -> usize {
        usize::MAX
    }

    /// How long this stage waits for a body it needs (None: as long as Envoy does).
    fn body_timeout_ms(&self) -> Option<u64> {
        None
    }

    /// The body grew over [`Stage::body_limit`].
    fn on_body_too_large(&mut self, req: &mut Request) -> Step {
        let limit = self.body_limit();
        self.refuse(
            req,
            DenyReason::PayloadTooLarge(format!("request body larger than {limit} bytes")),
        )
    }

    /// The body did not arrive within [`Stage::body_timeout_ms`].
    fn on_body_timeout(&mut self, req: &mut Request) -> Step {
        self.refuse(
            req,
            DenyReason::Unavailable("the request body did not arrive in time".into()),
        )
    }

    /// The request could not be judged (headers or body unreadable): the stage records its
    /// refusal (decision line, counters) and says what to answer.
    fn refuse(&mut self, req: &mut Request, reason: DenyReason) -> Step;

    /// After `Wait`, once the stage named this stream settled.
    fn resume(&mut self, _req: &mut Request) -> Step {
        Step::Next
    }

    /// The response headers arrived (the request passed every stage; the stages after this
    /// one are done with the response). Runs with the response held, so it may change headers.
    fn on_response(&mut self, _req: &Request, _resp: &mut Response) -> Step {
        Step::Next
    }

    /// After `NeedBody` from [`Stage::on_response`]: the whole body is in `resp.body`.
    fn on_response_body(&mut self, _req: &Request, _resp: &mut Response) -> Step {
        Step::Next
    }

    /// The largest response body this stage takes (after `NeedBody`).
    fn response_body_limit(&self) -> usize {
        usize::MAX
    }

    /// The response body grew over [`Stage::response_body_limit`]: 503 unless the stage says
    /// otherwise (an answer the stage had to check and could not is never passed).
    fn on_response_body_too_large(&mut self, _req: &Request, _resp: &mut Response) -> Step {
        Step::deny(DenyReason::Unavailable(
            "the response could not be checked".into(),
        ))
    }

    /// After `Wait` in the response phase, once the stage named this stream settled.
    fn resume_response(&mut self, _req: &Request, _resp: &mut Response) -> Step {
        Step::Next
    }

    /// A callout answer arrived (read it with `proxy_glue::callout_answer` now: the current
    /// context is the one that made the call). None: not this stage's call; otherwise the
    /// streams it settles.
    fn on_callout(&mut self, _token: u32) -> Option<Vec<u32>> {
        None
    }

    /// Whether the stage needs the root's once-a-second tick.
    fn needs_ticks(&self) -> bool {
        false
    }

    /// A shorter tick period (milliseconds) the stage needs right now, None when the
    /// once-a-second tick will do: calls wait for something only its tick can see (another
    /// VM's registry token, `TokenKeeper::wants_prompt_tick`). Asked after every callback; the
    /// driver sets the root's period when the shortest wanted changes.
    fn prompt_tick_ms(&self) -> Option<u64> {
        None
    }

    /// The tick (the root is the effective context); returns the streams it settled (in either
    /// phase).
    fn on_tick(&mut self) -> Vec<u32> {
        Vec::new()
    }

    /// The stream ended (the stage drops what it kept for it).
    fn forget(&mut self, _ctx: u32) {}
}

/// Builds a filter's stages from its plugin configuration (inside `on_configure`); None when
/// the configuration is refused (the builder has logged why).
pub type Build = fn() -> Option<Vec<Box<dyn Stage>>>;

thread_local! {
    /// The filter's name and stage builder, set once by [`main`] (the SDK's root-context
    /// factory is a plain `fn`, so it can't capture them).
    static FILTER: std::cell::Cell<Option<(&'static str, Build)>> = const { std::cell::Cell::new(None) };
}

/// The entry point of every HTTP filter cdylib: `proxy_wasm::main! {{ http_stages::main(...) }}`.
pub fn main(filter: &'static str, build: Build) {
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_glue::install_panic_hook();
    FILTER.with(|f| f.set(Some((filter, build))));
    proxy_wasm::set_root_context(|id| {
        let (filter, build) = FILTER
            .with(|f| f.get())
            .unwrap_or(("http-stages", no_stages));
        Box::new(Root {
            id,
            filter,
            build,
            pipeline: None,
        })
    });
}

fn no_stages() -> Option<Vec<Box<dyn Stage>>> {
    None
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// A stage is running (inside a callback).
    Running,
    /// The stage at the cursor waits for the body (since the time in ms).
    AwaitingBody { since_ms: u64 },
    /// The stage at the cursor waits for a callout.
    Waiting,
    /// Every stage passed: the request (or response) went on.
    Passed,
    /// Denied (the local response is on its way).
    Stopped,
}

struct Flow {
    request: Request,
    cursor: usize,
    phase: Phase,
    /// Bytes of body Envoy has buffered so far, and whether it is all there.
    body_size: usize,
    body_complete: bool,
    body_read: bool,
    /// The response side, once response headers arrived for a request that went on.
    response: Option<ResponseFlow>,
}

/// Where a response is in the stages (they run in reverse order).
struct ResponseFlow {
    response: Response,
    /// The stages still to run: the current one is `left - 1`.
    left: usize,
    phase: Phase,
    body_size: usize,
    body_complete: bool,
    body_read: bool,
}

struct Pipeline {
    stages: Vec<Box<dyn Stage>>,
    flows: ByStream<Flow>,
    /// The root's tick period as last set (ms).
    tick_ms: u64,
}

/// The root's tick period when no stage wants a shorter one.
const TICK_MS: u64 = proxy_glue::counters::FLUSH_PERIOD.as_millis() as u64;

type Shared = Rc<RefCell<Pipeline>>;

struct Root {
    id: u32,
    filter: &'static str,
    build: Build,
    pipeline: Option<Shared>,
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, _: usize, _: usize, _: usize) {
        if let Some(pipeline) = &self.pipeline {
            pipeline.borrow_mut().run(|p| p.on_callout(self.id, token));
        }
    }

    /// The plugin is going away (removed, or replaced by a new configuration): what the VM
    /// counted since its last tick reaches Envoy first.
    fn on_done(&mut self) -> bool {
        proxy_glue::flush_counters();
        true
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(stages) = (self.build)() else {
            return false;
        };
        if stages.is_empty() {
            log::error!("{}: configuration refused: no stage to run", self.filter);
            return false;
        }
        // Every root ticks: the tick hands the counters to Envoy (`proxy_glue::counters`) and
        // re-reads the log level (`proxy_glue::on_root_tick`), and runs the stages that need it
        // (key refreshes, orphaned callouts, body timeouts).
        self.set_tick_period(proxy_glue::counters::FLUSH_PERIOD);
        self.pipeline = Some(Rc::new(RefCell::new(Pipeline {
            stages,
            flows: ByStream::default(),
            tick_ms: TICK_MS,
        })));
        true
    }

    fn on_tick(&mut self) {
        if let Some(pipeline) = &self.pipeline {
            pipeline.borrow_mut().run(|p| p.on_tick(self.id));
        }
        proxy_glue::on_root_tick();
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            id: context_id,
            pipeline: self.pipeline.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    id: u32,
    pipeline: Option<Shared>,
}

impl Context for Stream {
    fn on_http_call_response(&mut self, token: u32, _: usize, _: usize, _: usize) {
        if let Some(pipeline) = &self.pipeline {
            pipeline.borrow_mut().run(|p| p.on_callout(self.id, token));
        }
    }

    fn on_done(&mut self) -> bool {
        if let Some(pipeline) = &self.pipeline {
            pipeline.borrow_mut().run(|p| p.forget(self.id));
        }
        true
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        let Some(pipeline) = &self.pipeline else {
            proxy_glue::send_deny(
                &DenyReason::Unavailable("filter not configured".into()),
                &[],
            );
            return Action::Pause;
        };
        proxy_glue::one_stream_callback(|| {
            pipeline
                .borrow_mut()
                .run(|p| p.on_request_headers(self.id, end_of_stream))
        })
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        match &self.pipeline {
            Some(p) => proxy_glue::one_stream_callback(|| {
                p.borrow_mut()
                    .run(|p| p.on_request_body(self.id, Some(body_size), end_of_stream))
            }),
            None => Action::Pause,
        }
    }

    fn on_http_request_trailers(&mut self, _trailers: usize) -> Action {
        match &self.pipeline {
            // The body (if any) ended without end_of_stream: trailers close the request.
            Some(p) => proxy_glue::one_stream_callback(|| {
                p.borrow_mut()
                    .run(|p| p.on_request_body(self.id, None, true))
            }),
            None => Action::Pause,
        }
    }

    fn on_http_response_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        match &self.pipeline {
            Some(p) => proxy_glue::one_stream_callback(|| {
                p.borrow_mut()
                    .run(|p| p.on_response_headers(self.id, end_of_stream))
            }),
            None => Action::Continue,
        }
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        match &self.pipeline {
            Some(p) => proxy_glue::one_stream_callback(|| {
                p.borrow_mut()
                    .run(|p| p.on_response_body(self.id, Some(body_size), end_of_stream))
            }),
            None => Action::Continue,
        }
    }

    fn on_http_response_trailers(&mut self, _trailers: usize) -> Action {
        match &self.pipeline {
            // A response body that ends with trailers is complete at them (a held body must
            // not slip out unchecked with the trailers).
            Some(p) => proxy_glue::one_stream_callback(|| {
                p.borrow_mut()
                    .run(|p| p.on_response_body(self.id, None, true))
            }),
            None => Action::Continue,
        }
    }
}

impl Pipeline {
    /// Runs one callback's work, then sets the root's tick period if the shortest any stage
    /// wants changed ([`Stage::prompt_tick_ms`]; once a second otherwise).
    fn run<R>(&mut self, callback: impl FnOnce(&mut Self) -> R) -> R {
        let result = callback(self);
        let wanted = self
            .stages
            .iter()
            .filter_map(|s| s.prompt_tick_ms())
            .fold(TICK_MS, u64::min)
            .max(1);
        if wanted != self.tick_ms {
            match host::set_tick_period(u32::try_from(wanted).unwrap_or(u32::MAX)) {
                Ok(()) => self.tick_ms = wanted,
                Err(status) => log::warn!(
                    "{}: cannot set the tick period to {wanted} ms: {status}",
                    self.stages.first().map_or("-", |s| s.name())
                ),
            }
        }
        result
    }

    fn on_request_headers(&mut self, ctx: u32, end_of_stream: bool) -> Action {
        let (headers, unreadable) = match host::header_map(MapType::HttpRequestHeaders) {
            Ok(headers) => (headers, None),
            Err(e) => {
                log::error!(
                    "{}: cannot read the request headers: {e}",
                    self.stages.first().map_or("-", |s| s.name())
                );
                let reason =
                    DenyReason::Unavailable("the request headers could not be read".into());
                (Default::default(), Some(reason))
            }
        };
        let mut flow = Flow {
            request: Request::new(ctx, headers),
            cursor: 0,
            phase: Phase::Running,
            body_size: 0,
            body_complete: end_of_stream,
            body_read: end_of_stream,
            response: None,
        };
        let step = match (unreadable, self.stages.first_mut()) {
            (Some(reason), Some(stage)) => stage.refuse(&mut flow.request, reason),
            (None, Some(stage)) => stage.on_request(&mut flow.request),
            (_, None) => Step::Next,
        };
        let action = advance(&mut self.stages, &mut flow, step);
        self.flows.insert(ctx, flow);
        action
    }

    /// A body chunk (`Some(total buffered)`) or the trailers (None) arrived.
    fn on_request_body(&mut self, ctx: u32, body_size: Option<usize>, end: bool) -> Action {
        let Some(flow) = self.flows.get_mut(&ctx) else {
            return Action::Continue;
        };
        if let Some(size) = body_size {
            flow.body_size = size;
        }
        flow.body_complete |= end;
        match flow.phase {
            Phase::Passed => Action::Continue,
            // Still deciding, or denied (the local reply is on its way): nothing goes on.
            Phase::Waiting | Phase::Stopped | Phase::Running => Action::Pause,
            Phase::AwaitingBody { .. } => advance(&mut self.stages, flow, Step::NeedBody),
        }
    }

    /// Resumes a held stream (the effective context) with `step` of the stage at its cursor;
    /// lets the request go on when every stage passed.
    fn resume_with(&mut self, ctx: u32, step: impl FnOnce(&mut dyn Stage, &mut Request) -> Step) {
        let Some(flow) = self.flows.get_mut(&ctx) else {
            return;
        };
        let first = match self.stages.get_mut(flow.cursor) {
            Some(stage) => step(stage.as_mut(), &mut flow.request),
            None => Step::Next,
        };
        let action = advance(&mut self.stages, flow, first);
        let name = self
            .stages
            .get(flow.cursor.min(self.stages.len().saturating_sub(1)));
        if action == Action::Continue {
            if let Err(status) = host::resume_request() {
                log::warn!(
                    "{}: ctx={ctx} cannot resume the request: {status}",
                    name.map_or("-", |s| s.name())
                );
            }
        }
    }

    /// The response headers arrived. The stages see them (last stage first) only when the
    /// request went on; a response to a request this module denied is its own local response.
    fn on_response_headers(&mut self, ctx: u32, end_of_stream: bool) -> Action {
        let Some(flow) = self.flows.get_mut(&ctx) else {
            return Action::Continue;
        };
        if flow.phase != Phase::Passed || flow.response.is_some() {
            // Not ours to check, or a second set of headers: the local response a stage sent
            // in place of the first (the response flow ends; it passes untouched).
            flow.response = None;
            Action::Continue
        } else {
            let mut resp = ResponseFlow {
                response: Response::new(end_of_stream),
                left: self.stages.len(),
                phase: Phase::Running,
                body_size: 0,
                body_complete: end_of_stream,
                body_read: end_of_stream,
            };
            let step = match self.stages.last_mut() {
                Some(stage) => stage.on_response(&flow.request, &mut resp.response),
                None => Step::Next,
            };
            let action = advance_response(&mut self.stages, &flow.request, &mut resp, step);
            flow.response = Some(resp);
            action
        }
    }

    /// A response body chunk (`Some(total buffered)`) or the trailers (None) arrived.
    fn on_response_body(&mut self, ctx: u32, body_size: Option<usize>, end: bool) -> Action {
        let Some(flow) = self.flows.get_mut(&ctx) else {
            return Action::Continue;
        };
        match flow.response.as_mut() {
            None => Action::Continue,
            Some(resp) => {
                if let Some(size) = body_size {
                    resp.body_size = size;
                }
                resp.body_complete |= end;
                match resp.phase {
                    Phase::Passed => Action::Continue,
                    // Still checking, or replaced by a local response: nothing goes on.
                    Phase::Waiting | Phase::Stopped | Phase::Running => Action::Pause,
                    Phase::AwaitingBody { .. } => {
                        advance_response(&mut self.stages, &flow.request, resp, Step::NeedBody)
                    }
                }
            }
        }
    }

    /// Resumes a held response (the effective context) with `step` of the stage at its
    /// cursor; lets the response go on when every stage passed.
    fn resume_response_with(
        &mut self,
        ctx: u32,
        step: impl FnOnce(&mut dyn Stage, &Request, &mut Response) -> Step,
    ) {
        let Some(flow) = self.flows.get_mut(&ctx) else {
            return;
        };
        if let Some(resp) = flow.response.as_mut() {
            let index = resp.left.checked_sub(1);
            let first = match index.and_then(|i| self.stages.get_mut(i)) {
                Some(stage) => step(stage.as_mut(), &flow.request, &mut resp.response),
                None => Step::Next,
            };
            let name = index
                .and_then(|i| self.stages.get(i))
                .map_or("-", |s| s.name());
            let action = advance_response(&mut self.stages, &flow.request, resp, first);
            if action == Action::Continue {
                if let Err(status) = host::resume_response() {
                    log::warn!("{name}: ctx={ctx} cannot resume the response: {status}");
                }
            }
        }
    }

    /// Resumes the settled waiters `ready` of stage `index` (in whichever phase they wait),
    /// each as the effective context, then restores `current`. A stream that no longer
    /// exists, or does not wait at that stage, is skipped.
    fn resume_ready(&mut self, current: u32, index: usize, ready: Vec<u32>) {
        for ctx in ready {
            let Some(flow) = self.flows.get(&ctx) else {
                continue;
            };
            let request_waits = flow.phase == Phase::Waiting && flow.cursor == index;
            let response_waits = flow
                .response
                .as_ref()
                .is_some_and(|r| r.phase == Phase::Waiting && r.left == index + 1);
            if !request_waits && !response_waits {
                continue;
            }
            if ctx != current && host::enter_context(ctx).is_err() {
                continue;
            }
            proxy_glue::one_stream_callback(|| {
                if request_waits {
                    self.resume_with(ctx, |stage, req| stage.resume(req));
                } else {
                    self.resume_response_with(ctx, |stage, req, resp| {
                        stage.resume_response(req, resp)
                    });
                }
            });
            if ctx != current {
                let _ = host::enter_context(current);
            }
        }
    }

    fn on_callout(&mut self, current: u32, token: u32) {
        for index in 0..self.stages.len() {
            let answered = self.stages.get_mut(index).and_then(|s| s.on_callout(token));
            if let Some(ready) = answered {
                self.resume_ready(current, index, ready);
                return;
            }
        }
    }

    fn on_tick(&mut self, root: u32) {
        for index in 0..self.stages.len() {
            let ready = match self.stages.get_mut(index) {
                Some(stage) => stage.on_tick(),
                None => Vec::new(),
            };
            self.resume_ready(root, index, ready);
        }
        // Requests whose body has not arrived in time are refused.
        let Some(now) = now_millis() else { return };
        let expired: Vec<u32> = self
            .flows
            .iter()
            .filter(|(_, flow)| match flow.phase {
                Phase::AwaitingBody { since_ms } => self
                    .stages
                    .get(flow.cursor)
                    .and_then(|s| s.body_timeout_ms())
                    .is_some_and(|timeout| now.saturating_sub(since_ms) >= timeout),
                _ => false,
            })
            .map(|(ctx, _)| *ctx)
            .collect();
        for ctx in expired {
            if host::enter_context(ctx).is_err() {
                continue;
            }
            proxy_glue::one_stream_callback(|| {
                self.resume_with(ctx, |stage, req| stage.on_body_timeout(req))
            });
        }
        let _ = host::enter_context(root);
    }

    fn forget(&mut self, ctx: u32) {
        self.flows.remove(&ctx);
        for stage in &mut self.stages {
            stage.forget(ctx);
        }
    }
}

/// Executes `step` of the stage at the cursor, and runs the later stages while they pass.
fn advance(stages: &mut [Box<dyn Stage>], flow: &mut Flow, mut step: Step) -> Action {
    loop {
        let Some(stage) = stages.get_mut(flow.cursor) else {
            flow.phase = Phase::Passed;
            return Action::Continue;
        };
        flow.phase = Phase::Running;
        step = match step {
            Step::Next => {
                flow.cursor += 1;
                match stages.get_mut(flow.cursor) {
                    Some(next) => next.on_request(&mut flow.request),
                    None => {
                        flow.phase = Phase::Passed;
                        return Action::Continue;
                    }
                }
            }
            Step::NeedBody => {
                if flow.body_size > stage.body_limit() {
                    stage.on_body_too_large(&mut flow.request)
                } else if !flow.body_complete {
                    flow.phase = Phase::AwaitingBody {
                        since_ms: now_millis().unwrap_or(0),
                    };
                    return Action::Pause;
                } else if let Err(reason) = read_body(flow, stage.name()) {
                    stage.refuse(&mut flow.request, reason)
                } else {
                    stage.on_body(&mut flow.request)
                }
            }
            Step::Wait => {
                flow.phase = Phase::Waiting;
                return Action::Pause;
            }
            Step::Deny { reason, headers } => {
                send_step_deny(&reason, &headers);
                flow.phase = Phase::Stopped;
                return Action::Pause;
            }
        };
    }
}

/// Executes `step` of the response stage at `resp.left - 1`, and runs the earlier stages
/// while they pass.
fn advance_response(
    stages: &mut [Box<dyn Stage>],
    request: &Request,
    resp: &mut ResponseFlow,
    mut step: Step,
) -> Action {
    loop {
        let Some(index) = resp.left.checked_sub(1) else {
            resp.phase = Phase::Passed;
            return Action::Continue;
        };
        let Some(stage) = stages.get_mut(index) else {
            resp.phase = Phase::Passed;
            return Action::Continue;
        };
        resp.phase = Phase::Running;
        step = match step {
            Step::Next => {
                resp.left = index;
                match index.checked_sub(1).and_then(|i| stages.get_mut(i)) {
                    Some(earlier) => earlier.on_response(request, &mut resp.response),
                    None => {
                        resp.phase = Phase::Passed;
                        return Action::Continue;
                    }
                }
            }
            Step::NeedBody => {
                if resp.body_size > stage.response_body_limit() {
                    stage.on_response_body_too_large(request, &mut resp.response)
                } else if !resp.body_complete {
                    resp.phase = Phase::AwaitingBody { since_ms: 0 };
                    return Action::Pause;
                } else if let Err(reason) = read_response_body(resp, stage.name()) {
                    Step::deny(reason)
                } else {
                    stage.on_response_body(request, &mut resp.response)
                }
            }
            Step::Wait => {
                resp.phase = Phase::Waiting;
                return Action::Pause;
            }
            Step::Deny { reason, headers } => {
                send_step_deny(&reason, &headers);
                resp.phase = Phase::Stopped;
                return Action::Pause;
            }
        };
    }
}

/// A stage's denial as the local reply (its extra headers, e.g. `www-authenticate`).
fn send_step_deny(reason: &DenyReason, headers: &[(&'static str, String)]) {
    let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    proxy_glue::send_deny(reason, &headers);
}

/// Reads the whole buffered body once (copying it per chunk would be quadratic).
fn read_body(flow: &mut Flow, filter: &str) -> Result<(), DenyReason> {
    if flow.body_read {
        return Ok(());
    }
    flow.body_read = true;
    if flow.body_size == 0 {
        return Ok(());
    }
    match host::read_buffer(BufferType::HttpRequestBody, 0, flow.body_size) {
        Ok(body) => {
            flow.request.body = body.unwrap_or_default();
            Ok(())
        }
        Err(status) => {
            log::error!("{filter}: cannot read the request body: {status}");
            Err(DenyReason::Unavailable(
                "the request body could not be read".into(),
            ))
        }
    }
}

/// Reads the whole buffered response body once.
fn read_response_body(resp: &mut ResponseFlow, filter: &str) -> Result<(), DenyReason> {
    if resp.body_read {
        return Ok(());
    }
    resp.body_read = true;
    if resp.body_size == 0 {
        return Ok(());
    }
    match host::read_buffer(BufferType::HttpResponseBody, 0, resp.body_size) {
        Ok(body) => {
            resp.response.set_body(body.unwrap_or_default());
            Ok(())
        }
        Err(status) => {
            log::error!("{filter}: cannot read the response body: {status}");
            Err(DenyReason::Unavailable(
                "the response could not be checked".into(),
            ))
        }
    }
}
