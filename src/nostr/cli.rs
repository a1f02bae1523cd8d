//! `routstr-node providers`: the providers found on Nostr, ranked, for a person.

use std::time::Duration;

use nostr_sdk::prelude::{Client, Filter, Kind, Timestamp};
use serde_json::Value;

use super::discovery::{self, Registry};
use super::events::{ANNOUNCEMENT_KIND, MODELS_KIND};
use super::relays;
use crate::config::Settings;
use crate::node::NodeError;

/// Prints the ranked providers: those a running node discovered (`node_url`), or, without it, a
/// one-shot discovery on the configured read relays with health checks.
pub async fn providers_command(
    settings: &Settings,
    model: Option<&str>,
    node_url: Option<&str>,
    as_json: bool,
) -> Result<(), NodeError> {
    let timeout = Duration::from_secs(settings.nostr_timeout_seconds.max(1));
    let mut providers = match node_url {
        Some(url) => from_node(url, model, timeout).await?,
        None => one_shot(settings, timeout).await?,
    };
    discovery::rank(&mut providers, model);
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "providers": providers })).unwrap_or_default()
        );
    } else {
        print!("{}", discovery::table(&providers, model));
    }
    Ok(())
}

async fn from_node(url: &str, model: Option<&str>, timeout: Duration) -> Result<Vec<Value>, NodeError> {
    let http = reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .map_err(|e| NodeError::Config(format!("HTTP client: {e}")))?;
    let mut endpoint = reqwest::Url::parse(&format!("{}/v1/providers", url.trim_end_matches('/')))
        .map_err(|e| NodeError::Config(format!("--node {url}: {e}")))?;
    if let Some(m) = model {
        endpoint.query_pairs_mut().append_pair("model", m);
    }
    let req = http.get(endpoint);
    let v: Value = async { req.send().await?.error_for_status()?.json().await }
        .await
        .map_err(|e| NodeError::Config(format!("cannot ask the node at {url}: {e}")))?;
    Ok(v.get("providers").and_then(Value::as_array).cloned().unwrap_or_default())
}

async fn one_shot(settings: &Settings, timeout: Duration) -> Result<Vec<Value>, NodeError> {
    let relays = relays::resolve(&settings.relays, settings.relays_path.as_deref()).map_err(NodeError::Config)?;
    let client = Client::default();
    for r in relays.iter().filter(|r| r.read) {
        if let Err(e) = client.add_read_relay(r.url.as_str()).await {
            eprintln!("relay {} left out: {e}", r.url);
        }
    }
    client.connect().await;
    client.wait_for_connection(timeout).await;
    let filter = Filter::new().kinds([Kind::from(ANNOUNCEMENT_KIND), Kind::from(MODELS_KIND)]);
    let events = client.fetch_events(filter, timeout).await.map_err(|e| NodeError::Config(format!("relays: {e}")))?;
    client.shutdown().await;
    let registry = Registry::new(None);
    let now = Timestamp::now();
    for event in events.iter() {
        registry.ingest(event, now);
    }
    let private = settings.nostr_allow_private_hosts;
    let reach = discovery::Reach { onion: false, private };
    registry.check_all(&discovery::health_client(timeout, None, private), timeout, reach).await;
    Ok(registry.to_json())
}
