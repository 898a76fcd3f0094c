//! ztai-agent: policy → kernel maps, cgroup labeling, violation reports.
//!
//! Flow: `policy` (parse, validate, compile: pure) → `datapath` (the only
//! module that touches aya) ← `discovery` (cgroups, addresses, sockets);
//! `report` turns kernel events into JSON lines; `runtime` is the event loop.
pub mod control;
pub mod datapath;
pub mod discovery;
pub mod flows;
pub mod logging;
pub mod metrics;
pub mod policy;
pub mod report;
pub mod runtime;
