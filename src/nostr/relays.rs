//! Which relays the node reads from and writes to: `RELAYS` (comma list, read and write), else
//! the file at `RELAYS_PATH`, else the `relays.toml` built into the binary.

use std::path::Path;

use serde::Deserialize;

/// The repository's `relays.toml`, the default relay list.
pub const DEFAULT_RELAYS_TOML: &str = include_str!("../../relays.toml");

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelaySpec {
    pub url: String,
    #[serde(default = "yes")]
    pub read: bool,
    #[serde(default = "yes")]
    pub write: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RelaysFile {
    #[serde(default, alias = "relays")]
    relay: Vec<RelaySpec>,
}

/// Parses a relays file: `[[relay]]` tables with `url`, `read`, `write`.
pub fn parse(text: &str) -> Result<Vec<RelaySpec>, String> {
    let file: RelaysFile = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut out: Vec<RelaySpec> = Vec::new();
    for spec in file.relay {
        check_url(&spec.url)?;
        if !spec.read && !spec.write {
            continue;
        }
        match out.iter_mut().find(|s| s.url == spec.url) {
            Some(s) => {
                s.read |= spec.read;
                s.write |= spec.write;
            }
            None => out.push(spec),
        }
    }
    Ok(out)
}

fn check_url(url: &str) -> Result<(), String> {
    if url.starts_with("wss://") || url.starts_with("ws://") {
        Ok(())
    } else {
        Err(format!("relay {url:?} is not a ws:// or wss:// URL"))
    }
}

/// The relays in effect for these settings.
pub fn resolve(relays: &[String], path: Option<&Path>) -> Result<Vec<RelaySpec>, String> {
    let listed: Vec<&str> = relays.iter().map(|r| r.trim()).filter(|r| !r.is_empty()).collect();
    if !listed.is_empty() {
        let mut out: Vec<RelaySpec> = Vec::new();
        for url in listed {
            check_url(url).map_err(|e| format!("RELAYS: {e}"))?;
            if !out.iter().any(|s| s.url == url) {
                out.push(RelaySpec { url: url.to_owned(), read: true, write: true });
            }
        }
        return Ok(out);
    }
    match path {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read relays file {}: {e}", path.display()))?;
            parse(&text).map_err(|e| format!("relays file {}: {e}", path.display()))
        }
        None => parse(DEFAULT_RELAYS_TOML).map_err(|e| format!("built-in relays.toml: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_reference_relays() {
        let relays = resolve(&[], None).unwrap();
        let urls: Vec<&str> = relays.iter().map(|r| r.url.as_str()).collect();
        assert_eq!(
            urls,
            ["wss://relay.damus.io", "wss://nos.lol", "wss://relay.routstr.com", "wss://relay.nostr.band"]
        );
        assert!(relays.iter().all(|r| r.read && r.write));
    }

    #[test]
    fn file_roles_and_env_override() {
        let text = r#"
            [[relay]]
            url = "wss://r.example"
            write = false
            [[relay]]
            url = "ws://127.0.0.1:7777"
            read = false
            [[relay]]
            url = "wss://off.example"
            read = false
            write = false
        "#;
        let relays = parse(text).unwrap();
        assert_eq!(
            relays,
            vec![
                RelaySpec { url: "wss://r.example".into(), read: true, write: false },
                RelaySpec { url: "ws://127.0.0.1:7777".into(), read: false, write: true },
            ]
        );
        assert!(parse("[[relay]]\nurl = \"https://x\"").is_err());
        assert!(parse("[[relay]]\nurl = \"wss://x\"\nreed = true").is_err());
        let env = vec!["wss://a.example".to_owned(), " wss://b.example ".to_owned(), "wss://a.example".to_owned()];
        let relays = resolve(&env, Some(Path::new("/nonexistent"))).unwrap();
        assert_eq!(relays.len(), 2);
        assert!(relays.iter().all(|r| r.read && r.write));
        assert!(resolve(&["http://x".to_owned()], None).is_err());
    }
}
