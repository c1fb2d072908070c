//! Metadata backends for mooncake-rs.

pub use mooncake_core::EmbeddedMetadataStore;
