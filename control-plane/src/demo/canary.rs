//! The demo's canary shift: mid-run the demo moves the api route of
//! `routes.yaml` from api 90 / api-v2 10 to 50/50 by rewriting the file (the
//! controller follows it like any edit), and puts the original text back when the
//! demo ends.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

/// The file in the manifests directory that holds the api HTTPRoute.
pub const ROUTES_FILE: &str = "routes.yaml";
/// api-v2's weight (of 100) as routes.yaml ships, and after the shift.
pub const WEIGHT_BEFORE: u32 = 10;
pub const WEIGHT_AFTER: u32 = 50;

/// A backendRef as routes.yaml writes it, with the weight of api-v2 being `w`.
fn backend_refs(w: u32) -> [String; 2] {
    [
        format!("{{name: api, port: 80, weight: {}}}", 100 - w),
        format!("{{name: api-v2, port: 80, weight: {w}}}"),
    ]
}

/// `text` with every api / api-v2 split of the shipped weights moved to the
/// shifted ones; `None` if the text has no such split.
pub fn shift_weights(text: &str) -> Option<String> {
    let mut out = text.to_string();
    for (from, to) in backend_refs(WEIGHT_BEFORE)
        .into_iter()
        .zip(backend_refs(WEIGHT_AFTER))
    {
        if !out.contains(&from) {
            return None;
        }
        out = out.replace(&from, &to);
    }
    Some(out)
}

/// routes.yaml of the demo's manifests: shifted once, restored on `restore` or
/// when dropped (an error or a panic on the way out). Clones share the shift,
/// so that a second signal, which exits without unwinding, can restore it too.
#[derive(Clone)]
pub struct RoutesFile {
    path: PathBuf,
    shifted: Arc<Mutex<Option<Shifted>>>,
}

struct Shifted {
    original: Vec<u8>,
    written: Vec<u8>,
}

/// What `restore` did.
pub enum Restored {
    /// Nothing was shifted.
    Nothing,
    Original,
    /// The file changed after the shift; it was left as it is.
    LeftEdited,
}

impl RoutesFile {
    pub fn new(manifests: &Path) -> Self {
        RoutesFile {
            path: manifests.join(ROUTES_FILE),
            shifted: Arc::default(),
        }
    }

    fn shifted(&self) -> std::sync::MutexGuard<'_, Option<Shifted>> {
        self.shifted.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the file holds the demo's shifted split, as a demo that could
    /// not clean up (killed) leaves it.
    pub fn left_shifted(&self) -> bool {
        std::fs::read_to_string(&self.path).is_ok_and(|t| {
            backend_refs(WEIGHT_AFTER)
                .iter()
                .all(|r| t.contains(r.as_str()))
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file holds the split the demo shifts.
    pub fn can_shift(&self) -> bool {
        std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|t| shift_weights(&t))
            .is_some()
    }

    /// Rewrites the file with the shifted weights; `false` if it no longer holds
    /// the split to shift.
    pub fn shift(&mut self) -> anyhow::Result<bool> {
        let mut shifted = self.shifted();
        if shifted.is_some() {
            return Ok(true);
        }
        let original = std::fs::read(&self.path)?;
        let Some(text) = std::str::from_utf8(&original).ok().and_then(shift_weights) else {
            return Ok(false);
        };
        write_atomically(&self.path, text.as_bytes())?;
        *shifted = Some(Shifted {
            original,
            written: text.into_bytes(),
        });
        Ok(true)
    }

    /// Puts the original text back, unless the file changed after the shift.
    pub fn restore(&mut self) -> anyhow::Result<Restored> {
        let Some(s) = self.shifted().take() else {
            return Ok(Restored::Nothing);
        };
        if std::fs::read(&self.path)? != s.written {
            return Ok(Restored::LeftEdited);
        }
        write_atomically(&self.path, &s.original)?;
        Ok(Restored::Original)
    }
}

impl Drop for RoutesFile {
    fn drop(&mut self) {
        let _ = self.restore();
    }
}

/// Writes `path` whole in one step: a hidden file beside it (the controller skips
/// hidden files), with the same permissions, renamed over it.
fn write_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map_or_else(|| "routes".into(), |n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{name}.strait-demo"));
    std::fs::write(&tmp, contents)?;
    let result = std::fs::metadata(path)
        .and_then(|m| std::fs::set_permissions(&tmp, m.permissions()))
        .and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHIPPED: &str = include_str!("../../../deploy/examples/demo/routes.yaml");

    #[test]
    fn the_shipped_routes_shift_to_fifty_fifty() {
        let shifted = shift_weights(SHIPPED).expect("routes.yaml holds the demo's split");
        assert!(!shifted.contains("weight: 90") && !shifted.contains("weight: 10}"));
        assert!(shifted.contains("{name: api, port: 80, weight: 50}"));
        assert!(shifted.contains("{name: api-v2, port: 80, weight: 50}"));
        assert_eq!(shift_weights(&shifted), None);
    }

    /// The split a killed demo leaves is told from the one that ships.
    #[test]
    fn a_file_left_shifted_is_told() {
        let dir = std::env::temp_dir().join(format!("strait-canary-left-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temp dir");
        let f = RoutesFile::new(&dir);
        std::fs::write(f.path(), SHIPPED).expect("write");
        assert!(!f.left_shifted());
        std::fs::write(f.path(), shift_weights(SHIPPED).expect("shifted")).expect("write");
        assert!(f.left_shifted());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_shifted_file_is_restored_byte_for_byte() {
        let dir = std::env::temp_dir().join(format!("strait-canary-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temp dir");
        let path = dir.join(ROUTES_FILE);
        std::fs::write(&path, SHIPPED).expect("write");
        let mut f = RoutesFile::new(&dir);
        assert!(f.can_shift());
        assert!(f.shift().expect("shift"));
        assert_ne!(std::fs::read_to_string(&path).expect("read"), SHIPPED);
        drop(f);
        assert_eq!(std::fs::read_to_string(&path).expect("read"), SHIPPED);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, [ROUTES_FILE]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_file_edited_after_the_shift_is_left_alone() {
        let dir = std::env::temp_dir().join(format!("strait-canary-edit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temp dir");
        let path = dir.join(ROUTES_FILE);
        std::fs::write(&path, SHIPPED).expect("write");
        let mut f = RoutesFile::new(&dir);
        assert!(f.shift().expect("shift"));
        std::fs::write(&path, "# mine\n").expect("write");
        assert!(matches!(
            f.restore().expect("restore"),
            Restored::LeftEdited
        ));
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "# mine\n");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
