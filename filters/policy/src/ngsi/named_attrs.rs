//! Attribute names a request uses besides the ones it asks to get back: the attributes it
//! filters on (`q`, `mq`, geo-queries), sorts by (`orderBy`), picks or omits, or watches
//! (subscription conditions). Each of them is read: `q=pressure>3` answers one bit about
//! `pressure` per request even when only `temperature` comes back. The dialect modules join
//! these names to the attributes of the request's read (or subscribe) accesses with
//! [`NamedAttrs::join`].
//!
//! | source | names |
//! |---|---|
//! | v2 `q`, `expression.q`, NGSI10 `FIWARE::StringQuery` | each statement's attribute (Orion's StringFilter: split at every `;`; `!a`, `a`, `a==1`, `a~=x`, `a:1`, ...; `a.b.c` is `a`; `'a.b'.c` is `a.b`) |
//! | v2 `mq`, `expression.mq`, NGSI10 `FIWARE::StringQuery::Metadata` | the attribute of each `attr.metadata` statement |
//! | v2 `orderBy` | each key but `id`, `type`, `dateCreated`, `dateModified`, `servicePath`, `geo:distance` (`!` is descending; `a.b` is `a`) |
//! | v2 `georel`/`geometry`/`coords` (URL or `expression`), NGSI10 location scopes | every attribute: Orion filters on the entity's one geo-location attribute, whose name the request does not say |
//! | NGSI-LD `q` (URL, query body, subscription) | each term's attribute (`;` and `\|`, nested parentheses up to [`MAX_QUERY_DEPTH`]; `a.b` and `a[b]` are `a`; a name with `:`, an expanded URI, also counts whole) |
//! | NGSI-LD `geoproperty`, `geoQ.geoproperty` | that property (`location` when a geo-query names none) |
//! | NGSI-LD `geometryProperty`, `pick`, `omit` | the names listed (`id`, `type` excepted) |
//! | v2 `subject.condition.attrs`, NGSI-LD `watchedAttributes`, NGSI10 `condValues`/`condValueList` | the names listed |
//! | NGSI10 `restriction.attributeExpression`, `geoRel`/`geometry`, a notify condition's `restriction`, an unknown scope type | every attribute (the model does not read them) |
//! | FogFlow `stringQuery` scope | the name left of `=` in each `;` item |
//!
//! Bounds (all refusals are 400, never "no names"): an expression longer than
//! [`MAX_EXPRESSION_BYTES`], more than [`MAX_NAMED_ATTRIBUTES`] distinct names in one request,
//! an expression the brokers would not parse (empty statement, operator without attribute,
//! unbalanced parentheses or quotes). Names repeat freely (`q=a>1;a<5` names `a` once).
//! URL expressions are read with a raw `+` as a space, as every broker decodes them
//! (see `canonical`).

use std::collections::HashSet;

use serde_json::{Map, Value};

use crate::access::AttributeSelector;
use crate::decision::DenyReason;

use super::canonical::Query;
use super::{as_list, as_object, bad, dedup_names};

/// The longest filter expression (one `q`, `mq`, `orderBy`, list, or body string) read.
pub const MAX_EXPRESSION_BYTES: usize = 8192;

/// The most distinct attribute names one request may name in its filters, sort keys and
/// conditions (the same bound as an `attrs` list, [`super::MAX_LIST_ITEMS`]).
pub const MAX_NAMED_ATTRIBUTES: usize = 1000;

/// The deepest nesting of parentheses read in an NGSI-LD `q`.
pub const MAX_QUERY_DEPTH: usize = 16;

/// Entity members that `pick`/`omit` may name but that are not attributes.
const NOT_ATTRIBUTES: &[&str] = &["id", "type", "@context", "scope"];

/// The attribute names one request uses, deduplicated and capped.
#[derive(Debug, Default)]
pub(crate) struct NamedAttrs {
    names: Vec<String>,
    seen: HashSet<String>,
    /// The request filters on attributes it does not name (a v2 geo-query, an NGSI10
    /// location scope or attribute expression).
    every: bool,
}

impl NamedAttrs {
    /// Widens what an access reads by these names: `All` stays `All`; a filter on an unnamed
    /// attribute makes it `All`.
    pub(crate) fn join(self, projection: AttributeSelector) -> AttributeSelector {
        match projection {
            AttributeSelector::All => AttributeSelector::All,
            _ if self.every => AttributeSelector::All,
            AttributeSelector::Only(mut names) => {
                names.extend(self.names);
                AttributeSelector::Only(dedup_names(names))
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn names(&self) -> (&[String], bool) {
        (&self.names, self.every)
    }

    fn add(&mut self, name: &str, what: &str) -> Result<(), DenyReason> {
        let name = trim(name);
        if name.is_empty() {
            return Err(bad(format!("{what} names an empty attribute")));
        }
        if name.chars().any(char::is_control) {
            return Err(bad(format!("{what} contains control characters")));
        }
        if self.seen.contains(name) {
            return Ok(());
        }
        if self.names.len() >= MAX_NAMED_ATTRIBUTES {
            return Err(bad(format!(
                "request names more than {MAX_NAMED_ATTRIBUTES} attributes in its filters, \
                 sort keys and conditions"
            )));
        }
        self.seen.insert(name.to_owned());
        self.names.push(name.to_owned());
        Ok(())
    }

    fn add_every(&mut self) {
        self.every = true;
    }
}

fn trim(s: &str) -> &str {
    s.trim_matches(|c| c == ' ' || c == '\t')
}

fn check_len(expr: &str, what: &str) -> Result<(), DenyReason> {
    if expr.len() > MAX_EXPRESSION_BYTES {
        return Err(bad(format!(
            "{what} is {} bytes long, more than the {MAX_EXPRESSION_BYTES} allowed",
            expr.len()
        )));
    }
    Ok(())
}

// ---- NGSI v2 (Orion) ----

/// Names in the v2 URL parameters `q`, `mq`, `orderBy`, `georel`/`geometry`/`coords`.
pub(crate) fn v2_url(q: &Query) -> Result<NamedAttrs, DenyReason> {
    let mut out = NamedAttrs::default();
    if let Some(e) = q.get("q")? {
        v2_string_filter(e, "q", &mut out)?;
    }
    if let Some(e) = q.get("mq")? {
        v2_string_filter(e, "mq", &mut out)?;
    }
    if let Some(e) = q.get("orderBy")? {
        v2_order_by(e, &mut out)?;
    }
    for geo in ["georel", "geometry", "coords"] {
        if q.get(geo)?.is_some() {
            out.add_every();
        }
    }
    Ok(out)
}

/// Names in a v2 `expression` object (op/query body, subscription `subject.condition`).
fn v2_expression(v: &Value, what: &str, out: &mut NamedAttrs) -> Result<(), DenyReason> {
    let obj = as_object(v, what)?;
    for key in ["q", "mq"] {
        if let Some(e) = body_str(obj, key, what)? {
            v2_string_filter(e, &format!("{what}.{key}"), out)?;
        }
    }
    for geo in ["georel", "geometry", "coords"] {
        if obj.contains_key(geo) {
            out.add_every();
        }
    }
    Ok(())
}

/// Names in a v2 `POST /v2/op/query` body (`expression`) and its URL (`orderBy`, and `q`
/// and friends, which Orion ignores there but which cost nothing to count).
pub(crate) fn v2_op_query(q: &Query, body: &Map<String, Value>) -> Result<NamedAttrs, DenyReason> {
    let mut out = v2_url(q)?;
    if let Some(e) = body.get("expression") {
        v2_expression(e, "expression", &mut out)?;
    }
    Ok(out)
}

/// Names in a v2 subscription `subject` (`condition.attrs`, `condition.expression`).
pub(crate) fn v2_subscription(
    subject: Option<&Map<String, Value>>,
) -> Result<NamedAttrs, DenyReason> {
    let mut out = NamedAttrs::default();
    let Some(condition) = subject.and_then(|s| s.get("condition")) else {
        return Ok(out);
    };
    let condition = as_object(condition, "subject.condition")?;
    if let Some(attrs) = condition.get("attrs") {
        name_list(attrs, "subject.condition.attrs", &mut out)?;
    }
    if let Some(e) = condition.get("expression") {
        v2_expression(e, "subject.condition.expression", &mut out)?;
    }
    Ok(out)
}

/// Orion's StringFilter (`q` and `mq`): statements split at every `;` (quotes do not protect
/// one), a trailing `;` dropped, `;;` or an empty statement refused. An `mq` statement is
/// `attr.metadata[.path]`: its attribute is found the same way as a `q` statement's.
pub(crate) fn v2_string_filter(
    expr: &str,
    what: &str,
    out: &mut NamedAttrs,
) -> Result<(), DenyReason> {
    check_len(expr, what)?;
    if expr.contains(";;") {
        return Err(bad(format!("{what} has an empty statement")));
    }
    let expr = trim(expr.strip_suffix(';').unwrap_or(expr));
    if expr.is_empty() || expr.ends_with(';') {
        return Err(bad(format!("{what} has an empty statement")));
    }
    // A leading `;` yields no statement (Orion splits with strtok).
    for statement in expr.split(';').filter(|s| !s.is_empty()) {
        let statement = trim(statement);
        if statement.is_empty() {
            return Err(bad(format!("{what} has an empty statement")));
        }
        let lhs = match statement.strip_prefix('!') {
            Some(negated) => negated,
            None => v2_left_hand_side(statement),
        };
        let attribute = v2_attribute(trim(lhs));
        if attribute.is_empty() {
            return Err(bad(format!(
                "{what} has a statement without an attribute: {statement:?}"
            )));
        }
        out.add(&attribute, what)?;
    }
    Ok(())
}

/// The text before a statement's operator, as Orion finds it: the first `==`, `~=`, `!=`,
/// `>=`, `<=`, `<`, `>` or `:` outside single quotes; none → the whole statement (a unary
/// "exists" test).
fn v2_left_hand_side(statement: &str) -> &str {
    let b = statement.as_bytes();
    let mut quoted = false;
    for (i, &c) in b.iter().enumerate() {
        if c == b'\'' {
            quoted = !quoted;
            continue;
        }
        if quoted {
            continue;
        }
        let operator = if b.get(i + 1) == Some(&b'=') {
            matches!(c, b'=' | b'~' | b'!' | b'>' | b'<')
        } else {
            matches!(c, b'<' | b'>' | b':')
        };
        if operator {
            // ASCII at `i`: a char boundary.
            return statement.get(..i).unwrap_or(statement);
        }
    }
    statement
}

/// The attribute of a left-hand side: up to the first `.` outside single quotes, quotes
/// removed (`'a.b'.c` → `a.b`, Orion's way of naming an attribute with a dot).
fn v2_attribute(lhs: &str) -> String {
    let mut quoted = false;
    let mut name = String::new();
    for c in lhs.chars() {
        match c {
            '\'' => quoted = !quoted,
            '.' if !quoted => break,
            c => name.push(c),
        }
    }
    name
}

/// Orion's `orderBy`: a comma list of keys, `!` for descending; builtins are not attributes.
fn v2_order_by(expr: &str, out: &mut NamedAttrs) -> Result<(), DenyReason> {
    const BUILTINS: &[&str] = &[
        "id",
        "type",
        "dateCreated",
        "dateModified",
        "servicePath",
        "geo:distance",
    ];
    check_len(expr, "orderBy")?;
    for key in expr.split(',') {
        let key = trim(key);
        let key = key.strip_prefix('!').unwrap_or(key);
        if key.is_empty() {
            return Err(bad("orderBy has an empty key"));
        }
        if BUILTINS.contains(&key) {
            continue;
        }
        // Orion sorts on `attrs.<key>.value`: `a.b` reaches into attribute `a`.
        let attribute = key.split('.').next().unwrap_or(key);
        out.add(attribute, "orderBy")?;
    }
    Ok(())
}

// ---- NGSI-LD ----

/// Names in the NGSI-LD URL parameters `q`, `geoproperty` (or `location` for a geo-query),
/// `geometryProperty`, `pick`, `omit`.
pub(crate) fn ld_url(q: &Query) -> Result<NamedAttrs, DenyReason> {
    let mut out = NamedAttrs::default();
    if let Some(e) = q.get("q")? {
        ld_query(e, "q", &mut out)?;
    }
    let mut geo_query = false;
    for key in ["georel", "geometry", "coordinates"] {
        geo_query |= q.get(key)?.is_some();
    }
    match q.get("geoproperty")? {
        Some(p) => out.add(p, "geoproperty")?,
        None if geo_query => out.add("location", "geoproperty")?,
        None => {}
    }
    for key in ["geometryProperty", "pick", "omit"] {
        if let Some(list) = q.get(key)? {
            check_len(list, key)?;
            for name in list.split(',') {
                if !NOT_ATTRIBUTES.contains(&trim(name)) {
                    out.add(name, key)?;
                }
            }
        }
    }
    Ok(out)
}

/// Names in an NGSI-LD query body (`POST /entityOperations/query`) or subscription: `q`,
/// `geoQ.geoproperty`, and for subscriptions `watchedAttributes`.
pub(crate) fn ld_body(obj: &Map<String, Value>) -> Result<NamedAttrs, DenyReason> {
    let mut out = NamedAttrs::default();
    if let Some(e) = body_str(obj, "q", "body")? {
        ld_query(e, "q", &mut out)?;
    }
    if let Some(geo) = obj.get("geoQ") {
        let geo = as_object(geo, "geoQ")?;
        let property = body_str(geo, "geoproperty", "geoQ")?.unwrap_or("location");
        out.add(property, "geoQ.geoproperty")?;
    }
    if let Some(watched) = obj.get("watchedAttributes") {
        name_list(watched, "watchedAttributes", &mut out)?;
    }
    Ok(out)
}

/// An NGSI-LD query (ETSI GS CIM 009, "Query language"): terms joined by `;` (and) or `|`
/// (or), grouped by parentheses; a term is `attr`, `!attr`, or `attr <op> value` with
/// `==`, `!=`, `>=`, `>`, `<=`, `<`, `~=`, `!~=`; values may be double-quoted strings in which
/// `;`, `|` and `)` are text.
pub(crate) fn ld_query(expr: &str, what: &str, out: &mut NamedAttrs) -> Result<(), DenyReason> {
    check_len(expr, what)?;
    let mut parser = LdQuery {
        s: expr.as_bytes(),
        pos: 0,
        what,
    };
    parser.expression(0, out)?;
    if parser.pos < parser.s.len() {
        return Err(parser.error("an unbalanced ')'"));
    }
    Ok(())
}

struct LdQuery<'a> {
    s: &'a [u8],
    pos: usize,
    what: &'a str,
}

impl LdQuery<'_> {
    fn error(&self, problem: &str) -> DenyReason {
        bad(format!(
            "{} is not an NGSI-LD query: {problem} at byte {}",
            self.what, self.pos
        ))
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn skip_spaces(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.pos += 1;
        }
    }

    /// Terms and groups joined by `;`/`|`, up to the end or a `)` (left for the caller).
    fn expression(&mut self, depth: usize, out: &mut NamedAttrs) -> Result<(), DenyReason> {
        loop {
            self.skip_spaces();
            if self.peek() == Some(b'(') {
                if depth >= MAX_QUERY_DEPTH {
                    return Err(bad(format!(
                        "{} nests parentheses deeper than {MAX_QUERY_DEPTH}",
                        self.what
                    )));
                }
                self.pos += 1;
                self.expression(depth + 1, out)?;
                if self.peek() != Some(b')') {
                    return Err(self.error("a '(' without its ')'"));
                }
                self.pos += 1;
            } else {
                self.term(out)?;
            }
            self.skip_spaces();
            match self.peek() {
                Some(b';' | b'|') => self.pos += 1,
                None | Some(b')') => return Ok(()),
                Some(_) => return Err(self.error("a term followed by neither ';', '|' nor ')'")),
            }
        }
    }

    fn term(&mut self, out: &mut NamedAttrs) -> Result<(), DenyReason> {
        let negated = self.peek() == Some(b'!') && self.s.get(self.pos + 1) != Some(&b'=');
        if negated {
            self.pos += 1;
        }
        let start = self.pos;
        while let Some(c) = self.peek() {
            if matches!(
                c,
                b'=' | b'!' | b'>' | b'<' | b'~' | b';' | b'|' | b'(' | b')'
            ) {
                break;
            }
            self.pos += 1;
        }
        let path = self
            .s
            .get(start..self.pos)
            .and_then(|b| std::str::from_utf8(b).ok())
            .map(trim)
            .unwrap_or("");
        if path.is_empty() {
            return Err(self.error("a term without an attribute"));
        }
        self.add_attribute(path, out)?;
        if negated || matches!(self.peek(), None | Some(b';' | b'|' | b')')) {
            return Ok(());
        }
        self.operator()?;
        self.value()
    }

    /// `attr.sub` and `attr[sub]` are about `attr`; an expanded name (`https://x.org/a.b`)
    /// counts both as the brokers' grammar splits it and whole.
    fn add_attribute(&self, path: &str, out: &mut NamedAttrs) -> Result<(), DenyReason> {
        let unbracketed = path.split('[').next().unwrap_or(path);
        let attribute = unbracketed.split('.').next().unwrap_or(unbracketed);
        out.add(attribute, self.what)?;
        if unbracketed.contains(':') && unbracketed != attribute {
            out.add(unbracketed, self.what)?;
        }
        Ok(())
    }

    fn operator(&mut self) -> Result<(), DenyReason> {
        const OPERATORS: [&[u8]; 8] = [b"==", b"!=", b">=", b"<=", b"~=", b"!~=", b">", b"<"];
        let rest = self.s.get(self.pos..).unwrap_or_default();
        // Longest first: `!~=` before `!=`… the list is ordered so no prefix precedes a
        // longer operator it starts (`!~=` does not start with `!=`).
        match OPERATORS.iter().find(|op| rest.starts_with(op)) {
            Some(op) => {
                self.pos += op.len();
                Ok(())
            }
            None => Err(self.error("an unknown operator")),
        }
    }

    /// A value: up to `;`, `|` or `)` outside double quotes (`\` escapes inside them).
    fn value(&mut self) -> Result<(), DenyReason> {
        self.skip_spaces();
        let start = self.pos;
        let mut quoted = false;
        while let Some(c) = self.peek() {
            match c {
                b'"' => quoted = !quoted,
                b'\\' if quoted => self.pos += 1,
                b';' | b'|' | b')' if !quoted => break,
                _ => {}
            }
            self.pos += 1;
        }
        if quoted {
            return Err(self.error("an unterminated string"));
        }
        if self.pos == start {
            return Err(self.error("an operator without a value"));
        }
        Ok(())
    }
}

// ---- NGSI10 (Orion NGSIv1 queryContext, FogFlow) ----

/// Names in an NGSI10 `queryContext`/`subscribeContext`/`discoverContextAvailability` body:
/// `restriction` scopes and `notifyConditions` (see the module table).
pub(crate) fn ngsi10_body(obj: &Map<String, Value>) -> Result<NamedAttrs, DenyReason> {
    let mut out = NamedAttrs::default();
    if let Some(r) = obj.get("restriction") {
        ngsi10_restriction(as_object(r, "restriction")?, &mut out)?;
    }
    if let Some(conditions) = obj.get("notifyConditions") {
        let conditions = conditions
            .as_array()
            .ok_or_else(|| bad("notifyConditions must be a JSON array"))?;
        for c in as_list(conditions, "notifyConditions")? {
            let c = as_object(c, "notifyCondition")?;
            for key in ["condValues", "condValueList"] {
                if let Some(names) = c.get(key) {
                    name_list(names, key, &mut out)?;
                }
            }
            if non_empty(c.get("restriction")) {
                out.add_every();
            }
        }
    }
    Ok(out)
}

fn ngsi10_restriction(r: &Map<String, Value>, out: &mut NamedAttrs) -> Result<(), DenyReason> {
    for opaque in ["attributeExpression", "geoRel", "geometry"] {
        if non_empty(r.get(opaque)) {
            out.add_every();
        }
    }
    let Some(scopes) = r.get("scopes") else {
        return Ok(());
    };
    let scopes = scopes
        .as_array()
        .ok_or_else(|| bad("restriction.scopes must be a JSON array"))?;
    for scope in as_list(scopes, "restriction.scopes")? {
        let scope = as_object(scope, "scope")?;
        let kind = body_str(scope, "scopeType", "scope")?
            .ok_or_else(|| bad("scope.scopeType is required"))?;
        let value = scope.get("scopeValue");
        let text = || {
            value
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("scopeValue of a {kind} scope must be a string")))
        };
        match kind {
            "FIWARE::StringQuery" | "FIWARE::StringQuery::Metadata" => {
                v2_string_filter(text()?, "scopeValue", out)?
            }
            // Orion: entity type existence; FogFlow: which sites answer. No attribute.
            "FIWARE::Filter::Existence" | "FIWARE::Filter::Not::Existence" => {}
            k if k.eq_ignore_ascii_case("global") || k.eq_ignore_ascii_case("local") => {}
            k if k.eq_ignore_ascii_case("stringQuery") => {
                let expr = text()?;
                check_len(expr, "scopeValue")?;
                for item in expr.split(';') {
                    out.add(item.split('=').next().unwrap_or(item), "stringQuery")?;
                }
            }
            // Location scopes (FIWARE::Location[::NGSIv2], circle, polygon, nearby, ...) and
            // anything unknown: every attribute.
            _ => out.add_every(),
        }
    }
    Ok(())
}

// ---- shared ----

/// An optional string member of a body object; present but not a string → 400.
fn body_str<'v>(
    obj: &'v Map<String, Value>,
    key: &str,
    what: &str,
) -> Result<Option<&'v str>, DenyReason> {
    match obj.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => {
            check_len(s, &format!("{what}.{key}"))?;
            Ok(Some(s))
        }
        Some(_) => Err(bad(format!("{what}.{key} must be a string"))),
    }
}

fn non_empty(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(_) => true,
    }
}

/// A JSON array of attribute names (strings), at most [`super::MAX_LIST_ITEMS`].
fn name_list(v: &Value, what: &str, out: &mut NamedAttrs) -> Result<(), DenyReason> {
    let arr = v
        .as_array()
        .ok_or_else(|| bad(format!("{what} must be an array of strings")))?;
    for item in as_list(arr, what)? {
        let name = item
            .as_str()
            .ok_or_else(|| bad(format!("{what} must be an array of strings")))?;
        check_len(name, what)?;
        out.add(name, what)?;
    }
    Ok(())
}
