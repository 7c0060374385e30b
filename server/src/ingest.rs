//! The ship listener (default port 30033): one thread per agent connection, reading
//! frames (`promgate_proto::ship`), validating every archive before use, applying
//! batches to the store and acknowledging each only after its commit is durable.
//!
//! Blocking threads rather than an io_uring executor: there are a handful of agent
//! connections (one per agent shard), each strictly stop-and-wait, and every batch ends in
//! a store commit that blocks on fsync anyway.

use crate::metrics::ServerMetrics;
use crate::store::{ApplyError, ConnRefs, Store};
use promgate_proto::ship::{
    self, access, check_batch, code, open_body, parse_header, Ack, ArchivedHello,
    ArchivedShipBatch, ArchivedSync, ShipError, Welcome, HEADER_BYTES,
};
use rkyv::util::AlignedVec;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

pub fn serve(listener: TcpListener, store: Arc<Store>, metrics: Arc<ServerMetrics>) {
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "ship listener accept failed");
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
        };
        let (store, metrics) = (store.clone(), metrics.clone());
        let spawned = std::thread::Builder::new()
            .name("ship-conn".into())
            .spawn(move || {
                let peer = stream.peer_addr().ok();
                metrics.ship_connections.fetch_add(1, Relaxed);
                if let Err(e) = Connection::new(&store, &metrics).run(stream) {
                    tracing::debug!(?peer, error = %e, "agent connection ended");
                }
                metrics.ship_connections.fetch_sub(1, Relaxed);
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a thread for an agent connection");
        }
    }
}

struct Connection<'a> {
    store: &'a Store,
    metrics: &'a ServerMetrics,
    hello: Option<(String, u32)>,
    /// This connection's series and target references.
    refs: ConnRefs,
    out: Vec<u8>,
}

impl<'a> Connection<'a> {
    fn new(store: &'a Store, metrics: &'a ServerMetrics) -> Self {
        Connection {
            store,
            metrics,
            hello: None,
            refs: ConnRefs::default(),
            out: Vec::new(),
        }
    }

    fn run(mut self, mut s: TcpStream) -> std::io::Result<()> {
        s.set_nodelay(true)?;
        let mut header = [0u8; HEADER_BYTES];
        let mut wire = Vec::new();
        let mut body = AlignedVec::<16>::new();
        loop {
            match s.read_exact(&mut header) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
            let h = match parse_header(&header) {
                Ok(h) => h,
                Err(e) => return self.refuse(&mut s, e.code(), e.to_string()),
            };
            wire.resize(h.len, 0);
            s.read_exact(&mut wire)?;
            self.metrics
                .ship_bytes
                .fetch_add((HEADER_BYTES + h.len) as u64, Relaxed);
            self.metrics.ship_frames.fetch_add(1, Relaxed);
            if let Err(e) = open_body(&h, &wire, &mut body) {
                return self.refuse(&mut s, e.code(), e.to_string());
            }
            let reply = match h.kind {
                ship::KIND_HELLO => self.hello(&body),
                ship::KIND_BATCH => self.batch(&body),
                ship::KIND_SYNC => self.sync(&body),
                k => Err((code::UNEXPECTED, format!("unexpected frame kind {k}"))),
            };
            match reply {
                Ok(()) => {
                    s.write_all(&self.out)?;
                    self.out.clear();
                }
                Err((c, m)) => return self.refuse(&mut s, c, m),
            }
        }
    }

    fn hello(&mut self, body: &[u8]) -> Result<(), (u16, String)> {
        let h = access::<ArchivedHello>(body).map_err(|e| (e.code(), e.to_string()))?;
        let (agent, shard) = (h.agent.to_string(), h.shard.to_native());
        if agent.is_empty() {
            return Err((code::BAD_ARCHIVE, "hello with an empty agent id".into()));
        }
        let l = self.store.hello(&agent, shard, &mut self.refs);
        tracing::info!(%agent, shard, applied_seq = l.applied, durable_seq = l.durable, "agent connected");
        self.hello = Some((agent, shard));
        ship::write_message(
            ship::KIND_WELCOME,
            &Welcome {
                applied_seq: l.applied,
                durable_seq: l.durable,
            },
            false,
            &mut self.out,
        );
        Ok(())
    }

    /// An idle agent asks how far its applied records are durable.
    fn sync(&mut self, body: &[u8]) -> Result<(), (u16, String)> {
        let Some((agent, shard)) = &self.hello else {
            return Err((code::UNEXPECTED, "sync before hello".into()));
        };
        let seq = access::<ArchivedSync>(body)
            .map_err(|e| (e.code(), e.to_string()))?
            .seq
            .to_native();
        let l = self.store.ledger(agent, *shard);
        if l.applied != seq {
            return Err((
                code::SEQUENCE,
                format!(
                    "sync at {seq}, but {} is applied; say hello again",
                    l.applied
                ),
            ));
        }
        let ack = Ack {
            seq,
            durable_seq: l.durable,
        };
        ship::write_message(ship::KIND_ACK, &ack, false, &mut self.out);
        Ok(())
    }

    fn batch(&mut self, body: &[u8]) -> Result<(), (u16, String)> {
        let Some((agent, shard)) = &self.hello else {
            return Err((code::UNEXPECTED, "batch before hello".into()));
        };
        let b = access::<ArchivedShipBatch>(body).map_err(|e| (e.code(), e.to_string()))?;
        check_batch(b).map_err(|e| (e.code(), e.to_string()))?;
        if b.agent.as_str() != agent || b.shard.to_native() != *shard {
            return Err((
                code::BAD_ARCHIVE,
                format!(
                    "batch of {:?} shard {} on the connection of {agent:?} shard {shard}",
                    b.agent.as_str(),
                    b.shard
                ),
            ));
        }
        match self.store.apply(b, &mut self.refs) {
            Ok(_) => {
                let seq = b.last_seq.to_native();
                let durable_seq = self.store.ledger(agent, *shard).durable;
                ship::write_message(
                    ship::KIND_ACK,
                    &Ack { seq, durable_seq },
                    false,
                    &mut self.out,
                );
                Ok(())
            }
            Err(ApplyError::Batch(m)) => Err((code::BAD_ARCHIVE, m)),
            Err(ApplyError::Sequence(m)) => Err((code::SEQUENCE, m)),
            Err(ApplyError::Storage(m)) => {
                tracing::error!(error = %m, "store commit failed; the agent will retry");
                Err((code::STORAGE, format!("store commit failed: {m}")))
            }
        }
    }

    /// Answers with an error frame and ends the connection.
    fn refuse(&mut self, s: &mut TcpStream, c: u16, message: String) -> std::io::Result<()> {
        self.metrics.ship_errors[usize::from(c).min(7)].fetch_add(1, Relaxed);
        if c != code::STORAGE {
            tracing::warn!(code = c, %message, "refused a frame from an agent");
        }
        self.out.clear();
        ship::write_message(
            ship::KIND_ERROR,
            &ShipError { code: c, message },
            false,
            &mut self.out,
        );
        let _ = s.write_all(&self.out);
        let _ = s.shutdown(std::net::Shutdown::Both);
        Ok(())
    }
}
