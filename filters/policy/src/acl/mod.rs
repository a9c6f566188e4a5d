//! One rule engine for NGSI entities and MQTT topics.
//!
//! Rules come from the plugin configuration ([`AclConfig`], JSON) or from a Mosquitto
//! `acl_file` ([`mosquitto::import_acl_file`]); both compile to an [`Acl`].
//!
//! # Decision
//! * Deny wins over allow, whatever the rule order; nothing matching means deny.
//! * A request (many [`Access`]es) is allowed only if every access is. Each access is split into
//!   units (one per service path and, for `Only` attributes, one per attribute); every unit must
//!   be *covered* by some allow rule (different units may be covered by different rules) and
//!   must not be *touched* by any deny rule. Units are a definition, never built: whether a rule
//!   matches a unit is three separate checks (what the access shares, the unit's path, the
//!   unit's attribute), so each rule is checked against the set of paths and the set of
//!   attributes of an access: the work is (paths + attributes) × rules per access, not their
//!   product (`matcher_tests` holds the unit-by-unit reference it is property-tested against).
//! * The decision names the rule(s) that decided (`Allow("acl:r1,r2")`,
//!   `Deny(Forbidden("denied by rule 'r3': ..."))`) or says what nothing allowed.
//!
//! # Covered (allow) — what a widening selector needs
//! An allow rule covers a unit only if every entity the unit could reach is granted:
//! * entity: `Id(x)` needs the rule's `entity_id` glob to match `x`; `IdPattern(re)` counts as
//!   `Id(lit)` only when `re` is a single literal under every broker's regex engine (`^lit$`,
//!   built only of `[A-Za-z0-9_:-]` and the escapes `\.` `\[` `\]` `\(` `\)` `\*` `\+` `\?`
//!   `\{` `\}` `\|` `\^` `\$` `\\`; glibc's `\<` `\>` `` \` `` `\'` are anchors, not
//!   characters); any other `IdPattern` and `Any` need
//!   `entity_id: "*"`. No attempt is made to prove a regex is contained in a glob.
//! * type: `Type(t)` needs `entity_type` `"*"` or `t`; `Pattern` is treated like `IdPattern`
//!   (single literal or else needs `"*"`); `Any` needs `"*"`.
//! * attributes: each attribute of `Only` needs `"*"` or that name listed; `All` and an empty
//!   `Only` list need `["*"]`.
//! * service path: a rule `/a/#` covers `/a`, `/a/x/y`, `/a/#`, `/a/x/#` (segment-wise, never
//!   `/ab`); an exact rule `/a` covers only the exact path `/a`, never `/a/#`. `/#` covers all.
//! * service: `"*"` or equal (lowercase). Endpoint: a rule without `endpoint_prefix` covers any
//!   endpoint; one with it needs the access's endpoint to parse as a URL with the same scheme,
//!   host and port, no userinfo, and a path starting with the prefix's path (which ends in `/`).
//! * MQTT: the rule filter must match every topic the requested filter can match (`+`/`#`
//!   containment with `$`-topic rules), e.g. `a/#` covers `a/+/b` but `a/+` does not cover
//!   `a/#`.
//!
//! A deny rule *touches* a unit when they might overlap: wide selectors (patterns, `Any`,
//! `All`, subtrees, wildcard filters) are assumed to overlap whatever the deny rule names. So a
//! subscription to `devices/#` is refused when a deny rule names `devices/+/secret` (Mosquitto
//! would accept it and filter per message; check delivered topics for that behaviour).
//! A deny rule with `endpoint_prefix` touches only accesses whose endpoint matches it (or is not
//! a URL).
//!
//! # Subjects
//! `user:<s>` matches any identity whose subject is `<s>` (whatever the credential kind, as a
//! Mosquitto username would); `device:<id>` only devices (device keys, client certificates); `role:`/`group:` exact
//! membership; `authenticated` any identity; `anonymous` only no identity; `anyone` both.
//! Identity expiry is the caller's business.
//!
//! # Placeholders
//! `%u` (the caller's subject), `%t` (the caller's tenant claim, token-auth's `claims.tenant`)
//! and `%c` (the MQTT client id, MQTT rules only) may appear in `entity_id`, `service_path`
//! and `topic`; `service` may be exactly `%t` (a caller reaches only its own tenant); `%%` is a
//! literal `%`. A substituted value never acts
//! as a wildcard or separator: in `entity_id` its characters are literal (a `*` in a subject is
//! just a `*`); in `service_path` a value containing `/` or `#` (or empty) and in `topic` a value
//! containing `/`, `+`, `#`, NUL or starting with `$` (or empty) refuses the substitution. A
//! refused (or impossible: no caller, no client id) substitution makes an allow rule not apply,
//! and widens a deny rule (when in doubt, deny): its `entity_id` then touches every id, its
//! `service_path` the whole subtree from the segment holding the placeholder, its `topic` every
//! topic below the level holding the placeholder (`#`; everything if that is the first level).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::access::{
    Access, Action, AttributeSelector, EntitySelector, RequestAccess, TypeSelector,
};
use crate::decision::{Decision, DenyReason, DEFAULT_DENY_RULE};
use crate::identity::{Identity, IdentityKind};

pub mod mosquitto;
pub mod topic;

#[cfg(test)]
mod matcher_tests;
#[cfg(test)]
mod tests;

use topic::{Level, TopicFilter};

// ------------------------------------------------------------------------------------------
// Configuration (serde)
// ------------------------------------------------------------------------------------------

/// The `acl` section of the plugin configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AclConfig {
    pub rules: Vec<RuleConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    Allow,
    Deny,
}

/// One rule. Exactly one of `ngsi` and `mqtt` must be present.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub name: String,
    pub effect: Effect,
    /// `user:<subject>`, `role:<r>`, `group:<g>`, `device:<id>`, `authenticated`, `anyone`,
    /// `anonymous` (only callers without identity).
    pub subjects: Vec<String>,
    /// `read`, `write`, `create`, `delete`, `subscribe`, `register`, or `*`. MQTT rules: `read`,
    /// `write` or `*` (= both).
    pub actions: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ngsi: Option<NgsiResource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt: Option<MqttResource>,
}

fn star() -> String {
    "*".into()
}
fn star_list() -> Vec<String> {
    vec!["*".into()]
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NgsiResource {
    /// Tenant (`fiware-service`): exact (compared lowercase), `""` for the default tenant, or
    /// `*` for any. Required.
    pub service: String,
    /// `/a/b` exact, `/a/#` subtree (including `/a`), `/#` everything. Required.
    pub service_path: String,
    /// `*` alone: any id. Otherwise a glob where `*` matches any run (possibly empty) of
    /// characters other than `:`. Default `*`.
    #[serde(default = "star")]
    pub entity_id: String,
    /// Exact type or `*`. Default `*`.
    #[serde(default = "star")]
    pub entity_type: String,
    /// Attribute names, or `["*"]` (default) for all.
    #[serde(default = "star_list")]
    pub attributes: Vec<String>,
    /// Subscriptions/registrations: the endpoint must start with this URL (path ending in `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_prefix: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttResource {
    /// A topic filter with Mosquitto semantics; `%u`, `%c`, `%%` allowed.
    pub topic: String,
}

/// A rule that does not load.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AclError {
    #[error("acl configuration is not valid JSON for the rule format: {0}")]
    Json(String),
    #[error("acl rule {rule}: {message}")]
    Rule { rule: String, message: String },
}

// ------------------------------------------------------------------------------------------
// Compiled rules
// ------------------------------------------------------------------------------------------

/// Access to an MQTT topic: read (subscribe / receive) or write (publish).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopicAccess {
    Read,
    Write,
}

impl TopicAccess {
    fn action(self) -> Action {
        match self {
            TopicAccess::Read => Action::Read,
            TopicAccess::Write => Action::Write,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Subject {
    User(String),
    Role(String),
    Group(String),
    Device(String),
    Authenticated,
    Anyone,
    Anonymous,
}

impl Subject {
    fn parse(s: &str) -> Result<Subject, String> {
        match s {
            "anyone" => return Ok(Subject::Anyone),
            "authenticated" => return Ok(Subject::Authenticated),
            "anonymous" => return Ok(Subject::Anonymous),
            _ => {}
        }
        let (kind, value) = s.split_once(':').ok_or_else(|| {
            format!(
                "subject {s:?} is not one of user:<subject>, role:<r>, group:<g>, device:<id>, \
                 authenticated, anyone, anonymous"
            )
        })?;
        if value.is_empty() {
            return Err(format!("subject {s:?} has an empty value"));
        }
        let v = value.to_string();
        match kind {
            "user" => Ok(Subject::User(v)),
            "role" => Ok(Subject::Role(v)),
            "group" => Ok(Subject::Group(v)),
            "device" => Ok(Subject::Device(v)),
            _ => Err(format!(
                "subject kind {kind:?} is unknown (user, role, group, device)"
            )),
        }
    }

    /// `user:` matches the subject whatever the credential kind; `device:` only devices (a device
    /// key or a client certificate). The definition [`SubjectIndex`] is tested against.
    #[cfg(test)]
    fn matches(&self, id: Option<&Identity>) -> bool {
        match (self, id) {
            (Subject::Anyone, _) => true,
            (Subject::Anonymous, id) => id.is_none(),
            (_, None) => false,
            (Subject::Authenticated, Some(_)) => true,
            (Subject::User(u), Some(i)) => i.subject == *u,
            (Subject::Role(r), Some(i)) => i.has_role(r),
            (Subject::Group(g), Some(i)) => i.in_group(g),
            (Subject::Device(d), Some(i)) => {
                matches!(
                    i.kind,
                    IdentityKind::DeviceKey | IdentityKind::ClientCertificate
                ) && i.subject == *d
            }
        }
    }
}

/// A template piece: literal text, or a placeholder.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Lit(String),
    User,
    Client,
    /// The caller's tenant claim (`Identity::tenant`).
    Tenant,
}

fn parse_template(s: &str, allow_client: bool) -> Result<Vec<Piece>, String> {
    let mut out = Vec::new();
    let mut lit = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            lit.push(c);
            continue;
        }
        match chars.next() {
            Some('%') => lit.push('%'),
            Some('u') => {
                if !lit.is_empty() {
                    out.push(Piece::Lit(std::mem::take(&mut lit)));
                }
                out.push(Piece::User);
            }
            Some('t') => {
                if !lit.is_empty() {
                    out.push(Piece::Lit(std::mem::take(&mut lit)));
                }
                out.push(Piece::Tenant);
            }
            Some('c') if allow_client => {
                if !lit.is_empty() {
                    out.push(Piece::Lit(std::mem::take(&mut lit)));
                }
                out.push(Piece::Client);
            }
            Some('c') => return Err("%c (the MQTT client id) is only allowed in mqtt rules".into()),
            other => {
                return Err(format!(
                    "unknown placeholder %{} in {s:?} (use %u, %t, %c, or %% for a literal %)",
                    other.map(String::from).unwrap_or_default()
                ))
            }
        }
    }
    if !lit.is_empty() {
        out.push(Piece::Lit(lit));
    }
    Ok(out)
}

/// Values placeholders are replaced with.
#[derive(Debug, Clone, Copy)]
struct Ctx<'a> {
    user: Option<&'a str>,
    client: Option<&'a str>,
    tenant: Option<&'a str>,
}

impl<'a> Ctx<'a> {
    fn value(&self, p: &Piece) -> Option<&'a str> {
        match p {
            Piece::User => self.user,
            Piece::Client => self.client,
            Piece::Tenant => self.tenant,
            Piece::Lit(_) => None,
        }
    }
}

/// Substitutes into a template whose literal text is literal; `ok` vets each value.
fn render(pieces: &[Piece], ctx: &Ctx, ok: impl Fn(&str) -> bool) -> Option<String> {
    let mut out = String::new();
    for p in pieces {
        match p {
            Piece::Lit(s) => out.push_str(s),
            _ => {
                let v = ctx.value(p)?;
                if !ok(v) {
                    return None;
                }
                out.push_str(v);
            }
        }
    }
    Some(out)
}

/// One token of an entity-id glob, over the id's UTF-8 bytes: a literal byte, or `*`.
/// Literal characters are whole UTF-8 sequences, so a `*` between them always spans whole
/// characters: matching bytes decides exactly as matching characters would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GlobTok {
    Byte(u8),
    Star,
}

impl GlobTok {
    /// A template's literal text: `*` is the wildcard.
    fn pattern(text: &str) -> impl Iterator<Item = GlobTok> + '_ {
        text.bytes().map(|b| {
            if b == b'*' {
                GlobTok::Star
            } else {
                GlobTok::Byte(b)
            }
        })
    }

    /// A substituted value: every character literal, `*` included.
    fn literal(value: &str) -> impl Iterator<Item = GlobTok> + '_ {
        value.bytes().map(GlobTok::Byte)
    }
}

/// `*` matches any run of characters other than `:`. No allocation: the classic greedy match
/// that backtracks to the last `*` only. A `*` cannot take a `:`, and an earlier `*` cannot
/// help then (it could only start the last one later), so meeting a `:` there is a mismatch.
fn glob_match(pat: &[GlobTok], s: &str) -> bool {
    let text = s.as_bytes();
    let (mut p, mut t) = (0, 0);
    // The last `*` seen, and the text position up to which it has taken bytes.
    let mut last_star: Option<(usize, usize)> = None;
    while let Some(&byte) = text.get(t) {
        match pat.get(p) {
            Some(GlobTok::Byte(b)) if *b == byte => {
                p += 1;
                t += 1;
                continue;
            }
            Some(GlobTok::Star) => {
                last_star = Some((p, t));
                p += 1;
                continue;
            }
            _ => {}
        }
        match last_star {
            Some((star, taken)) if text.get(taken).is_some_and(|&b| b != b':') => {
                last_star = Some((star, taken + 1));
                p = star + 1;
                t = taken + 1;
            }
            _ => return false,
        }
    }
    pat.get(p..)
        .is_some_and(|rest| rest.iter().all(|tok| *tok == GlobTok::Star))
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum IdRule {
    Any,
    /// No placeholder: compiled once, at configure time.
    Glob(Vec<GlobTok>),
    /// Literal pieces: `*` is a wildcard; substituted values are literal.
    Template(Vec<Piece>),
}

impl IdRule {
    fn compile(text: &str) -> Result<IdRule, String> {
        if text == "*" {
            return Ok(IdRule::Any);
        }
        let pieces = parse_template(text, false)?;
        Ok(match pieces.as_slice() {
            [] => IdRule::Glob(Vec::new()),
            [Piece::Lit(lit)] => IdRule::Glob(GlobTok::pattern(lit).collect()),
            _ => IdRule::Template(pieces),
        })
    }

    /// The glob for one caller: `Some(None)` any id, `None` a placeholder that cannot be
    /// substituted. Only a template allocates.
    fn instantiate(&self, ctx: &Ctx) -> Option<Option<Cow<'_, [GlobTok]>>> {
        match self {
            IdRule::Any => Some(None),
            IdRule::Glob(toks) => Some(Some(Cow::Borrowed(toks))),
            IdRule::Template(pieces) => {
                let mut toks = Vec::new();
                for p in pieces {
                    match p {
                        Piece::Lit(s) => toks.extend(GlobTok::pattern(s)),
                        _ => {
                            let v = ctx.value(p)?;
                            if v.is_empty() {
                                return None;
                            }
                            toks.extend(GlobTok::literal(v));
                        }
                    }
                }
                Some(Some(Cow::Owned(toks)))
            }
        }
    }
}

/// A canonical service path: segments, and whether it covers the subtree. (device-ownership's
/// scope reads paths the same way.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ServicePath {
    segments: Vec<String>,
    subtree: bool,
}

impl ServicePath {
    pub(crate) fn parse(p: &str) -> Result<ServicePath, String> {
        let rest = p
            .strip_prefix('/')
            .ok_or_else(|| format!("service path {p:?} must start with '/'"))?;
        if rest.is_empty() {
            return Ok(ServicePath {
                segments: vec![],
                subtree: false,
            });
        }
        if rest == "#" {
            return Ok(ServicePath {
                segments: vec![],
                subtree: true,
            });
        }
        let (body, subtree) = match rest.strip_suffix("/#") {
            Some(b) => (b, true),
            None => (rest, false),
        };
        let mut segments = Vec::new();
        for seg in body.split('/') {
            if seg.is_empty() {
                return Err(format!(
                    "service path {p:?} has an empty segment or trailing '/'"
                ));
            }
            if seg.contains('#') {
                return Err(format!(
                    "service path {p:?}: '#' is only allowed as a final '/#'"
                ));
            }
            segments.push(seg.to_string());
        }
        Ok(ServicePath { segments, subtree })
    }

    fn covers(&self, req: &ServicePath) -> bool {
        if self.subtree {
            req.segments.starts_with(&self.segments)
        } else {
            !req.subtree && req.segments == self.segments
        }
    }

    pub(crate) fn segments(&self) -> &[String] {
        &self.segments
    }

    pub(crate) fn intersects(&self, req: &ServicePath) -> bool {
        match (self.subtree, req.subtree) {
            (true, true) => {
                req.segments.starts_with(&self.segments) || self.segments.starts_with(&req.segments)
            }
            (true, false) => req.segments.starts_with(&self.segments),
            (false, true) => self.segments.starts_with(&req.segments),
            (false, false) => req.segments == self.segments,
        }
    }
}

/// The subtree a deny rule's service path touches when a placeholder cannot be substituted:
/// the literal segments before the first placeholder, as a subtree.
fn deny_path_prefix(pieces: &[Piece]) -> ServicePath {
    let mut text = String::new();
    for p in pieces {
        match p {
            Piece::Lit(s) => text.push_str(s),
            _ => break,
        }
    }
    let segments = text.split('/').map(String::from).collect::<Vec<_>>();
    // `text` is "/x/y/" or "/x/y/prefix-": keep the complete segments only.
    let complete = segments.len().saturating_sub(1);
    ServicePath {
        segments: segments
            .into_iter()
            .take(complete)
            .filter(|s| !s.is_empty())
            .collect(),
        subtree: true,
    }
}

fn path_value_ok(v: &str) -> bool {
    !v.is_empty() && !v.contains(['/', '#'])
}

/// An endpoint prefix, split into the parts compared.
#[derive(Debug, Clone, PartialEq, Eq)]
struct EndpointPrefix {
    scheme: String,
    host: String,
    port: Option<u16>,
    path: String,
}

impl EndpointPrefix {
    fn parse(s: &str) -> Result<EndpointPrefix, String> {
        let u = url::Url::parse(s).map_err(|e| format!("endpoint_prefix {s:?}: {e}"))?;
        if !matches!(u.scheme(), "http" | "https") {
            return Err(format!(
                "endpoint_prefix {s:?} must be an http or https URL"
            ));
        }
        if !u.username().is_empty() || u.password().is_some() {
            return Err(format!(
                "endpoint_prefix {s:?} must not contain credentials"
            ));
        }
        if u.query().is_some() || u.fragment().is_some() {
            return Err(format!(
                "endpoint_prefix {s:?} must not have a query or fragment"
            ));
        }
        if !u.path().ends_with('/') {
            return Err(format!(
                "endpoint_prefix {s:?}: its path must end with '/' so it cannot match a sibling"
            ));
        }
        let host = u
            .host_str()
            .ok_or_else(|| format!("endpoint_prefix {s:?} has no host"))?
            .to_string();
        Ok(EndpointPrefix {
            scheme: u.scheme().into(),
            host,
            port: u.port_or_known_default(),
            path: u.path().into(),
        })
    }

    /// `None` when the endpoint is not a URL at all.
    fn matches(&self, endpoint: &str) -> Option<bool> {
        let u = url::Url::parse(endpoint).ok()?;
        Some(
            u.scheme() == self.scheme
                && u.username().is_empty()
                && u.password().is_none()
                && u.host_str() == Some(self.host.as_str())
                && u.port_or_known_default() == self.port
                && u.path().starts_with(&self.path),
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct NgsiRule {
    service: ServiceRule,
    service_path: PathRule,
    entity_id: IdRule,
    entity_type: Option<String>,
    attributes: Option<BTreeSet<String>>,
    endpoint: Option<EndpointPrefix>,
}

/// An NGSI rule's service path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PathRule {
    /// No placeholder: parsed once, at configure time.
    Fixed(ServicePath),
    Template(Vec<Piece>),
}

/// Which tenants an NGSI rule names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ServiceRule {
    Any,
    /// Lowercase, as Orion treats service names.
    Exact(String),
    /// `%t`: the caller's own tenant claim.
    CallersTenant,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Resource {
    Ngsi(NgsiRule),
    Mqtt(TopicTemplate),
}

/// An MQTT topic filter with placeholders, level by level.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TopicTemplateLevel {
    Plus,
    Hash,
    Pieces(Vec<Piece>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct TopicTemplate(Vec<TopicTemplateLevel>);

impl TopicTemplate {
    fn parse(s: &str) -> Result<TopicTemplate, String> {
        topic::validate_filter_text(s)?;
        let mut levels = Vec::new();
        for level in s.split('/') {
            levels.push(match level {
                "+" => TopicTemplateLevel::Plus,
                "#" => TopicTemplateLevel::Hash,
                l => TopicTemplateLevel::Pieces(parse_template(l, true)?),
            });
        }
        Ok(TopicTemplate(levels))
    }

    /// For a deny rule: a level whose placeholder cannot be substituted safely becomes `#`
    /// (the rule touches everything below it); at the first level, `None` (it touches
    /// everything, `$` topics included).
    fn instantiate_for_deny(&self, ctx: &Ctx) -> Option<TopicFilter> {
        let mut out = Vec::with_capacity(self.0.len());
        for (i, l) in self.0.iter().enumerate() {
            match l {
                TopicTemplateLevel::Plus => out.push(Level::Plus),
                TopicTemplateLevel::Hash => out.push(Level::Hash),
                TopicTemplateLevel::Pieces(p) => match render(p, ctx, topic::value_ok) {
                    Some(v) => out.push(Level::Lit(v)),
                    None if i == 0 => return None,
                    None => {
                        out.push(Level::Hash);
                        break;
                    }
                },
            }
        }
        Some(TopicFilter(out))
    }

    fn instantiate(&self, ctx: &Ctx) -> Option<TopicFilter> {
        let mut out = Vec::with_capacity(self.0.len());
        for l in &self.0 {
            out.push(match l {
                TopicTemplateLevel::Plus => Level::Plus,
                TopicTemplateLevel::Hash => Level::Hash,
                TopicTemplateLevel::Pieces(p) => Level::Lit(render(p, ctx, topic::value_ok)?),
            });
        }
        Some(TopicFilter(out))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    name: String,
    effect: Effect,
    subjects: Vec<Subject>,
    actions: BTreeSet<Action>,
    resource: Resource,
}

const ALL_ACTIONS: [Action; 6] = [
    Action::Read,
    Action::Write,
    Action::Create,
    Action::Delete,
    Action::Subscribe,
    Action::Register,
];

fn parse_action(s: &str) -> Option<Action> {
    ALL_ACTIONS.iter().copied().find(|a| {
        serde_json::to_value(a)
            .ok()
            .and_then(|v| v.as_str().map(|v| v == s))
            == Some(true)
    })
}

/// Longest entity id a glob is matched against.
const MAX_ID_LEN: usize = 1024;

/// Characters Orion refuses in ids and types (plus whitespace and controls).
fn bad_id_char(c: char) -> bool {
    c.is_whitespace() || c.is_control() || "<>\"'=;()&?/#".contains(c)
}

impl Rule {
    fn compile(cfg: &RuleConfig) -> Result<Rule, String> {
        if cfg.name.trim().is_empty() {
            return Err("name must not be empty".into());
        }
        if cfg.subjects.is_empty() {
            return Err("subjects must not be empty (use \"anyone\" explicitly)".into());
        }
        let subjects = cfg
            .subjects
            .iter()
            .map(|s| Subject::parse(s))
            .collect::<Result<Vec<_>, _>>()?;
        if cfg.actions.is_empty() {
            return Err("actions must not be empty (use \"*\" explicitly)".into());
        }
        let mqtt = cfg.mqtt.is_some();
        let mut actions = BTreeSet::new();
        for a in &cfg.actions {
            if a == "*" {
                if mqtt {
                    actions.extend([Action::Read, Action::Write]);
                } else {
                    actions.extend(ALL_ACTIONS);
                }
                continue;
            }
            let action = parse_action(a).ok_or_else(|| {
                format!(
                    "action {a:?} is unknown (read, write, create, delete, subscribe, register, *)"
                )
            })?;
            if mqtt && !matches!(action, Action::Read | Action::Write) {
                return Err(format!(
                    "action {a:?} does not apply to mqtt rules (read, write, *)"
                ));
            }
            actions.insert(action);
        }
        let resource = match (&cfg.ngsi, &cfg.mqtt) {
            (Some(n), None) => Resource::Ngsi(compile_ngsi(n)?),
            (None, Some(m)) => Resource::Mqtt(TopicTemplate::parse(&m.topic)?),
            _ => return Err("exactly one of \"ngsi\" and \"mqtt\" must be given".into()),
        };
        Ok(Rule {
            name: cfg.name.clone(),
            effect: cfg.effect,
            subjects,
            actions,
            resource,
        })
    }

    /// Whether the rule names the caller. (The engine finds these rules through its
    /// [`SubjectIndex`]; this is the definition the index is tested against.)
    #[cfg(test)]
    fn names(&self, id: Option<&Identity>) -> bool {
        self.subjects.iter().any(|s| s.matches(id))
    }
}

fn compile_ngsi(n: &NgsiResource) -> Result<NgsiRule, String> {
    let service = match n.service.as_str() {
        "*" => ServiceRule::Any,
        "%t" => ServiceRule::CallersTenant,
        s if s.contains('*') || s.contains('%') => {
            return Err(format!(
                "service {s:?}: only an exact name, \"%t\" (the caller's tenant) or \"*\" is \
                 allowed"
            ))
        }
        s => ServiceRule::Exact(s.to_lowercase()),
    };
    let service_path = parse_template(&n.service_path, false)?;
    // Validate the shape with a neutral stand-in for placeholders.
    let probe = render(
        &service_path,
        &Ctx {
            user: Some("u"),
            client: None,
            tenant: Some("t"),
        },
        |_| true,
    )
    .unwrap_or_default();
    let fixed_path = ServicePath::parse(&probe)?;
    let service_path = if service_path.iter().all(|p| matches!(p, Piece::Lit(_))) {
        PathRule::Fixed(fixed_path)
    } else {
        PathRule::Template(service_path)
    };
    let entity_id = match n.entity_id.as_str() {
        "*" => IdRule::Any,
        "" => return Err("entity_id must not be empty (use \"*\" for any)".into()),
        s => {
            if let Some(c) = s.chars().find(|c| bad_id_char(*c)) {
                return Err(format!(
                    "entity_id {s:?} contains the forbidden character {c:?}"
                ));
            }
            IdRule::compile(s)?
        }
    };
    let entity_type = match n.entity_type.as_str() {
        "*" => None,
        "" => return Err("entity_type must not be empty (use \"*\" for any)".into()),
        t if t.contains(['*', '%']) || t.chars().any(bad_id_char) => {
            return Err(format!(
                "entity_type {t:?}: only an exact type or \"*\" is allowed"
            ))
        }
        t => Some(t.to_string()),
    };
    let attributes = if n.attributes.iter().any(|a| a == "*") {
        if n.attributes.len() != 1 {
            return Err("attributes: \"*\" must be alone".into());
        }
        None
    } else if n.attributes.is_empty() {
        return Err("attributes must not be empty (use [\"*\"] for all)".into());
    } else {
        if let Some(a) = n
            .attributes
            .iter()
            .find(|a| a.is_empty() || a.contains(['*', '%']))
        {
            return Err(format!(
                "attribute {a:?}: only exact names or \"*\" are allowed"
            ));
        }
        Some(n.attributes.iter().cloned().collect())
    };
    let endpoint = n
        .endpoint_prefix
        .as_deref()
        .map(EndpointPrefix::parse)
        .transpose()?;
    Ok(NgsiRule {
        service,
        service_path,
        entity_id,
        entity_type,
        attributes,
        endpoint,
    })
}

// ------------------------------------------------------------------------------------------
// Requests, as accesses ready to match
// ------------------------------------------------------------------------------------------

/// An entity id or type as an access names it: one literal, or wide (a pattern, any).
#[derive(Debug, Clone, PartialEq, Eq)]
enum EntReq<'a> {
    Id(Cow<'a, str>),
    Wide,
}

/// One access, parsed once and borrowed from the request: the decision checks each rule
/// against its set of service paths and its set of attributes, never against their product.
#[derive(Debug)]
struct AccessView<'a> {
    action: Action,
    entity: EntReq<'a>,
    entity_type: EntReq<'a>,
    /// `None`: every attribute (`All`, or an empty `Only`).
    attributes: Option<&'a [String]>,
    service: String,
    paths: Vec<(ServicePath, &'a str)>,
    endpoint: Option<&'a str>,
}

impl<'a> AccessView<'a> {
    fn new(a: &'a Access) -> Result<AccessView<'a>, String> {
        let literal_or_wide =
            |re: &str| literal_regex(re).map_or(EntReq::Wide, |l| EntReq::Id(l.into()));
        let entity = match &a.entity {
            EntitySelector::Id(id) => EntReq::Id(Cow::Borrowed(id)),
            EntitySelector::IdPattern(re) => literal_or_wide(re),
            EntitySelector::Any => EntReq::Wide,
        };
        let entity_type = match &a.entity_type {
            TypeSelector::Type(t) => EntReq::Id(Cow::Borrowed(t)),
            TypeSelector::Pattern(re) => literal_or_wide(re),
            TypeSelector::Any => EntReq::Wide,
        };
        let attributes = match &a.attributes {
            AttributeSelector::Only(list) if !list.is_empty() => Some(list.as_slice()),
            _ => None,
        };
        if a.tenant.service_paths.is_empty() {
            return Err("the access names no service path".into());
        }
        let paths = a
            .tenant
            .service_paths
            .iter()
            .map(|p| Ok((ServicePath::parse(p)?, p.as_str())))
            .collect::<Result<Vec<_>, String>>()?;
        Ok(AccessView {
            action: a.action,
            entity,
            entity_type,
            attributes,
            service: a.tenant.service.to_lowercase(),
            paths,
            endpoint: a.endpoint.as_deref(),
        })
    }

    /// The attributes one by one; `None` stands for every attribute.
    fn attribute_items(&self) -> impl Iterator<Item = Option<&'a str>> + 'a {
        let only = self.attributes.map(|l| l.iter().map(|s| Some(s.as_str())));
        let all = self.attributes.is_none().then_some(None);
        only.into_iter().flatten().chain(all)
    }

    /// One (service path, attribute) of this access, for the decision's reason.
    fn unit(&self, path: usize, attribute: usize) -> UnitRef<'_> {
        UnitRef {
            view: self,
            path_text: self.paths.get(path).map_or("", |(_, t)| t),
            attribute: self.attribute_items().nth(attribute).flatten(),
        }
    }
}

/// One unit of an access — an action on its entity, one attribute, one service path — as
/// the decision names it.
struct UnitRef<'v> {
    view: &'v AccessView<'v>,
    path_text: &'v str,
    attribute: Option<&'v str>,
}

impl fmt::Display for UnitRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let action = serde_json::to_value(self.view.action)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        let show = |e: &EntReq| match e {
            EntReq::Id(s) => s.to_string(),
            EntReq::Wide => "*".into(),
        };
        write!(
            f,
            "{action} on entity {} of type {}, attribute {}, in service {:?} path {}",
            show(&self.view.entity),
            show(&self.view.entity_type),
            self.attribute.unwrap_or("*"),
            self.view.service,
            self.path_text
        )
    }
}

/// Characters that, backslash-escaped, are one literal character under every regex engine the
/// brokers use: POSIX ERE as glibc's `regcomp` compiles it (Orion's subscription cache), PCRE
/// (MongoDB queries), Java and JavaScript (NGSI-LD brokers). Other escapes are not: glibc
/// reads `\<`, `\>`, `` \` `` and `\'` as anchors and `\w`, `\b`, digits as classes and
/// back-references.
const LITERAL_ESCAPES: &str = ".[]()*+?{}|^$\\";

/// `^lit$` where lit is plain characters (`[A-Za-z0-9_:-]`) or one of [`LITERAL_ESCAPES`]
/// escaped: the only patterns taken as naming one entity (or type). Anything else may match
/// more than one name under some engine, and is a pattern.
pub fn literal_regex(re: &str) -> Option<String> {
    let body = re.strip_prefix('^')?;
    let mut out = String::new();
    let mut chars = body.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(e) if LITERAL_ESCAPES.contains(e) => out.push(e),
                _ => return None,
            },
            '$' if chars.peek().is_none() => return if out.is_empty() { None } else { Some(out) },
            c if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':') => out.push(c),
            _ => return None,
        }
    }
    None
}

/// An NGSI rule's templates filled in for one caller, once per request; what has no
/// placeholder is borrowed from the compiled rule.
enum Filled<'r> {
    /// An allow rule whose placeholder cannot be substituted: it grants nothing.
    NeverApplies,
    /// A deny rule whose service path cannot be rendered: when in doubt, it touches everything.
    TouchesAll,
    Rule {
        /// None: any service.
        service: Option<Cow<'r, str>>,
        /// None: any id.
        id_glob: Option<Cow<'r, [GlobTok]>>,
        path: Cow<'r, ServicePath>,
    },
}

/// A tenant claim usable as a service name: what Orion accepts in `fiware-service`.
fn service_value_ok(v: &str) -> bool {
    !v.is_empty() && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn fill<'r>(rule: &'r NgsiRule, ctx: &Ctx, deny: bool) -> Filled<'r> {
    let service = match &rule.service {
        ServiceRule::Any => None,
        ServiceRule::Exact(s) => Some(Cow::Borrowed(s.as_str())),
        ServiceRule::CallersTenant => match ctx.tenant.filter(|t| service_value_ok(t)) {
            Some(t) => Some(Cow::Owned(t.to_ascii_lowercase())),
            // No usable tenant claim: an allow rule grants nothing, a deny rule every tenant.
            None if deny => None,
            None => return Filled::NeverApplies,
        },
    };
    // A deny rule whose placeholder cannot be substituted touches any id, and the whole
    // subtree from the segment holding the placeholder.
    let id_glob = match rule.entity_id.instantiate(ctx) {
        Some(g) => g,
        None if deny => None,
        None => return Filled::NeverApplies,
    };
    let path = match &rule.service_path {
        PathRule::Fixed(path) => Cow::Borrowed(path),
        PathRule::Template(pieces) => match render(pieces, ctx, path_value_ok) {
            Some(text) => match ServicePath::parse(&text) {
                Ok(p) => Cow::Owned(p),
                Err(_) if deny => return Filled::TouchesAll,
                Err(_) => return Filled::NeverApplies,
            },
            None if deny => Cow::Owned(deny_path_prefix(pieces)),
            None => return Filled::NeverApplies,
        },
    };
    Filled::Rule {
        service,
        id_glob,
        path,
    }
}

// A filled NGSI rule covers (allow) or touches (deny) a unit of an access when the three
// checks below all hold: the parts of the access every unit shares, the unit's service path,
// the unit's attribute. Being separate is what lets the engine check each rule against the
// set of paths and the set of attributes instead of their product.

/// The parts every unit of an access shares: action aside, service, entity, type, endpoint.
fn access_match(rule: &NgsiRule, filled: &Filled, v: &AccessView, deny: bool) -> bool {
    let (service, id_glob) = match filled {
        Filled::NeverApplies => return false,
        Filled::TouchesAll => return true,
        Filled::Rule {
            service, id_glob, ..
        } => (service, id_glob),
    };
    let service_ok = service.as_ref().is_none_or(|s| **s == v.service);
    let entity_ok = match (id_glob, &v.entity) {
        (None, _) => true,
        // Orion's ids are at most 256 characters; a longer one is not matched by an allow
        // rule's glob (and is assumed to match a deny rule's).
        (Some(_), EntReq::Id(id)) if id.len() > MAX_ID_LEN => deny,
        (Some(g), EntReq::Id(id)) => glob_match(g, id),
        (Some(_), EntReq::Wide) => deny,
    };
    let type_ok = match (&rule.entity_type, &v.entity_type) {
        (None, _) => true,
        (Some(t), EntReq::Id(x)) => t == x,
        (Some(_), EntReq::Wide) => deny,
    };
    let endpoint_ok = match (&rule.endpoint, v.endpoint) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(p), Some(e)) => p.matches(e).unwrap_or(deny),
    };
    service_ok && entity_ok && type_ok && endpoint_ok
}

/// A unit's service path: covered by an allow rule, intersected by a deny rule.
fn path_match(filled: &Filled, p: &ServicePath, deny: bool) -> bool {
    match filled {
        Filled::NeverApplies => false,
        Filled::TouchesAll => true,
        Filled::Rule { path, .. } if deny => path.intersects(p),
        Filled::Rule { path, .. } => path.covers(p),
    }
}

/// A unit's attribute (`None`: every attribute).
fn attribute_match(rule: &NgsiRule, filled: &Filled, a: Option<&str>, deny: bool) -> bool {
    match (filled, &rule.attributes, a) {
        (Filled::NeverApplies, _, _) => false,
        (Filled::TouchesAll, _, _) | (_, None, _) => true,
        (_, Some(set), Some(a)) => set.contains(a),
        (_, Some(_), None) => deny,
    }
}

// ------------------------------------------------------------------------------------------
// The engine
// ------------------------------------------------------------------------------------------

/// A compiled, validated rule set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Acl {
    rules: Vec<Rule>,
    /// Which rules can apply to whom, so that a request looks only at those.
    by_subject: SubjectIndex,
}

/// The rules (by position) each subject names. A caller's rules are the union of the lists its
/// identity reaches, in rule order: exactly the rules with a subject that
/// [`Subject::matches`] the caller.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct SubjectIndex {
    users: BTreeMap<String, Vec<usize>>,
    devices: BTreeMap<String, Vec<usize>>,
    roles: BTreeMap<String, Vec<usize>>,
    groups: BTreeMap<String, Vec<usize>>,
    /// `authenticated` and `anyone`.
    any_identity: Vec<usize>,
    /// `anonymous` and `anyone`.
    no_identity: Vec<usize>,
}

impl SubjectIndex {
    fn new(rules: &[Rule]) -> SubjectIndex {
        let mut index = SubjectIndex::default();
        fn add(list: &mut Vec<usize>, rule: usize) {
            // Rules are added in order: a rule naming a subject twice is listed once.
            if list.last() != Some(&rule) {
                list.push(rule);
            }
        }
        for (i, rule) in rules.iter().enumerate() {
            for subject in &rule.subjects {
                match subject {
                    Subject::User(u) => add(index.users.entry(u.clone()).or_default(), i),
                    Subject::Device(d) => add(index.devices.entry(d.clone()).or_default(), i),
                    Subject::Role(r) => add(index.roles.entry(r.clone()).or_default(), i),
                    Subject::Group(g) => add(index.groups.entry(g.clone()).or_default(), i),
                    Subject::Authenticated => add(&mut index.any_identity, i),
                    Subject::Anonymous => add(&mut index.no_identity, i),
                    Subject::Anyone => {
                        add(&mut index.any_identity, i);
                        add(&mut index.no_identity, i);
                    }
                }
            }
        }
        index
    }

    /// The positions of the rules that can apply to `identity`, ascending.
    fn rules_for(&self, identity: Option<&Identity>) -> Cow<'_, [usize]> {
        let Some(id) = identity else {
            return Cow::Borrowed(&self.no_identity);
        };
        let is_device = matches!(
            id.kind,
            IdentityKind::DeviceKey | IdentityKind::ClientCertificate
        );
        let lists = [
            Some(&self.any_identity),
            self.users.get(&id.subject),
            self.devices.get(&id.subject).filter(|_| is_device),
        ]
        .into_iter()
        .chain(id.roles.iter().map(|r| self.roles.get(r)))
        .chain(id.groups.iter().map(|g| self.groups.get(g)))
        .flatten()
        .filter(|l| !l.is_empty());
        let mut found: Option<Cow<'_, [usize]>> = None;
        for list in lists {
            found = Some(match found {
                None => Cow::Borrowed(list.as_slice()),
                Some(so_far) => {
                    let mut merged = so_far.into_owned();
                    merged.extend_from_slice(list);
                    merged.sort_unstable();
                    merged.dedup();
                    Cow::Owned(merged)
                }
            });
        }
        found.unwrap_or(Cow::Borrowed(&[]))
    }
}

impl Acl {
    /// Validates and compiles every rule; the error names the rule and what is wrong.
    pub fn from_config(cfg: &AclConfig) -> Result<Acl, AclError> {
        let mut rules = Vec::with_capacity(cfg.rules.len());
        let mut names = BTreeSet::new();
        for (i, r) in cfg.rules.iter().enumerate() {
            let label = if r.name.is_empty() {
                format!("#{}", i + 1)
            } else {
                format!("#{} {:?}", i + 1, r.name)
            };
            let rule = Rule::compile(r).map_err(|message| AclError::Rule {
                rule: label.clone(),
                message,
            })?;
            if r.name == DEFAULT_DENY_RULE {
                return Err(AclError::Rule {
                    rule: label,
                    message: format!(
                        "the name {DEFAULT_DENY_RULE:?} is reserved: the decision log names \
                         requests no rule allows so"
                    ),
                });
            }
            if !names.insert(r.name.clone()) {
                return Err(AclError::Rule {
                    rule: label,
                    message: "duplicate rule name (names identify rules in the decision log)"
                        .into(),
                });
            }
            rules.push(rule);
        }
        let by_subject = SubjectIndex::new(&rules);
        Ok(Acl { rules, by_subject })
    }

    /// Parses `{"rules": [...]}` and compiles it.
    pub fn from_json(json: &str) -> Result<Acl, AclError> {
        let cfg: AclConfig =
            serde_json::from_str(json).map_err(|e| AclError::Json(e.to_string()))?;
        Acl::from_config(&cfg)
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// True if some allow rule's `endpoint_prefix` matches `endpoint`: the operator named it,
    /// so [`crate::notification_endpoint`]'s refusals do not apply to it (the rules still
    /// decide who may use it).
    pub fn allow_rule_names_endpoint(&self, endpoint: &str) -> bool {
        self.rules.iter().any(|r| match &r.resource {
            Resource::Ngsi(n) if r.effect == Effect::Allow => n
                .endpoint
                .as_ref()
                .is_some_and(|p| p.matches(endpoint) == Some(true)),
            _ => false,
        })
    }

    /// The rules that name the caller, in order.
    fn rules_for<'a>(&'a self, identity: Option<&Identity>) -> impl Iterator<Item = &'a Rule> {
        let positions = self.by_subject.rules_for(identity);
        (0..positions.len()).filter_map(move |k| positions.get(k).and_then(|&i| self.rules.get(i)))
    }

    /// Decides an NGSI request: allowed only if every access is.
    ///
    /// The work is linear in (service paths + attributes) × rules per access, whatever the
    /// product of paths and attributes: each rule is checked against each set once, and the
    /// first unit a decision names is found from the first path and the first attribute.
    pub fn check_accesses(&self, identity: Option<&Identity>, accesses: &[Access]) -> Decision {
        if accesses.is_empty() {
            return Decision::denied_by_default("anything: the request names nothing to allow");
        }
        let views = match accesses
            .iter()
            .map(AccessView::new)
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(v) => v,
            Err(e) => return Decision::Deny(DenyReason::BadRequest(e)),
        };
        let ctx = Ctx {
            user: identity.map(|i| i.subject.as_str()),
            client: None,
            tenant: identity.and_then(|i| i.tenant.as_deref()),
        };
        // The rules for this caller, filled in once: the per-access loops below only match.
        let prepared: Vec<(&Rule, &NgsiRule, Filled)> = self
            .rules_for(identity)
            .filter_map(|r| match &r.resource {
                Resource::Ngsi(n) => Some((r, n, fill(n, &ctx, r.effect == Effect::Deny))),
                Resource::Mqtt(_) => None,
            })
            .collect();
        // Deny wins: first the first unit (in request order) some deny rule touches.
        let mut attrs_memo = AttributeMemo::default();
        for v in &views {
            let first_attrs = attrs_memo.first_touched(v, &prepared);
            let mut first: Option<(usize, usize, usize)> = None;
            for (ri, (r, n, f)) in prepared.iter().enumerate() {
                if r.effect != Effect::Deny
                    || !r.actions.contains(&v.action)
                    || !access_match(n, f, v, true)
                {
                    continue;
                }
                let Some(x) = first_attrs.get(ri).copied().flatten() else {
                    continue;
                };
                let Some(p) = v.paths.iter().position(|(p, _)| path_match(f, p, true)) else {
                    continue;
                };
                if first.is_none_or(|(fp, fx, _)| (p, x) < (fp, fx)) {
                    first = Some((p, x, ri));
                }
            }
            if let Some((p, x, ri)) = first {
                let name = prepared.get(ri).map_or("", |(r, _, _)| r.name.as_str());
                return Decision::denied_by_rule(name, v.unit(p, x));
            }
        }
        // Then every unit must be covered by some allow rule; the decision names, in request
        // order, the first allow rule covering each unit.
        let mut deciders: Vec<usize> = Vec::new();
        let mut cover_memo = CoverMemo::default();
        for v in &views {
            let candidates: Vec<usize> = prepared
                .iter()
                .enumerate()
                .filter(|(_, (r, n, f))| {
                    r.effect == Effect::Allow
                        && r.actions.contains(&v.action)
                        && access_match(n, f, v, false)
                })
                .map(|(i, _)| i)
                .collect();
            for (pi, (p, _)) in v.paths.iter().enumerate() {
                let covering: Vec<usize> = candidates
                    .iter()
                    .copied()
                    .filter(|&i| {
                        prepared
                            .get(i)
                            .is_some_and(|(_, _, f)| path_match(f, p, false))
                    })
                    .collect();
                match cover_memo.attributes_covered(v, covering, &prepared) {
                    Ok(rules) => {
                        for r in rules {
                            if !deciders.contains(r) {
                                deciders.push(*r);
                            }
                        }
                    }
                    Err(x) => return Decision::denied_by_default(v.unit(pi, x)),
                }
            }
        }
        let names: Vec<&str> = deciders
            .iter()
            .filter_map(|&i| prepared.get(i).map(|(r, _, _)| r.name.as_str()))
            .collect();
        Decision::allowed_by_rules(&names)
    }

    /// [`Acl::check_accesses`] on a request model's output.
    pub fn check_request(&self, identity: Option<&Identity>, request: &RequestAccess) -> Decision {
        self.check_accesses(identity, &request.accesses)
    }

    /// Decides publishing to a topic (`Write`) or subscribing to / receiving on a topic or
    /// filter (`Read`), with Mosquitto's matching. The username is the identity's subject.
    pub fn check_topic(
        &self,
        identity: Option<&Identity>,
        client_id: &str,
        topic_or_filter: &str,
        access: TopicAccess,
    ) -> Decision {
        let req = match TopicFilter::parse(topic_or_filter, access == TopicAccess::Read) {
            Ok(f) => f,
            Err(e) => return Decision::Deny(DenyReason::BadRequest(e)),
        };
        let ctx = Ctx {
            user: identity.map(|i| i.subject.as_str()),
            client: Some(client_id),
            tenant: identity.and_then(|i| i.tenant.as_deref()),
        };
        let action = access.action();
        let callers_rules = self.by_subject.rules_for(identity);
        let mqtt_rules = || {
            callers_rules
                .iter()
                .filter_map(|&i| self.rules.get(i))
                .filter_map(|r| match &r.resource {
                    Resource::Mqtt(t) if r.actions.contains(&action) => Some((r, t)),
                    _ => None,
                })
        };
        let what = match access {
            TopicAccess::Read => "read",
            TopicAccess::Write => "write",
        };
        for (r, t) in mqtt_rules().filter(|(r, _)| r.effect == Effect::Deny) {
            let hit = t
                .instantiate_for_deny(&ctx)
                .is_none_or(|f| f.intersects(&req));
            if hit {
                return Decision::denied_by_rule(&r.name, format!("{what} on {topic_or_filter:?}"));
            }
        }
        for (r, t) in mqtt_rules().filter(|(r, _)| r.effect == Effect::Allow) {
            if t.instantiate(&ctx).is_some_and(|f| f.covers(&req)) {
                return Decision::allowed_by_rules(&[&r.name]);
            }
        }
        Decision::denied_by_default(format_args!("{what} on {topic_or_filter:?}"))
    }
}

/// For each prepared rule, the first attribute of an access it touches as a deny rule;
/// remembered for the next access when it names the same attributes (an id list × an
/// attribute list gives every access the same list).
#[derive(Default)]
struct AttributeMemo<'a> {
    /// The attributes last seen, and per prepared rule the first one it touches.
    last: Option<(Attributes<'a>, Vec<Option<usize>>)>,
}

/// An access's attribute names (`None`: every attribute).
type Attributes<'a> = Option<&'a [String]>;

impl<'a> AttributeMemo<'a> {
    fn first_touched(
        &mut self,
        v: &AccessView<'a>,
        prepared: &[(&Rule, &NgsiRule, Filled)],
    ) -> &[Option<usize>] {
        let fresh = self.last.as_ref().is_none_or(|(a, _)| *a != v.attributes);
        if fresh {
            let firsts = prepared
                .iter()
                .map(|(r, n, f)| {
                    if r.effect != Effect::Deny {
                        return None;
                    }
                    v.attribute_items()
                        .position(|a| attribute_match(n, f, a, true))
                })
                .collect();
            self.last = Some((v.attributes, firsts));
        }
        self.last.as_ref().map_or(&[], |(_, f)| f.as_slice())
    }
}

/// Which allow rules (in order) cover the attributes of an access, given the rules that
/// cover a service path — or the first attribute none covers. Remembered for the next path
/// or access with the same rules and attributes.
#[derive(Default)]
struct CoverMemo<'a> {
    /// The covering rules and attributes last seen, and what they decided.
    last: Option<(Vec<usize>, Attributes<'a>, Covered)>,
}

/// The allow rules covering every attribute (in order), or the first attribute none covers.
type Covered = Result<Vec<usize>, usize>;

impl<'a> CoverMemo<'a> {
    fn attributes_covered(
        &mut self,
        v: &AccessView<'a>,
        covering: Vec<usize>,
        prepared: &[(&Rule, &NgsiRule, Filled)],
    ) -> Result<&[usize], usize> {
        let fresh = self
            .last
            .as_ref()
            .is_none_or(|(c, a, _)| *c != covering || *a != v.attributes);
        if fresh {
            let mut rules: Vec<usize> = Vec::new();
            let mut outcome = Ok(());
            for (x, a) in v.attribute_items().enumerate() {
                let first = covering.iter().copied().find(|&i| {
                    prepared
                        .get(i)
                        .is_some_and(|(_, n, f)| attribute_match(n, f, a, false))
                });
                match first {
                    Some(i) if !rules.contains(&i) => rules.push(i),
                    Some(_) => {}
                    None => {
                        outcome = Err(x);
                        break;
                    }
                }
            }
            self.last = Some((covering, v.attributes, outcome.map(|()| rules)));
        }
        match self.last.as_ref() {
            Some((_, _, Ok(rules))) => Ok(rules.as_slice()),
            Some((_, _, Err(x))) => Err(*x),
            None => Ok(&[]),
        }
    }
}
