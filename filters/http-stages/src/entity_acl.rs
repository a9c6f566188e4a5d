//! The entity-acl stage: decides every NGSI request (v2, NGSI-LD, FogFlow NGSI9/10) against
//! the entity ACL of its configuration (`policy::entity_acl`), with the caller an earlier
//! stage authenticated, or else the identity headers token-auth set.
//!
//! It decides on the body: the driver holds the request until the body has fully arrived, up
//! to `max_body_bytes` (413 beyond, including bodies that end with trailers), and answers a
//! body that does not arrive within `body_timeout_ms` with 503 (Envoy must run the filter with
//! `allow_on_headers_stop_iteration: true`, or the body never reaches it).

use std::borrow::Cow;

use policy::decision_cache::{DecisionCache, DecisionInputs};
use policy::entity_acl::{EntityAcl, EntityAclConfig, Verdict};
use policy::{Decision, DenyReason, Identity};
use proxy_glue::{record_decision, Decided, DecisionMetrics, Entities};

use crate::{ByStream, Caller, Request, Stage, Step};

pub const NAME: &str = "entity-acl";

pub struct EntityAclStage {
    acl: EntityAcl,
    /// Verdicts of bodiless requests, for this configuration only (a new configuration builds
    /// a new stage).
    cache: DecisionCache,
    metrics: DecisionMetrics,
    /// The facts of the streams waiting for their body (taken in `on_body`), so the headers
    /// are read and the identity parsed once per request.
    waiting: ByStream<Facts>,
}

/// Who the request is from, and the headers the engine reads; kept between the headers and
/// the body.
struct Facts {
    /// The identity parsed from token-auth's identity headers; None when an earlier stage of
    /// this module authenticated the caller (then it is `req.caller`'s, not copied).
    parsed: Option<Option<Identity>>,
    method: String,
    path: String,
    /// The headers the NGSI model reads (the tenant headers): what the decision and its cache
    /// key are given.
    tenant: Vec<(String, String)>,
}

impl Facts {
    /// The caller of `req`, whose facts these are.
    fn identity<'a>(&'a self, req: &'a Request) -> Option<&'a Identity> {
        match (&self.parsed, &req.caller) {
            (Some(parsed), _) => parsed.as_ref(),
            (None, Caller::Known(identity)) => identity.as_ref(),
            (None, Caller::FromHeaders) => None,
        }
    }
}

impl EntityAclStage {
    /// The stage of the separate entity-acl filter, from its plugin configuration.
    pub fn from_plugin_config() -> Option<Self> {
        proxy_glue::load_config(NAME, EntityAcl::new).map(Self::with)
    }

    pub fn new(config: EntityAclConfig) -> Result<Self, String> {
        EntityAcl::new(config).map(Self::with)
    }

    fn with(acl: EntityAcl) -> Self {
        if acl.rule_count() == 0 {
            log::warn!("{NAME}: the acl has no rules: every request is denied");
        }
        log::info!(
            "{NAME}: configured with {} rules, mode {:?}",
            acl.rule_count(),
            acl.mode
        );
        EntityAclStage {
            acl,
            cache: DecisionCache::default(),
            metrics: DecisionMetrics::define("entity_acl"),
            waiting: ByStream::default(),
        }
    }

    /// The request's facts, or the denial when they can't be had.
    fn facts(&self, req: &Request) -> Result<Facts, Verdict> {
        let headers = req
            .text_headers(NAME, |name| self.acl.reads_header(name))
            .map_err(|reason| deny_verdict("-".into(), reason))?;
        let get = |name: &str| proxy_glue::first_header(headers, name);
        let (method, path) = (get(":method"), get(":path"));
        let parsed = match &req.caller {
            Caller::Known(_) => None,
            Caller::FromHeaders => Some(
                self.acl
                    .identity_headers
                    .parse(headers)
                    .map_err(|e| deny_verdict(format!("{method} -"), DenyReason::BadRequest(e)))?,
            ),
        };
        let tenant = headers
            .iter()
            .filter(|(name, _)| EntityAcl::model_reads_header(name))
            .cloned()
            .collect();
        Ok(Facts {
            parsed,
            method,
            path,
            tenant,
        })
    }

    /// The facts `on_request` kept for this stream, else read now.
    fn take_facts(&mut self, req: &Request) -> Result<Facts, Verdict> {
        match self.waiting.remove(&req.ctx) {
            Some(facts) => Ok(facts),
            None => self.facts(req),
        }
    }

    fn apply(&self, req: &Request, identity: Option<&Identity>, verdict: &Verdict) -> Step {
        apply(&self.acl, &self.metrics, req, identity, verdict)
    }
}

/// Logs and counts the verdict; Next lets the request go on (allowed, or shadow mode).
fn apply(
    acl: &EntityAcl,
    metrics: &DecisionMetrics,
    req: &Request,
    identity: Option<&Identity>,
    verdict: &Verdict,
) -> Step {
    let about = Decided {
        filter: NAME,
        mode: acl.mode,
        log_allows: acl.log_allows,
        identity,
        operation: &verdict.operation,
        entities: Entities::Summary(&verdict.entities),
        request_headers: req.headers(),
    };
    match record_decision(&about, &verdict.decision, metrics) {
        Ok(()) => Step::Next,
        Err(reason) => Step::deny(reason),
    }
}

fn deny_verdict(operation: String, reason: DenyReason) -> Verdict {
    Verdict {
        operation,
        entities: "[]".into(),
        decision: Decision::Deny(reason),
    }
}

impl Stage for EntityAclStage {
    fn name(&self) -> &'static str {
        NAME
    }

    fn on_request(&mut self, req: &mut Request) -> Step {
        let facts = match self.facts(req) {
            Ok(facts) => facts,
            Err(verdict) => return self.apply(req, None, &verdict),
        };
        let declared_too_large = req
            .headers()
            .first("content-length")
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse::<usize>().ok())
            .is_some_and(|n| n > self.acl.max_body_bytes);
        if declared_too_large {
            let verdict = self.acl.too_large(&facts.method, &facts.path);
            return self.apply(req, facts.identity(req), &verdict);
        }
        self.waiting.insert(req.ctx, facts);
        Step::NeedBody
    }

    fn on_body(&mut self, req: &mut Request) -> Step {
        let facts = match self.take_facts(req) {
            Ok(facts) => facts,
            Err(verdict) => return self.apply(req, None, &verdict),
        };
        let identity = facts.identity(req);
        let inputs = DecisionInputs {
            identity,
            method: &facts.method,
            path: &facts.path,
            headers: &facts.tenant,
        };
        let EntityAclStage {
            acl,
            cache,
            metrics,
            ..
        } = self;
        // No clock: decide without the cache (it must not serve past a token's expiry).
        let verdict = match crate::now_millis() {
            Some(now_ms) => acl.decide_cached(cache, now_ms / 1000, inputs, &req.body),
            None => Cow::Owned(acl.decide(
                identity,
                &facts.method,
                &facts.path,
                &facts.tenant,
                &req.body,
            )),
        };
        apply(acl, metrics, req, identity, &verdict)
    }

    fn body_limit(&self) -> usize {
        self.acl.max_body_bytes
    }

    fn body_timeout_ms(&self) -> Option<u64> {
        Some(self.acl.body_timeout_ms)
    }

    fn on_body_too_large(&mut self, req: &mut Request) -> Step {
        match self.take_facts(req) {
            Ok(facts) => {
                let verdict = self.acl.too_large(&facts.method, &facts.path);
                self.apply(req, facts.identity(req), &verdict)
            }
            Err(verdict) => self.apply(req, None, &verdict),
        }
    }

    fn on_body_timeout(&mut self, req: &mut Request) -> Step {
        log::warn!(
            "{NAME}: the request body did not arrive within {} ms; a slow client, or Envoy \
             runs this filter without allow_on_headers_stop_iteration: true",
            self.acl.body_timeout_ms
        );
        self.refuse(
            req,
            DenyReason::Unavailable("the request body did not arrive in time".into()),
        )
    }

    fn refuse(&mut self, req: &mut Request, reason: DenyReason) -> Step {
        self.waiting.remove(&req.ctx);
        self.apply(req, None, &deny_verdict("-".into(), reason))
    }

    fn forget(&mut self, ctx: u32) {
        self.waiting.remove(&ctx);
    }
}
