//! Packet-rate benchmark (issue 5): an in-kernel generator (BPF_PROG_TEST_RUN with XDP
//! live frames) sends through a node namespace to a sink namespace, and the node is, in
//! turn, a bare XDP forwarder, the nodeport agent, or kube-proxy's iptables or nftables
//! rules; plus the datapath's per-path costs through plain BPF_PROG_TEST_RUN. Driven by
//! the `np-pktbench` binary, which `cargo xtask bench` runs.

pub mod cpu;
pub mod kubeproxy;
pub mod matrix;
pub mod micro;
pub mod progs;
pub mod run;
pub mod services;
pub mod topo;
