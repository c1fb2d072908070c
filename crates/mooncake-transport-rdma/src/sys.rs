//! The FFI edge: rdma-core verbs through `sideway`, which `dlopen`s `libibverbs.so.1` at run
//! time (so a binary starts on a host without rdma-core and reports "no RDMA devices").
//!
//! Every `unsafe` block of the crate lives here.

use std::net::{Ipv6Addr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;

use mooncake_core::{Error, ErrorKind, Result};

use crate::gpudirect::{Mr, MrTarget, Rights};
use sideway::ibverbs::AccessFlags;
use sideway::ibverbs::address::{AddressHandleAttribute, Gid, GidType};
use sideway::ibverbs::completion::{BasicCompletionQueue, CompletionChannel, CompletionQueue};
use sideway::ibverbs::device::{DeviceInfo, DeviceList};
use sideway::ibverbs::device_context::{DeviceContext, LinkLayer, Mtu, PortState};
use sideway::ibverbs::memory_region::{MemoryRegion, RegisterMemoryRegionError};
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::{BasicQueuePair, QueuePair, QueuePairAttribute, QueuePairState};

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

    /// Polls up to 32 completions into `out`.
    pub fn poll(&self, out: &mut Vec<Wc>) -> Result<()> {
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
            out.push(Wc {
                wr_id: wc.wr_id,
                status: WcStatus::from_raw(wc.status),
                vendor_err: wc.vendor_err,
            });
        }
        Ok(())
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

fn access_flags(rights: Rights) -> AccessFlags {
    let mut access = AccessFlags::LocalWrite;
    if rights.remote_read {
        access |= AccessFlags::RemoteRead;
    }
    if rights.remote_write {
        access |= AccessFlags::RemoteWrite;
    }
    access
}

/// The errno behind a failed registration (sideway's error displays only "failed to register
/// memory region").
fn reg_err(e: RegisterMemoryRegionError) -> String {
    format!("{e}: {}", e.0)
}

impl Mr for Arc<MemoryRegion> {
    fn lkey(&self) -> u32 {
        MemoryRegion::lkey(self)
    }
    fn rkey(&self) -> u32 {
        MemoryRegion::rkey(self)
    }
}

impl MrTarget for Nic {
    fn name(&self) -> &str {
        &self.name
    }

    fn reg_mr(&self, addr: u64, len: u64, rights: Rights) -> Result<Box<dyn Mr>> {
        // SAFETY: `addr..addr+len` is a registered engine region, valid until `on_unregister`
        // returns, which drops this MR first (the engine drains transfers before that).
        let mr = unsafe {
            self.pd
                .reg_mr(addr as usize, len as usize, access_flags(rights))
        }
        .map_err(|e| {
            verbs_err(
                &format!("ibv_reg_mr({addr:#x}+{len})"),
                &self.name,
                reg_err(e),
            )
        })?;
        Ok(Box::new(mr))
    }

    fn reg_dmabuf_mr(
        &self,
        fd: BorrowedFd<'_>,
        offset: u64,
        len: u64,
        iova: u64,
        rights: Rights,
    ) -> Result<Box<dyn Mr>> {
        // SAFETY: `fd` is a dma-buf the device runtime exported for the registered device
        // region `iova..iova+len` (covering `offset..offset+len` of it); the region stays
        // allocated until `on_unregister` returns, which drops this MR first, and the fd stays
        // open as long as the MR (`gpudirect::Registration`).
        let mr = unsafe {
            self.pd.reg_dmabuf_mr(
                offset,
                len as usize,
                iova,
                fd.as_raw_fd(),
                access_flags(rights),
            )
        }
        .map_err(|e| {
            verbs_err(
                &format!("ibv_reg_dmabuf_mr(offset {offset:#x}, {len} bytes, iova {iova:#x})"),
                &self.name,
                reg_err(e),
            )
        })?;
        Ok(Box::new(mr))
    }
}

fn rand_psn() -> u32 {
    u32::from_le_bytes(random_bytes::<4>()) & 0xff_ffff
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
    ///
    /// On failure the provider names the first WR it did not take: the WRs before it are on
    /// the send queue (they will complete or be flushed), the rest are not.
    pub fn post(&mut self, wrs: &[Wr], buf: &mut PostBuf) -> std::result::Result<(), PostError> {
        if wrs.is_empty() {
            return Ok(());
        }
        buf.wrs.clear();
        buf.sges.clear();
        for w in wrs {
            buf.sges.push(rdma_mummy_sys::ibv_sge {
                addr: w.laddr,
                length: w.len,
                lkey: w.lkey,
            });
        }
        for w in wrs {
            // SAFETY: `ibv_send_wr` is a plain C struct (integers, raw pointers and unions of
            // them) for which all-zero bytes are a valid value, as in rdma-core's own code.
            let mut wr: rdma_mummy_sys::ibv_send_wr = unsafe { std::mem::zeroed() };
            wr.wr_id = w.wr_id;
            wr.num_sge = 1;
            wr.opcode = if w.write {
                rdma_mummy_sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE
            } else {
                rdma_mummy_sys::ibv_wr_opcode::IBV_WR_RDMA_READ
            };
            wr.send_flags = rdma_mummy_sys::ibv_send_flags::IBV_SEND_SIGNALED.0;
            wr.wr.rdma = rdma_mummy_sys::rdma_t {
                remote_addr: w.raddr,
                rkey: w.rkey,
            };
            buf.wrs.push(wr);
        }
        // Link the list only now: the vectors no longer move.
        let n = buf.wrs.len();
        let sges = buf.sges.as_mut_ptr();
        let base = buf.wrs.as_mut_ptr();
        for i in 0..n {
            // SAFETY: `i < n` indexes both vectors, which have `n` elements each and are not
            // resized until the next call.
            unsafe {
                let wr = &mut *base.add(i);
                wr.sg_list = sges.add(i);
                wr.next = if i + 1 < n {
                    base.add(i + 1)
                } else {
                    std::ptr::null_mut()
                };
            }
        }
        let mut bad: *mut rdma_mummy_sys::ibv_send_wr = std::ptr::null_mut();
        // SAFETY: the QP is alive (owned by `self`); the WR list and its SGEs are valid for the
        // call. Every SGE names a leased range of a registered region with that region's lkey;
        // the lease is held until this WR's completion is polled (or the region's MRs are
        // deregistered first), so the NIC never touches freed memory.
        let rc = unsafe { rdma_mummy_sys::ibv_post_send(self.qp.qp().as_ptr(), base, &mut bad) };
        if rc == 0 {
            return Ok(());
        }
        // The provider points `bad` at the first WR it did not post; anything else (null, or
        // outside our list) means nothing is known to be posted.
        let posted = if bad.is_null() {
            0
        } else {
            (bad as usize)
                .checked_sub(base as usize)
                .map(|d| d / std::mem::size_of::<rdma_mummy_sys::ibv_send_wr>())
                .filter(|&i| i < n)
                .unwrap_or(0)
        };
        Err(PostError {
            posted,
            error: Error::new(
                ErrorKind::PeerUnreachable,
                format!(
                    "post_send on {}: {}",
                    self.nic,
                    std::io::Error::from_raw_os_error(rc)
                ),
            )
            .with_context("nic", &self.nic),
        })
    }

    /// The responder's next expected PSN: it advances with every request the peer sends on
    /// this QP, so two different samples mean the QP was used in between.
    pub fn rq_psn(&self) -> Option<u32> {
        // SAFETY: plain C structs for which all-zero bytes are valid values.
        let mut attr: rdma_mummy_sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut init: rdma_mummy_sys::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        // SAFETY: the QP is alive; the out-pointers are valid locals for the call.
        let rc = unsafe {
            rdma_mummy_sys::ibv_query_qp(
                self.qp.qp().as_ptr(),
                &mut attr,
                rdma_mummy_sys::ibv_qp_attr_mask::IBV_QP_RQ_PSN.0 as i32,
                &mut init,
            )
        };
        (rc == 0).then_some(attr.rq_psn)
    }
}

/// Scratch space for [`Qp::post`], reused across calls.
#[derive(Default)]
pub(crate) struct PostBuf {
    wrs: Vec<rdma_mummy_sys::ibv_send_wr>,
    sges: Vec<rdma_mummy_sys::ibv_sge>,
}

// SAFETY: the raw pointers inside are only set and used during one `Qp::post` call on the
// owning thread; between calls they are stale values nobody reads.
unsafe impl Send for PostBuf {}

/// A failed [`Qp::post`].
#[derive(Debug)]
pub(crate) struct PostError {
    /// How many WRs, from the start, the QP took (they complete or are flushed as usual).
    pub posted: usize,
    /// Why the rest were refused.
    pub error: Error,
}

/// One polled completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Wc {
    pub wr_id: u64,
    pub status: WcStatus,
    pub vendor_err: u32,
}

/// A work completion status (`enum ibv_wc_status`), total over every value a provider may
/// return: unknown values are kept, never a panic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WcStatus {
    Success,
    LocalLength,
    LocalQpOperation,
    LocalEecOperation,
    LocalProtection,
    WrFlush,
    MemoryWindowBind,
    BadResponse,
    LocalAccess,
    RemoteInvalidRequest,
    RemoteAccess,
    RemoteOperation,
    RetryExceeded,
    RnrRetryExceeded,
    LocalRddViolation,
    RemoteInvalidRdRequest,
    RemoteAborted,
    InvalidEecn,
    InvalidEecState,
    Fatal,
    ResponseTimeout,
    General,
    TagMatching,
    TagMatchingRndv,
    /// A value this build does not know.
    Unknown(u32),
}

impl WcStatus {
    /// Maps the raw `ibv_wc_status` value.
    pub fn from_raw(v: u32) -> Self {
        use WcStatus::*;
        match v {
            0 => Success,
            1 => LocalLength,
            2 => LocalQpOperation,
            3 => LocalEecOperation,
            4 => LocalProtection,
            5 => WrFlush,
            6 => MemoryWindowBind,
            7 => BadResponse,
            8 => LocalAccess,
            9 => RemoteInvalidRequest,
            10 => RemoteAccess,
            11 => RemoteOperation,
            12 => RetryExceeded,
            13 => RnrRetryExceeded,
            14 => LocalRddViolation,
            15 => RemoteInvalidRdRequest,
            16 => RemoteAborted,
            17 => InvalidEecn,
            18 => InvalidEecState,
            19 => Fatal,
            20 => ResponseTimeout,
            21 => General,
            22 => TagMatching,
            23 => TagMatchingRndv,
            other => Unknown(other),
        }
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
    let mut p: Vec<PollFd> = fds.iter().map(|&fd| PollFd::new(fd, true, false)).collect();
    poll_fds(&mut p, timeout_ms);
}

/// One entry of [`poll_fds`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct PollFd(libc::pollfd);

impl PollFd {
    /// Watches `fd` for reading and/or writing.
    pub fn new(fd: RawFd, read: bool, write: bool) -> Self {
        let mut events = 0;
        if read {
            events |= libc::POLLIN;
        }
        if write {
            events |= libc::POLLOUT;
        }
        Self(libc::pollfd {
            fd,
            events,
            revents: 0,
        })
    }

    /// Readable, or closed or failed (a read will say which).
    pub fn readable(&self) -> bool {
        self.0.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
    }

    /// Writable, or failed (a write or `take_error` will say).
    pub fn writable(&self) -> bool {
        self.0.revents & (libc::POLLOUT | libc::POLLHUP | libc::POLLERR) != 0
    }
}

/// `poll(2)` over `fds` for up to `timeout_ms`; each entry's result is read back with
/// [`PollFd::readable`] / [`PollFd::writable`].
pub(crate) fn poll_fds(fds: &mut [PollFd], timeout_ms: i32) {
    let mut raw: Vec<libc::pollfd> = fds.iter().map(|p| p.0).collect();
    // SAFETY: `raw` is a valid array of `raw.len()` pollfd structs for the duration of the call.
    unsafe { libc::poll(raw.as_mut_ptr(), raw.len() as libc::nfds_t, timeout_ms) };
    for (p, r) in fds.iter_mut().zip(raw) {
        p.0.revents = r.revents;
    }
}

/// Starts a non-blocking TCP connect to `addr`: the stream becomes writable when the connect
/// finished (check [`std::net::TcpStream::take_error`]).
pub(crate) fn connect_nonblocking(addr: &SocketAddr) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    let (domain, storage, len) = sockaddr(addr);
    // SAFETY: plain syscall; the returned descriptor (if valid) is owned below.
    let fd = unsafe {
        libc::socket(
            domain,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nobody else owns; the stream closes it on drop.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    // SAFETY: `storage` holds a sockaddr of `len` bytes for the socket's family.
    let rc = unsafe { libc::connect(fd, (&storage as *const libc::sockaddr_storage).cast(), len) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
    }
    Ok(stream)
}

fn sockaddr(addr: &SocketAddr) -> (libc::c_int, libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero bytes are a valid `sockaddr_storage`.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: `sockaddr_storage` is larger than and aligned for `sockaddr_in`.
            unsafe {
                std::ptr::write(
                    (&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>(),
                    sin,
                )
            };
            (
                libc::AF_INET,
                storage,
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: `sockaddr_storage` is larger than and aligned for `sockaddr_in6`.
            unsafe {
                std::ptr::write(
                    (&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>(),
                    sin6,
                )
            };
            (
                libc::AF_INET6,
                storage,
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        }
    }
}

/// `N` bytes from the kernel's random generator (handshake nonces, QP tokens).
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    let mut filled = 0;
    while filled < N {
        // SAFETY: writes at most `N - filled` bytes into the valid tail of `out`.
        let n = unsafe { libc::getrandom(out[filled..].as_mut_ptr().cast(), N - filled, 0) };
        if n > 0 {
            filled += n as usize;
        } else if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            // No getrandom (very old kernel): fall back to hashing time and address noise.
            return fallback_random();
        }
    }
    out
}

fn fallback_random<const N: usize>() -> [u8; N] {
    use std::hash::{BuildHasher, Hasher};
    let mut out = [0u8; N];
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(i);
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        chunk.copy_from_slice(&h.finish().to_le_bytes()[..chunk.len()]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_completion_status_maps_without_panicking() {
        // sideway's `WorkCompletionStatus::from` panics on a value it does not know, which
        // would kill a NIC worker; ours keeps it.
        assert_eq!(WcStatus::from_raw(0), WcStatus::Success);
        assert_eq!(WcStatus::from_raw(5), WcStatus::WrFlush);
        assert_eq!(WcStatus::from_raw(10), WcStatus::RemoteAccess);
        for v in [24, 99, 0x7fff_ffff, u32::MAX] {
            assert_eq!(WcStatus::from_raw(v), WcStatus::Unknown(v));
        }
    }

    /// A post that the provider takes only in part reports how many WRs it took, and exactly
    /// those complete.
    #[test]
    #[cfg_attr(
        not(mooncake_rdma_tests),
        ignore = "needs RDMA devices: run `cargo xtask rxe` (MOONCAKE_TEST_RDMA=1)"
    )]
    fn a_partial_post_reports_what_was_posted() {
        let names = device_names();
        let nics = open_nics(&names[..1], 1, None, 1024).expect("open a device");
        let nic = &nics[0];
        let mut qp = nic.create_qp(4).unwrap();
        // Connected to itself: WRITEs go from one half of the buffer to the other.
        let me = QpPeer {
            qpn: qp.qpn,
            psn: qp.psn,
            gid: nic.gid,
            lid: nic.lid,
            mtu: nic.mtu,
        };
        qp.connect(
            nic,
            &me,
            QpTiming {
                timeout: 14,
                retry_cnt: 7,
                rnr_retry: 7,
                max_rd_atomic: 16,
            },
        )
        .unwrap();
        let mem = vec![7u8; 1 << 20].into_boxed_slice();
        let base = mem.as_ptr() as u64;
        let rights = Rights {
            remote_read: true,
            remote_write: true,
        };
        let mr = MrTarget::reg_mr(&**nic, base, mem.len() as u64, rights).unwrap();
        let wrs: Vec<Wr> = (0..64u64)
            .map(|i| Wr {
                wr_id: 100 + i,
                write: true,
                lkey: mr.lkey(),
                laddr: base + i * 4096,
                len: 4096,
                rkey: mr.rkey(),
                raddr: base + (512 << 10) + i * 4096,
            })
            .collect();
        let mut buf = PostBuf::default();
        let err = qp
            .post(&wrs, &mut buf)
            .expect_err("64 WRs do not fit a send queue of 4");
        let posted = err.posted;
        assert!((1..64).contains(&posted), "posted {posted}");
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while got.len() < posted && std::time::Instant::now() < deadline {
            nic.poll(&mut got).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        nic.poll(&mut got).unwrap();
        let ids: Vec<u64> = got.iter().map(|w| w.wr_id).collect();
        assert_eq!(ids, (100..100 + posted as u64).collect::<Vec<_>>());
        assert!(got.iter().all(|w| w.status == WcStatus::Success), "{got:?}");
        drop(qp);
        drop(mr);
        drop(mem);
    }
}
