//! Canonical form of an NGSI request: path, query and tenant headers.
//!
//! Path decisions (Envoy normalises before us, but the model does not rely on it):
//! * the path must be absolute; a fragment (`#`) or backslash (raw or encoded) is refused;
//! * each segment is percent-decoded exactly once (`%252F` stays the literal `%2F`);
//!   a malformed escape (`%zz`, truncated `%4`) or invalid UTF-8 is refused;
//! * `.`/`..` segments, raw or encoded (`%2e%2e`), are refused, never resolved;
//! * an empty segment (`//`) is refused, except that one trailing slash is dropped
//!   (FogFlow registers `/ngsi-ld/v1/entities/` and `/ngsi-ld/v1/subscriptions/`);
//! * an encoded `/` (`%2F`) inside a segment is refused: the broker might split on it;
//! * matching is case-sensitive, as Orion's v2 and FogFlow's routers are (`/V2/entities` is
//!   not an endpoint and is refused as unclassified). Orion's legacy NGSIv1 routes are
//!   case-insensitive (`/V1/...`, `/NGSI10/...`): those spellings are refused, never allowed.
//! * Orion itself drops one trailing `/` of the URL path (`urlCheck` in `rest.cpp`); so do we.
//!
//! Query: split on `&`, then on the first `=`, each side decoded once as an HTML form field: a
//! raw `+` is a space, `%2B` is a plus. That is how every broker's HTTP layer reads query
//! parameters, names and values alike: libmicrohttpd in Orion and Orion-LD (`MHD_unescape_plus`
//! before percent-decoding, in `MHD_parse_arguments_`), Go's `url.ParseQuery` in FogFlow, the
//! Netty/Spring decoders of Scorpio and Stellio. So `id=Room+1` names the entity `Room 1`, and
//! an `idPattern` regex needs `%2B` for a plus. A parameter the model reads (id, type, attrs,
//! ...) given twice is refused as ambiguous.
//!
//! Tenant, as Orion treats `fiware-service` / `fiware-servicepath` (orion-api.md, "Multi
//! tenancy" and "Entity service paths"):
//! * either header given twice → 400;
//! * service: lowercased; at most 50 characters, ASCII alphanumerics and `_`; empty/missing
//!   is the default tenant (`""`). NGSI-LD requests read `ngsild-tenant` (same rules);
//!   if both it and `fiware-service` are sent they must agree.
//! * service path (Orion's `servicePathSplit`/`servicePathCheck` in `rest.cpp`): a
//!   comma-separated list, spaces around items trimmed and trailing slashes removed (as
//!   Orion does: `/Madrid/` is `/Madrid`), each absolute, at most 10 levels of 1 to 50
//!   alphanumerics/`_`; an empty item (`/a,`) is refused;
//!   `/#` (a subtree) only as the last level and only where the scope allows it:
//!   - [`TenantScope::Read`]: up to 10 paths (Orion's limit; repeats, after canonical form,
//!     are dropped), `/#` allowed; missing → `/#` (whole tree);
//!   - [`TenantScope::Write`]: exactly one path, no `/#`; missing → `/`;
//!   - [`TenantScope::Subscribe`]: exactly one path, `/#` allowed; missing → `/#` (the
//!     conservative choice: the rule must then cover the whole tree).

use crate::access::Tenant;
use crate::decision::DenyReason;
use percent_encoding::percent_decode_str;

use super::{bad, dedup_names, MAX_LIST_ITEMS};

const MAX_SERVICE_LEN: usize = 50;
const MAX_PATH_LEVELS: usize = 10;
const MAX_LEVEL_LEN: usize = 50;
const MAX_SERVICE_PATHS: usize = 10;

/// A path split into decoded segments, with its decoded query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalPath {
    pub segments: Vec<String>,
    pub query: Query,
}

impl CanonicalPath {
    /// The segments joined back (decoded), for logs and operation names.
    pub fn display(&self) -> String {
        format!("/{}", self.segments.join("/"))
    }

    /// The segments as `&str`s, for matching.
    pub fn parts(&self) -> Vec<&str> {
        self.segments.iter().map(String::as_str).collect()
    }
}

/// Decoded query parameters in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// Names and values decoded as the brokers decode them (see the module docs).
    pub pairs: Vec<(String, String)>,
}

impl Query {
    /// The value of a parameter the model relies on; given twice → 400, given empty → 400.
    pub fn get(&self, name: &str) -> Result<Option<&str>, DenyReason> {
        let mut found = None;
        for (k, v) in &self.pairs {
            if k == name {
                if found.is_some() {
                    return Err(bad(format!(
                        "query parameter {name:?} given more than once"
                    )));
                }
                found = Some(v.as_str());
            }
        }
        if found == Some("") {
            return Err(bad(format!("query parameter {name:?} is empty")));
        }
        Ok(found)
    }

    /// A comma-separated list parameter, repeated items dropped (first kept); an empty item
    /// or more than [`MAX_LIST_ITEMS`] items → 400 (counted before anything is copied).
    pub fn list(&self, name: &str) -> Result<Option<Vec<String>>, DenyReason> {
        let Some(v) = self.get(name)? else {
            return Ok(None);
        };
        let count = v.split(',').count();
        if count > MAX_LIST_ITEMS {
            return Err(bad(format!(
                "query parameter {name:?} has {count} items, more than the {MAX_LIST_ITEMS} \
                 allowed"
            )));
        }
        let items: Vec<String> = v.split(',').map(str::to_string).collect();
        if items.iter().any(String::is_empty) {
            return Err(bad(format!("query parameter {name:?} has an empty item")));
        }
        Ok(Some(dedup_names(items)))
    }

    /// True if the comma-separated `options` parameter contains `opt`.
    pub fn has_option(&self, opt: &str) -> Result<bool, DenyReason> {
        Ok(self
            .list("options")?
            .is_some_and(|o| o.iter().any(|x| x == opt)))
    }
}

fn check_escapes(s: &str) -> Result<(), DenyReason> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let ok = b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit);
            if !ok {
                return Err(bad("malformed percent-encoding in the request path"));
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    Ok(())
}

fn decode_once(s: &str) -> Result<String, DenyReason> {
    check_escapes(s)?;
    percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| bad("percent-encoded request path is not UTF-8"))
}

/// A query name or value as the brokers decode it: raw `+` is a space, then percent-decoded
/// once (so `%2B` is a plus).
pub(crate) fn decode_form_field(raw: &str) -> Result<String, DenyReason> {
    decode_once(&raw.replace('+', "%20"))
}

/// Canonicalise `:path` (with query) or refuse it (400).
pub fn canonical_path(raw: &str) -> Result<CanonicalPath, DenyReason> {
    if raw.contains('#') {
        return Err(bad("request path must not contain a fragment"));
    }
    let (path, query) = match raw.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (raw, None),
    };
    let Some(rest) = path.strip_prefix('/') else {
        return Err(bad("request path must be absolute"));
    };
    if path.contains('\\') {
        return Err(bad("request path must not contain a backslash"));
    }
    let mut raw_segments: Vec<&str> = rest.split('/').collect();
    // One trailing slash is dropped; `/` alone stays an empty list.
    if raw_segments.last() == Some(&"") {
        raw_segments.pop();
    }
    let mut segments = Vec::with_capacity(raw_segments.len());
    for seg in raw_segments {
        if seg.is_empty() {
            return Err(bad("request path must not contain empty segments (//)"));
        }
        let d = decode_once(seg)?;
        if d == "." || d == ".." {
            return Err(bad("request path must not contain dot segments"));
        }
        if d.contains('/') || d.contains('\\') {
            return Err(bad(
                "request path must not contain encoded separators (%2F, %5C)",
            ));
        }
        if d.chars().any(super::is_refused_char) {
            return Err(bad("request path must not contain control characters"));
        }
        segments.push(d);
    }
    let mut pairs = Vec::new();
    for part in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        let (k, v) = (decode_form_field(k)?, decode_form_field(v)?);
        if k.chars().chain(v.chars()).any(super::is_refused_char) {
            return Err(bad("query parameters must not contain control characters"));
        }
        pairs.push((k, v));
    }
    Ok(CanonicalPath {
        segments,
        query: Query { pairs },
    })
}

/// How the service-path header is read for a request (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TenantScope {
    Read,
    Write,
    Subscribe,
}

fn single_header<'h>(
    headers: &'h [(String, String)],
    name: &str,
) -> Result<Option<&'h str>, DenyReason> {
    let mut found = None;
    for (k, v) in headers {
        if k.eq_ignore_ascii_case(name) {
            if found.is_some() {
                return Err(bad(format!("header {name} given more than once")));
            }
            found = Some(v.as_str());
        }
    }
    Ok(found.map(str::trim))
}

fn canonical_service(raw: &str, header: &str) -> Result<String, DenyReason> {
    if raw.len() > MAX_SERVICE_LEN {
        return Err(bad(format!(
            "{header} longer than {MAX_SERVICE_LEN} characters"
        )));
    }
    if !raw.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(bad(format!(
            "{header} may contain only alphanumerics and underscores"
        )));
    }
    Ok(raw.to_ascii_lowercase())
}

fn canonical_service_path(item: &str, scope: TenantScope) -> Result<String, DenyReason> {
    // Orion strips trailing slashes (all of them, keeping the root `/`).
    let trimmed = item.trim_end_matches('/');
    let item = if trimmed.is_empty() && !item.is_empty() {
        "/"
    } else {
        trimmed
    };
    if item == "/" {
        return Ok("/".into());
    }
    let Some(rest) = item.strip_prefix('/') else {
        return Err(bad(format!("fiware-servicepath {item:?} must be absolute")));
    };
    let levels: Vec<&str> = rest.split('/').collect();
    let (levels, subtree) = match levels.split_last() {
        Some((&"#", init)) => (init, true),
        _ => (levels.as_slice(), false),
    };
    if subtree && scope == TenantScope::Write {
        return Err(bad(
            "fiware-servicepath /# is only allowed on reads and subscriptions",
        ));
    }
    if levels.len() > MAX_PATH_LEVELS {
        return Err(bad(format!(
            "fiware-servicepath {item:?} has more than {MAX_PATH_LEVELS} levels"
        )));
    }
    for l in levels {
        if l.is_empty() || l.len() > MAX_LEVEL_LEN {
            return Err(bad(format!(
                "fiware-servicepath {item:?} has an empty or too long level"
            )));
        }
        if !l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(bad(format!(
                "fiware-servicepath {item:?} may contain only alphanumerics and underscores"
            )));
        }
    }
    Ok(item.to_string())
}

/// The canonical tenant of a request (see the module docs for the rules).
pub fn tenant(
    headers: &[(String, String)],
    scope: TenantScope,
    ngsi_ld: bool,
) -> Result<Tenant, DenyReason> {
    let fiware = single_header(headers, "fiware-service")?
        .map(|s| canonical_service(s, "fiware-service"))
        .transpose()?;
    let service = if ngsi_ld {
        // Orion lowercases fiware-service; NGSI-LD brokers do not all do the same with tenant
        // names. Lowercasing here could let a rule for "city" grant a broker's distinct "City"
        // tenant, so an NGSI-LD tenant with upper-case letters is refused.
        let has_upper = |name: &str| {
            single_header(headers, name)
                .ok()
                .flatten()
                .is_some_and(|v| v.bytes().any(|b| b.is_ascii_uppercase()))
        };
        if has_upper("ngsild-tenant") || has_upper("fiware-service") {
            return Err(bad(
                "NGSI-LD tenant names must be lower case (brokers differ on their case)",
            ));
        }
        let ld = single_header(headers, "ngsild-tenant")?
            .map(|s| canonical_service(s, "NGSILD-Tenant"))
            .transpose()?;
        match (ld, fiware) {
            (Some(a), Some(b)) if a != b => {
                return Err(bad("NGSILD-Tenant and fiware-service disagree"));
            }
            (Some(a), _) => a,
            (None, b) => b.unwrap_or_default(),
        }
    } else {
        fiware.unwrap_or_default()
    };
    let raw_paths = single_header(headers, "fiware-servicepath")?.filter(|s| !s.is_empty());
    let service_paths = match raw_paths {
        None => vec![if scope == TenantScope::Write {
            "/"
        } else {
            "/#"
        }
        .to_string()],
        Some(raw) => {
            let items: Vec<&str> = raw.split(',').map(str::trim).collect();
            if scope != TenantScope::Read && items.len() > 1 {
                return Err(bad(
                    "only one fiware-servicepath is allowed on this request",
                ));
            }
            if items.len() > MAX_SERVICE_PATHS {
                return Err(bad(format!(
                    "more than {MAX_SERVICE_PATHS} fiware-servicepath entries"
                )));
            }
            let paths = items
                .into_iter()
                .map(|i| canonical_service_path(i, scope))
                .collect::<Result<Vec<_>, _>>()?;
            // `/a,/a/` is one path: a repeat adds nothing to check.
            dedup_names(paths)
        }
    };
    Ok(Tenant {
        service,
        service_paths,
    })
}
