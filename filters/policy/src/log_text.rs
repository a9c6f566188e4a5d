//! Bounding what a client controls before it reaches a log line. A hostile request can name a
//! 60 KB topic or path; logging it whole per denial turns every cheap request into a large
//! write. Every value a filter logs goes through [`bounded`] (or [`bounded_debug`] for a quoted
//! form), which keeps at most [`MAX_LOGGED_VALUE`] bytes and says how much was left out.

use std::borrow::Cow;

/// The most bytes of one client-controlled value a log line carries.
pub const MAX_LOGGED_VALUE: usize = 256;

/// `value`, cut at a character boundary to at most `max` bytes, followed by `…(+N bytes)` when
/// anything was cut.
pub fn bounded_to(value: &str, max: usize) -> Cow<'_, str> {
    if value.len() <= max {
        return Cow::Borrowed(value);
    }
    let mut end = max;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}…(+{} bytes)", &value[..end], value.len() - end))
}

/// [`bounded_to`] with [`MAX_LOGGED_VALUE`].
pub fn bounded(value: &str) -> Cow<'_, str> {
    bounded_to(value, MAX_LOGGED_VALUE)
}

/// The Debug-quoted form of [`bounded`] (`"a\"b"`): quotes and control characters escaped, so a
/// crafted value can't forge log fields.
pub fn bounded_debug(value: &str) -> String {
    format!("{:?}", bounded(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_values_are_kept_whole() {
        assert_eq!(bounded("devices/lamp-01/state"), "devices/lamp-01/state");
        assert!(matches!(bounded("x"), Cow::Borrowed(_)));
    }

    #[test]
    fn long_values_are_cut_and_say_how_much() {
        let topic = "a".repeat(60_000);
        let logged = bounded(&topic);
        assert!(logged.len() < MAX_LOGGED_VALUE + 32, "{}", logged.len());
        assert!(logged.ends_with("…(+59744 bytes)"), "{logged}");
    }

    #[test]
    fn cuts_never_split_a_character() {
        let value = "é".repeat(200); // 400 bytes, 2 per character
        let logged = bounded_to(&value, 5);
        assert_eq!(logged, "éé…(+396 bytes)");
    }

    #[test]
    fn quoted_form_escapes_field_forgery() {
        assert_eq!(
            bounded_debug("a\" decision=allow"),
            "\"a\\\" decision=allow\""
        );
    }
}
