//! Which local NICs serve which buffer location: Mooncake's priority matrix
//! (`location → [[preferred NICs], [fallback NICs]]`), from sysfs NUMA nodes or a JSON file,
//! and for device memory (`cuda:N`) from the PCIe distance between the device and each NIC.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use mooncake_core::{DeviceCopier, Error, ErrorKind, Location, Result};

/// CUDA ordinals probed for their PCI address (the first one the runtime does not know ends
/// the probe).
const MAX_CUDA_DEVICES: u32 = 256;

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

    /// Adds `tag` (`cuda:0`) preferring the NICs nearest the device, given each NIC's
    /// [`PciAffinity`] to it: the NICs at the best affinity are preferred, every other NIC is
    /// a fallback, nearest first. A tag the matrix already has (from JSON) is kept as it is.
    pub fn add_device(&mut self, tag: String, affinity: &[PciAffinity]) {
        let Some(best) = affinity.iter().min() else {
            return;
        };
        let pref: Vec<usize> = (0..affinity.len())
            .filter(|&i| affinity[i] == *best)
            .collect();
        let mut fall: Vec<usize> = (0..affinity.len())
            .filter(|&i| affinity[i] != *best)
            .collect();
        fall.sort_by_key(|&i| affinity[i]);
        self.matrix.entry(tag).or_insert((pref, fall));
    }

    /// Adds `cuda:N` for every device `copier` knows a PCI address of, preferring the NICs
    /// nearest it in the PCI tree under `root` (`/` on a real host); `names` are the NICs.
    pub fn add_cuda_devices(&mut self, root: &Path, copier: &dyn DeviceCopier, names: &[String]) {
        for n in 0..MAX_CUDA_DEVICES {
            let loc = Location::Cuda(n);
            let Ok(bus) = copier.pci_bus_id(&loc) else {
                break;
            };
            let aff: Vec<PciAffinity> = names
                .iter()
                .map(|nic| pci_affinity(root, &bus, nic))
                .collect();
            tracing::info!(device = %loc, pci = %bus, affinity = ?names.iter().zip(&aff).collect::<Vec<_>>(), "NIC affinity of a GPU");
            self.add_device(loc.to_string(), &aff);
        }
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

/// How near a NIC sits to a PCI device (a GPU); the order is nearest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum PciAffinity {
    /// Both behind one PCIe switch: `hops` links from each up to the switch, summed.
    Switch {
        /// Links between the two devices through their nearest common bridge.
        hops: usize,
    },
    /// Under the same root complex (host bridge), behind different root ports.
    RootComplex {
        /// Links between the two devices through the host bridge.
        hops: usize,
    },
    /// Different root complexes on the same NUMA node.
    Numa,
    /// Different NUMA nodes, or where either device is unknown to sysfs.
    Other,
}

/// The PCI address as sysfs names it: lower case, a 4-digit domain (CUDA and NVML may
/// print `00000000:1B:00.0`).
pub(crate) fn sysfs_bus_id(bus_id: &str) -> String {
    let id = bus_id.trim().to_ascii_lowercase();
    match id.split_once(':') {
        Some((dom, rest)) => match u32::from_str_radix(dom, 16) {
            Ok(d) => format!("{d:04x}:{rest}"),
            Err(_) => id,
        },
        None => id,
    }
}

/// The device's path below `<root>/sys/devices` (`pci0000:00`, `0000:00:01.0`, …) and its
/// NUMA node, from a link to its sysfs folder.
fn pci_path(root: &Path, link: &Path) -> Option<(Vec<String>, Option<i64>)> {
    let devices = root.join("sys/devices").canonicalize().ok()?;
    let real: PathBuf = link.canonicalize().ok()?;
    let rel = real.strip_prefix(&devices).ok()?;
    let parts = rel
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect::<Vec<_>>();
    let numa = std::fs::read_to_string(real.join("numa_node"))
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .filter(|&n| n >= 0);
    Some((parts, numa))
}

/// The affinity of RDMA device `nic` (`/sys/class/infiniband/<nic>/device`) to the PCI
/// device `bus_id` (`/sys/bus/pci/devices/<bus_id>`), both resolved under `root` (`/` on a
/// real host): the number of links from each up to their nearest common ancestor decides
/// within a switch or a root complex; without a common ancestor, their NUMA nodes decide.
pub(crate) fn pci_affinity(root: &Path, bus_id: &str, nic: &str) -> PciAffinity {
    let dev = pci_path(
        root,
        &root.join("sys/bus/pci/devices").join(sysfs_bus_id(bus_id)),
    );
    let nic = pci_path(
        root,
        &root.join("sys/class/infiniband").join(nic).join("device"),
    );
    let (Some((a, an)), Some((b, bn))) = (dev, nic) else {
        return PciAffinity::Other;
    };
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let hops = (a.len() - common) + (b.len() - common);
    match common {
        // Sharing a bridge below the host bridge: a switch (or the same device).
        c if c >= 2 => PciAffinity::Switch { hops },
        1 => PciAffinity::RootComplex { hops },
        _ if an.is_some() && an == bn => PciAffinity::Numa,
        _ => PciAffinity::Other,
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

    /// A fake sysfs tree under a fresh temporary folder, removed on drop.
    struct FakeSysfs(PathBuf);

    impl FakeSysfs {
        fn new() -> Self {
            static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let root =
                std::env::temp_dir().join(format!("mooncake-sysfs-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(root.join("sys/bus/pci/devices")).unwrap();
            std::fs::create_dir_all(root.join("sys/class/infiniband")).unwrap();
            Self(root)
        }

        /// A PCI device at `path` below `sys/devices`, linked as `/sys/bus/pci/devices/<id>`.
        fn pci(&self, path: &str, numa: Option<i64>) -> PathBuf {
            let dir = self.0.join("sys/devices").join(path);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("numa_node"), format!("{}\n", numa.unwrap_or(-1))).unwrap();
            let id = path.rsplit('/').next().unwrap();
            std::os::unix::fs::symlink(&dir, self.0.join("sys/bus/pci/devices").join(id)).unwrap();
            dir
        }

        /// An RDMA device `name` whose `device` link points at the PCI device at `path`.
        fn nic(&self, name: &str, path: &str, numa: Option<i64>) {
            let dir = self.pci(path, numa);
            let ib = self.0.join("sys/class/infiniband").join(name);
            std::fs::create_dir_all(&ib).unwrap();
            std::os::unix::fs::symlink(&dir, ib.join("device")).unwrap();
        }
    }

    impl Drop for FakeSysfs {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const NICS: [&str; 6] = ["mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3", "mlx5_4", "rxe0"];

    /// GPU `0000:03:00.0` behind a switch with mlx5_0 (and, one switch further down, mlx5_4);
    /// mlx5_1 under the same root complex; mlx5_2 on another root complex of NUMA node 0;
    /// mlx5_3 on node 1; rxe0 has no PCI device.
    fn two_socket_host() -> FakeSysfs {
        let fs = FakeSysfs::new();
        let sw = "pci0000:00/0000:00:01.0/0000:01:00.0";
        fs.pci(&format!("{sw}/0000:02:08.0/0000:03:00.0"), Some(0));
        fs.nic(
            "mlx5_0",
            &format!("{sw}/0000:02:10.0/0000:04:00.0"),
            Some(0),
        );
        fs.nic(
            "mlx5_4",
            &format!("{sw}/0000:02:18.0/0000:06:00.0/0000:07:00.0/0000:08:00.0"),
            Some(0),
        );
        fs.nic("mlx5_1", "pci0000:00/0000:00:02.0/0000:05:00.0", Some(0));
        fs.nic("mlx5_2", "pci0000:40/0000:40:01.0/0000:41:00.0", Some(0));
        fs.nic("mlx5_3", "pci0000:80/0000:80:01.0/0000:81:00.0", Some(1));
        std::fs::create_dir_all(fs.0.join("sys/class/infiniband/rxe0")).unwrap();
        fs
    }

    #[test]
    fn bus_ids_are_normalised_to_sysfs_names() {
        assert_eq!(sysfs_bus_id("00000000:1B:00.0"), "0000:1b:00.0");
        assert_eq!(sysfs_bus_id("0000:1b:00.0\n"), "0000:1b:00.0");
        assert_eq!(sysfs_bus_id("0001:AF:00.1"), "0001:af:00.1");
    }

    #[test]
    fn pcie_distance_orders_switch_root_complex_numa_other() {
        let fs = two_socket_host();
        let a = |nic| pci_affinity(&fs.0, "00000000:03:00.0", nic);
        assert_eq!(a("mlx5_0"), PciAffinity::Switch { hops: 4 });
        assert_eq!(a("mlx5_4"), PciAffinity::Switch { hops: 6 });
        assert_eq!(a("mlx5_1"), PciAffinity::RootComplex { hops: 6 });
        assert_eq!(a("mlx5_2"), PciAffinity::Numa);
        assert_eq!(a("mlx5_3"), PciAffinity::Other);
        assert_eq!(a("rxe0"), PciAffinity::Other);
        assert_eq!(a("mlx5_9"), PciAffinity::Other);
        // A GPU sysfs does not know is near nothing.
        assert_eq!(
            pci_affinity(&fs.0, "0000:99:00.0", "mlx5_0"),
            PciAffinity::Other
        );
        assert!(PciAffinity::Switch { hops: 6 } < PciAffinity::RootComplex { hops: 2 });
        assert!(PciAffinity::RootComplex { hops: 9 } < PciAffinity::Numa);
        assert!(PciAffinity::Numa < PciAffinity::Other);
    }

    #[test]
    fn gpu_buffers_prefer_the_nearest_nics_and_publish_them() {
        let fs = two_socket_host();
        let names: Vec<String> = NICS.iter().map(|s| s.to_string()).collect();
        let aff: Vec<PciAffinity> = NICS
            .iter()
            .map(|n| pci_affinity(&fs.0, "0000:03:00.0", n))
            .collect();
        let numa = [Some(0), Some(0), Some(0), Some(1), Some(0), None];
        let mut t = Topology::from_numa(&numa);
        t.add_device("cuda:0".into(), &aff);
        assert_eq!(t.tiers(&Location::Cuda(0)), (vec![0], vec![4, 1, 2, 3, 5]));
        // Host buffers keep their NUMA choice.
        assert_eq!(t.tiers(&Location::Cpu(1)), (vec![3, 5], vec![0, 1, 2, 4]));
        assert_eq!(
            t.to_descriptor(&names)["cuda:0"],
            vec![
                vec!["mlx5_0".to_string()],
                ["mlx5_4", "mlx5_1", "mlx5_2", "mlx5_3", "rxe0"]
                    .map(String::from)
                    .to_vec()
            ]
        );
        // Equally near NICs are all preferred.
        let mut t = Topology::from_numa(&[None, None, None]);
        t.add_device(
            "cuda:1".into(),
            &[PciAffinity::Numa, PciAffinity::Other, PciAffinity::Numa],
        );
        assert_eq!(t.tiers(&Location::Cuda(1)), (vec![0, 2], vec![1]));
        // A JSON matrix that names the GPU wins.
        let names2 = vec!["a".to_string(), "b".to_string()];
        let mut t = Topology::from_json(r#"{"cuda:0":[["b"],["a"]]}"#, &names2).unwrap();
        t.add_device(
            "cuda:0".into(),
            &[PciAffinity::Switch { hops: 2 }, PciAffinity::Other],
        );
        assert_eq!(t.tiers(&Location::Cuda(0)), (vec![1], vec![0]));
    }

    /// A device runtime that knows only the PCI addresses of its GPUs.
    struct Gpus(Vec<&'static str>);

    impl DeviceCopier for Gpus {
        fn name(&self) -> &'static str {
            "fake"
        }
        fn locate(&self, _: u64, _: u64) -> Result<Option<Location>> {
            Ok(None)
        }
        fn alloc_pinned(
            &self,
            _: usize,
        ) -> Result<std::sync::Arc<dyn mooncake_core::MemorySegment>> {
            Err(Error::new(ErrorKind::Unsupported, "fake"))
        }
        fn copy(
            &self,
            _: mooncake_core::RegionLease,
            _: mooncake_core::RegionLease,
        ) -> Result<mooncake_core::DeviceCopy> {
            Err(Error::new(ErrorKind::Unsupported, "fake"))
        }
        fn pci_bus_id(&self, location: &Location) -> Result<String> {
            match location {
                Location::Cuda(n) if (*n as usize) < self.0.len() => Ok(self.0[*n as usize].into()),
                _ => Err(Error::new(ErrorKind::Unsupported, "no such GPU")),
            }
        }
    }

    #[test]
    fn every_gpu_the_runtime_knows_gets_its_nearest_nics() {
        let fs = two_socket_host();
        // cuda:1 sits on the root complex of node 1, beside mlx5_3.
        fs.pci("pci0000:80/0000:80:02.0/0000:82:00.0", Some(1));
        let names: Vec<String> = NICS.iter().map(|s| s.to_string()).collect();
        let mut t = Topology::from_numa(&[Some(0), Some(0), Some(0), Some(1), Some(0), None]);
        t.add_cuda_devices(
            &fs.0,
            &Gpus(vec!["0000:03:00.0", "00000000:82:00.0"]),
            &names,
        );
        assert_eq!(t.tiers(&Location::Cuda(0)).0, vec![0]);
        assert_eq!(t.tiers(&Location::Cuda(1)), (vec![3], vec![0, 1, 2, 4, 5]));
        assert!(!t.matrix.contains_key("cuda:2"));
        // Without GPUs nothing is added.
        let mut u = Topology::from_numa(&[Some(0)]);
        u.add_cuda_devices(&fs.0, &Gpus(vec![]), &names[..1]);
        assert_eq!(u.matrix.keys().collect::<Vec<_>>(), ["cpu:0"]);
    }
}
