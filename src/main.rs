use clap::Parser;
use strata::config::{Cli, Command};

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
