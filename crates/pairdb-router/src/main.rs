//! `pairdb-router`: parses the configuration (flags, `PAIRDB_*` variables, the optional `--config`
//! file), binds the listener and hands both to [`pairdb_router::run`].

/// mimalloc: glibc malloc's arena locks cost ~15% of a loaded cluster's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: pairdb_router::Config = pairdb_service::config_file::parse();
    config.validate()?;
    let listen_addrs = config.listen_addr.resolve().await?;
    if config.service.check_config {
        // Secrets are never printed: the Redis URL may carry a password.
        let mut shown = config.clone();
        shown.redis_url = shown.redis_url.as_deref().map(pairdb_service::args::redact_url);
        println!("{shown:#?}");
        println!("{}", pairdb_service::addr::resolved_listen_line(&listen_addrs));
        return Ok(());
    }
    let telemetry = pairdb_service::telemetry::init(config.service.log_format, "info", "pairdb-router");
    let listener = pairdb_service::addr::bind_first(&listen_addrs).await?;
    tracing::info!(addr = %listener.local_addr()?, "pairdb-router listening");
    let served = pairdb_router::run(config, listener, pairdb_service::shutdown_signal()).await;
    // Buffered spans are exported before the process exits.
    telemetry.shutdown().await;
    served?;
    Ok(())
}
