//! kube-emulator: test equipment that behaves like the Kubernetes API server where mig-autoscaler
//! depends on it, over real HTTP/JSON, so that tests use the real kube-rs client.
//!
//! Served: core/v1 Namespaces, Nodes, Pods (status, eviction, binding), ConfigMaps, Events;
//! events.k8s.io/v1 Events; policy/v1 PodDisruptionBudgets; coordination.k8s.io/v1 Leases; discovery.
//! One global resourceVersion; get, list (label and field selectors, limit/continue), create,
//! replace (409 on a stale resourceVersion), delete, JSON merge / JSON / strategic-merge / apply
//! patches; watch with resourceVersion, bookmarks, timeoutSeconds and 410 Gone past the retention
//! window; eviction that honours PodDisruptionBudgets (429); fault injection.
//!
//! Simplifications, on purpose: strategic merge and server-side apply are served as JSON merge
//! patches (lists are replaced whole); a watch with a selector filters on the new object only; a
//! bound pod's graceful delete waits for a kubelet only while kubelets run (`Shared::set_kubelets`).
//!
//! [`cluster`] holds in-process actors (scheduler, kubelets with the device plugin, mig-manager)
//! acting on the store; [`hardware`] the simulated GPUs they and the testbed's API-client nodes
//! share.

pub mod cluster;
pub mod fleet;
pub mod hardware;
pub mod resources;
pub mod selectors;
pub mod server;
pub mod status;
pub mod store;

pub use cluster::{Cluster, ClusterSpec, GpuSpec, NodeSpec, SpecError};
pub use hardware::{ApplyError, ChangeError, Hardware, SimGpu, SimNode};
pub use server::{Admission, AdmissionRequest, Config, Denied, Faults, Running, UserInfo};
