//! Registering regions with the NICs: host memory with `ibv_reg_mr`, device memory
//! (GPUDirect RDMA) as a dma-buf the installed [`DeviceCopier`] exports, with
//! `ibv_reg_dmabuf_mr`. The NIC side is behind [`MrTarget`] (`sys::Nic` implements it), so the
//! choices made here are tested without a NIC.

use std::os::fd::{AsFd, BorrowedFd};

use mooncake_core::device::{DeviceCopier, DmaBuf};
use mooncake_core::{
    Access, BufferDesc, Error, ErrorKind, Location, Region, Result, SegmentDescriptor,
};

use crate::wire::GPUDIRECT_KEY;

/// One NIC's registration of a region; dropping it deregisters it.
pub(crate) trait Mr: Send + Sync {
    /// The local key (our own WRs).
    fn lkey(&self) -> u32;
    /// The remote key (peers' WRs).
    fn rkey(&self) -> u32;
}

/// The remote rights of an MR; local write is always granted (RDMA READs land in it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rights {
    /// Peers may RDMA READ it.
    pub remote_read: bool,
    /// Peers may RDMA WRITE it.
    pub remote_write: bool,
}

impl Rights {
    /// The rights a region registered with `access` gets: `ReadOnly` no remote write,
    /// `LocalOnly` no remote right.
    pub fn of(access: Access) -> Self {
        Self {
            remote_read: access.remote_read(),
            remote_write: access.remote_write(),
        }
    }
}

/// What registering needs of a NIC.
pub(crate) trait MrTarget {
    /// The device name (`mlx5_0`).
    fn name(&self) -> &str;
    /// Registers host memory `[addr, addr + len)`.
    fn reg_mr(&self, addr: u64, len: u64, rights: Rights) -> Result<Box<dyn Mr>>;
    /// Registers `len` bytes of the dma-buf `fd` from `offset`; WRs address them as
    /// `[iova, iova + len)`.
    fn reg_dmabuf_mr(
        &self,
        fd: BorrowedFd<'_>,
        offset: u64,
        len: u64,
        iova: u64,
        rights: Rights,
    ) -> Result<Box<dyn Mr>>;
}

/// A region's MRs, one per NIC in NIC order.
pub(crate) struct Registration {
    /// The MRs; `None` on a NIC that refused the region's dma-buf (declared first: they are
    /// deregistered before the dma-buf is closed).
    pub mrs: Vec<Option<Box<dyn Mr>>>,
    /// The dma-buf of a device region, open as long as its MRs.
    pub dmabuf: Option<DmaBuf>,
    /// Why each NIC without an MR refused the dma-buf.
    pub refused: Vec<Error>,
}

/// Registers `region` on the NICs `nics`.
///
/// Host memory is registered by address on every NIC, or the registration fails. Device
/// memory (a location that is not host memory) is exported by `copier` as a dma-buf and
/// registered from it, at the region's own address as IOVA (so WRs name it as they name host
/// memory), on every NIC that accepts it; each refusal is an `Unsupported` error naming the
/// NIC ("… does not support dma-buf MRs (GPUDirect RDMA)"), in
/// [`Registration::refused`], and the registration fails with the first one when no NIC
/// accepts it.
pub(crate) fn register(
    nics: &[&dyn MrTarget],
    region: &Region,
    copier: Option<&dyn DeviceCopier>,
) -> Result<Registration> {
    let (base, len, loc) = (region.base(), region.len(), region.location());
    let rights = Rights::of(region.access());
    if loc.is_host() {
        let mrs = nics
            .iter()
            .map(|n| n.reg_mr(base, len, rights).map(Some))
            .collect::<Result<Vec<_>>>()?;
        return Ok(Registration {
            mrs,
            dmabuf: None,
            refused: Vec::new(),
        });
    }
    let copier = copier.ok_or_else(|| {
        Error::new(
            ErrorKind::Unsupported,
            format!(
                "{loc} memory at {base:#x}+{len}: no device runtime is installed to export it \
                 as a dma-buf (GPUDirect RDMA)"
            ),
        )
    })?;
    let buf = copier.dmabuf(base, len)?;
    if buf.len < len {
        return Err(Error::new(
            ErrorKind::Io,
            format!(
                "{} exported a dma-buf of {} bytes for {loc} memory at {base:#x}+{len}",
                copier.name(),
                buf.len
            ),
        ));
    }
    let mut mrs = Vec::with_capacity(nics.len());
    let mut refused = Vec::new();
    for n in nics {
        match n.reg_dmabuf_mr(buf.fd.as_fd(), buf.offset, len, base, rights) {
            Ok(mr) => mrs.push(Some(mr)),
            Err(e) => {
                mrs.push(None);
                refused.push(
                    Error::new(
                        ErrorKind::Unsupported,
                        format!(
                            "RDMA device {} does not support dma-buf MRs (GPUDirect RDMA) for \
                             {loc} memory at {base:#x}+{len}: {e}",
                            n.name()
                        ),
                    )
                    .with_context("nic", n.name()),
                );
            }
        }
    }
    if mrs.iter().all(Option::is_none) && !refused.is_empty() {
        return Err(refused.swap_remove(0));
    }
    Ok(Registration {
        mrs,
        dmabuf: Some(buf),
        refused,
    })
}

/// Publishes the device regions registered from dma-bufs under [`GPUDIRECT_KEY`], each as
/// `{"addr": base, "nics": [NICs holding an MR of it]}` (nothing when there are none).
pub(crate) fn publish(d: &mut SegmentDescriptor, device: &[(u64, Vec<String>)]) {
    if !device.is_empty() {
        let v: Vec<serde_json::Value> = device
            .iter()
            .map(|(addr, nics)| serde_json::json!({ "addr": addr, "nics": nics }))
            .collect();
        d.extra.insert(GPUDIRECT_KEY.into(), v.into());
    }
}

/// The NICs of `remote` through which its device buffer at `addr` is reachable (its entry
/// under [`GPUDIRECT_KEY`]), `None` when it published none.
pub(crate) fn remote_nics(remote: &SegmentDescriptor, addr: u64) -> Option<Vec<&str>> {
    remote
        .extra
        .get(GPUDIRECT_KEY)?
        .as_array()?
        .iter()
        .find(|e| e.get("addr").and_then(|a| a.as_u64()) == Some(addr))?
        .get("nics")?
        .as_array()
        .map(|a| a.iter().filter_map(|n| n.as_str()).collect())
}

/// Whether RDMA moves bytes between a local region at `local` (`registered`: it has an MR on
/// at least one NIC) and `buffer` of the segment `remote`: host memory always; a local
/// device region only when it was registered (from a dma-buf), a remote device buffer only
/// when its owner published NICs for it under [`GPUDIRECT_KEY`].
pub(crate) fn can_move(
    local: &Location,
    registered: bool,
    buffer: &BufferDesc,
    remote: &SegmentDescriptor,
) -> bool {
    if !local.is_host() && !registered {
        return false;
    }
    let remote_loc: Location = buffer.name.parse().unwrap_or_default();
    remote_loc.is_host() || remote_nics(remote, buffer.addr).is_some_and(|n| !n.is_empty())
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    use std::sync::{Arc, Mutex};

    use mooncake_core::{
        BufferRegistry, DeviceCopy, ForeignMemory, Location, MemorySegment, RegionLease,
    };

    use super::*;

    /// What the fake NICs were asked, and which of their MRs were dropped.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Call {
        Reg {
            nic: String,
            addr: u64,
            len: u64,
            rights: Rights,
        },
        RegDmabuf {
            nic: String,
            fd: RawFd,
            offset: u64,
            len: u64,
            iova: u64,
            rights: Rights,
        },
        Dereg {
            nic: String,
            key: u32,
        },
    }

    type Log = Arc<Mutex<Vec<Call>>>;

    struct FakeMr {
        nic: String,
        key: u32,
        log: Log,
    }

    impl Mr for FakeMr {
        fn lkey(&self) -> u32 {
            self.key
        }
        fn rkey(&self) -> u32 {
            self.key | 0x8000_0000
        }
    }

    impl Drop for FakeMr {
        fn drop(&mut self) {
            self.log.lock().unwrap().push(Call::Dereg {
                nic: self.nic.clone(),
                key: self.key,
            });
        }
    }

    struct FakeNic {
        name: String,
        key: u32,
        dmabuf: bool,
        log: Log,
    }

    impl FakeNic {
        fn mr(&self) -> Box<dyn Mr> {
            Box::new(FakeMr {
                nic: self.name.clone(),
                key: self.key,
                log: self.log.clone(),
            })
        }
    }

    impl MrTarget for FakeNic {
        fn name(&self) -> &str {
            &self.name
        }
        fn reg_mr(&self, addr: u64, len: u64, rights: Rights) -> Result<Box<dyn Mr>> {
            self.log.lock().unwrap().push(Call::Reg {
                nic: self.name.clone(),
                addr,
                len,
                rights,
            });
            Ok(self.mr())
        }
        fn reg_dmabuf_mr(
            &self,
            fd: BorrowedFd<'_>,
            offset: u64,
            len: u64,
            iova: u64,
            rights: Rights,
        ) -> Result<Box<dyn Mr>> {
            self.log.lock().unwrap().push(Call::RegDmabuf {
                nic: self.name.clone(),
                fd: fd.as_raw_fd(),
                offset,
                len,
                iova,
                rights,
            });
            if !self.dmabuf {
                return Err(Error::new(
                    ErrorKind::Io,
                    "ibv_reg_dmabuf_mr: Operation not supported (os error 95)",
                ));
            }
            Ok(self.mr())
        }
    }

    /// One export of [`FakeCopier`]: the range asked, the fd handed out (a pipe's read end)
    /// and the pipe's write end, which fails once the read end is closed.
    struct Export {
        addr: u64,
        len: u64,
        fd: RawFd,
        writer: std::fs::File,
    }

    impl Export {
        fn closed(&self) -> bool {
            use std::io::Write;
            (&self.writer).write(&[0]).is_err()
        }
    }

    /// A device runtime whose dma-bufs are pipes: the export starts `offset` bytes before the
    /// requested address and covers `extra` bytes past its end.
    struct FakeCopier {
        offset: u64,
        extra: i64,
        exported: Mutex<Vec<Export>>,
    }

    impl FakeCopier {
        fn new(offset: u64, extra: i64) -> Self {
            Self {
                offset,
                extra,
                exported: Mutex::default(),
            }
        }
    }

    impl DeviceCopier for FakeCopier {
        fn name(&self) -> &'static str {
            "fake"
        }
        fn locate(&self, _addr: u64, _len: u64) -> Result<Option<Location>> {
            Ok(None)
        }
        fn alloc_pinned(&self, _len: usize) -> Result<Arc<dyn MemorySegment>> {
            Err(Error::new(ErrorKind::Unsupported, "fake"))
        }
        fn copy(&self, _dst: RegionLease, _src: RegionLease) -> Result<DeviceCopy> {
            Err(Error::new(ErrorKind::Unsupported, "fake"))
        }
        fn dmabuf(&self, addr: u64, len: u64) -> Result<DmaBuf> {
            let mut fds = [0; 2];
            // SAFETY: `fds` has room for the two descriptors pipe2 writes.
            let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
            assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
            // SAFETY: both descriptors are fresh and owned once each from here on.
            let (fd, writer) = unsafe {
                (
                    OwnedFd::from_raw_fd(fds[0]),
                    std::fs::File::from_raw_fd(fds[1]),
                )
            };
            self.exported.lock().unwrap().push(Export {
                addr,
                len,
                fd: fd.as_raw_fd(),
                writer,
            });
            Ok(DmaBuf {
                fd,
                offset: self.offset,
                len: (len as i64 + self.extra) as u64,
            })
        }
    }

    fn nics(log: &Log, dmabuf: &[bool]) -> Vec<FakeNic> {
        dmabuf
            .iter()
            .enumerate()
            .map(|(i, &d)| FakeNic {
                name: format!("mlx5_{i}"),
                key: 0x100 + i as u32,
                dmabuf: d,
                log: log.clone(),
            })
            .collect()
    }

    fn region(reg: &BufferRegistry, base: u64, loc: Location, access: Access) -> Arc<Region> {
        // SAFETY: the fake NICs and copier never touch the memory.
        let m = unsafe { ForeignMemory::new(base, 1 << 20, loc, access) };
        reg.register(Arc::new(m)).unwrap()
    }

    fn targets(n: &[FakeNic]) -> Vec<&dyn MrTarget> {
        n.iter().map(|n| n as &dyn MrTarget).collect()
    }

    #[test]
    fn device_memory_is_registered_through_its_dmabuf_with_the_regions_rights() {
        let log = Log::default();
        let n = nics(&log, &[true, true]);
        let copier = FakeCopier::new(0x123, 4096);
        let reg = BufferRegistry::new();
        let base = 0x7f00_0000_1000;
        for (access, read, write) in [
            (Access::ReadWrite, true, true),
            (Access::ReadOnly, true, false),
            (Access::LocalOnly, false, false),
        ] {
            log.lock().unwrap().clear();
            let r = region(&reg, base, Location::Cuda(1), access);
            let got = register(&targets(&n), &r, Some(&copier)).unwrap();
            let exported = copier.exported.lock().unwrap();
            let ex = exported.last().unwrap();
            assert_eq!((ex.addr, ex.len), (base, 1 << 20));
            let fd = ex.fd;
            let rights = Rights {
                remote_read: read,
                remote_write: write,
            };
            let want: Vec<Call> = (0..2)
                .map(|i| Call::RegDmabuf {
                    nic: format!("mlx5_{i}"),
                    fd,
                    offset: 0x123,
                    len: 1 << 20,
                    iova: base,
                    rights,
                })
                .collect();
            assert_eq!(*log.lock().unwrap(), want);
            assert_eq!(
                got.mrs
                    .iter()
                    .map(|m| m.as_ref().unwrap().lkey())
                    .collect::<Vec<_>>(),
                [0x100, 0x101]
            );
            assert!(!ex.closed());
            // Unregistering deregisters on every NIC, then closes the dma-buf.
            drop(got);
            assert!(ex.closed(), "the dma-buf stays open after its MRs are gone");
            drop(exported);
            assert_eq!(
                log.lock().unwrap()[2..],
                [
                    Call::Dereg {
                        nic: "mlx5_0".into(),
                        key: 0x100
                    },
                    Call::Dereg {
                        nic: "mlx5_1".into(),
                        key: 0x101
                    }
                ]
            );
            reg.remove(base).unwrap();
        }
    }

    #[test]
    fn host_memory_is_registered_by_address() {
        let log = Log::default();
        let n = nics(&log, &[false]);
        let copier = FakeCopier::new(0, 0);
        let reg = BufferRegistry::new();
        let r = region(&reg, 0x5000_0000, Location::Cpu(0), Access::ReadOnly);
        let got = register(&targets(&n), &r, Some(&copier)).unwrap();
        assert!(got.dmabuf.is_none());
        assert!(copier.exported.lock().unwrap().is_empty());
        assert_eq!(
            log.lock().unwrap()[..],
            [Call::Reg {
                nic: "mlx5_0".into(),
                addr: 0x5000_0000,
                len: 1 << 20,
                rights: Rights {
                    remote_read: true,
                    remote_write: false
                }
            }]
        );
    }

    #[test]
    fn nics_refusing_dmabuf_are_named_and_left_out_and_all_refusing_fails() {
        let log = Log::default();
        let n = nics(&log, &[false, true, false]);
        let copier = FakeCopier::new(0, 0);
        let reg = BufferRegistry::new();
        let r = region(&reg, 0x7f00_0000_0000, Location::Cuda(0), Access::ReadWrite);
        // Only mlx5_1 accepts: the region gets that one MR; the others are named.
        let got = register(&targets(&n), &r, Some(&copier)).unwrap();
        assert_eq!(
            got.mrs
                .iter()
                .map(|m| m.as_ref().map(|m| m.lkey()))
                .collect::<Vec<_>>(),
            [None, Some(0x101), None]
        );
        let why: Vec<String> = got.refused.iter().map(|e| e.to_string()).collect();
        assert_eq!(why.len(), 2);
        for (w, nic) in why.iter().zip(["mlx5_0", "mlx5_2"]) {
            assert!(
                w.contains(&format!(
                    "RDMA device {nic} does not support dma-buf MRs (GPUDirect RDMA)"
                )),
                "{w}"
            );
            assert!(w.contains("Operation not supported"), "{w}");
        }
        drop(got);
        assert!(copier.exported.lock().unwrap()[0].closed());
        // No NIC accepts: the registration fails with the first refusal.
        let n = nics(&log, &[false, false]);
        let e = register(&targets(&n), &r, Some(&copier)).err().unwrap();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(
            e.to_string()
                .contains("RDMA device mlx5_0 does not support dma-buf MRs (GPUDirect RDMA)"),
            "{e}"
        );
        assert!(
            copier.exported.lock().unwrap()[1].closed(),
            "the dma-buf is closed again"
        );
    }

    #[test]
    fn device_memory_without_a_runtime_or_with_a_short_dmabuf_is_refused() {
        let log = Log::default();
        let n = nics(&log, &[true]);
        let reg = BufferRegistry::new();
        let r = region(&reg, 0x7f00_0000_0000, Location::Cuda(0), Access::ReadWrite);
        let e = register(&targets(&n), &r, None).err().unwrap();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.to_string().contains("no device runtime"), "{e}");
        let short = FakeCopier::new(0, -1);
        let e = register(&targets(&n), &r, Some(&short)).err().unwrap();
        assert!(e.to_string().contains("exported a dma-buf of"), "{e}");
        assert!(log.lock().unwrap().is_empty(), "no NIC was asked");
    }

    #[test]
    fn device_buffers_move_only_when_registered_on_both_sides() {
        let buf = |name: &str, addr| BufferDesc {
            name: name.into(),
            addr,
            length: 4096,
            ..Default::default()
        };
        let mut peer = SegmentDescriptor::default();
        let host = buf("cpu:0", 0x1000);
        let vram = buf("cuda:0", 0x7f00_0000_0000);
        let other = buf("cuda:1", 0x7f80_0000_0000);
        // Nothing published: only host buffers.
        assert!(can_move(&Location::Cpu(0), true, &host, &peer));
        assert!(!can_move(&Location::Cpu(0), true, &vram, &peer));
        publish(&mut peer, &[]);
        assert!(!peer.extra.contains_key(GPUDIRECT_KEY));
        publish(&mut peer, &[(0x7f00_0000_0000, vec!["mlx5_1".into()])]);
        // Through the descriptor's JSON, as a peer reads it.
        let peer: SegmentDescriptor =
            serde_json::from_str(&serde_json::to_string(&peer).unwrap()).unwrap();
        assert!(can_move(&Location::Cpu(0), true, &vram, &peer));
        assert!(!can_move(&Location::Cpu(0), true, &other, &peer));
        assert_eq!(remote_nics(&peer, vram.addr), Some(vec!["mlx5_1"]));
        assert_eq!(remote_nics(&peer, other.addr), None);
        // A local device region moves only once its dma-buf MRs exist.
        assert!(can_move(&Location::Cuda(0), true, &vram, &peer));
        assert!(!can_move(&Location::Cuda(0), false, &vram, &peer));
        assert!(!can_move(&Location::Cuda(0), false, &host, &peer));
        assert!(can_move(&Location::Cuda(0), true, &host, &peer));
    }
}
