//! The file watch: reloads the policy when the policy directory changes.
//!
//! It polls rather than subscribing to file-system events (`notify`): every debounce interval
//! it compares a marker of the watched files (size, modification time and inode of each, with
//! symlinks followed) with the last one, and reloads once the marker has stayed the same for a
//! whole interval — editors and `kubectl` write in several steps, and a half-written
//! directory must not be loaded. Why a poll: a Kubernetes ConfigMap volume is updated by
//! swapping a `..data` symlink, which inotify-based watchers tend to miss or see as a
//! deletion; inotify watches are a limited resource in containers; and a poll of a handful of
//! `stat` calls every 500 ms costs nothing measurable and needs no dependency. The reload
//! itself reads the files and compares their digest with the active version, so a change that
//! does not change the policy (the sidecar's own write after an Apply, a `touch`) is a no-op.

use super::manager::PolicyManager;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Watches `manager`'s store every `every` until `shutdown` completes. The task it runs in
/// ends with `shutdown` (the server's stop signal).
///
/// A fleet store (PostgreSQL) is followed the same way, with two differences: its newest
/// version is loaded at once when the watch starts (the fleet's policy wins over the local
/// directory; an empty fleet is seeded with the local one), and a NOTIFY wakes the watch
/// without waiting for the next poll or for the change to settle.
pub async fn run(manager: Arc<PolicyManager>, every: Duration, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let store = manager.store().clone();
    let origin = store.origin();
    let wakeup = store.wakeup().unwrap_or_default();
    if !store.settles() {
        join_fleet(&manager).await;
    }
    // No marker seen yet: the first look compares the store with the active policy, so that a
    // change made between the load at start and this task's first look is not missed (it
    // would be, forever, if the marker of that moment counted as seen). A store that holds
    // the active bundle is a no-op reload.
    let mut seen = None;
    let mut settling = None;
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            () = tokio::time::sleep(every) => {}
            () = wakeup.notified() => {}
        }
        let now = Some(store.marker().await);
        if now == seen {
            settling = None;
            continue;
        }
        if store.settles() && settling != Some(now) {
            // Changed since the last look: wait until it stays put for one interval.
            settling = Some(now);
            continue;
        }
        seen = now;
        settling = None;
        match manager.reload_from_store(origin.clone()).await {
            Ok(Some(applied)) => {
                tracing::info!(version = %applied.version, by = %origin.applied_by(), "policy store changed: reloaded");
            }
            Ok(None) => {
                tracing::debug!("policy store changed; the policy is the active one");
            }
            // Already logged, counted and kept for `Status` by the manager.
            Err(_) => {}
        }
    }
}

/// At the start of a fleet member: the fleet's newest version replaces the policy loaded from
/// the local directory; a fleet without any version gets the local one as its first. When the
/// database cannot be reached the local policy stays, and the watch loads the fleet's once the
/// database answers (its marker then changes).
async fn join_fleet(manager: &PolicyManager) {
    let store = manager.store();
    match store.current().await {
        Ok(Some(_)) => {
            if let Ok(Some(applied)) = manager.reload_from_store(store.origin()).await {
                tracing::info!(version = %applied.version, "joined the fleet: its policy replaces the local one");
            }
        }
        Ok(None) => {
            let Some(active) = manager.decider().policy() else {
                tracing::warn!(
                    "the fleet has no policy version and this sidecar has no valid policy to give it"
                );
                return;
            };
            let bundle = manager.find(&active.version().to_string());
            match bundle {
                Ok(bundle) => match store
                    .publish_by(
                        &bundle,
                        "file",
                        "first version of the fleet, from the policy directory",
                    )
                    .await
                {
                    Ok(_) => {
                        tracing::info!(version = %active.version(), "the fleet had no policy: published the local one")
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the local policy cannot be published to the fleet")
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "the local policy is not kept; not published to the fleet")
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "the fleet's policy cannot be read; running the local policy until it can");
        }
    }
}
