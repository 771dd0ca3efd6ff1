//! Tests of the drain trigger, signals and watches.
use std::time::Duration;

use super::{Drained, Trigger};

#[tokio::test]
async fn a_drain_without_watches_completes_at_once() {
    let t = Trigger::new();
    let signal = t.signal();
    assert!(!signal.is_signaled());
    assert_eq!(
        t.drain(Duration::from_millis(5000)).await,
        Drained::Complete
    );
    assert!(signal.is_signaled());
}

#[tokio::test]
async fn a_drain_waits_for_every_watch_then_completes() {
    let t = Trigger::new();
    let mut w = t.signal().watch();
    let w2 = w.clone();
    assert_eq!(t.open(), 2);
    let task = tokio::spawn(async move {
        w.signaled().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(w);
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(w2);
    });
    let started = tokio::time::Instant::now();
    assert_eq!(
        t.drain(Duration::from_millis(5000)).await,
        Drained::Complete
    );
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert!(started.elapsed() < Duration::from_millis(2000));
    task.await.unwrap();
}

#[tokio::test]
async fn a_drain_stops_waiting_at_its_deadline() {
    let t = Trigger::new();
    let _held = t.signal().watch();
    let started = tokio::time::Instant::now();
    assert_eq!(
        t.drain(Duration::from_millis(300)).await,
        Drained::DeadlineReached { open: 1 }
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn signals_do_not_hold_a_drain_open() {
    let t = Trigger::new();
    let _observers = (t.signal(), t.signal().clone());
    assert_eq!(t.open(), 0);
    assert_eq!(t.drain(Duration::from_millis(100)).await, Drained::Complete);
}

#[tokio::test]
async fn a_child_starts_on_its_own_and_its_watches_hold_the_parent() {
    let parent = Trigger::new();
    let child = parent.child();
    let mut child_signal = child.signal();
    let held = child_signal.watch();
    parent.start();
    assert!(!child_signal.is_signaled(), "the parent started the child");
    assert_eq!(
        parent.drain(Duration::from_millis(100)).await,
        Drained::DeadlineReached { open: 1 }
    );
    drop(child);
    // A dropped trigger starts its drain.
    tokio::time::timeout(Duration::from_millis(100), child_signal.signaled())
        .await
        .expect("dropping the child did not signal it");
    assert!(held.is_signaled());
    drop(held);
    assert_eq!(
        parent.drain(Duration::from_millis(100)).await,
        Drained::Complete
    );
}
