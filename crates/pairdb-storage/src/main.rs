//! `pairdb-storage`: parses the configuration (flags, `PAIRDB_*` variables, the optional `--config`
//! file), binds the listener and hands both to [`pairdb_storage::run`].

/// mimalloc: glibc malloc's arena locks cost ~15% of a loaded cluster's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: pairdb_storage::Config = pairdb_service::config_file::parse();
    config.validate()?;
    let listen_addrs = config.listen_addr.resolve().await?;
    if config.service.check_config {
        println!("{config:#?}");
        println!("{}", pairdb_service::addr::resolved_listen_line(&listen_addrs));
        return Ok(());
    }
    let telemetry = pairdb_service::telemetry::init(config.service.log_format, "info", "pairdb-storage");
    let listener = pairdb_service::addr::bind_first(&listen_addrs).await?;
    tracing::info!(addr = %listener.local_addr()?, "pairdb-storage listening");
    let served = pairdb_storage::run(config, listener, pairdb_service::shutdown_signal()).await;
    // Buffered spans are exported before the process exits.
    telemetry.shutdown().await;
    served?;
    Ok(())
}
