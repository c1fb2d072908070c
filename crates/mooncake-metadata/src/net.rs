//! Runtime-agnostic socket helpers (async-io drives its own reactor, so these futures
//! complete under tokio, smol or a plain `block_on`).

use std::future::Future;
use std::time::Duration;

use async_net::TcpStream;
use mooncake_core::{Error, ErrorKind, Result};

/// Runs `fut`, failing with [`ErrorKind::Timeout`] after `timeout`.
pub(crate) async fn with_timeout<T>(
    timeout: Duration,
    what: &str,
    fut: impl Future<Output = Result<T>>,
) -> Result<T> {
    futures_lite::future::or(fut, async {
        async_io::Timer::after(timeout).await;
        Err(Error::new(
            ErrorKind::Timeout,
            format!("{what} did not finish within {timeout:?}"),
        ))
    })
    .await
}

/// Connects to `addr` (`host:port`) within `timeout`.
pub(crate) async fn connect(addr: &str, timeout: Duration, what: &str) -> Result<TcpStream> {
    let a = addr.to_string();
    let s = with_timeout(
        timeout,
        &format!("connecting to {what} at {addr}"),
        async move {
            TcpStream::connect(a.as_str())
                .await
                .map_err(|e| Error::io(&format!("cannot connect to {what} at {a}"), &e))
        },
    )
    .await?;
    let _ = s.set_nodelay(true);
    Ok(s)
}
