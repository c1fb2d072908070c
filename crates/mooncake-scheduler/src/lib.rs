//! Conductor: the KVCache-centric scheduler and its trace-driven simulator.
