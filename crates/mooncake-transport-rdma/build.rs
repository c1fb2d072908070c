//! Turns on the device tests (`cfg(mooncake_rdma_tests)`) when built with
//! `MOONCAKE_TEST_RDMA=1`, as `cargo xtask rxe` does; otherwise they are `#[ignore]`d with a
//! message saying how to run them.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(mooncake_rdma_tests)");
    println!("cargo::rerun-if-env-changed=MOONCAKE_TEST_RDMA");
    if std::env::var("MOONCAKE_TEST_RDMA").is_ok_and(|v| v == "1") {
        println!("cargo::rustc-cfg=mooncake_rdma_tests");
    }
}
