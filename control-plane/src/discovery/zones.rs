//! Which zone a watch comes from: that of the pod at its source address,
//! through the node it runs on. A proxy opens its watches as it starts,
//! often before the index holds its pod or its node, so a zone not known
//! yet is looked up again at each index change, for `ZONE_LOOKUP` after its
//! latest watch opened at most: once per address (and caller) however many
//! watches it opens, and no longer than until its pod's node is known, with
//! or without a zone.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::defaults;
use crate::identity::caller::Caller;
use crate::index::{PodInfo, Snapshot};

/// What a watch from an address knows of its zone.
#[derive(Clone, Debug, PartialEq)]
pub enum Zone {
    /// Its pod's node's.
    In(String),
    /// None to be had: its pod's node has no zone, or the lookup has ended.
    Zoneless,
    /// Not known yet: see `Zones::lookup`.
    Unknown,
}

impl Zone {
    /// The zone of the pod that opened a watch from `source`, as far as
    /// `snap` knows it.
    pub fn of(snap: &Snapshot, source: Option<IpAddr>, caller: Option<&Caller>) -> Zone {
        let Some(pod) = caller_pod(snap, source, caller) else {
            return Zone::Unknown;
        };
        let Some(node) = pod.node.as_ref() else {
            return Zone::Unknown;
        };
        match snap.node_zones.get(node) {
            Some(Some(z)) => Zone::In(z.clone()),
            Some(None) => Zone::Zoneless,
            None => Zone::Unknown,
        }
    }

    pub fn known(self) -> Option<String> {
        match self {
            Zone::In(z) => Some(z),
            Zone::Zoneless | Zone::Unknown => None,
        }
    }
}

/// The pod that opened a watch: the one at its source address, if it is the
/// caller's (its namespace and service account, where callers prove them).
fn caller_pod<'a>(
    snap: &'a Snapshot,
    source: Option<IpAddr>,
    caller: Option<&Caller>,
) -> Option<&'a PodInfo> {
    let (k, pod) = snap.pod_at(source?)?;
    let theirs = caller
        .is_none_or(|c| c.namespace == k.namespace && c.service_account == pod.service_account);
    theirs.then_some(pod)
}

/// A lookup's key: the address, and the namespace and service account
/// its caller proved (the pod found there must be theirs).
type Key = (IpAddr, Option<(String, String)>);

/// A zone found, and when the index change that revealed it happened.
#[derive(Clone, Debug)]
pub struct Found {
    pub zone: String,
    pub at: Option<prost_types::Timestamp>,
}

/// What a lookup woke for.
enum Woke {
    /// Its deadline, perhaps moved since it slept.
    Deadline,
    /// An index change, and the zone it gives.
    Changed(Zone, Arc<Snapshot>),
    /// The index is gone (the controller stopping).
    Closed,
}

/// The lookups under way.
#[derive(Debug)]
pub struct Zones {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    /// Each ends (its sender dropped) when the zone is found, known to be
    /// none, or the lookup's time is up; `Some` once found.
    pending: Arc<Mutex<HashMap<Key, Lookup>>>,
}

#[derive(Debug)]
struct Lookup {
    found: watch::Sender<Option<Found>>,
    /// `ZONE_LOOKUP` after the latest watch that joined it opened: every
    /// watch waits the whole window, however late it joins.
    until: tokio::time::Instant,
}

impl Zones {
    pub fn new(snapshots: watch::Receiver<Arc<Snapshot>>) -> Self {
        Zones {
            snapshots,
            pending: Arc::default(),
        }
    }

    /// The zone of the pod at `source`, once it is known; closed without
    /// one if it is not within `ZONE_LOOKUP` of the latest call. Every watch
    /// from one address shares one lookup, which ends early when none of them
    /// waits any more.
    pub fn lookup(
        &self,
        source: IpAddr,
        caller: Option<&Caller>,
    ) -> watch::Receiver<Option<Found>> {
        let key: Key = (
            source,
            caller.map(|c| (c.namespace.clone(), c.service_account.clone())),
        );
        let until = tokio::time::Instant::now() + defaults::ZONE_LOOKUP;
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = pending.get_mut(&key) {
            l.until = l.until.max(until);
            return l.found.subscribe();
        }
        let (found, rx) = watch::channel(None);
        pending.insert(key.clone(), Lookup { found, until });
        let mut snapshots = self.snapshots.clone();
        let lookups = self.pending.clone();
        let caller = caller.cloned();
        tokio::spawn(async move {
            let deadline = tokio::time::sleep_until(until);
            tokio::pin!(deadline);
            loop {
                let woke = tokio::select! {
                    () = &mut deadline => Woke::Deadline,
                    changed = snapshots.changed() => match changed {
                        Ok(()) => {
                            let snap = snapshots.borrow_and_update().clone();
                            Woke::Changed(Zone::of(&snap, Some(key.0), caller.as_ref()), snap)
                        }
                        Err(_) => Woke::Closed,
                    },
                };
                // Decided, and ended, under the lock `lookup` joins under: a
                // watch joining meanwhile either moves the deadline or finds
                // the lookup gone and starts its own.
                let mut pending = lookups.lock().unwrap_or_else(|p| p.into_inner());
                let Some(l) = pending.get(&key) else { return };
                let waited_on = l.found.receiver_count() > 0;
                match woke {
                    // Moved on by a watch that joined since.
                    Woke::Deadline if waited_on && l.until > deadline.deadline() => {
                        let later = l.until;
                        drop(pending);
                        deadline.as_mut().reset(later);
                        continue;
                    }
                    Woke::Changed(Zone::Unknown, _) if waited_on => continue,
                    Woke::Changed(Zone::In(zone), snap) => {
                        let at = super::changed_at(&snap);
                        l.found.send_replace(Some(Found { zone, at }));
                    }
                    Woke::Changed(Zone::Unknown | Zone::Zoneless, _)
                    | Woke::Deadline
                    | Woke::Closed => {}
                }
                pending.remove(&key);
                return;
            }
        });
        rx
    }

    /// How many addresses are being looked up.
    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}
