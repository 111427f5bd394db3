//! Tandem's chaos suite: real `tandem` processes in network namespaces of their own, hosts
//! writing and reading over NBD and HTTP, nemeses scheduled from a seed, then a heal, a
//! checker and a report with a timeline picture (`tandem chaos list|run`; docs/CHAOS.md).
//!
//! - [`history`]: what a run records (operations with invoke / ok / fail / info, faults, marks).
//! - [`check`]: the linearizability checker (WGL, per key) and the loss, staleness and
//!   divergence counts.
//! - [`report`]: `report.json`, `report.txt` and the timeline SVG.
//! - [`lazyfs`]: a FUSE layer under each node's data dir that keeps unsynced writes in memory
//!   and drops them on a power cut.
//! - [`proxy`]: a seeded delay/jitter proxy on the node-to-node path (TCP and UDP).
//!
//! It is not part of a node: nothing here is linked into the data path.

pub mod block;
pub mod check;
pub mod cli;
pub mod history;
pub mod lazyfs;
pub mod nemesis;
pub mod proxy;
pub mod recorder;
pub mod report;
pub mod run;
pub mod scenario;
pub mod verdict;
pub mod workload;
pub mod world;
