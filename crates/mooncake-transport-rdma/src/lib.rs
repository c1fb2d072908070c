//! RDMA (RoCE/IB) transport for mooncake-rs.
//!
//! Not implemented yet: this crate reserves the name and the `rdma` feature of the
//! `mooncake` facade. It exports nothing.
