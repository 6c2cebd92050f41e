//! Name → current adapter generation, shared by the HTTP edge (load, unload, list) and the
//! engine handle (resolve at submit). Requests keep the generation they resolved, so replacing
//! or unloading a name never disturbs them.
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use pagoda_models::LoraShapes;

use pagoda_models::LoraWeights;

use crate::peft::{read_peft, AdapterId, LoraAdapter};
use crate::AdapterError;

/// What the server allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdapterLimits {
    /// Device slots: the most distinct adapters in one step.
    pub max_loras: usize,
    pub max_lora_rank: usize,
    /// Most adapters registered at once.
    pub max_adapters: usize,
    /// Most host bytes of registered adapters' weights.
    pub max_adapter_bytes: usize,
}

impl Default for AdapterLimits {
    fn default() -> Self {
        Self {
            max_loras: 4,
            max_lora_rank: 16,
            max_adapters: 128,
            max_adapter_bytes: 4 << 30,
        }
    }
}

/// A registered adapter, for listings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterInfo {
    pub name: String,
    pub id: AdapterId,
    pub path: PathBuf,
    pub rank: usize,
    pub size_bytes: usize,
}

/// Counts for metrics and leak checks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegistryStats {
    pub num_adapters: usize,
    pub num_bytes: usize,
    /// Generations still in memory: registered ones plus replaced or unloaded ones that
    /// running requests still hold.
    pub num_live_generations: usize,
}

pub struct AdapterRegistry {
    shapes: LoraShapes,
    limits: AdapterLimits,
    /// Names adapters may not take (the base model's).
    reserved: Vec<String>,
    adapters: RwLock<BTreeMap<String, Arc<LoraAdapter>>>,
    next_id: AtomicU64,
    live: Arc<AtomicUsize>,
}

fn check_name(name: &str) -> Result<(), AdapterError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:/@".contains(c));
    if ok {
        Ok(())
    } else {
        Err(AdapterError::Invalid(format!(
            "adapter name {name:?} must be 1 to 128 characters of letters, digits and -_.:/@"
        )))
    }
}

impl AdapterRegistry {
    pub fn new(shapes: LoraShapes, limits: AdapterLimits, reserved: Vec<String>) -> Self {
        Self {
            shapes,
            limits,
            reserved,
            adapters: RwLock::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
            live: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn check_name(&self, name: &str) -> Result<(), AdapterError> {
        check_name(name)?;
        if self.reserved.iter().any(|r| r == name) {
            return Err(AdapterError::Invalid(format!(
                "`{name}` is the base model's name"
            )));
        }
        Ok(())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<LoraAdapter>>> {
        self.adapters.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the PEFT folder at `dir` and registers it as `name`, replacing the generation of
    /// that name for new requests. Blocking: call it off the async runtime.
    pub fn load(&self, name: &str, dir: &Path) -> Result<AdapterInfo, AdapterError> {
        self.check_name(name)?;
        let weights = read_peft(dir, &self.shapes, self.limits.max_lora_rank)?;
        self.register(name, dir, weights)
    }

    /// Registers weights made in memory (benchmarks, tests) as `name`; `source` names where
    /// they came from.
    pub fn register(
        &self,
        name: &str,
        source: &Path,
        weights: LoraWeights,
    ) -> Result<AdapterInfo, AdapterError> {
        self.check_name(name)?;
        let id = AdapterId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let adapter = Arc::new(LoraAdapter::new(
            (id, name, source),
            weights,
            &self.shapes,
            self.limits.max_lora_rank,
            self.live.clone(),
        )?);
        let mut map = self.adapters.write().unwrap_or_else(|e| e.into_inner());
        let replaced = map.get(name).map_or(0, |a| a.size_bytes);
        let count = map.len() + usize::from(!map.contains_key(name));
        if count > self.limits.max_adapters {
            return Err(AdapterError::Limit(format!(
                "{} adapters are loaded, the most allowed (--max-adapters); unload one first",
                map.len()
            )));
        }
        let bytes = map.values().map(|a| a.size_bytes).sum::<usize>() - replaced;
        if bytes + adapter.size_bytes > self.limits.max_adapter_bytes {
            return Err(AdapterError::Limit(format!(
                "adapter `{name}` needs {} bytes; {bytes} of {} bytes (--max-adapter-memory) are in use",
                adapter.size_bytes, self.limits.max_adapter_bytes
            )));
        }
        let info = info(&adapter);
        map.insert(name.to_string(), adapter);
        Ok(info)
    }

    /// Removes `name`; requests already holding it finish on it.
    pub fn unload(&self, name: &str) -> Result<(), AdapterError> {
        let mut map = self.adapters.write().unwrap_or_else(|e| e.into_inner());
        map.remove(name)
            .map(drop)
            .ok_or_else(|| AdapterError::NotFound(name.to_string()))
    }

    /// The current generation of `name` (the request's lease).
    pub fn resolve(&self, name: &str) -> Result<Arc<LoraAdapter>, AdapterError> {
        self.read()
            .get(name)
            .cloned()
            .ok_or_else(|| AdapterError::NotFound(name.to_string()))
    }

    pub fn list(&self) -> Vec<AdapterInfo> {
        self.read().values().map(|a| info(a)).collect()
    }

    pub fn stats(&self) -> RegistryStats {
        let map = self.read();
        RegistryStats {
            num_adapters: map.len(),
            num_bytes: map.values().map(|a| a.size_bytes).sum(),
            num_live_generations: self.live.load(Ordering::Relaxed),
        }
    }
}

fn info(a: &LoraAdapter) -> AdapterInfo {
    AdapterInfo {
        name: a.name.clone(),
        id: a.id,
        path: a.path.clone(),
        rank: a.rank,
        size_bytes: a.size_bytes,
    }
}

/// `path` (relative to `root`, or absolute) if it stays inside `root` after resolving symlinks;
/// `..` components are refused outright.
pub fn confine_path(root: &Path, path: &str) -> Result<PathBuf, AdapterError> {
    let denied = |why: &str| {
        AdapterError::PathNotAllowed(format!(
            "lora_path {path:?} {why}; adapters load only from under the server's --lora-dir"
        ))
    };
    let p = Path::new(path);
    if path.is_empty() || p.components().any(|c| c == Component::ParentDir) {
        return Err(denied("is empty or contains `..`"));
    }
    let root = root
        .canonicalize()
        .map_err(|_| denied("cannot be checked (the --lora-dir is unreadable)"))?;
    let full = root.join(p);
    let resolved = full
        .canonicalize()
        .map_err(|_| AdapterError::Invalid(format!("lora_path {path:?} does not exist")))?;
    if !resolved.starts_with(&root) {
        return Err(denied("leaves the allowed directory"));
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("loras");
        std::fs::create_dir_all(root.join("a")).unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(&outside, root.join("escape")).unwrap();
        let canon = root.canonicalize().unwrap();
        assert_eq!(confine_path(&root, "a").unwrap(), canon.join("a"));
        let abs = canon.join("a");
        assert_eq!(confine_path(&root, abs.to_str().unwrap()).unwrap(), abs);
        for bad in ["../outside", "a/../../outside", "", "/etc", "escape"] {
            let e = confine_path(&root, bad).unwrap_err();
            assert!(matches!(e, AdapterError::PathNotAllowed(_)), "{bad}: {e:?}");
        }
        assert!(matches!(
            confine_path(&root, "missing"),
            Err(AdapterError::Invalid(_))
        ));
    }

    #[test]
    fn names_are_checked() {
        for ok in ["signature", "org/model-v1.2", "a:b@c"] {
            check_name(ok).unwrap();
        }
        for bad in ["", "with space", "quote\"", &"x".repeat(129)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
