//! `routstr-node demo`: the whole paid flow, offline, on a fresh machine. A real Cashu mint (fake
//! Lightning backend) and a stand-in upstream run in process next to the node; a client mints
//! tokens, buys a key, chats, streams, pays per request with change, and takes a refund. Each
//! step is printed, and the books are checked at the end.

use std::time::Duration;

use serde_json::{json, Value};

use super::mint::{mint_token, redeem_token, start_test_mint, TestMintConfig};
use super::upstream::{StandInConfig, StandInUpstream};
use crate::config::Settings;
use crate::node::{self, NodeError, RunningNode};

type DemoResult<T> = Result<T, NodeError>;

fn fail(what: &str, e: impl std::fmt::Display) -> NodeError {
    NodeError::Config(format!("demo: {what}: {e}"))
}

/// The parts of a demo: a mint, an upstream, and a node wired to both.
pub struct DemoStack {
    pub mint: super::mint::TestMint,
    pub upstream: StandInUpstream,
    pub node: RunningNode,
}

/// Starts mint, upstream and node. `settings` keeps the operator's choices (port, logging…);
/// the mint, upstream, price and data directory are the demo's own.
pub async fn start_stack(mut settings: Settings) -> DemoResult<DemoStack> {
    let mint = start_test_mint(TestMintConfig::default()).await.map_err(|e| fail("starting the test mint", e))?;
    let upstream = StandInUpstream::start(StandInConfig::default())
        .await
        .map_err(|e| fail("starting the stand-in upstream", e))?;
    settings.cashu_mints = vec![mint.url.clone()];
    settings.upstream_base_url = Some(upstream.base_url.clone());
    settings.upstream_api_key = Some(crate::secret::Secret::new("stand-in-key"));
    settings.upstreams_path = None;
    settings.models_path = None;
    settings.btc_usd_price = Some(settings.btc_usd_price.unwrap_or(100_000.0));
    settings.database_url = None;
    settings.host = std::net::Ipv4Addr::LOCALHOST.into();
    // Offline: no public relays, no onion service.
    settings.nostr_enabled = false;
    settings.onion_service = false;
    settings.data_dir = std::env::temp_dir().join(format!("routstr-demo-{}", std::process::id()));
    let node = node::start(settings).await?;
    Ok(DemoStack { mint, upstream, node })
}

pub async fn run(settings: Settings, keep_serving: bool) -> DemoResult<()> {
    let stack = start_stack(settings).await?;
    let base = stack.node.url();
    let mint_url = stack.mint.url.clone();
    let http = reqwest::Client::new();
    println!("== routstr-node demo ==");
    println!("mint (fake Lightning) {mint_url}");
    println!("stand-in upstream     {}", stack.upstream.base_url);
    println!("node                  {base}\n");

    let models: Value = get_json(&http, &format!("{base}/v1/models"), None).await?;
    let model = &models["data"][0];
    println!(
        "1. /v1/models lists {} at {} sat/prompt token, {} sat/completion token (max {} sat per request)",
        model["id"],
        model["sats_pricing"]["prompt"],
        model["sats_pricing"]["completion"],
        model["sats_pricing"]["max_cost"]
    );

    let token = mint_token(&mint_url, 500, false).await.map_err(|e| fail("minting", e))?;
    println!("2. minted a 500 sat token at the mint (paid by the fake Lightning backend)");
    let created =
        post_json(&http, &format!("{base}/v1/balance/create"), None, &json!({ "initial_balance_token": token }))
            .await?;
    let key = created["api_key"].as_str().unwrap_or_default().to_owned();
    println!("3. bought a key with it: balance {} msat", created["balance"]);

    let chat = json!({ "model": "gpt-test", "messages": [{ "role": "user", "content": "Say hello in five words" }], "max_tokens": 64 });
    let answer = post_json(&http, &format!("{base}/v1/chat/completions"), Some(&key), &chat).await?;
    println!(
        "4. chat: \"{}\" — cost {} msat",
        answer["choices"][0]["message"]["content"].as_str().unwrap_or(""),
        answer["usage"]["cost"]["total_msats"]
    );

    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    let resp = http
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&streamed)
        .send()
        .await
        .map_err(|e| fail("stream", e))?;
    let text = resp.text().await.map_err(|e| fail("stream", e))?;
    let chunks = text.matches("data: ").count();
    let cost = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find_map(|v| v.pointer("/usage/cost/total_msats").cloned())
        .unwrap_or(Value::Null);
    println!("5. streamed chat: {chunks} SSE events, token by token — cost {cost} msat (in the last chunk)");

    let info = get_json(&http, &format!("{base}/v1/balance/info"), Some(&key)).await?;
    println!("6. key balance now {} msat", info["balance"]);

    let invoice = post_json(
        &http,
        &format!("{base}/v1/balance/lightning/invoice"),
        Some(&key),
        &json!({ "amount_sats": 200, "purpose": "topup" }),
    )
    .await?;
    let bolt11 = invoice["bolt11"].as_str().unwrap_or_default();
    let status_url =
        format!("{base}/v1/balance/lightning/invoice/{}/status", invoice["invoice_id"].as_str().unwrap_or(""));
    let mut paid = Value::Null;
    for _ in 0..100 {
        paid = get_json(&http, &status_url, None).await?;
        if paid["status"] == "paid" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "   topped it up over Lightning: a 200 sat invoice {}… (paid by the fake backend) → {}, balance {} msat",
        bolt11.chars().take(24).collect::<String>(),
        paid["status"].as_str().unwrap_or("?"),
        paid["balance"]
    );

    let pay_token = mint_token(&mint_url, 100, true).await.map_err(|e| fail("minting", e))?;
    let resp = http
        .post(format!("{base}/v1/chat/completions"))
        .header("X-Cashu", &pay_token)
        .json(&chat)
        .send()
        .await
        .map_err(|e| fail("X-Cashu", e))?;
    let change = resp.headers().get("x-cashu").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let cost = resp.headers().get("x-routstr-cost-msats").and_then(|v| v.to_str().ok()).unwrap_or("?").to_owned();
    println!("7. paid one request with a 100 sat cashuA token in X-Cashu: cost {cost} msat");
    if let Some(change) = change {
        let sats = redeem_token(&mint_url, &change).await.map_err(|e| fail("redeeming change", e))?;
        println!("   change came back in the X-Cashu header and was redeemed at the mint: {sats} sat");
    }

    let refund = post_json(&http, &format!("{base}/v1/balance/refund"), Some(&key), &json!({})).await?;
    let refund_token = refund["token"].as_str().unwrap_or_default();
    let sats = redeem_token(&mint_url, refund_token).await.map_err(|e| fail("redeeming the refund", e))?;
    println!(
        "8. refunded the key: a {} sat token, redeemed at the mint: {sats} sat",
        refund["sats"].as_str().unwrap_or("?")
    );

    let totals = stack.node.node.ledger().totals().await?;
    let wallet: u64 = stack.node.node.wallet().balances().await?.iter().map(|b| b.balance_msat).sum();
    println!(
        "9. books: credited {} msat = balances {} + charged {} + paid out {} → {}",
        totals.credited_msat,
        totals.balances_msat,
        totals.charged_msat,
        totals.paid_out_debit_msat,
        if totals.conserved() { "conserved" } else { "NOT CONSERVED" }
    );
    println!("   the node's wallet holds {} msat: the operator's earnings", wallet);

    if keep_serving {
        println!("\nThe node keeps serving at {base} (Ctrl-C to stop). Try:");
        println!("  curl {base}/v1/models");
        println!("  curl {base}/v1/chat/completions -H 'X-Cashu: <token>' -H 'Content-Type: application/json' \\");
        println!("       -d '{{\"model\":\"gpt-test\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'");
        println!("Mint test tokens with the mint at {mint_url} (any Cashu wallet; invoices pay themselves).");
        node::wait_for_signal().await;
    }
    stack.node.shutdown(Duration::from_secs(5)).await;
    if !totals.conserved() {
        return Err(NodeError::Config("demo: the books do not balance".into()));
    }
    Ok(())
}

async fn get_json(http: &reqwest::Client, url: &str, key: Option<&str>) -> DemoResult<Value> {
    let mut req = http.get(url);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.map_err(|e| fail(url, e))?;
    resp.json().await.map_err(|e| fail(url, e))
}

async fn post_json(http: &reqwest::Client, url: &str, key: Option<&str>, body: &Value) -> DemoResult<Value> {
    let mut req = http.post(url).json(body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.map_err(|e| fail(url, e))?;
    let status = resp.status();
    let v: Value = resp.json().await.map_err(|e| fail(url, e))?;
    if !status.is_success() {
        return Err(fail(url, format!("{status}: {}", v["error"]["message"])));
    }
    Ok(v)
}
