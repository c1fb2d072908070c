//! Segment descriptors in Mooncake's JSON layout, and the metadata keys they live under.
//!
//! Field names match the reference (`mooncake/ram/<segment>`, `mooncake/rpc_meta/<server>`),
//! so descriptors written by one side can be read by the other. Fields the reference does not
//! know (`generation`, `tcp_data_addrs`) are optional and ignored by it.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::error::{Error, ErrorKind, Result};

/// One NIC of a segment (RDMA).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DeviceDesc {
    /// Device name, e.g. `mlx5_0` or `rxe0`.
    pub name: String,
    /// InfiniBand LID (0 on RoCE).
    #[serde(default)]
    pub lid: u16,
    /// GID as a colon-separated hex string.
    #[serde(default)]
    pub gid: String,
}

/// One registered buffer of a segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct BufferDesc {
    /// The buffer's location tag (`cpu:0`, `cuda:0`, `*`).
    pub name: String,
    /// Address of the first byte in the owner's address space.
    pub addr: u64,
    /// Length in bytes.
    pub length: u64,
    /// Remote keys, one per device (RDMA only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rkey: Vec<u32>,
    /// Local keys, one per device. Published by the reference; we never publish them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lkey: Vec<u32>,
    /// mooncake-rs: peers may read but not write the buffer (the owner registered it
    /// read-only). Initiators refuse writes to it before sending anything; the target (or
    /// its NIC) enforces it as well.
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_only: bool,
}

fn is_false(v: &bool) -> bool {
    !*v
}

/// A segment descriptor: what a peer needs to reach a segment's registered memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct SegmentDescriptor {
    /// Segment name (the engine's `local_server_name`).
    pub name: String,
    /// Transport names, comma-joined (`tcp`, `rdma`, `tcp,rdma`).
    #[serde(default)]
    pub protocol: String,
    /// When the descriptor was written (reference format: free text or a number).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub timestamp: String,
    /// TCP data port of the segment's TCP transport.
    #[serde(default, skip_serializing_if = "is_zero_u16")]
    pub tcp_data_port: u16,
    /// TCP framing version (the reference's v2 is acknowledged framing).
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub tcp_proto_version: u32,
    /// NICs (RDMA).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceDesc>,
    /// Location → `[[preferred NICs], [fallback NICs]]`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub priority_matrix: BTreeMap<String, Vec<Vec<String>>>,
    /// Registered buffers.
    #[serde(default)]
    pub buffers: Vec<BufferDesc>,
    /// mooncake-rs: bumped on every restart of the owning engine, so peers drop stale state.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub generation: u64,
    /// mooncake-rs: every `host:port` the TCP transport listens on (one per network path).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp_data_addrs: Vec<String>,
    /// Fields this version does not know (kept, and written back): transports add their own
    /// here (for example the RDMA handshake address).
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

fn is_zero_u16(v: &u16) -> bool {
    *v == 0
}
fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}
fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}

impl SegmentDescriptor {
    /// Parses a descriptor, naming `source` (a key or a peer) in the error.
    pub fn from_json(bytes: &[u8], source: &str) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(|e| {
            Error::new(
                ErrorKind::Metadata,
                format!("malformed segment descriptor from {source}: {e}"),
            )
        })
    }

    /// Serialises to JSON.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("descriptor serialises")
    }

    /// True if `protocol` lists `name`.
    pub fn speaks(&self, name: &str) -> bool {
        self.protocol.split(',').any(|p| p.trim() == name)
    }
}

/// `mooncake/rpc_meta/<server>`: where a server's RPC (handshake) port is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RpcMeta {
    /// Host name or IP address.
    pub ip_or_host_name: String,
    /// RPC port.
    pub rpc_port: u16,
}

/// Builds the metadata keys, with an optional cluster id (`MC_METADATA_CLUSTER_ID`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataKeys {
    prefix: String,
}

impl Default for MetadataKeys {
    fn default() -> Self {
        Self::new(None)
    }
}

impl MetadataKeys {
    /// Keys under `mooncake/`, or `mooncake/<cluster>/` when a cluster id is given.
    pub fn new(cluster_id: Option<&str>) -> Self {
        let prefix = match cluster_id.filter(|c| !c.is_empty()) {
            Some(c) => format!("mooncake/{c}/"),
            None => "mooncake/".to_string(),
        };
        Self { prefix }
    }

    /// Keys as the reference computes them from the environment (`MC_METADATA_CLUSTER_ID`).
    pub fn from_env() -> Self {
        Self::new(std::env::var("MC_METADATA_CLUSTER_ID").ok().as_deref())
    }

    /// The key of a segment's descriptor: `mooncake/ram/<segment>`, or `mooncake/<segment>`
    /// when the name contains a `/` (reference behaviour).
    pub fn segment(&self, segment: &str) -> String {
        if segment.contains('/') {
            format!("{}{segment}", self.prefix)
        } else {
            format!("{}ram/{segment}", self.prefix)
        }
    }

    /// The key of a server's RPC location: `mooncake/rpc_meta/<server>`.
    pub fn rpc_meta(&self, server: &str) -> String {
        format!("{}rpc_meta/{server}", self.prefix)
    }

    /// The common prefix of all segment keys.
    pub fn segment_prefix(&self) -> String {
        format!("{}ram/", self.prefix)
    }
}

/// A remote segment as the engine caches it: the descriptor plus a sorted range index.
#[derive(Debug, Clone)]
pub struct RemoteSegment {
    descriptor: SegmentDescriptor,
    /// `(addr, length, index into descriptor.buffers)`, sorted by address.
    ranges: Vec<(u64, u64, usize)>,
}

impl RemoteSegment {
    /// Indexes `descriptor`.
    pub fn new(descriptor: SegmentDescriptor) -> Self {
        let mut ranges: Vec<(u64, u64, usize)> = descriptor
            .buffers
            .iter()
            .enumerate()
            .map(|(i, b)| (b.addr, b.length, i))
            .collect();
        ranges.sort_unstable();
        Self { descriptor, ranges }
    }

    /// The segment's name.
    pub fn name(&self) -> &str {
        &self.descriptor.name
    }

    /// The descriptor.
    pub fn descriptor(&self) -> &SegmentDescriptor {
        &self.descriptor
    }

    /// Checks that `[addr, addr + len)` lies inside one published buffer.
    pub fn check_range(&self, addr: u64, len: u64) -> Result<()> {
        self.buffer_at(addr, len).map(|_| ())
    }

    /// The published buffer that holds all of `[addr, addr + len)`.
    pub fn buffer_at(&self, addr: u64, len: u64) -> Result<&BufferDesc> {
        let end = addr.checked_add(len).filter(|_| len > 0);
        let found = end.and_then(|end| {
            let i = self.ranges.partition_point(|&(b, _, _)| b <= addr);
            let (b, l, idx) = *self.ranges.get(i.checked_sub(1)?)?;
            (end <= b + l).then_some(idx)
        });
        found
            .map(|idx| &self.descriptor.buffers[idx])
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::RemoteAccess,
                    format!(
                        "range {addr:#x}+{len} is outside every buffer segment {:?} published",
                        self.name()
                    ),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_reference_layout() {
        let json = br#"{"name":"node1","protocol":"rdma","tcp_data_port":0,
            "devices":[{"name":"mlx5_0","lid":0,"gid":"fe80::1"}],
            "priority_matrix":{"cpu:0":[["mlx5_0"],[]]},
            "buffers":[{"name":"cpu:0","addr":4096,"length":8192,"rkey":[7],"lkey":[8]}]}"#;
        let d = SegmentDescriptor::from_json(json, "test").unwrap();
        assert_eq!(d.buffers[0].rkey, vec![7]);
        assert!(d.speaks("rdma"));
        let r = RemoteSegment::new(d);
        assert!(r.check_range(4096, 8192).is_ok());
        assert!(r.check_range(4096, 8193).is_err());
        assert!(r.check_range(0, 1).is_err());
        assert!(r.check_range(u64::MAX, 2).is_err());
        let e = SegmentDescriptor::from_json(b"{not json", "mooncake/ram/x").unwrap_err();
        assert!(e.to_string().contains("mooncake/ram/x"), "{e}");
    }

    #[test]
    fn keys_follow_the_reference() {
        let k = MetadataKeys::new(None);
        assert_eq!(k.segment("node1"), "mooncake/ram/node1");
        assert_eq!(k.segment("a/b"), "mooncake/a/b");
        assert_eq!(k.rpc_meta("node1"), "mooncake/rpc_meta/node1");
        assert_eq!(
            MetadataKeys::new(Some("c1")).segment("n"),
            "mooncake/c1/ram/n"
        );
    }
}
