//! `tiny-vllm`: a small inference server that speaks enough of vLLM's surface to test the
//! Conductor against real HTTP and ZMQ: the OpenAI completion API (`/v1/completions`,
//! `/v1/chat/completions`, streaming or not), `/tokenize`, `/health`, prefix caching with
//! vLLM's block hashes and its KV event publisher (ZMQ PUB of `[topic, seq, payload]` plus the
//! ROUTER replay socket), and P/D disaggregation through `kv_transfer_params`.
//!
//! The model is a fixed-seed bigram table over a byte vocabulary: the output depends only on
//! the prompt, so a test can check every answer. A decode instance given
//! `do_remote_prefill` pulls the KV from the prefill instance named in the parameters
//! (`GET http://remote_host:remote_port/kv/{transfer_id}`) and fails the request if that
//! instance did not produce it, so a proxy's two hops are really exercised.
//!
//! ```text
//! tiny-vllm --role prefill --name p0 --kv-events tcp://127.0.0.1:0 --kv-replay tcp://127.0.0.1:0
//! ```
//!
//! It prints one JSON line with its bound addresses (`{"http": …, "kv": …, "replay": …}`).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use mooncake_conductor::events::{HashEncoding, OutEvent, encode_batch};
use mooncake_conductor::hash::{BlockHasher, DEFAULT_NONE_HASH_SEED, HashAlgo, digest_to_u64};
use mooncake_conductor::zmq::publisher;
use mooncake_scheduler::lru::LruSet;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use zeromq::{PubSocket, RouterSocket, Socket, SocketRecv, SocketSend};

#[derive(Debug, Clone)]
struct Args {
    port: u16,
    role: String,
    name: String,
    kv_events: Option<String>,
    kv_replay: Option<String>,
    block_size: usize,
    cache_blocks: usize,
    hash: HashAlgo,
    int_hashes: bool,
    prefill_us_per_token: u64,
    token_ms: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        port: 0,
        role: "both".into(),
        name: "tiny".into(),
        kv_events: None,
        kv_replay: None,
        block_size: 16,
        cache_blocks: 4096,
        hash: HashAlgo::Sha256,
        int_hashes: false,
        prefill_us_per_token: 0,
        token_ms: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        if k == "--int-hashes" {
            a.int_hashes = true;
            continue;
        }
        let v = it.next().ok_or_else(|| format!("{k} needs a value"))?;
        let num = |v: &str| v.parse::<u64>().map_err(|e| format!("{k}: {e}"));
        match k.as_str() {
            "--port" => a.port = num(&v)? as u16,
            "--role" => a.role = v,
            "--name" => a.name = v,
            "--kv-events" => a.kv_events = Some(v),
            "--kv-replay" => a.kv_replay = Some(v),
            "--block-size" => a.block_size = num(&v)?.max(1) as usize,
            "--cache-blocks" => a.cache_blocks = num(&v)? as usize,
            "--hash" => a.hash = v.parse()?,
            "--prefill-us-per-token" => a.prefill_us_per_token = num(&v)?,
            "--token-ms" => a.token_ms = num(&v)?,
            _ => return Err(format!("unknown flag {k}")),
        }
    }
    Ok(a)
}

/// The bigram model: the next byte after `prev`, lowercase letters and spaces.
fn next_token(prev: u32) -> u32 {
    let mut z = u64::from(prev).wrapping_add(0x9e37_79b9_7f4a_7c15) ^ 0x6d6f_6f6e;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let r = (z % 27) as u32;
    if r == 26 {
        u32::from(b' ')
    } else {
        u32::from(b'a') + r
    }
}

/// `n` tokens continuing `prompt`.
fn generate(prompt: &[u32], n: usize) -> Vec<u32> {
    let mut prev = prompt.last().copied().unwrap_or(0);
    (0..n)
        .map(|_| {
            prev = next_token(prev);
            prev
        })
        .collect()
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Produced {
    tokens: Vec<u32>,
    block_ids: Vec<u64>,
}

#[derive(Debug, Default, serde::Serialize)]
struct Stats {
    requests: u64,
    prefills: u64,
    remote_decodes: u64,
    kv_pulls_served: u64,
    computed_blocks: u64,
    cached_blocks: u64,
    events_published: u64,
    events_lost: u64,
}

struct Engine {
    args: Args,
    http: SocketAddr,
    hasher: BlockHasher,
    cache: Mutex<Cache>,
    kv: Mutex<HashMap<String, Produced>>,
    stats: Mutex<Stats>,
    events: Option<mpsc::UnboundedSender<Vec<OutEvent>>>,
    lose: AtomicU64,
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<Bytes>,
    >,
}

struct Cache {
    lru: LruSet,
    digests: HashMap<u64, [u8; 32]>,
}

fn tokens_of(v: &Value, chat: bool) -> Option<Vec<u32>> {
    if chat {
        return Some(
            mooncake_conductor::chat_text(v.get("messages")?)
                .bytes()
                .map(u32::from)
                .collect(),
        );
    }
    let p = v.get("prompt")?;
    if let Some(s) = p.as_str() {
        return Some(s.bytes().map(u32::from).collect());
    }
    let a = p.as_array()?;
    if let Some(s) = a.first().and_then(Value::as_str) {
        return Some(s.bytes().map(u32::from).collect());
    }
    a.iter().map(|t| t.as_u64().map(|t| t as u32)).collect()
}

fn text_of(t: &[u32]) -> String {
    t.iter()
        .map(|&c| char::from_u32(c).unwrap_or('?'))
        .collect()
}

fn err(status: u16, msg: String) -> Response {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        Json(json!({"error": {"message": msg, "code": status}})),
    )
        .into_response()
}

impl Engine {
    /// Prefills `tokens`: caches their full blocks (publishing stored/removed events) and
    /// returns the KV block ids.
    async fn prefill(&self, tokens: &[u32]) -> Vec<u64> {
        let bs = self.args.block_size;
        let mut events = Vec::new();
        let (ids, computed) = {
            let mut c = self.cache.lock().unwrap();
            let mut ids = Vec::new();
            let mut new_hashes = Vec::new();
            let mut new_parent = None;
            let mut new_tokens = Vec::new();
            let mut evicted = Vec::new();
            let mut prev: Option<[u8; 32]> = None;
            for b in tokens.chunks_exact(bs) {
                let d = self
                    .hasher
                    .block_digest(&prev.unwrap_or(self.hasher.none_hash()), b);
                let h = digest_to_u64(&d);
                ids.push(h);
                if !c.lru.touch(h) {
                    if new_hashes.is_empty() {
                        new_parent = prev;
                    }
                    c.lru.insert(h, |e| evicted.push(e));
                    c.digests.insert(h, d);
                    new_hashes.push(d);
                    new_tokens.extend_from_slice(b);
                }
                prev = Some(d);
            }
            let computed = new_hashes.len() as u64;
            let removed: Vec<[u8; 32]> =
                evicted.iter().filter_map(|e| c.digests.remove(e)).collect();
            if !removed.is_empty() {
                events.push(OutEvent::Removed { hashes: removed });
            }
            if !new_hashes.is_empty() {
                events.push(OutEvent::Stored {
                    hashes: new_hashes,
                    parent: new_parent,
                    token_ids: new_tokens,
                    block_size: bs as u32,
                });
            }
            (ids, computed)
        };
        {
            let mut s = self.stats.lock().unwrap();
            s.prefills += 1;
            s.computed_blocks += computed;
            s.cached_blocks += ids.len() as u64 - computed;
        }
        let work = self.args.prefill_us_per_token * computed * bs as u64;
        if work > 0 {
            tokio::time::sleep(Duration::from_micros(work)).await;
        }
        if !events.is_empty()
            && let Some(tx) = &self.events
        {
            let _ = tx.send(events);
        }
        ids
    }
}

async fn completions(State(e): State<Arc<Engine>>, path: Path<String>, body: Bytes) -> Response {
    let chat = path.0 == "chat/completions";
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return err(400, "bad JSON".into());
    };
    let Some(tokens) = tokens_of(&req, chat) else {
        return err(400, "no prompt".into());
    };
    e.stats.lock().unwrap().requests += 1;
    let max_tokens = req
        .get("max_tokens")
        .or_else(|| req.get("max_completion_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(16) as usize;
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let params = req
        .get("kv_transfer_params")
        .cloned()
        .unwrap_or(Value::Null);
    let remote_prefill = params
        .get("do_remote_prefill")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let remote_decode = params
        .get("do_remote_decode")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let mut out_params = Value::Null;
    if remote_prefill {
        if e.args.role == "prefill" {
            return err(400, "a prefill-only instance cannot decode".into());
        }
        // Pull the KV from the prefill instance; fail if it does not have it.
        let host = params.get("remote_host").and_then(Value::as_str);
        let port = params.get("remote_port").and_then(Value::as_u64);
        let xfer = params.get("transfer_id").and_then(Value::as_str);
        let (Some(host), Some(port), Some(xfer)) = (host, port, xfer) else {
            return err(400, format!("incomplete kv_transfer_params: {params}"));
        };
        let url = format!("http://{host}:{port}/kv/{xfer}");
        let got = pull(&e, &url).await;
        match got {
            Ok(p) if p.tokens == tokens => {}
            Ok(_) => return err(500, format!("KV at {url} is for another prompt")),
            Err(m) => return err(500, format!("KV transfer from {url} failed: {m}")),
        }
        e.stats.lock().unwrap().remote_decodes += 1;
    } else {
        if e.args.role == "decode" {
            return err(
                400,
                "a decode-only instance needs kv_transfer_params".into(),
            );
        }
        let ids = e.prefill(&tokens).await;
        if remote_decode {
            let xfer = params
                .get("transfer_id")
                .and_then(Value::as_str)
                .map_or_else(
                    || format!("xfer-{}", e.kv.lock().unwrap().len()),
                    str::to_owned,
                );
            e.kv.lock().unwrap().insert(
                xfer.clone(),
                Produced {
                    tokens: tokens.clone(),
                    block_ids: ids.clone(),
                },
            );
            out_params = json!({
                "do_remote_prefill": true,
                "do_remote_decode": false,
                "remote_engine_id": e.args.name,
                "remote_host": e.http.ip().to_string(),
                "remote_port": e.http.port(),
                "remote_block_ids": ids,
                "transfer_id": xfer,
                "tp_size": 1,
            });
        }
    }
    let n = if remote_decode { 1 } else { max_tokens };
    let out = generate(&tokens, n);
    let model = req.get("model").cloned().unwrap_or(json!("tiny"));
    if !stream {
        let text = text_of(&out);
        let choice = if chat {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"})
        } else {
            json!({"index": 0, "text": text, "logprobs": null, "finish_reason": "length"})
        };
        return Json(json!({
            "id": format!("cmpl-{}", e.args.name),
            "object": if chat { "chat.completion" } else { "text_completion" },
            "model": model,
            "choices": [choice],
            "usage": {"prompt_tokens": tokens.len(), "completion_tokens": out.len(),
                      "total_tokens": tokens.len() + out.len()},
            "kv_transfer_params": out_params,
            "served_by": e.args.name,
        }))
        .into_response();
    }
    let delay = e.args.token_ms;
    let name = e.args.name.clone();
    let s = futures_util::stream::unfold((0usize, out), move |(i, out)| {
        let name = name.clone();
        async move {
            if i > out.len() {
                return None;
            }
            if i == out.len() {
                return Some((
                    Ok::<_, std::io::Error>(Bytes::from_static(b"data: [DONE]\n\n")),
                    (i + 1, out),
                ));
            }
            if delay > 0 && i > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            let t = text_of(&out[i..=i]);
            let chunk = if chat {
                json!({"object": "chat.completion.chunk", "served_by": name,
                       "choices": [{"index": 0, "delta": {"content": t}}]})
            } else {
                json!({"object": "text_completion", "served_by": name,
                       "choices": [{"index": 0, "text": t}]})
            };
            Some((Ok(Bytes::from(format!("data: {chunk}\n\n"))), (i + 1, out)))
        }
    });
    (
        [(header::CONTENT_TYPE, "text/event-stream")],
        Body::from_stream(s),
    )
        .into_response()
}

async fn pull(e: &Engine, url: &str) -> Result<Produced, String> {
    use http_body_util::BodyExt;
    let req = hyper::Request::get(url)
        .body(http_body_util::Full::new(Bytes::new()))
        .map_err(|x| x.to_string())?;
    let r = tokio::time::timeout(Duration::from_secs(5), e.client.request(req))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|x| x.to_string())?;
    let status = r.status();
    let b = r
        .into_body()
        .collect()
        .await
        .map_err(|x| x.to_string())?
        .to_bytes();
    if !status.is_success() {
        return Err(format!("HTTP {status}"));
    }
    serde_json::from_slice(&b).map_err(|x| x.to_string())
}

async fn kv(State(e): State<Arc<Engine>>, Path(xfer): Path<String>) -> Response {
    match e.kv.lock().unwrap().get(&xfer).cloned() {
        Some(p) => {
            e.stats.lock().unwrap().kv_pulls_served += 1;
            Json(p).into_response()
        }
        None => err(404, format!("no KV for {xfer}")),
    }
}

async fn tokenize(Json(req): Json<Value>) -> Response {
    let chat = req.get("messages").is_some();
    match tokens_of(&req, chat) {
        Some(t) => {
            Json(json!({"count": t.len(), "max_model_len": 1 << 20, "tokens": t})).into_response()
        }
        None => err(400, "no prompt".into()),
    }
}

async fn stats(State(e): State<Arc<Engine>>) -> Response {
    Json(serde_json::to_value(&*e.stats.lock().unwrap()).unwrap_or_default()).into_response()
}

async fn lose(State(e): State<Arc<Engine>>, Json(v): Json<Value>) -> StatusCode {
    let n = v.get("count").and_then(Value::as_u64).unwrap_or(1);
    e.lose.fetch_add(n, Ordering::AcqRel);
    StatusCode::NO_CONTENT
}

/// The KV event publisher: PUB of `[topic, seq, payload]`, a replay buffer, and the ROUTER
/// that serves it (vLLM's `ZmqEventPublisher`).
async fn publisher(
    engine: Arc<Engine>,
    mut pubs: PubSocket,
    mut router: Option<RouterSocket>,
    mut rx: mpsc::UnboundedReceiver<Vec<OutEvent>>,
) {
    let mut seq = 0u64;
    let mut buffer: VecDeque<(u64, Bytes)> = VecDeque::new();
    let enc = if engine.args.int_hashes {
        HashEncoding::Int
    } else {
        HashEncoding::Bytes
    };
    loop {
        let replay_req = async {
            match router.as_mut() {
                Some(r) => r.recv().await.ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ev = rx.recv() => {
                let Some(ev) = ev else { return };
                let ts = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                let payload = Bytes::from(encode_batch(ts, &ev, enc, 0));
                let lost = engine
                    .lose
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                    .is_ok();
                if lost {
                    engine.stats.lock().unwrap().events_lost += 1;
                } else {
                    let _ = pubs.send(publisher::event(seq, payload.clone())).await;
                    engine.stats.lock().unwrap().events_published += 1;
                }
                buffer.push_back((seq, payload));
                if buffer.len() > 10_000 {
                    buffer.pop_front();
                }
                seq += 1;
            }
            Some(m) = replay_req => {
                let Some(answer) = publisher::replay(m, &buffer) else {
                    continue;
                };
                let r = router.as_mut().expect("a replay request came from it");
                for msg in answer {
                    let _ = r.send(msg).await;
                }
            }
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = parse_args().map_err(|e| anyhow::anyhow!(e))?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port)).await?;
    let http = listener.local_addr()?;
    let mut kv_ep = None;
    let mut replay_ep = None;
    let mut sockets = None;
    if let Some(ep) = &args.kv_events {
        let mut p = PubSocket::new();
        kv_ep = Some(p.bind(ep).await?.to_string());
        let r = match &args.kv_replay {
            Some(ep) => {
                let mut r = RouterSocket::new();
                replay_ep = Some(r.bind(ep).await?.to_string());
                Some(r)
            }
            None => None,
        };
        sockets = Some((p, r));
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let engine = Arc::new(Engine {
        hasher: BlockHasher::new(args.hash, DEFAULT_NONE_HASH_SEED),
        cache: Mutex::new(Cache {
            lru: LruSet::new(args.cache_blocks),
            digests: HashMap::new(),
        }),
        kv: Mutex::new(HashMap::new()),
        stats: Mutex::new(Stats::default()),
        events: sockets.is_some().then_some(tx),
        lose: AtomicU64::new(0),
        client: hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http(),
        http,
        args,
    });
    if let Some((p, r)) = sockets {
        tokio::spawn(publisher(engine.clone(), p, r, rx));
    }
    println!(
        "{}",
        json!({"http": http.to_string(), "kv": kv_ep, "replay": replay_ep})
    );
    let app = Router::new()
        .route("/health", get(|| async { "OK" }))
        .route("/v1/{*path}", post(completions))
        .route("/tokenize", post(tokenize))
        .route("/kv/{xfer}", get(kv))
        .route("/debug/stats", get(stats))
        .route("/debug/lose_events", post(lose))
        .with_state(engine);
    axum::serve(listener, app).await?;
    Ok(())
}
