#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

use std::sync::Arc;

pub use mooncake_core::{EmbeddedMetadataStore, MetadataStore};
use mooncake_core::{Error, ErrorKind, Result};

#[cfg(any(feature = "http", feature = "p2p"))]
mod net;
#[cfg(any(feature = "http-server", feature = "p2p"))]
mod serve;

pub mod auth;

#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub mod http;
#[cfg(feature = "http")]
pub use http::{HttpConfig, HttpMetadataStore};

#[cfg(feature = "p2p")]
#[cfg_attr(docsrs, doc(cfg(feature = "p2p")))]
pub mod p2p;
#[cfg(feature = "p2p")]
pub use p2p::{NotifyHandler, P2pConfig, P2pHandshakeStore};

#[cfg(feature = "etcd")]
#[cfg_attr(docsrs, doc(cfg(feature = "etcd")))]
pub mod etcd;
#[cfg(feature = "etcd")]
pub use etcd::{EtcdConfig, EtcdMetadataStore};

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;
#[cfg(feature = "redis")]
pub use redis::{RedisConfig, RedisMetadataStore};

pub mod loopback;
pub use loopback::{LoopbackPair, loopback_pair, loopback_pair_with, serve_http};

/// Default request-body limit of the HTTP metadata server (64 MiB).
pub const HTTP_DEFAULT_MAX_BODY: usize = 64 * 1024 * 1024;

/// The backend a metadata URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Backend {
    /// In-process (empty URL).
    Embedded,
    /// `http://…`.
    Http,
    /// `P2PHANDSHAKE`.
    P2pHandshake,
    /// `etcd://…` or a bare `host:port` (Mooncake's etcd default).
    Etcd,
    /// `redis://…`.
    Redis,
}

impl Backend {
    /// The backend of `url`, as Mooncake interprets metadata connection strings.
    pub fn of(url: &str) -> Result<Self> {
        let u = url.trim();
        if u.is_empty() {
            Ok(Self::Embedded)
        } else if u.eq_ignore_ascii_case("P2PHANDSHAKE") {
            Ok(Self::P2pHandshake)
        } else if u.starts_with("http://") || u.starts_with("https://") {
            Ok(Self::Http)
        } else if u.starts_with("etcd://") {
            Ok(Self::Etcd)
        } else if u.starts_with("redis://") || u.starts_with("rediss://") {
            Ok(Self::Redis)
        } else if !u.contains("://") && u.contains(':') {
            // Mooncake treats a bare "host:port" as etcd.
            Ok(Self::Etcd)
        } else {
            Err(Error::new(
                ErrorKind::Config,
                format!(
                    "unknown metadata URL {url:?}: use etcd://host:2379, redis://host:6379, \
                     http://host:port/metadata, P2PHANDSHAKE, or nothing for the embedded store"
                ),
            ))
        }
    }

    /// The cargo feature that compiles this backend in.
    pub fn feature(self) -> Option<&'static str> {
        match self {
            Self::Embedded => None,
            Self::Http => Some("http"),
            Self::P2pHandshake => Some("p2p"),
            Self::Etcd => Some("etcd"),
            Self::Redis => Some("redis"),
        }
    }

    /// Whether this build includes the backend.
    pub fn is_compiled_in(self) -> bool {
        match self {
            Self::Embedded => true,
            Self::Http => cfg!(feature = "http"),
            Self::P2pHandshake => cfg!(feature = "p2p"),
            Self::Etcd => cfg!(feature = "etcd"),
            Self::Redis => cfg!(feature = "redis"),
        }
    }
}

fn not_compiled(what: &str, backend: Backend) -> Error {
    let f = backend.feature().unwrap_or_default();
    let extra = if backend == Backend::Etcd {
        " (etcd also needs `protoc`: apt-get install protobuf-compiler)"
    } else {
        ""
    };
    Error::new(
        ErrorKind::Config,
        format!(
            "{what} needs the {backend:?} metadata backend, but this build was made without the `{f}` feature: \
             rebuild with --features {f}{extra}"
        ),
    )
}

/// Connects to the metadata backend `url` names and checks that it answers.
///
/// - `""` → the process-wide embedded store;
/// - `http://host:port/metadata` → `HttpMetadataStore` (default `HttpConfig`: it sends the
///   bearer token `MC_METADATA_TOKEN`, or the one derived from the cluster secret
///   `MC_CLUSTER_SECRET_FILE`/`MC_CLUSTER_SECRET`);
/// - `P2PHANDSHAKE` → a `P2pHandshakeStore` on `127.0.0.1` and a free port, authenticating
///   peers with the environment's cluster secret when one is set (use
///   `P2pHandshakeStore::bind` to choose the host and port, and `mooncake::p2p_engine_builder`);
/// - `etcd://h1:2379,h2:2379` or `h:2379` → `EtcdMetadataStore`;
/// - `redis://[user:pass@]host:6379[/db]` → `RedisMetadataStore`.
///
/// A backend that is not compiled in, or a server that does not answer, gives a
/// [`ErrorKind::Config`] or [`ErrorKind::PeerUnreachable`] error that says what to do.
/// This call blocks (it is for setup); the stores it returns are async and runtime-agnostic.
pub fn connect(url: &str) -> Result<Arc<dyn MetadataStore>> {
    let backend = Backend::of(url)?;
    if !backend.is_compiled_in() {
        return Err(not_compiled(&format!("metadata URL {url:?}"), backend));
    }
    match backend {
        Backend::Embedded => Ok(Arc::new(EmbeddedMetadataStore::global())),
        #[cfg(feature = "http")]
        Backend::Http => {
            let s = HttpMetadataStore::new(url.trim(), HttpConfig::default())?;
            mooncake_core::block_on(s.check()).map_err(|e| unreachable(url, e))?;
            Ok(Arc::new(s))
        }
        #[cfg(feature = "p2p")]
        Backend::P2pHandshake => Ok(Arc::new(P2pHandshakeStore::bind(
            "127.0.0.1",
            0,
            P2pConfig::default(),
        )?)),
        #[cfg(feature = "etcd")]
        Backend::Etcd => Ok(Arc::new(
            EtcdMetadataStore::connect(url.trim(), EtcdConfig::default())
                .map_err(|e| unreachable(url, e))?,
        )),
        #[cfg(feature = "redis")]
        Backend::Redis => Ok(Arc::new(
            RedisMetadataStore::connect(url.trim(), RedisConfig::default())
                .map_err(|e| unreachable(url, e))?,
        )),
        #[allow(unreachable_patterns)]
        other => Err(not_compiled(&format!("metadata URL {url:?}"), other)),
    }
}

#[allow(dead_code)]
fn unreachable(url: &str, e: Error) -> Error {
    if e.kind() == ErrorKind::Config {
        return e;
    }
    Error::new(
        ErrorKind::PeerUnreachable,
        format!(
            "cannot reach the metadata service at {url}: {} — is it running, and is the URL right?",
            e.message()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_pick_backends() {
        assert_eq!(Backend::of("").unwrap(), Backend::Embedded);
        assert_eq!(Backend::of("P2PHANDSHAKE").unwrap(), Backend::P2pHandshake);
        assert_eq!(
            Backend::of("http://h:8080/metadata").unwrap(),
            Backend::Http
        );
        assert_eq!(Backend::of("etcd://h:2379").unwrap(), Backend::Etcd);
        assert_eq!(Backend::of("10.0.0.1:2379").unwrap(), Backend::Etcd);
        assert_eq!(Backend::of("redis://h:6379").unwrap(), Backend::Redis);
        assert_eq!(
            Backend::of("ftp://x").unwrap_err().kind(),
            ErrorKind::Config
        );
    }

    #[test]
    fn missing_features_say_how_to_fix() {
        for (url, b) in [
            ("etcd://127.0.0.1:1", Backend::Etcd),
            ("redis://127.0.0.1:1", Backend::Redis),
        ] {
            if !b.is_compiled_in() {
                let e = connect(url).err().expect("not compiled in");
                assert_eq!(e.kind(), ErrorKind::Config);
                assert!(
                    e.to_string()
                        .contains(&format!("--features {}", b.feature().unwrap())),
                    "{e}"
                );
            }
        }
        assert!(connect("").unwrap().scheme() == "embedded");
        // The message itself, whatever this build includes.
        let e = not_compiled("metadata URL \"etcd://h:1\"", Backend::Etcd).to_string();
        assert!(
            e.contains("without the `etcd` feature")
                && e.contains("--features etcd")
                && e.contains("protoc"),
            "{e}"
        );
        let e = not_compiled("x", Backend::Redis).to_string();
        assert!(
            e.contains("--features redis") && !e.contains("protoc"),
            "{e}"
        );
    }

    #[cfg(feature = "http")]
    #[test]
    fn unreachable_http_server_says_so() {
        // Bind and drop a listener to get a port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = connect(&format!("http://127.0.0.1:{port}/metadata"))
            .err()
            .expect("nobody listens");
        assert_eq!(e.kind(), ErrorKind::PeerUnreachable, "{e}");
        assert!(
            e.to_string().contains("cannot reach the metadata service"),
            "{e}"
        );
    }
}
