//! The metadata conformance suite, run against every backend compiled in.
//!
//! etcd and redis need real servers: `MOONCAKE_TEST_ETCD=etcd://127.0.0.1:P` and
//! `MOONCAKE_TEST_REDIS=redis://127.0.0.1:P` (`cargo xtask test` starts them and sets these).

#[allow(unused_imports)]
use std::sync::Arc;
#[allow(unused_imports)]
use std::time::Duration;

#[allow(unused_imports)]
use mooncake_core::{EmbeddedMetadataStore, Result};
#[allow(unused_imports)]
use mooncake_testkit::metadata::{Harness, Liveness, Node};
use mooncake_testkit::metadata_suite;

/// TTL used by the liveness backends in this suite.
#[allow(dead_code)]
const TTL: Duration = Duration::from_secs(2);

struct Embedded(EmbeddedMetadataStore);

impl Harness for Embedded {
    fn name(&self) -> &str {
        "embedded"
    }
    fn node(&self, hint: &str) -> Result<Node> {
        Ok(Node {
            store: Arc::new(self.0.clone()),
            segment: hint.to_string(),
        })
    }
    fn liveness(&self) -> Liveness {
        Liveness::None
    }
}

metadata_suite!(embedded, || Some(Embedded(EmbeddedMetadataStore::new())));

#[cfg(all(feature = "http", feature = "http-server"))]
struct Http(mooncake_metadata::http::HttpMetadataServer);

#[cfg(all(feature = "http", feature = "http-server"))]
impl Harness for Http {
    fn name(&self) -> &str {
        "http"
    }
    fn node(&self, hint: &str) -> Result<Node> {
        use mooncake_metadata::{HttpConfig, HttpMetadataStore};
        let s = HttpMetadataStore::new(&self.0.url(), HttpConfig::default().with_ttl(Some(TTL)))?;
        Ok(Node {
            store: Arc::new(s),
            segment: hint.to_string(),
        })
    }
    fn liveness(&self) -> Liveness {
        Liveness::Ttl(TTL)
    }
}

#[cfg(all(feature = "http", feature = "http-server"))]
metadata_suite!(http, || {
    use mooncake_metadata::http::{HttpMetadataServer, HttpServerConfig};
    Some(Http(
        HttpMetadataServer::bind("127.0.0.1:0", HttpServerConfig::default()).unwrap(),
    ))
});

/// The cluster secret of the authenticated harnesses.
#[allow(dead_code)]
fn secret() -> mooncake_core::ClusterSecret {
    mooncake_core::ClusterSecret::from_bytes(b"conformance secret, 32 bytes long").unwrap()
}

/// The HTTP backend with a token on the server (derived from the cluster secret) and the
/// secret on every client.
#[cfg(all(feature = "http", feature = "http-server"))]
struct HttpAuth(mooncake_metadata::http::HttpMetadataServer);

#[cfg(all(feature = "http", feature = "http-server"))]
impl Harness for HttpAuth {
    fn name(&self) -> &str {
        "http+token"
    }
    fn node(&self, hint: &str) -> Result<Node> {
        use mooncake_metadata::{HttpConfig, HttpMetadataStore};
        let s = HttpMetadataStore::new(
            &self.0.url(),
            HttpConfig::default()
                .with_ttl(Some(TTL))
                .with_cluster_secret(Some(&secret())),
        )?;
        Ok(Node {
            store: Arc::new(s),
            segment: hint.to_string(),
        })
    }
    fn liveness(&self) -> Liveness {
        Liveness::Ttl(TTL)
    }
}

#[cfg(all(feature = "http", feature = "http-server"))]
metadata_suite!(http_auth, || {
    use mooncake_metadata::http::{HttpMetadataServer, HttpServerConfig};
    let token = mooncake_metadata::auth::metadata_token(&secret());
    Some(HttpAuth(
        HttpMetadataServer::bind(
            "127.0.0.1:0",
            HttpServerConfig::default().with_token(Some(token)),
        )
        .unwrap(),
    ))
});

/// The peer handshake with every node holding the cluster secret.
#[cfg(feature = "p2p")]
struct P2pAuth;

#[cfg(feature = "p2p")]
impl Harness for P2pAuth {
    fn name(&self) -> &str {
        "p2p+secret"
    }
    fn node(&self, _hint: &str) -> Result<Node> {
        use mooncake_metadata::{P2pConfig, P2pHandshakeStore};
        let s = P2pHandshakeStore::bind(
            "127.0.0.1",
            0,
            P2pConfig::default().with_cluster_secret(Some(secret())),
        )?;
        let segment = s.local_name().to_string();
        Ok(Node {
            store: Arc::new(s),
            segment,
        })
    }
    fn liveness(&self) -> Liveness {
        Liveness::Unreachable
    }
    fn remote_watch(&self) -> bool {
        false
    }
}

#[cfg(feature = "p2p")]
metadata_suite!(p2p_auth, || Some(P2pAuth));

#[cfg(feature = "p2p")]
struct P2p;

#[cfg(feature = "p2p")]
impl Harness for P2p {
    fn name(&self) -> &str {
        "p2p"
    }
    fn node(&self, _hint: &str) -> Result<Node> {
        use mooncake_metadata::{P2pConfig, P2pHandshakeStore};
        let s = P2pHandshakeStore::bind("127.0.0.1", 0, P2pConfig::default())?;
        let segment = s.local_name().to_string();
        Ok(Node {
            store: Arc::new(s),
            segment,
        })
    }
    fn liveness(&self) -> Liveness {
        Liveness::Unreachable
    }
    fn remote_watch(&self) -> bool {
        false
    }
}

#[cfg(feature = "p2p")]
metadata_suite!(p2p, || Some(P2p));

#[cfg(feature = "etcd")]
struct Etcd(String);

#[cfg(feature = "etcd")]
impl Harness for Etcd {
    fn name(&self) -> &str {
        "etcd"
    }
    fn node(&self, hint: &str) -> Result<Node> {
        use mooncake_metadata::{EtcdConfig, EtcdMetadataStore};
        let s = EtcdMetadataStore::connect(&self.0, EtcdConfig::default().with_ttl(Some(TTL)))?;
        Ok(Node {
            store: Arc::new(s),
            segment: hint.to_string(),
        })
    }
    fn liveness(&self) -> Liveness {
        Liveness::Ttl(TTL)
    }
}

#[cfg(feature = "etcd")]
metadata_suite!(etcd, || mooncake_testkit::metadata::service_url(
    "MOONCAKE_TEST_ETCD"
)
.map(Etcd));

#[cfg(feature = "redis")]
struct Redis(String);

#[cfg(feature = "redis")]
impl Harness for Redis {
    fn name(&self) -> &str {
        "redis"
    }
    fn node(&self, hint: &str) -> Result<Node> {
        use mooncake_metadata::{RedisConfig, RedisMetadataStore};
        let s = RedisMetadataStore::connect(&self.0, RedisConfig::default().with_ttl(Some(TTL)))?;
        Ok(Node {
            store: Arc::new(s),
            segment: hint.to_string(),
        })
    }
    fn liveness(&self) -> Liveness {
        Liveness::Ttl(TTL)
    }
}

#[cfg(feature = "redis")]
metadata_suite!(redis, || mooncake_testkit::metadata::service_url(
    "MOONCAKE_TEST_REDIS"
)
.map(Redis));
