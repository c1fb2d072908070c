//! `mooncake.engine`: `TransferEngine`, `TransferOpcode`, `TransferNotify`,
//! `InnerTransferEngine`, the `SUPPORT_*` flags.
//!
//! # Behavior
//! - Every method returns ints as Mooncake's binding does: 0 = done (for transfers: the bytes
//!   are in the destination's memory), negative = error. Nothing raises for a remote failure;
//!   the reason is logged (`MC_LOG_LEVEL=info`).
//! - Every wait releases the GIL; the object is shared between threads (vLLM calls it from a
//!   10-thread pool) with no lock held across a transfer.
//! - Addresses are integers the caller vouches for: a registered range must stay valid until
//!   `unregister_memory` returns for it (which waits for transfers using it). Registration
//!   refuses ranges that are not mapped in this process, and CUDA memory named as host memory.

use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use mooncake::{ErrorKind, LocalBuffer, MemorySegment, Opcode, TransferStatus};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyType};

use crate::mem;
use crate::node::{AsyncBatch, EngineState, metadata_url};
use crate::rpc;

/// Direction of a transfer (`TransferOpcode.Read` / `.Write`).
#[pyclass(module = "mooncake.engine", eq, eq_int, frozen, from_py_object)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum TransferOpcode {
    /// Read from the peer into local memory.
    Read = 0,
    /// Write local memory to the peer.
    Write = 1,
}

impl From<TransferOpcode> for Opcode {
    fn from(o: TransferOpcode) -> Self {
        match o {
            TransferOpcode::Read => Opcode::Read,
            TransferOpcode::Write => Opcode::Write,
        }
    }
}

/// A message delivered to the target after a transfer (`name`, `msg`).
#[pyclass(module = "mooncake.engine", get_all, set_all, from_py_object)]
#[derive(Clone, Debug, Default)]
pub(crate) struct TransferNotify {
    name: String,
    msg: String,
}

#[pymethods]
impl TransferNotify {
    #[new]
    #[pyo3(signature = (name=String::new(), msg=String::new()))]
    fn new(name: String, msg: String) -> Self {
        Self { name, msg }
    }

    fn __repr__(&self) -> String {
        format!("TransferNotify(name={:?}, msg={:?})", self.name, self.msg)
    }
}

/// An initialised engine, as `get_engine()` returns it; `MooncakeDistributedStore.setup`
/// accepts it as `engine=` to share the engine.
#[pyclass(module = "mooncake.engine", frozen)]
pub(crate) struct InnerTransferEngine {
    pub(crate) state: Arc<EngineState>,
}

#[pymethods]
impl InnerTransferEngine {
    fn __repr__(&self) -> String {
        format!("InnerTransferEngine({:?})", self.state.engine.local_name())
    }

    /// The segment name (`host:port` in P2P mode).
    fn get_local_name(&self) -> String {
        self.state.engine.local_name().to_string()
    }
}

/// Mooncake's Python transfer engine.
#[pyclass(module = "mooncake.engine", frozen, subclass)]
pub(crate) struct TransferEngine {
    state: RwLock<Option<Arc<EngineState>>>,
}

fn log_err(what: &str, e: impl std::fmt::Display) -> i32 {
    tracing::warn!("{what}: {e}");
    -1
}

impl TransferEngine {
    fn state(&self) -> Option<Arc<EngineState>> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn init(&self, py: Python<'_>, host: &str, url: &str, protocol: &str, device: &str) -> i32 {
        let (host, url, protocol, device) = (
            host.to_string(),
            url.to_string(),
            protocol.to_string(),
            device.to_string(),
        );
        // Drop a previous engine before binding a new one.
        let old = self.state.write().unwrap_or_else(|p| p.into_inner()).take();
        match py.detach(move || {
            drop(old);
            EngineState::build(&host, &url, &protocol, &device)
        }) {
            Ok(s) => {
                *self.state.write().unwrap_or_else(|p| p.into_inner()) = Some(s);
                0
            }
            Err(e) => log_err("initialize", e),
        }
    }

    /// Submits a batch to `target` and returns it with its deadline.
    fn submit(
        st: &EngineState,
        target: &str,
        op: Opcode,
        locals: &[u64],
        remotes: &[u64],
        lens: &[u64],
    ) -> Result<AsyncBatch, String> {
        let bytes: u64 = lens.iter().fold(0u64, |a, &l| a.saturating_add(l));
        let batch = st
            .engine
            .batch_transfer_async(target, op, locals, remotes, lens)
            .map_err(|e| e.to_string())?;
        Ok(AsyncBatch {
            batch,
            deadline: st.deadline(bytes),
        })
    }

    /// A synchronous transfer: 0 once every byte is at the destination, -1 otherwise.
    #[allow(clippy::too_many_arguments)]
    fn sync(
        &self,
        py: Python<'_>,
        target: &str,
        op: Opcode,
        locals: Vec<u64>,
        remotes: Vec<u64>,
        lens: Vec<u64>,
        notify: Option<TransferNotify>,
    ) -> i32 {
        let Some(st) = self.state() else {
            return log_err("transfer", "the engine is not initialised");
        };
        if locals.is_empty() && locals.len() == remotes.len() && lens.is_empty() {
            return 0;
        }
        let target = target.to_string();
        py.detach(move || {
            let b = match Self::submit(&st, &target, op, &locals, &remotes, &lens) {
                Ok(b) => b,
                Err(e) => return log_err(&format!("transfer to {target}"), e),
            };
            if let Err(e) = b.batch.wait_blocking(Some(b.deadline)) {
                if matches!(e.kind(), ErrorKind::PeerUnreachable | ErrorKind::Timeout) {
                    refresh_in_background(&st, &target);
                }
                return log_err(&format!("transfer to {target}"), e);
            }
            if let Some(n) = notify
                && let Err(e) = rpc::send_notify(&st.engine, &st.notifies, &target, &n.name, &n.msg)
            {
                return log_err(&format!("notify to {target}"), e);
            }
            0
        })
    }

    fn submit_async(
        &self,
        py: Python<'_>,
        target: &str,
        op: Opcode,
        locals: Vec<u64>,
        remotes: Vec<u64>,
        lens: Vec<u64>,
    ) -> u64 {
        let Some(st) = self.state() else {
            log_err("async transfer", "the engine is not initialised");
            return 0;
        };
        let target = target.to_string();
        py.detach(
            move || match Self::submit(&st, &target, op, &locals, &remotes, &lens) {
                Ok(b) => {
                    let id = st.next_batch.fetch_add(1, Ordering::Relaxed);
                    st.batches
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(id, b);
                    id
                }
                Err(e) => {
                    log_err(&format!("async transfer to {target}"), e);
                    0
                }
            },
        )
    }
}

/// After a failure that may mean the peer restarted, reads its descriptor again off the
/// caller's thread; connections other threads use are left alone.
fn refresh_in_background(st: &Arc<EngineState>, target: &str) {
    let engine = st.engine.clone();
    let target = target.to_string();
    let _ = std::thread::Builder::new()
        .name("mooncake-py-refresh".into())
        .spawn(move || {
            if let Ok(h) = engine.open_segment_blocking(&target)
                && let Err(e) = mooncake::block_on(engine.refresh_segment(h))
            {
                tracing::debug!(segment = target, "refreshing a descriptor failed: {e}");
            }
        });
}

#[pymethods]
impl TransferEngine {
    #[new]
    fn new() -> Self {
        Self {
            state: RwLock::new(None),
        }
    }

    /// `TransferEngine.TransferOpcode` (the enum, also at module level).
    #[classattr]
    #[pyo3(name = "TransferOpcode")]
    fn opcode_type(py: Python<'_>) -> Py<PyType> {
        py.get_type::<TransferOpcode>().unbind()
    }

    /// Starts the engine. `metadata_server`: `P2PHANDSHAKE`, `http://h:p/metadata`,
    /// `redis://h:p`, `etcd://h:p` or bare `h:p` (etcd). Returns 0 or -1.
    fn initialize(
        &self,
        py: Python<'_>,
        local_hostname: &str,
        metadata_server: &str,
        protocol: &str,
        device_name: &str,
    ) -> i32 {
        self.init(py, local_hostname, metadata_server, protocol, device_name)
    }

    /// `initialize` with the metadata backend named apart (`etcd`, `redis`, `http`, `p2p`).
    fn initialize_ext(
        &self,
        py: Python<'_>,
        local_hostname: &str,
        metadata_server: &str,
        protocol: &str,
        device_name: &str,
        metadata_type: &str,
    ) -> i32 {
        let url = metadata_url(metadata_server, metadata_type);
        self.init(py, local_hostname, &url, protocol, device_name)
    }

    /// The RPC (handshake) port; the segment name in P2P mode is `host:<this port>`.
    fn get_rpc_port(&self) -> i32 {
        self.state().map_or(-1, |s| i32::from(s.rpc_port))
    }

    /// This engine's segment name (`host:port` in P2P mode).
    fn get_local_name(&self) -> String {
        self.state()
            .map(|s| s.engine.local_name().to_string())
            .unwrap_or_default()
    }

    /// Registers `capacity` bytes at `buffer_addr` (host or CUDA memory; `location` `*`
    /// detects which). The memory must stay valid until `unregister_memory`. 0 or -1.
    #[pyo3(signature = (buffer_addr, capacity, location="*"))]
    fn register_memory(
        &self,
        py: Python<'_>,
        buffer_addr: u64,
        capacity: u64,
        location: &str,
    ) -> i32 {
        self.batch_register_memory(py, vec![buffer_addr], vec![capacity], location)
    }

    /// Unregisters the region at `addr`; returns once no transfer uses it. 0 or -1.
    fn unregister_memory(&self, py: Python<'_>, addr: u64) -> i32 {
        self.batch_unregister_memory(py, vec![addr])
    }

    /// Registers many regions (all or none). 0 or -1.
    #[pyo3(signature = (buffer_addresses, capacities, location="*"))]
    fn batch_register_memory(
        &self,
        py: Python<'_>,
        buffer_addresses: Vec<u64>,
        capacities: Vec<u64>,
        location: &str,
    ) -> i32 {
        let Some(st) = self.state() else {
            return log_err("register_memory", "the engine is not initialised");
        };
        if buffer_addresses.len() != capacities.len() {
            return log_err(
                "batch_register_memory",
                "addresses and capacities differ in length",
            );
        }
        let location = location.to_string();
        py.detach(move || {
            let mut done = Vec::new();
            for (&addr, &len) in buffer_addresses.iter().zip(&capacities) {
                let r = mem::resolve_location(addr, len, &location).and_then(|loc| {
                    // SAFETY: the caller's contract (this method's docs): `[addr, addr+len)`
                    // stays valid until `unregister_memory(addr)` returns. We checked it is a
                    // non-wrapping range that is mapped (host) or CUDA memory of the named
                    // device, so no transfer touches it under the wrong kind of memory.
                    unsafe { st.engine.register_memory(addr, len as usize, &loc, true) }
                        .map_err(|e| e.to_string())
                });
                if let Err(e) = r {
                    for a in done {
                        let _ = st.engine.unregister_memory(a);
                    }
                    return log_err(&format!("register_memory({addr:#x}, {len})"), e);
                }
                done.push(addr);
            }
            0
        })
    }

    /// Unregisters many regions. 0, or -1 if any was not registered.
    fn batch_unregister_memory(&self, py: Python<'_>, buffer_addresses: Vec<u64>) -> i32 {
        let Some(st) = self.state() else {
            return log_err("unregister_memory", "the engine is not initialised");
        };
        py.detach(move || {
            let mut rc = 0;
            for a in buffer_addresses {
                if let Err(e) = st.engine.unregister_memory(a) {
                    rc = log_err(&format!("unregister_memory({a:#x})"), e);
                }
            }
            rc
        })
    }

    /// Writes `length` bytes at `buffer` to `peer_buffer_address` of `target_hostname`.
    #[pyo3(signature = (target_hostname, buffer, peer_buffer_address, length, transport_hint=""))]
    fn transfer_sync_write(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffer: u64,
        peer_buffer_address: u64,
        length: u64,
        transport_hint: &str,
    ) -> i32 {
        let _ = transport_hint;
        self.sync(
            py,
            target_hostname,
            Opcode::Write,
            vec![buffer],
            vec![peer_buffer_address],
            vec![length],
            None,
        )
    }

    /// Reads `length` bytes at `peer_buffer_address` of `target_hostname` into `buffer`.
    #[pyo3(signature = (target_hostname, buffer, peer_buffer_address, length, transport_hint=""))]
    fn transfer_sync_read(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffer: u64,
        peer_buffer_address: u64,
        length: u64,
        transport_hint: &str,
    ) -> i32 {
        let _ = transport_hint;
        self.sync(
            py,
            target_hostname,
            Opcode::Read,
            vec![buffer],
            vec![peer_buffer_address],
            vec![length],
            None,
        )
    }

    /// One transfer of `opcode`, then `notify` delivered to the target. 0 or -1.
    #[pyo3(signature = (target_hostname, buffer, peer_buffer_address, length, opcode, notify=None, transport_hint=""))]
    #[allow(clippy::too_many_arguments)]
    fn transfer_sync(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffer: u64,
        peer_buffer_address: u64,
        length: u64,
        opcode: TransferOpcode,
        notify: Option<TransferNotify>,
        transport_hint: &str,
    ) -> i32 {
        let _ = transport_hint;
        self.sync(
            py,
            target_hostname,
            opcode.into(),
            vec![buffer],
            vec![peer_buffer_address],
            vec![length],
            notify,
        )
    }

    /// Many writes to one target, waited for together. 0 or -1.
    #[pyo3(signature = (target_hostname, buffers, peer_buffer_addresses, lengths, transport_hint=""))]
    fn batch_transfer_sync_write(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffers: Vec<u64>,
        peer_buffer_addresses: Vec<u64>,
        lengths: Vec<u64>,
        transport_hint: &str,
    ) -> i32 {
        let _ = transport_hint;
        self.sync(
            py,
            target_hostname,
            Opcode::Write,
            buffers,
            peer_buffer_addresses,
            lengths,
            None,
        )
    }

    /// Many reads from one target, waited for together. 0 or -1.
    #[pyo3(signature = (target_hostname, buffers, peer_buffer_addresses, lengths, transport_hint=""))]
    fn batch_transfer_sync_read(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffers: Vec<u64>,
        peer_buffer_addresses: Vec<u64>,
        lengths: Vec<u64>,
        transport_hint: &str,
    ) -> i32 {
        let _ = transport_hint;
        self.sync(
            py,
            target_hostname,
            Opcode::Read,
            buffers,
            peer_buffer_addresses,
            lengths,
            None,
        )
    }

    /// Many transfers of `opcode`, then `notify`. 0 or -1.
    #[pyo3(signature = (target_hostname, buffers, peer_buffer_addresses, lengths, opcode, notify=None, transport_hint=""))]
    #[allow(clippy::too_many_arguments)]
    fn batch_transfer_sync(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffers: Vec<u64>,
        peer_buffer_addresses: Vec<u64>,
        lengths: Vec<u64>,
        opcode: TransferOpcode,
        notify: Option<TransferNotify>,
        transport_hint: &str,
    ) -> i32 {
        let _ = transport_hint;
        self.sync(
            py,
            target_hostname,
            opcode.into(),
            buffers,
            peer_buffer_addresses,
            lengths,
            notify,
        )
    }

    /// Submits one write; returns a batch id (0 on failure) for `transfer_check_status`.
    #[pyo3(signature = (target_hostname, buffer, peer_buffer_address, length, transport_hint=""))]
    fn transfer_submit_write(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffer: u64,
        peer_buffer_address: u64,
        length: u64,
        transport_hint: &str,
    ) -> u64 {
        let _ = transport_hint;
        self.submit_async(
            py,
            target_hostname,
            Opcode::Write,
            vec![buffer],
            vec![peer_buffer_address],
            vec![length],
        )
    }

    /// Submits many writes; returns a batch id (0 on failure).
    #[pyo3(signature = (target_hostname, buffers, peer_buffer_addresses, lengths, transport_hint=""))]
    fn batch_transfer_async_write(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffers: Vec<u64>,
        peer_buffer_addresses: Vec<u64>,
        lengths: Vec<u64>,
        transport_hint: &str,
    ) -> u64 {
        let _ = transport_hint;
        self.submit_async(
            py,
            target_hostname,
            Opcode::Write,
            buffers,
            peer_buffer_addresses,
            lengths,
        )
    }

    /// Submits many reads; returns a batch id (0 on failure).
    #[pyo3(signature = (target_hostname, buffers, peer_buffer_addresses, lengths, transport_hint=""))]
    fn batch_transfer_async_read(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffers: Vec<u64>,
        peer_buffer_addresses: Vec<u64>,
        lengths: Vec<u64>,
        transport_hint: &str,
    ) -> u64 {
        let _ = transport_hint;
        self.submit_async(
            py,
            target_hostname,
            Opcode::Read,
            buffers,
            peer_buffer_addresses,
            lengths,
        )
    }

    /// Submits many transfers of `opcode`; returns a batch id (0 on failure).
    #[pyo3(signature = (target_hostname, buffers, peer_buffer_addresses, lengths, opcode, transport_hint=""))]
    #[allow(clippy::too_many_arguments)]
    fn batch_transfer_async(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffers: Vec<u64>,
        peer_buffer_addresses: Vec<u64>,
        lengths: Vec<u64>,
        opcode: TransferOpcode,
        transport_hint: &str,
    ) -> u64 {
        let _ = transport_hint;
        self.submit_async(
            py,
            target_hostname,
            opcode.into(),
            buffers,
            peer_buffer_addresses,
            lengths,
        )
    }

    /// Status of a whole batch: 1 every task done (the id is freed), 0 pending, -1 some
    /// task failed (freed) or unknown id, -2 past its deadline and still running.
    fn transfer_check_status(&self, batch_id: u64) -> i32 {
        let Some(st) = self.state() else { return -1 };
        let mut map = st.batches.lock().unwrap_or_else(|p| p.into_inner());
        let Some(b) = map.get(&batch_id) else {
            return -1;
        };
        match b.batch.overall_status() {
            TransferStatus::Completed => {
                map.remove(&batch_id);
                1
            }
            TransferStatus::Pending if Instant::now() > b.deadline => -2,
            TransferStatus::Pending => 0,
            // Nothing was submitted (an empty batch): done.
            TransferStatus::Waiting => {
                map.remove(&batch_id);
                1
            }
            _ => {
                map.remove(&batch_id);
                -1
            }
        }
    }

    /// Waits for every batch in `batch_ids` (GIL released) and frees them: 0 if all
    /// completed, -1 otherwise.
    fn get_batch_transfer_status(&self, py: Python<'_>, batch_ids: Vec<u64>) -> i32 {
        let Some(st) = self.state() else { return -1 };
        py.detach(move || {
            let mut rc = 0;
            for id in batch_ids {
                let b = st
                    .batches
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                match b {
                    None => {
                        rc = log_err(
                            "get_batch_transfer_status",
                            format!("unknown batch id {id}"),
                        )
                    }
                    Some(b) => {
                        if let Err(e) = b.batch.wait_blocking(Some(b.deadline)) {
                            rc = log_err(&format!("batch {id}"), e);
                        }
                    }
                }
            }
            rc
        })
    }

    /// Address of the first buffer `segment_name` registered (0 if none or unreachable); the
    /// descriptor is read afresh.
    fn get_first_buffer_address(&self, py: Python<'_>, segment_name: &str) -> u64 {
        let Some(st) = self.state() else { return 0 };
        let name = segment_name.to_string();
        py.detach(move || {
            let r = st.engine.open_segment_blocking(&name).and_then(|h| {
                if h != mooncake::SegmentHandle::LOCAL {
                    mooncake::block_on(st.engine.refresh_segment(h))?;
                    Ok(st
                        .engine
                        .segment(h)?
                        .descriptor()
                        .buffers
                        .first()
                        .map_or(0, |b| b.addr))
                } else {
                    Ok(st
                        .engine
                        .local_descriptor()
                        .buffers
                        .first()
                        .map_or(0, |b| b.addr))
                }
            });
            r.unwrap_or_else(|e| {
                tracing::warn!("get_first_buffer_address({name}): {e}");
                0
            })
        })
    }

    /// Notifies received since the last call.
    fn get_notifies(&self) -> Vec<TransferNotify> {
        self.state()
            .map(|s| {
                s.notifies
                    .drain()
                    .into_iter()
                    .map(|(name, msg)| TransferNotify { name, msg })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// 0 if `peer_server_name`'s RPC port answers, -1 otherwise.
    fn send_probe(&self, py: Python<'_>, peer_server_name: &str) -> i32 {
        let Some(st) = self.state() else { return -1 };
        let peer = peer_server_name.to_string();
        py.detach(move || match rpc::probe(&st.engine, &peer) {
            Ok(()) => 0,
            Err(e) => log_err(&format!("probe {peer}"), e),
        })
    }

    /// The engine, to share with `MooncakeDistributedStore.setup(engine=...)`.
    fn get_engine(&self) -> PyResult<InnerTransferEngine> {
        self.state()
            .map(|state| InnerTransferEngine { state })
            .ok_or_else(|| {
                pyo3::exceptions::PyRuntimeError::new_err("the engine is not initialised")
            })
    }

    /// A process-unique integer naming the engine (0 before `initialize`).
    fn get_engine_ptr(&self) -> u64 {
        self.state().map_or(0, |s| Arc::as_ptr(&s) as u64)
    }

    /// `{"cpu:0": [[preferred NICs], [others]]}`, plus the installed transports.
    #[pyo3(signature = (device_name=None))]
    fn get_local_topology(&self, device_name: Option<&str>) -> String {
        let nics: Vec<&str> = device_name
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        let transports: Vec<String> = self
            .state()
            .map(|s| {
                s.engine
                    .transports()
                    .iter()
                    .map(|t| t.name().to_string())
                    .collect()
            })
            .unwrap_or_default();
        serde_json::json!({ "cpu:0": [nics, Vec::<String>::new()], "transports": transports })
            .to_string()
    }

    /// Allocates and registers `length` bytes of host memory; its address, 0 on failure.
    fn allocate_managed_buffer(&self, py: Python<'_>, length: u64) -> u64 {
        let Some(st) = self.state() else { return 0 };
        py.detach(move || {
            let buf = match LocalBuffer::new(length as usize) {
                Ok(b) => Arc::new(b),
                Err(e) => {
                    log_err("allocate_managed_buffer", e);
                    return 0;
                }
            };
            let addr = buf.base();
            if let Err(e) = st.engine.register(buf.clone()) {
                log_err("allocate_managed_buffer", e);
                return 0;
            }
            st.managed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(addr, buf);
            addr
        })
    }

    /// Unregisters and frees a buffer from `allocate_managed_buffer`. 0 or -1.
    fn free_managed_buffer(&self, py: Python<'_>, buffer_addr: u64, length: u64) -> i32 {
        let _ = length;
        let Some(st) = self.state() else { return -1 };
        py.detach(move || {
            let Some(buf) = st
                .managed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&buffer_addr)
            else {
                return log_err(
                    "free_managed_buffer",
                    format!("{buffer_addr:#x} is not a managed buffer"),
                );
            };
            let rc = match st.engine.unregister_memory(buffer_addr) {
                Ok(()) => 0,
                Err(e) => log_err("free_managed_buffer", e),
            };
            drop(buf);
            rc
        })
    }

    /// Copies `length` bytes of `src` into registered memory at `dest_address`. 0 or -1.
    fn write_bytes_to_buffer(&self, dest_address: u64, src: &[u8], length: u64) -> i32 {
        let Some(st) = self.state() else { return -1 };
        let n = (length as usize).min(src.len());
        match mem::write_registered(&st.engine, dest_address, &src[..n]) {
            Ok(()) => 0,
            Err(e) => log_err("write_bytes_to_buffer", e),
        }
    }

    /// `length` bytes of registered memory at `source_address` (empty on error).
    fn read_bytes_from_buffer<'py>(
        &self,
        py: Python<'py>,
        source_address: u64,
        length: u64,
    ) -> Bound<'py, PyBytes> {
        let data = self
            .state()
            .ok_or_else(|| "the engine is not initialised".to_string())
            .and_then(|st| mem::read_registered(&st.engine, source_address, length))
            .unwrap_or_else(|e| {
                log_err("read_bytes_from_buffer", e);
                Vec::new()
            });
        PyBytes::new(py, &data)
    }

    /// EFA only; a no-op here. 0.
    fn warmup_efa_segment(&self, segment_name: &str) -> i32 {
        let _ = segment_name;
        0
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<TransferEngine>()?;
    m.add_class::<TransferOpcode>()?;
    m.add_class::<TransferNotify>()?;
    m.add_class::<InnerTransferEngine>()?;
    for flag in [
        "SUPPORT_CUDA",
        "SUPPORT_EFA",
        "SUPPORT_HIP",
        "SUPPORT_MNNVL",
        "SUPPORT_MUSA",
        "SUPPORT_INTRA_NVLINK",
    ] {
        m.add(flag, false)?;
    }
    Ok(())
}
