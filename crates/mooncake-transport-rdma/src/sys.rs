//! The FFI edge: rdma-core verbs through `sideway`, which `dlopen`s `libibverbs.so.1` at run
//! time (so a binary starts on a host without rdma-core and reports "no RDMA devices").
//!
//! Every `unsafe` block of the crate lives here.

use std::net::Ipv6Addr;
use std::os::fd::RawFd;
use std::sync::Arc;

use mooncake_core::{Error, ErrorKind, Result};
use sideway::ibverbs::AccessFlags;
use sideway::ibverbs::address::{AddressHandleAttribute, Gid, GidType};
use sideway::ibverbs::completion::{
    BasicCompletionQueue, CompletionChannel, CompletionQueue, WorkCompletionStatus,
};
use sideway::ibverbs::device::{DeviceInfo, DeviceList};
use sideway::ibverbs::device_context::{DeviceContext, LinkLayer, Mtu, PortState};
use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::{
    BasicQueuePair, PostSendGuard, QueuePair, QueuePairAttribute, QueuePairState,
    SetScatterGatherEntry, WorkRequestFlags,
};

/// Names of the RDMA devices on this host, as rdma-core lists them (empty without rdma-core or
/// without devices).
pub fn device_names() -> Vec<String> {
    match DeviceList::new() {
        Ok(list) => list.iter().map(|d| d.name()).collect(),
        Err(_) => Vec::new(),
    }
}

/// One opened NIC port: context, protection domain, one CQ with its completion channel.
pub(crate) struct Nic {
    pub name: String,
    pub port: u8,
    pub gid_index: u8,
    pub gid: Gid,
    pub lid: u16,
    pub mtu: Mtu,
    pub numa_node: Option<u32>,
    pub ctx: Arc<DeviceContext>,
    pub pd: Arc<ProtectionDomain>,
    pub cq: Arc<BasicCompletionQueue>,
    pub channel: Arc<CompletionChannel>,
}

impl std::fmt::Debug for Nic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nic")
            .field("name", &self.name)
            .field("port", &self.port)
            .field("gid_index", &self.gid_index)
            .field("gid", &format_args!("{}", self.gid))
            .field("numa_node", &self.numa_node)
            .finish()
    }
}

fn verbs_err(what: &str, nic: &str, e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Io, format!("{what} on {nic}: {e}")).with_context("nic", nic)
}

fn numa_node_of(name: &str) -> Option<u32> {
    let s =
        std::fs::read_to_string(format!("/sys/class/infiniband/{name}/device/numa_node")).ok()?;
    s.trim()
        .parse::<i64>()
        .ok()
        .filter(|&n| n >= 0)
        .map(|n| n as u32)
}

/// Picks a GID: RoCE v2 with an IPv4-mapped address first (routable on every RoCE fabric and on
/// soft-RoCE), then any RoCE v2, then index 0 (InfiniBand).
fn pick_gid(ctx: &DeviceContext, port: u8) -> Option<(u8, Gid)> {
    let table = ctx.query_gid_table().ok()?;
    let mut best: Option<(u32, u8, Gid)> = None;
    for e in table
        .iter()
        .filter(|e| e.port_num() == port as u32 && !e.gid().is_zero())
    {
        let ip = Ipv6Addr::from(e.gid().raw);
        let score = match (e.gid_type(), ip.to_ipv4_mapped().is_some()) {
            (GidType::RoceV2, true) => 3,
            (GidType::RoceV2, false) => 2,
            (GidType::InfiniBand, _) => 2,
            (GidType::RoceV1, _) => 1,
        };
        if best.as_ref().is_none_or(|b| score > b.0) {
            best = Some((score, e.gid_index() as u8, e.gid()));
        }
    }
    best.map(|(_, i, g)| (i, g))
}

/// Opens every device named in `only` (every device when empty).
pub(crate) fn open_nics(
    only: &[String],
    port: u8,
    gid_index: Option<u8>,
    cqe: u32,
) -> Result<Vec<Arc<Nic>>> {
    let list = DeviceList::new().map_err(|e| {
        Error::new(
            ErrorKind::Unsupported,
            format!("no RDMA devices: rdma-core (libibverbs.so.1) is unavailable: {e}"),
        )
    })?;
    let mut nics = Vec::new();
    for dev in list.iter() {
        let name = dev.name();
        if !only.is_empty() && !only.contains(&name) {
            continue;
        }
        let ctx = match dev.open() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(nic = %name, error = %e, "cannot open RDMA device; skipping it");
                continue;
            }
        };
        let attr = ctx
            .query_port(port)
            .map_err(|e| verbs_err("query_port", &name, e))?;
        let (gid_index, gid) = match gid_index {
            Some(i) => (
                i,
                ctx.query_gid(port, i as u32)
                    .map_err(|e| verbs_err("query_gid", &name, e))?,
            ),
            None => match pick_gid(&ctx, port) {
                Some(g) => g,
                None if attr.link_layer() == LinkLayer::InfiniBand => (
                    0,
                    ctx.query_gid(port, 0)
                        .map_err(|e| verbs_err("query_gid", &name, e))?,
                ),
                None => {
                    tracing::warn!(nic = %name, "RoCE device has no usable GID (no IP address on its netdev?); skipping it");
                    continue;
                }
            },
        };
        let pd = ctx
            .alloc_pd()
            .map_err(|e| verbs_err("alloc_pd", &name, e))?;
        let channel = ctx
            .create_comp_channel()
            .map_err(|e| verbs_err("create_comp_channel", &name, e))?;
        channel
            .set_nonblocking(true)
            .map_err(|e| verbs_err("comp channel O_NONBLOCK", &name, e))?;
        let cq = ctx
            .create_cq_builder()
            .setup_cqe(cqe)
            .setup_comp_channel(&channel, 0)
            .build()
            .map_err(|e| verbs_err("create_cq", &name, e))?;
        let nic = Nic {
            numa_node: numa_node_of(&name),
            lid: attr.lid(),
            mtu: attr.active_mtu(),
            name,
            port,
            gid_index,
            gid,
            ctx,
            pd,
            cq,
            channel,
        };
        tracing::info!(?nic, "opened RDMA NIC");
        nics.push(Arc::new(nic));
    }
    if nics.is_empty() {
        let what = if only.is_empty() {
            String::new()
        } else {
            format!(" matching {only:?}")
        };
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!("no RDMA devices{what} on this host"),
        ));
    }
    Ok(nics)
}

impl Nic {
    /// True while the port is ACTIVE.
    pub fn port_active(&self) -> bool {
        self.ctx
            .query_port(self.port)
            .map(|a| a.port_state() == PortState::Active)
            .unwrap_or(false)
    }

    /// The completion channel's fd (readable when an armed CQ got a completion).
    pub fn channel_fd(&self) -> RawFd {
        // SAFETY: the channel pointer is valid while `self.channel` lives; we only read its fd.
        unsafe { self.channel.comp_channel().as_ref().fd }
    }

    /// Arms the CQ so that the next completion makes the channel readable.
    pub fn arm_cq(&self) -> Result<()> {
        // SAFETY: the CQ is alive (owned by `self`); `ibv_req_notify_cq` only touches the CQ.
        let rc = unsafe { rdma_mummy_sys::ibv_req_notify_cq(self.cq.cq().as_ptr(), 0) };
        if rc != 0 {
            return Err(verbs_err(
                "ibv_req_notify_cq",
                &self.name,
                std::io::Error::from_raw_os_error(rc),
            ));
        }
        Ok(())
    }

    /// Consumes pending channel events (non-blocking) and acknowledges them.
    pub fn drain_channel(&self) {
        let mut n = 0u32;
        loop {
            let mut cq = std::ptr::null_mut();
            let mut cq_ctx = std::ptr::null_mut();
            // SAFETY: the channel is non-blocking and alive; the out-pointers are valid locals.
            let rc = unsafe {
                rdma_mummy_sys::ibv_get_cq_event(
                    self.channel.comp_channel().as_ptr(),
                    &mut cq,
                    &mut cq_ctx,
                )
            };
            if rc != 0 {
                break;
            }
            n += 1;
        }
        if n > 0 {
            // SAFETY: acknowledges exactly the `n` events received above on this CQ.
            unsafe { rdma_mummy_sys::ibv_ack_cq_events(self.cq.cq().as_ptr(), n) };
        }
    }

    /// Polls up to 32 completions into `out` as `(wr_id, status)`.
    pub fn poll(&self, out: &mut Vec<(u64, WorkCompletionStatus)>) -> Result<()> {
        const N: usize = 32;
        let mut wcs = [std::mem::MaybeUninit::<rdma_mummy_sys::ibv_wc>::uninit(); N];
        // SAFETY: the CQ is alive; `wcs` has room for `N` entries, of which the first `n`
        // returned are initialised by the provider.
        let n = unsafe {
            rdma_mummy_sys::ibv_poll_cq(self.cq.cq().as_ptr(), N as i32, wcs.as_mut_ptr().cast())
        };
        if n < 0 {
            return Err(verbs_err(
                "ibv_poll_cq",
                &self.name,
                std::io::Error::from_raw_os_error(-n),
            ));
        }
        for wc in &wcs[..n as usize] {
            // SAFETY: initialised by `ibv_poll_cq` (index < n).
            let wc = unsafe { wc.assume_init_ref() };
            out.push((wc.wr_id, WorkCompletionStatus::from(wc.status)));
        }
        Ok(())
    }

    /// Registers `len` bytes at `addr`, with remote rights as given.
    pub fn reg_mr(
        &self,
        addr: u64,
        len: u64,
        remote_read: bool,
        remote_write: bool,
    ) -> Result<Arc<MemoryRegion>> {
        let mut access = AccessFlags::LocalWrite;
        if remote_read {
            access |= AccessFlags::RemoteRead;
        }
        if remote_write {
            access |= AccessFlags::RemoteWrite;
        }
        // SAFETY: `addr..addr+len` is a registered engine region, valid until `on_unregister`
        // returns, which drops this MR first (the engine drains transfers before that).
        unsafe { self.pd.reg_mr(addr as usize, len as usize, access) }
            .map_err(|e| verbs_err(&format!("ibv_reg_mr({addr:#x}+{len})"), &self.name, e))
    }

    /// Creates an RC QP in INIT state, allowing remote reads and writes (the MRs decide).
    pub fn create_qp(&self, max_wr: u32) -> Result<Qp> {
        let mut b = self.pd.create_qp_builder();
        b.setup_max_send_wr(max_wr)
            .setup_max_recv_wr(1)
            .setup_max_send_sge(1)
            .setup_max_recv_sge(1)
            .setup_send_cq(self.cq.clone())
            .setup_recv_cq(self.cq.clone());
        let mut qp = b
            .build()
            .map_err(|e| verbs_err("create_qp", &self.name, e))?;
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::Init)
            .setup_pkey_index(0)
            .setup_port(self.port)
            .setup_access_flags(
                AccessFlags::LocalWrite | AccessFlags::RemoteWrite | AccessFlags::RemoteRead,
            );
        qp.modify(&attr)
            .map_err(|e| verbs_err("modify_qp(INIT)", &self.name, e))?;
        let psn = rand_psn();
        Ok(Qp {
            qpn: qp.qp_number(),
            psn,
            qp,
            nic: self.name.clone(),
        })
    }
}

fn rand_psn() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    );
    (h.finish() as u32) & 0xff_ffff
}

/// The other end of a QP, as exchanged in the handshake.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QpPeer {
    pub qpn: u32,
    pub psn: u32,
    pub gid: Gid,
    pub lid: u16,
    pub mtu: Mtu,
}

/// QP timing and retry knobs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QpTiming {
    pub timeout: u8,
    pub retry_cnt: u8,
    pub rnr_retry: u8,
    pub max_rd_atomic: u8,
}

/// One RC queue pair.
pub(crate) struct Qp {
    qp: BasicQueuePair,
    pub qpn: u32,
    pub psn: u32,
    nic: String,
}

impl std::fmt::Debug for Qp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Qp({}#{})", self.nic, self.qpn)
    }
}

/// One READ or WRITE work request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Wr {
    pub wr_id: u64,
    pub write: bool,
    pub lkey: u32,
    pub laddr: u64,
    pub len: u32,
    pub rkey: u32,
    pub raddr: u64,
}

pub(crate) fn mtu_from_u32(v: u32) -> Mtu {
    match v {
        256 => Mtu::Mtu256,
        512 => Mtu::Mtu512,
        1024 => Mtu::Mtu1024,
        2048 => Mtu::Mtu2048,
        _ => Mtu::Mtu4096,
    }
}

pub(crate) fn mtu_to_u32(m: Mtu) -> u32 {
    match m {
        Mtu::Mtu256 => 256,
        Mtu::Mtu512 => 512,
        Mtu::Mtu1024 => 1024,
        Mtu::Mtu2048 => 2048,
        Mtu::Mtu4096 => 4096,
    }
}

impl Qp {
    /// INIT → RTR → RTS towards `peer`.
    pub fn connect(&mut self, nic: &Nic, peer: &QpPeer, t: QpTiming) -> Result<()> {
        let mtu = mtu_from_u32(mtu_to_u32(nic.mtu).min(mtu_to_u32(peer.mtu)));
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToReceive)
            .setup_path_mtu(mtu)
            .setup_dest_qp_num(peer.qpn)
            .setup_rq_psn(peer.psn)
            .setup_max_dest_read_atomic(t.max_rd_atomic)
            .setup_min_rnr_timer(12);
        let mut ah = AddressHandleAttribute::new();
        ah.setup_dest_lid(peer.lid)
            .setup_port(nic.port)
            .setup_service_level(0)
            .setup_grh_src_gid_index(nic.gid_index)
            .setup_grh_dest_gid(&peer.gid)
            .setup_grh_hop_limit(64);
        attr.setup_address_vector(&ah);
        self.qp
            .modify(&attr)
            .map_err(|e| verbs_err("modify_qp(RTR)", &nic.name, e))?;
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToSend)
            .setup_sq_psn(self.psn)
            .setup_timeout(t.timeout)
            .setup_retry_cnt(t.retry_cnt)
            .setup_rnr_retry(t.rnr_retry)
            .setup_max_read_atomic(t.max_rd_atomic);
        self.qp
            .modify(&attr)
            .map_err(|e| verbs_err("modify_qp(RTS)", &nic.name, e))?;
        Ok(())
    }

    /// Moves the QP to ERROR: every outstanding WR completes with a flush error.
    pub fn set_error(&mut self) {
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::Error);
        if let Err(e) = self.qp.modify(&attr) {
            tracing::warn!(qp = ?self, error = %e, "cannot move QP to ERROR");
        }
    }

    /// Posts `wrs` (all signaled) in one doorbell.
    pub fn post(&mut self, wrs: &[Wr]) -> Result<()> {
        let mut guard = self.qp.start_post_send();
        for w in wrs {
            let h = guard.construct_wr(w.wr_id, WorkRequestFlags::Signaled);
            let h = if w.write {
                h.setup_write(w.rkey, w.raddr)
            } else {
                h.setup_read(w.rkey, w.raddr)
            };
            // SAFETY: `laddr..laddr+len` lies in a leased, registered region (lkey from its MR);
            // the lease is held until this WR's completion is polled.
            unsafe { h.setup_sge(w.lkey, w.laddr, w.len) };
        }
        guard.post().map_err(|e| {
            Error::new(
                ErrorKind::PeerUnreachable,
                format!("post_send on {}: {e}", self.nic),
            )
            .with_context("nic", &self.nic)
        })
    }
}

/// A non-blocking eventfd used to wake a worker sleeping in [`wait_readable`].
#[derive(Debug)]
pub(crate) struct EventFd(std::os::fd::OwnedFd);

impl EventFd {
    /// Creates one.
    pub fn new() -> Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain syscall; the returned fd (if valid) is owned by the new object.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::io("eventfd", &std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        Ok(Self(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }))
    }

    /// The raw fd.
    pub fn fd(&self) -> RawFd {
        use std::os::fd::AsRawFd;
        self.0.as_raw_fd()
    }

    /// Wakes the waiter.
    pub fn notify(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid local to our own eventfd.
        unsafe { libc::write(self.fd(), (&one as *const u64).cast(), 8) };
    }

    /// Clears pending wake-ups.
    pub fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a valid local from our own non-blocking eventfd.
        unsafe { libc::read(self.fd(), (&mut v as *mut u64).cast(), 8) };
    }
}

/// Waits until one of `fds` is readable or `timeout_ms` passes.
pub(crate) fn wait_readable(fds: &[RawFd], timeout_ms: i32) {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `p` is a valid array of `p.len()` pollfd structs for the duration of the call.
    unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout_ms) };
}
