use clap::Parser;
use routstr_node::config::{Cli, Command};
use routstr_node::{cli, node};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Cli::parse();
    cli::init_logging(&args.settings);
    let result = match args.command {
        None | Some(Command::Serve) => node::run(args.settings).await,
        #[cfg(feature = "demo")]
        Some(Command::Demo { serve }) => routstr_node::demo::walkthrough::run(args.settings, serve).await,
        Some(Command::Wallet(cmd)) => cli::wallet_command(&args.settings, cmd).await,
        Some(Command::Backup { dest }) => cli::backup(&args.settings, &dest),
        Some(Command::Providers { model, node, json }) => {
            routstr_node::nostr::cli::providers_command(&args.settings, model.as_deref(), node.as_deref(), json).await
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("routstr-node: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
