use clap::Parser;
use routstr_node::config::{Cli, Command};
use routstr_node::{cli, node};

fn main() -> std::process::ExitCode {
    limit_malloc_arenas();
    match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime.block_on(run()),
        Err(e) => {
            eprintln!("routstr-node: cannot start the async runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// glibc gives every thread that contends on malloc an arena of its own (up to 8 per core) and
/// keeps what those arenas freed: with 1,000 open streams the node's resident memory measured
/// ~235 MB with the default and ~196 MB with two arenas, at no cost in speed
/// (docs/benchmarks.md). Must run before any thread starts; `MALLOC_ARENA_MAX` still wins.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a malloc tunable; called before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
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
