//! Which local NICs serve which buffer location: Mooncake's priority matrix
//! (`location → [[preferred NICs], [fallback NICs]]`), from sysfs NUMA nodes or a JSON file.

use std::collections::BTreeMap;

use mooncake_core::{Error, ErrorKind, Location, Result};

/// Preferred and fallback NIC indices for each location tag.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Topology {
    /// `cpu:N` (or any tag) → (preferred, fallback) indices into the NIC list.
    pub matrix: BTreeMap<String, (Vec<usize>, Vec<usize>)>,
    /// Number of NICs.
    pub nics: usize,
}

impl Topology {
    /// From NUMA nodes: `cpu:N` prefers NICs on node N; NICs with an unknown node serve all.
    pub fn from_numa(numa: &[Option<u32>]) -> Self {
        let mut nodes: Vec<u32> = numa.iter().flatten().copied().collect();
        nodes.sort_unstable();
        nodes.dedup();
        let mut matrix = BTreeMap::new();
        for n in nodes {
            let (pref, fall): (Vec<usize>, Vec<usize>) =
                (0..numa.len()).partition(|&i| numa[i].is_none_or(|m| m == n));
            matrix.insert(format!("cpu:{n}"), (pref, fall));
        }
        Self {
            matrix,
            nics: numa.len(),
        }
    }

    /// From Mooncake's JSON (`{"cpu:0": [["mlx5_0"], ["mlx5_1"]], …}`), naming NICs by `names`.
    pub fn from_json(json: &str, names: &[String]) -> Result<Self> {
        let raw: BTreeMap<String, Vec<Vec<String>>> = serde_json::from_str(json).map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!("malformed RDMA topology JSON: {e}"),
            )
        })?;
        let idx = |n: &String| {
            names.iter().position(|m| m == n).ok_or_else(|| {
                Error::new(
                    ErrorKind::Config,
                    format!("topology names NIC {n:?}, which is not open (have {names:?})"),
                )
            })
        };
        let mut matrix = BTreeMap::new();
        for (loc, tiers) in raw {
            let pref = tiers
                .first()
                .map(|t| t.iter().map(idx).collect::<Result<Vec<_>>>())
                .transpose()?;
            let fall = tiers
                .get(1)
                .map(|t| t.iter().map(idx).collect::<Result<Vec<_>>>())
                .transpose()?;
            matrix.insert(loc, (pref.unwrap_or_default(), fall.unwrap_or_default()));
        }
        Ok(Self {
            matrix,
            nics: names.len(),
        })
    }

    /// NIC indices for a buffer at `loc`: preferred first, then fallback, then every other NIC.
    pub fn tiers(&self, loc: &Location) -> (Vec<usize>, Vec<usize>) {
        let key = loc.to_string();
        match self.matrix.get(&key) {
            Some((p, f)) if !p.is_empty() || !f.is_empty() => {
                let mut fall = f.clone();
                fall.extend((0..self.nics).filter(|i| !p.contains(i) && !f.contains(i)));
                (p.clone(), fall)
            }
            _ => ((0..self.nics).collect(), Vec::new()),
        }
    }

    /// The matrix in the descriptor's form (NIC names).
    pub fn to_descriptor(&self, names: &[String]) -> BTreeMap<String, Vec<Vec<String>>> {
        let n = |v: &Vec<usize>| v.iter().map(|&i| names[i].clone()).collect::<Vec<_>>();
        self.matrix
            .iter()
            .map(|(k, (p, f))| (k.clone(), vec![n(p), n(f)]))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numa_prefers_local_nics() {
        let t = Topology::from_numa(&[Some(0), Some(1), None]);
        assert_eq!(t.tiers(&Location::Cpu(0)), (vec![0, 2], vec![1]));
        assert_eq!(t.tiers(&Location::Cpu(1)), (vec![1, 2], vec![0]));
        assert_eq!(t.tiers(&Location::Any), (vec![0, 1, 2], vec![]));
        let names = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        assert_eq!(
            t.to_descriptor(&names)["cpu:0"],
            vec![
                vec!["a".to_string(), "c".to_string()],
                vec!["b".to_string()]
            ]
        );
    }

    #[test]
    fn json_matrix_is_read_and_checked() {
        let names = vec!["mlx5_0".to_string(), "mlx5_1".to_string()];
        let t = Topology::from_json(r#"{"cpu:0":[["mlx5_1"],["mlx5_0"]]}"#, &names).unwrap();
        assert_eq!(t.tiers(&Location::Cpu(0)), (vec![1], vec![0]));
        assert_eq!(t.tiers(&Location::Cuda(0)), (vec![0, 1], vec![]));
        assert!(Topology::from_json(r#"{"cpu:0":[["mlx5_9"]]}"#, &names).is_err());
        assert!(Topology::from_json("[", &names).is_err());
    }
}
