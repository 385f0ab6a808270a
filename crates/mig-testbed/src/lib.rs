//! mig-autoscaler's testbed: everything that runs the product on kube-emulator instead of a real
//! cluster. The production crates (controller, agent) never depend on it or on the emulator.
//!
//! - [`gpus`]: the emulator's simulated GPUs as the agent's GPU source and as planner input.
//! - [`system`]: the whole system in one process (the `demo` and the simulator's slow path).
//! - [`harness`]: the equipment of the end-to-end tests (`tests/e2e.rs`, `tests/fault_suite.rs`)
//!   and of the CLI's tests: environments, a stand-in agent, clients, pods, plain HTTP, polling.
//! - [`nodes`]: simulated nodes (kubelet, device plugin, mig-manager) as clients of any API
//!   server, the emulator or a real one, and a scheduler for a server without kube-scheduler.
//! - [`process`]: for tests that run programs: kill on drop, blocking HTTP, required tools.
//! - [`real`]: a real control plane (etcd, kube-apiserver) for the real-server tier.

#![allow(clippy::unwrap_used)] // the harness fails tests loudly

pub mod gpus;
pub mod harness;
pub mod nodes;
pub mod process;
pub mod real;
pub mod system;

pub use gpus::{EmulatedGpus, emulated_gpus};
pub use system::System;
