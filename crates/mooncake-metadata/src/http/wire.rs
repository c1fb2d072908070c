//! HTTP/1.1 framing for the metadata API: a request decoder (server side), a response
//! decoder (client side), percent-encoding, and the binary body of watch replies.
//!
//! Only what Mooncake's metadata API needs is supported: `GET`, `PUT`, `POST` and `DELETE`
//! with `Content-Length` bodies (requests), and `Content-Length`, chunked or close-delimited
//! bodies (responses, because Go's `net/http` answers large values chunked).

use std::fmt;

/// Limits the request decoder enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Largest request head (request line and headers), in bytes.
    pub max_head: usize,
    /// Largest request body, in bytes; a larger `Content-Length` is refused with 413.
    pub max_body: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_head: 16 * 1024,
            max_body: DEFAULT_MAX_BODY,
        }
    }
}

/// Default body limit of the server: 64 MiB (a descriptor with 100k buffers is ~6 MiB).
pub const DEFAULT_MAX_BODY: usize = crate::HTTP_DEFAULT_MAX_BODY;

/// Why a request could not be decoded; each maps to an HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// Syntax error (400).
    BadRequest(String),
    /// The head is larger than [`HttpLimits::max_head`] (431).
    HeadTooLarge,
    /// The body is larger than [`HttpLimits::max_body`] (413).
    BodyTooLarge {
        /// The declared length.
        declared: u64,
        /// The limit.
        limit: usize,
    },
    /// A feature this server does not implement, such as chunked request bodies (501).
    NotImplemented(String),
}

impl RequestError {
    /// The HTTP status code to answer with.
    pub fn status(&self) -> u16 {
        match self {
            Self::BadRequest(_) => 400,
            Self::HeadTooLarge => 431,
            Self::BodyTooLarge { .. } => 413,
            Self::NotImplemented(_) => 501,
        }
    }
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadRequest(m) => write!(f, "bad request: {m}"),
            Self::HeadTooLarge => f.write_str("request head too large"),
            Self::BodyTooLarge { declared, limit } => {
                write!(
                    f,
                    "request body of {declared} bytes exceeds the limit of {limit} bytes"
                )
            }
            Self::NotImplemented(m) => write!(f, "not implemented: {m}"),
        }
    }
}

impl std::error::Error for RequestError {}

/// A decoded request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// Method, as sent (`GET`, `PUT`, …).
    pub method: String,
    /// Path without the query (`/metadata`).
    pub path: String,
    /// Decoded query pairs, in order.
    pub query: Vec<(String, String)>,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Body length (`Content-Length`, 0 if absent).
    pub content_length: usize,
    /// Whether the connection stays open after the response.
    pub keep_alive: bool,
    /// The client sent `Expect: 100-continue`.
    pub expect_continue: bool,
}

impl RequestHead {
    /// The first query value named `name`.
    pub fn query(&self, name: &str) -> Option<&str> {
        lookup(&self.query, name)
    }

    /// The first header named `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        lookup(&self.headers, name)
    }
}

/// A complete request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The head.
    pub head: RequestHead,
    /// The body (`content_length` bytes).
    pub body: Vec<u8>,
}

/// Result of [`decode_request_head`] on a buffer prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadStatus {
    /// More bytes are needed.
    Incomplete,
    /// A head of `len` bytes was decoded; the body starts at `len`.
    Complete {
        /// The head.
        head: RequestHead,
        /// Bytes the head occupies.
        len: usize,
    },
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Decodes a request head from the start of `buf`.
///
/// # Behavior
/// - Returns [`HeadStatus::Incomplete`] until `\r\n\r\n` arrives, and
///   [`RequestError::HeadTooLarge`] if it has not arrived within `limits.max_head` bytes.
/// - `Content-Length` above `limits.max_body` gives [`RequestError::BodyTooLarge`] (413)
///   before any body byte is read. `Transfer-Encoding` gives [`RequestError::NotImplemented`].
/// - HTTP/1.1 keeps the connection alive unless `Connection: close`; HTTP/1.0 closes it
///   unless `Connection: keep-alive`.
pub fn decode_request_head(buf: &[u8], limits: &HttpLimits) -> Result<HeadStatus, RequestError> {
    let Some(end) = find_head_end(&buf[..buf.len().min(limits.max_head)]) else {
        return if buf.len() >= limits.max_head {
            Err(RequestError::HeadTooLarge)
        } else {
            Ok(HeadStatus::Incomplete)
        };
    };
    let text = std::str::from_utf8(&buf[..end - 4])
        .map_err(|_| RequestError::BadRequest("request head is not UTF-8".into()))?;
    let mut lines = text.split("\r\n");
    let line = lines.next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(RequestError::BadRequest(format!(
            "malformed request line {line:?}"
        )));
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(RequestError::BadRequest(format!(
            "malformed method {method:?}"
        )));
    }
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => {
            return Err(RequestError::BadRequest(format!(
                "unsupported version {version:?}"
            )));
        }
    };
    if !target.starts_with('/') {
        return Err(RequestError::BadRequest(format!(
            "request target {target:?} is not an absolute path"
        )));
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, parse_query(q)?),
        None => (target, Vec::new()),
    };
    let path = percent_decode(path, false)?;
    let mut headers = Vec::new();
    let mut content_length: Option<u64> = None;
    let mut keep_alive = http11;
    let mut expect_continue = false;
    for l in lines {
        let Some((name, value)) = l.split_once(':') else {
            return Err(RequestError::BadRequest(format!(
                "malformed header line {l:?}"
            )));
        };
        if name.is_empty()
            || name
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(RequestError::BadRequest(format!(
                "malformed header name {name:?}"
            )));
        }
        let name = name.to_ascii_lowercase();
        let value = value.trim().to_string();
        match name.as_str() {
            "content-length" => {
                let n: u64 = value.parse().map_err(|_| {
                    RequestError::BadRequest(format!("bad Content-Length {value:?}"))
                })?;
                if content_length.is_some_and(|c| c != n) {
                    return Err(RequestError::BadRequest(
                        "conflicting Content-Length headers".into(),
                    ));
                }
                content_length = Some(n);
            }
            "transfer-encoding" => {
                return Err(RequestError::NotImplemented(format!(
                    "Transfer-Encoding {value:?} in a request"
                )));
            }
            "connection" => {
                let v = value.to_ascii_lowercase();
                if v.split(',').any(|t| t.trim() == "close") {
                    keep_alive = false;
                } else if v.split(',').any(|t| t.trim() == "keep-alive") {
                    keep_alive = true;
                }
            }
            "expect" => expect_continue = value.eq_ignore_ascii_case("100-continue"),
            _ => {}
        }
        headers.push((name, value));
    }
    let declared = content_length.unwrap_or(0);
    if declared > limits.max_body as u64 {
        return Err(RequestError::BodyTooLarge {
            declared,
            limit: limits.max_body,
        });
    }
    let head = RequestHead {
        method: method.to_string(),
        path,
        query,
        headers,
        content_length: declared as usize,
        keep_alive,
        expect_continue,
    };
    Ok(HeadStatus::Complete { head, len: end })
}

/// Decodes one whole request (head and body) from the start of `buf`.
///
/// Returns `Ok(None)` while incomplete, or the request and the bytes it used.
pub fn decode_request(
    buf: &[u8],
    limits: &HttpLimits,
) -> Result<Option<(Request, usize)>, RequestError> {
    match decode_request_head(buf, limits)? {
        HeadStatus::Incomplete => Ok(None),
        HeadStatus::Complete { head, len } => {
            let total = len + head.content_length;
            if buf.len() < total {
                return Ok(None);
            }
            let body = buf[len..total].to_vec();
            Ok(Some((Request { head, body }, total)))
        }
    }
}

/// Encodes a request (client side). `path_and_query` must already be percent-encoded.
pub fn encode_request(
    method: &str,
    host: &str,
    path_and_query: &str,
    body: Option<&[u8]>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + body.map_or(0, <[u8]>::len));
    out.extend_from_slice(
        format!("{method} {path_and_query} HTTP/1.1\r\nHost: {host}\r\n").as_bytes(),
    );
    if let Some(b) = body {
        out.extend_from_slice(format!("Content-Length: {}\r\n", b.len()).as_bytes());
    } else if method == "PUT" || method == "POST" {
        out.extend_from_slice(b"Content-Length: 0\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if let Some(b) = body {
        out.extend_from_slice(b);
    }
    out
}

/// Encodes a response (server side).
pub fn encode_response(
    status: u16,
    extra_headers: &[(&str, String)],
    body: &[u8],
    keep_alive: bool,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + body.len());
    out.extend_from_slice(format!("HTTP/1.1 {status} {}\r\n", reason(status)).as_bytes());
    out.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    for (k, v) in extra_headers {
        out.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    if !keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// The reason phrase of a status code.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        410 => "Gone",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        _ => "Unknown",
    }
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes `%XX` escapes (and `+` as a space when `plus_is_space`, as Go's `url.Query` does).
pub fn percent_decode(s: &str, plus_is_space: bool) -> Result<String, RequestError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let (Some(h), Some(l)) = (
                    b.get(i + 1).and_then(|&c| hex_val(c)),
                    b.get(i + 2).and_then(|&c| hex_val(c)),
                ) else {
                    return Err(RequestError::BadRequest(format!(
                        "bad percent escape in {s:?}"
                    )));
                };
                out.push(h << 4 | l);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out)
        .map_err(|_| RequestError::BadRequest(format!("{s:?} decodes to invalid UTF-8")))
}

/// Percent-encodes a query value: everything but unreserved characters, `/` and `:`.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/' | b':') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn parse_query(q: &str) -> Result<Vec<(String, String)>, RequestError> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Ok((percent_decode(k, true)?, percent_decode(v, true)?))
        })
        .collect()
}

/// A decoded response (client side).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Body (de-chunked).
    pub body: Vec<u8>,
    /// Whether the server keeps the connection open.
    pub keep_alive: bool,
}

impl Response {
    /// The first header named `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        lookup(&self.headers, name)
    }
}

/// Result of [`decode_response`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseStatus {
    /// More bytes are needed (or, for a close-delimited body, the end of the stream).
    Incomplete,
    /// A response of `len` bytes.
    Complete(Response, usize),
}

/// Decodes one response from `buf`. `eof` says the peer closed the stream (which completes a
/// close-delimited body). `max_body` bounds the body.
pub fn decode_response(buf: &[u8], eof: bool, max_body: usize) -> Result<ResponseStatus, String> {
    let Some(end) = find_head_end(&buf[..buf.len().min(64 * 1024)]) else {
        return if buf.len() >= 64 * 1024 {
            Err("response head too large".into())
        } else {
            Ok(ResponseStatus::Incomplete)
        };
    };
    let text = std::str::from_utf8(&buf[..end - 4])
        .map_err(|_| "response head is not UTF-8".to_string())?;
    let mut lines = text.split("\r\n");
    let line = lines.next().unwrap_or_default();
    let mut parts = line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .filter(|s| (100..600).contains(s))
        .ok_or_else(|| format!("malformed status line {line:?}"))?;
    if !version.starts_with("HTTP/1.") {
        return Err(format!("malformed status line {line:?}"));
    }
    let mut headers = Vec::new();
    let mut keep_alive = version == "HTTP/1.1";
    let mut length: Option<usize> = None;
    let mut chunked = false;
    for l in lines {
        let (name, value) = l
            .split_once(':')
            .ok_or_else(|| format!("malformed header line {l:?}"))?;
        let name = name.trim().to_ascii_lowercase();
        let value = value.trim().to_string();
        match name.as_str() {
            "content-length" => {
                length = Some(
                    value
                        .parse()
                        .map_err(|_| format!("bad Content-Length {value:?}"))?,
                )
            }
            "transfer-encoding" => chunked = value.to_ascii_lowercase().contains("chunked"),
            "connection" => {
                let v = value.to_ascii_lowercase();
                if v.contains("close") {
                    keep_alive = false;
                } else if v.contains("keep-alive") {
                    keep_alive = true;
                }
            }
            _ => {}
        }
        headers.push((name, value));
    }
    let no_body = status == 204 || status == 304 || (100..200).contains(&status);
    if no_body {
        return Ok(ResponseStatus::Complete(
            Response {
                status,
                headers,
                body: Vec::new(),
                keep_alive,
            },
            end,
        ));
    }
    if chunked {
        let mut body = Vec::new();
        let mut pos = end;
        loop {
            let Some(nl) = buf[pos..].windows(2).position(|w| w == b"\r\n") else {
                return Ok(ResponseStatus::Incomplete);
            };
            let size_line = std::str::from_utf8(&buf[pos..pos + nl])
                .map_err(|_| "bad chunk size".to_string())?;
            let size_hex = size_line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_hex, 16)
                .map_err(|_| format!("bad chunk size {size_line:?}"))?;
            pos += nl + 2;
            if size == 0 {
                // Trailers end with an empty line.
                loop {
                    let Some(nl) = buf[pos..].windows(2).position(|w| w == b"\r\n") else {
                        return Ok(ResponseStatus::Incomplete);
                    };
                    pos += nl + 2;
                    if nl == 0 {
                        return Ok(ResponseStatus::Complete(
                            Response {
                                status,
                                headers,
                                body,
                                keep_alive,
                            },
                            pos,
                        ));
                    }
                }
            }
            if body.len() + size > max_body {
                return Err(format!("response body exceeds {max_body} bytes"));
            }
            if buf.len() < pos + size + 2 {
                return Ok(ResponseStatus::Incomplete);
            }
            body.extend_from_slice(&buf[pos..pos + size]);
            if &buf[pos + size..pos + size + 2] != b"\r\n" {
                return Err("chunk not terminated by CRLF".into());
            }
            pos += size + 2;
        }
    }
    match length {
        Some(n) => {
            if n > max_body {
                return Err(format!(
                    "response body of {n} bytes exceeds {max_body} bytes"
                ));
            }
            if buf.len() < end + n {
                return Ok(ResponseStatus::Incomplete);
            }
            Ok(ResponseStatus::Complete(
                Response {
                    status,
                    headers,
                    body: buf[end..end + n].to_vec(),
                    keep_alive,
                },
                end + n,
            ))
        }
        None => {
            if buf.len() - end > max_body {
                return Err(format!("response body exceeds {max_body} bytes"));
            }
            if !eof {
                return Ok(ResponseStatus::Incomplete);
            }
            Ok(ResponseStatus::Complete(
                Response {
                    status,
                    headers,
                    body: buf[end..].to_vec(),
                    keep_alive: false,
                },
                buf.len(),
            ))
        }
    }
}

/// One change in a watch reply (mooncake-rs extension of the HTTP API).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireEvent {
    /// The server's revision of this change (strictly increasing).
    pub revision: u64,
    /// The key.
    pub key: String,
    /// `Some(value)` for a put, `None` for a delete or expiry.
    pub value: Option<Vec<u8>>,
}

/// Encodes watch events: per event `revision: u64 LE`, `op: u8` (1 put, 2 delete),
/// `key_len: u32 LE`, key, and for puts `value_len: u32 LE`, value.
pub fn encode_events(events: &[WireEvent]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in events {
        out.extend_from_slice(&e.revision.to_le_bytes());
        out.push(if e.value.is_some() { 1 } else { 2 });
        out.extend_from_slice(&(e.key.len() as u32).to_le_bytes());
        out.extend_from_slice(e.key.as_bytes());
        if let Some(v) = &e.value {
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            out.extend_from_slice(v);
        }
    }
    out
}

/// Decodes what [`encode_events`] wrote.
pub fn decode_events(mut buf: &[u8]) -> Result<Vec<WireEvent>, String> {
    fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
        if buf.len() < n {
            return Err("truncated watch event".into());
        }
        let (a, b) = buf.split_at(n);
        *buf = b;
        Ok(a)
    }
    let mut out = Vec::new();
    while !buf.is_empty() {
        let revision = u64::from_le_bytes(take(&mut buf, 8)?.try_into().expect("8 bytes"));
        let op = take(&mut buf, 1)?[0];
        let klen = u32::from_le_bytes(take(&mut buf, 4)?.try_into().expect("4 bytes")) as usize;
        let key = String::from_utf8(take(&mut buf, klen)?.to_vec())
            .map_err(|_| "watch key is not UTF-8".to_string())?;
        let value = match op {
            1 => {
                let vlen =
                    u32::from_le_bytes(take(&mut buf, 4)?.try_into().expect("4 bytes")) as usize;
                Some(take(&mut buf, vlen)?.to_vec())
            }
            2 => None,
            _ => return Err(format!("unknown watch op {op}")),
        };
        out.push(WireEvent {
            revision,
            key,
            value,
        });
    }
    Ok(out)
}

/// The value of the first `(name, value)` pair called `name`.
fn lookup<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn decodes_a_put() {
        let req = b"PUT /metadata?key=mooncake%2Fram%2Fa+b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcEXTRA";
        let (r, used) = decode_request(req, &HttpLimits::default())
            .unwrap()
            .unwrap();
        assert_eq!(used, req.len() - 5);
        assert_eq!(r.head.method, "PUT");
        assert_eq!(r.head.path, "/metadata");
        assert_eq!(r.head.query("key"), Some("mooncake/ram/a b"));
        assert_eq!(r.body, b"abc");
        assert!(r.head.keep_alive);
    }

    #[test]
    fn refuses_large_bodies_before_reading_them() {
        let limits = HttpLimits {
            max_head: 1024,
            max_body: 10,
        };
        let req = b"PUT /metadata?key=k HTTP/1.1\r\nContent-Length: 11\r\n\r\n";
        let e = decode_request(req, &limits).unwrap_err();
        assert_eq!(e.status(), 413);
        assert!(decode_request(&[b'a'; 2000], &limits).unwrap_err().status() == 431);
        assert_eq!(
            decode_request(b"GET / HTTP/1.1\r\n", &limits).unwrap(),
            None
        );
    }

    #[test]
    fn decodes_chunked_responses() {
        let r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        let ResponseStatus::Complete(resp, used) = decode_response(r, false, 100).unwrap() else {
            panic!()
        };
        assert_eq!(resp.body, b"abcde");
        assert_eq!(used, r.len());
        assert_eq!(
            decode_response(&r[..r.len() - 1], false, 100).unwrap(),
            ResponseStatus::Incomplete
        );
        let r = b"HTTP/1.0 404 Not Found\r\n\r\nnope";
        assert_eq!(
            decode_response(r, false, 100).unwrap(),
            ResponseStatus::Incomplete
        );
        let ResponseStatus::Complete(resp, _) = decode_response(r, true, 100).unwrap() else {
            panic!()
        };
        assert_eq!(
            (resp.status, resp.body.as_slice(), resp.keep_alive),
            (404, &b"nope"[..], false)
        );
    }

    proptest! {
        #[test]
        fn request_roundtrip(key in "[ -~]{0,40}", body in proptest::collection::vec(any::<u8>(), 0..300),
                             split in 0usize..400) {
            let q = format!("/metadata?key={}", percent_encode(&key));
            let bytes = encode_request("PUT", "h:1", &q, Some(&body));
            // Any prefix is incomplete, never an error.
            let cut = split.min(bytes.len() - 1);
            prop_assert_eq!(decode_request(&bytes[..cut], &HttpLimits::default()).unwrap(), None);
            let (r, used) = decode_request(&bytes, &HttpLimits::default()).unwrap().unwrap();
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(r.head.query("key"), Some(key.as_str()));
            prop_assert_eq!(r.body, body);
        }

        #[test]
        fn request_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600),
                                        max_body in 0usize..64) {
            let limits = HttpLimits { max_head: 256, max_body };
            if let Ok(Some((r, used))) = decode_request(&bytes, &limits) {
                prop_assert!(used <= bytes.len());
                prop_assert!(r.body.len() <= max_body);
            }
        }

        #[test]
        fn response_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600), eof: bool) {
            let _ = decode_response(&bytes, eof, 128);
        }

        #[test]
        fn events_roundtrip(evs in proptest::collection::vec(
            (any::<u64>(), "[a-z/]{0,20}", proptest::option::of(proptest::collection::vec(any::<u8>(), 0..50))), 0..10)) {
            let evs: Vec<WireEvent> = evs.into_iter().map(|(revision, key, value)| WireEvent { revision, key, value }).collect();
            prop_assert_eq!(decode_events(&encode_events(&evs)).unwrap(), evs);
        }
    }
}
