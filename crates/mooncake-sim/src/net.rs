//! A flow-level model of the cluster's RDMA network: every node has a send and a receive port
//! of the same capacity, and the active transfers share them max-min fairly (progressive
//! filling), which is how many QPs over a shared link behave on average. A transfer's rate
//! changes whenever another starts or ends; the simulator asks for the next completion after
//! every change.

/// Identifies a transfer.
pub type FlowId = u64;

#[derive(Debug, Clone)]
struct Flow {
    id: FlowId,
    src: usize,
    dst: usize,
    remaining: f64,
    rate: f64,
}

/// The network: `nodes` nodes, each with a send and a receive port of `capacity` bytes/s.
#[derive(Debug, Clone)]
pub struct Network {
    capacity: f64,
    nodes: usize,
    flows: Vec<Flow>,
    now: f64,
    next_id: FlowId,
    // Scratch for the rate computation.
    residual: Vec<f64>,
    count: Vec<u32>,
    fixed: Vec<bool>,
}

/// Bytes below which a flow counts as done (rounding of rate × time).
const DONE_BYTES: f64 = 1e-3;
/// Seconds of transfer left below which a flow counts as done: far below the resolution of the
/// clock at the end of a long replay, so the next completion always moves time forward.
const DONE_S: f64 = 1e-9;

impl Network {
    /// A network of `nodes` nodes with `capacity` bytes/s per port and direction (at least
    /// 1 byte/s, so every transfer ends).
    pub fn new(nodes: usize, capacity: f64) -> Self {
        Self {
            capacity: if capacity >= 1.0 { capacity } else { 1.0 },
            nodes,
            flows: Vec::new(),
            now: 0.0,
            next_id: 0,
            residual: vec![0.0; 2 * nodes],
            count: vec![0; 2 * nodes],
            fixed: Vec::new(),
        }
    }

    /// Transfers in progress.
    pub fn active(&self) -> usize {
        self.flows.len()
    }

    /// Moves every flow forward to `now` at its current rate.
    fn advance(&mut self, now: f64) {
        let dt = now - self.now;
        if dt > 0.0 {
            for f in &mut self.flows {
                f.remaining = (f.remaining - f.rate * dt).max(0.0);
            }
        }
        self.now = self.now.max(now);
    }

    /// Starts a transfer of `bytes` from `src` to `dst` at `now`.
    pub fn start(&mut self, now: f64, src: usize, dst: usize, bytes: f64) -> FlowId {
        assert!(src < self.nodes && dst < self.nodes, "node out of range");
        self.advance(now);
        let id = self.next_id;
        self.next_id += 1;
        self.flows.push(Flow {
            id,
            src,
            dst,
            remaining: bytes.max(0.0),
            rate: 0.0,
        });
        self.rates();
        id
    }

    /// Removes and returns the transfers finished by `now`.
    pub fn finish(&mut self, now: f64) -> Vec<FlowId> {
        self.advance(now);
        let mut done = Vec::new();
        self.flows.retain(|f| {
            if f.remaining <= DONE_BYTES || f.remaining <= f.rate * DONE_S {
                done.push(f.id);
                false
            } else {
                true
            }
        });
        if !done.is_empty() {
            self.rates();
        }
        done
    }

    /// When the next transfer finishes at the current rates.
    pub fn next_completion(&self) -> Option<f64> {
        self.flows
            .iter()
            .filter(|f| f.rate > 0.0)
            .map(|f| self.now + f.remaining / f.rate)
            .min_by(f64::total_cmp)
    }

    /// Max-min fair rates by progressive filling: repeatedly find the port whose remaining
    /// capacity split evenly over its unfixed flows is smallest, and fix those flows there.
    fn rates(&mut self) {
        let n = self.flows.len();
        self.fixed.clear();
        self.fixed.resize(n, false);
        self.residual.iter_mut().for_each(|r| *r = self.capacity);
        self.count.iter_mut().for_each(|c| *c = 0);
        for f in &self.flows {
            self.count[f.src] += 1;
            self.count[self.nodes + f.dst] += 1;
        }
        let mut left = n;
        while left > 0 {
            let mut best: Option<(usize, f64)> = None;
            for (p, &c) in self.count.iter().enumerate() {
                if c > 0 {
                    let share = self.residual[p] / f64::from(c);
                    if best.is_none_or(|(_, s)| share < s) {
                        best = Some((p, share));
                    }
                }
            }
            let Some((port, share)) = best else { break };
            for (k, f) in self.flows.iter_mut().enumerate() {
                if self.fixed[k] {
                    continue;
                }
                let (tx, rx) = (f.src, self.nodes + f.dst);
                if tx != port && rx != port {
                    continue;
                }
                self.fixed[k] = true;
                f.rate = share.max(0.0);
                for q in [tx, rx] {
                    self.residual[q] -= share;
                    self.count[q] -= 1;
                }
                left -= 1;
            }
        }
    }

    /// The current rate of a flow (bytes/s), if it is active.
    pub fn rate(&self, id: FlowId) -> Option<f64> {
        self.flows.iter().find(|f| f.id == id).map(|f| f.rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_flow_runs_at_capacity() {
        let mut n = Network::new(2, 10.0);
        let a = n.start(0.0, 0, 1, 100.0);
        assert_eq!(n.rate(a), Some(10.0));
        assert_eq!(n.next_completion(), Some(10.0));
        assert!(n.finish(5.0).is_empty());
        assert_eq!(n.finish(10.0), vec![a]);
        assert_eq!(n.active(), 0);
        assert_eq!(n.next_completion(), None);
    }

    #[test]
    fn shared_sender_halves_rates_and_frees_bandwidth_on_completion() {
        let mut n = Network::new(3, 10.0);
        let a = n.start(0.0, 0, 1, 50.0);
        let b = n.start(0.0, 0, 2, 100.0);
        assert_eq!((n.rate(a), n.rate(b)), (Some(5.0), Some(5.0)));
        assert_eq!(n.next_completion(), Some(10.0));
        assert_eq!(n.finish(10.0), vec![a]);
        // b has 50 bytes left and now the whole port.
        assert_eq!(n.rate(b), Some(10.0));
        assert_eq!(n.next_completion(), Some(15.0));
    }

    #[test]
    fn max_min_gives_leftover_to_unconstrained_flows() {
        // 0→2 and 1→2 share receiver 2; 0→3 shares sender 0 with 0→2.
        let mut n = Network::new(4, 12.0);
        let a = n.start(0.0, 0, 2, 1e9);
        let b = n.start(0.0, 1, 2, 1e9);
        let c = n.start(0.0, 0, 3, 1e9);
        // Receiver 2: 6 each for a and b; sender 0 then has 6 left for c.
        assert_eq!(n.rate(a), Some(6.0));
        assert_eq!(n.rate(b), Some(6.0));
        assert_eq!(n.rate(c), Some(6.0));
        let d = n.start(0.0, 1, 3, 1e9);
        // Every port has two flows: 6 each.
        for f in [a, b, c, d] {
            assert_eq!(n.rate(f), Some(6.0));
        }
    }
}
