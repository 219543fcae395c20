//! ocsync keeps OpenSpecimen collection protocols in step with OpenClinica
//! studies. See ARCHITECTURE.md for the data flow and the code map.

pub mod api;
pub mod config;
pub mod cp;
pub mod db;
pub mod mapping;
pub mod metrics;
pub mod notify;
pub mod odm;
pub mod openclinica;
pub mod queue;
pub mod schedule;
pub mod sink;
pub mod sync;
pub mod telemetry;
pub mod ui;

/// mimalloc serves every binary that links this crate (the service, its
/// tests and benches): `make bench` measured the sync spending a fifth of
/// its time in the system allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Installs ring as the process's TLS crypto provider (once; later calls do
/// nothing). Every HTTP client here (OpenClinica, OpenSpecimen, the OTLP
/// exporter) uses rustls built without a default provider, so this must run
/// before the first client is built.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // An error only says another provider is already installed; that
        // one then serves.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
