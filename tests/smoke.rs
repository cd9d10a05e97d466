mod common;
use common::*;

#[tokio::test]
async fn harness_proxies_and_pushes() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    let body = client()
        .get(c.url("/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "hello from upstream");
    let mut sse = SseClient::connect(&c.url("/live/a"), None).await;
    let id = c.publish("a", "hi\r\nthere").await;
    let ev = sse.next_event().await.unwrap();
    assert_eq!(ev.data, "hi\nthere");
    assert_eq!(ev.id.as_deref(), Some(id.as_str()));
    c.shutdown().await;
}
