//! The HTTP backend: Mooncake's `GET/PUT/DELETE /metadata?key=K` API.
//!
//! - [`HttpMetadataStore`] is the client (feature `http`).
//! - `HttpMetadataServer` is the server behind `mooncake metadata-server` (feature
//!   `http-server`).
//! - [`wire`] holds the request and response decoders (fuzzed and property-tested).

mod client;
#[cfg(feature = "http-server")]
pub mod server;
pub mod wire;

pub use client::{HTTP_SCHEME, HttpConfig, HttpMetadataStore};
#[cfg(feature = "http-server")]
pub use server::{HttpMetadataServer, HttpServerConfig};
