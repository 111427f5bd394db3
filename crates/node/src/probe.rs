//! The probe channel's calling side: one message to a peer and its decoded answer, within a
//! deadline. Lease renewals and forwarded host probe reports go through here; the answering
//! side is `probe_answer`.

use std::time::Duration;

use bytes::Bytes;
use tandem_transport::Transport;
use tandem_types::Channel;
use tandem_types::NodeId;
use tandem_wire::data::{ProbeMsg, ProbeReply};

/// Sends `msg` to node `to` on the probe channel and decodes its answer, within `timeout`.
pub(crate) async fn probe_call(
    transport: &dyn Transport,
    to: NodeId,
    msg: &ProbeMsg,
    timeout: Duration,
) -> Result<ProbeReply, String> {
    let payload = msg.encode().map_err(|e| e.to_string())?;
    let call = async {
        let bytes = transport.call(to, Channel::Probe, Bytes::from(payload)).await.map_err(|e| e.to_string())?;
        ProbeReply::decode(&bytes).map_err(|e| e.to_string())
    };
    tokio::time::timeout(timeout, call).await.map_err(|_| format!("no answer within {} ms", timeout.as_millis()))?
}

/// A [`Transport`] without sockets, for tests of the node's decisions: it records what it was
/// asked to send and answers every call the same way.
#[cfg(test)]
pub(crate) mod fake {
    use std::sync::Mutex;

    use bytes::Bytes;
    use tandem_transport::{BoxFuture, Transport, TransportError};
    use tandem_types::Channel;
    use tandem_types::NodeId;
    use tandem_wire::data::{ProbeMsg, ProbeReply};

    /// How the fake peer answers.
    pub(crate) enum Answer {
        Reply(ProbeReply),
        /// The call fails (the peer is unreachable).
        Unreachable,
        /// No answer ever comes.
        Silent,
    }

    pub(crate) struct FakeTransport {
        answer: Answer,
        sent: Mutex<Vec<(NodeId, Channel, ProbeMsg)>>,
    }

    impl FakeTransport {
        pub(crate) fn new(answer: Answer) -> FakeTransport {
            FakeTransport { answer, sent: Mutex::new(Vec::new()) }
        }

        /// Every message sent so far: (peer, channel, message).
        pub(crate) fn sent(&self) -> Vec<(NodeId, Channel, ProbeMsg)> {
            self.sent.lock().expect("sent lock").clone()
        }
    }

    impl Transport for FakeTransport {
        fn call(&self, peer: NodeId, channel: Channel, payload: Bytes) -> BoxFuture<'_, Result<Bytes, TransportError>> {
            let msg = ProbeMsg::decode(&payload).expect("a probe message");
            self.sent.lock().expect("sent lock").push((peer, channel, msg));
            match &self.answer {
                Answer::Reply(reply) => {
                    let bytes = Bytes::from(reply.encode().expect("encodes"));
                    Box::pin(async move { Ok(bytes) })
                }
                Answer::Unreachable => {
                    Box::pin(async move { Err(TransportError::Unreachable { peer, reason: "cut off (fake)".into() }) })
                }
                Answer::Silent => Box::pin(std::future::pending()),
            }
        }

        fn set_peer_addr(&self, _peer: NodeId, _addr: std::net::SocketAddr) {}
    }
}

#[cfg(test)]
mod tests {
    use super::fake::{Answer, FakeTransport};
    use super::*;

    #[tokio::test]
    async fn a_call_goes_to_the_peer_on_the_probe_channel_and_decodes_its_answer() {
        let t = FakeTransport::new(Answer::Reply(ProbeReply::Pong));
        let reply = probe_call(&t, NodeId(3), &ProbeMsg::Ping, Duration::from_secs(5)).await;
        assert_eq!(reply, Ok(ProbeReply::Pong));
        assert_eq!(t.sent(), vec![(NodeId(3), Channel::Probe, ProbeMsg::Ping)]);
    }

    #[tokio::test]
    async fn a_silent_peer_costs_the_timeout_and_no_more() {
        let t = FakeTransport::new(Answer::Silent);
        let reply = probe_call(&t, NodeId(2), &ProbeMsg::Ping, Duration::from_millis(20)).await;
        assert_eq!(reply, Err("no answer within 20 ms".to_string()));
    }

    #[tokio::test]
    async fn an_unreachable_peer_is_an_error() {
        let t = FakeTransport::new(Answer::Unreachable);
        let reply = probe_call(&t, NodeId(2), &ProbeMsg::Ping, Duration::from_secs(5)).await;
        assert!(reply.as_ref().is_err_and(|e| e.contains("unreachable")), "{reply:?}");
    }
}
