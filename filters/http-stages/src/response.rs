//! What the driver knows of one response, for the stages that look at responses: its headers
//! (read from the host on first use), and the whole body once a stage asked for it.

use std::cell::OnceCell;

use policy::header_pairs::{status_of, HeaderPairs};
use proxy_glue::host::{self, HostStatus};
use proxy_wasm::types::{BufferType, MapType};

/// One response as the stages see it. A stage that changes a header or the body does it
/// through [`Response::set_header`] / [`Response::replace_body`], which change the host's copy
/// and this one alike, so the stages that run after it see what the client will see.
pub struct Response {
    /// The response headers, read from the host the first time a stage asks (most stages
    /// never do: then they cost nothing).
    headers: OnceCell<HeaderPairs>,
    /// The response ended with its headers (no body follows).
    pub ended_at_headers: bool,
    /// The whole response body, once a stage asked for it and it arrived (empty before).
    pub body: Vec<u8>,
    /// How many body bytes the host holds (what [`Response::replace_body`] replaces).
    host_body_len: usize,
}

impl Response {
    pub(crate) fn new(ended_at_headers: bool) -> Self {
        Response {
            headers: OnceCell::new(),
            ended_at_headers,
            body: Vec::new(),
            host_body_len: 0,
        }
    }

    pub(crate) fn set_body(&mut self, body: Vec<u8>) {
        self.host_body_len = body.len();
        self.body = body;
    }

    /// The response headers as bytes. Headers the host can't give are logged and read as
    /// none (then there is no `:status`: a stage that checks the answer refuses it).
    pub fn headers(&self) -> &HeaderPairs {
        self.headers
            .get_or_init(|| match host::header_map(MapType::HttpResponseHeaders) {
                Ok(headers) => headers,
                Err(e) => {
                    log::error!("http-stages: cannot read the response headers: {e}");
                    HeaderPairs::default()
                }
            })
    }

    /// The response's `:status` (None: missing or not three digits).
    pub fn status(&self) -> Option<u32> {
        status_of(self.headers())
    }

    /// Sets (Some) or removes (None) a response header, for the client and in this copy. Only
    /// while the driver holds the response headers (in `on_response`, or after `NeedBody`).
    pub fn set_header(&mut self, name: &str, value: Option<&str>) -> Result<(), HostStatus> {
        // Read first (if no stage did yet), so the copy matches the host after the change.
        self.headers();
        let done = host::set_header(MapType::HttpResponseHeaders, name, value);
        if let Some(headers) = self.headers.get_mut() {
            match value {
                Some(v) => headers.set(name, v.as_bytes()),
                None => headers.remove(name),
            }
        }
        done
    }

    /// Replaces the whole response body (after `NeedBody`, while the driver holds it). The
    /// stage that may do so removes `content-length` in `on_response`.
    pub fn replace_body(&mut self, body: Vec<u8>) -> Result<(), HostStatus> {
        host::write_buffer(BufferType::HttpResponseBody, 0, self.host_body_len, &body)?;
        self.set_body(body);
        Ok(())
    }
}
