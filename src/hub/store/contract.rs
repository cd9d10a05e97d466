//! The storage contract, as one test suite every engine runs (`engine_contract!`): a hub on
//! the engine under test must behave exactly like this, whatever it keeps where.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;

use crate::hub::{
    CloseReason, Hub, HubError, HubObserver, MessageId, NewMessage, Published, Read, Start,
    SubscriberEvent,
};
use crate::model::{ChannelName, Transport};

/// Makes the hub under test: `max_channels`, and the buffer bound and TTL of every channel.
pub(crate) trait MakeHub {
    fn make(&self, max_channels: usize, buffer: usize, ttl: Duration) -> Hub;
}

pub(crate) fn name(s: &str) -> ChannelName {
    ChannelName::new(s).expect("test setup")
}

pub(crate) fn msg(b: &str) -> NewMessage {
    NewMessage {
        event: None,
        content_type: http::HeaderValue::from_static("text/plain"),
        body: Bytes::copy_from_slice(b.as_bytes()),
        headers: http::HeaderMap::new(),
    }
}

async fn publish(h: &Hub, c: &str, body: &str) -> MessageId {
    h.publish(&name(c), msg(body))
        .await
        .expect("test setup")
        .id
        .parse()
        .expect("test setup")
}

/// Reads everything there is now (the local tail is filled as the engine delivers; an engine
/// that delivers through a fan-out gets a moment).
async fn read_all(sub: &mut crate::hub::Subscription, want: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while got.len() < want {
        match tokio::time::timeout_at(deadline, sub.next(&mut out, 100)).await {
            Ok(Read::Messages(_)) => got.extend(
                out.drain(..)
                    .map(|m| String::from_utf8_lossy(&m.body).into_owned()),
            ),
            Ok(other) => panic!("read {other:?} after {got:?}"),
            Err(_) => panic!("only {got:?} of {want} arrived"),
        }
    }
    got
}

pub(crate) async fn ids_increase_and_resume_is_exact(m: &impl MakeHub) {
    let h = m.make(10, 100, Duration::from_secs(60));
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(publish(&h, "a", &i.to_string()).await);
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let mut sub = h
        .subscribe(&name("a"), Transport::Sse, Start::After(ids[9]), None)
        .await
        .expect("test setup");
    assert!(!sub.gap());
    let got = read_all(&mut sub, 10).await;
    assert_eq!(got, (10..20).map(|i| i.to_string()).collect::<Vec<_>>());
    let mut all = h
        .subscribe(&name("a"), Transport::Sse, Start::Oldest, None)
        .await
        .expect("test setup");
    assert_eq!(read_all(&mut all, 20).await.len(), 20);
}

pub(crate) async fn subscribers_are_woken_on_append(m: &impl MakeHub) {
    let h = m.make(10, 100, Duration::from_secs(60));
    let mut sub = h
        .subscribe(&name("w"), Transport::WebSocket, Start::Newest, None)
        .await
        .expect("test setup");
    let h2 = h.clone();
    let publisher = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        publish(&h2, "w", "late").await
    });
    assert_eq!(read_all(&mut sub, 1).await, ["late"]);
    publisher.await.expect("test setup");
}

pub(crate) async fn the_buffer_is_bounded_and_resume_reports_gaps(m: &impl MakeHub) {
    let h = m.make(10, 3, Duration::from_secs(60));
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(publish(&h, "b", &i.to_string()).await);
    }
    let stats = h.stats("b").await.expect("test setup").expect("exists");
    assert_eq!(stats.buffered, 3);
    assert_eq!(stats.published, 5);
    assert_eq!(stats.last_id, Some(ids[4].to_string()));
    let early = h
        .subscribe(&name("b"), Transport::LongPoll, Start::After(ids[0]), None)
        .await
        .expect("test setup");
    assert!(early.gap(), "ids[1] was evicted");
    let mut exact = h
        .subscribe(&name("b"), Transport::LongPoll, Start::After(ids[1]), None)
        .await
        .expect("test setup");
    assert!(!exact.gap(), "everything after ids[1] is still buffered");
    assert_eq!(read_all(&mut exact, 3).await, ["2", "3", "4"]);
}

pub(crate) async fn messages_expire_after_the_ttl(m: &impl MakeHub) {
    let h = m.make(10, 100, Duration::from_millis(200));
    let first = publish(&h, "t", "old").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.sweep();
    publish(&h, "t", "new").await;
    let mut sub = h
        .subscribe(
            &name("t"),
            Transport::Sse,
            Start::After(MessageId::ZERO),
            None,
        )
        .await
        .expect("test setup");
    assert!(sub.gap(), "the expired message is gone");
    assert_eq!(read_all(&mut sub, 1).await, ["new"]);
    let from_first = h
        .subscribe(&name("t"), Transport::Sse, Start::After(first), None)
        .await
        .expect("test setup");
    assert!(!from_first.gap(), "nothing after `first` was lost");
}

pub(crate) async fn max_channels_is_a_limit(m: &impl MakeHub) {
    let h = m.make(2, 100, Duration::from_secs(60));
    publish(&h, "a", "x").await;
    publish(&h, "b", "x").await;
    assert_eq!(
        h.publish(&name("c"), msg("x")).await.unwrap_err(),
        HubError::TooManyChannels(2)
    );
    assert!(
        h.publish(&name("a"), msg("y")).await.is_ok(),
        "existing channels still take messages"
    );
}

pub(crate) async fn delete_ends_subscribers_and_ids_keep_rising(m: &impl MakeHub) {
    let h = m.make(10, 100, Duration::from_secs(60));
    let first = publish(&h, "d", "1").await;
    let last = publish(&h, "d", "2").await;
    let mut old = h
        .subscribe(&name("d"), Transport::Sse, Start::Newest, None)
        .await
        .expect("test setup");
    h.delete("d").await.expect("test setup");
    assert_eq!(h.delete("d").await.unwrap_err(), HubError::NoSuchChannel);
    assert!(h.stats("d").await.expect("test setup").is_none());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, old.next(&mut Vec::new(), 10)).await {
            Ok(Read::Closed(CloseReason::Deleted)) => break,
            Ok(Read::Messages(_)) => continue,
            other => panic!("the deleted channel's subscriber saw {other:?}"),
        }
    }
    drop(old);
    let again = publish(&h, "d", "3").await;
    assert!(again > last, "ids keep increasing across incarnations");
    let from_first = h
        .subscribe(&name("d"), Transport::Sse, Start::After(first), None)
        .await
        .expect("test setup");
    assert!(
        from_first.gap(),
        "message 2 is gone with the old incarnation"
    );
    let mut from_last = h
        .subscribe(&name("d"), Transport::Sse, Start::After(last), None)
        .await
        .expect("test setup");
    assert!(!from_last.gap(), "nothing after `last` was lost");
    assert_eq!(read_all(&mut from_last, 1).await, ["3"]);
}

pub(crate) async fn one_body_for_all_subscribers(m: &impl MakeHub) {
    let h = m.make(10, 100, Duration::from_secs(60));
    let mut subs = Vec::new();
    for _ in 0..100 {
        subs.push(
            h.subscribe(&name("s"), Transport::WebSocket, Start::Newest, None)
                .await
                .expect("test setup"),
        );
    }
    publish(&h, "s", "hello").await;
    let mut ptrs = Vec::new();
    for s in &mut subs {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let r = tokio::time::timeout_at(deadline, s.next(&mut out, 10)).await;
        assert_eq!(r.expect("delivered"), Read::Messages(1));
        ptrs.push(out[0].body.as_ptr());
    }
    assert!(ptrs.windows(2).all(|w| w[0] == w[1]), "one shared body");
    let stats = h.stats("s").await.expect("test setup").expect("exists");
    assert_eq!(stats.subscribers, 100);
}

pub(crate) async fn idle_channels_are_freed_locally(m: &impl MakeHub) {
    let h = m.make(10, 100, Duration::from_secs(60));
    let s = h
        .subscribe(&name("i"), Transport::Sse, Start::Newest, None)
        .await
        .expect("test setup");
    assert_eq!(h.channel_count(), 1);
    drop(s);
    assert_eq!(h.channel_count(), 0, "no subscriber and nothing buffered");
}

#[derive(Default)]
pub(crate) struct Recorder(pub(crate) Mutex<Vec<String>>);

impl HubObserver for Recorder {
    fn message(&self, m: &Published<'_>) {
        let tag = m
            .headers
            .get("x-tag")
            .map_or("", |v| v.to_str().unwrap_or(""));
        self.0.lock().push(format!("msg {} {}", m.channel, tag));
    }
    fn subscribed(&self, e: &SubscriberEvent<'_>) {
        self.0
            .lock()
            .push(format!("sub {} {}", e.channel, e.subscribers));
    }
    fn unsubscribed(&self, e: &SubscriberEvent<'_>) {
        self.0
            .lock()
            .push(format!("unsub {} {}", e.channel, e.subscribers));
    }
    fn channel_deleted(&self, channel: &str) {
        self.0.lock().push(format!("deleted {channel}"));
    }
}

pub(crate) async fn observers_hear_every_event_once(m: &impl MakeHub) {
    let h = m.make(10, 100, Duration::from_secs(60));
    let rec = Arc::new(Recorder::default());
    h.set_observer("test", Some(rec.clone()));
    let a = h
        .subscribe(&name("o"), Transport::Sse, Start::Newest, None)
        .await
        .expect("test setup");
    let b = h
        .subscribe(&name("o"), Transport::WebSocket, Start::Newest, None)
        .await
        .expect("test setup");
    let mut tagged = msg("x");
    tagged
        .headers
        .insert("x-tag", http::HeaderValue::from_static("t1"));
    h.publish(&name("o"), tagged).await.expect("test setup");
    h.publish(&name("o"), msg("y")).await.expect("test setup");
    drop(a);
    h.delete("o").await.expect("test setup");
    drop(b);
    h.set_observer("test", None);
    h.publish(&name("o"), msg("z")).await.expect("test setup");
    let got = rec.0.lock().clone();
    assert_eq!(
        got,
        [
            "sub o 1",
            "sub o 2",
            "msg o t1",
            "msg o ",
            "unsub o 1",
            "deleted o",
            "unsub o 0",
        ]
    );
}

/// The whole suite, as `#[tokio::test]`s, for the engine `$make` (a [`MakeHub`]). With a
/// second argument, a `fn() -> Option<String>`: when it returns a reason, each test prints it
/// and passes without running (an engine whose server is not installed).
macro_rules! engine_contract {
    ($make:expr) => {
        $crate::hub::store::contract::engine_contract!($make, || None::<String>);
    };
    ($make:expr, $skip:expr) => {
        mod contract {
            use super::*;
            use $crate::hub::store::contract as c;

            #[tokio::test]
            async fn ids_increase_and_resume_is_exact() {
                if let Some(why) = ($skip)() {
                    eprintln!("skipped: {why}");
                    return;
                }
                c::ids_increase_and_resume_is_exact(&$make).await
            }
            #[tokio::test]
            async fn subscribers_are_woken_on_append() {
                if let Some(why) = ($skip)() {
                    eprintln!("skipped: {why}");
                    return;
                }
                c::subscribers_are_woken_on_append(&$make).await
            }
            #[tokio::test]
            async fn the_buffer_is_bounded_and_resume_reports_gaps() {
                if let Some(why) = ($skip)() {
                    eprintln!("skipped: {why}");
                    return;
                }
                c::the_buffer_is_bounded_and_resume_reports_gaps(&$make).await
            }
            #[tokio::test]
            async fn messages_expire_after_the_ttl() {
                if let Some(why) = ($skip)() {
                    eprintln!("skipped: {why}");
                    return;
                }
                c::messages_expire_after_the_ttl(&$make).await
            }
            #[tokio::test]
            async fn max_channels_is_a_limit() {
                if let Some(why) = ($skip)() {
                    eprintln!("skipped: {why}");
                    return;
                }
                c::max_channels_is_a_limit(&$make).await
            }
            #[tokio::test]
            async fn delete_ends_subscribers_and_ids_keep_rising() {
                if let Some(why) = ($skip)() {
                    eprintln!("skipped: {why}");
                    return;
                }
                c::delete_ends_subscribers_and_ids_keep_rising(&$make).await
            }
            #[tokio::test]
            async fn one_body_for_all_subscribers() {
                if let Some(why) = ($skip)() {
                    eprintln!("skipped: {why}");
                    return;
                }
                c::one_body_for_all_subscribers(&$make).await
            }
            #[tokio::test]
            async fn idle_channels_are_freed_locally() {
                if let Some(why) = ($skip)() {
                    eprintln!("skipped: {why}");
                    return;
                }
                c::idle_channels_are_freed_locally(&$make).await
            }
            #[tokio::test]
            async fn observers_hear_every_event_once() {
                if let Some(why) = ($skip)() {
                    eprintln!("skipped: {why}");
                    return;
                }
                c::observers_hear_every_event_once(&$make).await
            }
        }
    };
}
pub(crate) use engine_contract;
