//! The engine without a network: local-segment copies, batch lifecycle, range checks, and
//! routing errors, under several executors.

use std::sync::Arc;

use mooncake_core::{
    EmbeddedMetadataStore, ErrorKind, LocalBuffer, MemorySegment, MetadataKeys, MetadataStore,
    Opcode, SegmentDescriptor, SegmentHandle, TransferRequest, TransferStatus, block_on,
};
use mooncake_engine::TransferEngine;

fn engine(name: &str, md: &Arc<dyn MetadataStore>) -> TransferEngine {
    TransferEngine::builder(name)
        .with_metadata(md.clone())
        .build()
        .unwrap()
}

#[test]
fn local_segment_copies_and_batch_ids() {
    let md: Arc<dyn MetadataStore> = Arc::new(EmbeddedMetadataStore::new());
    let e = engine("local", &md);
    let a = Arc::new(LocalBuffer::new(1 << 16).unwrap());
    let b = Arc::new(LocalBuffer::new(1 << 16).unwrap());
    a.write_at(0, &[7u8; 1 << 16]).unwrap();
    e.register(a.clone()).unwrap();
    e.register(b.clone()).unwrap();
    let req = |op, len| TransferRequest {
        opcode: op,
        source: a.base(),
        target_id: SegmentHandle::LOCAL,
        target_offset: b.base(),
        length: len,
    };
    let id = e.allocate_batch(3);
    e.submit(
        id,
        &[req(Opcode::Write, 4096), req(Opcode::Write, (1 << 16) + 1)],
    )
    .unwrap();
    smol::block_on(e.wait(id)).unwrap_err();
    assert_eq!(e.transfer_status(id, 0), TransferStatus::Completed);
    assert_eq!(e.transfer_status(id, 1), TransferStatus::Failed);
    assert_eq!(
        e.batch(id).unwrap().error(1).unwrap().kind(),
        ErrorKind::NotRegistered
    );
    assert_eq!(b.to_vec()[..4096], [7u8; 4096]);
    assert_eq!(b.to_vec()[4096], 0);
    e.free_batch(id).unwrap();
    assert!(e.free_batch(id).is_err());
    // The descriptor lists both buffers.
    let d = e.local_descriptor();
    assert_eq!(d.buffers.len(), 2);
    let key = MetadataKeys::new(None).segment("local");
    let published =
        SegmentDescriptor::from_json(&block_on(md.get(&key)).unwrap().unwrap(), &key).unwrap();
    assert_eq!(published.buffers.len(), 2);
    e.unregister_memory(b.base()).unwrap();
    let published =
        SegmentDescriptor::from_json(&block_on(md.get(&key)).unwrap().unwrap(), &key).unwrap();
    assert_eq!(published.buffers.len(), 1);
}

#[test]
fn segments_are_resolved_through_metadata() {
    let md: Arc<dyn MetadataStore> = Arc::new(EmbeddedMetadataStore::new());
    let a = engine("seg-a", &md);
    let e = a.open_segment_blocking("seg-b").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::SegmentNotFound);
    assert!(e.to_string().contains("seg-b"));
    let b = engine("seg-b", &md);
    let h = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(a.open_segment("seg-b"))
        .unwrap();
    assert_eq!(
        a.open_segment_blocking("seg-b").unwrap(),
        h,
        "cached: same handle"
    );
    // seg-b has no transport, so nothing can reach it, and the error says why.
    let buf = Arc::new(LocalBuffer::new(4096).unwrap());
    a.register(buf.clone()).unwrap();
    let rb = Arc::new(LocalBuffer::new(4096).unwrap());
    b.register(rb.clone()).unwrap();
    let err = a
        .transfer_sync_write("seg-b", buf.base(), rb.base(), 16)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    // Dropping an engine unpublishes it.
    drop(b);
    a.close_segment(h).unwrap();
    assert_eq!(
        a.open_segment_blocking("seg-b").unwrap_err().kind(),
        ErrorKind::SegmentNotFound
    );
}

#[test]
fn malformed_descriptor_names_its_key() {
    let md: Arc<dyn MetadataStore> = Arc::new(EmbeddedMetadataStore::new());
    let a = engine("mf-a", &md);
    block_on(md.put("mooncake/ram/mf-b", b"{\"name\": 3".to_vec())).unwrap();
    let e = a.open_segment_blocking("mf-b").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Metadata);
    assert!(e.to_string().contains("mooncake/ram/mf-b"), "{e}");
}

/// Device memory (`cuda:N`) is never read or written by a path that cannot move it: a
/// host-only transport and the engine's local copy refuse it before touching a byte. The
/// "device" region here is an unmapped address, so touching it would crash the test.
#[test]
fn device_memory_is_refused_by_host_only_paths() {
    use mooncake_core::{Access, ForeignMemory, Location};
    let md: Arc<dyn MetadataStore> = Arc::new(EmbeddedMetadataStore::new());
    let build = |name: &str| {
        TransferEngine::builder(name)
            .with_metadata(md.clone())
            .with_transport(mooncake_testkit::LoopbackConfig)
            .build()
            .unwrap()
    };
    let a = build("dev-a");
    let b = build("dev-b");
    let host = Arc::new(LocalBuffer::new(1 << 16).unwrap());
    a.register(host.clone()).unwrap();
    let bhost = Arc::new(LocalBuffer::new(1 << 16).unwrap());
    b.register(bhost.clone()).unwrap();
    // SAFETY: registered but never dereferenced: every path below must refuse it.
    let fake = unsafe {
        ForeignMemory::new(
            0x7e00_0000_0000,
            1 << 20,
            Location::Cuda(0),
            Access::ReadWrite,
        )
    };
    b.register(Arc::new(fake)).unwrap();
    let e = a
        .transfer_sync_write("dev-b", host.base(), 0x7e00_0000_0000, 4096)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("device memory"), "{e}");
    // The same engine's local copy into device memory.
    let e = b
        .submit_batch(&[TransferRequest {
            opcode: Opcode::Write,
            source: bhost.base(),
            target_id: SegmentHandle::LOCAL,
            target_offset: 0x7e00_0000_0000,
            length: 4096,
        }])
        .unwrap()
        .wait_blocking(None)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    // Host memory still moves.
    a.transfer_sync_read("dev-b", host.base(), bhost.base(), 4096)
        .unwrap();
}
