//! The one integration-test binary. Each module tests one capability
//! against the real Postgres and the real `ocsync` binary.

mod cli;
mod db;
mod docs;
mod harness;
mod odm;
mod openclinica;
mod telemetry;
