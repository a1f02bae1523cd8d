use clap::Parser;
use routstr_node::config::{Cli, Command};
use routstr_node::{cli, node};

// mimalloc's malloc and free take about a third of the instructions glibc's take on the request
// path (docs/benchmarks.md, round 12). The library leaves the choice of allocator to its user.
#[global_allocator]
static ALLOCATOR: Allocator = Allocator;

/// mimalloc, asked for plain blocks when a layout needs no more than a word's alignment (every
/// mimalloc block has that): `mimalloc::MiMalloc` asks for every block through its aligned entry
/// points, whose larger blocks take a slower path (docs/benchmarks.md, round 16).
struct Allocator;

/// Every block mimalloc hands out is aligned to this (its sizes are whole words).
const WORD: usize = std::mem::size_of::<usize>();

// SAFETY: every block comes from mimalloc and goes back to it; a layout with an alignment above
// a word goes through its aligned functions, which honour it.
unsafe impl std::alloc::GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if layout.align() <= WORD {
            unsafe { libmimalloc_sys::mi_malloc(layout.size()).cast() }
        } else {
            unsafe { libmimalloc_sys::mi_malloc_aligned(layout.size(), layout.align()).cast() }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        if layout.align() <= WORD {
            unsafe { libmimalloc_sys::mi_zalloc(layout.size()).cast() }
        } else {
            unsafe { libmimalloc_sys::mi_zalloc_aligned(layout.size(), layout.align()).cast() }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: std::alloc::Layout) {
        unsafe { libmimalloc_sys::mi_free(ptr.cast()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= WORD {
            unsafe { libmimalloc_sys::mi_realloc(ptr.cast(), new_size).cast() }
        } else {
            unsafe { libmimalloc_sys::mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast() }
        }
    }
}

/// `mi_option_arena_max_object_size` in the mimalloc that libmimalloc-sys (pinned by Cargo.lock)
/// builds; the crate names only the older options. The test below checks it against its default.
const MI_OPTION_ARENA_MAX_OBJECT_SIZE: libmimalloc_sys::mi_option_t = 45;
/// Objects above this (KiB) are mapped from the OS and unmapped when freed, as glibc does.
const ARENA_MAX_OBJECT_KIB: std::ffi::c_long = 4 * 1024;

/// A large block freed inside mimalloc's arena stays resident until a purge that runs about ten
/// seconds and some allocations later: the admin password's argon2 hash (19 MiB, at start and at
/// each dashboard login) would keep an idle node at ≈ 55 MB instead of ≈ 35 MB.
fn configure_allocator() {
    // SAFETY: sets one of mimalloc's options, a plain integer it reads at each large allocation.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_MAX_OBJECT_SIZE, ARENA_MAX_OBJECT_KIB) };
}

fn main() -> std::process::ExitCode {
    configure_allocator();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_arena_option_is_the_one_mimalloc_documents() {
        // SAFETY: reads one of mimalloc's options.
        let read = || unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_ARENA_MAX_OBJECT_SIZE) };
        // Its default, 2 GiB in KiB (mimalloc.h), unless this process set it already.
        assert!(read() == 2 * 1024 * 1024 || read() == ARENA_MAX_OBJECT_KIB);
        configure_allocator();
        assert_eq!(read(), ARENA_MAX_OBJECT_KIB);
    }
}
