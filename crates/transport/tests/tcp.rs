//! The TCP transport between two in-process endpoints: round trips on every channel, remote
//! errors, reconnect after the server restarts, and refusal of certificates from another CA.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tandem_transport::tcp::{TcpServer, TcpTransport};
use tandem_transport::tls::{generate_ca, issue_node_cert, Identity, PemPair};
use tandem_transport::{BoxFuture, Channel, Handler, Transport, TransportError};
use tandem_types::NodeId;
use tokio::net::TcpListener;

/// Echoes the payload, prefixed with the sender's id; fails on the payload "fail".
struct Echo;

impl Handler for Echo {
    fn handle(
        &self,
        from: NodeId,
        channel: Channel,
        payload: Bytes,
    ) -> BoxFuture<'_, Result<Bytes, String>> {
        Box::pin(async move {
            if &payload[..] == b"fail" {
                return Err(format!("refused on {channel}"));
            }
            let mut out = from.to_be_bytes().to_vec();
            out.extend_from_slice(&payload);
            Ok(Bytes::from(out))
        })
    }
}

struct Ca {
    name: &'static str,
    ca: PemPair,
}

impl Ca {
    fn new(name: &'static str) -> Ca {
        Ca {
            name,
            ca: generate_ca(name).expect("ca"),
        }
    }
    fn identity(&self, id: NodeId) -> Identity {
        let pair = issue_node_cert(self.name, &self.ca.key_pem, id).expect("node cert");
        Identity::from_pem(id, &self.ca.cert_pem, &pair).expect("identity")
    }
}

async fn server(identity: &Identity) -> TcpServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    TcpServer::start(listener, identity, Arc::new(Echo)).expect("server")
}

#[tokio::test]
async fn round_trips_on_every_channel_and_size() {
    let ca = Ca::new("rt");
    let srv = server(&ca.identity(2)).await;
    let client = TcpTransport::new(ca.identity(1)).expect("client");
    client.set_peer_addr(2, srv.local_addr);
    for channel in Channel::ALL {
        for size in [0usize, 1, 4096, 8 * 1024 * 1024] {
            let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let reply = client
                .call(2, channel, Bytes::from(payload.clone()))
                .await
                .expect("call");
            assert_eq!(
                &reply[..8],
                &1u64.to_be_bytes(),
                "server saw the authenticated sender id"
            );
            assert_eq!(
                &reply[8..],
                &payload[..],
                "payload of {size} bytes on {channel}"
            );
        }
    }
    let err = client
        .call(2, Channel::Control, Bytes::from_static(b"fail"))
        .await
        .expect_err("remote error");
    assert!(
        matches!(err, TransportError::Remote { peer: 2, ref reason } if reason.contains("control")),
        "{err}"
    );
    let stats = client.link_stats();
    assert_eq!(stats.len(), 4);
    assert!(stats.iter().all(|s| s.connected && s.messages_sent >= 4));
}

#[tokio::test]
async fn many_concurrent_requests_share_a_link() {
    let ca = Ca::new("conc");
    let srv = server(&ca.identity(2)).await;
    let client = TcpTransport::new(ca.identity(1)).expect("client");
    client.set_peer_addr(2, srv.local_addr);
    let mut tasks = Vec::new();
    for i in 0..500u32 {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            let reply = c
                .call(
                    2,
                    Channel::Replication,
                    Bytes::from(i.to_be_bytes().to_vec()),
                )
                .await
                .expect("call");
            assert_eq!(&reply[8..], &i.to_be_bytes());
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    assert_eq!(client.link_stats()[0].reconnects, 0);
}

#[tokio::test]
async fn reconnects_after_the_server_restarts() {
    let ca = Ca::new("re");
    let identity = ca.identity(2);
    let srv = server(&identity).await;
    let addr = srv.local_addr;
    let client = TcpTransport::new(ca.identity(1)).expect("client");
    client.set_peer_addr(2, addr);
    client
        .call(2, Channel::Control, Bytes::from_static(b"a"))
        .await
        .expect("first call");
    drop(srv);
    // Rebind the same port; poll until the client gets through again.
    let listener = loop {
        match TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let _srv = TcpServer::start(listener, &identity, Arc::new(Echo)).expect("server");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match client
            .call(2, Channel::Control, Bytes::from_static(b"b"))
            .await
        {
            Ok(reply) => {
                assert_eq!(&reply[8..], b"b");
                break;
            }
            Err(e) => {
                assert!(matches!(e, TransportError::Unreachable { .. }), "{e}");
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "never reconnected: {e}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test]
async fn a_peer_from_another_ca_is_refused_both_ways() {
    let ours = Ca::new("ours");
    let theirs = Ca::new("theirs");
    let srv = server(&ours.identity(2)).await;

    // A client holding a certificate from another CA cannot call our node.
    let intruder = TcpTransport::new(theirs.identity(1)).expect("client");
    intruder.set_peer_addr(2, srv.local_addr);
    let err = intruder
        .call(2, Channel::Control, Bytes::from_static(b"x"))
        .await
        .expect_err("refused");
    assert!(matches!(err, TransportError::Unreachable { .. }), "{err}");

    // And our node does not talk to a server of another CA.
    let foreign = server(&theirs.identity(3)).await;
    let client = TcpTransport::new(ours.identity(1)).expect("client");
    client.set_peer_addr(3, foreign.local_addr);
    let err = client
        .call(3, Channel::Control, Bytes::from_static(b"x"))
        .await
        .expect_err("refused");
    assert!(matches!(err, TransportError::Unreachable { .. }), "{err}");
}

#[tokio::test]
async fn a_node_cannot_claim_another_nodes_id() {
    let ca = Ca::new("claim");
    let srv = server(&ca.identity(2)).await;
    // Node 1's certificate, but the client says it is node 3 in its hello.
    let pair = issue_node_cert("claim", &ca.ca.key_pem, 1).expect("cert");
    let liar = TcpTransport::new(Identity::from_pem(3, &ca.ca.cert_pem, &pair).expect("identity"))
        .expect("client");
    liar.set_peer_addr(2, srv.local_addr);
    let err = liar
        .call(2, Channel::Control, Bytes::from_static(b"x"))
        .await
        .expect_err("refused");
    assert!(matches!(err, TransportError::Unreachable { .. }), "{err}");
}
