//! The RDMA transport passes the transport conformance suite (mooncake-testkit), on real
//! verbs devices: `cargo xtask rxe` runs it in the soft-RoCE VM. On a host built without
//! `MOONCAKE_TEST_RDMA=1` every case is ignored with the reason.
//!
//! The VM's rxe devices loop back only to themselves, so engines use
//! [`PathPolicy::SameRailOnly`] (rxe0 ↔ rxe0, rxe1 ↔ rxe1).

use std::time::Duration;

use mooncake_core::TransportBuilder;
use mooncake_testkit::{TransportHarness, transport_suite};
use mooncake_transport_rdma::{PathPolicy, RdmaConfig, device_names, rdma_tests_enabled};

struct Rdma;

impl TransportHarness for Rdma {
    fn name(&self) -> &str {
        "rdma"
    }
    fn builder(&self) -> Box<dyn TransportBuilder> {
        Box::new(RdmaConfig::new().with_path_policy(PathPolicy::SameRailOnly))
    }
    fn timeout(&self) -> Duration {
        // Soft-RoCE under TCG moves ~35 MB/s per device, shared by every process of the
        // 2-vCPU guest: the suite's 64 MiB rounds to a peer process need several seconds.
        Duration::from_secs(10)
    }
    fn needs_peer_cpu(&self) -> bool {
        // One-sided READ/WRITE: a frozen peer's NIC keeps serving its memory.
        false
    }
}

fn rdma() -> Option<Rdma> {
    assert!(
        rdma_tests_enabled(),
        "built for RDMA tests but MOONCAKE_TEST_RDMA=1 is not set at run time"
    );
    assert!(
        !device_names().is_empty(),
        "MOONCAKE_TEST_RDMA=1 but this host has no RDMA devices"
    );
    Some(Rdma)
}

transport_suite!(
    rdma,
    rdma,
    #[cfg_attr(
        not(mooncake_rdma_tests),
        ignore = "needs RDMA devices: run `cargo xtask rxe` (MOONCAKE_TEST_RDMA=1)"
    )]
);
