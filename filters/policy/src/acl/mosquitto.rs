//! Importer for a Mosquitto `acl_file` into the same rules as the JSON configuration.
//!
//! * `#` as the first non-blank character: a comment; blank lines are skipped.
//! * `topic [read|write|readwrite|deny] <topic>` before any `user` line: for anonymous clients
//!   (subject `anonymous`); after `user <name>`: for that user (subject `user:<name>`, i.e. an
//!   identity whose subject is `<name>`). Topics are literal: `%` is not a placeholder here.
//! * `pattern [read|write|readwrite|deny] <topic>`: for every client (subject `anyone`), even
//!   after a `user` line; `%u` (username = identity subject) and `%c` (client id) must each be
//!   the whole level, as Mosquitto requires.
//! * The access is optional (default `readwrite`) unless the topic contains a space.
//!   `read` → actions `[read]`, `write` → `[write]`, `readwrite` → `[read, write]`,
//!   `deny` → a deny rule for `*` (read and write). Deny wins, as in Mosquitto.
//!
//! Each rule is named `acl_file:<line>`; errors carry the 1-based line number.

use super::{AclConfig, Effect, MqttResource, Rule, RuleConfig};

/// A line of the file that does not import.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("acl_file line {line}: {message}")]
pub struct ImportError {
    pub line: usize,
    pub message: String,
}

fn access_words(word: &str) -> Option<(Effect, Vec<String>)> {
    let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    match word {
        "read" => Some((Effect::Allow, v(&["read"]))),
        "write" => Some((Effect::Allow, v(&["write"]))),
        "readwrite" => Some((Effect::Allow, v(&["read", "write"]))),
        "deny" => Some((Effect::Deny, v(&["*"]))),
        _ => None,
    }
}

/// Splits `[access] <topic>`.
fn access_and_topic(rest: &str) -> Result<(Effect, Vec<String>, &str), String> {
    let rest = rest.trim();
    if rest.is_empty() {
        return Err("missing topic".into());
    }
    if let Some((first, topic)) = rest.split_once(char::is_whitespace) {
        if let Some((effect, actions)) = access_words(first) {
            let topic = topic.trim();
            if topic.is_empty() {
                return Err("missing topic".into());
            }
            return Ok((effect, actions, topic));
        }
        return Err(format!(
            "{first:?} is not an access (read, write, readwrite, deny); a topic containing a \
             space needs an explicit access"
        ));
    }
    Ok((Effect::Allow, vec!["read".into(), "write".into()], rest))
}

/// Imports the text of an `acl_file`; every rule is validated as the JSON rules are.
pub fn import_acl_file(text: &str) -> Result<AclConfig, ImportError> {
    let mut rules = Vec::new();
    let mut user: Option<String> = None;
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let err = |message: String| ImportError {
            line: line_no,
            message,
        };
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (keyword, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let (subjects, topic_text, effect, actions) = match keyword {
            "user" => {
                let name = rest.trim();
                if name.is_empty() {
                    return Err(err("user needs a username".into()));
                }
                user = Some(name.to_string());
                continue;
            }
            "topic" => {
                let (effect, actions, topic) = access_and_topic(rest).map_err(err)?;
                let subject = match &user {
                    Some(u) => format!("user:{u}"),
                    None => "anonymous".to_string(),
                };
                (vec![subject], topic.replace('%', "%%"), effect, actions)
            }
            "pattern" => {
                let (effect, actions, topic) = access_and_topic(rest).map_err(err)?;
                for level in topic.split('/') {
                    if (level.contains("%u") || level.contains("%c")) && level.len() != 2 {
                        return Err(err(format!(
                            "pattern {topic:?}: %u and %c must be the only text of their level"
                        )));
                    }
                }
                (
                    vec!["anyone".to_string()],
                    topic.to_string(),
                    effect,
                    actions,
                )
            }
            other => {
                return Err(err(format!(
                    "unknown keyword {other:?} (expected topic, pattern or user)"
                )))
            }
        };
        let rule = RuleConfig {
            name: format!("acl_file:{line_no}"),
            effect,
            subjects,
            actions,
            ngsi: None,
            mqtt: Some(MqttResource { topic: topic_text }),
        };
        Rule::compile(&rule).map_err(err)?;
        rules.push(rule);
    }
    Ok(AclConfig { rules })
}
