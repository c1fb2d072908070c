//! The one error type of mooncake-rs: a kind, a message, key/value context and a retry hint.

use std::fmt;

/// What went wrong, coarsely. Callers branch on this; the message says the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// An argument was out of its domain (zero length, unknown opcode, batch overflow, …).
    InvalidArgument,
    /// A named segment is not published in the metadata store.
    SegmentNotFound,
    /// A local address range is not inside memory registered with the engine.
    NotRegistered,
    /// The remote side refused the range: outside its registered memory, or not permitted.
    RemoteAccess,
    /// The peer could not be reached, or its connection broke.
    PeerUnreachable,
    /// The operation did not make progress before its deadline.
    Timeout,
    /// A peer sent bytes that do not follow the wire protocol.
    Protocol,
    /// The operation is not supported by this build or this backend.
    Unsupported,
    /// The configuration is wrong (bad URL, missing feature, bad value).
    Config,
    /// The metadata backend failed.
    Metadata,
    /// The object is closed or shutting down.
    Closed,
    /// The resource is busy (for example freeing a batch with unfinished tasks).
    Busy,
    /// A key or object does not exist.
    NotFound,
    /// An operating-system I/O error.
    Io,
}

impl ErrorKind {
    /// A short stable name, used in `Display`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidArgument => "invalid argument",
            Self::SegmentNotFound => "segment not found",
            Self::NotRegistered => "memory not registered",
            Self::RemoteAccess => "remote access denied",
            Self::PeerUnreachable => "peer unreachable",
            Self::Timeout => "timed out",
            Self::Protocol => "protocol error",
            Self::Unsupported => "unsupported",
            Self::Config => "configuration error",
            Self::Metadata => "metadata error",
            Self::Closed => "closed",
            Self::Busy => "busy",
            Self::NotFound => "not found",
            Self::Io => "I/O error",
        }
    }
}

/// The error type of every mooncake-rs library.
///
/// It is `Clone` so that one failure can be handed to every waiter of a batch.
#[derive(Clone, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    context: Vec<(&'static str, String)>,
    temporary: bool,
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` with a human-readable message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        let temporary = matches!(kind, ErrorKind::PeerUnreachable | ErrorKind::Timeout);
        Self {
            kind,
            message: message.into(),
            context: Vec::new(),
            temporary,
        }
    }

    /// Adds a key/value pair of context (`peer`, `segment`, `addr`, …).
    pub fn with_context(mut self, key: &'static str, value: impl fmt::Display) -> Self {
        self.context.push((key, value.to_string()));
        self
    }

    /// Overrides the retry hint.
    pub fn with_temporary(mut self, temporary: bool) -> Self {
        self.temporary = temporary;
        self
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message, without kind or context.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The context pairs in the order they were added.
    pub fn context(&self) -> &[(&'static str, String)] {
        &self.context
    }

    /// Whether the same operation may succeed on another path or later.
    pub fn is_temporary(&self) -> bool {
        self.temporary
    }

    /// Shorthand for [`ErrorKind::InvalidArgument`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }

    /// Wraps an I/O error, mapping timeouts and connection errors to their kinds.
    pub fn io(context: &str, err: &std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        let kind = match err.kind() {
            K::TimedOut | K::WouldBlock => ErrorKind::Timeout,
            K::ConnectionRefused
            | K::ConnectionReset
            | K::ConnectionAborted
            | K::BrokenPipe
            | K::NotConnected
            | K::UnexpectedEof
            | K::HostUnreachable
            | K::NetworkUnreachable
            | K::NetworkDown
            | K::AddrNotAvailable => ErrorKind::PeerUnreachable,
            _ => ErrorKind::Io,
        };
        Self::new(kind, format!("{context}: {err}"))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.as_str(), self.message)?;
        if !self.context.is_empty() {
            f.write_str(" (")?;
            for (i, (k, v)) in self.context.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{k}={v}")?;
            }
            f.write_str(")")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for Error {}

impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        use std::io::ErrorKind as K;
        let kind = match e.kind {
            ErrorKind::Timeout => K::TimedOut,
            ErrorKind::PeerUnreachable => K::ConnectionAborted,
            ErrorKind::InvalidArgument | ErrorKind::Config => K::InvalidInput,
            ErrorKind::NotFound | ErrorKind::SegmentNotFound => K::NotFound,
            ErrorKind::RemoteAccess | ErrorKind::NotRegistered => K::PermissionDenied,
            ErrorKind::Protocol => K::InvalidData,
            ErrorKind::Unsupported => K::Unsupported,
            _ => K::Other,
        };
        Self::new(kind, e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_format_is_pinned() {
        let e = Error::new(ErrorKind::RemoteAccess, "range outside registered memory")
            .with_context("peer", "node-a")
            .with_context("addr", "0x1000");
        assert_eq!(
            e.to_string(),
            "remote access denied: range outside registered memory (peer=node-a, addr=0x1000)"
        );
        assert!(!e.is_temporary());
        assert!(Error::new(ErrorKind::Timeout, "x").is_temporary());
    }

    #[test]
    fn io_errors_map_to_kinds() {
        let e = Error::io(
            "connect",
            &std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        );
        assert_eq!(e.kind(), ErrorKind::PeerUnreachable);
        let e = Error::io("read", &std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert_eq!(e.kind(), ErrorKind::Timeout);
    }
}
