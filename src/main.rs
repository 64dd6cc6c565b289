use clap::Parser;
use strata::config::{Cli, Command};

/// mimalloc rather than the C library's allocator. Profiled under load, glibc's
/// malloc and free (with `malloc_consolidate`) were a tenth of the CPU of a `GET`
/// served from memory; in A/B runs with wrk, interleaved, the same code with
/// mimalloc answered 9-13% more `GET /v1/jobs/{id}` and `GET /v1/vms/{id}` a second
/// (10 of 12 pairs; docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Openapi => {
            print!("{}", strata::api::openapi_json_pretty());
            std::process::ExitCode::SUCCESS
        }
        Command::Scopes => {
            print!("{}", strata::api::auth::scope_table_markdown());
            std::process::ExitCode::SUCCESS
        }
        Command::Token(command) => {
            strata::app::init_tracing("warn");
            match strata::app::token(command).await {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("strata token: {e}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
        Command::Serve(config) => {
            strata::app::init_tracing("info,sqlx=warn,tower_http=info");
            match strata::app::serve(*config).await {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "strata stopped");
                    eprintln!("strata: {e}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
    }
}
