//! NVMe-oF transport for mooncake-rs.
//!
//! Not implemented yet: this crate reserves the name and the `nvmeof` feature of the
//! `mooncake` facade. It exports nothing.
