//! The node's Nostr identity: `NSEC` (bech32 or hex), else a key generated on first start and
//! kept in `DATA_DIR/nostr.key`, readable by the owner only. The secret never reaches a log or
//! an error message.

use std::path::Path;

use nostr_sdk::prelude::{Keys, ToBech32};

/// The key from `nsec` if given, else the one stored at `path`, else a new one stored there.
pub fn load_or_create(nsec: Option<&str>, path: &Path) -> Result<Keys, String> {
    if let Some(secret) = nsec.map(str::trim).filter(|s| !s.is_empty()) {
        return Keys::parse(secret).map_err(|_| "NSEC is not a Nostr secret key (nsec1… or 64 hex digits)".to_owned());
    }
    match std::fs::read_to_string(path) {
        Ok(text) => {
            restrict_permissions(path);
            Keys::parse(text.trim()).map_err(|_| format!("{} does not hold a Nostr secret key", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let keys = Keys::generate();
            let nsec = keys.secret_key().to_bech32().map_err(|e| format!("encoding the new Nostr key: {e}"))?;
            crate::fsutil::write_private(path, format!("{nsec}\n").as_bytes())
                .map_err(|e| format!("cannot store the Nostr key at {}: {e}", path.display()))?;
            tracing::info!(path = %path.display(), "generated the node's Nostr key");
            Ok(keys)
        }
        Err(e) => Err(format!("cannot read the Nostr key at {}: {e}", path.display())),
    }
}

/// A key file someone else can read is tightened to 0600.
fn restrict_permissions(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(path = %path.display(), "the Nostr key was readable by others; restricting it to its owner");
                let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_then_reloaded_private_and_nsec_wins() {
        let dir = std::env::temp_dir().join(format!("routstr-nostr-key-{}", rand::random::<u64>()));
        let path = dir.join("nostr.key");
        let first = load_or_create(None, &path).unwrap();
        let again = load_or_create(None, &path).unwrap();
        assert_eq!(first.public_key(), again.public_key());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let other = Keys::generate();
        let hex = other.secret_key().to_secret_hex();
        let bech = other.secret_key().to_bech32().unwrap();
        assert_eq!(load_or_create(Some(&hex), &path).unwrap().public_key(), other.public_key());
        assert_eq!(load_or_create(Some(&bech), &path).unwrap().public_key(), other.public_key());
        let err = load_or_create(Some("nsec1notakey"), &path).unwrap_err();
        assert!(!err.contains("nsec1notakey"), "the error must not echo the secret");
        let _ = std::fs::remove_dir_all(dir);
    }
}
