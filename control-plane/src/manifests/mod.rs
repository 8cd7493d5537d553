//! The `--manifests DIR` source: the same Kubernetes objects one would apply to a
//! cluster, read from YAML files and re-read when they change.
//!
//! A file that fails to parse, or holds an object that fails validation, is reported
//! (file, object, field) and keeps its last good objects: nothing half-applied ever
//! reaches a proxy. So is a file that brings an HTTPRoute sending to a Service
//! that does not exist; it is tried again on each scan, as the Service may come.

mod parse;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::watch;
use tracing::{debug, error, info, warn};

pub use parse::{ObjId, Object, ParseError, parse_file, parse_object};

use crate::defaults;
use crate::index::{ObjKey, ServiceInfo, Snapshot};
use crate::metrics::Metrics;

/// What identifies a version of a file without reading it. The inode and change
/// time catch a rewrite of the same length within one mtime tick, and a file
/// replaced by rename.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
    changed_ns: i128,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            modified: meta.modified().ok(),
            len: meta.len(),
            inode: meta.ino(),
            changed_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }
}

/// What the index holds from a file: the objects themselves live in the index
/// only (a mesh of 100,000 endpoints is not kept twice).
#[derive(Debug)]
struct FileState {
    stamp: Stamp,
    ids: Vec<ObjId>,
}

type FileName = Arc<Path>;

/// A file's content refused only because its routes name Services the index does
/// not hold (yet): kept parsed, and tried again on every scan.
#[derive(Debug)]
struct Held {
    stamp: Stamp,
    objects: Vec<Object>,
}

/// A file's content read in this scan (or held from an earlier one), before it
/// is accepted or refused.
struct Candidate {
    path: FileName,
    stamp: Stamp,
    parsed: Parsed,
    /// Held from an earlier scan: already reported.
    retried: bool,
    /// Its objects, when refused only for routes to missing Services.
    held: Option<Vec<Object>>,
}

/// Reads a directory of manifests into snapshots.
#[derive(Debug)]
pub struct ManifestSource {
    dirs: Vec<PathBuf>,
    files: BTreeMap<FileName, FileState>,
    /// Which files define each object, in path order: the first one's definition
    /// is in force. Objects are added and removed by what defines them, so that a
    /// file renamed, or an object moved from one file to another, never takes an
    /// object away that another file still defines.
    owners: HashMap<ObjId, Vec<FileName>>,
    /// Files whose current content is not in force: rejected (their last good
    /// objects, if any, stay), or never read whole yet.
    unsettled: HashSet<FileName>,
    /// Directories that could not be read in the last scan: their files are
    /// neither read nor taken for gone.
    unreadable: Vec<PathBuf>,
    /// Files refused for routes to Services that do not exist (also unsettled).
    held: HashMap<FileName, Held>,
    /// The index as of the last scan; each scan applies only what changed.
    current: Snapshot,
    metrics: Arc<Metrics>,
    /// Bytes of all files together that are read (`MAX_MANIFESTS_TOTAL_BYTES`).
    budget: u64,
    /// Files refused for the budget: read again once they fit.
    over_budget: HashSet<FileName>,
    /// Refused files holding AuthorizationPolicies that are not in force
    /// from a last good version: the namespaces they name. What such a
    /// policy guards would be open, so those namespaces are sealed.
    unguarded: BTreeMap<FileName, Unguarded>,
    /// Each `--manifests` directory a scan found with no manifest file left
    /// while some held objects, and when: they stay `MANIFEST_EMPTY_GRACE`
    /// from then.
    emptied_dirs: HashMap<PathBuf, std::time::Instant>,
    /// Each file a scan found emptied while it held objects: its stamp
    /// then, and when this controller first saw that version (by its own
    /// steady clock: the file's mtime is the writer's, which may be minutes
    /// off, and would drop every policy of the file at once).
    emptied_files: HashMap<FileName, (Stamp, std::time::Instant)>,
}

type Parsed = Result<Vec<Object>, Vec<ParseError>>;

fn read_and_parse(path: &Path) -> Parsed {
    read(path)
        .map_err(|e| vec![ParseError::Io(e)])
        .and_then(|text| parse_file(&text))
}

/// A manifest's text: a regular file (or a link to one) of bounded size.
fn read(path: &Path) -> Result<String, String> {
    let text = String::from_utf8(read_bytes(path)?)
        .map_err(|e| format!("not UTF-8 ({e}): save it as UTF-8"))?;
    // A byte-order mark (Windows editors write one) is not YAML's to read.
    match text.strip_prefix('\u{feff}') {
        Some(rest) => Ok(rest.to_string()),
        None => Ok(text),
    }
}

/// A refused file's text as well as it can be read, for the policies it
/// would hold: UTF-16 with its byte-order mark (PowerShell 5's `>`), or
/// UTF-8 with what is not replaced (a Windows editor's accented comment).
fn read_lossy(path: &Path) -> Result<String, String> {
    let bytes = read_bytes(path)?;
    let utf16 = |b: &[u8], of: fn([u8; 2]) -> u16| {
        let units: Vec<u16> = b.chunks_exact(2).map(|c| of([c[0], c[1]])).collect();
        String::from_utf16_lossy(&units)
    };
    Ok(match bytes.as_slice() {
        [0xff, 0xfe, rest @ ..] => utf16(rest, u16::from_le_bytes),
        [0xfe, 0xff, rest @ ..] => utf16(rest, u16::from_be_bytes),
        _ => String::from_utf8_lossy(&bytes).into_owned(),
    })
}

/// A manifest's bytes: a regular file (or a link to one) of bounded size.
fn read_bytes(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let max = defaults::MAX_MANIFEST_BYTES;
    if meta.len() > max {
        return Err(format!(
            "{} bytes, more than the {max} a manifest may hold",
            meta.len()
        ));
    }
    // Sized once from the file's length: grown by doubling, a large file
    // left its copies behind in the reading thread's malloc arena, tens of
    // MiB of resident memory for one refused 3 MB file.
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0) + 1);
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > max {
        return Err(format!("more than the {max} bytes a manifest may hold"));
    }
    Ok(bytes)
}

/// Parses files on every core: the first load of a large mesh is mostly YAML.
/// Each thread takes the next file as it finishes one, so a few large files
/// (a namespace's Pods) do not leave the other cores idle.
fn parse_all(paths: &[FileName]) -> Vec<Parsed> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(paths.len().max(1));
    if threads <= 1 || paths.len() < 4 {
        return paths.iter().map(|p| read_and_parse(p)).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut parsed: Vec<(usize, Parsed)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(p) = paths.get(i) else { break };
                        mine.push((i, read_and_parse(p)));
                    }
                    mine
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    parsed.sort_by_key(|(i, _)| *i);
    // A parser thread that panicked lost its files: they are errors, in place.
    let mut out: Vec<Parsed> = Vec::with_capacity(paths.len());
    let mut it = parsed.into_iter().peekable();
    for i in 0..paths.len() {
        match it.next_if(|(j, _)| *j == i) {
            Some((_, p)) => out.push(p),
            None => out.push(Err(vec![ParseError::Io("parser thread panicked".into())])),
        }
    }
    out
}

impl ManifestSource {
    /// Whether a file's new content is "nothing" while it held objects, and
    /// this version was first seen a moment ago: likely a file being
    /// rewritten in place (`> file`, then the writer's output). Applied only
    /// once it has stayed empty a while.
    fn emptied_just_now(&mut self, path: &FileName, objects: &[Object], stamp: &Stamp) -> bool {
        let held = self.files.get(path).is_some_and(|o| !o.ids.is_empty());
        if !objects.is_empty() || !held {
            self.emptied_files.remove(path);
            return false;
        }
        let (seen, since) = self
            .emptied_files
            .entry(path.clone())
            .or_insert_with(|| (stamp.clone(), std::time::Instant::now()));
        if seen != stamp {
            *seen = stamp.clone();
            *since = std::time::Instant::now();
        }
        let waiting = since.elapsed() < defaults::MANIFEST_EMPTY_GRACE;
        if !waiting {
            self.emptied_files.remove(path);
        }
        waiting
    }

    /// The `--manifests` directories with no manifest file left (`paths`)
    /// while some held objects, since a moment ago: a directory being
    /// regenerated (`rm *.yaml`, then kustomize or helm template writing it
    /// again, a `git checkout`), whose objects (every policy of a policies
    /// directory) stay in force until it has stayed empty a while, as an
    /// emptied file's do, or a file is back in it.
    fn dirs_emptied_a_moment_ago(&mut self, paths: &[PathBuf]) -> Vec<PathBuf> {
        let mut waiting = Vec::new();
        for dir in &self.dirs {
            // (Not files of a directory that cannot be read now: kept anyway.)
            let held = self.files.iter().any(|(p, f)| {
                !f.ids.is_empty()
                    && p.starts_with(dir)
                    && !self.unreadable.iter().any(|d| p.starts_with(d))
            });
            if !held || paths.iter().any(|p| p.starts_with(dir)) {
                self.emptied_dirs.remove(dir);
                continue;
            }
            let since = *self.emptied_dirs.entry(dir.clone()).or_insert_with(|| {
                warn!(
                    dir = %dir.display(),
                    "every manifest file of the directory is gone; their objects stay in force for {:?} in case they are being written again",
                    defaults::MANIFEST_EMPTY_GRACE
                );
                std::time::Instant::now()
            });
            if since.elapsed() < defaults::MANIFEST_EMPTY_GRACE {
                waiting.push(dir.clone());
            }
        }
        waiting
    }

    /// Manifest files read (refused ones included).
    pub fn file_count(&self) -> usize {
        self.files.len()
    }

    /// A source over the YAML files of every directory in `dirs`, read as one set.
    pub fn new(dirs: Vec<PathBuf>, trust_domain: &str, metrics: Arc<Metrics>) -> Self {
        ManifestSource {
            dirs,
            files: BTreeMap::new(),
            owners: HashMap::new(),
            unsettled: HashSet::new(),
            unreadable: Vec::new(),
            held: HashMap::new(),
            current: Snapshot::empty(trust_domain),
            metrics,
            budget: defaults::MAX_MANIFESTS_TOTAL_BYTES,
            over_budget: HashSet::new(),
            unguarded: BTreeMap::new(),
            emptied_dirs: HashMap::new(),
            emptied_files: HashMap::new(),
        }
    }

    #[cfg(test)]
    fn with_budget(mut self, bytes: u64) -> Self {
        self.budget = bytes;
        self
    }

    /// Re-reads changed files and applies only what they changed; returns a new
    /// snapshot when anything did.
    pub fn scan(&mut self) -> Option<Snapshot> {
        let mut paths = Vec::new();
        let mut unreadable = Vec::new();
        let mut visited = HashSet::new();
        for dir in &self.dirs {
            if let Err(e) = list_yaml(dir, &mut paths, &mut unreadable, &mut visited) {
                // Unreadable now, perhaps back later: its files' objects stay in force.
                warn!(dir = %dir.display(), error = %e, "cannot read manifests directory");
                self.unreadable = vec![dir.clone()];
                return None;
            }
        }
        for dir in unreadable.iter().filter(|d| !self.unreadable.contains(d)) {
            warn!(dir = %dir.display(), "cannot read manifests subdirectory; its files stay as they were");
        }
        self.unreadable = unreadable;
        paths.sort();
        paths.dedup();
        let waiting = self.dirs_emptied_a_moment_ago(&paths);
        let mut todo = Vec::new();
        let mut over_budget = Vec::new();
        let mut total: u64 = 0;
        for path in &paths {
            let Ok(meta) = std::fs::metadata(path) else {
                continue;
            };
            let stamp = Stamp::of(&meta);
            // In path order: the files that fit keep loading as before; a file
            // refused for the budget takes none of it, so one stray large file
            // holds up no other.
            let name = FileName::from(path.as_path());
            let fits = total.saturating_add(meta.len()) <= self.budget;
            if fits {
                total += meta.len();
            }
            let changed = self
                .files
                .get(path.as_path())
                .is_none_or(|f| f.stamp != stamp);
            if fits && (changed || self.over_budget.remove(&name)) {
                todo.push((name, stamp));
            } else if !fits && changed {
                self.over_budget.insert(name.clone());
                over_budget.push((name, stamp));
            }
        }
        // Files gone are not waited for.
        self.over_budget
            .retain(|f| paths.binary_search_by(|q| q.as_path().cmp(f)).is_ok());
        let mut changed = self.current.version == 0;
        let mut touched: HashSet<ObjId> = HashSet::new();
        let mut claimed: Vec<ObjId> = Vec::new();
        let mut fresh: HashMap<FileName, Vec<Object>> = HashMap::new();
        let to_parse: Vec<FileName> = todo.iter().map(|(p, _)| p.clone()).collect();
        let mut candidates = Vec::new();
        for ((path, stamp), parsed) in todo.into_iter().zip(parse_all(&to_parse)) {
            // Written to while we read it: what we read may be half of it. The
            // write's own event (or the next rescan) brings it back.
            if std::fs::metadata(&path).map(|m| Stamp::of(&m)).ok() != Some(stamp.clone()) {
                debug!(file = %path.display(), "manifest changed while read; reading it again later");
                if !self.files.contains_key(&path) {
                    self.unsettled.insert(path);
                }
                continue;
            }
            candidates.push(Candidate {
                path,
                stamp,
                parsed,
                retried: false,
                held: None,
            });
        }
        for (path, stamp) in over_budget {
            let len = stamp.len;
            candidates.push(Candidate {
                path,
                stamp,
                parsed: Err(vec![ParseError::OverBudget {
                    total: total + len,
                    max: self.budget,
                }]),
                retried: false,
                held: None,
            });
        }
        let read: HashSet<&FileName> = to_parse.iter().collect();
        for (path, held) in std::mem::take(&mut self.held) {
            if read.contains(&path) {
                continue;
            }
            if paths.binary_search_by(|q| q.as_path().cmp(&path)).is_err() {
                // Gone, or in a directory that cannot be read now: only the
                // latter comes back unchanged.
                if self.unreadable.iter().any(|d| path.starts_with(d)) {
                    self.held.insert(path, held);
                }
                continue;
            }
            candidates.push(Candidate {
                path,
                stamp: held.stamp,
                parsed: Ok(held.objects),
                retried: true,
                held: None,
            });
        }
        self.check_references(&mut candidates);
        for Candidate {
            path,
            stamp,
            parsed,
            retried,
            held,
        } in candidates
        {
            match parsed {
                Ok(objects) if self.emptied_just_now(&path, &objects, &stamp) => {
                    debug!(file = %path.display(), "manifest emptied; applied if it stays empty");
                }
                Ok(objects) => {
                    match self.files.get(&path) {
                        Some(old) if objects.is_empty() && !old.ids.is_empty() => warn!(
                            file = %path.display(),
                            removed = old.ids.len(),
                            "manifest stayed empty; its objects are removed"
                        ),
                        _ => {
                            info!(file = %path.display(), objects = objects.len(), "manifest loaded")
                        }
                    }
                    self.unsettled.remove(&path);
                    self.unguarded.remove(&path);
                    if let Some(old) = self.files.remove(&path) {
                        self.disown(&path, &old.ids, &mut touched);
                    }
                    let ids: Vec<ObjId> = objects.iter().filter_map(Object::id).collect();
                    self.own(&path, &ids, &mut touched);
                    claimed.extend(ids.iter().cloned());
                    self.files.insert(path.clone(), FileState { stamp, ids });
                    fresh.insert(path, objects);
                    changed = true;
                }
                Err(errors) => {
                    if retried {
                        debug!(file = %path.display(), errors = errors.len(), "manifest still names Services that do not exist");
                    } else {
                        for e in &errors {
                            error!(file = %path.display(), error = %e, "manifest rejected; its last good objects stay in force");
                        }
                        self.metrics.reload_errors.inc();
                    }
                    self.unsettled.insert(path.clone());
                    // Read again only when the file changed: a held one (a
                    // route to a Service still missing) comes back every
                    // scan, and is up to 64 MiB of YAML to parse again.
                    if !retried {
                        let last_good = self.files.get(&path).map_or(&[][..], |f| &f.ids[..]);
                        let unguarded = read_lossy(&path)
                            .map(|text| unguarded_policies(&text, last_good))
                            .unwrap_or_default();
                        if unguarded.is_empty() {
                            self.unguarded.remove(&path);
                        } else {
                            self.unguarded.insert(path.clone(), unguarded);
                        }
                    }
                    if let Some(objects) = held {
                        self.held.insert(
                            path.clone(),
                            Held {
                                stamp: stamp.clone(),
                                objects,
                            },
                        );
                    }
                    // Remember the stamp so the same broken file is reported once.
                    match self.files.get_mut(&path) {
                        Some(f) => f.stamp = stamp,
                        None => {
                            self.files.insert(
                                path,
                                FileState {
                                    stamp,
                                    ids: Vec::new(),
                                },
                            );
                        }
                    }
                }
            }
        }
        let gone: Vec<FileName> = self
            .files
            .keys()
            .chain(&self.unsettled)
            .filter(|p| paths.binary_search_by(|q| q.as_path().cmp(p)).is_err())
            .filter(|p| !self.unreadable.iter().any(|d| p.starts_with(d)))
            .filter(|p| !waiting.iter().any(|d| p.starts_with(d)))
            .cloned()
            .collect();
        for path in gone {
            self.unsettled.remove(&path);
            self.unguarded.remove(&path);
            self.emptied_files.remove(&path);
            if let Some(old) = self.files.remove(&path) {
                info!(file = %path.display(), "manifest removed");
                self.disown(&path, &old.ids, &mut touched);
                changed = true;
            }
        }
        // Once this scan's removals are done: a file renamed, or an object
        // moved from one file to another, is not defined twice.
        self.report_conflicts(&claimed);
        self.apply(touched, fresh);
        // After this scan's files are applied and removed: a policy is in
        // force if some file's accepted version defines it now.
        let sealed: BTreeSet<String> = self
            .unguarded
            .values()
            .flat_map(|u| u.sealed(&self.owners))
            .collect();
        if sealed != self.current.sealed_namespaces {
            if !sealed.is_empty() {
                warn!(files = ?self.unguarded.keys().map(|f| f.display().to_string()).collect::<Vec<_>>(), namespaces = ?sealed, "refused files hold AuthorizationPolicies that are not in force: every pod of their namespaces refuses every caller until the files are fixed or removed");
            }
            self.current.sealed_namespaces = sealed;
            changed = true;
        }
        if !changed {
            return None;
        }
        self.current.version += 1;
        self.current.built = tokio::time::Instant::now();
        Some(self.current.clone())
    }

    /// Whether, as of the last scan, every directory read and every file's current
    /// content was accepted. A controller that
    /// starts on broken files has no last good state for them (a policy among
    /// them would silently be missing), so it serves only once this is true.
    pub fn is_clean(&self) -> bool {
        self.unsettled.is_empty() && self.unreadable.is_empty()
    }

    /// Refuses the candidates that bring an HTTPRoute, new or changed, whose
    /// backendRefs name a Service (or a Service port) that will not be in the
    /// index. A Service counts when the index holds it or an accepted candidate
    /// defines it; refusing a file takes its Services away, so this runs until
    /// nothing more is refused. A Service removed in this same scan still counts:
    /// that is a Service deleted after the route, which the route outlives.
    fn check_references(&self, candidates: &mut [Candidate]) {
        loop {
            let mut refused = Vec::new();
            {
                let defined: HashMap<&ObjKey, &ServiceInfo> = candidates
                    .iter()
                    .filter_map(|c| c.parsed.as_ref().ok())
                    .flatten()
                    .filter_map(|o| match o {
                        Object::Service(k, s) => Some((k, s)),
                        _ => None,
                    })
                    .collect();
                let service = |k: &ObjKey| {
                    defined
                        .get(k)
                        .copied()
                        .or_else(|| self.current.services.get(k))
                };
                for (i, c) in candidates.iter().enumerate() {
                    let Ok(objects) = &c.parsed else { continue };
                    let errors: Vec<ParseError> = objects
                        .iter()
                        .filter_map(|o| match o {
                            // A route in force as it is was accepted already;
                            // its Service may have gone since.
                            Object::Route(k, r) if self.current.routes.get(k) != Some(r) => {
                                Some((k, r))
                            }
                            _ => None,
                        })
                        .flat_map(|(k, r)| {
                            r.unresolved(service)
                                .into_iter()
                                .map(|error| ParseError::Reference {
                                    route: k.clone(),
                                    error,
                                })
                        })
                        .collect();
                    if !errors.is_empty() {
                        refused.push((i, errors));
                    }
                }
            }
            if refused.is_empty() {
                return;
            }
            for (i, errors) in refused {
                let c = &mut candidates[i];
                if let Ok(objects) = std::mem::replace(&mut c.parsed, Err(errors)) {
                    c.held = Some(objects);
                }
            }
        }
    }

    fn disown(&mut self, path: &FileName, ids: &[ObjId], touched: &mut HashSet<ObjId>) {
        for id in ids {
            if let Some(files) = self.owners.get_mut(id) {
                files.retain(|f| f != path);
                if files.is_empty() {
                    self.owners.remove(id);
                }
            }
            touched.insert(id.clone());
        }
    }

    fn own(&mut self, path: &FileName, ids: &[ObjId], touched: &mut HashSet<ObjId>) {
        for id in ids {
            let files = self.owners.entry(id.clone()).or_default();
            if let Err(at) = files.binary_search(path) {
                files.insert(at, path.clone());
            }
            touched.insert(id.clone());
        }
    }

    /// Objects a file of this scan defines that another file defines too.
    fn report_conflicts(&self, claimed: &[ObjId]) {
        let mut conflicts = 0;
        let mut told = HashSet::new();
        for id in claimed {
            let Some(files) = self.owners.get(id).filter(|f| f.len() > 1) else {
                continue;
            };
            if !told.insert(id) {
                continue;
            }
            conflicts += 1;
            error!(
                object = %id,
                files = ?files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
                "object defined in more than one file; the first one's definition is used"
            );
        }
        if conflicts > 0 {
            self.metrics.reload_errors.inc();
        }
    }

    /// Brings every touched object in the index in line with the file that now
    /// defines it: the first of its files (by path) whose definition can be read.
    /// `fresh` holds the objects of the files read in this scan; other files are
    /// read again when needed (the second of two definitions, when the first went
    /// away or is broken). An object no readable file defines any more, though
    /// some file did, keeps its last state.
    fn apply(&mut self, mut touched: HashSet<ObjId>, fresh: HashMap<FileName, Vec<Object>>) {
        // Most objects come from a file read in this scan that defines them first:
        // they are moved into the index (a first load holds no second copy). What
        // is left may still be the definition in force of an object whose first
        // file failed.
        let mut left: HashMap<FileName, Vec<Object>> = HashMap::new();
        for (path, objects) in fresh {
            let mut rest = Vec::new();
            for o in objects {
                let Some(id) = o.id() else { continue };
                if self.owners.get(&id).and_then(|f| f.first()) == Some(&path)
                    && touched.remove(&id)
                {
                    id.remove_from(&mut self.current);
                    o.insert_into(&mut self.current);
                } else {
                    rest.push(o);
                }
            }
            left.insert(path, rest);
        }
        // The rest: gone for good, or now defined by another file.
        let mut defs: HashMap<FileName, Option<HashMap<ObjId, Object>>> = HashMap::new();
        for id in touched {
            let owners = self.owners.get(&id).cloned().unwrap_or_default();
            if owners.is_empty() {
                id.remove_from(&mut self.current);
                continue;
            }
            let mut found = None;
            for f in &owners {
                // Refused as it is now (for a route to a missing Service, or
                // the budget, though it parses): none of that is applied.
                if self.unsettled.contains(f) {
                    continue;
                }
                let d = defs.entry(f.clone()).or_insert_with(|| {
                    let objects = match left.get(f) {
                        Some(o) => o.clone(),
                        None => match read_and_parse(f) {
                            Ok(o) => o,
                            Err(errors) => {
                                warn!(file = %f.display(), errors = errors.len(), "cannot read again a file that defines objects; trying their other definitions");
                                return None;
                            }
                        },
                    };
                    Some(
                        objects
                            .into_iter()
                            .filter_map(|o| o.id().map(|id| (id, o)))
                            .collect(),
                    )
                });
                if d.as_ref().is_some_and(|m| m.contains_key(&id)) {
                    found = Some(f.clone());
                    break;
                }
            }
            let found = found.and_then(|f| defs.get(&f)?.as_ref()?.get(&id));
            match found {
                Some(o) => {
                    id.remove_from(&mut self.current);
                    o.add_to(&mut self.current);
                }
                None => {
                    warn!(object = %id, "no file that defines this object reads now; its last state stays in force")
                }
            }
        }
    }

    /// Rescans on every change the filesystem reports (once the burst of writes
    /// is over) and every `MANIFEST_SCAN_INTERVAL`, publishing each new snapshot.
    async fn watch_files(self, tx: watch::Sender<Arc<Snapshot>>, clean: watch::Sender<bool>) {
        let (ev_tx, mut events) = tokio::sync::mpsc::channel::<()>(1);
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            // Reads are not changes: our own scans open every directory, and
            // reporting that would rescan for ever.
            if res.is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_))) {
                let _ = ev_tx.try_send(());
            }
        })
        .and_then(|mut w| {
            for dir in &self.dirs {
                notify::Watcher::watch(&mut w, dir, notify::RecursiveMode::Recursive)?;
            }
            Ok(w)
        });
        let _watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                warn!(error = %e, "cannot watch manifests for changes; rescanning every second");
                None
            }
        };
        let mut tick = tokio::time::interval(defaults::MANIFEST_SCAN_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut source = self;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                Some(()) = events.recv() => {
                    // Debounced on the trailing edge: wait until writes stop, but not
                    // for ever (a file written without pause somewhere in the tree).
                    let give_up = tokio::time::Instant::now() + defaults::MANIFEST_DEBOUNCE_MAX;
                    while tokio::time::Instant::now() < give_up
                        && let Ok(Some(())) =
                            tokio::time::timeout(defaults::MANIFEST_DEBOUNCE, events.recv()).await
                    {}
                }
            }
            // Reading and parsing is blocking work; keep it off the runtime.
            let started = std::time::SystemTime::now();
            let errors_before = source.metrics.reload_errors.get();
            let scanned = tokio::task::spawn_blocking(move || {
                let snap = source.scan();
                (source, snap)
            })
            .await;
            let snap;
            (source, snap) = match scanned {
                Ok(r) => r,
                Err(e) => {
                    // Better restarted (and re-read from scratch) than serving a
                    // mesh that silently stopped following its manifests.
                    error!(error = %e, "manifest reader failed; exiting");
                    std::process::exit(70);
                }
            };
            clean.send_if_modified(|c| std::mem::replace(c, source.is_clean()) != *c);
            let refused = source.metrics.reload_errors.get() - errors_before;
            if snap.is_some() || refused > 0 {
                use opentelemetry::KeyValue;
                let mut attrs = vec![KeyValue::new(
                    "strait.manifests.refused_files",
                    refused as i64,
                )];
                if let Some(s) = &snap {
                    attrs.extend([
                        KeyValue::new("strait.index.version", s.version as i64),
                        KeyValue::new("strait.index.services", s.services.len() as i64),
                        KeyValue::new("strait.index.endpoints", s.endpoint_count() as i64),
                        KeyValue::new("strait.index.pods", s.pods.len() as i64),
                    ]);
                }
                let error = (refused > 0).then(|| format!("{refused} file(s) refused"));
                crate::spans::record("manifests.reload", started, attrs, error);
            }
            if let Some(s) = snap {
                source.metrics.observe_snapshot(&s);
                info!(
                    version = s.version,
                    services = s.services.len(),
                    endpoints = s.endpoint_count(),
                    pods = s.pods.len(),
                    "index updated"
                );
                tx.send_replace(Arc::new(s));
            }
        }
    }
}

/// Every manifest under `dir`. Hidden entries are skipped (a ConfigMap volume's
/// `..data` and timestamped folders, which would list every file three times);
/// links are followed (a ConfigMap's nested paths are links to folders), each
/// folder once. A subdirectory that cannot be read is noted in `unreadable`, its
/// files neither read nor taken for gone; the top directory's error is returned.
fn list_yaml(
    dir: &Path,
    out: &mut Vec<PathBuf>,
    unreadable: &mut Vec<PathBuf>,
    visited: &mut HashSet<PathBuf>,
) -> std::io::Result<()> {
    if !visited.insert(std::fs::canonicalize(dir)?) {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        if path.is_dir() {
            // An ext filesystem's own, root's only, at the top of a volume
            // given whole (a PVC): never manifests, and unreadable it would
            // keep the controller from ever starting.
            if name == "lost+found" {
                continue;
            }
            if let Err(e) = list_yaml(&path, out, unreadable, visited) {
                // Said once by `scan`, not at every rescan.
                debug!(dir = %path.display(), error = %e, "cannot read manifests subdirectory");
                unreadable.push(path);
            }
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) && path.is_file()
        {
            out.push(path);
        }
    }
    Ok(())
}

/// What a refused file holds of AuthorizationPolicies: those it defines (by
/// namespace and name), and for text YAML cannot read, the namespaces it
/// seems to hold policies in.
#[derive(Debug, Default)]
struct Unguarded {
    policies: Vec<ObjKey>,
    guessed: BTreeSet<String>,
}

impl Unguarded {
    fn is_empty(&self) -> bool {
        self.policies.is_empty() && self.guessed.is_empty()
    }

    /// The namespaces to seal: of the policies no file keeps in force (some
    /// file's accepted version defines them), and those guessed.
    fn sealed<'a>(
        &'a self,
        owners: &'a HashMap<ObjId, Vec<FileName>>,
    ) -> impl Iterator<Item = String> + 'a {
        self.policies
            .iter()
            .filter(|k| !owners.contains_key(&ObjId::Authorization((*k).clone())))
            .map(|k| k.namespace.clone())
            .chain(self.guessed.iter().cloned())
    }
}

/// The AuthorizationPolicies a refused file's text holds. Text YAML cannot
/// read still says which namespaces it holds policies in, when a line of it
/// says it holds one and none of its last good objects (`last_good`) is a
/// policy, which would stand in for them.
fn unguarded_policies(text: &str, last_good: &[ObjId]) -> Unguarded {
    fn collect(v: &serde_json::Value, out: &mut Vec<ObjKey>) {
        let kind = v["kind"].as_str().unwrap_or_default();
        if let Some(items) = v["items"].as_array().filter(|_| kind.ends_with("List")) {
            items.iter().for_each(|i| collect(i, out));
        } else if kind == "AuthorizationPolicy" {
            out.push(ObjKey {
                namespace: v["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("default")
                    .to_string(),
                name: v["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            });
        }
    }
    let mut out = Unguarded::default();
    let mut unreadable = false;
    // Within the budget the file itself was read with (a file refused for
    // its aliases would take the controller's memory here otherwise), but
    // taking what it refused for: a key written twice, a merge key.
    for read in parse::json_documents(text, parse::Reading::Lenient) {
        match read {
            Ok(v) => collect(&v, &mut out.policies),
            Err(_) => {
                unreadable = true;
                break;
            }
        }
    }
    let had_policies = last_good
        .iter()
        .any(|id| matches!(id, ObjId::Authorization(_)));
    if unreadable && !had_policies {
        out.guessed = guessed_policy_namespaces(text);
    }
    out
}

/// The namespaces of the policies in text YAML cannot read, document by
/// document (split at `---`): one with a `kind: AuthorizationPolicy` (not in
/// a comment) is a policy, in the namespace its metadata names, or
/// `default`. A namespace elsewhere (an allow entry's) does not count.
fn guessed_policy_namespaces(text: &str) -> BTreeSet<String> {
    fn value_of<'a>(line: &'a str, key: &str) -> Option<&'a str> {
        let at = line.find(key)?;
        let rest = line[at + key.len()..]
            .trim_start_matches(['"', '\''])
            .trim_start()
            .strip_prefix(':')?;
        let end = rest.find([',', '}', '#']).unwrap_or(rest.len());
        Some(rest[..end].trim().trim_matches(['"', '\'']))
    }
    let code = |l: &str| l.split('#').next().unwrap_or_default().to_string();
    let mut out = BTreeSet::new();
    let mut docs: Vec<Vec<String>> = vec![Vec::new()];
    for line in text.lines() {
        if line.starts_with("---") {
            docs.push(Vec::new());
        } else if let Some(d) = docs.last_mut() {
            d.push(code(line));
        }
    }
    for doc in docs {
        let policy = doc
            .iter()
            .any(|l| value_of(l, "kind").is_some_and(|k| k == "AuthorizationPolicy"));
        if !policy {
            continue;
        }
        let mut namespace = None;
        let mut metadata: Option<usize> = None;
        for line in &doc {
            let indent = line.len() - line.trim_start().len();
            let trimmed = line.trim_start().trim_start_matches(['{', '-', ' ']);
            // Flow style, on the metadata's line: `metadata: {namespace: shop}`.
            if let Some(at) = line.find("metadata") {
                metadata = Some(indent);
                if let Some(ns) = value_of(&line[at..], "namespace").filter(|n| !n.is_empty()) {
                    namespace = Some(ns.to_string());
                    break;
                }
                continue;
            }
            match metadata {
                Some(m) if indent > m && !trimmed.is_empty() => {
                    let key = trimmed.trim_start_matches(['"', '\'']);
                    if key.starts_with("namespace")
                        && let Some(ns) = value_of(trimmed, "namespace").filter(|n| !n.is_empty())
                    {
                        namespace = Some(ns.to_string());
                        break;
                    }
                }
                Some(_) if !trimmed.is_empty() => metadata = None,
                _ => {}
            }
        }
        out.insert(namespace.unwrap_or_else(|| "default".to_string()));
    }
    out
}

impl crate::source::Source for ManifestSource {
    async fn run(self, tx: watch::Sender<Arc<Snapshot>>, clean: watch::Sender<bool>) {
        self.watch_files(tx, clean).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: a}\nspec: {clusterIP: 10.96.0.1, ports: [{name: http, port: 80}]}\n";

    fn slice(addr: &str) -> String {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, namespace: a, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: [\"{addr}\"]}}]\n"
        )
    }

    fn addrs(s: &Snapshot) -> Vec<String> {
        s.slices
            .values()
            .flat_map(|m| m.values().cloned().collect::<Vec<_>>())
            .flat_map(|sl| sl.endpoints.into_iter().map(|e| e.addr.to_string()))
            .collect()
    }

    #[test]
    fn changes_apply_per_file_and_broken_files_keep_their_last_good_objects() {
        let dir = temp_dir("scan");
        std::fs::write(dir.join("svc.yaml"), SVC).unwrap();
        std::fs::write(dir.join("slice.yaml"), slice("10.0.0.1")).unwrap();
        let metrics = Metrics::new();
        let mut src = ManifestSource::new(vec![dir.clone()], "cluster.local", metrics.clone());
        let s1 = src.scan().unwrap();
        assert_eq!(
            (s1.version, s1.services.len(), addrs(&s1)),
            (1, 1, vec!["10.0.0.1".to_string()])
        );
        assert!(src.scan().is_none(), "nothing changed");

        // A replaced endpoint: the old one is gone, not merged.
        std::fs::write(dir.join("slice.yaml"), slice("10.0.0.22")).unwrap();
        let s2 = src.scan().unwrap();
        assert_eq!(addrs(&s2), vec!["10.0.0.22".to_string()]);
        assert_eq!(
            addrs(&s1),
            vec!["10.0.0.1".to_string()],
            "earlier snapshots are untouched"
        );

        // A broken edit changes nothing and is counted.
        std::fs::write(dir.join("slice.yaml"), slice("not-an-ip")).unwrap();
        assert!(src.scan().is_none());
        assert_eq!(metrics.reload_errors.get(), 1);

        // A removed file takes its objects with it.
        std::fs::remove_file(dir.join("svc.yaml")).unwrap();
        let s3 = src.scan().unwrap();
        assert!(s3.services.is_empty() && s3.by_cluster_ip.is_empty());
        assert_eq!(addrs(&s3), vec!["10.0.0.22".to_string()]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("strait-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn source(dir: &Path) -> ManifestSource {
        ManifestSource::new(vec![dir.to_path_buf()], "cluster.local", Metrics::new())
    }

    /// A policy that cannot be loaded and has no good version in force (a
    /// new file, or moved from a good file into a broken one) closes its
    /// namespace while the controller runs, as at start, where the
    /// controller waits for clean files: what it guards would be open.
    #[test]
    fn a_refused_policy_with_nothing_in_force_seals_its_namespace() {
        let dir = temp_dir("seal");
        let policy = |mtls: &str| {
            format!(
                "apiVersion: policy.strait.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: lock, namespace: shop}}\nspec: {{selector: {{matchLabels: {{app: web}}}}, mtls: {mtls}}}\n"
            )
        };
        std::fs::write(dir.join("svc.yaml"), SVC).unwrap();
        let mut src = source(&dir);
        assert!(src.scan().unwrap().sealed_namespaces.is_empty());
        // A new file whose policy does not validate.
        std::fs::write(dir.join("lock.yaml"), policy("strict")).unwrap();
        let s = src.scan().unwrap();
        assert_eq!(s.sealed_namespaces.iter().collect::<Vec<_>>(), ["shop"]);
        // Fixed: in force, and the namespace open to it again.
        std::fs::write(dir.join("lock.yaml"), policy("STRICT")).unwrap();
        let s = src.scan().unwrap();
        assert!(s.sealed_namespaces.is_empty() && s.authorizations.len() == 1);
        // Broken again while its last good version is in force: that stands.
        std::fs::write(
            dir.join("lock.yaml"),
            format!("{}  bogus: 1\n", policy("STRICT")),
        )
        .unwrap();
        assert!(src.scan().is_none());
        // Moved, broken, into another file while the first goes, in one scan:
        // nothing keeps it in force any more.
        std::fs::write(dir.join("moved.yaml"), policy("strict")).unwrap();
        std::fs::remove_file(dir.join("lock.yaml")).unwrap();
        let s = src.scan().unwrap();
        assert!(s.authorizations.is_empty());
        assert_eq!(s.sealed_namespaces.iter().collect::<Vec<_>>(), ["shop"]);
        std::fs::remove_file(dir.join("moved.yaml")).unwrap();
        assert!(src.scan().unwrap().sealed_namespaces.is_empty());
        // A file YAML cannot read, new, that mentions a policy: the
        // namespaces it names.
        std::fs::write(
            dir.join("new.yaml"),
            "kind: AuthorizationPolicy\nmetadata: {namespace: ops\n",
        )
        .unwrap();
        let s = src.scan().unwrap();
        assert_eq!(s.sealed_namespaces.iter().collect::<Vec<_>>(), ["ops"]);
        std::fs::remove_file(dir.join("new.yaml")).unwrap();
        assert!(src.scan().unwrap().sealed_namespaces.is_empty());
        // Not UTF-8 (a Windows editor's accented comment, PowerShell 5's
        // UTF-16): refused, and its policy seals its namespace all the same.
        let mut latin1 = policy("STRICT").into_bytes();
        latin1.extend_from_slice(b"# \xe9quipe\n");
        let mut utf16 = vec![0xff, 0xfe];
        utf16.extend(policy("STRICT").encode_utf16().flat_map(u16::to_le_bytes));
        for bytes in [latin1, utf16] {
            std::fs::write(dir.join("win.yaml"), bytes).unwrap();
            let s = src.scan().unwrap();
            assert!(s.authorizations.is_empty(), "refused");
            assert_eq!(s.sealed_namespaces.iter().collect::<Vec<_>>(), ["shop"]);
            std::fs::remove_file(dir.join("win.yaml")).unwrap();
            assert!(src.scan().unwrap().sealed_namespaces.is_empty());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_namespaces_of_policies_in_text_yaml_cannot_read_are_their_metadata_s() {
        let guess = |t: &str| guessed_policy_namespaces(t).into_iter().collect::<Vec<_>>();
        // A comment that names the kind holds no policy.
        assert!(
            guess("# no AuthorizationPolicy here\nkind: Service\nmetadata: {namespace: a\n")
                .is_empty()
        );
        assert_eq!(
            guess("kind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop\n"),
            ["shop"]
        );
        assert_eq!(
            guess(
                "{\"kind\": \"AuthorizationPolicy\",\n \"metadata\": {\n  \"namespace\": \"shop\",\n"
            ),
            ["shop"]
        );
        // Two policies, one namespace found: the other may be `default`'s.
        assert_eq!(
            guess(
                "kind: AuthorizationPolicy\nmetadata: {namespace: shop}\n---\nkind: AuthorizationPolicy\nmetadata: {name: q\n"
            ),
            ["default", "shop"]
        );
    }

    #[test]
    fn files_past_the_total_budget_are_refused_and_the_rest_load() {
        let dir = temp_dir("budget");
        std::fs::write(dir.join("a.yaml"), SVC).unwrap();
        let mut src = source(&dir).with_budget(SVC.len() as u64 + 10);
        assert_eq!(src.scan().unwrap().services.len(), 1);
        std::fs::write(dir.join("b.yaml"), SVC.replace("name: web", "name: api")).unwrap();
        assert!(src.scan().is_none(), "b.yaml is past the budget");
        assert!(!src.is_clean());
        assert_eq!(src.metrics.reload_errors.get(), 1);
        // Room made: it loads.
        std::fs::remove_file(dir.join("a.yaml")).unwrap();
        let s = src.scan().unwrap();
        assert!(s.services.keys().any(|k| k.name == "api"));
        // A stray large file refused for the budget holds up no other file.
        let big = format!("# {}\n", "x".repeat(4 * SVC.len()));
        std::fs::write(dir.join("0-big.yaml"), big).unwrap();
        std::fs::write(dir.join("c.yaml"), SVC.replace("name: web", "name: cart")).unwrap();
        std::fs::remove_file(dir.join("b.yaml")).unwrap();
        let s = src.scan().unwrap();
        assert!(s.services.keys().any(|k| k.name == "cart"));
    }

    #[test]
    fn a_renamed_file_or_a_moved_object_is_never_lost() {
        let dir = temp_dir("rename");
        std::fs::write(dir.join("svc.yaml"), SVC).unwrap();
        let mut src = source(&dir);
        assert_eq!(src.scan().unwrap().services.len(), 1);

        std::fs::create_dir(dir.join("shop")).unwrap();
        std::fs::rename(dir.join("svc.yaml"), dir.join("shop/web.yaml")).unwrap();
        let s = src.scan().unwrap();
        assert_eq!(
            s.services.len(),
            1,
            "the renamed file still defines the Service"
        );

        // One edit moves the Service from one file to another.
        std::fs::write(dir.join("other.yaml"), SVC).unwrap();
        std::fs::write(dir.join("shop/web.yaml"), slice("10.0.0.1")).unwrap();
        let s = src.scan().unwrap();
        assert_eq!((s.services.len(), addrs(&s).len()), (1, 1));
        // Neither was an object defined twice.
        assert_eq!(src.metrics.reload_errors.get(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A file saved with a byte-order mark (Windows editors) reads as any.
    #[test]
    fn a_byte_order_mark_is_not_read_as_yaml() {
        let dir = temp_dir("bom");
        std::fs::write(dir.join("svc.yaml"), format!("\u{feff}{SVC}")).unwrap();
        let mut src = source(&dir);
        assert_eq!(src.scan().unwrap().services.len(), 1);
        assert!(src.is_clean());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_object_in_two_files_stays_until_both_are_gone() {
        let dir = temp_dir("dup");
        std::fs::write(dir.join("a.yaml"), SVC).unwrap();
        std::fs::write(dir.join("b.yaml"), SVC.replace("10.96.0.1", "10.96.0.2")).unwrap();
        let mut src = source(&dir);
        let s = src.scan().unwrap();
        assert_eq!(s.services.len(), 1);
        assert!(
            s.by_cluster_ip
                .contains_key(&"10.96.0.1".parse::<std::net::IpAddr>().unwrap()),
            "the first file's definition is in force"
        );
        assert_eq!(
            src.metrics.reload_errors.get(),
            1,
            "the conflict is reported"
        );
        std::fs::remove_file(dir.join("a.yaml")).unwrap();
        let s = src.scan().unwrap();
        assert_eq!(s.services.len(), 1);
        assert!(
            s.by_cluster_ip
                .contains_key(&"10.96.0.2".parse::<std::net::IpAddr>().unwrap())
        );
        std::fs::remove_file(dir.join("b.yaml")).unwrap();
        // The last file gone: after a while (see below).
        assert!(src.scan().is_none());
        for t in src.emptied_dirs.values_mut() {
            *t = std::time::Instant::now() - defaults::MANIFEST_EMPTY_GRACE * 2;
        }
        assert!(src.scan().unwrap().services.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_configmap_volume_is_read_once_and_survives_its_updates() {
        // Kubernetes' layout: ..<timestamp>/file, ..data -> ..<timestamp>,
        // file -> ..data/file; an update swaps ..data and removes the old folder.
        let dir = temp_dir("configmap");
        std::fs::create_dir_all(dir.join("..2024_01/nested")).unwrap();
        std::fs::write(dir.join("..2024_01/svc.yaml"), SVC).unwrap();
        std::fs::write(dir.join("..2024_01/nested/slice.yaml"), slice("10.0.0.1")).unwrap();
        std::os::unix::fs::symlink("..2024_01", dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/svc.yaml", dir.join("svc.yaml")).unwrap();
        // An item with a nested path is a link to a folder.
        std::os::unix::fs::symlink("..data/nested", dir.join("nested")).unwrap();
        let mut src = source(&dir);
        let s = src.scan().unwrap();
        assert_eq!((s.services.len(), src.metrics.reload_errors.get()), (1, 0));
        assert_eq!(addrs(&s), vec!["10.0.0.1".to_string()]);

        std::fs::create_dir_all(dir.join("..2024_02/nested")).unwrap();
        std::fs::write(
            dir.join("..2024_02/svc.yaml"),
            SVC.replace("10.96.0.1", "10.96.0.9"),
        )
        .unwrap();
        std::fs::write(dir.join("..2024_02/nested/slice.yaml"), slice("10.0.0.1")).unwrap();
        std::os::unix::fs::symlink("..2024_02", dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        std::fs::remove_dir_all(dir.join("..2024_01")).unwrap();
        let s = src.scan().unwrap();
        assert_eq!(s.services.len(), 1);
        assert!(
            s.by_cluster_ip
                .contains_key(&"10.96.0.9".parse::<std::net::IpAddr>().unwrap())
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Every file removed at once (a directory regenerated: `rm *.yaml`,
    /// then kustomize writing it again) took every Service, policy and
    /// token of the mesh away at the next scan. They stay a moment, and go
    /// once the directory has stayed empty; a file back in time changes
    /// nothing.
    #[test]
    fn every_file_removed_a_moment_ago_is_applied_only_once_they_stay_gone() {
        let dir = temp_dir("all-gone");
        std::fs::write(dir.join("svc.yaml"), SVC).unwrap();
        let mut src = source(&dir);
        assert_eq!(src.scan().unwrap().services.len(), 1);
        std::fs::remove_file(dir.join("svc.yaml")).unwrap();
        assert!(src.scan().is_none(), "nothing is taken away yet");
        assert!(src.scan().is_none());
        // Written again in time.
        std::fs::write(dir.join("svc.yaml"), SVC).unwrap();
        let back = src.scan();
        assert_eq!(back.map_or(0, |s| s.services.len()), 1, "back as it was");
        // Gone for good.
        std::fs::remove_file(dir.join("svc.yaml")).unwrap();
        assert!(src.scan().is_none());
        for t in src.emptied_dirs.values_mut() {
            *t = std::time::Instant::now() - defaults::MANIFEST_EMPTY_GRACE * 2;
        }
        let s = src.scan().unwrap();
        assert!(s.services.is_empty(), "gone for good: its objects are gone");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The wait is per `--manifests` directory: one of two regenerated by
    /// removing its files first keeps its policies a moment, while the
    /// other's changes apply.
    #[test]
    fn a_directory_emptied_among_others_keeps_its_objects_a_moment() {
        let (services, policies) = (temp_dir("two-svc"), temp_dir("two-pol"));
        std::fs::write(services.join("svc.yaml"), SVC).unwrap();
        std::fs::write(
            policies.join("lock.yaml"),
            "apiVersion: policy.strait.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: lock, namespace: shop}\nspec: {selector: {matchLabels: {app: web}}, mtls: STRICT}\n",
        )
        .unwrap();
        let mut src = ManifestSource::new(
            vec![services.clone(), policies.clone()],
            "cluster.local",
            Metrics::new(),
        );
        assert_eq!(src.scan().unwrap().authorizations.len(), 1);
        std::fs::remove_file(policies.join("lock.yaml")).unwrap();
        std::fs::write(
            services.join("svc.yaml"),
            SVC.replace("10.96.0.1", "10.96.0.2"),
        )
        .unwrap();
        let s = src.scan().unwrap();
        assert_eq!(s.authorizations.len(), 1, "the policy stays a moment");
        assert!(
            s.by_cluster_ip
                .contains_key(&"10.96.0.2".parse::<std::net::IpAddr>().unwrap()),
            "the other directory's change applies"
        );
        for t in src.emptied_dirs.values_mut() {
            *t = std::time::Instant::now() - defaults::MANIFEST_EMPTY_GRACE * 2;
        }
        assert!(
            src.scan().unwrap().authorizations.is_empty(),
            "gone for good"
        );
        std::fs::remove_dir_all(&services).unwrap();
        std::fs::remove_dir_all(&policies).unwrap();
    }

    #[test]
    fn a_file_emptied_a_moment_ago_is_applied_only_once_it_stays_empty() {
        let dir = temp_dir("emptied");
        std::fs::write(dir.join("svc.yaml"), SVC).unwrap();
        let mut src = source(&dir);
        src.scan().unwrap();
        // `kubectl get ... > svc.yaml`: truncated before it is written again.
        std::fs::write(dir.join("svc.yaml"), "").unwrap();
        assert!(
            src.scan().is_none(),
            "a just-emptied file changes nothing yet"
        );
        // Timed by this controller's clock, not the writer's: a file
        // stamped a minute ahead or behind waits as long.
        let f = std::fs::File::options()
            .write(true)
            .open(dir.join("svc.yaml"))
            .unwrap();
        for skew in [
            SystemTime::now() + std::time::Duration::from_secs(60),
            SystemTime::now() - std::time::Duration::from_secs(60),
        ] {
            f.set_modified(skew).unwrap();
            assert!(src.scan().is_none(), "{skew:?}: changes nothing yet");
        }
        for (_, t) in src.emptied_files.values_mut() {
            *t = std::time::Instant::now() - defaults::MANIFEST_EMPTY_GRACE * 2;
        }
        let s = src.scan().unwrap();
        assert!(
            s.services.is_empty(),
            "emptied for good: its objects are gone"
        );
        assert!(src.emptied_files.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A file refused for a key written twice still names the policies it
    /// would hold: a policy added in another namespace beside one in force
    /// seals that namespace, as for any other refusal.
    #[test]
    fn a_policy_refused_for_a_key_written_twice_seals_its_namespace() {
        let dir = temp_dir("twice");
        let policy = |ns: &str, extra: &str| {
            format!(
                "apiVersion: policy.strait.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: lock, namespace: {ns}}}\nspec:\n  selector: {{matchLabels: {{app: web}}}}\n  mtls: STRICT\n{extra}"
            )
        };
        std::fs::write(dir.join("svc.yaml"), SVC).unwrap();
        std::fs::write(dir.join("lock.yaml"), policy("shop", "")).unwrap();
        let mut src = source(&dir);
        assert_eq!(src.scan().unwrap().authorizations.len(), 1);
        let both = format!(
            "{}---\n{}",
            policy("shop", ""),
            policy("bank", "  mtls: PERMISSIVE\n")
        );
        std::fs::write(dir.join("lock.yaml"), both).unwrap();
        let s = src.scan().unwrap();
        assert_eq!(s.sealed_namespaces.iter().collect::<Vec<_>>(), ["bank"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A refused file is read again for the policies it would seal: an
    /// alias bomb refused by the parser must not be expanded there either
    /// (it would take the controller's memory at its first scan), and its
    /// namespace is guessed from its text.
    #[test]
    fn a_refused_alias_bomb_is_not_expanded_for_its_policies() {
        let n = 2000;
        let bomb = format!(
            "apiVersion: policy.strait.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: lock, namespace: shop}}\nspec: {{a: &a [{}], b: [{}]}}\n",
            vec!["x"; n].join(","),
            vec!["*a"; n].join(",")
        );
        let u = unguarded_policies(&bomb, &[]);
        assert!(u.policies.is_empty());
        assert_eq!(u.guessed.iter().collect::<Vec<_>>(), ["shop"]);
    }

    #[test]
    fn unreadable_or_odd_entries_do_not_stop_the_rest() {
        let dir = temp_dir("odd");
        std::fs::write(dir.join("svc.yaml"), SVC).unwrap();
        std::fs::create_dir(dir.join("loop")).unwrap();
        std::os::unix::fs::symlink("..", dir.join("loop/up")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", dir.join("zero.yaml")).unwrap();
        // An ext filesystem's own (root's only, so unreadable to the
        // controller, which would never start): not looked into.
        std::fs::create_dir(dir.join("lost+found")).unwrap();
        std::fs::write(dir.join("lost+found/#1234"), "kind: [broken").unwrap();
        std::fs::write(dir.join("lost+found/found.yaml"), "kind: [broken").unwrap();
        let mut src = source(&dir);
        let s = src.scan().unwrap();
        assert_eq!(s.services.len(), 1);
        assert_eq!(src.metrics.reload_errors.get(), 0);
        assert!(src.is_clean());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_object_keeps_a_readable_definition_while_its_first_file_is_broken() {
        let dir = temp_dir("fallback");
        let ip = |n: u8| SVC.replace("10.96.0.1", &format!("10.96.0.{n}"));
        let has = |s: &Snapshot, n: u8| {
            s.by_cluster_ip
                .contains_key(&format!("10.96.0.{n}").parse::<std::net::IpAddr>().unwrap())
        };
        std::fs::write(dir.join("a.yaml"), ip(1)).unwrap();
        let mut src = source(&dir);
        assert!(has(&src.scan().unwrap(), 1));
        std::fs::write(dir.join("a.yaml"), "kind: [broken").unwrap();
        assert!(src.scan().is_none(), "a broken edit changes nothing");
        assert!(!src.is_clean());
        // Defined again in a file that reads: that definition applies.
        std::fs::write(dir.join("c.yaml"), ip(3)).unwrap();
        let s = src.scan().unwrap();
        assert_eq!(s.services.len(), 1);
        assert!(has(&s, 3), "the readable definition is in force");
        // Gone from the readable file: the broken file's last good state stays.
        std::fs::remove_file(dir.join("c.yaml")).unwrap();
        let s = src.scan().unwrap();
        assert_eq!(s.services.len(), 1, "kept while a file still defines it");
        std::fs::write(dir.join("a.yaml"), ip(4)).unwrap();
        let s = src.scan().unwrap();
        assert!(has(&s, 4) && src.is_clean());

        // Refused though it parses (a route to a Service that does not
        // exist): its new definition is never read for the other file's sake.
        std::fs::write(dir.join("c.yaml"), ip(3)).unwrap();
        assert!(has(&src.scan().unwrap(), 4));
        let refused = format!("{}---\n{}", ip(9), route("r", "nowhere"));
        std::fs::write(dir.join("a.yaml"), refused).unwrap();
        assert!(src.scan().is_none(), "a refused edit changes nothing");
        std::fs::write(dir.join("c.yaml"), ip(5)).unwrap();
        let s = src.scan().unwrap();
        assert!(!has(&s, 9), "the refused file's definition applied");
        assert!(has(&s, 5), "the readable definition is in force");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    const API: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: a}\nspec: {ports: [{name: http, port: 80}]}\n";

    fn route(name: &str, backend: &str) -> String {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: a}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: web}}]\n  rules: [{{backendRefs: [{{name: {backend}}}]}}]\n"
        )
    }

    fn route_backends(s: &Snapshot) -> Vec<String> {
        let mut out: Vec<String> = s
            .routes
            .iter()
            .flat_map(|(k, r)| {
                r.rules
                    .iter()
                    .flat_map(|rule| &rule.backends)
                    .map(move |b| format!("{}->{}", k.key.name, b.service.name))
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn a_route_to_an_unknown_service_is_refused_and_the_last_good_route_stays() {
        let dir = temp_dir("unknown-backend");
        std::fs::write(dir.join("svc.yaml"), format!("{SVC}---\n{API}")).unwrap();
        std::fs::write(dir.join("route.yaml"), route("web", "api")).unwrap();
        let mut src = source(&dir);
        let s = src.scan().unwrap();
        assert_eq!(route_backends(&s), ["web->api"]);
        assert!(src.is_clean());

        std::fs::write(dir.join("route.yaml"), route("web", "ghost")).unwrap();
        assert!(src.scan().is_none(), "nothing half-valid reaches a proxy");
        assert_eq!(src.metrics.reload_errors.get(), 1);
        assert!(!src.is_clean());
        assert_eq!(
            route_backends(&src.current),
            ["web->api"],
            "the last good route stays"
        );
        assert!(src.scan().is_none());
        assert_eq!(src.metrics.reload_errors.get(), 1, "reported once");

        // The Service arrives: the route it was waiting for is taken, unchanged.
        std::fs::write(
            dir.join("ghost.yaml"),
            API.replace("name: api", "name: ghost"),
        )
        .unwrap();
        let s = src.scan().unwrap();
        assert_eq!(route_backends(&s), ["web->ghost"]);
        assert!(src.is_clean());
        assert_eq!(src.metrics.reload_errors.get(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_route_and_its_service_arrive_together_and_a_refused_file_brings_neither() {
        let dir = temp_dir("together");
        std::fs::write(
            dir.join("a.yaml"),
            format!("{}---\n{API}", route("one", "api")),
        )
        .unwrap();
        // c.yaml is refused (ghost is nowhere), so the Service it defines does
        // not exist either, and b.yaml's route to it is refused too.
        std::fs::write(dir.join("b.yaml"), route("two", "fresh")).unwrap();
        std::fs::write(
            dir.join("c.yaml"),
            format!(
                "{}---\n{}",
                route("three", "ghost"),
                API.replace("name: api", "name: fresh")
            ),
        )
        .unwrap();
        let mut src = source(&dir);
        let s = src.scan().unwrap();
        assert_eq!(route_backends(&s), ["one->api"]);
        assert!(!s.services.contains_key(&ObjKey {
            namespace: "a".into(),
            name: "fresh".into()
        }));
        assert_eq!(src.metrics.reload_errors.get(), 2);
        // A port the Service does not have is refused as well.
        std::fs::write(
            dir.join("c.yaml"),
            route("three", "api").replace("name: api}", "name: api, port: 81}"),
        )
        .unwrap();
        assert!(src.scan().is_none());
        assert_eq!(src.metrics.reload_errors.get(), 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_deleted_backend_service_leaves_the_route_with_a_backend_that_does_not_resolve() {
        let dir = temp_dir("deleted-backend");
        let api_slice = slice("10.0.0.7")
            .replace("web-1", "api-1")
            .replace("service-name: web", "service-name: api");
        std::fs::write(dir.join("svc.yaml"), SVC).unwrap();
        std::fs::write(dir.join("api.yaml"), format!("{API}---\n{api_slice}")).unwrap();
        std::fs::write(dir.join("route.yaml"), route("web", "api")).unwrap();
        let mut src = source(&dir);
        let key = crate::index::DestKey::parse("web.a:80", "a").unwrap();
        let backends = |s: &Snapshot| match crate::index::view::build(s, &key, None).update.kind {
            Some(strait_api::v1::destination_update::Kind::Service(svc)) => svc
                .backends
                .into_iter()
                .map(|b| (b.name, b.endpoints.len()))
                .collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        };
        let s = src.scan().unwrap();
        assert_eq!(backends(&s)[1], ("api.a.svc.cluster.local:80".into(), 1));
        std::fs::remove_file(dir.join("api.yaml")).unwrap();
        let s = src.scan().unwrap();
        assert_eq!(route_backends(&s), ["web->api"], "the route stays");
        // Left out of the backends: the proxies answer its share 500.
        assert_eq!(backends(&s).len(), 1, "{:?}", backends(&s));
        assert_eq!(src.metrics.reload_errors.get(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
