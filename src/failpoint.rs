//! Named crash points for the crash-safety tests: with `ROUTSTR_TEST_FAILPOINT=<name>` in its
//! environment, the process aborts (no cleanup, like a kill) when it reaches that step. Only
//! in builds with the `demo` feature (the one the tests drive); a no-op otherwise.

/// Aborts the process here if the test asked for it.
pub fn hit(name: &str) {
    #[cfg(feature = "demo")]
    {
        static ARMED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        let armed = ARMED.get_or_init(|| std::env::var("ROUTSTR_TEST_FAILPOINT").ok().filter(|v| !v.is_empty()));
        if armed.as_deref() == Some(name) {
            eprintln!("failpoint {name}: aborting");
            std::process::abort();
        }
    }
    #[cfg(not(feature = "demo"))]
    let _ = name;
}
