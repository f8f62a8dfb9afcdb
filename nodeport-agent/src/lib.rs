//! nodeport agent library: Kubernetes objects to desired state, Maglev tables, and the reconciler that programs the datapath maps.
pub mod datapath;
pub mod error;
pub mod family;
pub mod hcnp;
pub mod health;
pub mod inspect;
pub mod kube_source;
pub mod links;
pub mod maglev;
pub mod manifests;
pub mod metrics;
pub mod model;
pub mod names;
pub mod node_addrs;
pub mod serve;
pub mod sync;
pub mod tc_legacy;
