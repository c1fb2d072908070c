//! Mooncake Store: a distributed KV-cache pool built on the core traits.
//!
//! Not implemented yet: this crate reserves the name in the workspace. It exports nothing.
