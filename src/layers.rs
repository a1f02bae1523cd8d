//! Upstreams and model prices as the operator set them at runtime (admin API), layered
//! explicitly on top of the environment (`UPSTREAM_*`, `UPSTREAMS_PATH`).
//!
//! Admin edits live in files of their own in `DATA_DIR`: `admin-upstreams.toml` (the format of
//! `UPSTREAMS_PATH`, every field but `name` optional, plus `disabled`) and `admin-models.json`
//! (model id → OpenRouter `pricing`, USD per token). An admin entry named like an environment
//! upstream overrides only the fields it sets; any other entry adds an upstream. Deleting an
//! admin entry brings the environment's version back. Nothing here is hidden: the admin API
//! and the start log say where every upstream comes from.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::pricing::{Markup, UsdPrices};
use crate::upstream::{Upstream, UpstreamConfigError, UpstreamSpec};

pub const UPSTREAMS_FILE: &str = "admin-upstreams.toml";
pub const MODELS_FILE: &str = "admin-models.json";

/// One `[[upstream]]` entry of `admin-upstreams.toml`.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminUpstream {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aliases: Option<HashMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub markup: Option<f64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
}

#[derive(Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminUpstreamsFile {
    #[serde(default, rename = "upstream")]
    upstreams: Vec<AdminUpstream>,
}

/// An upstream after layering, with where it comes from.
pub struct Layered {
    pub spec: UpstreamSpec,
    /// "environment", "admin" or "environment+admin".
    pub source: &'static str,
    pub disabled: bool,
}

/// The environment's upstreams, the admin layer over them, and the price overrides.
pub struct Layers {
    dir: PathBuf,
    env: Vec<UpstreamSpec>,
    pub admin: Vec<AdminUpstream>,
    pub prices: Map<String, Value>,
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> String {
    format!("{}: {e}", path.display())
}

impl Layers {
    pub fn load(data_dir: &Path, env: Vec<UpstreamSpec>) -> Result<Layers, String> {
        let path = data_dir.join(UPSTREAMS_FILE);
        let admin = match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str::<AdminUpstreamsFile>(&text).map_err(|e| io_err(&path, e))?.upstreams,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_err(&path, e)),
        };
        let path = data_dir.join(MODELS_FILE);
        let prices = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<Map<String, Value>>(&bytes).map_err(|e| io_err(&path, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Map::new(),
            Err(e) => return Err(io_err(&path, e)),
        };
        Ok(Layers { dir: data_dir.to_owned(), env, admin, prices })
    }

    pub fn upstreams_path(&self) -> PathBuf {
        self.dir.join(UPSTREAMS_FILE)
    }

    pub fn models_path(&self) -> PathBuf {
        self.dir.join(MODELS_FILE)
    }

    /// Every upstream, enabled or not, in order: the environment's, then the admin's additions.
    pub fn layered(&self) -> Result<Vec<Layered>, UpstreamConfigError> {
        let mut out = Vec::new();
        for spec in &self.env {
            let mut spec = spec.clone();
            let over = self.admin.iter().find(|a| a.name == spec.name);
            let disabled = over.is_some_and(|a| a.disabled);
            if let Some(a) = over {
                apply(&mut spec, a);
            }
            out.push(Layered {
                spec,
                source: if over.is_some() { "environment+admin" } else { "environment" },
                disabled,
            });
        }
        for a in self.admin.iter().filter(|a| !self.env.iter().any(|s| s.name == a.name)) {
            let base_url = a.base_url.clone().ok_or_else(|| UpstreamConfigError::Invalid {
                name: a.name.clone(),
                reason: "base_url is required for an upstream the environment does not define".into(),
            })?;
            let mut spec = UpstreamSpec {
                name: a.name.clone(),
                base_url,
                api_key: None,
                api_key_env: None,
                models: Vec::new(),
                aliases: HashMap::new(),
                markup: 1.0,
            };
            apply(&mut spec, a);
            out.push(Layered { spec, source: "admin", disabled: a.disabled });
        }
        Ok(out)
    }

    /// The enabled upstreams, built (and so validated).
    pub fn build(&self, exchange: Markup) -> Result<Vec<Arc<Upstream>>, UpstreamConfigError> {
        let mut out = Vec::new();
        for l in self.layered()? {
            let upstream = Upstream::from_spec(l.spec, exchange)?;
            if !l.disabled {
                out.push(Arc::new(upstream));
            }
        }
        Ok(out)
    }

    pub fn is_env(&self, name: &str) -> bool {
        self.env.iter().any(|s| s.name == name)
    }

    /// Writes both admin files (owner-only: they may hold API keys).
    pub fn save(&self) -> Result<(), String> {
        let file = AdminUpstreamsFile { upstreams: self.admin.clone() };
        let text = toml::to_string(&file).map_err(|e| e.to_string())?;
        let header = "# Written by the admin API: layered on top of UPSTREAM_* and UPSTREAMS_PATH.\n";
        replace(&self.upstreams_path(), format!("{header}{text}").as_bytes())?;
        let json = serde_json::to_vec_pretty(&self.prices).map_err(|e| e.to_string())?;
        replace(&self.models_path(), &json)
    }

    /// Says at start where every upstream and price override comes from.
    pub fn log(&self) {
        match self.layered() {
            Ok(list) => {
                for l in list {
                    tracing::info!(upstream = %l.spec.name, source = l.source, disabled = l.disabled, "upstream");
                }
            }
            Err(e) => tracing::warn!(error = %e, "admin upstream layer"),
        }
        if !self.admin.is_empty() || !self.prices.is_empty() {
            tracing::info!(
                file = %self.upstreams_path().display(),
                upstreams = self.admin.len(),
                price_overrides = self.prices.len(),
                "admin layer applied on top of the environment (edit or delete in the dashboard)"
            );
        }
    }

    /// What the admin API shows of the layering (no keys).
    pub fn to_json(&self) -> Value {
        json!({
            "upstreams_file": self.upstreams_path(),
            "models_file": self.models_path(),
            "precedence": "admin layer over UPSTREAM_* / UPSTREAMS_PATH; MODELS_PATH prices under admin price overrides",
            "admin_upstreams": self.admin.iter().map(|a| json!({
                "name": a.name,
                "overrides_environment": self.is_env(&a.name),
                "disabled": a.disabled,
            })).collect::<Vec<_>>(),
            "price_overrides": self.prices.keys().collect::<Vec<_>>(),
        })
    }
}

/// Checks an OpenRouter `pricing` object (USD per token).
pub fn check_pricing(pricing: &Value) -> Result<UsdPrices, String> {
    UsdPrices::from_json(pricing)
        .ok_or_else(|| "pricing needs prompt and completion (USD per token, decimal strings or numbers)".into())
}

fn apply(spec: &mut UpstreamSpec, a: &AdminUpstream) {
    if let Some(v) = &a.base_url {
        spec.base_url = v.clone();
    }
    if let Some(v) = &a.api_key {
        spec.api_key = Some(v.clone());
        spec.api_key_env = None;
    }
    if let Some(v) = &a.models {
        spec.models = v.clone();
    }
    if let Some(v) = &a.aliases {
        spec.aliases = v.clone();
    }
    if let Some(v) = a.markup {
        spec.markup = v;
    }
}

fn replace(path: &Path, contents: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    crate::fsutil::write_private(&tmp, contents).map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> UpstreamSpec {
        UpstreamSpec {
            name: name.into(),
            base_url: "http://127.0.0.1:1/v1".into(),
            api_key: Some("env-key".into()),
            api_key_env: None,
            models: vec!["m".into()],
            aliases: HashMap::new(),
            markup: 1.0,
        }
    }

    #[test]
    fn admin_entries_layer_over_the_environment_and_persist() {
        let dir = std::env::temp_dir().join(format!("routstr-layers-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut layers = Layers::load(&dir, vec![env("a")]).unwrap();
        layers.admin.push(AdminUpstream { name: "a".into(), markup: Some(1.5), ..Default::default() });
        layers.admin.push(AdminUpstream {
            name: "b".into(),
            base_url: Some("http://127.0.0.1:2/v1".into()),
            disabled: true,
            ..Default::default()
        });
        layers.prices.insert("m".into(), serde_json::json!({ "prompt": "0.1", "completion": "0.2" }));
        layers.save().unwrap();

        let layers = Layers::load(&dir, vec![env("a")]).unwrap();
        let list = layers.layered().unwrap();
        assert_eq!((list[0].source, list[0].spec.markup), ("environment+admin", 1.5));
        assert_eq!(list[0].spec.api_key.as_deref(), Some("env-key"), "fields not set stay the environment's");
        assert_eq!((list[1].source, list[1].disabled), ("admin", true));
        assert_eq!(layers.build(Markup::NONE).unwrap().len(), 1, "disabled upstreams are not built");
        assert!(layers.prices.contains_key("m"));
        layers.admin.iter().for_each(|a| assert!(a.api_key.is_none()));

        let mut bad = layers;
        bad.admin.push(AdminUpstream { name: "c".into(), ..Default::default() });
        assert!(bad.layered().is_err(), "a new upstream needs a base_url");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
