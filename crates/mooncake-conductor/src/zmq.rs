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

/// One stream's subscriber state: the sequence tracker plus what tells a publisher that came
/// back on the same endpoint (restarted, or resuming its numbering) from the one we followed.
#[derive(Debug, Default)]
pub(crate) struct Stream {
    tracker: SeqTracker,
    /// The last sequence number received live: one publisher's live stream only goes up.
    last_live: Option<u64>,
    /// Digest of the payload of the last batch applied (`tracker.next() - 1`): a replay that
    /// starts at that batch shows whether the publisher still has the same history.
    last_digest: Option<u64>,
    /// A new connection to the publisher was made since the last live batch.
    reconnected: bool,
}

fn digest(payload: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    payload.hash(&mut h);
    h.finish()
}

/// Follows one instance's KV event stream until the task is aborted (deregistration).
pub async fn follow(
    svc: Arc<Service>,
    name: String,
    endpoint: String,
    replay: Option<String>,
    topic: String,
) {
    use futures_util::StreamExt;
    let mut stream = Stream::default();
    let mut backoff = Duration::from_millis(50);
    let mut sockets = 0u64;
    loop {
        let mut sub = SubSocket::new();
        // The socket reconnects by itself when the publisher goes away; its monitor reports
        // each connection, so the first batch after a reconnection is checked for continuity.
        let mut monitor = sub.monitor();
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
        sockets += 1;
        if sockets > 1 {
            stream.reconnected = true;
        }
        let mut connections = 0u64;
        let mut monitoring = true;
        backoff = Duration::from_millis(50);
        tracing::info!(instance = name, endpoint, "following KV events");
        loop {
            let msg = tokio::select! {
                biased;
                ev = monitor.next(), if monitoring => {
                    monitoring = ev.is_some();
                    if let Some(zeromq::SocketEvent::Connected(..)) = ev {
                        connections += 1;
                        if connections > 1 {
                            tracing::info!(instance = name, endpoint, "KV publisher reconnected");
                            stream.reconnected = true;
                        }
                    }
                    continue;
                }
                m = sub.recv() => m,
            };
            let msg = match msg {
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
            on_batch(&svc, &name, replay.as_deref(), &mut stream, seq, &payload).await;
        }
    }
}

async fn replay_or_empty(name: &str, replay: Option<&str>, start: u64) -> Vec<(u64, Bytes)> {
    match replay {
        Some(ep) => replay_from(ep, start).await.unwrap_or_else(|e| {
            tracing::warn!(instance = name, "replay failed: {e}");
            Vec::new()
        }),
        None => Vec::new(),
    }
}

/// Forgets the instance's view and the stream (its publisher started over).
fn restart(svc: &Service, name: &str, st: &mut Stream) {
    tracing::info!(
        instance = name,
        "KV publisher restarted: rebuilding its view"
    );
    svc.with_state(|s| s.clear_view(name));
    st.tracker.reset();
    st.last_digest = None;
}

/// After a reconnection: asks the replay for the last batch applied onwards. If the publisher
/// still has that batch, byte for byte, it is the stream we followed (resuming): the batches
/// after it are applied and `true` returned. Otherwise (another history, no replay socket, or
/// a buffer that no longer reaches back) `false`.
async fn resumes(svc: &Service, name: &str, replay: Option<&str>, st: &mut Stream) -> bool {
    let Some(last) = st.tracker.next().and_then(|n| n.checked_sub(1)) else {
        return false;
    };
    let batches = replay_or_empty(name, replay, last).await;
    let same = batches
        .first()
        .is_some_and(|(s, p)| *s == last && Some(digest(p)) == st.last_digest);
    if same {
        for (s, p) in &batches[1..] {
            if *s != st.tracker.next().unwrap_or(0) {
                break;
            }
            apply(svc, name, p);
            st.tracker.applied(*s);
            st.last_digest = Some(digest(p));
        }
    }
    tracing::info!(
        instance = name,
        last,
        same,
        "KV stream continuity after reconnection"
    );
    same
}

/// Applies one live batch, recovering a gap before it and a publisher restart.
pub(crate) async fn on_batch(
    svc: &Service,
    name: &str,
    replay: Option<&str>,
    st: &mut Stream,
    seq: u64,
    payload: &[u8],
) {
    let backwards = st.last_live.is_some_and(|l| seq <= l);
    let reconnected = std::mem::take(&mut st.reconnected);
    st.last_live = Some(seq);
    // A live stream that went back, or a new connection to a publisher that no longer has
    // the history we applied: a new publisher on the same endpoint.
    if backwards
        || (reconnected && st.tracker.next().is_some() && !resumes(svc, name, replay, st).await)
    {
        restart(svc, name, st);
    }
    match st.tracker.check(seq) {
        SeqVerdict::Duplicate => return,
        SeqVerdict::InOrder => {}
        SeqVerdict::Restarted => restart(svc, name, st),
        SeqVerdict::Gap { expected, .. } => {
            // A first batch past 0 means we joined late (or the publisher restarted): the
            // replay rebuilds as much of the history as the publisher still buffers. Later,
            // the replay starts at the last batch applied, which must come back unchanged (else
            // the publisher is another one: its view is rebuilt from its own history), and a
            // gap is recovered only if the replay runs without holes from there; otherwise the
            // view is cleared and rebuilt from what the replay and the live stream bring.
            let mut first = st.tracker.next().is_none();
            let mut batches = if first {
                replay_or_empty(name, replay, 0).await
            } else {
                let anchor = expected - 1;
                let mut b = replay_or_empty(name, replay, anchor).await;
                match b.first() {
                    Some((s, p)) if *s == anchor && Some(digest(p)) == st.last_digest => {
                        b.remove(0);
                        b
                    }
                    Some((s, _)) if *s == anchor => {
                        restart(svc, name, st);
                        first = true;
                        replay_or_empty(name, replay, 0).await
                    }
                    _ => b,
                }
            };
            let start = if first { 0 } else { expected };
            // Complete: every batch of [start, seq) came back, in order.
            let complete = batches.first().is_some_and(|(s, _)| *s == start)
                && batches.windows(2).all(|w| w[1].0 == w[0].0 + 1)
                && batches.last().is_some_and(|(s, _)| s + 1 >= seq);
            tracing::info!(
                instance = name,
                expected = start,
                got = seq,
                complete,
                "KV event gap"
            );
            if !first {
                svc.with_state(|s| s.kv_gap(name, complete));
            }
            batches.retain(|(s, _)| *s >= start);
            let mut last: Option<u64> = None;
            for (s, p) in &batches {
                if last.is_some_and(|l| *s <= l) {
                    continue;
                }
                apply(svc, name, p);
                st.last_digest = Some(digest(p));
                last = Some(*s);
            }
            if let Some(l) = last {
                st.tracker.applied(l);
                if seq <= l {
                    return;
                }
            }
        }
    }
    apply(svc, name, payload);
    st.tracker.applied(seq);
    st.last_digest = Some(digest(payload));
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

/// The publisher's side of vLLM's KV-event wire format, as a vLLM engine speaks it (for the
/// in-repo servers and tests that stand in for one).
pub mod publisher {
    use bytes::Bytes;
    use zeromq::ZmqMessage;

    /// A PUB message: empty topic, the sequence number (8 bytes, big-endian), the payload.
    pub fn event(seq: u64, payload: Bytes) -> ZmqMessage {
        ZmqMessage::try_from(vec![
            Bytes::new(),
            Bytes::copy_from_slice(&seq.to_be_bytes()),
            payload,
        ])
        .expect("three frames")
    }

    /// The ROUTER's answer to a replay request (`[identity, start]` as received): every batch
    /// of `buffer` numbered `start` or later, then the end marker (sequence `0xff…`, empty
    /// payload). `None` for a malformed request.
    pub fn replay<'a>(
        request: ZmqMessage,
        buffer: impl IntoIterator<Item = &'a (u64, Bytes)>,
    ) -> Option<Vec<ZmqMessage>> {
        let frames = request.into_vec();
        if frames.len() != 3 || frames[2].len() != 8 {
            return None;
        }
        let start = u64::from_be_bytes(frames[2].as_ref().try_into().expect("8 bytes"));
        let id = frames[0].clone();
        let reply = |seq: &[u8], payload: Bytes| {
            ZmqMessage::try_from(vec![
                id.clone(),
                Bytes::new(),
                Bytes::copy_from_slice(seq),
                payload,
            ])
            .expect("four frames")
        };
        let mut out: Vec<ZmqMessage> = buffer
            .into_iter()
            .filter(|(s, _)| *s >= start)
            .map(|(s, p)| reply(&s.to_be_bytes(), p.clone()))
            .collect();
        out.push(reply(&[0xff; 8], Bytes::new()));
        Some(out)
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

    /// The subscriber's sequence handling without sockets (no replay endpoint): in order, a
    /// live stream going back (a restarted publisher whose first batches were missed), gap
    /// (view cleared, rebuilt from what follows), publisher restart.
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
        let mut t = Stream::default();
        on_batch(&svc, "p0", None, &mut t, 0, &stored(10)).await;
        on_batch(&svc, "p0", None, &mut t, 1, &stored(20)).await;
        assert!(held(&svc, 10) && held(&svc, 20));
        // The live stream goes back (not to 0): the publisher restarted and its first batches
        // were missed. Its old view goes and is rebuilt from what follows (no replay here).
        on_batch(&svc, "p0", None, &mut t, 1, &stored(25)).await;
        assert!(!held(&svc, 10) && !held(&svc, 20) && held(&svc, 25));
        on_batch(&svc, "p0", None, &mut t, 2, &stored(27)).await;
        assert!(held(&svc, 27));
        // Batches 3 and 4 are lost and cannot be replayed: the view is cleared, then 5 applies.
        on_batch(&svc, "p0", None, &mut t, 5, &stored(30)).await;
        assert!(!held(&svc, 25) && held(&svc, 30));
        let info = svc.with_state(|s| s.instance("p0").unwrap().clone());
        assert_eq!((info.kv_gaps, info.kv_replays, info.kv_rebuilds), (1, 0, 2));
        assert_eq!(t.tracker.next(), Some(6));
        // The publisher restarts (sequence back to 0): its old view goes.
        on_batch(&svc, "p0", None, &mut t, 0, &stored(40)).await;
        assert!(!held(&svc, 30) && held(&svc, 40));
        assert_eq!(t.tracker.next(), Some(1));
    }
}
