//! [`ClassifyMemo`]: the classification of bodiless requests, remembered. [`classify_with_path`]
//! is a pure function of the broker, method, path, tenant headers and body; a request without a
//! body is classified from the first four alone, so a stage that sees the same request again
//! (a device polling its entity) takes the same answer from the memo instead of parsing the path
//! and query and building the accesses again (~25k wasm instructions for a GET of one entity).

use std::collections::HashMap;

use super::{classify_with_path, Broker, CanonicalPath, NgsiRequest};
use crate::access::RequestAccess;
use crate::decision::DenyReason;

/// The headers [`classify_with_path`] reads (`canonical::tenant`): every occurrence is part of
/// the key (a duplicate is refused, so it must not hit the entry of a single one).
const READ_HEADERS: [&str; 3] = ["fiware-service", "fiware-servicepath", "ngsild-tenant"];

/// Only small requests are remembered. Every request a client sends can differ, so the size of
/// an entry is bounded as well as their number: its key (method, path, tenant headers) and the
/// accesses it holds. At these bounds an entry stays within a few KB, the whole memo within a
/// few MB per VM; the requests worth remembering (a device polling its entity) are far smaller.
const MAX_KEY_BYTES: usize = 256;
const MAX_ACCESSES: usize = 4;

/// What a classification answered (refusals too: they are as pure).
pub type Classified = Result<(RequestAccess, CanonicalPath), DenyReason>;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    broker: Broker,
    method: String,
    path: String,
    /// The read headers in order, names lowercased.
    tenant: Vec<(String, String)>,
}

/// Bounded: when full it starts again empty (the entries are cheap to make again; a
/// bounded size is what matters).
#[derive(Debug, Clone)]
pub struct ClassifyMemo {
    entries: HashMap<Key, Classified>,
    capacity: usize,
}

impl ClassifyMemo {
    /// A memo of at most `capacity` requests (0: none remembered).
    pub fn new(capacity: usize) -> Self {
        ClassifyMemo {
            entries: HashMap::new(),
            capacity,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// [`classify_with_path`] of `req`, from the memo when the same bodiless request was
    /// classified before. A request with a body is always classified afresh.
    pub fn classify_with_path(&mut self, req: &NgsiRequest) -> Classified {
        if !req.body.is_empty() || self.capacity == 0 {
            return classify_with_path(req);
        }
        let tenant: Vec<(&String, &String)> = req
            .headers
            .iter()
            .filter(|(name, _)| READ_HEADERS.iter().any(|r| name.eq_ignore_ascii_case(r)))
            .map(|(name, value)| (name, value))
            .collect();
        let key_bytes = req.method.len()
            + req.path.len()
            + tenant
                .iter()
                .map(|(name, value)| name.len() + value.len())
                .sum::<usize>();
        if key_bytes > MAX_KEY_BYTES {
            return classify_with_path(req);
        }
        let key = Key {
            broker: req.broker,
            method: req.method.to_string(),
            path: req.path.to_string(),
            tenant: tenant
                .into_iter()
                .map(|(name, value)| (name.to_ascii_lowercase(), value.clone()))
                .collect(),
        };
        if let Some(known) = self.entries.get(&key) {
            return known.clone();
        }
        let classified = classify_with_path(req);
        if matches!(&classified, Ok((access, _)) if access.accesses.len() > MAX_ACCESSES) {
            return classified;
        }
        if self.entries.len() >= self.capacity {
            self.entries.clear();
        }
        self.entries.insert(key, classified.clone());
        classified
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request<'a>(
        method: &'a str,
        path: &'a str,
        headers: &'a [(String, String)],
        body: &'a [u8],
    ) -> NgsiRequest<'a> {
        NgsiRequest {
            broker: Broker::Orion,
            method,
            path,
            headers,
            body,
        }
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn answers_as_classify_does_for_every_tenant_header_and_duplicate() {
        let mut memo = ClassifyMemo::new(64);
        let city = pairs(&[("fiware-service", "city"), ("x-other", "1")]);
        let other = pairs(&[("fiware-service", "other")]);
        let twice = pairs(&[("fiware-service", "city"), ("fiware-service", "city")]);
        let path_header = pairs(&[("fiware-service", "city"), ("fiware-servicepath", "/a")]);
        let none = pairs(&[]);
        let paths = [
            "/v2/entities/Room1?type=Room",
            "/v2/entities?type=Room",
            "/v2/entities?id=A,B",
            "/v2/entities?id=A&id=B",
            "/v2/nowhere",
        ];
        for _ in 0..2 {
            for path in paths {
                for headers in [&city, &other, &twice, &path_header, &none] {
                    for method in ["GET", "DELETE"] {
                        let req = request(method, path, headers, b"");
                        assert_eq!(
                            memo.classify_with_path(&req),
                            classify_with_path(&req),
                            "{method} {path} {headers:?}"
                        );
                    }
                }
            }
        }
        // A header the classifier does not read is not part of the key.
        assert_eq!(memo.len(), paths.len() * 5 * 2);
    }

    #[test]
    fn bodies_are_classified_afresh_and_the_memo_is_bounded() {
        let mut memo = ClassifyMemo::new(2);
        let none = pairs(&[]);
        let body = br#"{"id": "A", "type": "T"}"#;
        let create = request("POST", "/v2/entities", &none, body);
        assert_eq!(
            memo.classify_with_path(&create),
            classify_with_path(&create)
        );
        assert!(memo.is_empty());
        for id in ["A", "B", "C"] {
            let path = format!("/v2/entities/{id}");
            let req = request("GET", &path, &none, b"");
            assert_eq!(memo.classify_with_path(&req), classify_with_path(&req));
            assert!(memo.len() <= 2);
        }
        // Big requests are not remembered (a client could fill the memo with them): a long
        // path, long tenant headers, or many accesses.
        let mut memo = ClassifyMemo::new(64);
        let long_path = format!("/v2/entities/{}", "A".repeat(MAX_KEY_BYTES));
        let long_tenant = pairs(&[("fiware-servicepath", &format!("/{}", "a".repeat(250)))]);
        let many = format!("/v2/entities?id={}", ["A", "B", "C", "D", "E"].join(","));
        for (path, headers) in [
            (long_path.as_str(), &none),
            ("/v2/entities/A", &long_tenant),
            (many.as_str(), &none),
        ] {
            let req = request("GET", path, headers, b"");
            assert_eq!(memo.classify_with_path(&req), classify_with_path(&req));
            assert!(memo.is_empty(), "{path} {headers:?} remembered");
        }
        let four = request("GET", "/v2/entities?id=A,B,C,D", &none, b"");
        assert!(matches!(classify_with_path(&four), Ok((a, _)) if a.accesses.len() == 4));
        assert_eq!(memo.classify_with_path(&four), classify_with_path(&four));
        assert_eq!(memo.len(), 1);

        let mut off = ClassifyMemo::new(0);
        let req = request("GET", "/v2/entities/A", &none, b"");
        assert_eq!(off.classify_with_path(&req), classify_with_path(&req));
        assert!(off.is_empty());
    }
}
