use super::*;
use crate::registry::Action;

async fn cache(stale_after: Duration) -> (tempfile::TempDir, Arc<SubjectCache>) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteRegistry::open(&dir.path().join("s.db"))
        .await
        .unwrap();
    let settings = SubjectCacheSettings {
        stale_after,
        ..SubjectCacheSettings::default()
    };
    (dir, Arc::new(SubjectCache::new(Arc::new(store), settings)))
}

/// How long a freshly read state is answered without a feed in the timing tests: the read
/// right after a load must come within it even on a loaded machine.
const WINDOW: Duration = Duration::from_secs(1);

fn consent(subject: &str) -> Change {
    Change {
        subject: subject.into(),
        action: Action::Consent {
            purpose: "marketing".into(),
            communications: false,
        },
        actor: "t".into(),
        source: None,
    }
}

#[tokio::test]
async fn versions_never_go_back() {
    let (_dir, cache) = cache(Duration::from_secs(60)).await;
    assert!(cache.state("s1").is_err(), "not loaded yet");
    let v1 = cache.apply(&consent("s1")).await.unwrap();
    assert_eq!(v1.version, 1);
    assert!(
        cache
            .state("s1")
            .unwrap()
            .unwrap()
            .consent
            .contains("marketing")
    );
    // An older read arriving late does not replace the newer state.
    assert!(matches!(
        cache.merge("s1", None, cache.now_us(), None, None),
        Merge::Older
    ));
    assert!(cache.state("s1").unwrap().is_some());
    // A notification of a newer version makes the entry unanswerable until read.
    cache.notify(&Notification {
        subject: "s1".into(),
        version: 2,
    });
    assert!(cache.needs_load("s1"));
    // A notification of an older version changes nothing once the newer one is read.
    let mut v2 = v1.clone();
    v2.version = 2;
    assert!(matches!(
        cache.merge("s1", Some(&v2), cache.now_us(), None, None),
        Merge::Cached
    ));
    cache.notify(&Notification {
        subject: "s1".into(),
        version: 1,
    });
    assert!(!cache.needs_load("s1"));
    // A read that began before the notification of version 3 and returns version 2 is
    // outdated; one that began after it is taken (it saw every commit this store has).
    cache.notify(&Notification {
        subject: "s1".into(),
        version: 3,
    });
    assert!(matches!(
        cache.merge("s1", Some(&v2), cache.now_us(), Some(0), None),
        Merge::Older
    ));
    assert!(cache.needs_load("s1"));
    assert!(matches!(
        cache.merge("s1", Some(&v2), cache.now_us(), Some(0), Some(3)),
        Merge::Cached
    ));
    assert!(!cache.needs_load("s1"));
    // A reset drops everything, and a read begun before it is not cached.
    cache.reset();
    assert!(matches!(
        cache.merge("s1", Some(&v2), cache.now_us(), Some(0), None),
        Merge::Dropped
    ));
    assert!(cache.needs_load("s1"));
}

#[tokio::test]
async fn a_malformed_subject_does_not_hold_back_other_reads() {
    let (_dir, cache) = cache(Duration::from_secs(60)).await;
    let bad = "x".repeat(crate::registry::MAX_FIELD_LEN + 1);
    cache.load(std::slice::from_ref(&bad)).await;
    assert!(cache.state(&bad).is_err());
    cache.load(&["s3".to_owned()]).await;
    assert_eq!(cache.state("s3"), Ok(None));
}

#[tokio::test]
async fn an_unconfirmed_state_is_read_again_after_refresh_after() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        SqliteRegistry::open(&dir.path().join("s.db"))
            .await
            .unwrap(),
    );
    let settings = SubjectCacheSettings {
        stale_after: Duration::from_secs(60),
        // Long enough that the read below comes within it on a loaded 2-core machine (50 ms
        // did not: the first assertion failed under a full `cargo test`).
        refresh_after: WINDOW,
        ..SubjectCacheSettings::default()
    };
    let cache = SubjectCache::new(store.clone(), settings);
    let names = ["s4".to_owned()];
    cache.load(&names).await;
    assert_eq!(cache.state("s4"), Ok(None));
    // Changed behind the cache's back, with no feed to tell it.
    store.apply(&consent("s4")).await.unwrap();
    tokio::time::sleep(WINDOW + Duration::from_millis(100)).await;
    assert!(cache.needs_load("s4"));
    cache.load(&names).await;
    assert!(
        cache
            .state("s4")
            .unwrap()
            .unwrap()
            .consent
            .contains("marketing")
    );
}

#[tokio::test]
async fn an_unconfirmed_state_expires() {
    let (_dir, cache) = cache(WINDOW).await;
    cache.load(&["s2".to_owned()]).await;
    assert_eq!(cache.state("s2"), Ok(None));
    tokio::time::sleep(WINDOW + Duration::from_millis(100)).await;
    assert!(cache.state("s2").is_err(), "no feed confirmed it");
    cache.confirm(cache.now_us());
    assert_eq!(cache.state("s2"), Ok(None));
}
