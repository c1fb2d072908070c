//! A node killed with SIGKILL (no cleanup at all) disappears within the TTL: the test re-runs
//! this binary as a child that publishes a key and keeps it alive, kills it, and waits for the
//! key to go.
#![allow(dead_code, unused_imports)]

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mooncake_core::{MetadataStore, block_on};
use mooncake_testkit::unique;

const TTL: Duration = Duration::from_secs(2);

fn store_for(url: &str, ttl: Option<Duration>) -> Arc<dyn MetadataStore> {
    match url {
        #[cfg(feature = "http")]
        u if u.starts_with("http://") => {
            use mooncake_metadata::{HttpConfig, HttpMetadataStore};
            Arc::new(HttpMetadataStore::new(u, HttpConfig::default().with_ttl(ttl)).unwrap())
        }
        #[cfg(feature = "redis")]
        u if u.starts_with("redis://") => {
            use mooncake_metadata::{RedisConfig, RedisMetadataStore};
            Arc::new(RedisMetadataStore::connect(u, RedisConfig::default().with_ttl(ttl)).unwrap())
        }
        #[cfg(feature = "etcd")]
        u if u.starts_with("etcd://") => {
            use mooncake_metadata::{EtcdConfig, EtcdMetadataStore};
            Arc::new(EtcdMetadataStore::connect(u, EtcdConfig::default().with_ttl(ttl)).unwrap())
        }
        other => panic!("no backend for {other} in this build"),
    }
}

/// The child: publishes `MOONCAKE_CRASH_KEY` with a TTL and keeps it alive until killed.
#[test]
#[ignore = "child process of the crash tests; run by them"]
fn crash_child() {
    let (Ok(url), Ok(key)) = (
        std::env::var("MOONCAKE_CRASH_URL"),
        std::env::var("MOONCAKE_CRASH_KEY"),
    ) else {
        return;
    };
    let store = store_for(&url, Some(TTL));
    block_on(store.put(&key, b"{\"name\":\"crash\"}".to_vec())).unwrap();
    std::thread::sleep(Duration::from_secs(120));
}

fn crash_and_wait(url: &str) {
    let key = format!("mooncake/{}/ram/crash", unique("crash"));
    let observer = store_for(url, None);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--ignored", "--nocapture"])
        .env("MOONCAKE_CRASH_URL", url)
        .env("MOONCAKE_CRASH_KEY", &key)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while block_on(observer.get(&key)).unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the child never published its key"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Alive for more than a TTL: the child's keepalive holds the key.
    std::thread::sleep(TTL + TTL / 2);
    assert!(
        block_on(observer.get(&key)).unwrap().is_some(),
        "{url}: a live node's key expired"
    );
    child.kill().unwrap(); // SIGKILL: no destructor, no delete.
    child.wait().unwrap();
    let killed = Instant::now();
    while block_on(observer.get(&key)).unwrap().is_some() {
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "{url}: a killed node's key outlived 10 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let gone = killed.elapsed();
    eprintln!("{url}: killed node's key gone after {gone:?} (TTL {TTL:?})");
    // etcd rounds TTLs to whole seconds and checks expiry every ~500 ms; allow one TTL of slack.
    assert!(gone <= TTL * 2, "{url}: gone after {gone:?}, TTL {TTL:?}");
}

#[cfg(feature = "http-server")]
#[test]
fn killed_http_client() {
    let server =
        mooncake_metadata::http::HttpMetadataServer::bind("127.0.0.1:0", Default::default())
            .unwrap();
    crash_and_wait(&server.url());
}

#[cfg(feature = "redis")]
#[test]
fn killed_redis_client() {
    let Some(url) = mooncake_testkit::metadata::service_url("MOONCAKE_TEST_REDIS") else {
        return;
    };
    crash_and_wait(&url);
}

#[cfg(feature = "etcd")]
#[test]
fn killed_etcd_client() {
    let Some(url) = mooncake_testkit::metadata::service_url("MOONCAKE_TEST_ETCD") else {
        return;
    };
    crash_and_wait(&url);
}
