//! mooncake facade.
