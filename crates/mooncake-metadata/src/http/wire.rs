//! HTTP/1.1 framing for the metadata API: a request decoder (server side), an incremental,
//! bounded response decoder (client side), percent-encoding, and the binary body of watch
//! replies.
//!
//! Request and response heads are parsed by [`httparse`]; this module adds what the metadata
//! API needs on top: body framing (`Content-Length` requests; `Content-Length`, chunked or
//! close-delimited responses, because Go's `net/http` answers large values chunked), size
//! limits checked before anything is buffered, and overflow-free arithmetic on every length a
//! peer sends. No input makes a decoder panic (they are fuzzed: `fuzz/fuzz_targets/metadata_*`).

use std::fmt;

/// Most headers accepted in a request or a response head.
pub const MAX_HEADERS: usize = 64;
/// Largest response head the client accepts (status line, headers, or trailers).
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Longest chunk-size line (size and extensions) the client accepts.
pub const MAX_CHUNK_LINE: usize = 1024;
/// Most interim (1xx) responses the client skips before the final one.
const MAX_INTERIM: usize = 8;

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
    /// The head is larger than [`HttpLimits::max_head`], or has more than [`MAX_HEADERS`]
    /// headers (431).
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

    /// The credentials of an `Authorization: Bearer <token>` header, if any.
    pub fn bearer_token(&self) -> Option<&str> {
        let v = self.header("authorization")?.trim();
        let (scheme, token) = v.split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim())
            .filter(|t| !t.is_empty())
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

/// Parses a strict decimal length (digits only, no sign, no overflow).
fn parse_length(v: &str) -> Option<u64> {
    if v.is_empty() || v.len() > 20 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

/// Whether a comma-separated header value lists `token` (case-insensitive).
fn has_token(value: &str, token: &str) -> bool {
    value
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Decodes a request head from the start of `buf` (with [`httparse`]).
///
/// # Behavior
/// - Returns [`HeadStatus::Incomplete`] until the empty line that ends the head arrives, and
///   [`RequestError::HeadTooLarge`] if it has not arrived within `limits.max_head` bytes or
///   the head has more than [`MAX_HEADERS`] headers.
/// - `Content-Length` above `limits.max_body` gives [`RequestError::BodyTooLarge`] (413)
///   before any body byte is read; a malformed or conflicting one gives 400.
///   `Transfer-Encoding` gives [`RequestError::NotImplemented`].
/// - HTTP/1.1 keeps the connection alive unless `Connection: close`; HTTP/1.0 closes it
///   unless `Connection: keep-alive`.
pub fn decode_request_head(buf: &[u8], limits: &HttpLimits) -> Result<HeadStatus, RequestError> {
    let window = &buf[..buf.len().min(limits.max_head)];
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let end = match req.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() >= limits.max_head {
                Err(RequestError::HeadTooLarge)
            } else {
                Ok(HeadStatus::Incomplete)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(RequestError::HeadTooLarge),
        Err(e) => {
            return Err(RequestError::BadRequest(format!(
                "malformed request head: {e}"
            )));
        }
    };
    let method = req.method.unwrap_or_default();
    let target = req.path.unwrap_or_default();
    let http11 = req.version == Some(1);
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
    let mut out_headers = Vec::with_capacity(req.headers.len());
    let mut content_length: Option<u64> = None;
    let mut keep_alive = http11;
    let mut expect_continue = false;
    for h in req.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        let value = std::str::from_utf8(h.value)
            .map_err(|_| RequestError::BadRequest(format!("header {name} is not UTF-8")))?
            .trim()
            .to_string();
        match name.as_str() {
            "content-length" => {
                let n = parse_length(&value).ok_or_else(|| {
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
                if has_token(&value, "close") {
                    keep_alive = false;
                } else if has_token(&value, "keep-alive") {
                    keep_alive = true;
                }
            }
            "expect" => expect_continue = value.eq_ignore_ascii_case("100-continue"),
            _ => {}
        }
        out_headers.push((name, value));
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
        headers: out_headers,
        // Checked against `max_body` (a usize) above.
        content_length: declared as usize,
        keep_alive,
        expect_continue,
    };
    Ok(HeadStatus::Complete { head, len: end })
}

/// Finds request heads in a growing buffer without re-scanning it: each byte is looked at
/// once until the empty line that ends a head arrives, and only then is [`httparse`] run
/// (a client trickling a head one byte at a time costs O(head), not O(head²)).
#[derive(Debug, Default, Clone)]
pub struct HeadReader {
    scanned: usize,
}

impl HeadReader {
    /// A reader for a fresh buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Looks for a complete head at the start of `buf`, which grew since the last call (or
    /// was consumed up to a previous request's end: call [`reset`](Self::reset) then). Empty
    /// lines before a request are dropped from `buf`, as RFC 9112 allows.
    pub fn poll(
        &mut self,
        buf: &mut Vec<u8>,
        limits: &HttpLimits,
    ) -> Result<HeadStatus, RequestError> {
        let lead = buf
            .iter()
            .take_while(|&&b| b == b'\r' || b == b'\n')
            .count();
        if lead > 0 {
            buf.drain(..lead);
            self.scanned = 0;
        }
        let window = buf.len().min(limits.max_head);
        let from = self.scanned.saturating_sub(3).min(window);
        let found = buf[from..window].windows(2).any(|w| w == b"\n\n")
            || buf[from..window].windows(3).any(|w| w == b"\n\r\n");
        self.scanned = window;
        if !found {
            return if buf.len() >= limits.max_head {
                Err(RequestError::HeadTooLarge)
            } else {
                Ok(HeadStatus::Incomplete)
            };
        }
        let r = decode_request_head(buf, limits);
        if matches!(r, Ok(HeadStatus::Complete { .. }) | Err(_)) {
            self.scanned = 0;
        }
        r
    }

    /// Forgets the scan position (the buffer's start moved).
    pub fn reset(&mut self) {
        self.scanned = 0;
    }
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
            let Some(total) = len.checked_add(head.content_length) else {
                return Err(RequestError::HeadTooLarge);
            };
            if buf.len() < total {
                return Ok(None);
            }
            let body = buf[len..total].to_vec();
            Ok(Some((Request { head, body }, total)))
        }
    }
}

/// Encodes a request (client side). `path_and_query` must already be percent-encoded;
/// `token`, when given, goes in an `Authorization: Bearer` header.
pub fn encode_request(
    method: &str,
    host: &str,
    path_and_query: &str,
    body: Option<&[u8]>,
    token: Option<&str>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(192 + body.map_or(0, <[u8]>::len));
    out.extend_from_slice(
        format!("{method} {path_and_query} HTTP/1.1\r\nHost: {host}\r\n").as_bytes(),
    );
    if let Some(t) = token {
        out.extend_from_slice(format!("Authorization: Bearer {t}\r\n").as_bytes());
    }
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

/// Encodes a response head (server side) for a body of `body_len` bytes.
pub fn encode_response_head(
    status: u16,
    extra_headers: &[(&str, String)],
    body_len: usize,
    keep_alive: bool,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(format!("HTTP/1.1 {status} {}\r\n", reason(status)).as_bytes());
    out.extend_from_slice(format!("Content-Length: {body_len}\r\n").as_bytes());
    for (k, v) in extra_headers {
        out.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    if !keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Encodes a response (server side).
pub fn encode_response(
    status: u16,
    extra_headers: &[(&str, String)],
    body: &[u8],
    keep_alive: bool,
) -> Vec<u8> {
    let mut out = encode_response_head(status, extra_headers, body.len(), keep_alive);
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
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        410 => "Gone",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        507 => "Insufficient Storage",
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
#[derive(Debug, Clone, PartialEq, Eq, Default)]
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

/// Why a response could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseError {
    /// The head (or the trailers) exceeds [`MAX_RESPONSE_HEAD`] bytes or [`MAX_HEADERS`]
    /// headers.
    HeadTooLarge,
    /// The body exceeds the limit the decoder was made with.
    BodyTooLarge {
        /// The limit.
        limit: usize,
    },
    /// The bytes do not follow HTTP/1.1.
    Malformed(String),
    /// The stream ended before the response did.
    Truncated,
}

impl fmt::Display for ResponseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::HeadTooLarge => write!(
                f,
                "response head too large (over {MAX_RESPONSE_HEAD} bytes or {MAX_HEADERS} headers)"
            ),
            Self::BodyTooLarge { limit } => write!(f, "response body exceeds {limit} bytes"),
            Self::Malformed(m) => write!(f, "malformed response: {m}"),
            Self::Truncated => f.write_str("the connection closed mid-response"),
        }
    }
}

impl std::error::Error for ResponseError {}

/// What [`ResponseDecoder::feed`] made of its input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// The response is not complete: feed more (or call [`ResponseDecoder::finish`] at EOF).
    NeedMore,
    /// The response, and how many bytes of the last input it used (the rest, if any, is
    /// not part of it).
    Done(Response, usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Head,
    /// `Content-Length` body: bytes still to come.
    Length(u64),
    /// Reading a chunk-size line (into `line`).
    ChunkSize,
    /// Bytes of the current chunk still to come.
    ChunkData(u64),
    /// The CRLF after a chunk: how many of its bytes arrived.
    ChunkEnd(u8),
    /// Trailer lines after the last chunk (into `line`).
    Trailers,
    /// Body delimited by the end of the stream.
    Close,
    /// The response is complete (returned by the next step).
    Done,
    /// The response was returned; nothing more is decoded.
    Finished,
}

/// An incremental, bounded HTTP/1.1 response decoder: bytes are fed as they arrive and each
/// is looked at once (no re-decoding of what came before).
///
/// # Behavior
/// - The head is at most [`MAX_RESPONSE_HEAD`] bytes and [`MAX_HEADERS`] headers; interim
///   (1xx) responses are skipped, at most 8.
/// - The body is at most `max_body` bytes, whatever its framing: a `Content-Length` or a
///   chunk size beyond it fails before any of it is buffered. Lengths and chunk sizes are
///   parsed without overflow (a 17-digit chunk size is an error, not a panic).
/// - `Content-Length` must be digits only, and repeated ones must agree; a response with
///   both `Content-Length` and `Transfer-Encoding`, or a transfer coding other than
///   `chunked`, is refused.
/// - Chunk-size lines are at most [`MAX_CHUNK_LINE`] bytes; trailers are skipped, bounded
///   like the head.
#[derive(Debug, Clone)]
pub struct ResponseDecoder {
    max_body: usize,
    phase: Phase,
    /// The head being read, or the current chunk-size or trailer line.
    line: Vec<u8>,
    scanned: usize,
    interim: usize,
    trailer_bytes: usize,
    resp: Response,
}

/// The end of a head in `buf` (the index after its empty line), scanning from `from`.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let from = from.saturating_sub(3);
    (from..buf.len()).find_map(|i| {
        if buf[i] != b'\n' {
            return None;
        }
        match buf.get(i + 1) {
            Some(b'\n') => Some(i + 2),
            Some(b'\r') if buf.get(i + 2) == Some(&b'\n') => Some(i + 3),
            _ => None,
        }
    })
}

impl ResponseDecoder {
    /// A decoder for one response whose body may be at most `max_body` bytes.
    pub fn new(max_body: usize) -> Self {
        Self {
            max_body,
            phase: Phase::Head,
            line: Vec::new(),
            scanned: 0,
            interim: 0,
            trailer_bytes: 0,
            resp: Response::default(),
        }
    }

    fn done(&mut self) -> Response {
        self.phase = Phase::Finished;
        std::mem::take(&mut self.resp)
    }

    fn room(&self) -> u64 {
        (self.max_body as u64).saturating_sub(self.resp.body.len() as u64)
    }

    /// Parses the head in `self.line` and picks the body framing.
    fn parse_head(&mut self) -> Result<(), ResponseError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut r = httparse::Response::new(&mut headers);
        match r.parse(&self.line) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => {
                return Err(ResponseError::Malformed("incomplete status line".into()));
            }
            Err(httparse::Error::TooManyHeaders) => return Err(ResponseError::HeadTooLarge),
            Err(e) => return Err(ResponseError::Malformed(e.to_string())),
        }
        let status = r.code.unwrap_or_default();
        if !(100..600).contains(&status) {
            return Err(ResponseError::Malformed(format!("status {status}")));
        }
        let mut keep_alive = r.version == Some(1);
        let mut length: Option<u64> = None;
        let mut coding: Option<String> = None;
        let mut out = Vec::with_capacity(r.headers.len());
        for h in r.headers.iter() {
            let name = h.name.to_ascii_lowercase();
            let value = String::from_utf8_lossy(h.value).trim().to_string();
            match name.as_str() {
                "content-length" => {
                    let n = parse_length(&value).ok_or_else(|| {
                        ResponseError::Malformed(format!("bad Content-Length {value:?}"))
                    })?;
                    if length.is_some_and(|l| l != n) {
                        return Err(ResponseError::Malformed(
                            "conflicting Content-Length headers".into(),
                        ));
                    }
                    length = Some(n);
                }
                "transfer-encoding" => coding = Some(value.to_ascii_lowercase()),
                "connection" => {
                    if has_token(&value, "close") {
                        keep_alive = false;
                    } else if has_token(&value, "keep-alive") {
                        keep_alive = true;
                    }
                }
                _ => {}
            }
            out.push((name, value));
        }
        if (100..200).contains(&status) {
            if status == 101 {
                return Err(ResponseError::Malformed("unexpected 101".into()));
            }
            self.interim += 1;
            if self.interim > MAX_INTERIM {
                return Err(ResponseError::Malformed(
                    "too many interim responses".into(),
                ));
            }
            self.phase = Phase::Head;
            return Ok(());
        }
        self.resp = Response {
            status,
            headers: out,
            body: Vec::new(),
            keep_alive,
        };
        if status == 204 || status == 304 {
            self.phase = Phase::Done;
            return Ok(());
        }
        self.phase = match (coding, length) {
            (Some(_), Some(_)) => {
                return Err(ResponseError::Malformed(
                    "both Content-Length and Transfer-Encoding".into(),
                ));
            }
            (Some(c), None) => {
                if c.rsplit(',').next().map(str::trim) != Some("chunked") {
                    return Err(ResponseError::Malformed(format!(
                        "unsupported Transfer-Encoding {c:?}"
                    )));
                }
                Phase::ChunkSize
            }
            (None, Some(n)) => {
                if n > self.max_body as u64 {
                    return Err(ResponseError::BodyTooLarge {
                        limit: self.max_body,
                    });
                }
                self.resp.body.reserve(n.min(64 * 1024) as usize);
                if n == 0 {
                    Phase::Done
                } else {
                    Phase::Length(n)
                }
            }
            (None, None) => {
                self.resp.keep_alive = false;
                Phase::Close
            }
        };
        Ok(())
    }

    /// Feeds the next bytes of the stream.
    pub fn feed(&mut self, input: &[u8]) -> Result<Decoded, ResponseError> {
        let mut pos = 0;
        loop {
            let rest = &input[pos..];
            match self.phase {
                Phase::Done => {
                    return Ok(Decoded::Done(self.done(), pos));
                }
                Phase::Finished => {
                    return Err(ResponseError::Malformed(
                        "bytes after a complete response".into(),
                    ));
                }
                Phase::Head => {
                    let room = MAX_RESPONSE_HEAD - self.line.len();
                    let take = room.min(rest.len());
                    let before = self.line.len();
                    self.line.extend_from_slice(&rest[..take]);
                    match head_end(&self.line, self.scanned) {
                        None => {
                            self.scanned = self.line.len();
                            if self.line.len() >= MAX_RESPONSE_HEAD {
                                return Err(ResponseError::HeadTooLarge);
                            }
                            return Ok(Decoded::NeedMore);
                        }
                        Some(end) => {
                            pos += end.saturating_sub(before);
                            self.line.truncate(end);
                            self.parse_head()?;
                            self.line.clear();
                            self.scanned = 0;
                        }
                    }
                }
                Phase::Length(left) => {
                    let take = left.min(rest.len() as u64) as usize;
                    self.resp.body.extend_from_slice(&rest[..take]);
                    pos += take;
                    let left = left - take as u64;
                    if left == 0 {
                        self.phase = Phase::Done;
                    } else {
                        self.phase = Phase::Length(left);
                        return Ok(Decoded::NeedMore);
                    }
                }
                Phase::ChunkSize | Phase::Trailers => {
                    let limit = if self.phase == Phase::ChunkSize {
                        MAX_CHUNK_LINE
                    } else {
                        MAX_RESPONSE_HEAD
                    };
                    let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
                        if self.line.len() + rest.len() > limit {
                            return Err(if self.phase == Phase::ChunkSize {
                                ResponseError::Malformed("chunk-size line too long".into())
                            } else {
                                ResponseError::HeadTooLarge
                            });
                        }
                        self.line.extend_from_slice(rest);
                        return Ok(Decoded::NeedMore);
                    };
                    if self.line.len() + nl + 1 > limit {
                        return Err(if self.phase == Phase::ChunkSize {
                            ResponseError::Malformed("chunk-size line too long".into())
                        } else {
                            ResponseError::HeadTooLarge
                        });
                    }
                    self.line.extend_from_slice(&rest[..=nl]);
                    pos += nl + 1;
                    let mut line = std::mem::take(&mut self.line);
                    if self.phase == Phase::ChunkSize {
                        self.chunk_size(&line)?;
                    } else if line == b"\r\n" || line == b"\n" {
                        self.phase = Phase::Done;
                    } else {
                        self.trailer_bytes += line.len();
                        if self.trailer_bytes > MAX_RESPONSE_HEAD {
                            return Err(ResponseError::HeadTooLarge);
                        }
                    }
                    line.clear();
                    self.line = line;
                }
                Phase::ChunkData(left) => {
                    let take = left.min(rest.len() as u64) as usize;
                    self.resp.body.extend_from_slice(&rest[..take]);
                    pos += take;
                    let left = left - take as u64;
                    self.phase = if left == 0 {
                        Phase::ChunkEnd(0)
                    } else {
                        Phase::ChunkData(left)
                    };
                    if left > 0 {
                        return Ok(Decoded::NeedMore);
                    }
                }
                Phase::ChunkEnd(seen) => {
                    let Some(&b) = rest.first() else {
                        return Ok(Decoded::NeedMore);
                    };
                    let want = if seen == 0 { b'\r' } else { b'\n' };
                    if b != want {
                        return Err(ResponseError::Malformed(
                            "chunk not terminated by CRLF".into(),
                        ));
                    }
                    pos += 1;
                    self.phase = if seen == 0 {
                        Phase::ChunkEnd(1)
                    } else {
                        Phase::ChunkSize
                    };
                }
                Phase::Close => {
                    if rest.len() as u64 > self.room() {
                        return Err(ResponseError::BodyTooLarge {
                            limit: self.max_body,
                        });
                    }
                    self.resp.body.extend_from_slice(rest);
                    return Ok(Decoded::NeedMore);
                }
            }
        }
    }

    fn chunk_size(&mut self, line: &[u8]) -> Result<(), ResponseError> {
        if !line.first().is_some_and(u8::is_ascii_hexdigit) {
            return Err(ResponseError::Malformed("bad chunk size".into()));
        }
        let size = match httparse::parse_chunk_size(line) {
            Ok(httparse::Status::Complete((_, size))) => size,
            _ => return Err(ResponseError::Malformed("bad chunk size".into())),
        };
        if size == 0 {
            self.phase = Phase::Trailers;
        } else if size > self.room() {
            return Err(ResponseError::BodyTooLarge {
                limit: self.max_body,
            });
        } else {
            self.phase = Phase::ChunkData(size);
        }
        Ok(())
    }

    /// The stream ended: completes a close-delimited body, or fails with
    /// [`ResponseError::Truncated`].
    pub fn finish(&mut self) -> Result<Response, ResponseError> {
        match self.phase {
            Phase::Close | Phase::Done => Ok(self.done()),
            Phase::Finished => Err(ResponseError::Malformed("response already returned".into())),
            _ => Err(ResponseError::Truncated),
        }
    }

    /// Whether any byte of a response was decoded yet.
    pub fn started(&self) -> bool {
        !(self.phase == Phase::Head && self.line.is_empty() && self.interim == 0)
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

/// Decodes one response from the whole of `buf` at once (a convenience over
/// [`ResponseDecoder`]). `eof` says the peer closed the stream (which completes a
/// close-delimited body). `max_body` bounds the body.
pub fn decode_response(
    buf: &[u8],
    eof: bool,
    max_body: usize,
) -> Result<ResponseStatus, ResponseError> {
    let mut d = ResponseDecoder::new(max_body);
    match d.feed(buf)? {
        Decoded::Done(r, used) => Ok(ResponseStatus::Complete(r, used)),
        Decoded::NeedMore if eof => {
            let r = d.finish()?;
            Ok(ResponseStatus::Complete(r, buf.len()))
        }
        Decoded::NeedMore => Ok(ResponseStatus::Incomplete),
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

    fn feed_all(d: &mut ResponseDecoder, bytes: &[u8]) -> Result<Decoded, ResponseError> {
        d.feed(bytes)
    }

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
        assert_eq!(r.head.bearer_token(), None);
    }

    #[test]
    fn bearer_tokens() {
        let req = encode_request("GET", "h", "/metadata?key=k", None, Some("t0k"));
        let HeadStatus::Complete { head, .. } =
            decode_request_head(&req, &HttpLimits::default()).unwrap()
        else {
            panic!()
        };
        assert_eq!(head.bearer_token(), Some("t0k"));
        for (v, want) in [
            ("bearer abc", Some("abc")),
            ("Basic abc", None),
            ("Bearer", None),
            ("Bearer  ", None),
        ] {
            let req = format!("GET / HTTP/1.1\r\nAuthorization: {v}\r\n\r\n");
            let HeadStatus::Complete { head, .. } =
                decode_request_head(req.as_bytes(), &HttpLimits::default()).unwrap()
            else {
                panic!()
            };
            assert_eq!(head.bearer_token(), want, "{v}");
        }
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

    /// Overflowing and malformed lengths in requests are 400/413, never a panic.
    #[test]
    fn request_lengths_are_checked() {
        let l = HttpLimits::default();
        for cl in [
            "-1",
            "+5",
            "1 2",
            "0x10",
            "",
            "99999999999999999999999",
            "18446744073709551616",
        ] {
            let req = format!("PUT /metadata?key=k HTTP/1.1\r\nContent-Length: {cl}\r\n\r\n");
            assert_eq!(
                decode_request(req.as_bytes(), &l).unwrap_err().status(),
                400,
                "{cl}"
            );
        }
        let req = b"PUT /m HTTP/1.1\r\nContent-Length: 18446744073709551615\r\n\r\n";
        assert_eq!(decode_request(req, &l).unwrap_err().status(), 413);
        let req = b"PUT /m HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
        assert_eq!(decode_request(req, &l).unwrap_err().status(), 400);
        let req = b"PUT /m HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(decode_request(req, &l).unwrap_err().status(), 501);
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("X-{i}: v\r\n"))
            .collect();
        let req = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(
            decode_request(req.as_bytes(), &l).unwrap_err().status(),
            431
        );
        assert_eq!(
            decode_request(b"GARBAGE\r\n\r\n", &l).unwrap_err().status(),
            400
        );
    }

    /// A head trickled one byte at a time decodes as it would at once, and empty lines
    /// before a request are skipped.
    #[test]
    fn head_reader_is_incremental() {
        let req = encode_request("PUT", "h", "/metadata?key=a", Some(b"xyz"), Some("t"));
        let mut stream = b"\r\n\r\n".to_vec();
        stream.extend_from_slice(&req);
        let mut r = HeadReader::new();
        let mut buf = Vec::new();
        let mut got = None;
        for &b in &stream {
            buf.push(b);
            match r.poll(&mut buf, &HttpLimits::default()).unwrap() {
                HeadStatus::Incomplete => {}
                HeadStatus::Complete { head, len } => {
                    got = Some((head, len));
                    break;
                }
            }
        }
        let (head, len) = got.unwrap();
        assert_eq!(head.query("key"), Some("a"));
        assert_eq!(len, req.len() - 3);
        let mut r = HeadReader::new();
        let mut big = vec![b'a'; 20_000];
        assert_eq!(
            r.poll(&mut big, &HttpLimits::default())
                .unwrap_err()
                .status(),
            431
        );
    }

    #[test]
    fn decodes_chunked_responses() {
        let r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\nTrailer: 1\r\n\r\n";
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
        // Interim responses are skipped.
        let r = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let ResponseStatus::Complete(resp, _) = decode_response(r, false, 100).unwrap() else {
            panic!()
        };
        assert_eq!((resp.status, resp.body.as_slice()), (200, &b"ok"[..]));
    }

    /// What a hostile server can send: chunk sizes that overflow, lengths beyond the limit,
    /// endless heads, bad terminators. Each is an error, none a panic, none buffers past the
    /// limit.
    #[test]
    fn hostile_responses_are_errors() {
        let cases: &[(&[u8], &str)] = &[
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\nFFFFFFFFFFFFFFFF\r\n",
                "exceeds",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFF\r\n",
                "chunk size",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n",
                "chunk size",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\r\n",
                "chunk size",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY",
                "CRLF",
            ),
            (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "Content-Length"),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n",
                "Content-Length",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551615\r\n\r\n",
                "exceeds",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                "conflicting",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                "both",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                "Transfer-Encoding",
            ),
            (b"HTTP/1.1 999 What\r\n\r\n", "status"),
            (b"SMTP/1.1 200 OK\r\n\r\n", "malformed"),
        ];
        for (bytes, want) in cases {
            let e = decode_response(bytes, false, 1024).unwrap_err();
            assert!(
                e.to_string().contains(want),
                "{}: {e}",
                String::from_utf8_lossy(bytes)
            );
        }
        // An endless head fails at the limit.
        let mut d = ResponseDecoder::new(1024);
        assert_eq!(d.feed(b"HTTP/1.1 200 OK\r\n").unwrap(), Decoded::NeedMore);
        let mut err = None;
        for _ in 0..100_000 {
            match d.feed(b"X-Endless: header\r\n") {
                Ok(Decoded::NeedMore) => {}
                Ok(other) => panic!("{other:?}"),
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        assert_eq!(err, Some(ResponseError::HeadTooLarge));
        // An endless chunk-size line (extensions) fails at its limit.
        let mut d = ResponseDecoder::new(1024);
        d.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;")
            .unwrap();
        let e = (0..10_000).find_map(|_| d.feed(b"xxxxxxxx").err()).unwrap();
        assert!(e.to_string().contains("too long"), "{e}");
        // Endless trailers too.
        let mut d = ResponseDecoder::new(1024);
        d.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n")
            .unwrap();
        assert!((0..100_000).any(|_| d.feed(b"T: v\r\n").is_err()));
        // A close-delimited body past the limit.
        let mut d = ResponseDecoder::new(10);
        d.feed(b"HTTP/1.1 200 OK\r\n\r\n0123456789").unwrap();
        assert!(d.feed(b"x").is_err());
        // Endless interim responses.
        let mut d = ResponseDecoder::new(10);
        assert!((0..100).any(|_| d.feed(b"HTTP/1.1 100 Continue\r\n\r\n").is_err()));
        // Truncation.
        let mut d = ResponseDecoder::new(10);
        assert!(!d.started());
        d.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
            .unwrap();
        assert!(d.started());
        assert_eq!(d.finish().unwrap_err(), ResponseError::Truncated);
    }

    /// Decoding is linear: a 4 MiB chunked body fed 1 KiB at a time does not re-decode what
    /// came before (the old decoder did, quadratically).
    #[test]
    fn decoding_is_incremental() {
        let body = vec![b'x'; 4 << 20];
        let mut wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for c in body.chunks(1000) {
            wire.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
            wire.extend_from_slice(c);
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(b"0\r\n\r\n");
        let t = std::time::Instant::now();
        let mut d = ResponseDecoder::new(8 << 20);
        let mut done = None;
        for piece in wire.chunks(1024) {
            if let Decoded::Done(r, _) = d.feed(piece).unwrap() {
                done = Some(r);
            }
        }
        assert_eq!(done.unwrap().body, body);
        assert!(
            t.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn watch_events_with_hostile_lengths_are_errors() {
        let mut b = 1u64.to_le_bytes().to_vec();
        b.push(1);
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_events(&b).is_err());
        let mut b = 1u64.to_le_bytes().to_vec();
        b.push(9);
        b.extend_from_slice(&0u32.to_le_bytes());
        assert!(decode_events(&b).is_err());
    }

    proptest! {
        #[test]
        fn request_roundtrip(key in "[ -~]{0,40}", body in proptest::collection::vec(any::<u8>(), 0..300),
                             split in 0usize..400) {
            let q = format!("/metadata?key={}", percent_encode(&key));
            let bytes = encode_request("PUT", "h:1", &q, Some(&body), None);
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
            let mut buf = bytes.clone();
            let _ = HeadReader::new().poll(&mut buf, &limits);
        }

        #[test]
        fn response_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600), eof: bool) {
            if let Ok(ResponseStatus::Complete(r, used)) = decode_response(&bytes, eof, 128) {
                prop_assert!(used <= bytes.len());
                prop_assert!(r.body.len() <= 128);
            }
        }

        /// Fed in any pieces, a response decodes as it does at once.
        #[test]
        fn response_pieces_match_whole(body in proptest::collection::vec(any::<u8>(), 0..400),
                                       chunked: bool, cuts in proptest::collection::vec(1usize..50, 0..20)) {
            let mut wire = if chunked {
                let mut w = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
                for c in body.chunks(37) {
                    w.extend_from_slice(format!("{:X};ext=1\r\n", c.len()).as_bytes());
                    w.extend_from_slice(c);
                    w.extend_from_slice(b"\r\n");
                }
                w.extend_from_slice(b"0\r\n\r\n");
                w
            } else {
                let mut w = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
                w.extend_from_slice(&body);
                w
            };
            wire.extend_from_slice(b"TRAILING");
            let ResponseStatus::Complete(whole, used) = decode_response(&wire, false, 1024).unwrap() else {
                panic!("incomplete")
            };
            prop_assert_eq!(used, wire.len() - 8);
            prop_assert_eq!(&whole.body, &body);
            let mut d = ResponseDecoder::new(1024);
            let mut at = 0;
            let mut got = None;
            for c in cuts.iter().copied().chain(std::iter::repeat(64)) {
                let end = (at + c).min(wire.len());
                match feed_all(&mut d, &wire[at..end]).unwrap() {
                    Decoded::NeedMore => {}
                    Decoded::Done(r, n) => {
                        prop_assert_eq!(at + n, used);
                        got = Some(r);
                        break;
                    }
                }
                at = end;
                prop_assert!(at < wire.len());
            }
            prop_assert_eq!(got.unwrap(), whole);
        }

        #[test]
        fn events_roundtrip(evs in proptest::collection::vec(
            (any::<u64>(), "[a-z/]{0,20}", proptest::option::of(proptest::collection::vec(any::<u8>(), 0..50))), 0..10)) {
            let evs: Vec<WireEvent> = evs.into_iter().map(|(revision, key, value)| WireEvent { revision, key, value }).collect();
            prop_assert_eq!(decode_events(&encode_events(&evs)).unwrap(), evs);
        }
    }
}
