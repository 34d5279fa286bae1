//! sluice: Kubernetes NetworkPolicy for flannel clusters, decided in the kernel by nftables.
//!
//! The pure core (no I/O): [`selector`], [`model`] (the cluster index; [`postings`], its pods by
//! label and named port), [`policy`] (the reference
//! evaluator), [`compile`] (index + node -> ruleset IR). The edges: [`nft`] (IR -> nft text, diffs,
//! applying), [`snapshot`] (objects from YAML files), and the agent: [`watch`] (API watches into
//! the index), [`agent`] (the reconcile loop), [`http`] and [`metrics`].

pub mod agent;
pub mod cni_server;
pub mod compile;
pub use sluice_cni::duration;
pub mod http;
pub mod incremental;
pub mod install_cni;
pub mod metrics;
pub mod model;
pub mod nft;
pub mod owner;
pub mod policy;
pub mod postings;
pub mod selector;
pub mod simulate;
pub mod snapshot;
#[cfg(test)]
mod testutil;
pub mod watch;
