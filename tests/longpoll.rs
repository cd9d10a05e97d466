//! Long-poll subscribers (reqwest), end to end through the public listener.

mod common;

use std::time::Duration;

use common::*;

async fn publish_typed(c: &Crier, target: &str, ct: &str, body: Vec<u8>) -> String {
    let (s, v) = publish_with(c, target, &[("content-type", ct)], body).await;
    assert_eq!(s, 201);
    v["id"].as_str().unwrap().to_string()
}

fn quoted(id: &str) -> String {
    format!("\"{id}\"")
}

#[tokio::test]
async fn longpoll_one_message_per_response_byte_identical() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    let bin: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
    let ids = [
        publish_typed(
            &c,
            "lp",
            "text/plain; charset=utf-8",
            b"a\r\nb\rc\n".to_vec(),
        )
        .await,
        publish_typed(
            &c,
            "lp?event=tick",
            "application/json",
            br#"{"n":1}"#.to_vec(),
        )
        .await,
        publish_typed(&c, "lp", "application/octet-stream", bin.clone()).await,
    ];
    c.publish("lp", "no content type given").await;
    let cl = client();
    let url = c.url("/live/lp");

    let p = longpoll(&cl, &format!("{url}?last_event_id=earliest"), None).await;
    assert_eq!(p.status, 200);
    assert_eq!(&p.body[..], b"a\r\nb\rc\n", "byte-identical");
    assert_eq!(p.content_type.as_deref(), Some("text/plain; charset=utf-8"));
    assert_eq!(p.etag, Some(quoted(&ids[0])));
    assert_eq!(p.resume.as_deref(), Some("ok"));
    assert_eq!(p.headers.get("cache-control").unwrap(), "no-cache");

    let p = longpoll(&cl, &url, p.etag.as_deref()).await;
    assert_eq!(&p.body[..], br#"{"n":1}"#);
    assert_eq!(p.content_type.as_deref(), Some("application/json"));
    assert_eq!(p.headers.get("crier-event").unwrap(), "tick");
    assert_eq!(p.etag, Some(quoted(&ids[1])));

    let p = longpoll(&cl, &url, p.etag.as_deref()).await;
    assert_eq!(&p.body[..], &bin[..], "binary body byte-identical");
    assert_eq!(p.content_type.as_deref(), Some("application/octet-stream"));
    assert_eq!(p.etag, Some(quoted(&ids[2])));

    let p = longpoll(&cl, &url, p.etag.as_deref()).await;
    assert_eq!(&p.body[..], b"no content type given");
    assert_eq!(
        p.content_type.as_deref(),
        Some("text/plain"),
        "the default content type"
    );
    c.shutdown().await;
}

#[tokio::test]
async fn longpoll_waits_for_the_next_message() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    c.publish("w", "before").await;
    let url = c.url("/live/w");
    let waiting = tokio::spawn(async move { longpoll(&client(), &url, None).await });
    wait_subscribers(&c, "w", 1).await;
    let id = c.publish("w", "after").await;
    let p = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiting poll answers")
        .unwrap();
    assert_eq!(p.status, 200);
    assert_eq!(
        &p.body[..],
        b"after",
        "first_message = newest: not the older message"
    );
    assert_eq!(p.etag, Some(quoted(&id)));
    c.shutdown().await;
}

#[tokio::test]
async fn longpoll_first_message_oldest() {
    let up = Upstream::start().await;
    let c = Crier::start(
        &up.url(),
        "[[push]]\npath = \"/live/{channel}\"\nfirst_message = \"oldest\"\n",
    )
    .await;
    c.publish("o", "first").await;
    c.publish("o", "second").await;
    let p = longpoll(&client(), &c.url("/live/o"), None).await;
    assert_eq!(&p.body[..], b"first");
    c.shutdown().await;
}

#[tokio::test]
async fn longpoll_timeout_is_304_with_the_same_etag() {
    let up = Upstream::start().await;
    let c = Crier::start(
        &up.url(),
        "[[push]]\npath = \"/live/{channel}\"\nlongpoll_timeout = \"1s\"\n",
    )
    .await;
    let cl = client();
    let url = c.url("/live/t");
    let id = c.publish("t", "only").await;
    let p = longpoll(&cl, &url, Some(&quoted(&id))).await;
    assert_eq!(p.status, 304);
    assert_eq!(
        p.etag,
        Some(quoted(&id)),
        "the same ETag to poll from again"
    );
    assert!(p.body.is_empty());
    let p = longpoll(&cl, &format!("{url}?last_event_id={id}"), None).await;
    assert_eq!(p.status, 304);
    assert_eq!(p.etag, Some(quoted(&id)));

    // A poll without a position on an idle channel: the ETag it gets back loses nothing
    // published before the next poll.
    let p = longpoll(&cl, &c.url("/live/fresh"), None).await;
    assert_eq!(p.status, 304);
    let etag = p.etag.expect("304 carries an ETag");
    c.publish("fresh", "in between").await;
    let p = longpoll(&cl, &c.url("/live/fresh"), Some(&etag)).await;
    assert_eq!(p.status, 200);
    assert_eq!(&p.body[..], b"in between");
    c.shutdown().await;
}

/// A client that loops on `If-None-Match` (sometimes `last_event_id=`, sometimes a new
/// connection, sometimes giving up on a waiting poll) while 1,000 messages are published sees
/// each exactly once, in order.
#[tokio::test]
async fn longpoll_resume_is_exact_across_reconnects() {
    let up = Upstream::start().await;
    let c = Crier::start(
        &up.url(),
        "[channels]\nbuffer_messages = 2000\n\
         [[push]]\npath = \"/live/{channel}\"\nlongpoll_timeout = \"1s\"\n",
    )
    .await;
    const N: usize = 1000;
    let url = c.url("/live/r");
    // Where the client starts: before anything is published.
    let p = longpoll(&client(), &url, None).await;
    assert_eq!(p.status, 304);
    let mut etag = p.etag.unwrap();
    let publisher = {
        let pub_url = c.pub_url("r");
        tokio::spawn(async move {
            let cl = client();
            for i in 0..N {
                let r = cl.post(&pub_url).body(i.to_string()).send().await.unwrap();
                assert_eq!(r.status(), 201);
                if i % 100 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        })
    };
    let run = async {
        let mut cl = client();
        let mut seen: Vec<usize> = Vec::with_capacity(N);
        let mut polls = 0usize;
        let mut abandoned = 0usize;
        while seen.len() < N {
            polls += 1;
            if polls % 50 == 0 {
                cl = client(); // a new connection now and then
            }
            let p = if polls % 7 == 0 {
                // Give up on a poll quickly (it may have been answered already: the position
                // is the client's, so the next poll gets the same message again).
                let id = etag.trim_matches('"');
                let url = format!("{url}?last_event_id={id}");
                match tokio::time::timeout(Duration::from_millis(5), longpoll(&cl, &url, None))
                    .await
                {
                    Ok(p) => p,
                    Err(_) => {
                        abandoned += 1;
                        continue;
                    }
                }
            } else {
                longpoll(&cl, &url, Some(&etag)).await
            };
            match p.status.as_u16() {
                200 => {
                    assert_eq!(p.resume.as_deref(), Some("ok"));
                    seen.push(std::str::from_utf8(&p.body).unwrap().parse().unwrap());
                    etag = p.etag.expect("200 carries an ETag");
                }
                304 => assert_eq!(p.etag.as_deref(), Some(etag.as_str())),
                s => panic!("unexpected status {s}"),
            }
        }
        (seen, polls, abandoned)
    };
    let (seen, polls, abandoned) = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("1,000 messages within 120s");
    publisher.await.unwrap();
    assert!(polls >= N);
    eprintln!("{polls} polls, {abandoned} abandoned");
    assert_eq!(
        seen,
        (0..N).collect::<Vec<_>>(),
        "every message once, in order"
    );
    let p = longpoll(&client(), &url, Some(&etag)).await;
    assert_eq!(p.status, 304, "nothing after the last message");
    c.shutdown().await;
}

#[tokio::test]
async fn longpoll_resume_reports_gap() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "[channels]\nbuffer_messages = 3\n").await;
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(c.publish("g", format!("m{i}")).await);
    }
    let cl = client();
    let url = c.url("/live/g");
    let p = longpoll(&cl, &url, Some(&quoted(&ids[0]))).await;
    assert_eq!((p.status.as_u16(), &p.body[..]), (200, &b"m3"[..]));
    assert_eq!(p.resume.as_deref(), Some("gap"));
    let p = longpoll(&cl, &url, p.etag.as_deref()).await;
    assert_eq!((p.status.as_u16(), &p.body[..]), (200, &b"m4"[..]));
    assert_eq!(p.resume.as_deref(), Some("ok"));
    let p = longpoll(&cl, &url, Some(&quoted(&ids[2]))).await;
    assert_eq!(&p.body[..], b"m3");
    assert_eq!(p.resume.as_deref(), Some("ok"));
    let p = longpoll(&cl, &format!("{url}?last_event_id={}", ids[1]), None).await;
    assert_eq!(&p.body[..], b"m3");
    assert_eq!(p.resume.as_deref(), Some("gap"));
    let p = longpoll(&cl, &format!("{url}?last_event_id=earliest"), None).await;
    assert_eq!(&p.body[..], b"m3");
    assert_eq!(p.resume.as_deref(), Some("ok"));
    // A weak validator works too.
    let p = longpoll(&cl, &url, Some(&format!("W/\"{}\"", ids[4]))).await;
    assert_eq!(&p.body[..], b"m5");
    c.shutdown().await;
}

#[tokio::test]
async fn longpoll_waiting_poll_gets_410_when_channel_is_deleted() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    let url = c.url("/live/gone");
    let waiting = tokio::spawn(async move { longpoll(&client(), &url, None).await });
    wait_subscribers(&c, "gone", 1).await;
    let r = client().delete(c.pub_url("gone")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let p = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiting poll answers")
        .unwrap();
    assert_eq!(p.status, 410);
    c.shutdown().await;
}

#[tokio::test]
async fn longpoll_request_errors() {
    let up = Upstream::start().await;
    let c = Crier::start(
        &up.url(),
        "[channels]\nmax_channels = 1\n\
         [[push]]\npath = \"/live/{channel}\"\nlongpoll_timeout = \"1s\"\n\
         [[push]]\npath = \"/sse-only/{channel}\"\ntransports = [\"sse\"]\n",
    )
    .await;
    let cl = client();
    let url = c.url("/live/e");
    for bad in [
        "\"nope\"",
        "\"1-x\"",
        "abc",
        "\"1-1\", \"1-2\"",
        "1-1",
        "\"\"1-1\"",
        "W/1-1",
    ] {
        let p = longpoll(&cl, &url, Some(bad)).await;
        assert_eq!(p.status, 400, "If-None-Match: {bad}");
    }
    let p = longpoll(&cl, &format!("{url}?last_event_id=1.5"), None).await;
    assert_eq!(p.status, 400);
    let p = longpoll(&cl, &c.url("/live/bad%2Fname"), None).await;
    assert_eq!(p.status, 400);
    let p = longpoll(&cl, &c.url("/sse-only/e"), None).await;
    assert_eq!(p.status, 406, "long-poll not enabled at this location");
    let r = cl.put(&url).body("x").send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert!(r.headers().contains_key("allow"));
    let r = cl.delete(&url).send().await.unwrap();
    assert_eq!(r.status(), 405);
    // max_channels = 1.
    c.publish("taken", "x").await;
    let p = longpoll(&cl, &url, None).await;
    assert_eq!(p.status, 429);
    let p = longpoll(&cl, &c.url("/live/taken?last_event_id=earliest"), None).await;
    assert_eq!(p.status, 200, "an existing channel still serves");
    c.shutdown().await;
}
