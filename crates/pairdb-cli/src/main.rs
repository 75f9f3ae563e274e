//! `pairdb`: the command line. The CLI issue adds `kv`, `tenant`, `node`, `migration`, `dev` and
//! `bench`; today it can check that services are up.

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "pairdb", version, about = "PairDB command line")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check the gRPC health of one or more services (host:port).
    Health {
        #[arg(required = true)]
        addresses: Vec<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Health { addresses } => {
            let mut all_serving = true;
            for address in addresses {
                let serving = match pairdb_client::connect(&address).await {
                    Ok(channel) => pairdb_client::is_serving(channel).await.unwrap_or(false),
                    Err(_) => false,
                };
                all_serving &= serving;
                println!("{address}\t{}", if serving { "serving" } else { "not serving" });
            }
            if !all_serving {
                anyhow::bail!("some services are not serving");
            }
        }
    }
    Ok(())
}
