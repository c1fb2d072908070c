//! Ready-made setups for tools (`mooncake bench metadata`, `mooncake metadata-server`),
//! available whatever features are on: a backend that is not compiled in gives the same
//! "rebuild with --features …" error as [`crate::connect`].

use std::any::Any;
use std::sync::Arc;

use mooncake_core::{
    ClusterSecret, EmbeddedMetadataStore, Error, ErrorKind, MetadataStore, Result,
};

use crate::{Backend, not_compiled};

/// A writer node and a reader node of one backend (separate stores, as two processes would
/// have), and the segment name the writer may publish.
pub struct LoopbackPair {
    /// The node that publishes.
    pub writer: Arc<dyn MetadataStore>,
    /// The node that looks up.
    pub reader: Arc<dyn MetadataStore>,
    /// The segment name the writer may publish (`host:port` for the peer handshake).
    pub segment: String,
    /// Where the reader's requests go, for reports.
    pub target: String,
    _guard: Option<Box<dyn Any + Send>>,
}

impl std::fmt::Debug for LoopbackPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoopbackPair")
            .field("segment", &self.segment)
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// Sets up a [`LoopbackPair`] of `backend`, with the credentials the environment configures
/// (`MC_CLUSTER_SECRET_FILE`, `MC_CLUSTER_SECRET`, `MC_METADATA_TOKEN`).
///
/// - embedded: two handles of one in-process store;
/// - http: `url`, or an in-process `HttpMetadataServer` on a free loopback port
///   when `url` is `None` (needs feature `http-server`);
/// - p2p: two handshake stores on free loopback ports;
/// - etcd, redis: `url` is required.
pub fn loopback_pair(backend: Backend, url: Option<&str>) -> Result<LoopbackPair> {
    loopback_pair_with(backend, url, None)
}

/// [`loopback_pair`] with an explicit cluster secret: `Some(None)` for none, `Some(Some(s))`
/// for `s` (the HTTP server requires the token derived from it and the P2P stores
/// authenticate each other with it), `None` for the environment's. etcd and redis ignore it.
pub fn loopback_pair_with(
    backend: Backend,
    url: Option<&str>,
    secret: Option<Option<ClusterSecret>>,
) -> Result<LoopbackPair> {
    if !backend.is_compiled_in() {
        return Err(not_compiled("this tool", backend));
    }
    #[cfg(not(any(feature = "http", feature = "p2p")))]
    let _ = secret;
    let segment = format!("bench-{}", std::process::id());
    let need_url = |name: &str| {
        url.map(str::to_string).ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                format!("the {name} backend needs --url (e.g. {name}://127.0.0.1:PORT)"),
            )
        })
    };
    match backend {
        Backend::Embedded => {
            let s = EmbeddedMetadataStore::new();
            Ok(LoopbackPair {
                writer: Arc::new(s.clone()),
                reader: Arc::new(s),
                segment,
                target: "in-process".into(),
                _guard: None,
            })
        }
        #[cfg(feature = "http")]
        Backend::Http => {
            let token = match &secret {
                Some(s) => s.as_ref().map(crate::auth::metadata_token),
                None => crate::auth::metadata_token_from_env()?,
            };
            let (url, guard): (String, Option<Box<dyn Any + Send>>) = match url {
                Some(u) => (u.to_string(), None),
                None => start_http_server(token.clone())?,
            };
            let client = || -> Result<Arc<dyn MetadataStore>> {
                let s = crate::HttpMetadataStore::new(
                    &url,
                    crate::HttpConfig::default().with_token(token.clone()),
                )?;
                mooncake_core::block_on(s.check())?;
                Ok(Arc::new(s))
            };
            Ok(LoopbackPair {
                writer: client()?,
                reader: client()?,
                segment,
                target: url.clone(),
                _guard: guard,
            })
        }
        #[cfg(feature = "p2p")]
        Backend::P2pHandshake => {
            use crate::p2p::{P2pConfig, P2pHandshakeStore};
            let cfg = match secret {
                Some(s) => P2pConfig::default().with_cluster_secret(s),
                None => P2pConfig::default(),
            };
            let w = P2pHandshakeStore::bind("127.0.0.1", 0, cfg.clone())?;
            let r = P2pHandshakeStore::bind("127.0.0.1", 0, cfg)?;
            let segment = w.local_name().to_string();
            Ok(LoopbackPair {
                target: segment.clone(),
                writer: Arc::new(w),
                reader: Arc::new(r),
                segment,
                _guard: None,
            })
        }
        // `connect` checks that the backend was compiled in (done above, too).
        Backend::Etcd | Backend::Redis => {
            let u = need_url(if backend == Backend::Etcd {
                "etcd"
            } else {
                "redis"
            })?;
            Ok(LoopbackPair {
                writer: crate::connect(&u)?,
                reader: crate::connect(&u)?,
                segment,
                target: u,
                _guard: None,
            })
        }
        #[allow(unreachable_patterns)]
        other => Err(not_compiled("this tool", other)),
    }
}

#[cfg(feature = "http")]
fn start_http_server(token: Option<String>) -> Result<(String, Option<Box<dyn Any + Send>>)> {
    #[cfg(feature = "http-server")]
    {
        let s = crate::http::HttpMetadataServer::bind(
            "127.0.0.1:0",
            crate::http::HttpServerConfig::default().with_token(token),
        )?;
        Ok((s.url(), Some(Box::new(s))))
    }
    #[cfg(not(feature = "http-server"))]
    {
        let _ = token;
        Err(Error::new(
            ErrorKind::Config,
            "no --url given and this build has no HTTP metadata server: pass --url http://host:port/metadata \
             or rebuild with --features http-server",
        ))
    }
}

/// Runs the HTTP metadata server on `bind` (e.g. `127.0.0.1:8080`) until the process ends,
/// refusing bodies above `max_body` bytes with 413 and requiring the token the environment
/// configures ([`crate::auth::metadata_token_from_env`]). Prints the URL on stderr.
pub fn serve_http(bind: &str, max_body: usize) -> Result<()> {
    #[cfg(feature = "http-server")]
    {
        let cfg = crate::http::HttpServerConfig::from_env()?.with_max_body(max_body);
        let s = crate::http::HttpMetadataServer::bind(bind, cfg)?;
        eprintln!(
            "mooncake metadata server listening on {} (point metadata_server at {})",
            s.local_addr(),
            s.url()
        );
        s.wait();
        Ok(())
    }
    #[cfg(not(feature = "http-server"))]
    {
        let _ = (bind, max_body);
        Err(Error::new(
            ErrorKind::Config,
            "this build has no HTTP metadata server: rebuild with --features http-server \
             (mooncake-metadata/http-server)",
        ))
    }
}
