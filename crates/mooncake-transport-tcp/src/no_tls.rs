//! Stand-ins for a build without the `tls` feature: no value of these types exists, so every
//! connection is plain TCP and asking for TLS is a configuration error.

use std::io;
use std::os::fd::RawFd;

use mooncake_core::{Error, ErrorKind, RegionLease, Result};

use crate::sys::{Chunk, Io};

/// No TLS settings can be made without the `tls` feature.
#[derive(Debug)]
pub(crate) enum TlsConfig {}

impl TlsConfig {
    pub(crate) fn new() -> Result<Self> {
        Err(Error::new(
            ErrorKind::Config,
            "TLS of the tcp transport needs a build with the `tls` feature \
             (mooncake: `tcp-tls`)",
        ))
    }

    pub(crate) fn accept(&self) -> Result<Tls> {
        match *self {}
    }

    pub(crate) fn connect(&self) -> Result<Tls> {
        match *self {}
    }
}

/// No TLS session exists without the `tls` feature.
pub(crate) enum Tls {}

impl Tls {
    pub(crate) fn flush(&self, _fd: RawFd) -> io::Result<bool> {
        match *self {}
    }

    pub(crate) fn recv(&self, _fd: RawFd, _buf: &mut [u8]) -> io::Result<Io> {
        match *self {}
    }

    pub(crate) fn recv_into_lease(
        &self,
        _fd: RawFd,
        _lease: &RegionLease,
        _offset: u64,
        _len: usize,
    ) -> io::Result<Io> {
        match *self {}
    }

    pub(crate) fn send_chunks(&self, _fd: RawFd, _chunks: &[Chunk<'_>]) -> io::Result<Io> {
        match *self {}
    }

    pub(crate) fn binding(&self) -> io::Result<[u8; 32]> {
        match *self {}
    }
}
