//! Offline stand-ins for the outside world, used by `routstr-node demo`, the tests and the
//! benchmark: a real cdk mint with the fake Lightning backend, and an OpenAI-compatible upstream
//! that can misbehave on demand.

pub mod lnurl_server;
pub mod mint;
pub mod upstream;
pub mod walkthrough;
