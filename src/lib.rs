//! routstr-node: a Nostr-native provider node for paid AI. An OpenAI-compatible proxy paid with
//! Cashu eCash: clients pay per request or from a prepaid key, the node meters the tokens used,
//! charges them and returns the rest.
//!
//! Modules by domain: `config` (settings), `pricing` (pure money arithmetic), `rates` (BTC/USD),
//! `catalog` (models and prices), `upstream` (where requests go), `ledger` (SQLite balances,
//! reservations, payouts), `wallet` (the embedded cdk wallet), `payment` (credentials, redeeming,
//! change), `lightning` (invoices, Lightning refunds and payouts, foreign-mint swaps), `lnurl`
//! (LNURL-pay client), `proxy` (the metered request path), `api` (routing and the node's own endpoints),
//! `server` (the listener), `node` (wiring), `cli` (operator commands).

// A future is moved (copied) whole each time it is spawned or handed to hyper: cdk's futures run
// to KBs, and carried inline they once made every request's future ~28 KB. Box them instead.
#![warn(clippy::large_futures)]

pub mod admin;
pub mod api;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod error;
pub mod failpoint;
mod fsutil;
pub mod http;
pub mod layers;
pub mod ledger;
pub mod lightning;
pub mod lnurl;
pub mod node;
pub mod nostr;
pub mod payment;
pub mod pricing;
pub mod proxy;
pub mod ratelimit;
pub mod rates;
pub mod secret;
pub mod server;
pub mod tor;
pub mod upstream;
pub mod wallet;

#[cfg(feature = "demo")]
pub mod demo;
