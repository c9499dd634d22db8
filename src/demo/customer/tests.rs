//! Unit tests of the demo service: served on `127.0.0.1:0`, called with the generated client.

use super::*;
use crate::proto::demo::customer_data_client::CustomerDataClient;
use tonic::transport::Channel;

async fn start() -> (
    CustomerService,
    CustomerDataClient<Channel>,
    tokio::sync::oneshot::Sender<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let service = CustomerService::new();
    let shutdown = async move {
        let _ = stopped.await;
    };
    tokio::spawn(service.clone().serve(listener, shutdown));
    let client = CustomerDataClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    (service, client, stop)
}

fn profile(id: &str) -> GetProfileRequest {
    GetProfileRequest {
        customer_id: id.to_owned(),
    }
}

#[tokio::test]
async fn unary_calls_are_counted_and_keep_metadata() {
    let (service, mut client, _stop) = start().await;
    let mut request = Request::new(profile("cust-1"));
    request
        .metadata_mut()
        .insert("x-purpose", "service.billing".parse().unwrap());
    let p = client.get_profile(request).await.unwrap().into_inner();
    assert_eq!(p.customer_id, "cust-1");
    assert_eq!(
        service.last_metadata("x-purpose").as_deref(),
        Some("service.billing")
    );
    let err = client.get_profile(profile("cust-9")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err = client.get_profile(profile("")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let stats = client
        .get_usage_statistics(UsageStatisticsRequest::default())
        .await
        .unwrap();
    assert_eq!(stats.get_ref().customers, 4);
    assert_eq!(service.calls(), 4);
}

#[tokio::test]
async fn export_streams_the_named_subjects_and_stops_when_cancelled() {
    let (service, mut client, _stop) = start().await;
    let mut request = Request::new(ExportRequest {
        recipient: "ntt-east".into(),
        delay_ms: 0,
    });
    request
        .metadata_mut()
        .append(SUBJECT_METADATA, "cust-1".parse().unwrap());
    request
        .metadata_mut()
        .append(SUBJECT_METADATA, "cust-3".parse().unwrap());
    let mut stream = client
        .export_for_interconnect(request)
        .await
        .unwrap()
        .into_inner();
    let mut ids = Vec::new();
    while let Some(record) = stream.message().await.unwrap() {
        ids.push(record.customer_id);
    }
    assert_eq!(ids, ["cust-1", "cust-3"]);

    let slow = ExportRequest {
        recipient: "isp-partner".into(),
        delay_ms: 10_000,
    };
    let mut stream = client
        .export_for_interconnect(slow)
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());
    assert_eq!(service.open_streams(), 1);
    drop(stream);
    let closed = async {
        while service.open_streams() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), closed)
        .await
        .unwrap();
}

#[tokio::test]
async fn import_counts_updated_and_unknown() {
    let (_service, mut client, _stop) = start().await;
    let update = |id: &str| ContactUpdate {
        customer_id: id.to_owned(),
        email: format!("new.{id}@example.jp"),
        ..Default::default()
    };
    let updates = tokio_stream::iter([update("cust-1"), update("cust-9"), update("cust-2")]);
    let summary = client.import_contacts(updates).await.unwrap().into_inner();
    assert_eq!((summary.updated, summary.unknown), (2, 1));
    let p = client
        .get_profile(profile("cust-2"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.email, "new.cust-2@example.jp");
}

#[tokio::test]
async fn support_session_answers_each_message() {
    let (service, mut client, _stop) = start().await;
    let message = |id: &str| SupportMessage {
        customer_id: id.to_owned(),
        text: "slow".into(),
    };
    let outbound = tokio_stream::iter([message("cust-2"), message("cust-4")]);
    let mut replies = client.support_session(outbound).await.unwrap().into_inner();
    let first = replies.message().await.unwrap().unwrap();
    assert!(first.text.contains("Hikari 10G Mansion"), "{}", first.text);
    let second = replies.message().await.unwrap().unwrap();
    assert!(second.text.contains("VoIP adapter"), "{}", second.text);
    assert!(replies.message().await.unwrap().is_none());
    assert_eq!(service.calls(), 1);
}
