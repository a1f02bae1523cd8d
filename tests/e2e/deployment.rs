//! Operating the node: online backup and restore.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use routstr_node::ledger::{open_reader, read_totals};

use crate::harness::{chat, free_port, Harness, Node, ScratchDir};

#[tokio::test]
async fn online_backup_under_load_restores_the_same_balances() {
    let mut h = Harness::start("backup").await;
    let busy = h.key(200).await;
    let quiet = h.key(50).await;

    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (http, url, key, stop) = (h.http.clone(), h.url("/v1/chat/completions"), busy.clone(), stop.clone());
        tokio::spawn(async move {
            let mut served = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let r = http.post(&url).bearer_auth(&key).json(&chat(false)).send().await.unwrap();
                assert_eq!(r.status(), 200);
                served += 1;
            }
            served
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let backup_root = ScratchDir::new("backup-dest");
    let dest = backup_root.join("state");
    // Onion keys kept outside DATA_DIR (TOR_STATE_DIR) are part of the state too.
    let tor_state = backup_root.join("tor-elsewhere");
    std::fs::create_dir_all(tor_state.join("keystore")).unwrap();
    std::fs::write(tor_state.join("keystore").join("hs.key"), b"onion keys").unwrap();
    h.node.set_env("TOR_STATE_DIR", Some(&tor_state.display().to_string()));
    let out = h.node.cli(&["backup", &dest.display().to_string()]).await;
    h.node.set_env("TOR_STATE_DIR", None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(dest.join("tor").join("keystore").join("hs.key")).unwrap(), b"onion keys");
    stop.store(true, Ordering::Relaxed);
    let served = load.await.unwrap();
    assert!(served > 0);

    // The backup is a consistent ledger: restored on a fresh node, the books close.
    let mut restored = Node::start_on(free_port(), h.node.env_with("DATA_DIR", &dest.display().to_string())).await;
    let http = reqwest::Client::new();
    let info = |key: String| {
        let http = http.clone();
        let url = format!("{}/v1/balance/info", restored.url);
        async move { http.get(url).bearer_auth(key).send().await.unwrap().json::<serde_json::Value>().await.unwrap() }
    };
    assert_eq!(info(quiet.clone()).await["balance"], 50_000, "an idle key has the same balance");
    let restored_busy = info(busy.clone()).await["balance"].as_u64().unwrap();
    let (live_busy, _) = h.balance(&busy).await;
    assert!(
        restored_busy >= live_busy && restored_busy < 200_000,
        "the busy key as of the backup: {restored_busy} vs {live_busy}"
    );
    let totals = read_totals(&open_reader(&dest.join("ledger.sqlite")).unwrap()).unwrap();
    assert!(totals.conserved(), "{totals:?}");
    assert_eq!(totals.open_reservations, 0, "a reservation caught in the snapshot is released at start");
    assert_eq!(totals.credited_msat, 250_000);
    restored.stop().await;
    h.assert_conserved().await;
}
