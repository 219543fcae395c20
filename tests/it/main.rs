//! The one integration-test binary. Each module tests one capability
//! against the real Postgres and the real `ocsync` binary.

mod api;
mod browser;
mod cli;
mod cp;
mod db;
mod docs;
mod harness;
mod notify;
mod observability;
mod oc_sim;
mod odm;
mod openclinica;
mod queue;
mod sink_openspecimen;
mod sink_postgres;
mod sync;
mod sync_openspecimen;
mod telemetry;
mod ui;
