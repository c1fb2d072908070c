//! Reader for Mooncake's JSONL request traces and the statistics of `mooncake trace stats`.
//!
//! Each line is one request:
//! `{"timestamp": ms, "input_length": tokens, "output_length": tokens, "hash_ids": [..]}`, where
//! `hash_ids` are prefix-chained ids of the prompt's 512-token blocks (the last one partial).

use std::collections::{BTreeMap, HashSet};
use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use mooncake_scheduler::lru::LruSet;

/// Tokens per KV block in the published traces.
pub const TRACE_BLOCK_TOKENS: u32 = 512;

/// Errors of the trace reader.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceError {
    /// The file could not be opened or read.
    #[error("{path}: {message}")]
    Io {
        /// The trace file.
        path: PathBuf,
        /// The I/O error, as text.
        message: String,
    },
    /// A line is not a valid request.
    #[error("{path}:{line}: {message}")]
    Malformed {
        /// The trace file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// One request of a trace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceRequest {
    /// Arrival time, milliseconds from the trace start.
    pub timestamp: u64,
    /// Prompt tokens.
    pub input_length: u32,
    /// Generated tokens.
    pub output_length: u32,
    /// Prefix-chained block ids of the prompt.
    pub hash_ids: Vec<u64>,
}

impl TraceRequest {
    /// Tokens in block `i` of the prompt: 512 except for the last, partial one.
    pub fn block_tokens(&self, i: usize, block: u32) -> u32 {
        let start = (i as u64) * u64::from(block);
        (u64::from(self.input_length).saturating_sub(start)).min(u64::from(block)) as u32
    }

    /// Tokens covered by the first `blocks` blocks of the prompt.
    pub fn prefix_tokens(&self, blocks: usize, block: u32) -> u32 {
        ((blocks as u64) * u64::from(block)).min(u64::from(self.input_length)) as u32
    }
}

/// A parsed trace, sorted by arrival time (stable: equal timestamps keep file order).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Trace {
    /// The requests.
    pub requests: Vec<TraceRequest>,
}

impl Trace {
    /// Reads a JSONL trace file.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self, TraceError> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| TraceError::Io {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        Self::from_reader(std::io::BufReader::new(file), path)
    }

    /// Parses a JSONL trace from `reader`; `path` names it in errors. Blank lines are skipped.
    pub fn from_reader(reader: impl BufRead, path: &Path) -> Result<Self, TraceError> {
        let mut requests = Vec::new();
        for (i, line) in reader.lines().enumerate() {
            let line = line.map_err(|e| TraceError::Malformed {
                path: path.to_owned(),
                line: i + 1,
                message: e.to_string(),
            })?;
            if line.trim().is_empty() {
                continue;
            }
            let req = parse_line(&line).map_err(|message| TraceError::Malformed {
                path: path.to_owned(),
                line: i + 1,
                message,
            })?;
            requests.push(req);
        }
        requests.sort_by_key(|r| r.timestamp);
        Ok(Self { requests })
    }

    /// Time from the first to the last arrival, seconds.
    pub fn span_s(&self) -> f64 {
        match (self.requests.first(), self.requests.last()) {
            (Some(a), Some(b)) => (b.timestamp - a.timestamp) as f64 / 1000.0,
            _ => 0.0,
        }
    }
}

fn parse_line(line: &str) -> Result<TraceRequest, String> {
    let req: TraceRequest = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let max_blocks = u64::from(req.input_length).div_ceil(u64::from(TRACE_BLOCK_TOKENS));
    if req.hash_ids.len() as u64 > max_blocks.max(1) {
        return Err(format!(
            "{} hash_ids for {} input tokens (at most {} blocks of {} tokens)",
            req.hash_ids.len(),
            req.input_length,
            max_blocks,
            TRACE_BLOCK_TOKENS
        ));
    }
    Ok(req)
}

/// Token-weighted prefix hit ratio of a request sequence against one global cache.
///
/// A block counts as hit only if every earlier block of the same request hit; the last block
/// counts its real number of tokens. `capacity_tokens = None` is an infinite cache; otherwise
/// an LRU of `capacity_tokens / block` blocks, touched in arrival order.
pub fn hit_ratio(trace: &Trace, capacity_tokens: Option<u64>, block: u32) -> f64 {
    let mut hit = 0u64;
    let mut total = 0u64;
    match capacity_tokens {
        None => {
            let mut seen: HashSet<u64> = HashSet::new();
            for r in &trace.requests {
                let mut prefix = true;
                for (i, &h) in r.hash_ids.iter().enumerate() {
                    let present = !seen.insert(h);
                    prefix &= present;
                    if prefix {
                        hit += u64::from(r.block_tokens(i, block));
                    }
                }
                total += u64::from(r.input_length);
            }
        }
        Some(cap) => {
            let mut lru = LruSet::new((cap / u64::from(block)) as usize);
            for r in &trace.requests {
                let mut prefix = true;
                for (i, &h) in r.hash_ids.iter().enumerate() {
                    let present = lru.touch(h);
                    prefix &= present;
                    if prefix {
                        hit += u64::from(r.block_tokens(i, block));
                    }
                    if !present {
                        lru.insert(h, |_| {});
                    }
                }
                total += u64::from(r.input_length);
            }
        }
    }
    if total == 0 {
        0.0
    } else {
        hit as f64 / total as f64
    }
}

/// The statistics of `mooncake trace stats`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TraceStats {
    /// Number of requests.
    pub requests: usize,
    /// First to last arrival, seconds.
    pub span_s: f64,
    /// Requests per second over the span.
    pub arrival_rate: f64,
    /// Mean prompt tokens.
    pub mean_input: f64,
    /// Median prompt tokens.
    pub p50_input: f64,
    /// 99th percentile of prompt tokens.
    pub p99_input: f64,
    /// Mean generated tokens.
    pub mean_output: f64,
    /// Median generated tokens.
    pub p50_output: f64,
    /// 99th percentile of generated tokens.
    pub p99_output: f64,
    /// Distinct block ids.
    pub unique_blocks: usize,
    /// Token hit ratio with an infinite cache.
    pub infinite_hit_ratio: f64,
    /// Token hit ratio with a global LRU of each capacity (tokens → ratio).
    pub lru_hit_ratio: BTreeMap<u64, f64>,
}

/// Computes [`TraceStats`]; `lru_capacities` are in tokens.
pub fn trace_stats(trace: &Trace, lru_capacities: &[u64]) -> TraceStats {
    let n = trace.requests.len();
    let inputs: Vec<f64> = trace
        .requests
        .iter()
        .map(|r| f64::from(r.input_length))
        .collect();
    let outputs: Vec<f64> = trace
        .requests
        .iter()
        .map(|r| f64::from(r.output_length))
        .collect();
    let unique: HashSet<u64> = trace
        .requests
        .iter()
        .flat_map(|r| r.hash_ids.iter().copied())
        .collect();
    let span_s = trace.span_s();
    TraceStats {
        requests: n,
        span_s,
        arrival_rate: if span_s > 0.0 { n as f64 / span_s } else { 0.0 },
        mean_input: mean(&inputs),
        p50_input: percentile(&inputs, 0.5),
        p99_input: percentile(&inputs, 0.99),
        mean_output: mean(&outputs),
        p50_output: percentile(&outputs, 0.5),
        p99_output: percentile(&outputs, 0.99),
        unique_blocks: unique.len(),
        infinite_hit_ratio: hit_ratio(trace, None, TRACE_BLOCK_TOKENS),
        lru_hit_ratio: lru_capacities
            .iter()
            .map(|&c| (c, hit_ratio(trace, Some(c), TRACE_BLOCK_TOKENS)))
            .collect(),
    }
}

/// Arithmetic mean (0 for an empty slice).
pub fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Nearest-rank percentile, `q` in `[0, 1]` (0 for an empty slice).
pub fn percentile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Trace, TraceError> {
        Trace::from_reader(text.as_bytes(), Path::new("t.jsonl"))
    }

    #[test]
    fn parses_and_sorts() {
        let t = parse(
            "{\"timestamp\": 5, \"input_length\": 600, \"output_length\": 2, \"hash_ids\": [1, 2]}\n\n\
             {\"timestamp\": 1, \"input_length\": 10, \"output_length\": 1, \"hash_ids\": [3]}\n",
        )
        .unwrap();
        assert_eq!(t.requests.len(), 2);
        assert_eq!(t.requests[0].timestamp, 1);
        assert_eq!(t.requests[1].block_tokens(1, 512), 88);
        assert!((t.span_s() - 0.004).abs() < 1e-12);
    }

    #[test]
    fn malformed_line_names_file_and_line() {
        let err = parse(
            "{\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": [1]}\n\
             {\"timestamp\": 0, \"input_length\": \"x\"}\n",
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("t.jsonl:2: "), "{msg}");
        assert!(matches!(err, TraceError::Malformed { line: 2, .. }));
    }

    #[test]
    fn rejects_missing_field_extra_field_and_too_many_blocks() {
        for bad in [
            "{\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1}",
            "{\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": [], \"x\": 1}",
            "{\"timestamp\": 0, \"input_length\": 513, \"output_length\": 1, \"hash_ids\": [1,2,3]}",
            "{\"timestamp\": -1, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": []}",
            "not json",
        ] {
            let err = parse(bad).unwrap_err();
            assert!(
                matches!(err, TraceError::Malformed { line: 1, .. }),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn missing_file_is_io_error() {
        let err = Trace::from_path("/nonexistent/trace.jsonl").unwrap_err();
        assert!(matches!(err, TraceError::Io { .. }));
        assert!(err.to_string().contains("/nonexistent/trace.jsonl"));
    }

    #[test]
    fn hit_ratio_counts_contiguous_prefix_and_partial_last_block() {
        // r0: blocks 1,2 (1024 tokens) all miss. r1: 1 hits, 9 misses, 2 would hit but is after a
        // miss. r2: 1,2 hit, last block 3 (100 tokens) misses.
        let t = parse(
            "{\"timestamp\": 0, \"input_length\": 1024, \"output_length\": 1, \"hash_ids\": [1, 2]}\n\
             {\"timestamp\": 1, \"input_length\": 1500, \"output_length\": 1, \"hash_ids\": [1, 9, 2]}\n\
             {\"timestamp\": 2, \"input_length\": 1124, \"output_length\": 1, \"hash_ids\": [1, 2, 3]}\n",
        )
        .unwrap();
        let expect = (512.0 + 1024.0) / (1024.0 + 1500.0 + 1124.0);
        assert!((hit_ratio(&t, None, 512) - expect).abs() < 1e-12);
        // An LRU of 2 blocks: after r1 it holds {9, 2}; r2's block 1 misses.
        let lru = hit_ratio(&t, Some(1024), 512);
        assert!((lru - 512.0 / 3648.0).abs() < 1e-12, "{lru}");
        // A large LRU equals the infinite cache.
        assert!((hit_ratio(&t, Some(1 << 30), 512) - expect).abs() < 1e-12);
    }

    #[test]
    fn percentiles() {
        let v = [4.0, 1.0, 3.0, 2.0];
        assert_eq!(percentile(&v, 0.5), 2.0);
        assert_eq!(percentile(&v, 0.99), 4.0);
        assert_eq!(mean(&v), 2.5);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
