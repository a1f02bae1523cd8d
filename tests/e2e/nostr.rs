//! Nostr: a real relay in process (nostr-relay-builder) on loopback, next to a relay that hangs
//! and one that refuses connections. The node announces itself exactly as PROTOCOL.md §5 says,
//! publishes its price list, re-sends nothing when nothing changed, and discovers other nodes
//! while ignoring forged, future-dated and stale events.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nostr_relay_builder::prelude::{LocalRelay, MemoryDatabase, MemoryDatabaseOptions, NostrDatabase, RelayBuilder};
use nostr_sdk::prelude::{
    Alphabet, Client, Event, EventBuilder, Filter, Keys, Kind, SingleLetterTag, Tag, Timestamp, ToBech32,
};
use serde_json::{json, Value};

use crate::harness::{Harness, Options};

const ONION: &str = "http://aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.onion";

/// Node A of the two-node tests: it has the stand-in upstream and announces itself (as
/// "node-a", at its loopback URL) on the relay, checking every second; it discovers nothing.
pub async fn start_seller(name: &str, relay_url: &str) -> Harness {
    Harness::start_with(
        name,
        Options {
            env: vec![
                ("NOSTR_ENABLED", "true".into()),
                ("RELAYS", relay_url.to_owned()),
                ("HTTP_URL", "http://127.0.0.1:{PORT}".into()),
                ("NAME", "node-a".into()),
                ("NOSTR_CHECK_SECONDS", "1".into()),
                ("NOSTR_DISCOVERY", "false".into()),
            ],
            ..Default::default()
        },
    )
    .await
}

/// A relay in process; `db` is the store it serves from (events can be put there directly).
pub async fn start_relay() -> (LocalRelay, String, Arc<MemoryDatabase>) {
    let db = Arc::new(MemoryDatabase::with_opts(MemoryDatabaseOptions { events: true, max_events: None }));
    let relay = LocalRelay::new(RelayBuilder::default().database(db.clone()));
    relay.run().await.expect("relay runs");
    let url = relay.url().await.to_string();
    (relay, url, db)
}

/// A "relay" that accepts TCP connections and never answers, and a port that refuses them.
async fn bad_relays() -> (tokio::task::JoinHandle<()>, String, String) {
    let hang = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hang_url = format!("ws://{}", hang.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = hang.accept().await {
            held.push(sock);
        }
    });
    let refused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let refused_url = format!("ws://{}", refused.local_addr().unwrap());
    drop(refused);
    (task, hang_url, refused_url)
}

async fn client_for(relay_url: &str) -> Client {
    let client = Client::default();
    client.add_relay(relay_url).await.unwrap();
    client.connect().await;
    client.wait_for_connection(Duration::from_secs(5)).await;
    client
}

async fn fetch(client: &Client, filter: Filter) -> Vec<Event> {
    client.fetch_events(filter, Duration::from_secs(5)).await.expect("fetch").into_iter().collect()
}

pub async fn eventually<T, F, Fut>(what: &str, secs: u64, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn tags(event: &Event) -> Value {
    serde_json::to_value(event).unwrap()["tags"].clone()
}

fn log_count(h: &Harness, needle: &str) -> usize {
    std::fs::read_to_string(h.data_dir.join("node.log")).unwrap_or_default().matches(needle).count()
}

fn announcement(keys: &Keys, d: &str, name: &str, url: &str, created_at: Timestamp) -> Event {
    EventBuilder::new(Kind::from(38421), json!({ "name": name, "about": "" }).to_string())
        .tags([
            Tag::parse(["d", d]).unwrap(),
            Tag::parse(["u", url]).unwrap(),
            Tag::parse(["version", "9.9.9"]).unwrap(),
        ])
        .custom_created_at(created_at)
        .sign_with_keys(keys)
        .unwrap()
}

#[tokio::test]
async fn announces_exactly_publishes_prices_and_resends_nothing_unchanged() {
    let (_relay, relay_url, _) = start_relay().await;
    let (_hang, hang_url, refused_url) = bad_relays().await;
    let client = client_for(&relay_url).await;

    // The key's newest announcement on the relays carries the provider id the node keeps.
    let keys = Keys::generate();
    let old = announcement(&keys, "legacy-id", "before", "https://old.example", Timestamp::now() - 1000);
    client.send_event(&old).await.expect("seed the old announcement");

    let mut h = Harness::start_with(
        "nostr-announce",
        Options {
            env: vec![
                ("NOSTR_ENABLED", "true".into()),
                // The hanging and the refusing relay come first: neither may hold up the good one.
                ("RELAYS", format!("{hang_url},{refused_url},{relay_url}")),
                ("NSEC", keys.secret_key().to_secret_hex()),
                ("HTTP_URL", "http://127.0.0.1:{PORT}".into()),
                ("ONION_URL", ONION.into()),
                ("NAME", "node-a".into()),
                ("DESCRIPTION", "Node \"A\", for tests".into()),
                ("NOSTR_CHECK_SECONDS", "1".into()),
                ("NOSTR_TIMEOUT_SECONDS", "2".into()),
            ],
            ..Default::default()
        },
    )
    .await;
    let info = h.get("/v1/info", None).await;
    assert_eq!(info.json["npub"], keys.public_key().to_bech32().unwrap());
    assert!(!h.data_dir.join("nostr.key").exists(), "with NSEC set no key file is written");

    let mine = Filter::new().author(keys.public_key()).kind(Kind::from(38421));
    let event = eventually("the announcement", 30, || async {
        fetch(&client, mine.clone()).await.into_iter().find(|e| e.content.contains("node-a"))
    })
    .await;
    event.verify().expect("signed by the node's key");
    assert_eq!(event.kind, Kind::from(38421));
    assert_eq!(
        tags(&event),
        json!([
            ["d", "legacy-id"],
            ["u", h.node.url],
            ["u", ONION],
            ["mint", h.mint.url],
            ["version", env!("CARGO_PKG_VERSION")],
        ])
    );
    assert_eq!(event.content, r#"{"name":"node-a","about":"Node \"A\", for tests"}"#);
    assert!(event.created_at > old.created_at);

    // The price list: linked to the announcement, one `m` tag per model, filterable by model.
    let by_model = |m: &str| {
        Filter::new().kind(Kind::from(38450)).custom_tag(SingleLetterTag::lowercase(Alphabet::M), m.to_owned())
    };
    let lists = eventually("the price list", 30, || async {
        let found = fetch(&client, by_model("gpt-test")).await;
        (!found.is_empty()).then_some(found)
    })
    .await;
    assert_eq!(lists.len(), 1);
    let list = &lists[0];
    list.verify().unwrap();
    assert_eq!(list.pubkey, keys.public_key());
    let pk = keys.public_key().to_hex();
    assert_eq!(
        tags(list),
        json!([["d", "legacy-id"], ["a", format!("38421:{pk}:legacy-id")], ["m", "embed-test"], ["m", "gpt-test"]])
    );
    let content: Value = serde_json::from_str(&list.content).unwrap();
    let gpt = content["models"].as_array().unwrap().iter().find(|m| m["id"] == "gpt-test").unwrap();
    // 1e-6 USD per prompt token at 100k USD/BTC, no markup: 1 msat = 0.001 sat.
    assert_eq!(gpt["sats_pricing"]["prompt"], 0.001);
    assert_eq!(gpt["sats_pricing"]["completion"], 0.002);
    assert_eq!(fetch(&client, by_model("embed-test")).await.len(), 1);
    assert!(fetch(&client, by_model("no-such-model")).await.is_empty());

    // Nothing changed: nothing signed or sent again, across checks and across a restart.
    let log_has = |n: &str| log_count(&h, n);
    eventually("both events acknowledged", 20, || async {
        (log_has("announcement published") == 1 && log_has("price list published") == 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    h.node.restart().await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(log_count(&h, "announcement signed"), 1, "re-signed an unchanged announcement");
    assert_eq!(log_count(&h, "price list signed"), 1, "re-signed an unchanged price list");
    assert_eq!(log_count(&h, "announcement published"), 1);
    assert_eq!(log_count(&h, "price list published"), 1);
    let now_on_relay = fetch(&client, mine.clone()).await;
    assert_eq!(now_on_relay.iter().map(|e| e.id).collect::<Vec<_>>(), vec![event.id]);
    assert!(log_count(&h, "not published") > 0, "the bad relays were tried and failed");

    // The secret never reaches the log.
    let log = std::fs::read_to_string(h.data_dir.join("node.log")).unwrap();
    assert!(!log.contains(&keys.secret_key().to_secret_hex()));
    assert!(!log.contains(&keys.secret_key().to_bech32().unwrap()));
    h.assert_conserved().await;
}

#[tokio::test]
async fn discovers_a_second_node_and_ignores_forged_future_and_stale_events() {
    let (relay, relay_url, db) = start_relay().await;
    let (_hang, hang_url, refused_url) = bad_relays().await;

    // Node A sells through the relay.
    let a = start_seller("nostr-a", &relay_url).await;
    let a_npub = a.get("/v1/info", None).await.json["npub"].as_str().unwrap().to_owned();
    let a_pk = nostr_sdk::prelude::PublicKey::parse(&a_npub).unwrap().to_hex();
    // A generated its key and keeps it owner-only.
    let key_file = a.data_dir.join("nostr.key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let stored = Keys::parse(std::fs::read_to_string(&key_file).unwrap().trim()).unwrap();
    assert_eq!(stored.public_key().to_bech32().unwrap(), a_npub);

    // Third parties, put straight into the relay's store: one honest provider, one forged
    // signature, one dated tomorrow.
    let third = Keys::generate();
    let now = Timestamp::now();
    db.save_event(&announcement(&third, "t", "third", "http://127.0.0.1:9", now - 10)).await.unwrap();
    let forger = Keys::generate();
    let genuine = announcement(&forger, "f", "forged-original", "http://127.0.0.1:9", now);
    let mut forged_json = serde_json::to_value(&genuine).unwrap();
    forged_json["content"] = json!(r#"{"name":"forged","about":""}"#);
    let forged: Event = serde_json::from_value(forged_json).unwrap();
    assert!(forged.verify().is_err());
    db.save_event(&forged).await.unwrap();
    let time_traveller = Keys::generate();
    let future = announcement(&time_traveller, "x", "future", "http://127.0.0.1:9", now + 86_400);
    db.save_event(&future).await.unwrap();

    // Node B has relays that hang and refuse besides the good one; it does not announce.
    let b = Harness::start_with(
        "nostr-b",
        Options {
            env: vec![
                ("NOSTR_ENABLED", "true".into()),
                ("RELAYS", format!("{hang_url},{refused_url},{relay_url}")),
                ("NAME", "node-b".into()),
                ("NOSTR_HEALTH_SECONDS", "1".into()),
                ("NOSTR_TIMEOUT_SECONDS", "2".into()),
            ],
            ..Default::default()
        },
    )
    .await;
    let providers = || async { b.get("/v1/providers", None).await.json["providers"].as_array().cloned().unwrap() };
    let find = |list: &[Value], pk: &str| list.iter().find(|p| p["pubkey"] == pk).cloned();
    let entry = eventually("node A discovered and healthy", 40, || async {
        let list = providers().await;
        find(&list, &a_pk).filter(|p| p["health"] == "ok" && p["models"].as_array().is_some_and(|m| !m.is_empty()))
    })
    .await;
    let a_d = &a_pk[..12];
    assert_eq!(entry["id"], a_d);
    assert_eq!(entry["d"], a_d);
    assert_eq!(entry["npub"], a_npub);
    assert_eq!(entry["name"], "node-a");
    assert_eq!(entry["urls"], json!([a.node.url]));
    assert_eq!(entry["mints"], json!([a.mint.url]));
    assert_eq!(entry["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(entry["models"], json!(["embed-test", "gpt-test"]));
    assert_eq!(entry["pricing"]["gpt-test"]["prompt"], 0.001);
    assert!(entry["latency_ms"].is_u64());
    assert!(entry["last_seen"].as_u64().unwrap() >= now.as_secs() - 5);

    let third_pk = third.public_key().to_hex();
    let list = providers().await;
    let t = find(&list, &third_pk).expect("the honest third party is listed");
    assert_eq!(t["name"], "third");
    assert!(find(&list, &forger.public_key().to_hex()).is_none(), "forged signature accepted");
    assert!(find(&list, &time_traveller.public_key().to_hex()).is_none(), "future event accepted");
    assert_eq!(list.len(), 2, "{list:?}");

    // Live: a stale replacement, the forgery and the future event pushed to subscribers change
    // nothing; a newer replacement does.
    assert!(relay.notify_event(announcement(&third, "t", "stale", "http://127.0.0.1:9", now - 500)));
    assert!(relay.notify_event(forged.clone()));
    assert!(relay.notify_event(future.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let list = providers().await;
    assert_eq!(find(&list, &third_pk).unwrap()["name"], "third", "a stale replacement won");
    assert_eq!(list.len(), 2);
    assert!(relay.notify_event(announcement(&third, "t", "third-v2", "http://127.0.0.1:9", now)));
    eventually("the newer replacement", 10, || async {
        let list = providers().await;
        (find(&list, &third_pk)?["name"] == "third-v2").then_some(())
    })
    .await;
    // The third party's URL answers nothing: listed down, ranked after A.
    let list = eventually("the third party checked", 10, || async {
        let list = providers().await;
        (find(&list, &third_pk)?["health"] == "down").then_some(list)
    })
    .await;
    assert_eq!(list[0]["pubkey"], a_pk);

    // By model: only A sells gpt-test.
    let by_model = b.get("/v1/providers?model=gpt-test", None).await.json;
    let pks: Vec<&str> =
        by_model["providers"].as_array().unwrap().iter().map(|p| p["pubkey"].as_str().unwrap()).collect();
    assert_eq!(pks, [a_pk.as_str()]);

    // B announced nothing: it has no URL.
    let client = client_for(&relay_url).await;
    let b_npub = b.get("/v1/info", None).await.json["npub"].as_str().unwrap().to_owned();
    let b_pk = nostr_sdk::prelude::PublicKey::parse(&b_npub).unwrap();
    assert!(fetch(&client, Filter::new().author(b_pk)).await.is_empty());

    // The command line: from the running node, and by a one-shot discovery of its own (run
    // asynchronously: the relay lives in this test's runtime).
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_routstr-node"))
        .args(["providers", "--model", "gpt-test", "--node", &b.node.url])
        .env_clear()
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8(out.stdout).unwrap();
    let row = table.lines().find(|l| l.contains("node-a")).unwrap_or_else(|| panic!("{table}"));
    assert!(row.starts_with("1 ") && row.contains(" ok ") && row.contains(&a.node.url), "{table}");
    assert!(!table.contains("third"), "third sells no gpt-test: {table}");

    let one_shot = |allow_private: &'static str| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_routstr-node"))
            .args(["providers", "--json"])
            .env_clear()
            .env("RELAYS", format!("{refused_url},{relay_url}"))
            .env("NOSTR_TIMEOUT_SECONDS", "3")
            .env("NOSTR_ALLOW_PRIVATE_HOSTS", allow_private)
            .env("DATA_DIR", b.data_dir.join("cli").display().to_string())
            .output()
    };
    let out = one_shot("true").await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let found: Value = serde_json::from_slice(&out.stdout).unwrap();
    let found = found["providers"].as_array().unwrap();
    let pks: Vec<&str> = found.iter().map(|p| p["pubkey"].as_str().unwrap()).collect();
    assert_eq!(pks, [a_pk.as_str(), third_pk.as_str()], "healthy A first; no forged or future event");
    assert_eq!(found[0]["health"], "ok");
    assert_eq!(found[1]["name"], "third", "the relay's store holds the newest third-party event");
    // By default an announced loopback URL is not contacted: announcements are anyone's.
    let out = one_shot("false").await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let found: Value = serde_json::from_slice(&out.stdout).unwrap();
    let a_seen = found["providers"].as_array().unwrap().iter().find(|p| p["pubkey"] == a_pk.as_str()).cloned();
    let a_seen = a_seen.expect("A is still listed");
    assert_ne!(a_seen["health"], "ok", "{a_seen}");
    assert!(a_seen["error"].as_str().unwrap_or_default().contains("not a public"), "{a_seen}");

    a.assert_conserved().await;
    b.assert_conserved().await;
}

#[tokio::test]
async fn price_list_follows_prices_beyond_the_threshold_at_most_once_per_interval() {
    let (_relay, relay_url, _) = start_relay().await;
    let client = client_for(&relay_url).await;
    let dir = crate::harness::ScratchDir::new("nostr-prices-file");
    let models = dir.join("models.json");
    let write_price = |usd_per_prompt_token: &str| {
        let body = json!({ "data": [{ "id": "gpt-test",
            "pricing": { "prompt": usd_per_prompt_token, "completion": "0.000002" } }] });
        std::fs::write(&models, body.to_string()).unwrap();
    };
    write_price("0.000001");
    let keys = Keys::generate();
    let h = Harness::start_with(
        "nostr-prices",
        Options {
            env: vec![
                ("NOSTR_ENABLED", "true".into()),
                ("NOSTR_DISCOVERY", "false".into()),
                ("RELAYS", relay_url.clone()),
                ("NSEC", keys.secret_key().to_secret_hex()),
                ("HTTP_URL", "http://127.0.0.1:{PORT}".into()),
                ("MODELS_PATH", models.display().to_string()),
                ("MODELS_REFRESH_SECONDS", "10".into()),
                ("NOSTR_CHECK_SECONDS", "1".into()),
                ("NOSTR_PRICE_THRESHOLD", "0.05".into()),
                ("NOSTR_MODELS_MIN_INTERVAL_SECONDS", "15".into()),
            ],
            ..Default::default()
        },
    )
    .await;
    let filter = Filter::new().author(keys.public_key()).kind(Kind::from(38450));
    let prompt_on_relay = || async {
        let lists = fetch(&client, filter.clone()).await;
        let list = lists.first()?;
        let content: Value = serde_json::from_str(&list.content).ok()?;
        let gpt = content["models"].as_array()?.iter().find(|m| m["id"] == "gpt-test")?.clone();
        gpt["sats_pricing"]["prompt"].as_f64()
    };
    let prompt_served = || async {
        let models = h.get("/v1/models", None).await.json;
        let gpt = models["data"].as_array()?.iter().find(|m| m["id"] == "gpt-test")?.clone();
        gpt["sats_pricing"]["prompt"].as_f64()
    };
    let first = eventually("the first price list", 30, || async { prompt_on_relay().await }).await;
    assert_eq!(first, 0.001);

    // +2 %: below the threshold, served at once but not re-published.
    write_price("0.00000102");
    eventually("the +2 % price served", 30, || async { (prompt_served().await? == 0.00102).then_some(()) }).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(prompt_on_relay().await, Some(0.001));
    assert_eq!(log_count(&h, "price list signed"), 1);

    // +50 %: re-published (the interval since the first list has passed by now).
    write_price("0.0000015");
    eventually("the +50 % price list", 30, || async { (prompt_on_relay().await? == 0.0015).then_some(()) }).await;
    let republished_at = Instant::now();
    assert_eq!(log_count(&h, "price list signed"), 2);

    // Doubled right after: served at the next refresh, published only once 15 s have passed.
    write_price("0.000003");
    eventually("the doubled price served", 30, || async { (prompt_served().await? == 0.003).then_some(()) }).await;
    if republished_at.elapsed() < Duration::from_secs(12) {
        assert_eq!(prompt_on_relay().await, Some(0.0015), "re-published within the interval");
    }
    eventually("the doubled price list", 30, || async { (prompt_on_relay().await? == 0.003).then_some(()) }).await;
    // (Observed, so a little late; created_at has whole seconds.)
    assert!(republished_at.elapsed() >= Duration::from_secs(13), "re-published within the interval");
    assert_eq!(log_count(&h, "price list signed"), 3);
    h.assert_conserved().await;
}
