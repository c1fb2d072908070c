//! End to end: the Conductor service in front of `tiny-vllm` processes that speak the OpenAI
//! completion API, publish vLLM KV events over ZMQ and pass KV between prefill and decode by
//! `kv_transfer_params`; and in front of a store master publishing its KV events.
//!
//! Waits are polls with generous bounds (10 s), never fixed sleeps that a test relies on.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use mooncake_conductor::service::HttpClient;
use mooncake_conductor::state::{Role, StateConfig};
use mooncake_conductor::{Registration, RunningService, Service, ServiceConfig, Tokenize};
use mooncake_scheduler::Admission;
use serde_json::{Value, json};

/// A `tiny-vllm` process, killed on drop.
struct Engine {
    child: Child,
    http: String,
    kv: Option<String>,
    replay: Option<String>,
}

impl Engine {
    fn spawn(name: &str, role: &str, events: bool, replay: bool) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tiny-vllm"));
        cmd.args(["--name", name, "--role", role, "--block-size", "16"]);
        if events {
            cmd.args(["--kv-events", "tcp://127.0.0.1:0"]);
            if replay {
                cmd.args(["--kv-replay", "tcp://127.0.0.1:0"]);
            }
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tiny-vllm");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let v: Value = serde_json::from_str(&line).expect("address line");
        let s = |k: &str| v[k].as_str().map(str::to_owned);
        Self {
            child,
            http: format!("http://{}", s("http").unwrap()),
            kv: s("kv"),
            replay: s("replay"),
        }
    }

    fn reg(&self, name: &str, role: Role) -> Registration {
        Registration {
            name: name.into(),
            role,
            url: Some(self.http.clone()),
            kv_events_endpoint: self.kv.clone(),
            kv_replay_endpoint: self.replay.clone(),
            kv_topic: None,
            kv_capacity_tokens: None,
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn conductor(cfg: ServiceConfig, regs: Vec<Registration>) -> RunningService {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    mooncake_conductor::start(cfg, l, regs).await.unwrap()
}

fn http() -> HttpClient {
    HttpClient::default()
}

async fn post(url: &str, body: Value) -> (u16, Value) {
    let r = http()
        .send(
            hyper::Method::POST,
            url,
            Some(Bytes::from(body.to_string())),
            None,
            Duration::from_secs(20),
        )
        .await
        .expect("reachable");
    let status = r.status().as_u16();
    use http_body_util::BodyExt;
    let b = r.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&b)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&b).into()));
    (status, v)
}

async fn delete(url: &str) -> Result<Bytes, mooncake_conductor::service::HopError> {
    http()
        .call(
            hyper::Method::DELETE,
            url,
            None,
            None,
            Duration::from_secs(5),
        )
        .await
}

async fn get(url: &str) -> Value {
    http()
        .get_json(url, None, Duration::from_secs(5))
        .await
        .unwrap()
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Sends distinct warm-up prompts straight to each engine until the Conductor has applied a
/// KV batch from every one: ZMQ drops what is published before a subscription is live.
async fn wait_subscribed(svc: &Service, engines: &[(&str, &Engine)]) {
    for n in 0..500 {
        let mut all = true;
        for (name, e) in engines {
            if svc.with_state(|s| s.instance(name).unwrap().kv_batches) == 0 {
                all = false;
                prefill_on(e, &format!("warm up {n} {}", "w".repeat(40))).await;
            }
        }
        if all {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("KV event subscriptions never became live");
}

fn blocks_of(svc: &Service, name: &str) -> u64 {
    svc.with_state(|s| s.instance(name).map_or(0, |i| i.blocks))
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A prompt of `prefix` shared characters then a distinct tail.
fn prompt(prefix: &str, i: usize) -> String {
    format!("{prefix} | question {i}: what comes next?")
}

fn shared_prefix() -> String {
    "You are a helpful assistant. ".repeat(12) // 348 bytes ≈ 21 blocks of 16 tokens
}

fn cfg() -> ServiceConfig {
    ServiceConfig::default()
        .with_health_interval(None)
        .with_hop_timeout(Duration::from_secs(10))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_repeated_prefixes_to_the_cache_events_report() {
    let ps: Vec<Engine> = (0..3)
        .map(|i| Engine::spawn(&format!("p{i}"), "prefill", true, true))
        .collect();
    let ds: Vec<Engine> = (0..2)
        .map(|i| Engine::spawn(&format!("d{i}"), "both", false, false))
        .collect();
    let mut regs: Vec<Registration> = ps
        .iter()
        .enumerate()
        .map(|(i, e)| e.reg(&format!("p{i}"), Role::Prefill))
        .collect();
    regs.extend(
        ds.iter()
            .enumerate()
            .map(|(i, e)| e.reg(&format!("d{i}"), Role::Decode)),
    );
    let c = conductor(cfg().with_tokenize(Tokenize::Remote), regs).await;
    let base = format!("http://{}", c.addr);
    let prefix = shared_prefix();
    let named: Vec<(String, &Engine)> = ps
        .iter()
        .enumerate()
        .map(|(i, e)| (format!("p{i}"), e))
        .collect();
    let named: Vec<(&str, &Engine)> = named.iter().map(|(n, e)| (n.as_str(), *e)).collect();
    wait_subscribed(&c.svc, &named).await;
    let mut base_prefills = Vec::new();
    for e in &ps {
        base_prefills.push(
            get(&format!("{}/debug/stats", e.http)).await["prefills"]
                .as_u64()
                .unwrap(),
        );
    }

    // The first request computes the prefix somewhere; its KV events index it.
    let (st, first) = post(
        &format!("{base}/v1/completions"),
        json!({"model": "tiny", "prompt": prompt(&prefix, 0), "max_tokens": 12}),
    )
    .await;
    assert_eq!(st, 200, "{first}");
    let mut holder = None;
    eventually("the prefix's KV events", || {
        holder = (0..3).map(|i| format!("p{i}")).find(|n| {
            c.svc
                .with_state(|s| s.conductor().index().holders(x_hash(&prefix)))
                == 1 << c
                    .svc
                    .with_state(|s| s.instance(n).unwrap().prefill_slot.unwrap())
        });
        holder.is_some()
    })
    .await;
    let holder = holder.unwrap();

    // The same prefix again, from other conversations: all go where the cache is.
    for i in 1..6 {
        let stream = i % 2 == 0;
        let body = json!({"model": "tiny", "prompt": prompt(&prefix, i), "max_tokens": 12,
                          "stream": stream});
        let r = http()
            .call(
                hyper::Method::POST,
                &format!("{base}/v1/completions"),
                Some(Bytes::from(body.to_string())),
                None,
                Duration::from_secs(20),
            )
            .await
            .unwrap();
        let text: String = if stream {
            let s = String::from_utf8(r.to_vec()).unwrap();
            assert!(s.trim_end().ends_with("data: [DONE]"), "{s}");
            s.lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .filter(|l| *l != "[DONE]")
                .map(|l| {
                    serde_json::from_str::<Value>(l).unwrap()["choices"][0]["text"]
                        .as_str()
                        .unwrap()
                        .to_owned()
                })
                .collect()
        } else {
            let v: Value = serde_json::from_slice(&r).unwrap();
            v["choices"][0]["text"].as_str().unwrap().to_owned()
        };
        // The two-hop answer equals what one engine alone answers.
        let (_, direct) = post(
            &format!("{}/v1/completions", ds[0].http),
            json!({"prompt": prompt(&prefix, i), "max_tokens": 12}),
        )
        .await;
        assert_eq!(text, direct["choices"][0]["text"].as_str().unwrap());
    }
    let mut prefills = Vec::new();
    let mut pulls = 0;
    for e in &ps {
        let s = get(&format!("{}/debug/stats", e.http)).await;
        prefills.push(s["prefills"].as_u64().unwrap() - base_prefills[prefills.len()]);
        pulls += s["kv_pulls_served"].as_u64().unwrap();
    }
    let h: usize = holder[1..].parse().unwrap();
    assert_eq!(prefills[h], 6, "all six prefills on {holder}: {prefills:?}");
    let hs = get(&format!("{}/debug/stats", ps[h].http)).await;
    assert!(
        hs["cached_blocks"].as_u64().unwrap() >= 5 * 21,
        "the prefix was reused: {hs}"
    );
    // Every decode pulled the KV the prefill produced (no decode computed it alone).
    assert_eq!(pulls, 6);
    let mut remote = 0;
    for e in &ds {
        remote += get(&format!("{}/debug/stats", e.http)).await["remote_decodes"]
            .as_u64()
            .unwrap();
    }
    assert_eq!(remote, 6);
    let m = c.svc.with_state(|s| s.metrics(0));
    assert_eq!(
        metric(&m, "mooncake_conductor_proxy_total{outcome=\"completed\"}"),
        6.0
    );
    assert!(metric(&m, "mooncake_conductor_reused_tokens_total") >= 5.0 * 21.0 * 16.0);
    c.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_prefill_or_decode_is_retried_elsewhere() {
    let mut ps: Vec<Engine> = (0..2)
        .map(|i| Engine::spawn(&format!("p{i}"), "prefill", true, true))
        .collect();
    let mut ds: Vec<Engine> = (0..2)
        .map(|i| Engine::spawn(&format!("d{i}"), "decode", false, false))
        .collect();
    let mut regs: Vec<Registration> = ps
        .iter()
        .enumerate()
        .map(|(i, e)| e.reg(&format!("p{i}"), Role::Prefill))
        .collect();
    regs.extend(
        ds.iter()
            .enumerate()
            .map(|(i, e)| e.reg(&format!("d{i}"), Role::Decode)),
    );
    let c = conductor(cfg().with_tokenize(Tokenize::Bytes), regs).await;
    let url = format!("http://{}/v1/completions", c.addr);
    let prefix = shared_prefix();
    wait_subscribed(&c.svc, &[("p0", &ps[0]), ("p1", &ps[1])]).await;
    let base_prefills = [
        get(&format!("{}/debug/stats", ps[0].http)).await["prefills"]
            .as_u64()
            .unwrap(),
        get(&format!("{}/debug/stats", ps[1].http)).await["prefills"]
            .as_u64()
            .unwrap(),
    ];
    let (st, v) = post(&url, json!({"prompt": prompt(&prefix, 0), "max_tokens": 8})).await;
    assert_eq!(st, 200, "{v}");
    let mut holder = None;
    eventually("the prefix's KV events", || {
        let held = c
            .svc
            .with_state(|s| s.conductor().index().holders(x_hash(&prefix)));
        holder = (0..2usize).find(|i| held == 1 << i);
        holder.is_some()
    })
    .await;
    let h = holder.unwrap();
    // A request the engine refuses (4xx) is the client's fault: passed through, no retry,
    // nobody marked down.
    let (st, v) = post(&url, json!({"max_tokens": 2})).await;
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["error"]["message"], "no prompt", "{v}");
    assert!(c.svc.with_state(|s| s.instances().all(|i| i.healthy)));
    // The holder dies: the same prefix is retried on the other prefill instance.
    ps[h].kill();
    let (st, v) = post(&url, json!({"prompt": prompt(&prefix, 1), "max_tokens": 8})).await;
    assert_eq!(st, 200, "{v}");
    let other = get(&format!("{}/debug/stats", ps[1 - h].http)).await;
    assert_eq!(
        other["prefills"].as_u64().unwrap() - base_prefills[1 - h],
        1,
        "{other}"
    );
    let m = c.svc.with_state(|s| s.metrics(0));
    assert_eq!(
        metric(
            &m,
            "mooncake_conductor_proxy_total{outcome=\"prefill_failed\"}"
        ),
        1.0
    );
    assert!(
        !c.svc
            .with_state(|s| s.instance(&format!("p{h}")).unwrap().healthy)
    );

    // A decode instance dies: requests that would go there are retried on the other one, and
    // every client request is decoded exactly once.
    let before = get(&format!("{}/debug/stats", ds[0].http)).await["remote_decodes"]
        .as_u64()
        .unwrap();
    ds[0].kill();
    for i in 2..6 {
        let (st, v) = post(&url, json!({"prompt": prompt(&prefix, i), "max_tokens": 8})).await;
        assert_eq!(st, 200, "{v}");
    }
    let m = c.svc.with_state(|s| s.metrics(0));
    assert_eq!(
        metric(
            &m,
            "mooncake_conductor_proxy_total{outcome=\"decode_failed\"}"
        ),
        1.0,
        "{m}"
    );
    let d1 = get(&format!("{}/debug/stats", ds[1].http)).await;
    assert_eq!(before + d1["remote_decodes"].as_u64().unwrap(), 6, "{d1}");
    assert_eq!(d1["remote_decodes"], d1["requests"]);
    // With both prefill and one decode gone from its pool, nothing is left to fail over to.
    ps[1 - h].kill();
    let (st, v) = post(&url, json!({"prompt": "x", "max_tokens": 2})).await;
    assert!(st == 502 || st == 503, "{st} {v}");
    c.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_rejected_early_with_its_reason() {
    let mut state = StateConfig::default();
    state.conductor.admission = Admission::Early;
    state.conductor.ttft_slo_s = 2.0;
    let c = conductor(cfg(), Vec::new()).await;
    let base = format!("http://{}", c.addr);
    let health = http()
        .call(
            hyper::Method::GET,
            &format!("{base}/health"),
            None,
            None,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(&health[..], b"OK\n");
    // No instance yet: 503 with the reason.
    let (st, v) = post(&format!("{base}/v1/schedule"), json!({"input_tokens": 100})).await;
    assert_eq!(
        (st, v["reason"]["kind"].as_str()),
        (503, Some("no_instance"))
    );
    c.stop();

    let c = conductor(cfg().with_state(state), Vec::new()).await;
    let base = format!("http://{}", c.addr);
    for (name, role) in [("p0", "prefill"), ("d0", "decode")] {
        let (st, v) = post(
            &format!("{base}/v1/instances"),
            json!({"name": name, "role": role, "url": "http://127.0.0.1:9"}),
        )
        .await;
        assert_eq!(st, 200, "{v}");
    }
    // Each 8k-token prompt books ≈ 1 s of prefill; the router reports no progress, so the
    // queue only grows until the predicted TTFT crosses the 2 s SLO.
    let mut accepted = 0;
    let reason = loop {
        let (st, v) = post(
            &format!("{base}/v1/schedule"),
            json!({"input_tokens": 8192, "output_tokens": 64}),
        )
        .await;
        if st == 200 {
            accepted += 1;
            assert!(accepted < 10, "never rejected");
            continue;
        }
        assert_eq!(st, 429, "{v}");
        break v["reason"].clone();
    };
    assert!(accepted >= 1);
    assert_eq!(reason["kind"], "overloaded", "{reason}");
    assert_eq!(reason["pool"], "prefill");
    assert!(reason["load"].as_f64().unwrap() > 1.0);
    // Reporting the accepted requests finished frees the queue: admitted again.
    for id in 1..=accepted {
        let (st, _) = post(
            &format!("{base}/v1/requests/{id}/events"),
            json!({"event": "dropped"}),
        )
        .await;
        assert_eq!(st, 204);
    }
    let (st, _) = post(
        &format!("{base}/v1/schedule"),
        json!({"input_tokens": 8192, "output_tokens": 64}),
    )
    .await;
    assert_eq!(st, 200);
    // Through the proxy: a per-request SLO nobody can meet gets 429 and the reason.
    let mut tight = cfg().with_tokenize(Tokenize::Bytes);
    tight.state.conductor.admission = Admission::Slo;
    tight.state.conductor.ttft_slo_s = 1e-6;
    let c2 = conductor(tight, Vec::new()).await;
    let b2 = format!("http://{}", c2.addr);
    for (name, role) in [("p0", "prefill"), ("d0", "decode")] {
        post(
            &format!("{b2}/v1/instances"),
            json!({"name": name, "role": role, "url": "http://127.0.0.1:9"}),
        )
        .await;
    }
    let (st, v) = post(
        &format!("{b2}/v1/completions"),
        json!({"prompt": "hello", "max_tokens": 4}),
    )
    .await;
    assert_eq!(st, 429, "{v}");
    assert_eq!(v["error"]["reason"]["kind"], "ttft_slo", "{v}");
    let m = String::from_utf8(
        http()
            .call(
                hyper::Method::GET,
                &format!("{base}/metrics"),
                None,
                None,
                Duration::from_secs(5),
            )
            .await
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    assert_eq!(
        metric(
            &m,
            "mooncake_conductor_rejected_total{reason=\"overloaded\"}"
        ),
        1.0
    );
    assert!(metric(&m, "mooncake_conductor_decision_seconds_count") >= 3.0);
    // Deregistering the only prefill instance: listed no more, and nothing can be placed.
    delete(&format!("{base}/v1/instances/p0")).await.unwrap();
    let names: Vec<Value> = get(&format!("{base}/v1/instances"))
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].clone())
        .collect();
    assert_eq!(names, [json!("d0")]);
    let (st, v) = post(&format!("{base}/v1/schedule"), json!({"input_tokens": 100})).await;
    assert_eq!(
        (st, &v["reason"]),
        (503, &json!({"kind": "no_instance", "pool": "prefill"}))
    );
    assert!(matches!(
        delete(&format!("{base}/v1/instances/p0")).await,
        Err(mooncake_conductor::service::HopError::Status(404, _))
    ));
    c.stop();
    c2.stop();
}

/// Sends `prompt` straight to an engine (not through the proxy), so it stores blocks and
/// publishes their events.
async fn prefill_on(e: &Engine, prompt: &str) {
    let (st, v) = post(
        &format!("{}/v1/completions", e.http),
        json!({"prompt": prompt, "max_tokens": 1}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
}

/// Token-id schedule request: how many blocks of `prompt` are on the chosen instance.
async fn local_blocks(base: &str, prompt: &str) -> (String, u64) {
    let ids: Vec<u32> = prompt.bytes().map(u32::from).collect();
    let (st, v) = post(
        &format!("{base}/v1/schedule"),
        json!({"token_ids": ids, "block_size": 16, "output_tokens": 1}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let id = v["request_id"].as_u64().unwrap();
    post(
        &format!("{base}/v1/requests/{id}/events"),
        json!({"event": "dropped"}),
    )
    .await;
    (
        v["prefill"]["name"].as_str().unwrap().to_owned(),
        v["local_prefix_blocks"].as_u64().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_event_gaps_are_replayed_or_rebuilt() {
    for with_replay in [true, false] {
        let e = Engine::spawn("p0", "prefill", true, with_replay);
        let mut state = StateConfig::default();
        // No expected blocks from our own schedule calls: only events count here.
        state.conductor.expected_ttl_s = None;
        let c = conductor(cfg().with_state(state), vec![e.reg("p0", Role::Prefill)]).await;
        let base = format!("http://{}", c.addr);
        post(
            &format!("{base}/v1/instances"),
            json!({"name": "d0", "role": "decode"}),
        )
        .await;
        wait_subscribed(&c.svc, &[("p0", &e)]).await;
        let info = || c.svc.with_state(|s| s.instance("p0").unwrap().clone());
        let gaps0 = info().kv_gaps;
        let x = format!("conversation x {}", "x".repeat(64));
        let y = format!("conversation y {}", "y".repeat(64));
        let z = format!("conversation z {}", "z".repeat(64));
        prefill_on(&e, &x).await;
        eventually("x indexed", || {
            c.svc
                .with_state(|s| s.conductor().index().holders(x_hash(&x)) != 0)
        })
        .await;
        // The batch for y is lost on the wire (kept in the replay buffer); z's arrives.
        post(
            &format!("{}/debug/lose_events", e.http),
            json!({"count": 1}),
        )
        .await;
        prefill_on(&e, &y).await;
        prefill_on(&e, &z).await;
        eventually("z indexed", || {
            c.svc
                .with_state(|s| s.conductor().index().holders(x_hash(&z)) != 0)
        })
        .await;
        let i = info();
        assert_eq!(i.kv_gaps, gaps0 + 1);
        let full = (y.len() / 16) as u64;
        if with_replay {
            // Replayed: y is indexed although its batch never came over PUB, x stays.
            assert_eq!(i.kv_replays, 1);
            assert_eq!(local_blocks(&base, &y).await, ("p0".into(), full));
            assert_eq!(local_blocks(&base, &x).await.1, (x.len() / 16) as u64);
        } else {
            // No replay socket: the view was cleared and rebuilds from what follows.
            assert_eq!((i.kv_replays, i.kv_rebuilds), (0, 1));
            assert_eq!(local_blocks(&base, &y).await.1, 0);
            assert_eq!(local_blocks(&base, &x).await.1, 0);
            assert_eq!(local_blocks(&base, &z).await.1, (z.len() / 16) as u64);
        }
        c.stop();
    }
}

/// The first block hash of `prompt` under the byte tokenizer (vLLM's default hashing).
fn x_hash(prompt: &str) -> u64 {
    let ids: Vec<u32> = prompt.bytes().map(u32::from).collect();
    mooncake_conductor::hash::BlockHasher::default().block_hashes(&ids, 16)[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_resident_blocks_count_as_hits() {
    use mooncake_store::rpc::{PutItem, Request, Response, RpcClient};
    let master = mooncake_store::MasterServer::start(
        mooncake_store::ServerConfig::loopback()
            .with_admin_addr(Some("127.0.0.1:0".parse().unwrap())),
    )
    .unwrap();
    let admin = format!("http://{}", master.admin_addr().unwrap());
    // Keys named by block hash, as a store connector writes them.
    let ids: Vec<u32> = shared_prefix().bytes().map(u32::from).collect();
    let hashes = mooncake_conductor::hash::BlockHasher::default().block_hashes(&ids, 16);
    let keys: Vec<String> = hashes
        .iter()
        .map(|h| format!("tiny@tp0@{h:016x}"))
        .collect();
    let rpc = master.rpc_addr();
    let keys2 = keys.clone();
    tokio::task::spawn_blocking(move || {
        let mut c = RpcClient::connect(rpc, Duration::from_secs(5)).unwrap();
        let client = match c
            .call(&Request::RegisterClient {
                host: "127.0.0.1".into(),
                name: "writer".into(),
            })
            .unwrap()
        {
            Response::Registered(s) => s.client,
            r => panic!("{r:?}"),
        };
        let r = c
            .call(&Request::MountSegment {
                client,
                mount: mooncake_store::MountRequest {
                    name: "seg0".into(),
                    base: 1 << 20,
                    size: 64 << 20,
                    host: "127.0.0.1".into(),
                    held: Vec::new(),
                },
            })
            .unwrap();
        assert!(matches!(r, Response::Mounted(_)), "{r:?}");
        let items = keys2
            .iter()
            .map(|k| PutItem {
                key: k.clone(),
                size: 4096,
                group: None,
            })
            .collect();
        let r = c
            .call(&Request::BatchPutStart {
                client,
                tenant: "default".into(),
                items,
                config: Default::default(),
                upsert: false,
            })
            .unwrap();
        assert!(matches!(r, Response::PutStarted(_)), "{r:?}");
        let r = c
            .call(&Request::BatchPutFinish {
                client,
                tenant: "default".into(),
                end: keys2.clone(),
                revoke: Vec::new(),
                failed_segments: Vec::new(),
            })
            .unwrap();
        match r {
            Response::PutFinished { end, .. } => assert!(end.iter().all(Result::is_ok)),
            r => panic!("{r:?}"),
        }
    })
    .await
    .unwrap();

    let cfg = cfg().with_store(Some(admin), None);
    let c = conductor(cfg, Vec::new()).await;
    let base = format!("http://{}", c.addr);
    for (name, role) in [("p0", "prefill"), ("d0", "decode")] {
        post(
            &format!("{base}/v1/instances"),
            json!({"name": name, "role": role}),
        )
        .await;
    }
    let n = hashes.len() as u64;
    eventually("the store's listing", || blocks_of(&c.svc, "store") == n).await;
    let (st, v) = post(
        &format!("{base}/v1/schedule"),
        json!({"token_ids": ids, "output_tokens": 4}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["prefill"]["name"], "p0");
    assert_eq!(v["prefix_fetch"]["source"], "store", "{v}");
    assert_eq!(v["prefix_fetch"]["blocks"].as_u64(), Some(n));
    assert_eq!(v["reused_tokens"].as_u64(), Some(n * 16));
    // The request is abandoned (its blocks were booked as expected on p0 until then).
    let id = v["request_id"].as_u64().unwrap();
    post(
        &format!("{base}/v1/requests/{id}/events"),
        json!({"event": "dropped"}),
    )
    .await;
    // A removal reaches the Conductor as an event: the first block gone, no hit left.
    let k0 = keys[0].clone();
    tokio::task::spawn_blocking(move || {
        let mut c = RpcClient::connect(rpc, Duration::from_secs(5)).unwrap();
        let r = c
            .call(&Request::BatchRemove {
                tenant: "default".into(),
                keys: vec![k0],
                force: true,
            })
            .unwrap();
        assert!(matches!(r, Response::Removed(_)), "{r:?}");
    })
    .await
    .unwrap();
    eventually("the removal", || blocks_of(&c.svc, "store") == n - 1).await;
    let (_, v) = post(
        &format!("{base}/v1/schedule"),
        json!({"token_ids": ids, "output_tokens": 4}),
    )
    .await;
    assert!(v["prefix_fetch"].is_null(), "{v}");
    assert_eq!(v["reused_tokens"], 0);
    c.stop();
    master.stop();
}
