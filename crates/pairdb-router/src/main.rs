//! `pairdb-router`: parses the configuration, binds the listener and hands both to [`pairdb_router::run`].

use clap::Parser;

/// mimalloc: glibc malloc's arena locks cost ~15% of a loaded cluster's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = pairdb_router::Config::parse();
    config.validate()?;
    if config.service.check_config {
        println!("{config:#?}");
        return Ok(());
    }
    let telemetry = pairdb_service::telemetry::init(config.service.log_format, "info", "pairdb-router");
    let listener = pairdb_service::bind(config.listen_addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "pairdb-router listening");
    let served = pairdb_router::run(config, listener, pairdb_service::shutdown_signal()).await;
    // Buffered spans are exported before the process exits.
    telemetry.shutdown().await;
    served?;
    Ok(())
}
