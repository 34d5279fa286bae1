//! The lab: scenario files (../shared/SCENARIOS.md) run against the real kernel in network namespaces.

pub mod agent_bench;
pub mod api_load;
pub mod cluster_bench;
pub mod cluster_run;
pub mod cni_bench;
pub mod dataplane_bench;
pub mod gen;
pub mod kubelet;
pub mod matrix;
pub mod netns;
pub mod probe;
pub mod runner;
pub mod scenario;
pub mod synth;
