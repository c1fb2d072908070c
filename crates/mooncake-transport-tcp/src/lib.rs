#![doc = include_str!("../README.md")]

mod client;
mod config;
mod io;
mod reactor;
mod server;
mod staging;
mod sys;
mod transport;
pub mod wire;

pub use config::TcpConfig;
pub use sys::raise_fd_limit;
pub use transport::{TCP_PROTO_VERSION, TCP_SCHEME, TcpStats, TcpTransport};
