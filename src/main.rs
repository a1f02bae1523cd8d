use clap::Parser;
use routstr_node::config::{Cli, Command};
use routstr_node::{cli, node};

fn main() -> std::process::ExitCode {
    match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime.block_on(run()),
        Err(e) => {
            eprintln!("routstr-node: cannot start the async runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> std::process::ExitCode {
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
