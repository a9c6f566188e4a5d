//! MQTT topic filters with Mosquitto's semantics.
//!
//! * `+` matches exactly one level (possibly empty); `#` matches the rest, including nothing
//!   (`a/#` matches `a`); both must fill a whole level, `#` only last.
//! * Topics whose first level starts with `$` (`$SYS/...`) are not matched by a filter whose
//!   first level is `+` or `#`.
//! * Levels are compared exactly (case-sensitive, empty levels allowed: `/a` is `""`, `"a"`).

/// One level of a filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Level {
    Lit(String),
    Plus,
    Hash,
}

/// A parsed topic or topic filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFilter(pub Vec<Level>);

/// MQTT's limit on a topic's length (a two-byte length prefix).
const MAX_TOPIC_BYTES: usize = 65_535;

/// Checks wildcard placement in filter text (placeholders are left alone).
pub(crate) fn validate_filter_text(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("a topic must not be empty".into());
    }
    if s.len() > MAX_TOPIC_BYTES {
        return Err("a topic must be at most 65535 bytes".into());
    }
    if s.contains('\0') {
        return Err("a topic must not contain NUL".into());
    }
    let levels: Vec<&str> = s.split('/').collect();
    let last = levels.len() - 1;
    for (i, l) in levels.iter().enumerate() {
        if l.contains('#') && (*l != "#" || i != last) {
            return Err(format!(
                "topic {s:?}: '#' must be a whole level and the last one"
            ));
        }
        if l.contains('+') && *l != "+" {
            return Err(format!("topic {s:?}: '+' must be a whole level"));
        }
    }
    Ok(())
}

/// Whether a substituted placeholder value may stand in a topic level: it must not be empty,
/// act as a wildcard or separator, or turn the level into a `$` topic.
pub(crate) fn value_ok(v: &str) -> bool {
    !v.is_empty() && !v.contains(['/', '+', '#', '\0']) && !v.starts_with('$')
}

fn is_dollar(l: Option<&Level>) -> bool {
    matches!(l, Some(Level::Lit(s)) if s.starts_with('$'))
}

impl TopicFilter {
    /// Parses a topic (`allow_wildcards == false`, as for publishing) or a filter.
    pub fn parse(s: &str, allow_wildcards: bool) -> Result<TopicFilter, String> {
        validate_filter_text(s)?;
        if !allow_wildcards && s.contains(['+', '#']) {
            return Err(format!(
                "topic {s:?}: wildcards are not allowed when publishing"
            ));
        }
        Ok(TopicFilter(
            s.split('/')
                .map(|l| match l {
                    "+" => Level::Plus,
                    "#" => Level::Hash,
                    l => Level::Lit(l.to_string()),
                })
                .collect(),
        ))
    }

    pub fn has_wildcards(&self) -> bool {
        self.0.iter().any(|l| !matches!(l, Level::Lit(_)))
    }

    /// Every topic `other` matches, `self` matches too (for a plain topic: `self` matches it).
    pub fn covers(&self, other: &TopicFilter) -> bool {
        covers(&self.0, &other.0)
    }

    /// Some topic matches both.
    pub fn intersects(&self, other: &TopicFilter) -> bool {
        intersects(&self.0, &other.0)
    }

    /// Mosquitto's `topic_matches_sub`: does this filter match the plain topic?
    pub fn matches_topic(&self, topic: &str) -> bool {
        TopicFilter::parse(topic, false).is_ok_and(|t| self.covers(&t))
    }
}

// Both walks are loops, not recursion: a topic may have tens of thousands of levels and the
// filter runs on a small wasm stack.

fn covers(mut r: &[Level], mut f: &[Level]) -> bool {
    let mut first = true;
    loop {
        match (r.first(), f.first()) {
            (Some(Level::Hash), fl) => return !(first && is_dollar(fl)),
            (None, None) => return true,
            (None, Some(_)) | (Some(_), None) => return false,
            (Some(_), Some(Level::Hash)) => return false,
            (Some(Level::Plus), fl) => {
                if first && is_dollar(fl) {
                    return false;
                }
            }
            (Some(Level::Lit(a)), Some(Level::Lit(b))) => {
                if a != b {
                    return false;
                }
            }
            (Some(Level::Lit(_)), Some(Level::Plus)) => return false,
        }
        r = &r[1..];
        f = &f[1..];
        first = false;
    }
}

fn intersects(mut a: &[Level], mut b: &[Level]) -> bool {
    let mut first = true;
    loop {
        match (a.first(), b.first()) {
            (None, None) => return true,
            // `x/#` also matches `x`.
            (Some(Level::Hash), None) | (None, Some(Level::Hash)) => return true,
            (None, Some(_)) | (Some(_), None) => return false,
            (Some(Level::Hash), other) | (other, Some(Level::Hash)) => {
                return !(first && is_dollar(other))
            }
            (Some(Level::Plus), other) | (other, Some(Level::Plus)) => {
                if first && is_dollar(other) {
                    return false;
                }
            }
            (Some(Level::Lit(x)), Some(Level::Lit(y))) => {
                if x != y {
                    return false;
                }
            }
        }
        a = &a[1..];
        b = &b[1..];
        first = false;
    }
}
