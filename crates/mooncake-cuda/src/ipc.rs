//! What the CUDA IPC transport publishes in a segment descriptor, and how it tells whether
//! a peer shares this host and is still alive.
//!
//! Descriptor fields (in `extra`, ignored by other transports and by the reference):
//! - `cuda_host`: the host identity (boot id and pid namespace), so only processes that
//!   can open each other's IPC handles and see each other's pids try;
//! - `cuda_proc`: `{pid, start}` of the owning process (start time in clock ticks since boot,
//!   which tells a recycled pid apart);
//! - `cuda_ipc`: per published device buffer `{addr, len, handle, offset, uuid}`: the IPC
//!   handle of the allocation holding it, the buffer's offset in that allocation, and the
//!   device's UUID (ordinals differ between processes).

use std::os::fd::OwnedFd;

use mooncake_core::{Error, ErrorKind, Result, SegmentDescriptor};
use serde::{Deserialize, Serialize};

use crate::sys::{self, IpcHandle};

/// Descriptor key of the host identity.
pub(crate) const HOST_KEY: &str = "cuda_host";
/// Descriptor key of the owning process.
pub(crate) const PROC_KEY: &str = "cuda_proc";
/// Descriptor key of the published device buffers.
pub(crate) const IPC_KEY: &str = "cuda_ipc";

/// This host and pid namespace: processes with the same identity can open each other's
/// CUDA IPC handles and watch each other's pids.
pub(crate) fn host_identity() -> Option<String> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let ns = std::fs::read_link("/proc/self/ns/pid").ok()?;
    Some(format!("{}/{}", boot.trim(), ns.display()))
}

/// The start time of process `pid` (field 22 of `/proc/<pid>/stat`), if it exists.
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The owning process of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ProcId {
    pub(crate) pid: u32,
    pub(crate) start: u64,
}

impl ProcId {
    pub(crate) fn current() -> Self {
        let pid = std::process::id();
        Self {
            pid,
            start: start_time(pid).unwrap_or(0),
        }
    }
}

/// One published device buffer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct IpcBuffer {
    /// The buffer's address in its owner's address space (as in `buffers`).
    pub(crate) addr: u64,
    pub(crate) len: u64,
    /// The allocation's IPC handle, hex.
    pub(crate) handle: String,
    /// Offset of `addr` inside the allocation.
    pub(crate) offset: u64,
    /// The device's UUID, hex.
    pub(crate) uuid: String,
}

impl IpcBuffer {
    pub(crate) fn handle(&self) -> Result<IpcHandle> {
        let b = unhex(&self.handle)?;
        let arr: [u8; 64] = b
            .try_into()
            .map_err(|_| Error::new(ErrorKind::Metadata, "a CUDA IPC handle is not 64 bytes"))?;
        Ok(IpcHandle(arr))
    }

    pub(crate) fn uuid(&self) -> Option<[u8; 16]> {
        unhex(&self.uuid).ok()?.try_into().ok()
    }
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return Err(Error::new(
            ErrorKind::Metadata,
            "odd-length hex in a descriptor",
        ));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            s.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| Error::new(ErrorKind::Metadata, "bad hex in a descriptor"))
        })
        .collect()
}

/// What a peer's descriptor says for this transport.
#[derive(Debug, Clone)]
pub(crate) struct PeerInfo {
    pub(crate) host: String,
    pub(crate) proc: ProcId,
    /// Sorted by address.
    pub(crate) buffers: Vec<IpcBuffer>,
}

impl PeerInfo {
    /// Reads the transport's fields; `None` when the peer publishes none.
    pub(crate) fn parse(d: &SegmentDescriptor) -> Option<Self> {
        let host = d.extra.get(HOST_KEY)?.as_str()?.to_string();
        let proc: ProcId = serde_json::from_value(d.extra.get(PROC_KEY)?.clone()).ok()?;
        let mut buffers: Vec<IpcBuffer> = d
            .extra
            .get(IPC_KEY)
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .unwrap_or_default();
        buffers.sort_by_key(|b| b.addr);
        Some(Self {
            host,
            proc,
            buffers,
        })
    }

    /// The published buffer holding all of `[addr, addr + len)`.
    pub(crate) fn buffer(&self, addr: u64, len: u64) -> Option<&IpcBuffer> {
        let end = addr.checked_add(len)?;
        let i = self.buffers.partition_point(|b| b.addr <= addr);
        let b = self.buffers.get(i.checked_sub(1)?)?;
        (end <= b.addr + b.len && len > 0).then_some(b)
    }
}

/// Writes this process's fields into `d`.
pub(crate) fn publish(d: &mut SegmentDescriptor, host: &str, buffers: &[IpcBuffer]) {
    d.extra
        .insert(HOST_KEY.into(), serde_json::Value::String(host.into()));
    d.extra.insert(
        PROC_KEY.into(),
        serde_json::to_value(ProcId::current()).expect("serialises"),
    );
    d.extra.insert(
        IPC_KEY.into(),
        serde_json::to_value(buffers).expect("serialises"),
    );
}

/// Watches a peer process: has it exited (or was its pid recycled)?
#[derive(Debug)]
pub(crate) struct ProcWatch {
    proc: ProcId,
    pidfd: Option<OwnedFd>,
    /// Gone (or not the published process) when the watch started.
    dead: bool,
}

impl ProcWatch {
    /// Starts watching; a process that is gone (or is not the one published) is dead from
    /// the start.
    pub(crate) fn new(proc: ProcId) -> Self {
        let same = || start_time(proc.pid) == Some(proc.start);
        let pidfd = same()
            .then(|| sys::pidfd_open(proc.pid as i32).ok())
            .flatten();
        // Checked again after opening: the pid could have been recycled in between.
        let dead = !same();
        Self { proc, pidfd, dead }
    }

    /// True while the process runs.
    pub(crate) fn alive(&self) -> bool {
        if self.dead {
            return false;
        }
        match &self.pidfd {
            Some(fd) => !sys::pidfd_exited(fd),
            None => start_time(self.proc.pid) == Some(self.proc.start),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_fields_round_trip() {
        let mut d = SegmentDescriptor {
            name: "n".into(),
            ..Default::default()
        };
        let bufs = vec![
            IpcBuffer {
                addr: 0x2000,
                len: 0x1000,
                handle: hex(&[7; 64]),
                offset: 16,
                uuid: hex(&[1; 16]),
            },
            IpcBuffer {
                addr: 0x1000,
                len: 0x800,
                handle: hex(&[8; 64]),
                offset: 0,
                uuid: hex(&[2; 16]),
            },
        ];
        publish(&mut d, "host-a", &bufs);
        let d = SegmentDescriptor::from_json(&d.to_json(), "t").unwrap();
        let p = PeerInfo::parse(&d).unwrap();
        assert_eq!(p.host, "host-a");
        assert_eq!(p.proc, ProcId::current());
        assert_eq!(
            p.buffer(0x2000, 0x1000).unwrap().handle().unwrap().0,
            [7; 64]
        );
        assert_eq!(p.buffer(0x1100, 0x10).unwrap().uuid(), Some([2; 16]));
        assert!(p.buffer(0x1700, 0x200).is_none());
        assert!(p.buffer(0x2fff, 2).is_none());
        assert!(p.buffer(0x2000, 0).is_none());
        assert!(p.buffer(u64::MAX, 2).is_none());
        assert!(PeerInfo::parse(&SegmentDescriptor::default()).is_none());
    }

    #[test]
    fn host_identity_and_process_watch() {
        let host = host_identity().expect("procfs");
        assert_eq!(Some(host), host_identity());
        assert!(ProcWatch::new(ProcId::current()).alive());
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let id = ProcId {
            pid: child.id(),
            start: start_time(child.id()).unwrap(),
        };
        let w = ProcWatch::new(id);
        assert!(w.alive());
        assert!(
            !ProcWatch::new(ProcId {
                start: id.start + 1,
                ..id
            })
            .alive(),
            "a recycled pid is not the published process"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!w.alive());
    }
}
