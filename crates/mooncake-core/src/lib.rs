#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod auth;
pub mod completion;
pub mod descriptor;
pub mod device;
pub mod error;
pub mod location;
pub mod metadata;
pub mod scheduler;
pub mod segment;
pub mod transport;

pub use auth::ClusterSecret;
pub use completion::{Batch, BatchWait, SliceCompleter, TaskCompleter, TransferStatus};
pub use descriptor::{
    BufferDesc, DeviceDesc, MetadataKeys, RemoteSegment, RpcMeta, SegmentDescriptor,
};
pub use device::{DeviceCopier, DeviceCopy, device_copier};
pub use error::{Error, ErrorKind, Result};
pub use location::Location;
pub use metadata::{
    BoxFuture, EmbeddedMetadataStore, MetadataStore, WatchEvent, WatchStream, block_on,
};
pub use scheduler::{Decision, InstanceId, Placement, Rejection, ScheduleRequest, Scheduler};
pub use segment::{
    Access, BufferRegistry, ForeignMemory, LocalBuffer, Located, MemorySegment, Region,
    RegionLease, Requester,
};
pub use transport::{
    EngineContext, Opcode, SegmentHandle, TransferRequest, TransferTask, Transport,
    TransportBuilder, TransportCapabilities,
};
