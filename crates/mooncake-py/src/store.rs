//! `mooncake.store`: `MooncakeDistributedStore` over [`StoreClient`], `ReplicateConfig`, the
//! enums the integrations import, replica descriptors and `MooncakeHostMemAllocator`.
//!
//! # Behavior
//! - Return codes are the reference's: 0 or a negative store error code (-200 pool full,
//!   -600 invalid params / buffer too small, -704 missing, -706 leased, -707 lease expired);
//!   reads return the bytes read. `get` of a missing key returns empty bytes; `is_exist` is
//!   1 / 0 / -1. Calls before `setup` (or after `close`) return -1 (empty results).
//! - Sessions are named by key, as in the reference: `batch_put_session_end(keys)` and
//!   `batch_put_session_revoke(keys)` act on exactly those keys, wherever they started.
//! - Every call releases the GIL while it waits; the object is shared between threads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use mooncake::{ForeignMemory, Location};
use mooncake_store::{
    BufferRange, GetSession, PutSession, ReplicaDesc, ReplicaKind, StoreClient, StoreConfig,
    StoreError, StoreErrorCode, StoreResult,
};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};

use crate::engine::InnerTransferEngine;
use crate::mem::{self, HostAllocations};
use crate::node::{EngineState, host_of};

macro_rules! py_enum {
    ($(#[$m:meta])* $name:ident { $($v:ident = $n:literal),* $(,)? }) => {
        $(#[$m])*
        #[pyclass(module = "mooncake.store", eq, eq_int, frozen, from_py_object)]
        #[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
        #[allow(clippy::upper_case_acronyms, non_camel_case_types)]
        pub(crate) enum $name {
            #[default]
            $($v = $n,)*
        }
    };
}

py_enum!(
    /// What `put` does with an object's soft pin.
    SoftPinAction { PRESERVE = 0, ENABLE = 1, DISABLE = 2 }
);
py_enum!(
    /// The reference's object data types (stored, not interpreted).
    ObjectDataType {
        UNKNOWN = 0, KVCACHE = 1, TENSOR = 2, WEIGHT = 3, SAMPLE = 4, ACTIVATION = 5,
        GRADIENT = 6, OPTIMIZER_STATE = 7, METADATA = 8, GENERAL = 9,
    }
);
py_enum!(
    /// A replica's state.
    ReplicaStatus { UNDEFINED = 0, INITIALIZED = 1, PROCESSING = 2, COMPLETE = 3, REMOVED = 4, FAILED = 5 }
);
py_enum!(
    /// A copy/move task's state (the reference's admin tasks).
    TaskStatus { PENDING = 0, PROCESSING = 1, FAILED = 2, SUCCESS = 3 }
);
py_enum!(
    /// A copy/move task's kind.
    TaskType { REPLICA_COPY = 0, REPLICA_MOVE = 1 }
);

/// How many replicas to write and where (the reference's `ReplicateConfig`).
#[pyclass(module = "mooncake.store", get_all, set_all, from_py_object)]
#[derive(Clone, Debug)]
pub(crate) struct ReplicateConfig {
    replica_num: u32,
    nof_replica_num: u32,
    dfs_replica_num: u32,
    preferred_segment: String,
    preferred_segments: Vec<String>,
    preferred_nof_segments: Vec<String>,
    prefer_alloc_in_same_node: bool,
    with_hard_pin: bool,
    soft_pin_action: SoftPinAction,
    soft_pin_ttl_ms: Option<u64>,
    group_ids: Option<Vec<String>>,
    data_type: ObjectDataType,
}

impl Default for ReplicateConfig {
    fn default() -> Self {
        Self {
            replica_num: 1,
            nof_replica_num: 0,
            dfs_replica_num: 0,
            preferred_segment: String::new(),
            preferred_segments: Vec::new(),
            preferred_nof_segments: Vec::new(),
            prefer_alloc_in_same_node: false,
            with_hard_pin: false,
            soft_pin_action: SoftPinAction::PRESERVE,
            soft_pin_ttl_ms: None,
            group_ids: None,
            data_type: ObjectDataType::UNKNOWN,
        }
    }
}

#[pymethods]
impl ReplicateConfig {
    #[new]
    fn new() -> Self {
        Self::default()
    }

    fn __str__(&self) -> String {
        format!(
            "ReplicateConfig: {{ replica_num: {}, nof_replica_num: {}, dfs_replica_num: {}, soft_pin_action: {:?}, soft_pin_ttl_ms: {}, with_hard_pin: {}, preferred_segments: {:?}, preferred_nof_segments: {:?}, prefer_alloc_in_same_node: {}, data_type: {:?} }}",
            self.replica_num,
            self.nof_replica_num,
            self.dfs_replica_num,
            self.soft_pin_action,
            self.soft_pin_ttl_ms
                .map_or("default".to_string(), |t| t.to_string()),
            u8::from(self.with_hard_pin),
            self.preferred_segments,
            self.preferred_nof_segments,
            u8::from(self.prefer_alloc_in_same_node),
            self.data_type,
        )
    }
}

impl ReplicateConfig {
    fn to_rust(&self) -> mooncake_store::ReplicateConfig {
        let mut c = mooncake_store::ReplicateConfig::default();
        c.replica_num = self.replica_num.max(1);
        c.preferred_segments = self.preferred_segments.clone();
        c.preferred_segment = Some(self.preferred_segment.clone()).filter(|s| !s.is_empty());
        c.prefer_alloc_in_same_node = self.prefer_alloc_in_same_node;
        c.with_hard_pin = self.with_hard_pin;
        c.soft_pin_action = match self.soft_pin_action {
            SoftPinAction::PRESERVE => mooncake_store::SoftPinAction::Preserve,
            SoftPinAction::ENABLE => mooncake_store::SoftPinAction::Enable,
            SoftPinAction::DISABLE => mooncake_store::SoftPinAction::Disable,
        };
        c.soft_pin_ttl_ms = self.soft_pin_ttl_ms;
        c.group_ids = self.group_ids.clone().unwrap_or_default();
        c.data_type = self.data_type as u8;
        c
    }
}

fn cfg(c: Option<PyRef<'_, ReplicateConfig>>) -> mooncake_store::ReplicateConfig {
    c.map_or_else(|| ReplicateConfig::default().to_rust(), |c| c.to_rust())
}

/// Where a replica's buffer is (`buffer_address`, `size`, `transport_endpoint`).
#[pyclass(module = "mooncake.store", get_all, frozen)]
#[derive(Clone, Debug)]
pub(crate) struct Descriptor {
    buffer_address: u64,
    size: u64,
    transport_endpoint: String,
}

/// A memory replica (`buffer_descriptor`).
#[pyclass(module = "mooncake.store", get_all, frozen)]
#[derive(Clone, Debug)]
pub(crate) struct MemoryDescriptor {
    buffer_descriptor: Descriptor,
}

/// One replica of an object.
#[pyclass(module = "mooncake.store", frozen)]
#[derive(Clone, Debug)]
pub(crate) struct ReplicaDescriptor {
    desc: ReplicaDesc,
}

#[pymethods]
impl ReplicaDescriptor {
    fn is_memory_replica(&self) -> bool {
        self.desc.kind == ReplicaKind::Memory
    }

    fn is_disk_replica(&self) -> bool {
        self.desc.kind != ReplicaKind::Memory
    }

    fn is_local_disk_replica(&self) -> bool {
        self.desc.kind == ReplicaKind::LocalDisk
    }

    /// Replica descriptors are only handed out for complete objects.
    #[getter]
    fn status(&self) -> ReplicaStatus {
        ReplicaStatus::COMPLETE
    }

    fn get_memory_descriptor(&self) -> PyResult<MemoryDescriptor> {
        if !self.is_memory_replica() {
            return Err(pyo3::exceptions::PyRuntimeError::new_err(
                "not a memory replica",
            ));
        }
        Ok(MemoryDescriptor {
            buffer_descriptor: Descriptor {
                buffer_address: self.desc.addr,
                size: self.desc.len,
                transport_endpoint: self.desc.segment.clone(),
            },
        })
    }

    fn get_disk_descriptor(&self) -> PyResult<()> {
        Err(pyo3::exceptions::PyRuntimeError::new_err(
            "this store has no disk replicas",
        ))
    }

    fn __repr__(&self) -> String {
        format!(
            "ReplicaDescriptor(segment={:?}, addr={:#x}, size={}, kind={:?})",
            self.desc.segment, self.desc.addr, self.desc.len, self.desc.kind
        )
    }
}

/// Host memory for buffers shared with the store (`alloc(size)` → address, `free(addr)`).
/// Free only what is no longer registered.
#[pyclass(module = "mooncake.store", frozen)]
#[derive(Default)]
pub(crate) struct MooncakeHostMemAllocator {
    allocs: HostAllocations,
}

#[pymethods]
impl MooncakeHostMemAllocator {
    #[new]
    fn new() -> Self {
        Self::default()
    }

    /// Maps `size` zeroed bytes; the address, 0 on failure.
    fn alloc(&self, size: usize) -> u64 {
        self.allocs.alloc(size)
    }

    /// Unmaps an allocation of this allocator. 0 or -1.
    fn free(&self, ptr: u64) -> i32 {
        if self.allocs.free(ptr) { 0 } else { -1 }
    }
}

struct StoreState {
    client: StoreClient,
    _engine: Arc<EngineState>,
    put_sessions: Mutex<HashMap<String, Arc<Mutex<PutSession>>>>,
    get_sessions: Mutex<HashMap<String, Arc<GetSession>>>,
}

/// Mooncake Store's Python client.
#[pyclass(module = "mooncake.store", frozen, subclass)]
pub(crate) struct MooncakeDistributedStore {
    state: RwLock<Option<Arc<StoreState>>>,
}

fn code<T>(r: &StoreResult<T>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => {
            tracing::debug!("store: {e}");
            e.code()
        }
    }
}

fn bytes_read(r: StoreResult<u64>) -> i64 {
    match r {
        Ok(n) => n as i64,
        Err(e) => {
            tracing::debug!("store: {e}");
            i64::from(e.code())
        }
    }
}

fn invalid(msg: impl Into<String>) -> StoreError {
    StoreError::new(StoreErrorCode::InvalidParams, msg)
}

const NOT_SET_UP: i32 = -1;

/// A size given as an int or a string like `"4GB"`, `"512 MiB"`, `"1024"`.
pub(crate) fn parse_size(v: &Bound<'_, PyAny>) -> PyResult<u64> {
    if let Ok(n) = v.extract::<u64>() {
        return Ok(n);
    }
    let s: String = v.extract()?;
    let t = s.trim().to_ascii_lowercase().replace(' ', "");
    let digits: String = t
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let unit = &t[digits.len()..];
    let n: f64 = digits
        .parse()
        .map_err(|_| PyTypeError::new_err(format!("size {s:?} is not a number with a unit")))?;
    let mult: f64 = match unit.trim_end_matches('b').trim_end_matches('i') {
        "" => 1.0,
        "k" => 1024.0,
        "m" => 1024.0 * 1024.0,
        "g" => 1024.0 * 1024.0 * 1024.0,
        "t" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => {
            return Err(PyTypeError::new_err(format!(
                "size {s:?} has an unknown unit"
            )));
        }
    };
    Ok((n * mult) as u64)
}

impl MooncakeDistributedStore {
    fn st(&self) -> Option<Arc<StoreState>> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn connect(&self, py: Python<'_>, engine: Arc<EngineState>, cfg: StoreConfig) -> i32 {
        let master = cfg.master_addr.clone();
        match py
            .detach(move || StoreClient::connect(cfg, engine.engine.clone()).map(|c| (c, engine)))
        {
            Ok((client, engine)) => {
                let old = self
                    .state
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .replace(Arc::new(StoreState {
                        client,
                        _engine: engine,
                        put_sessions: Mutex::new(HashMap::new()),
                        get_sessions: Mutex::new(HashMap::new()),
                    }));
                if let Some(old) = old {
                    let _ = old.client.close();
                }
                0
            }
            Err(e) => {
                tracing::warn!("setup: cannot join the master at {master}: {e}");
                e.code()
            }
        }
    }
}

fn opt_str(d: &Bound<'_, PyDict>, k: &str) -> PyResult<Option<String>> {
    match d.get_item(k)? {
        Some(v) if !v.is_none() => Ok(Some(v.str()?.to_string())),
        _ => Ok(None),
    }
}

fn engine_for(
    py: Python<'_>,
    engine: Option<&Bound<'_, PyAny>>,
    local_hostname: &str,
    metadata_server: &str,
    protocol: &str,
    devices: &str,
) -> PyResult<Result<Arc<EngineState>, String>> {
    if let Some(e) = engine.filter(|e| !e.is_none()) {
        let inner = e.cast::<InnerTransferEngine>().map_err(|_| {
            PyTypeError::new_err("engine must be what TransferEngine.get_engine() returns")
        })?;
        return Ok(Ok(inner.get().state.clone()));
    }
    let (h, m, p, d) = (
        local_hostname.to_string(),
        metadata_server.to_string(),
        protocol.to_string(),
        devices.to_string(),
    );
    Ok(py.detach(move || EngineState::build(&h, &m, &p, &d)))
}

/// Puts every key to a per-key result list in input order, from groups of indices.
fn scatter<T: Clone>(n: usize, fill: T, parts: Vec<(Vec<usize>, Vec<T>)>) -> Vec<T> {
    let mut out = vec![fill; n];
    for (idx, vals) in parts {
        for (i, v) in idx.into_iter().zip(vals) {
            out[i] = v;
        }
    }
    out
}

/// Groups key indices by the session (pointer identity) they belong to.
fn group_by<S>(sessions: Vec<Option<Arc<S>>>) -> Vec<(Arc<S>, Vec<usize>)> {
    let mut groups: Vec<(Arc<S>, Vec<usize>)> = Vec::new();
    for (i, s) in sessions.into_iter().enumerate() {
        let Some(s) = s else { continue };
        match groups.iter_mut().find(|(g, _)| Arc::ptr_eq(g, &s)) {
            Some((_, v)) => v.push(i),
            None => groups.push((s, vec![i])),
        }
    }
    groups
}

fn ranges_of(
    ptrs: &[Vec<u64>],
    sizes: &[Vec<u64>],
    offsets: &[Vec<u64>],
) -> Vec<Result<Vec<BufferRange>, StoreError>> {
    (0..ptrs.len())
        .map(|i| {
            let (p, s, o) = (&ptrs[i], sizes.get(i), offsets.get(i));
            match (s, o) {
                (Some(s), Some(o)) if s.len() == p.len() && o.len() == p.len() => Ok(p
                    .iter()
                    .zip(s)
                    .zip(o)
                    .map(|((&addr, &len), &offset)| BufferRange { addr, len, offset })
                    .collect()),
                _ => Err(invalid("buffer, size and offset lists differ in length")),
            }
        })
        .collect()
}

fn pairs(ptrs: &[u64], sizes: &[u64]) -> Option<Vec<(u64, u64)>> {
    (ptrs.len() == sizes.len()).then(|| ptrs.iter().copied().zip(sizes.iter().copied()).collect())
}

#[pymethods]
impl MooncakeDistributedStore {
    #[new]
    fn new() -> Self {
        Self {
            state: RwLock::new(None),
        }
    }

    /// `setup(local_hostname, metadata_server, global_segment_size, local_buffer_size,
    /// protocol, rdma_devices, master_server_addr, engine=None, enable_ssd_offload=False,
    /// ssd_offload_path="", tenant_id="default", enable_client_http_server=False,
    /// client_http_port=9300)`, or `setup(config_dict)`. 0 or a negative code.
    #[pyo3(signature = (local_hostname, metadata_server=None, global_segment_size=None, local_buffer_size=None, protocol=None, rdma_devices=None, master_server_addr=None, engine=None, enable_ssd_offload=false, ssd_offload_path=None, tenant_id=None, enable_client_http_server=false, client_http_port=9300, ipc_socket_path=None))]
    #[allow(clippy::too_many_arguments)]
    fn setup(
        &self,
        py: Python<'_>,
        local_hostname: &Bound<'_, PyAny>,
        metadata_server: Option<String>,
        global_segment_size: Option<&Bound<'_, PyAny>>,
        local_buffer_size: Option<&Bound<'_, PyAny>>,
        protocol: Option<String>,
        rdma_devices: Option<String>,
        master_server_addr: Option<String>,
        engine: Option<&Bound<'_, PyAny>>,
        enable_ssd_offload: bool,
        ssd_offload_path: Option<String>,
        tenant_id: Option<String>,
        enable_client_http_server: bool,
        client_http_port: u16,
        ipc_socket_path: Option<String>,
    ) -> PyResult<i32> {
        let mb16 = (16u64 << 20).into_pyobject(py)?.into_any();
        // The dict form.
        if let Ok(d) = local_hostname.cast::<PyDict>() {
            let req = |k: &str| -> PyResult<String> {
                opt_str(d, k)?.ok_or_else(|| {
                    PyTypeError::new_err(format!("setup(config): missing required key '{k}'"))
                })
            };
            let size = |k: &str| -> PyResult<u64> {
                match d.get_item(k)? {
                    Some(v) if !v.is_none() => parse_size(&v),
                    _ => parse_size(&mb16),
                }
            };
            let flag = |k: &str| -> PyResult<bool> {
                Ok(d.get_item(k)?
                    .map(|v| v.is_truthy())
                    .transpose()?
                    .unwrap_or(false))
            };
            let local = req("local_hostname")?;
            let md = req("metadata_server")?;
            let gss = size("global_segment_size")?;
            let lbs = size("local_buffer_size")?;
            let proto = opt_str(d, "protocol")?.unwrap_or_else(|| "tcp".into());
            let devs = opt_str(d, "rdma_devices")?
                .or(opt_str(d, "device_name")?)
                .unwrap_or_default();
            let master = opt_str(d, "master_server_addr")?
                .or(opt_str(d, "master_server_address")?)
                .unwrap_or_else(|| "127.0.0.1:50051".into());
            let tenant = opt_str(d, "tenant_id")?.unwrap_or_else(|| "default".into());
            let ipc = opt_str(d, "ipc_socket_path")?;
            if flag("enable_ssd_offload")? {
                tracing::warn!(
                    "setup: enable_ssd_offload: this store keeps objects in memory only"
                );
            }
            return Ok(self.setup_common(
                py, None, &local, &md, gss, lbs, &proto, &devs, &master, &tenant, ipc,
            ));
        }
        let local: String = local_hostname.extract()?;
        let missing =
            |n: &str| PyTypeError::new_err(format!("setup() missing required argument '{n}'"));
        let md = metadata_server.ok_or_else(|| missing("metadata_server"))?;
        let gss = parse_size(global_segment_size.ok_or_else(|| missing("global_segment_size"))?)?;
        let lbs = parse_size(local_buffer_size.ok_or_else(|| missing("local_buffer_size"))?)?;
        let proto = protocol.ok_or_else(|| missing("protocol"))?;
        let devs = rdma_devices.ok_or_else(|| missing("rdma_devices"))?;
        let master = master_server_addr.ok_or_else(|| missing("master_server_addr"))?;
        if enable_ssd_offload {
            tracing::warn!(
                "setup: enable_ssd_offload (path {:?}): this store keeps objects in memory only",
                ssd_offload_path.unwrap_or_default()
            );
        }
        if enable_client_http_server {
            tracing::warn!(
                "setup: the client HTTP server (port {client_http_port}) is not provided; use the master's admin port"
            );
        }
        let tenant = tenant_id.unwrap_or_else(|| "default".into());
        Ok(self.setup_common(
            py,
            engine,
            &local,
            &md,
            gss,
            lbs,
            &proto,
            &devs,
            &master,
            &tenant,
            ipc_socket_path,
        ))
    }

    /// Attaches to the same-host `mooncake store-node` (`mooncake_client`) at
    /// `server_address` (a Unix socket path, or `host:port` of `mooncake_client --port`),
    /// whose segment is then read and written with a memcpy. The master is
    /// `master_server_addr`, else `MOONCAKE_MASTER`, else `127.0.0.1:50051`. 0 or negative.
    #[pyo3(signature = (mem_pool_size, local_buffer_size, server_address, master_server_addr=None, local_hostname=None, protocol=None))]
    #[allow(clippy::too_many_arguments)]
    fn setup_dummy(
        &self,
        py: Python<'_>,
        mem_pool_size: &Bound<'_, PyAny>,
        local_buffer_size: &Bound<'_, PyAny>,
        server_address: &str,
        master_server_addr: Option<String>,
        local_hostname: Option<String>,
        protocol: Option<String>,
    ) -> PyResult<i32> {
        let _ = parse_size(mem_pool_size)?;
        let lbs = parse_size(local_buffer_size)?;
        let socket = node_socket(server_address);
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let master = master_server_addr
            .or_else(|| env("MOONCAKE_MASTER"))
            .unwrap_or_else(|| "127.0.0.1:50051".into());
        let local = local_hostname
            .or_else(|| env("MOONCAKE_LOCAL_HOSTNAME"))
            .unwrap_or_else(|| "127.0.0.1".into());
        let md = env("MOONCAKE_TE_META_DATA_SERVER").unwrap_or_else(|| "P2PHANDSHAKE".into());
        let proto = protocol
            .or_else(|| env("MOONCAKE_PROTOCOL"))
            .unwrap_or_else(|| "tcp".into());
        let devs = env("MOONCAKE_DEVICE").unwrap_or_default();
        let tenant = env("MOONCAKE_TENANT_ID").unwrap_or_else(|| "default".into());
        Ok(self.setup_common(
            py,
            None,
            &local,
            &md,
            0,
            lbs,
            &proto,
            &devs,
            &master,
            &tenant,
            Some(socket),
        ))
    }

    /// This client's segment name (what LMCache passes as `preferred_segment`).
    fn get_hostname(&self) -> String {
        self.st()
            .map(|s| s.client.get_hostname())
            .unwrap_or_default()
    }

    /// 0 healthy, 1 not set up or closed, 2 master unreachable.
    fn health_check(&self, py: Python<'_>) -> i32 {
        let Some(s) = self.st() else { return 1 };
        py.detach(move || {
            if s.client.health_check().is_ok() {
                0
            } else {
                2
            }
        })
    }

    /// Registers `size` bytes at `buffer_ptr` (host or CUDA) for the zero-copy calls; the
    /// memory must stay valid until `unregister_buffer`. 0 or negative.
    fn register_buffer(&self, py: Python<'_>, buffer_ptr: u64, size: u64) -> i32 {
        let Some(s) = self.st() else {
            return NOT_SET_UP;
        };
        py.detach(move || {
            let loc = match mem::resolve_location(buffer_ptr, size, "*") {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!("register_buffer: {e}");
                    return StoreErrorCode::InvalidParams.code();
                }
            };
            let location: Location = loc.parse().unwrap_or_default();
            // SAFETY: the caller's contract (this method's docs): the range stays valid until
            // `unregister_buffer(buffer_ptr)` returns. It was checked to be non-empty,
            // non-wrapping and mapped (host) or CUDA memory of the named device.
            let memory = unsafe {
                ForeignMemory::new(
                    buffer_ptr,
                    size as usize,
                    location,
                    mooncake::Access::ReadWrite,
                )
            };
            let r = s.client.register_buffer(Arc::new(memory));
            if let Err(e) = &r {
                tracing::warn!("register_buffer: {e}");
            }
            code(&r)
        })
    }

    /// Unregisters a buffer; waits for transfers using it. 0 or negative.
    fn unregister_buffer(&self, py: Python<'_>, buffer_ptr: u64) -> i32 {
        let Some(s) = self.st() else {
            return NOT_SET_UP;
        };
        py.detach(move || code(&s.client.unregister_buffer(buffer_ptr)))
    }

    /// Stores `value` (bytes) under `key`. 0 or negative.
    #[pyo3(signature = (key, value, config=None))]
    fn put(
        &self,
        py: Python<'_>,
        key: &str,
        value: &[u8],
        config: Option<PyRef<'_, ReplicateConfig>>,
    ) -> i32 {
        let Some(s) = self.st() else {
            return NOT_SET_UP;
        };
        let c = cfg(config);
        py.detach(move || code(&s.client.put(key, value, &c)))
    }

    /// Replaces (or inserts) `value` under `key`. 0 or negative.
    #[pyo3(signature = (key, value, config=None))]
    fn upsert(
        &self,
        py: Python<'_>,
        key: &str,
        value: &[u8],
        config: Option<PyRef<'_, ReplicateConfig>>,
    ) -> i32 {
        let Some(s) = self.st() else {
            return NOT_SET_UP;
        };
        let c = cfg(config);
        py.detach(move || code(&s.client.upsert(key, value, &c)))
    }

    /// The value of `key`; empty bytes if missing or on error.
    fn get<'py>(&self, py: Python<'py>, key: &str) -> Bound<'py, PyBytes> {
        let v = self.get_opt(py, key).unwrap_or_default();
        PyBytes::new(py, &v)
    }

    /// The value of `key`, or None (the Python layer wraps it in a `BufferHandle`).
    fn _get_buffer<'py>(&self, py: Python<'py>, key: &str) -> Option<Bound<'py, PyBytes>> {
        self.get_opt(py, key).map(|v| PyBytes::new(py, &v))
    }

    /// The values of `keys` (None for a missing one).
    fn _batch_get_buffer<'py>(
        &self,
        py: Python<'py>,
        keys: Vec<String>,
    ) -> Vec<Option<Bound<'py, PyBytes>>> {
        let Some(s) = self.st() else {
            return keys.iter().map(|_| None).collect();
        };
        let vals = py.detach(move || {
            let ks: Vec<&str> = keys.iter().map(String::as_str).collect();
            s.client.get_batch(&ks)
        });
        vals.into_iter()
            .map(|r| r.ok().map(|v| PyBytes::new(py, &v)))
            .collect()
    }

    /// The values of `keys` (empty bytes for a missing one).
    fn get_batch<'py>(&self, py: Python<'py>, keys: Vec<String>) -> Vec<Bound<'py, PyBytes>> {
        self._batch_get_buffer(py, keys)
            .into_iter()
            .map(|v| v.unwrap_or_else(|| PyBytes::new(py, b"")))
            .collect()
    }

    /// Stores many values (bytes). 0 if all succeeded, else the first error.
    #[pyo3(signature = (keys, values, config=None))]
    fn put_batch(
        &self,
        py: Python<'_>,
        keys: Vec<String>,
        values: Vec<Vec<u8>>,
        config: Option<PyRef<'_, ReplicateConfig>>,
    ) -> i32 {
        let Some(s) = self.st() else {
            return NOT_SET_UP;
        };
        if keys.len() != values.len() {
            return StoreErrorCode::InvalidParams.code();
        }
        let c = cfg(config);
        py.detach(move || {
            let ks: Vec<&str> = keys.iter().map(String::as_str).collect();
            let vs: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
            s.client
                .put_batch(&ks, &vs, &c)
                .iter()
                .map(code)
                .find(|&c| c != 0)
                .unwrap_or(0)
        })
    }

    /// Stores the concatenation of `parts` (bytes) under `key`. 0 or negative.
    #[pyo3(signature = (key, *parts, config=None))]
    fn put_parts(
        &self,
        py: Python<'_>,
        key: &str,
        parts: &Bound<'_, PyTuple>,
        config: Option<PyRef<'_, ReplicateConfig>>,
    ) -> PyResult<i32> {
        let Some(s) = self.st() else {
            return Ok(NOT_SET_UP);
        };
        let parts: Vec<Vec<u8>> = parts.iter().map(|p| p.extract()).collect::<PyResult<_>>()?;
        let c = cfg(config);
        Ok(py.detach(move || {
            let ps: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
            code(&s.client.put_parts(key, &ps, &c))
        }))
    }

    /// Zero-copy put of `size` registered bytes at `buffer_ptr`. 0 or negative.
    #[pyo3(signature = (key, buffer_ptr, size, config=None))]
    fn put_from(
        &self,
        py: Python<'_>,
        key: &str,
        buffer_ptr: u64,
        size: u64,
        config: Option<PyRef<'_, ReplicateConfig>>,
    ) -> i32 {
        let Some(s) = self.st() else {
            return NOT_SET_UP;
        };
        let c = cfg(config);
        py.detach(move || code(&s.client.put_from(key, buffer_ptr, size, &c)))
    }

    /// Zero-copy upsert. 0 or negative.
    #[pyo3(signature = (key, buffer_ptr, size, config=None))]
    fn upsert_from(
        &self,
        py: Python<'_>,
        key: &str,
        buffer_ptr: u64,
        size: u64,
        config: Option<PyRef<'_, ReplicateConfig>>,
    ) -> i32 {
        let Some(s) = self.st() else {
            return NOT_SET_UP;
        };
        let c = cfg(config);
        py.detach(move || code(&s.client.upsert_from(key, buffer_ptr, size, &c)))
    }

    /// Zero-copy get into `size` registered bytes at `buffer_ptr`: the bytes read, or
    /// negative (-600 if the buffer is too small, -704 if missing).
    fn get_into(&self, py: Python<'_>, key: &str, buffer_ptr: u64, size: u64) -> i64 {
        let Some(s) = self.st() else {
            return NOT_SET_UP.into();
        };
        py.detach(move || bytes_read(s.client.get_into(key, buffer_ptr, size)))
    }

    /// Zero-copy batch put; per key 0 or negative.
    #[pyo3(signature = (keys, buffer_ptrs, sizes, config=None))]
    fn batch_put_from(
        &self,
        py: Python<'_>,
        keys: Vec<String>,
        buffer_ptrs: Vec<u64>,
        sizes: Vec<u64>,
        config: Option<PyRef<'_, ReplicateConfig>>,
    ) -> Vec<i32> {
        let Some(s) = self.st() else {
            return vec![NOT_SET_UP; keys.len()];
        };
        let c = cfg(config);
        py.detach(move || {
            let ks: Vec<&str> = keys.iter().map(String::as_str).collect();
            s.client
                .batch_put_from(&ks, &buffer_ptrs, &sizes, &c)
                .iter()
                .map(code)
                .collect()
        })
    }

    /// Zero-copy batch upsert; per key 0 or negative.
    #[pyo3(signature = (keys, buffer_ptrs, sizes, config=None))]
    fn batch_upsert_from(
        &self,
        py: Python<'_>,
        keys: Vec<String>,
        buffer_ptrs: Vec<u64>,
        sizes: Vec<u64>,
        config: Option<PyRef<'_, ReplicateConfig>>,
    ) -> Vec<i32> {
        let Some(s) = self.st() else {
            return vec![NOT_SET_UP; keys.len()];
        };
        let c = cfg(config);
        py.detach(move || {
            let ks: Vec<&str> = keys.iter().map(String::as_str).collect();
            s.client
                .batch_upsert_from(&ks, &buffer_ptrs, &sizes, &c)
                .iter()
                .map(code)
                .collect()
        })
    }

    /// Zero-copy batch get; per key the bytes read or negative.
    fn batch_get_into(
        &self,
        py: Python<'_>,
        keys: Vec<String>,
        buffer_ptrs: Vec<u64>,
        sizes: Vec<u64>,
    ) -> Vec<i64> {
        let Some(s) = self.st() else {
            return vec![NOT_SET_UP.into(); keys.len()];
        };
        py.detach(move || {
            let ks: Vec<&str> = keys.iter().map(String::as_str).collect();
            s.client
                .batch_get_into(&ks, &buffer_ptrs, &sizes)
                .into_iter()
                .map(bytes_read)
                .collect()
        })
    }

    /// Batch put where each object is the concatenation of its buffers; per key 0 or
    /// negative.
    #[pyo3(signature = (keys, all_buffer_ptrs, all_sizes, config=None))]
    fn batch_put_from_multi_buffers(
        &self,
        py: Python<'_>,
        keys: Vec<String>,
        all_buffer_ptrs: Vec<Vec<u64>>,
        all_sizes: Vec<Vec<u64>>,
        config: Option<PyRef<'_, ReplicateConfig>>,
    ) -> Vec<i32> {
        let Some(s) = self.st() else {
            return vec![NOT_SET_UP; keys.len()];
        };
        let c = cfg(config);
        py.detach(move || {
            let n = keys.len();
            if all_buffer_ptrs.len() != n || all_sizes.len() != n {
                return vec![StoreErrorCode::InvalidParams.code(); n];
            }
            let mut ok_idx = Vec::new();
            let mut bufs = Vec::new();
            let mut out = vec![StoreErrorCode::InvalidParams.code(); n];
            for i in 0..n {
                if let Some(p) = pairs(&all_buffer_ptrs[i], &all_sizes[i]) {
                    ok_idx.push(i);
                    bufs.push(p);
                }
            }
            let ks: Vec<&str> = ok_idx.iter().map(|&i| keys[i].as_str()).collect();
            for (i, r) in ok_idx
                .into_iter()
                .zip(s.client.batch_put_from_multi_buffers(&ks, &bufs, &c))
            {
                out[i] = code(&r);
            }
            out
        })
    }

    /// Batch get scattering each object over its buffers; per key the bytes read or
    /// negative.
    #[pyo3(signature = (keys, all_buffer_ptrs, all_sizes, prefer_alloc_in_same_node=false))]
    fn batch_get_into_multi_buffers(
        &self,
        py: Python<'_>,
        keys: Vec<String>,
        all_buffer_ptrs: Vec<Vec<u64>>,
        all_sizes: Vec<Vec<u64>>,
        prefer_alloc_in_same_node: bool,
    ) -> Vec<i64> {
        let _ = prefer_alloc_in_same_node;
        let Some(s) = self.st() else {
            return vec![NOT_SET_UP.into(); keys.len()];
        };
        py.detach(move || {
            let n = keys.len();
            let bad = i64::from(StoreErrorCode::InvalidParams.code());
            if all_buffer_ptrs.len() != n || all_sizes.len() != n {
                return vec![bad; n];
            }
            let mut ok_idx = Vec::new();
            let mut bufs = Vec::new();
            let mut out = vec![bad; n];
            for i in 0..n {
                if let Some(p) = pairs(&all_buffer_ptrs[i], &all_sizes[i]) {
                    ok_idx.push(i);
                    bufs.push(p);
                }
            }
            let ks: Vec<&str> = ok_idx.iter().map(|&i| keys[i].as_str()).collect();
            for (i, r) in ok_idx
                .into_iter()
                .zip(s.client.batch_get_into_multi_buffers(&ks, &bufs))
            {
                out[i] = bytes_read(r);
            }
            out
        })
    }

    /// Starts a put session: allocates every key (one master round trip). Per key 0 (to
    /// write, or already stored: nothing to write) or negative.
    #[pyo3(signature = (keys, sizes, config=None))]
    fn batch_put_session_start(
        &self,
        py: Python<'_>,
        keys: Vec<String>,
        sizes: Vec<u64>,
        config: Option<PyRef<'_, ReplicateConfig>>,
    ) -> Vec<i32> {
        let Some(s) = self.st() else {
            return vec![NOT_SET_UP; keys.len()];
        };
        let c = cfg(config);
        py.detach(move || {
            let n = keys.len();
            let bad = StoreErrorCode::InvalidParams.code();
            if sizes.len() != n {
                return vec![bad; n];
            }
            let mut out = vec![bad; n];
            let busy = s.put_sessions.lock().unwrap_or_else(|p| p.into_inner());
            let mut seen = std::collections::HashSet::new();
            let idx: Vec<usize> = (0..n)
                .filter(|&i| !busy.contains_key(&keys[i]) && seen.insert(keys[i].as_str()))
                .collect();
            drop(busy);
            let ks: Vec<&str> = idx.iter().map(|&i| keys[i].as_str()).collect();
            let ss: Vec<u64> = idx.iter().map(|&i| sizes[i]).collect();
            let mut session = match s.client.batch_put_session_start(&ks, &ss, &c) {
                Ok(sess) => sess,
                Err(e) => {
                    for &i in &idx {
                        out[i] = e.code();
                    }
                    return out;
                }
            };
            let results = session.start_results();
            let failed: Vec<&str> = ks
                .iter()
                .zip(&results)
                .filter(|(_, r)| r.is_err())
                .map(|(k, _)| *k)
                .collect();
            drop(session.split_off(&failed));
            let session = Arc::new(Mutex::new(session));
            let mut busy = s.put_sessions.lock().unwrap_or_else(|p| p.into_inner());
            for ((&i, k), r) in idx.iter().zip(&ks).zip(&results) {
                out[i] = code(r);
                if r.is_ok() {
                    busy.insert(k.to_string(), session.clone());
                }
            }
            out
        })
    }

    /// Writes ranges of put-session keys (`all_dst_offsets`: where each buffer goes in the
    /// object). Per key the bytes written or negative.
    fn batch_put_from_multi_buffer_ranges(
        &self,
        py: Python<'_>,
        keys: Vec<String>,
        all_buffer_ptrs: Vec<Vec<u64>>,
        all_sizes: Vec<Vec<u64>>,
        all_dst_offsets: Vec<Vec<u64>>,
    ) -> Vec<i64> {
        let Some(s) = self.st() else {
            return vec![NOT_SET_UP.into(); keys.len()];
        };
        py.detach(move || {
            let n = keys.len();
            let bad = i64::from(StoreErrorCode::InvalidParams.code());
            if all_buffer_ptrs.len() != n {
                return vec![bad; n];
            }
            let ranges = ranges_of(&all_buffer_ptrs, &all_sizes, &all_dst_offsets);
            let sessions: Vec<_> = {
                let map = s.put_sessions.lock().unwrap_or_else(|p| p.into_inner());
                (0..n)
                    .map(|i| ranges[i].as_ref().ok().and(map.get(&keys[i]).cloned()))
                    .collect()
            };
            let mut parts = Vec::new();
            for (sess, idx) in group_by(sessions) {
                let ks: Vec<&str> = idx.iter().map(|&i| keys[i].as_str()).collect();
                let rs: Vec<Vec<BufferRange>> = idx
                    .iter()
                    .map(|&i| ranges[i].clone().unwrap_or_default())
                    .collect();
                let mut guard = sess.lock().unwrap_or_else(|p| p.into_inner());
                let res = s
                    .client
                    .batch_put_from_multi_buffer_ranges(&mut guard, &ks, &rs);
                let vals = res
                    .into_iter()
                    .zip(&rs)
                    .map(|(r, rr)| match r {
                        Ok(()) => rr.iter().map(|x| x.len as i64).sum(),
                        Err(e) => i64::from(e.code()),
                    })
                    .collect();
                parts.push((idx, vals));
            }
            scatter(n, bad, parts)
        })
    }

    /// Commits these put-session keys: per key 0 (readable now) or negative (revoked).
    fn batch_put_session_end(&self, py: Python<'_>, keys: Vec<String>) -> Vec<i32> {
        self.finish_put(py, keys, false)
    }

    /// Revokes these put-session keys. Per key 0 or negative (not in a session).
    fn batch_put_session_revoke(&self, py: Python<'_>, keys: Vec<String>) -> Vec<i32> {
        self.finish_put(py, keys, true)
    }

    /// Starts a get session: replica lists and leases of every key (one round trip). Per
    /// key 0 or negative (-704 missing).
    fn batch_get_session_start(&self, py: Python<'_>, keys: Vec<String>) -> Vec<i32> {
        let Some(s) = self.st() else {
            return vec![NOT_SET_UP; keys.len()];
        };
        py.detach(move || {
            let ks: Vec<&str> = keys.iter().map(String::as_str).collect();
            let session = match s.client.batch_get_session_start(&ks) {
                Ok(sess) => Arc::new(sess),
                Err(e) => return vec![e.code(); keys.len()],
            };
            let mut map = s.get_sessions.lock().unwrap_or_else(|p| p.into_inner());
            keys.iter()
                .map(|k| match session.status(k) {
                    Some(Ok(_)) => {
                        map.insert(k.clone(), session.clone());
                        0
                    }
                    Some(Err(e)) => e.code(),
                    None => StoreErrorCode::InvalidParams.code(),
                })
                .collect()
        })
    }

    /// Reads ranges of get-session keys (`all_src_offsets`: where each buffer's bytes start
    /// in the object). Per key the bytes read, or negative (-707 once the lease ended).
    fn batch_get_into_multi_buffer_ranges(
        &self,
        py: Python<'_>,
        keys: Vec<String>,
        all_buffer_ptrs: Vec<Vec<u64>>,
        all_sizes: Vec<Vec<u64>>,
        all_src_offsets: Vec<Vec<u64>>,
    ) -> Vec<i64> {
        let Some(s) = self.st() else {
            return vec![NOT_SET_UP.into(); keys.len()];
        };
        py.detach(move || {
            let n = keys.len();
            let bad = i64::from(StoreErrorCode::InvalidParams.code());
            if all_buffer_ptrs.len() != n {
                return vec![bad; n];
            }
            let ranges = ranges_of(&all_buffer_ptrs, &all_sizes, &all_src_offsets);
            let sessions: Vec<_> = {
                let map = s.get_sessions.lock().unwrap_or_else(|p| p.into_inner());
                (0..n)
                    .map(|i| ranges[i].as_ref().ok().and(map.get(&keys[i]).cloned()))
                    .collect()
            };
            let mut parts = Vec::new();
            for (sess, idx) in group_by(sessions) {
                let ks: Vec<&str> = idx.iter().map(|&i| keys[i].as_str()).collect();
                let rs: Vec<Vec<BufferRange>> = idx
                    .iter()
                    .map(|&i| ranges[i].clone().unwrap_or_default())
                    .collect();
                let vals = s
                    .client
                    .batch_get_into_multi_buffer_ranges(&sess, &ks, &rs)
                    .into_iter()
                    .map(bytes_read)
                    .collect();
                parts.push((idx, vals));
            }
            scatter(n, bad, parts)
        })
    }

    /// Ends the get session of these keys. 0.
    fn batch_get_session_end(&self, keys: Vec<String>) -> i32 {
        let Some(s) = self.st() else {
            return NOT_SET_UP;
        };
        let mut map = s.get_sessions.lock().unwrap_or_else(|p| p.into_inner());
        for k in keys {
            map.remove(&k);
        }
        0
    }

    /// 1 if `key` exists, 0 if not, -1 on error.
    fn is_exist(&self, py: Python<'_>, key: &str) -> i32 {
        let Some(s) = self.st() else { return -1 };
        py.detach(move || match s.client.is_exist(key) {
            Ok(true) => 1,
            Ok(false) => 0,
            Err(_) => -1,
        })
    }

    /// Per key 1 / 0 / -1 (one round trip).
    fn batch_is_exist(&self, py: Python<'_>, keys: Vec<String>) -> Vec<i32> {
        let Some(s) = self.st() else {
            return vec![-1; keys.len()];
        };
        py.detach(move || {
            let ks: Vec<&str> = keys.iter().map(String::as_str).collect();
            s.client
                .batch_is_exist(&ks)
                .into_iter()
                .map(|r| match r {
                    Ok(true) => 1,
                    Ok(false) => 0,
                    Err(_) => -1,
                })
                .collect()
        })
    }

    /// The object size of `key`, or negative.
    fn get_size(&self, py: Python<'_>, key: &str) -> i64 {
        let Some(s) = self.st() else {
            return NOT_SET_UP.into();
        };
        py.detach(move || match s.client.batch_query(&[key]).pop() {
            Some(Ok(info)) => info.size as i64,
            Some(Err(e)) => e.code().into(),
            None => NOT_SET_UP.into(),
        })
    }

    /// `{key: [ReplicaDescriptor, …]}` (an empty list for a missing key).
    fn batch_get_replica_desc<'py>(
        &self,
        py: Python<'py>,
        keys: Vec<String>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        let Some(s) = self.st() else { return Ok(d) };
        let ks = keys.clone();
        let res = py.detach(move || {
            let ks: Vec<&str> = ks.iter().map(String::as_str).collect();
            s.client.batch_get_replica_desc(&ks)
        });
        for (k, r) in keys.into_iter().zip(res) {
            let list = PyList::empty(py);
            for desc in r.unwrap_or_default() {
                list.append(ReplicaDescriptor { desc })?;
            }
            d.set_item(k, list)?;
        }
        Ok(d)
    }

    /// The replicas of `key` (empty if missing).
    fn get_replica_desc(&self, py: Python<'_>, key: String) -> PyResult<Vec<ReplicaDescriptor>> {
        let Some(s) = self.st() else {
            return Ok(Vec::new());
        };
        Ok(py.detach(move || {
            s.client
                .batch_get_replica_desc(&[key.as_str()])
                .pop()
                .and_then(Result::ok)
                .unwrap_or_default()
                .into_iter()
                .map(|desc| ReplicaDescriptor { desc })
                .collect()
        }))
    }

    /// Removes `key` (-706 while leased, unless `force`). 0 or negative.
    #[pyo3(signature = (key, force=false))]
    fn remove(&self, py: Python<'_>, key: &str, force: bool) -> i32 {
        let Some(s) = self.st() else {
            return NOT_SET_UP;
        };
        py.detach(move || code(&s.client.remove(key, force)))
    }

    /// Removes many keys; per key 0 or negative.
    #[pyo3(signature = (keys, force=false))]
    fn batch_remove(&self, py: Python<'_>, keys: Vec<String>, force: bool) -> Vec<i32> {
        let Some(s) = self.st() else {
            return vec![NOT_SET_UP; keys.len()];
        };
        py.detach(move || {
            let ks: Vec<&str> = keys.iter().map(String::as_str).collect();
            s.client.batch_remove(&ks, force).iter().map(code).collect()
        })
    }

    /// Removes every key of the tenant; how many, or negative.
    #[pyo3(signature = (force=false))]
    fn remove_all(&self, py: Python<'_>, force: bool) -> i64 {
        let Some(s) = self.st() else {
            return NOT_SET_UP.into();
        };
        py.detach(move || match s.client.remove_all(force) {
            Ok(n) => n as i64,
            Err(e) => e.code().into(),
        })
    }

    /// Leaves the cluster (the segment's objects go with it). 0.
    fn close(&self, py: Python<'_>) -> i32 {
        let Some(s) = self.state.write().unwrap_or_else(|p| p.into_inner()).take() else {
            return 0;
        };
        py.detach(move || code(&s.client.close()))
    }
}

impl MooncakeDistributedStore {
    #[allow(clippy::too_many_arguments)]
    fn setup_common(
        &self,
        py: Python<'_>,
        engine: Option<&Bound<'_, PyAny>>,
        local_hostname: &str,
        metadata_server: &str,
        global_segment_size: u64,
        local_buffer_size: u64,
        protocol: &str,
        devices: &str,
        master: &str,
        tenant: &str,
        node_socket: Option<String>,
    ) -> i32 {
        let master = master.trim();
        if master.contains("://") || master.contains(';') {
            tracing::warn!(
                "setup: master {master:?}: only host:port is supported (no HA locators)"
            );
            return StoreErrorCode::InvalidParams.code();
        }
        let engine = match engine_for(
            py,
            engine,
            local_hostname,
            metadata_server,
            protocol,
            devices,
        ) {
            Ok(Ok(e)) => e,
            Ok(Err(e)) => {
                tracing::warn!("setup: cannot start the transfer engine: {e}");
                return -1;
            }
            Err(e) => {
                tracing::warn!("setup: {e}");
                return StoreErrorCode::InvalidParams.code();
            }
        };
        let mut cfg = StoreConfig::new(master)
            .with_tenant(tenant)
            .with_local_hostname(host_of(local_hostname))
            .with_segment_size(global_segment_size)
            .with_local_buffer_size(local_buffer_size);
        if let Some(p) = node_socket {
            cfg = cfg.with_local_node(p);
        }
        self.connect(py, engine, cfg)
    }

    fn get_opt(&self, py: Python<'_>, key: &str) -> Option<Vec<u8>> {
        let s = self.st()?;
        py.detach(move || s.client.get(key).ok())
    }

    fn finish_put(&self, py: Python<'_>, keys: Vec<String>, revoke: bool) -> Vec<i32> {
        let Some(s) = self.st() else {
            return vec![NOT_SET_UP; keys.len()];
        };
        py.detach(move || {
            let n = keys.len();
            let sessions: Vec<_> = {
                let mut map = s.put_sessions.lock().unwrap_or_else(|p| p.into_inner());
                keys.iter().map(|k| map.remove(k)).collect()
            };
            let mut parts = Vec::new();
            for (sess, idx) in group_by(sessions) {
                let ks: Vec<&str> = idx.iter().map(|&i| keys[i].as_str()).collect();
                let part = sess
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .split_off(&ks);
                let vals: Vec<i32> = if revoke {
                    let c = code(&s.client.batch_put_session_revoke(part));
                    vec![c; ks.len()]
                } else {
                    let order: Vec<String> = part.keys().to_vec();
                    let res = s.client.batch_put_session_end(part);
                    let by_key: HashMap<&str, i32> = order
                        .iter()
                        .map(String::as_str)
                        .zip(res.iter().map(code))
                        .collect();
                    ks.iter()
                        .map(|k| by_key.get(k).copied().unwrap_or(-1))
                        .collect()
                };
                parts.push((idx, vals));
            }
            scatter(n, StoreErrorCode::InvalidParams.code(), parts)
        })
    }
}

/// The Unix socket of a same-host store-node: a path as given, or for `host:port` the
/// socket `mooncake_client --port <port>` listens on.
fn node_socket(server_address: &str) -> String {
    let a = server_address.trim();
    if a.contains('/') {
        return a.trim_start_matches("unix:").to_string();
    }
    match a.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()) {
        Some(port) => format!("/tmp/mooncake-client-{port}.sock"),
        None => "/tmp/mooncake-store-node.sock".into(),
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<MooncakeDistributedStore>()?;
    m.add_class::<ReplicateConfig>()?;
    m.add_class::<SoftPinAction>()?;
    m.add_class::<ObjectDataType>()?;
    m.add_class::<ReplicaStatus>()?;
    m.add_class::<TaskStatus>()?;
    m.add_class::<TaskType>()?;
    m.add_class::<ReplicaDescriptor>()?;
    m.add_class::<MemoryDescriptor>()?;
    m.add_class::<Descriptor>()?;
    m.add_class::<MooncakeHostMemAllocator>()?;
    Ok(())
}
