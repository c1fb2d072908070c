//! RDMA (RoCE/InfiniBand) transport for mooncake-rs.
//!
//! [`RdmaTransport`] moves bytes with one-sided RDMA READ/WRITE over RC queue pairs. Build it
//! into an engine with [`RdmaConfig`]:
//!
//! ```no_run
//! use mooncake_engine::TransferEngine;
//! use mooncake_transport_rdma::RdmaConfig;
//! let engine = TransferEngine::builder("node-a").with_transport(RdmaConfig::new()).build()?;
//! # Ok::<(), mooncake_core::Error>(())
//! ```
//!
//! # Verbs bindings
//! The crate uses [`sideway`], whose `rdma-mummy-sys` layer `dlopen`s `libibverbs.so.1` at run
//! time: a binary with this transport starts on a host without rdma-core, and building the
//! transport there fails with [`mooncake_core::ErrorKind::Unsupported`] ("no RDMA devices").
//! The transport posts with `ibv_post_send` and polls with `ibv_poll_cq` (sideway's basic QP
//! and CQ): with rdma-core 44's rxe provider, our first version on the extended path
//! (`ibv_wr_*` posting + `ibv_start_poll`) saw no completions at all.
//! `rdma-sys` was rejected: it is unmaintained since 2023 and links libibverbs at load time.
//! The two must never be linked into one binary (the stubs capture rdma-sys's symbols).
//!
//! # Threads
//! One worker per NIC (`mooncake-rdma-cq-<nic>`) posts and polls; one handshake thread
//! (`mooncake-rdma-handshake`) runs every handshake, as client and server, on non-blocking
//! sockets with a deadline each, so a slow or blackholed peer never stalls a NIC. WRs in
//! flight are bounded per QP and per NIC (the CQ cannot overrun); endpoints, passive QPs and
//! handshake connections are bounded too.
//!
//! # Unregister and shutdown
//! `on_unregister` deregisters the region's MRs on every NIC before it returns (no peer can
//! reach the memory through a key afterwards) and has the workers fail every slice using it at
//! once. `shutdown` destroys every QP, joins the threads and deregisters every MR before it
//! releases the leases it still held.
//!
//! # Security
//! Each registered region is its own MR; `ReadOnly` regions get no remote-write right and
//! `LocalOnly` regions no remote rights, so the NIC enforces bounds and rights. Remote keys are
//! never published: the handshake hands them only to a peer that set up a QP on that NIC
//! (later key requests must name the QP, come from its owner and present its token). Requests
//! answer a per-connection challenge and are checked before any state changes. With a cluster
//! secret (`EngineContext::secret`) both sides prove it over the whole exchange, binding both
//! segment names and generations; without one peers are not authenticated (as in Mooncake).
//! See `docs/rdma.md`.
//!
//! # GPUDirect RDMA
//! Device regions (`cuda:N`) are registered from the dma-buf the installed
//! [`mooncake_core::DeviceCopier`] exports (`ibv_reg_dmabuf_mr`, with the rights of host MRs),
//! on the NICs that accept it; NICs are ranked for each GPU by PCIe distance (sysfs). The
//! transport moves device memory only where both sides registered it so (`can_move`). See
//! `docs/gpu.md`.
//!
//! See `docs/rdma.md` for deployment and tuning knobs.

mod config;
mod gpudirect;
mod handshake;
mod passive;
mod rail;
mod shared;
mod slice;
mod stats;
mod sys;
mod topology;
mod transport;
mod wire;
mod worker;

pub use config::{PathPolicy, RdmaConfig};
pub use stats::{NicStats, RdmaStats};
pub use sys::device_names;
pub use transport::{RDMA_SCHEME, RdmaTransport};
pub use wire::{GPUDIRECT_KEY, HANDSHAKE_KEY};

/// Entry points for the fuzz targets in `fuzz/`; not part of the supported API.
#[doc(hidden)]
pub mod fuzzing {
    /// Runs `data` through the handshake frame reader and message decoders, panicking when an
    /// invariant breaks (see `fuzz/fuzz_targets/rdma_handshake_frame.rs`).
    pub fn handshake_frames(data: &[u8]) {
        crate::wire::fuzz_frames(data);
    }
}

/// True when the tests that need RDMA devices should run (`MOONCAKE_TEST_RDMA=1`).
pub fn rdma_tests_enabled() -> bool {
    std::env::var("MOONCAKE_TEST_RDMA").is_ok_and(|v| v == "1")
}
