//! `pairdb`: the command line. Parses the arguments and hands them to [`cli::run`]; the exit code
//! says whether the command succeeded (0), failed on the server or the network (1) or was misused (2).

mod admin;
mod bench;
mod cert;
mod cli;
mod cluster;
mod dev;
mod duration;
mod errors;
mod kv;
mod output;
mod put_many;
mod status;

use clap::Parser;

/// mimalloc: glibc malloc's arena locks cost ~15% of a loaded cluster's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let context = args.globals.error_context(&args.command);
    match runtime.block_on(cli::run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            runtime.block_on(context.explain(&error)).print(context.output);
            std::process::ExitCode::FAILURE
        }
    }
}
