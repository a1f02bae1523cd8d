//! End-to-end tests: the built binary, a real mint, a stand-in upstream, all on loopback.
//! Every test ends with the conservation check.
#![cfg(feature = "demo")]

mod admin;
mod concurrency;
mod deployment;
mod failures;
mod harness;
mod lightning;
mod nostr;
mod paying;
mod routing;
