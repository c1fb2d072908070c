//! Where a registered buffer lives: `cpu:<numa>`, `cuda:<gpu>`, or `*` (detect).

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// The location tag of a registered buffer, in Mooncake's string form.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum Location {
    /// `*`: unknown; the engine may detect it.
    #[default]
    Any,
    /// `cpu:<numa node>`.
    Cpu(u32),
    /// `cuda:<device ordinal>`.
    Cuda(u32),
    /// Any other `kind:index` tag, kept verbatim (for example `npu:0`).
    Other(String),
}

impl Location {
    /// True for host memory (`cpu:*` or `*`).
    pub fn is_host(&self) -> bool {
        matches!(self, Self::Any | Self::Cpu(_))
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("*"),
            Self::Cpu(n) => write!(f, "cpu:{n}"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Other(s) => f.write_str(s),
        }
    }
}

impl FromStr for Location {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let s = s.trim();
        if s.is_empty() || s == "*" {
            return Ok(Self::Any);
        }
        let Some((kind, idx)) = s.split_once(':') else {
            return Err(Error::invalid(format!(
                "location {s:?} is not of the form cpu:<n>, cuda:<n> or *"
            )));
        };
        let n: u32 = idx
            .parse()
            .map_err(|_| Error::invalid(format!("location {s:?}: {idx:?} is not an index")))?;
        Ok(match kind {
            "cpu" => Self::Cpu(n),
            "cuda" => Self::Cuda(n),
            _ => Self::Other(s.to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        for s in ["*", "cpu:0", "cuda:3", "npu:1"] {
            assert_eq!(s.parse::<Location>().unwrap().to_string(), s);
        }
        assert!("cpu".parse::<Location>().is_err());
        assert!("cpu:x".parse::<Location>().is_err());
    }
}
