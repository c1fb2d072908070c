//! The ZMQ side of vLLM's KV events: a SUB subscriber per instance that checks sequence
//! numbers and recovers gaps through the publisher's ROUTER replay socket (pure-Rust ZeroMQ,
//! the `zeromq` crate: no libzmq).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use zeromq::{DealerSocket, Socket, SocketRecv, SocketSend, SubSocket, ZmqMessage};

use crate::events::{SeqTracker, SeqVerdict, decode_batch};
use crate::service::Service;

/// The replay socket's end-of-stream sequence number (−1 as 8 big-endian bytes).
pub const END_SEQ: [u8; 8] = [0xff; 8];

/// How long one replay may take.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(3);

/// Asks a vLLM replay ROUTER for every buffered batch from `start`; returns them in order.
pub async fn replay_from(endpoint: &str, start: u64) -> anyhow::Result<Vec<(u64, Bytes)>> {
    tokio::time::timeout(REPLAY_TIMEOUT, async {
        let mut s = DealerSocket::new();
        s.connect(endpoint).await?;
        // The ROUTER sees [identity, "", start]: vLLM requires exactly three frames.
        let msg = ZmqMessage::try_from(vec![
            Bytes::new(),
            Bytes::copy_from_slice(&start.to_be_bytes()),
        ])
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        s.send(msg).await?;
        let mut out = Vec::new();
        loop {
            let mut frames = s.recv().await?.into_vec();
            if frames.first().is_some_and(|f| f.is_empty()) && frames.len() == 3 {
                frames.remove(0);
            }
            let [seq, payload] = <[Bytes; 2]>::try_from(frames)
                .map_err(|f| anyhow::anyhow!("replay reply of {} frames", f.len()))?;
            if seq.as_ref() == END_SEQ {
                return Ok(out);
            }
            let seq: [u8; 8] = seq
                .as_ref()
                .try_into()
                .map_err(|_| anyhow::anyhow!("replay sequence of {} bytes", seq.len()))?;
            out.push((u64::from_be_bytes(seq), payload));
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("replay from {endpoint} timed out"))?
}

/// Follows one instance's KV event stream until the task is aborted (deregistration).
pub async fn follow(
    svc: Arc<Service>,
    name: String,
    endpoint: String,
    replay: Option<String>,
    topic: String,
) {
    let mut tracker = SeqTracker::default();
    let mut backoff = Duration::from_millis(50);
    loop {
        let mut sub = SubSocket::new();
        let connected = async {
            sub.connect(&endpoint).await?;
            sub.subscribe(&topic).await?;
            anyhow::Ok(())
        }
        .await;
        if let Err(e) = connected {
            tracing::debug!(instance = name, endpoint, "KV event connect: {e}");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
            continue;
        }
        backoff = Duration::from_millis(50);
        tracing::info!(instance = name, endpoint, "following KV events");
        loop {
            let msg = match sub.recv().await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(instance = name, "KV event stream: {e}; reconnecting");
                    break;
                }
            };
            let frames = msg.into_vec();
            let (seq, payload) = match frames.as_slice() {
                [_, seq, payload] if seq.len() == 8 => (
                    u64::from_be_bytes(seq.as_ref().try_into().expect("8 bytes")),
                    payload.clone(),
                ),
                _ => {
                    tracing::warn!(instance = name, frames = frames.len(), "bad KV message");
                    continue;
                }
            };
            on_batch(&svc, &name, replay.as_deref(), &mut tracker, seq, &payload).await;
        }
    }
}

/// Applies one live batch, recovering a gap before it.
async fn on_batch(
    svc: &Service,
    name: &str,
    replay: Option<&str>,
    tracker: &mut SeqTracker,
    seq: u64,
    payload: &[u8],
) {
    match tracker.check(seq) {
        SeqVerdict::Duplicate => return,
        SeqVerdict::InOrder => {}
        SeqVerdict::Restarted => {
            tracing::info!(
                instance = name,
                "KV publisher restarted: rebuilding its view"
            );
            svc.with_state(|s| s.clear_view(name));
            tracker.reset();
        }
        SeqVerdict::Gap { expected, got } => {
            // A first batch past 0 means we joined late: the replay rebuilds as much of the
            // history as the publisher still buffers. Later, a gap is recovered only if the
            // replay starts exactly where we stopped; otherwise the view is cleared and
            // rebuilt from what the replay and the live stream bring.
            let first = tracker.next().is_none();
            let batches = match replay {
                Some(ep) => replay_from(ep, expected).await.unwrap_or_else(|e| {
                    tracing::warn!(instance = name, "replay failed: {e}");
                    Vec::new()
                }),
                None => Vec::new(),
            };
            // Complete: every batch of [expected, got) came back, in order.
            let complete = batches.first().is_some_and(|(s, _)| *s == expected)
                && batches.windows(2).all(|w| w[1].0 == w[0].0 + 1)
                && batches.last().is_some_and(|(s, _)| s + 1 >= got);
            tracing::info!(instance = name, expected, got, complete, "KV event gap");
            if !first {
                svc.with_state(|s| s.kv_gap(name, complete));
            }
            let mut last: Option<u64> = None;
            for (s, p) in &batches {
                if last.is_some_and(|l| *s <= l) {
                    continue;
                }
                apply(svc, name, p);
                last = Some(*s);
            }
            if let Some(l) = last {
                tracker.applied(l);
                if seq <= l {
                    return;
                }
            }
        }
    }
    apply(svc, name, payload);
    tracker.applied(seq);
}

fn apply(svc: &Service, name: &str, payload: &[u8]) {
    match decode_batch(payload) {
        Ok(b) => {
            let now = svc.now_s();
            svc.with_state(|s| s.apply_kv_batch(name, &b, now));
        }
        Err(e) => tracing::warn!(instance = name, "{e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{HashEncoding, OutEvent, encode_batch};
    use crate::service::ServiceConfig;
    use crate::state::{Registration, Role};

    fn stored(first: u8) -> Vec<u8> {
        encode_batch(
            0.0,
            &[OutEvent::Stored {
                hashes: vec![[first; 32], [first + 1; 32]],
                parent: None,
                token_ids: vec![],
                block_size: 16,
            }],
            HashEncoding::Int,
            0,
        )
    }

    fn held(svc: &Service, first: u8) -> bool {
        let h = crate::hash::digest_to_u64(&[first; 32]);
        svc.with_state(|s| s.conductor().index().holders(h) != 0)
    }

    /// The subscriber's sequence handling without sockets (no replay endpoint): in order,
    /// duplicate, gap (view cleared, rebuilt from what follows), publisher restart.
    #[tokio::test]
    async fn sequence_numbers_drive_the_view() {
        let svc = Service::new(ServiceConfig::default()).unwrap();
        svc.with_state(|s| {
            s.register(Registration {
                name: "p0".into(),
                role: Role::Prefill,
                url: None,
                kv_events_endpoint: None,
                kv_replay_endpoint: None,
                kv_topic: None,
                kv_capacity_tokens: None,
            })
            .map(|_| ())
        })
        .unwrap();
        let mut t = SeqTracker::default();
        on_batch(&svc, "p0", None, &mut t, 0, &stored(10)).await;
        on_batch(&svc, "p0", None, &mut t, 1, &stored(20)).await;
        assert!(held(&svc, 10) && held(&svc, 20));
        // A repeated batch is skipped: it does not bring back what was cleared since.
        svc.with_state(|s| s.clear_view("p0"));
        on_batch(&svc, "p0", None, &mut t, 1, &stored(20)).await;
        assert!(!held(&svc, 20));
        on_batch(&svc, "p0", None, &mut t, 2, &stored(25)).await;
        assert!(held(&svc, 25));
        // Batches 3 and 4 are lost and cannot be replayed: the view is cleared, then 5 applies.
        on_batch(&svc, "p0", None, &mut t, 5, &stored(30)).await;
        assert!(!held(&svc, 25) && held(&svc, 30));
        let info = svc.with_state(|s| s.instance("p0").unwrap().clone());
        assert_eq!((info.kv_gaps, info.kv_replays, info.kv_rebuilds), (1, 0, 2));
        assert_eq!(t.next(), Some(6));
        // The publisher restarts (sequence back to 0): its old view goes.
        on_batch(&svc, "p0", None, &mut t, 0, &stored(40)).await;
        assert!(!held(&svc, 30) && held(&svc, 40));
        assert_eq!(t.next(), Some(1));
    }
}
