//! The runtimes every async test runs under, and a runner for each.
//!
//! The public async APIs of mooncake-rs must work under tokio (current-thread and
//! multi-thread), smol, and a plain `block_on` with no runtime at all.

use std::future::Future;

/// The runtimes each case runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rt {
    /// tokio, current-thread.
    TokioCurrentThread,
    /// tokio, multi-thread.
    TokioMultiThread,
    /// `smol::block_on`.
    Smol,
    /// `mooncake_core::block_on` (no runtime at all).
    BlockOn,
}

impl Rt {
    /// Every runtime.
    pub const ALL: [Rt; 4] = [
        Rt::TokioCurrentThread,
        Rt::TokioMultiThread,
        Rt::Smol,
        Rt::BlockOn,
    ];
}

/// Runs `f` to completion under `rt`.
pub fn run<F: Future>(rt: Rt, f: F) -> F::Output {
    match rt {
        Rt::TokioCurrentThread => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
            .block_on(f),
        Rt::TokioMultiThread => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime")
            .block_on(f),
        Rt::Smol => smol::block_on(f),
        Rt::BlockOn => mooncake_core::block_on(f),
    }
}

/// Runs the same async body once under every [`Rt`], passing the runtime's name.
pub fn on_all_runtimes<F, Fut>(mut body: F)
where
    F: FnMut(Rt) -> Fut,
    Fut: Future<Output = ()>,
{
    for rt in Rt::ALL {
        run(rt, body(rt));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_runtime_runs_the_body() {
        let mut seen = Vec::new();
        on_all_runtimes(|rt| {
            seen.push(rt);
            async {}
        });
        assert_eq!(seen, Rt::ALL);
    }
}
