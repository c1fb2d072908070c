//! The TCP transport passes the transport conformance suite (mooncake-testkit).

use mooncake_core::TransportBuilder;
use mooncake_testkit::{TransportHarness, transport_suite};
use mooncake_transport_tcp::TcpConfig;

struct Tcp;

impl TransportHarness for Tcp {
    fn name(&self) -> &str {
        "tcp"
    }
    fn builder(&self) -> Box<dyn TransportBuilder> {
        // Small stripes and slices so that striping and slicing are exercised.
        Box::new(
            TcpConfig::new()
                .with_stripe_min(64 << 10)
                .with_max_slice(1 << 20)
                .with_conns_per_path(3),
        )
    }
}

transport_suite!(tcp, || Some(Tcp));

/// The same suite with a cluster secret on every engine (the hello's challenge-response).
struct TcpAuth;

impl TransportHarness for TcpAuth {
    fn name(&self) -> &str {
        "tcp+secret"
    }
    fn builder(&self) -> Box<dyn TransportBuilder> {
        Tcp.builder()
    }
    fn secret(&self) -> Option<mooncake_core::ClusterSecret> {
        Some(mooncake_core::ClusterSecret::from_bytes(b"conformance-suite-secret").unwrap())
    }
}

transport_suite!(tcp_auth, || Some(TcpAuth));

/// The same suite over TLS, with a cluster secret (proofs bound to the TLS session).
#[cfg(feature = "tls")]
struct TcpTls;

#[cfg(feature = "tls")]
impl TransportHarness for TcpTls {
    fn name(&self) -> &str {
        "tcp+tls"
    }
    fn builder(&self) -> Box<dyn TransportBuilder> {
        Box::new(
            TcpConfig::new()
                .with_stripe_min(64 << 10)
                .with_max_slice(1 << 20)
                .with_conns_per_path(3)
                .with_tls(true),
        )
    }
    fn secret(&self) -> Option<mooncake_core::ClusterSecret> {
        TcpAuth.secret()
    }
}

#[cfg(feature = "tls")]
transport_suite!(tcp_tls, || Some(TcpTls));
