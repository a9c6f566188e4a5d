//! entity-acl: decides every NGSI request (v2, NGSI-LD, FogFlow NGSI9/10) against the entity
//! ACL of its configuration, with the identity token-auth put in the request headers.
//!
//! The decision is `policy::entity_acl`'s; this crate gathers the request and applies it.
//! A request with a body is held (headers and body) until the body has fully arrived, up to
//! `max_body_bytes` (413 beyond, including bodies that end with trailers), then decided once.
//! Envoy must run this filter with `allow_on_headers_stop_iteration: true`, or the body never
//! reaches it; the root tick then answers such held requests with 503 after `body_timeout_ms`
//! and says why in the log.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use policy::entity_acl::{EntityAcl, Verdict};
use policy::{Decision, DenyReason, Identity};
use proxy_glue::host;
use proxy_glue::{apply_decision, Decided, DecisionMetrics};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

const FILTER: &str = "entity-acl";

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_glue::install_panic_hook();
    proxy_wasm::set_root_context(|id| Box::new(Root { id, state: None }));
}}

struct State {
    acl: EntityAcl,
    metrics: DecisionMetrics,
    /// Streams whose body is awaited, with the time (ms) their headers arrived.
    awaiting_body: HashMap<u32, u64>,
}

type Shared = Rc<RefCell<State>>;

struct Root {
    id: u32,
    state: Option<Shared>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(acl) = proxy_glue::load_config(FILTER, EntityAcl::new) else {
            return false;
        };
        if acl.rule_count() == 0 {
            log::warn!("{FILTER}: the acl has no rules: every request is denied");
        }
        log::info!(
            "{FILTER}: configured with {} rules, mode {:?}",
            acl.rule_count(),
            acl.mode
        );
        self.state = Some(Rc::new(RefCell::new(State {
            acl,
            metrics: DecisionMetrics::define("entity_acl"),
            awaiting_body: HashMap::new(),
        })));
        self.set_tick_period(Duration::from_secs(1));
        true
    }

    /// Requests whose body has not arrived in time are refused (see the crate docs).
    fn on_tick(&mut self) {
        let Some(state) = self.state.clone() else {
            return;
        };
        let Some(now) = now_millis() else { return };
        let (timeout, expired): (u64, Vec<u32>) = {
            let s = state.borrow();
            let timeout = s.acl.body_timeout_ms;
            let expired = s
                .awaiting_body
                .iter()
                .filter(|(_, since)| now.saturating_sub(**since) >= timeout)
                .map(|(ctx, _)| *ctx)
                .collect();
            (timeout, expired)
        };
        for ctx in expired {
            state.borrow_mut().awaiting_body.remove(&ctx);
            if hostcalls::set_effective_context(ctx).is_err() {
                continue;
            }
            log::warn!(
                "{FILTER}: the request body did not arrive within {timeout} ms; a slow client, \
                 or Envoy runs this filter without allow_on_headers_stop_iteration: true"
            );
            let decision = Decision::Deny(DenyReason::Unavailable(
                "the request body did not arrive in time".into(),
            ));
            let go_on = {
                let s = state.borrow();
                let about = Decided {
                    filter: FILTER,
                    mode: s.acl.mode,
                    log_allows: s.acl.log_allows,
                    identity: None,
                    operation: "-",
                    entities: "[]",
                };
                apply_decision(&about, &decision, &s.metrics)
            };
            // Shadow mode never stops traffic, not even traffic it could not judge.
            if go_on {
                let _ = host::resume_request();
            }
        }
        let _ = hostcalls::set_effective_context(self.id);
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            id: context_id,
            state: self.state.clone(),
            request: None,
            body_len: 0,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// What the decision needs, copied while the request headers are readable.
struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    identity: Option<Identity>,
}

struct Stream {
    id: u32,
    state: Option<Shared>,
    request: Option<Request>,
    /// Bytes of body buffered so far.
    body_len: usize,
}

impl Context for Stream {
    fn on_done(&mut self) -> bool {
        if let Some(state) = &self.state {
            state.borrow_mut().awaiting_body.remove(&self.id);
        }
        true
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        let Some(state) = self.state.clone() else {
            proxy_glue::send_deny(
                &DenyReason::Unavailable("filter not configured".into()),
                &[],
            );
            return Action::Pause;
        };
        let headers = {
            let s = state.borrow();
            proxy_glue::request_text_headers(FILTER, |name| s.acl.reads_header(name))
        };
        let headers = match headers {
            Ok(headers) => headers,
            Err(reason) => {
                let verdict = Verdict {
                    operation: "-".into(),
                    entities: "[]".into(),
                    decision: Decision::Deny(reason),
                };
                return self.apply(&state, None, &verdict);
            }
        };
        let get = |name: &str| proxy_glue::first_header(&headers, name);
        let (method, path) = (get(":method"), get(":path"));
        let identity = state.borrow().acl.identity_headers.parse(&headers);
        let identity = match identity {
            Ok(identity) => identity,
            Err(e) => {
                let verdict = Verdict {
                    operation: format!("{method} -"),
                    entities: "[]".into(),
                    decision: Decision::Deny(DenyReason::BadRequest(e)),
                };
                return self.apply(&state, None, &verdict);
            }
        };
        let declared_too_large = get("content-length")
            .parse::<usize>()
            .is_ok_and(|n| n > state.borrow().acl.max_body_bytes);
        let request = Request {
            method,
            path,
            headers,
            identity,
        };
        if declared_too_large {
            let verdict = state.borrow().acl.too_large(&request.method, &request.path);
            return self.apply(&state, request.identity.as_ref(), &verdict);
        }
        self.request = Some(request);
        if end_of_stream {
            return self.decide(&state, &[]);
        }
        if let Some(now) = now_millis() {
            state.borrow_mut().awaiting_body.insert(self.id, now);
        }
        Action::Pause
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(state) = self.state.clone() else {
            return Action::Pause;
        };
        if self.request.is_none() {
            // Already decided (a denial is on its way, or the request was let through).
            return Action::Continue;
        }
        self.body_len = body_size;
        if self.body_over_limit(&state) {
            return self.refuse_too_large(&state);
        }
        if !end_of_stream {
            return Action::Pause;
        }
        self.decide_with_buffered_body(&state)
    }

    fn on_http_request_trailers(&mut self, _trailers: usize) -> Action {
        let Some(state) = self.state.clone() else {
            return Action::Pause;
        };
        if self.request.is_none() {
            return Action::Continue;
        }
        // The body (if any) ended without end_of_stream: trailers close the request.
        self.decide_with_buffered_body(&state)
    }
}

impl Stream {
    fn body_over_limit(&self, state: &Shared) -> bool {
        self.body_len > state.borrow().acl.max_body_bytes
    }

    fn refuse_too_large(&mut self, state: &Shared) -> Action {
        state.borrow_mut().awaiting_body.remove(&self.id);
        let Some(request) = self.request.take() else {
            return Action::Pause;
        };
        let verdict = state.borrow().acl.too_large(&request.method, &request.path);
        self.apply(state, request.identity.as_ref(), &verdict)
    }

    fn decide_with_buffered_body(&mut self, state: &Shared) -> Action {
        state.borrow_mut().awaiting_body.remove(&self.id);
        let body = if self.body_len == 0 {
            Vec::new()
        } else {
            match host::read_buffer(
                proxy_wasm::types::BufferType::HttpRequestBody,
                0,
                self.body_len,
            ) {
                Ok(Some(body)) => body,
                Ok(None) => Vec::new(),
                Err(status) => {
                    self.request = None;
                    log::error!("{FILTER}: cannot read the request body: {status}");
                    let verdict = Verdict {
                        operation: "-".into(),
                        entities: "[]".into(),
                        decision: Decision::Deny(DenyReason::Unavailable(
                            "the request body could not be read".into(),
                        )),
                    };
                    return self.apply(state, None, &verdict);
                }
            }
        };
        self.decide(state, &body)
    }

    fn decide(&mut self, state: &Shared, body: &[u8]) -> Action {
        let Some(request) = self.request.take() else {
            return Action::Pause;
        };
        let verdict = state.borrow().acl.decide(
            request.identity.as_ref(),
            &request.method,
            &request.path,
            &request.headers,
            body,
        );
        self.apply(state, request.identity.as_ref(), &verdict)
    }

    /// Logs, counts and enforces the verdict; Continue lets the held request go on.
    fn apply(&mut self, state: &Shared, identity: Option<&Identity>, verdict: &Verdict) -> Action {
        self.request = None;
        let s = state.borrow();
        let about = Decided {
            filter: FILTER,
            mode: s.acl.mode,
            log_allows: s.acl.log_allows,
            identity,
            operation: &verdict.operation,
            entities: &verdict.entities,
        };
        if apply_decision(&about, &verdict.decision, &s.metrics) {
            Action::Continue
        } else {
            Action::Pause
        }
    }
}

fn now_millis() -> Option<u64> {
    let now = hostcalls::get_current_time().ok()?;
    now.duration_since(std::time::UNIX_EPOCH)
        .ok()
        .and_then(|d| u64::try_from(d.as_millis()).ok())
}
