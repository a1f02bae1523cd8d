//! The Tor client's configuration: arti's defaults, the operator's `ARTI_CONFIG` file merged on
//! top, and the storage directories from `TOR_STATE_DIR` last (so the keys are always where the
//! node's settings say).

use std::path::Path;

use arti_client::config::{ConfigurationSource, ConfigurationSources};
use arti_client::TorClientConfig;
use tor_config::sources::MustRead;

use crate::config::Settings;

/// Builds the client configuration and creates the state directory (owner-only).
pub fn client_config(settings: &Settings) -> Result<TorClientConfig, String> {
    let state = super::state_dir(settings);
    create_private_dir(&state).map_err(|e| format!("TOR_STATE_DIR {}: {e}", state.display()))?;
    let cache = state.join("cache");

    let mut sources = ConfigurationSources::new_empty();
    if let Some(path) = &settings.arti_config {
        if !path.is_file() {
            return Err(format!("ARTI_CONFIG {}: no such file", path.display()));
        }
        sources.push_source(ConfigurationSource::from_path(path), MustRead::MustRead);
    }
    sources.push_source(ConfigurationSource::from_verbatim(storage_toml(&state, &cache)?), MustRead::MustRead);
    let tree = sources.load().map_err(|e| format!("arti configuration: {e}"))?;
    tor_config::resolve::<TorClientConfig>(&tree).map_err(|e| format!("arti configuration: {e}"))
}

/// `[storage]` with both directories as literal paths (no `${…}` expansion).
fn storage_toml(state: &Path, cache: &Path) -> Result<String, String> {
    let literal = |p: &Path| -> Result<toml::Value, String> {
        let s = p.to_str().ok_or_else(|| format!("{} is not UTF-8", p.display()))?;
        let mut t = toml::Table::new();
        t.insert("literal".into(), toml::Value::String(s.to_owned()));
        Ok(toml::Value::Table(t))
    };
    let mut storage = toml::Table::new();
    storage.insert("state_dir".into(), literal(state)?);
    storage.insert("cache_dir".into(), literal(cache)?);
    let mut root = toml::Table::new();
    root.insert("storage".into(), toml::Value::Table(storage));
    toml::to_string(&root).map_err(|e| e.to_string())
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn settings(dir: &Path, arti: Option<&Path>) -> Settings {
        let mut s = crate::config::Cli::try_parse_from(["routstr-node"]).unwrap().settings;
        s.data_dir = dir.to_path_buf();
        s.arti_config = arti.map(Path::to_path_buf);
        s
    }

    #[test]
    fn state_dir_is_private_and_file_is_merged() {
        let dir = std::env::temp_dir().join(format!("routstr-tor-cfg-{}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        let arti = dir.join("arti.toml");
        std::fs::write(
            &arti,
            "[address_filter]\nallow_local_addrs = true\n[storage]\nstate_dir = \"/elsewhere\"\n\
             [storage.permissions]\ndangerously_trust_everyone = true\n",
        )
        .unwrap();
        let cfg = client_config(&settings(&dir, Some(&arti))).expect("config builds");
        let dbg = format!("{cfg:?}");
        assert!(dbg.contains(&dir.join("tor").display().to_string()), "TOR_STATE_DIR wins: {dbg}");
        assert!(!dbg.contains("/elsewhere"));
        assert!(dbg.contains("allow_local_addrs: true"), "the file is merged: {dbg}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join("tor")).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700);
        }
        assert!(client_config(&settings(&dir, Some(&dir.join("missing.toml")))).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
