//! sluice-cni: the CNI plugin chained after flannel, and the wire protocol it speaks with the
//! sluice agent ([`protocol`], which the agent uses for the server side).
//!
//! The plugin is a pure core ([`cni`], [`config`], [`prev_result`], [`plugin`]) with the I/O
//! (environment, stdin, the agent's socket, stdout) in `main.rs`.

pub mod cni;
pub mod config;
pub mod duration;
pub mod plugin;
pub mod prev_result;
pub mod protocol;
