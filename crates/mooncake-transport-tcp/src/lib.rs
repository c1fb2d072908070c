#![doc = include_str!("../README.md")]

mod client;
mod config;
mod io;
mod reactor;
mod server;
mod staging;
mod sys;
#[cfg(feature = "tls")]
mod tls;
#[cfg(not(feature = "tls"))]
#[path = "no_tls.rs"]
mod tls;
mod transport;
pub mod wire;

pub use config::TcpConfig;
pub use sys::raise_fd_limit;
pub use transport::{TCP_PROTO_VERSION, TCP_SCHEME, TLS_FIELD, TcpStats, TcpTransport};
