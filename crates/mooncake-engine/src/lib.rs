#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod background;
mod engine;

pub use engine::{BatchId, DEFAULT_TIMEOUT, EngineBuilder, TransferEngine};
