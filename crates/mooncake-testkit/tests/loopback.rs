//! The loopback reference transport passes the transport conformance suite.

use mooncake_core::TransportBuilder;
use mooncake_testkit::{LoopbackConfig, TransportHarness, transport_suite};

struct Loopback;

impl TransportHarness for Loopback {
    fn name(&self) -> &str {
        "loopback"
    }
    fn builder(&self) -> Box<dyn TransportBuilder> {
        Box::new(LoopbackConfig)
    }
    fn cross_process(&self) -> bool {
        false
    }
}

transport_suite!(loopback, || Some(Loopback));
