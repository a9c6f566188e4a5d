//! Header maps as bytes, the way the host hands them over.
//!
//! Envoy gives a filter every header map (request, response, trailers, a callout's answer) in
//! the Proxy-Wasm pair format: a little-endian u32 count, then a (name length, value length)
//! u32 pair per header, then each name and each value followed by a NUL. Header values are
//! bytes: HTTP/1.1 allows obs-text (`caf\xE9`), and an IdP may answer with Latin-1. The SDK's
//! reader turns them into `String` with `unwrap`, which traps the VM on the first such byte;
//! [`decode`] never panics, checks every length against the input and keeps the bytes.
//!
//! A filter then asks for text only where it needs text: [`HeaderPairs::text_view`] gives the
//! headers an engine reads (its `reads_header` predicate) as `(String, String)` pairs and fails
//! with [`NotText`] if one of them is not UTF-8; headers the engine does not read are left out
//! of the view and passed along untouched. [`HeaderPairs::text_pairs`] makes the same check
//! and lends every text pair without a copy (the map keeps them as text).

use crate::DenyReason;

/// Why a pair map could not be decoded (a host bug or a corrupted buffer: never client input).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed header-pair map: {0}")]
pub struct PairsError(&'static str);

/// One header as bytes: (name, value).
pub type RawPair = (Vec<u8>, Vec<u8>);

/// Decodes the ABI's pair format. Names are kept as sent (the host lowercases them).
pub fn decode(bytes: &[u8]) -> Result<Vec<RawPair>, PairsError> {
    let count = read_u32(bytes, 0)?;
    // A count whose sizes the input can't hold is refused before anything is allocated.
    let sizes_end = count
        .checked_mul(8)
        .and_then(|n| n.checked_add(4))
        .filter(|&end| end <= bytes.len())
        .ok_or(PairsError("count larger than the data"))?;
    let mut pairs = Vec::with_capacity(count);
    let mut data_at = sizes_end;
    for i in 0..count {
        let name_len = read_u32(bytes, 4 + i * 8)?;
        let value_len = read_u32(bytes, 8 + i * 8)?;
        let name = take_terminated(bytes, &mut data_at, name_len)?;
        let value = take_terminated(bytes, &mut data_at, value_len)?;
        pairs.push((name.to_vec(), value.to_vec()));
    }
    if data_at != bytes.len() {
        return Err(PairsError("trailing bytes"));
    }
    Ok(pairs)
}

/// Encodes pairs in the ABI's format (for local replies and callouts, and the tests' golden
/// bytes). Lengths beyond u32 can't come from a filter; they are clamped, never wrapped.
pub fn encode<N: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(N, V)]) -> Vec<u8> {
    let len32 = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
    let data: usize = pairs
        .iter()
        .map(|(n, v)| n.as_ref().len() + v.as_ref().len() + 2)
        .sum();
    let mut out = Vec::with_capacity(4 + pairs.len() * 8 + data);
    out.extend_from_slice(&len32(pairs.len()));
    for (n, v) in pairs {
        out.extend_from_slice(&len32(n.as_ref().len()));
        out.extend_from_slice(&len32(v.as_ref().len()));
    }
    for (n, v) in pairs {
        out.extend_from_slice(n.as_ref());
        out.push(0);
        out.extend_from_slice(v.as_ref());
        out.push(0);
    }
    out
}

fn read_u32(bytes: &[u8], at: usize) -> Result<usize, PairsError> {
    let word = at
        .checked_add(4)
        .and_then(|end| bytes.get(at..end))
        .ok_or(PairsError("truncated sizes"))?;
    let word: [u8; 4] = word.try_into().map_err(|_| PairsError("truncated sizes"))?;
    usize::try_from(u32::from_le_bytes(word)).map_err(|_| PairsError("size overflows"))
}

/// Takes `len` bytes at `at` and the NUL that must follow them.
fn take_terminated<'a>(
    bytes: &'a [u8],
    at: &mut usize,
    len: usize,
) -> Result<&'a [u8], PairsError> {
    let end = at.checked_add(len).ok_or(PairsError("length overflows"))?;
    let field = bytes.get(*at..end).ok_or(PairsError("truncated data"))?;
    if bytes.get(end) != Some(&0) {
        return Err(PairsError("missing NUL after a name or value"));
    }
    *at = end + 1;
    Ok(field)
}

/// A header the filter needs as text is not valid UTF-8: the request is refused with 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("header {name} is not valid UTF-8 text")]
pub struct NotText {
    /// The header's (lowercase) name.
    pub name: String,
}

impl NotText {
    pub fn deny_reason(&self) -> DenyReason {
        DenyReason::BadRequest(self.to_string())
    }
}

/// One header map as the host gave it: names lowercased (HTTP names are case-insensitive;
/// Envoy already sends them lowercase), values as bytes, order and repeats kept.
///
/// The pairs that are text (nearly all) are kept as `String`s, converted in place when the map
/// is decoded, so [`HeaderPairs::text_pairs`] lends them to every engine of a request without
/// a copy; the others keep their bytes and their place in the map's order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderPairs {
    /// The pairs whose name and value are UTF-8, in order.
    text: Vec<(String, String)>,
    /// The other pairs, in order, each with the number of text pairs before it in the map.
    other: Vec<(usize, RawPair)>,
}

impl HeaderPairs {
    /// Decodes the host's pair bytes (see [`decode`]). An empty input is an empty map (the
    /// host may answer "no headers" with no data at all).
    pub fn decode(bytes: &[u8]) -> Result<Self, PairsError> {
        if bytes.is_empty() {
            return Ok(HeaderPairs::default());
        }
        Ok(Self::from_pairs(decode(bytes)?))
    }

    pub fn from_pairs(pairs: Vec<RawPair>) -> Self {
        Self::from_lowercase(pairs.into_iter().map(|(mut n, v)| {
            n.make_ascii_lowercase();
            (n, v)
        }))
    }

    /// The map of `pairs`, names as given.
    fn from_lowercase(pairs: impl IntoIterator<Item = RawPair>) -> Self {
        let mut map = HeaderPairs::default();
        for (name, value) in pairs {
            map.push(name, value);
        }
        map
    }

    /// Appends a pair, as text when it is.
    fn push(&mut self, name: Vec<u8>, value: Vec<u8>) {
        let raw = match (String::from_utf8(name), value) {
            (Ok(name), value) => match String::from_utf8(value) {
                Ok(value) => return self.text.push((name, value)),
                Err(value) => (name.into_bytes(), value.into_bytes()),
            },
            (Err(name), value) => (name.into_bytes(), value),
        };
        self.other.push((self.text.len(), raw));
    }

    pub fn is_empty(&self) -> bool {
        self.text.is_empty() && self.other.is_empty()
    }

    /// Every pair, as bytes, in the map's order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let mut other = self.other.iter().peekable();
        let mut next_text = 0;
        std::iter::from_fn(move || {
            if let Some((_, (n, v))) = other.next_if(|(at, _)| *at <= next_text) {
                return Some((n.as_slice(), v.as_slice()));
            }
            let (n, v) = self.text.get(next_text)?;
            next_text += 1;
            Some((n.as_bytes(), v.as_bytes()))
        })
    }

    /// The first value of `name` (lowercase), as bytes.
    pub fn first(&self, name: &str) -> Option<&[u8]> {
        let text = self.text.iter().position(|(n, _)| n == name);
        let other = self.other.iter().find(|(_, (n, _))| n == name.as_bytes());
        match (text, other) {
            (Some(i), Some((at, (_, v)))) if *at <= i => Some(v),
            (Some(i), _) => self.text.get(i).map(|(_, v)| v.as_bytes()),
            (None, Some((_, (_, v)))) => Some(v),
            (None, None) => None,
        }
    }

    /// The first value of `name` as text: `Ok(None)` when absent, [`NotText`] when present but
    /// not UTF-8 (a caller that needs it must not guess).
    pub fn first_text(&self, name: &str) -> Result<Option<&str>, NotText> {
        match self.first(name) {
            None => Ok(None),
            Some(v) => std::str::from_utf8(v).map(Some).map_err(|_| NotText {
                name: name.to_string(),
            }),
        }
    }

    /// Removes every value of `name` (lowercase), as the host does for a removed header.
    pub fn remove(&mut self, name: &str) {
        if self.other.is_empty() {
            self.text.retain(|(n, _)| n != name);
            return;
        }
        let pairs = self.raw_pairs();
        *self = Self::from_lowercase(pairs.into_iter().filter(|(n, _)| n != name.as_bytes()));
    }

    /// Sets `name` (lowercase) to `value`, replacing every value, as the host's replace does
    /// (the first copy keeps its place; a new header goes last).
    pub fn set(&mut self, name: &str, value: &[u8]) {
        match std::str::from_utf8(value) {
            Ok(value) if self.other.is_empty() => {
                set_first(&mut self.text, name.to_string(), value.to_string())
            }
            // Rare: a header that is not text, before or after.
            _ => {
                let mut pairs = self.raw_pairs();
                set_first(&mut pairs, name.as_bytes().to_vec(), value.to_vec());
                *self = Self::from_lowercase(pairs);
            }
        }
    }

    /// [`HeaderPairs::set`] of a text value, keeping `name` and `value` themselves (no copy).
    pub fn set_text(&mut self, name: String, value: String) {
        if self.other.is_empty() {
            set_first(&mut self.text, name, value);
        } else {
            self.set(&name, value.as_bytes());
        }
    }

    /// Every pair, as owned bytes, in the map's order.
    fn raw_pairs(&self) -> Vec<RawPair> {
        self.iter().map(|(n, v)| (n.to_vec(), v.to_vec())).collect()
    }

    /// The headers `reads` names, as text pairs (lowercase names, repeats kept, in order). A
    /// header `reads` names whose value is not UTF-8 fails the whole view: the engine would
    /// otherwise decide on a header it could not read. Headers it does not read are left out
    /// (they go upstream untouched). A name that is not UTF-8 is never one an engine reads.
    pub fn text_view(
        &self,
        reads: impl Fn(&str) -> bool,
    ) -> Result<Vec<(String, String)>, NotText> {
        let all = self.text_pairs(&reads)?;
        Ok(all.iter().filter(|(n, _)| reads(n)).cloned().collect())
    }

    /// Every header whose name and value are text (lowercase names, repeats kept, in order),
    /// borrowed, once every header `reads` names is text: else [`NotText`] for the first that
    /// is not, as [`HeaderPairs::text_view`] answers.
    ///
    /// Unlike `text_view`, the pairs include text headers `reads` does not name, and nothing
    /// is copied: a caller gives them to an engine that looks up only the names its
    /// `reads_header` names, and several engines of one request share them.
    pub fn text_pairs(&self, reads: impl Fn(&str) -> bool) -> Result<&[(String, String)], NotText> {
        let not_text = self
            .other
            .iter()
            .find_map(|(_, (name, _))| std::str::from_utf8(name).ok().filter(|name| reads(name)));
        match not_text {
            Some(name) => Err(NotText {
                name: name.to_string(),
            }),
            None => Ok(&self.text),
        }
    }
}

/// Sets the first pair named `name` to `value` and drops the other copies, or appends the
/// pair: the host's replace.
fn set_first<N: PartialEq, V>(pairs: &mut Vec<(N, V)>, name: N, value: V) {
    let mut value = Some(value);
    pairs.retain_mut(|(n, v)| {
        if *n != name {
            return true;
        }
        match value.take() {
            Some(first) => {
                *v = first;
                true
            }
            None => false,
        }
    });
    if let Some(value) = value {
        pairs.push((name, value));
    }
}

/// The status of an HTTP answer (a callout's or the upstream's) from its `:status` bytes;
/// None when absent or not a three-digit number (the caller treats it as a failed call).
pub fn status_of(headers: &HeaderPairs) -> Option<u32> {
    let raw = headers.first(":status")?;
    if raw.len() != 3 || !raw.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(raw).ok()?.parse().ok()
}

/// The status of a dependency's answer (IdP, ownership registry, broker lookup), or why it
/// can't be trusted: a `:status` that is not three digits, or a body that is not UTF-8 (every
/// dependency answers JSON, and JSON is UTF-8). Other headers are never read.
pub fn answer_status(headers: &HeaderPairs, body: &[u8]) -> Result<u32, &'static str> {
    let status = status_of(headers).ok_or("no three-digit :status")?;
    std::str::from_utf8(body).map_err(|_| "the body is not UTF-8")?;
    Ok(status)
}

/// Pseudo-headers (`:method`, `:path`, `:authority`, `:scheme`, `:status`): every engine
/// reads them, so they must be text.
pub fn is_pseudo(name: &str) -> bool {
    name.starts_with(':')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Two pairs, one with a Latin-1 value, as Envoy serialises them.
    const GOLDEN: &[u8] = &[
        2, 0, 0, 0, // two pairs
        5, 0, 0, 0, 4, 0, 0, 0, // ":path" (5), "/v2/" (4)
        6, 0, 0, 0, 4, 0, 0, 0, // "x-junk" (6), "caf\xE9" (4)
        b':', b'p', b'a', b't', b'h', 0, b'/', b'v', b'2', b'/', 0, //
        b'x', b'-', b'j', b'u', b'n', b'k', 0, b'c', b'a', b'f', 0xE9, 0,
    ];

    fn golden_pairs() -> Vec<RawPair> {
        vec![
            (b":path".to_vec(), b"/v2/".to_vec()),
            (b"x-junk".to_vec(), b"caf\xE9".to_vec()),
        ]
    }

    #[test]
    fn decodes_the_golden_bytes_with_non_utf8_values() {
        assert_eq!(decode(GOLDEN).unwrap(), golden_pairs());
    }

    #[test]
    fn encodes_to_the_golden_bytes() {
        assert_eq!(encode(&golden_pairs()), GOLDEN);
        assert_eq!(encode::<&[u8], &[u8]>(&[]), vec![0, 0, 0, 0]);
    }

    #[test]
    fn empty_maps() {
        assert_eq!(decode(&[0, 0, 0, 0]).unwrap(), vec![]);
        assert!(HeaderPairs::decode(&[]).unwrap().is_empty());
    }

    #[test]
    fn refuses_malformed_maps() {
        // Truncated count, a count beyond the data, a length beyond the data, a missing NUL,
        // trailing garbage.
        assert!(decode(&[1, 0]).is_err());
        assert!(decode(&[0xff, 0xff, 0xff, 0xff]).is_err());
        let mut long = GOLDEN.to_vec();
        long[4] = 200;
        assert!(decode(&long).is_err());
        let mut no_nul = GOLDEN.to_vec();
        let last = no_nul.len() - 1;
        no_nul[last] = b'x';
        assert!(decode(&no_nul).is_err());
        let mut trailing = GOLDEN.to_vec();
        trailing.push(7);
        assert!(decode(&trailing).is_err());
    }

    #[test]
    fn text_view_fails_only_on_headers_the_engine_reads() {
        let headers = HeaderPairs::decode(GOLDEN).unwrap();
        let view = headers.text_view(is_pseudo).unwrap();
        assert_eq!(view, vec![(":path".to_string(), "/v2/".to_string())]);
        let err = headers
            .text_view(|n| is_pseudo(n) || n == "x-junk")
            .unwrap_err();
        assert_eq!(err.name, "x-junk");
        assert_eq!(err.deny_reason().status(), 400);
        assert_eq!(headers.first("x-junk"), Some(&b"caf\xE9"[..]));
        assert!(headers.first_text("x-junk").is_err());
        assert_eq!(headers.first_text(":path").unwrap(), Some("/v2/"));
        assert_eq!(headers.first_text("absent").unwrap(), None);
    }

    #[test]
    fn names_are_lowercased_and_non_utf8_names_are_never_read() {
        let headers = HeaderPairs::from_pairs(vec![
            (b"X-Auth-Token".to_vec(), b"t".to_vec()),
            (b"x-\xff".to_vec(), b"\xff".to_vec()),
        ]);
        assert_eq!(
            headers.text_view(|_| true).unwrap(),
            vec![("x-auth-token".to_string(), "t".to_string())]
        );
    }

    #[test]
    fn status_from_bytes() {
        let with = |v: &[u8]| HeaderPairs::from_pairs(vec![(b":status".to_vec(), v.to_vec())]);
        assert_eq!(status_of(&with(b"200")), Some(200));
        assert_eq!(status_of(&with(b"20\xE9")), None);
        assert_eq!(status_of(&with(b"+20")), None);
        assert_eq!(status_of(&with(b"2000")), None);
        assert_eq!(status_of(&HeaderPairs::default()), None);
    }

    #[test]
    fn answers_need_a_text_status_and_body_but_not_text_elsewhere() {
        let headers = HeaderPairs::from_pairs(vec![
            (b":status".to_vec(), b"200".to_vec()),
            (b"server".to_vec(), b"caf\xE9".to_vec()),
        ]);
        assert_eq!(answer_status(&headers, b"{}"), Ok(200));
        assert!(answer_status(&headers, b"{\"a\": \"\xE9\"}").is_err());
        assert!(answer_status(&HeaderPairs::default(), b"{}").is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
            if let Ok(h) = HeaderPairs::decode(&bytes) {
                let _ = h.text_view(|_| true);
                let _ = status_of(&h);
            }
        }

        #[test]
        fn round_trips(pairs in proptest::collection::vec(
            (proptest::collection::vec(any::<u8>(), 0..16), proptest::collection::vec(any::<u8>(), 0..16)),
            0..8,
        )) {
            prop_assert_eq!(decode(&encode(&pairs)).unwrap(), pairs);
        }

        #[test]
        fn corrupted_encodings_never_panic(
            pairs in proptest::collection::vec(
                (proptest::collection::vec(any::<u8>(), 0..8), proptest::collection::vec(any::<u8>(), 0..8)),
                1..4,
            ),
            at in any::<usize>(),
            byte in any::<u8>(),
        ) {
            let mut bytes = encode(&pairs);
            let i = at % bytes.len();
            bytes[i] = byte;
            let _ = decode(&bytes);
        }
    }

    #[test]
    fn text_pairs_check_what_is_read_and_lend_every_text_pair() {
        let headers = HeaderPairs::decode(GOLDEN).unwrap();
        assert_eq!(
            headers.text_pairs(is_pseudo).unwrap(),
            &[(":path".to_string(), "/v2/".to_string())][..]
        );
        let err = headers
            .text_pairs(|n| is_pseudo(n) || n == "x-junk")
            .unwrap_err();
        assert_eq!(err.name, "x-junk");
        let mixed = HeaderPairs::from_pairs(vec![
            (b"a".to_vec(), b"1".to_vec()),
            (b"x-\xff".to_vec(), b"2".to_vec()),
            (b"b".to_vec(), b"\xff".to_vec()),
            (b"c".to_vec(), b"3".to_vec()),
        ]);
        let text = mixed.text_pairs(|n| n != "b").unwrap();
        let names: Vec<&str> = text.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a", "c"]);
        assert_eq!(mixed.iter().count(), 4);
    }

    /// The map as a plain list of byte pairs, with the host's set and remove: what
    /// [`HeaderPairs`] must behave as, whatever it keeps as text.
    fn model_set(model: &mut Vec<RawPair>, name: &[u8], value: &[u8]) {
        let mut replaced = false;
        model.retain_mut(|(n, v)| {
            if n.as_slice() != name {
                return true;
            }
            if replaced {
                return false;
            }
            *v = value.to_vec();
            replaced = true;
            true
        });
        if !replaced {
            model.push((name.to_vec(), value.to_vec()));
        }
    }

    proptest! {
        /// Order, first values, set, remove and the text check are those of a plain list of
        /// byte pairs, for maps mixing text and non-text names and values.
        #[test]
        fn behaves_as_a_list_of_byte_pairs(
            start in proptest::collection::vec((0u8..4, 0u8..3), 0..8),
            edits in proptest::collection::vec((0u8..4, 0u8..3, any::<bool>()), 0..8),
        ) {
            // Name 3 is not UTF-8; value 2 is not either.
            let name = |i: u8| if i == 3 { b"h\xff".to_vec() } else { format!("h{i}").into_bytes() };
            let value = |i: u8| if i == 2 { b"\xfe".to_vec() } else { format!("v{i}").into_bytes() };
            let mut model: Vec<RawPair> = start.iter().map(|(n, v)| (name(*n), value(*v))).collect();
            let mut headers = HeaderPairs::from_pairs(model.clone());
            for step in 0..=edits.len() {
                let pairs: Vec<RawPair> =
                    headers.iter().map(|(n, v)| (n.to_vec(), v.to_vec())).collect();
                prop_assert_eq!(&pairs, &model);
                for n in 0u8..3 {
                    let key = format!("h{n}");
                    let first = model.iter().find(|(m, _)| m == key.as_bytes()).map(|(_, v)| v.as_slice());
                    prop_assert_eq!(headers.first(&key), first);
                    let reads = |h: &str| h == key;
                    let not_text = model.iter().any(|(m, v)| m == key.as_bytes() && std::str::from_utf8(v).is_err());
                    let read: Vec<(String, String)> = model
                        .iter()
                        .filter(|(m, _)| m == key.as_bytes())
                        .map(|(m, v)| (String::from_utf8_lossy(m).into_owned(), String::from_utf8_lossy(v).into_owned()))
                        .collect();
                    match headers.text_view(reads) {
                        Ok(view) => {
                            prop_assert!(!not_text);
                            prop_assert_eq!(view, read);
                        }
                        Err(e) => {
                            prop_assert!(not_text);
                            prop_assert_eq!(e.name, key);
                        }
                    }
                }
                let Some((n, v, remove)) = edits.get(step) else { break };
                if *n == 3 {
                    continue; // the filters set and remove only text names
                }
                let key = format!("h{n}");
                if *remove {
                    headers.remove(&key);
                    model.retain(|(m, _)| m != key.as_bytes());
                } else {
                    // Text values go through set_text on every other step, which must do as
                    // set does.
                    match String::from_utf8(value(*v)) {
                        Ok(text) if step % 2 == 0 => headers.set_text(key.clone(), text),
                        _ => headers.set(&key, &value(*v)),
                    }
                    model_set(&mut model, key.as_bytes(), &value(*v));
                }
            }
        }
    }

    #[test]
    fn set_and_remove_follow_the_host() {
        let mut pairs = HeaderPairs::from_pairs(vec![
            (b"a".to_vec(), b"1".to_vec()),
            (b"b".to_vec(), b"2".to_vec()),
            (b"a".to_vec(), b"3".to_vec()),
        ]);
        pairs.set("a", b"9");
        pairs.set("c", b"4");
        let names: Vec<(&[u8], &[u8])> = pairs.iter().collect();
        assert_eq!(
            names,
            vec![
                (&b"a"[..], &b"9"[..]),
                (&b"b"[..], &b"2"[..]),
                (&b"c"[..], &b"4"[..])
            ]
        );
        pairs.remove("b");
        assert_eq!(pairs.first("b"), None);
        assert_eq!(pairs.iter().count(), 2);
    }
}
