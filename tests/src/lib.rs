//! End-to-end harness for nodeport: a two-node cluster in network namespaces
//! (docs: /work/shared/notes/test-network.md), echo backends, Kubernetes manifests for the
//! agent's manifests mode, and client helpers. Used by `tests/e2e.rs` and the `np-demo` binary.
//!
//! Rules this crate keeps: only 198.18.0.0/15 and fd00::/8 inside namespaces it creates,
//! nothing in the root namespace's interfaces, names `np-<run id>-...`, bounded loops, and
//! every guard cleans up in `Drop` (also while unwinding from a panic).

pub mod apiserver;
pub mod client;
pub mod cluster;
pub mod echo;
pub mod manifests;
pub mod neighbour;
pub mod netns;
pub mod objects;
pub mod pktbench;
pub mod testbed;
pub mod wire;
