//! Admin login: one password, kept as an argon2id hash; sessions as random tokens of which only
//! SHA-256 hashes are stored (so a leaked sessions file opens nothing), persisted so they survive
//! a restart; login attempts limited per client; comparisons in constant time.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::config::Settings;
use crate::ledger::now_secs;
use crate::payment::sha256_hex;

pub const SESSION_COOKIE: &str = "routstr_admin";
const PASSWORD_FILE: &str = "admin-password";
const SESSIONS_FILE: &str = "admin-sessions.json";
const RATE_WINDOW: Duration = Duration::from_secs(60);
/// Shortest password `POST /admin/api/password` accepts.
pub const MIN_PASSWORD_LEN: usize = 12;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSession {
    /// SHA-256 of the session token, hex.
    hash: String,
    created_at: i64,
    expires_at: i64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum LoginError {
    /// Too many attempts from this client; retry after this many seconds.
    RateLimited(u64),
    WrongPassword,
    Internal(String),
}

pub struct Auth {
    dir: PathBuf,
    password_hash: Mutex<String>,
    sessions: Mutex<Vec<StoredSession>>,
    session_secs: i64,
    attempts_per_minute: u32,
    attempts: Mutex<HashMap<String, VecDeque<Instant>>>,
}

fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>()).map_err(|e| e.to_string())?;
    Argon2::default().hash_password(password.as_bytes(), &salt).map(|h| h.to_string()).map_err(|e| e.to_string())
}

/// Argon2's verification compares in constant time.
fn verify_password(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
}

/// A password for the operator to type: 20 characters from an unambiguous alphabet (~100 bits).
fn generate_password() -> String {
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    (0..20).map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char).collect()
}

/// Replaces `path` atomically with an owner-only file.
fn write_atomic(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", hex::encode(rand::random::<[u8; 4]>())));
    crate::fsutil::write_private(&tmp, contents)?;
    std::fs::rename(&tmp, path)
}

impl Auth {
    /// Reads the stored hash and sessions. `ADMIN_PASSWORD` that no longer matches the stored
    /// hash replaces it and ends every session; with neither, a password is generated and
    /// printed once to stderr (never to the log).
    pub fn open(settings: &Settings) -> Result<Auth, String> {
        let dir = settings.data_dir.clone();
        let password_path = dir.join(PASSWORD_FILE);
        let stored =
            std::fs::read_to_string(&password_path).ok().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty());
        let mut sessions: Vec<StoredSession> = std::fs::read(dir.join(SESSIONS_FILE))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        let configured = settings.admin_password.as_ref().map(|p| p.expose()).filter(|p| !p.is_empty());
        let hash = match (configured, stored) {
            (Some(password), Some(stored)) if verify_password(&stored, password) => stored,
            (Some(password), _) => {
                let hash = hash_password(password)?;
                write_atomic(&password_path, hash.as_bytes()).map_err(|e| format!("admin password file: {e}"))?;
                sessions.clear();
                hash
            }
            (None, Some(stored)) => stored,
            (None, None) => {
                let password = generate_password();
                let hash = hash_password(&password)?;
                write_atomic(&password_path, hash.as_bytes()).map_err(|e| format!("admin password file: {e}"))?;
                sessions.clear();
                // stderr, once, on purpose: not through the logger.
                eprintln!(
                    "\n  routstr-node admin password (shown once; set ADMIN_PASSWORD to choose your own): {password}\n  dashboard: http://127.0.0.1:{}/admin\n",
                    settings.port
                );
                hash
            }
        };
        let auth = Auth {
            dir,
            password_hash: Mutex::new(hash),
            sessions: Mutex::new(sessions),
            session_secs: i64::try_from(settings.admin_session_hours.max(1).saturating_mul(3600)).unwrap_or(i64::MAX),
            attempts_per_minute: settings.admin_login_attempts_per_minute.max(1),
            attempts: Mutex::new(HashMap::new()),
        };
        auth.persist_sessions().map_err(|e| format!("admin sessions file: {e}"))?;
        Ok(auth)
    }

    fn persist_sessions(&self) -> std::io::Result<()> {
        let now = now_secs();
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions.retain(|s| s.expires_at > now);
        let bytes = serde_json::to_vec(&*sessions).unwrap_or_default();
        write_atomic(&self.dir.join(SESSIONS_FILE), &bytes)
    }

    /// Counts an attempt from `client`; `Err(seconds)` when it is over the limit.
    fn take_attempt(&self, client: &str) -> Result<(), u64> {
        let now = Instant::now();
        let mut attempts = self.attempts.lock().unwrap_or_else(|e| e.into_inner());
        if attempts.len() > 10_000 {
            attempts.retain(|_, q| q.back().is_some_and(|t| now.duration_since(*t) < RATE_WINDOW));
        }
        let queue = attempts.entry(client.to_owned()).or_default();
        while queue.front().is_some_and(|t| now.duration_since(*t) >= RATE_WINDOW) {
            queue.pop_front();
        }
        if queue.len() >= self.attempts_per_minute as usize {
            let oldest = queue.front().copied().unwrap_or(now);
            return Err(RATE_WINDOW.saturating_sub(now.duration_since(oldest)).as_secs().max(1));
        }
        queue.push_back(now);
        Ok(())
    }

    async fn check_password(&self, password: &str) -> Result<bool, LoginError> {
        let hash = self.password_hash.lock().map(|h| h.clone()).map_err(|e| LoginError::Internal(e.to_string()))?;
        let password = password.to_owned();
        tokio::task::spawn_blocking(move || verify_password(&hash, &password))
            .await
            .map_err(|e| LoginError::Internal(e.to_string()))
    }

    /// Checks the password (rate-limited per `client`) and opens a session: its token.
    pub async fn login(&self, client: &str, password: &str) -> Result<String, LoginError> {
        self.take_attempt(client).map_err(LoginError::RateLimited)?;
        if !self.check_password(password).await? {
            return Err(LoginError::WrongPassword);
        }
        self.new_session()
    }

    /// Opens a session: a random token for the client, only its hash kept (and persisted).
    fn new_session(&self) -> Result<String, LoginError> {
        let token = hex::encode(rand::random::<[u8; 32]>());
        let now = now_secs();
        self.sessions.lock().map_err(|e| LoginError::Internal(e.to_string()))?.push(StoredSession {
            hash: sha256_hex(token.as_bytes()),
            created_at: now,
            expires_at: now.saturating_add(self.session_secs),
        });
        self.persist_sessions().map_err(|e| LoginError::Internal(e.to_string()))?;
        Ok(token)
    }

    /// Whether `token` is a live session. Every stored hash is compared, in constant time.
    pub fn is_valid(&self, token: &str) -> bool {
        let hash = sha256_hex(token.as_bytes());
        let now = now_secs();
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let mut found = subtle::Choice::from(0);
        for s in sessions.iter() {
            let live = subtle::Choice::from(u8::from(s.expires_at > now));
            found |= s.hash.as_bytes().ct_eq(hash.as_bytes()) & live;
        }
        found.into()
    }

    pub fn logout(&self, token: &str) {
        let hash = sha256_hex(token.as_bytes());
        if let Ok(mut sessions) = self.sessions.lock() {
            sessions.retain(|s| !bool::from(s.hash.as_bytes().ct_eq(hash.as_bytes())));
        }
        if let Err(e) = self.persist_sessions() {
            tracing::warn!(error = %e, "could not save admin sessions");
        }
    }

    /// Replaces the password (the current one required, rate-limited like a login) and ends
    /// every other session. Returns a fresh session token.
    pub async fn change_password(&self, client: &str, current: &str, new: &str) -> Result<String, LoginError> {
        self.take_attempt(client).map_err(LoginError::RateLimited)?;
        if !self.check_password(current).await? {
            return Err(LoginError::WrongPassword);
        }
        let new = new.to_owned();
        let hash = tokio::task::spawn_blocking(move || hash_password(&new))
            .await
            .map_err(|e| LoginError::Internal(e.to_string()))?
            .map_err(LoginError::Internal)?;
        write_atomic(&self.dir.join(PASSWORD_FILE), hash.as_bytes())
            .map_err(|e| LoginError::Internal(e.to_string()))?;
        *self.password_hash.lock().map_err(|e| LoginError::Internal(e.to_string()))? = hash;
        self.sessions.lock().map_err(|e| LoginError::Internal(e.to_string()))?.clear();
        self.new_session()
    }

    pub fn session_secs(&self) -> i64 {
        self.session_secs
    }
}

/// The session token of a request: the `routstr_admin` cookie, or `Authorization: Bearer`.
pub fn session_token(headers: &hyper::HeaderMap) -> Option<String> {
    for value in headers.get_all(hyper::header::COOKIE) {
        let Ok(value) = value.to_str() else { continue };
        for pair in value.split(';') {
            if let Some((k, v)) = pair.trim().split_once('=') {
                if k == SESSION_COOKIE && !v.is_empty() {
                    return Some(v.to_owned());
                }
            }
        }
    }
    headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify() {
        let hash = hash_password("correct horse").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password(&hash, "correct horse"));
        assert!(!verify_password(&hash, "correct horsf"));
        assert!(!verify_password("garbage", "correct horse"));
        assert_eq!(generate_password().len(), 20);
    }

    #[test]
    fn cookie_or_bearer() {
        let mut h = hyper::HeaderMap::new();
        h.insert(hyper::header::COOKIE, "a=b; routstr_admin=tok123; c=d".parse().unwrap());
        assert_eq!(session_token(&h).as_deref(), Some("tok123"));
        let mut h = hyper::HeaderMap::new();
        h.insert(hyper::header::AUTHORIZATION, "Bearer xyz".parse().unwrap());
        assert_eq!(session_token(&h).as_deref(), Some("xyz"));
        assert_eq!(session_token(&hyper::HeaderMap::new()), None);
    }
}
