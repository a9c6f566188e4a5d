//! Mapping verified claims onto an [`Identity`]: claim paths and the rules for each field.

use serde_json::{Map, Value};

use super::config::ClaimMappingConfig;
use super::error::{ConfigError, TokenError};
use crate::identity::{Identity, IdentityKind};

/// Deepest claim path accepted.
const MAX_PATH_SEGMENTS: usize = 16;

/// A path of object keys into the claims: `realm_access.roles`,
/// `resource_access."my.client".roles` (a segment in double quotes may contain dots).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimPath(Vec<String>);

impl ClaimPath {
    /// Parses a dot-separated path. Segments must be non-empty; a segment may be written in
    /// double quotes to contain dots (no escapes inside).
    pub fn parse(text: &str) -> Result<ClaimPath, String> {
        if text.is_empty() {
            return Err("empty claim path".into());
        }
        let mut segments = Vec::new();
        let mut rest = text;
        loop {
            let (segment, after) = if let Some(quoted) = rest.strip_prefix('"') {
                let close = quoted
                    .find('"')
                    .ok_or_else(|| format!("unterminated quote in claim path {text:?}"))?;
                (&quoted[..close], &quoted[close + 1..])
            } else {
                let end = rest.find('.').unwrap_or(rest.len());
                (&rest[..end], &rest[end..])
            };
            if segment.is_empty() {
                return Err(format!("empty segment in claim path {text:?}"));
            }
            segments.push(segment.to_string());
            if segments.len() > MAX_PATH_SEGMENTS {
                return Err(format!(
                    "claim path {text:?} has more than {MAX_PATH_SEGMENTS} segments"
                ));
            }
            if after.is_empty() {
                break;
            }
            rest = after
                .strip_prefix('.')
                .ok_or_else(|| format!("expected '.' after a quoted segment in {text:?}"))?;
            if rest.is_empty() {
                return Err(format!("claim path {text:?} ends with '.'"));
            }
        }
        Ok(ClaimPath(segments))
    }

    /// The object keys, outermost first.
    pub fn segments(&self) -> &[String] {
        &self.0
    }

    /// The value at this path, if every step is an object holding the next key.
    pub fn lookup<'a>(&self, claims: &'a Map<String, Value>) -> Option<&'a Value> {
        let (first, rest) = self.0.split_first()?;
        let mut value = claims.get(first)?;
        for segment in rest {
            value = value.as_object()?.get(segment)?;
        }
        Some(value)
    }
}

/// A claim value fit for an identity field (and so for a header): non-empty, no control
/// characters.
fn usable(text: &str) -> bool {
    !text.is_empty() && !text.chars().any(char::is_control)
}

/// The compiled claim mapping of one provider.
#[derive(Debug, Clone)]
pub(crate) struct ClaimMapping {
    subject: ClaimPath,
    display_name: Vec<ClaimPath>,
    roles: Vec<ClaimPath>,
    groups: Vec<ClaimPath>,
    tenant: Option<ClaimPath>,
}

fn compile(field: &str, text: &str) -> Result<ClaimPath, ConfigError> {
    ClaimPath::parse(text).map_err(|message| ConfigError::new(field, message))
}

fn compile_all(field: &str, texts: &[String]) -> Result<Vec<ClaimPath>, ConfigError> {
    texts
        .iter()
        .enumerate()
        .map(|(i, text)| compile(&format!("{field}[{i}]"), text))
        .collect()
}

impl ClaimMapping {
    pub(crate) fn from_config(config: &ClaimMappingConfig) -> Result<ClaimMapping, ConfigError> {
        Ok(ClaimMapping {
            subject: compile("claims.subject", &config.subject)?,
            display_name: compile_all("claims.display_name", &config.display_name)?,
            roles: compile_all("claims.roles", &config.roles)?,
            groups: compile_all("claims.groups", &config.groups)?,
            tenant: config
                .tenant
                .as_deref()
                .map(|t| compile("claims.tenant", t))
                .transpose()?,
        })
    }

    /// Builds the identity. Only the subject is required; any other claim that is missing or
    /// of the wrong type contributes nothing.
    pub(crate) fn identity(
        &self,
        claims: &Map<String, Value>,
        expires_at: Option<u64>,
    ) -> Result<Identity, TokenError> {
        let subject = match self.subject.lookup(claims) {
            Some(Value::String(s)) if usable(s) => s.clone(),
            _ => return Err(TokenError::MissingSubject),
        };
        let mut identity = Identity::new(IdentityKind::Jwt, subject);
        identity.display_name =
            self.display_name
                .iter()
                .find_map(|path| match path.lookup(claims) {
                    Some(Value::String(s)) if usable(s) => Some(s.clone()),
                    _ => None,
                });
        // Roles: an array of strings, or a space-separated string (`scope`).
        identity.roles = collect(&self.roles, claims, true);
        // Groups: an array of strings, or one string (group names may contain spaces).
        identity.groups = collect(&self.groups, claims, false);
        identity.tenant = self
            .tenant
            .as_ref()
            .and_then(|path| match path.lookup(claims) {
                Some(Value::String(s)) if usable(s) => Some(s.clone()),
                _ => None,
            });
        // The authorised party (OIDC Core §2), else RFC 9068's `client_id`.
        identity.app_id = ["azp", "client_id"]
            .iter()
            .find_map(|claim| match claims.get(*claim) {
                Some(Value::String(s)) if usable(s) => Some(s.clone()),
                _ => None,
            });
        identity.expires_at = expires_at;
        Ok(identity)
    }
}

/// Strings found at `paths`, in order, without duplicates. Non-string array elements and
/// unusable strings are skipped.
fn collect(paths: &[ClaimPath], claims: &Map<String, Value>, split: bool) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut push = |s: &str| {
        if usable(s) && !out.iter().any(|o| o == s) {
            out.push(s.to_string());
        }
    };
    for path in paths {
        match path.lookup(claims) {
            Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).for_each(&mut push),
            Some(Value::String(s)) if split => s.split_ascii_whitespace().for_each(&mut push),
            Some(Value::String(s)) => push(s),
            _ => {}
        }
    }
    out
}
