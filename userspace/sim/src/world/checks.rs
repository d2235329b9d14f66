//! The invariants, checked live (2 and 5) and after the cluster settles (1, 2/3).

use super::*;

impl World {
    /// Invariant 5, checked live: a handshake between two nodes that both wrote while
    /// apart must never end in a resync.
    pub(super) fn after_conn_change(&mut self, id: NodeId, before: Vec<Option<ConnState>>) {
        let after = self.conn_states(id);
        for peer in self.peers_of(id) {
            let (b, a) = (before[peer as usize], after[peer as usize]);
            if b == Some(ConnState::Handshaking)
                && matches!(a, Some(ConnState::SyncSource | ConnState::SyncTarget | ConnState::Connected))
            {
                let (x, y) = (id as usize, peer as usize);
                // Only once both ends have decided: the other may still refuse (it takes one
                // resync source at a time), and then nothing was reconciled.
                let theirs = self.nodes[y].node.as_ref().and_then(|n| n.conn(id));
                if !matches!(theirs, Some(ConnState::SyncSource | ConnState::SyncTarget | ConnState::Connected)) {
                    continue;
                }
                if self.wrote_apart[x][y] && self.wrote_apart[y][x] {
                    self.violate(
                        "5 (split brain detected)",
                        format!("nodes {id} and {peer} both wrote while apart, yet the handshake went on to {a:?}"),
                    );
                }
                // The target becomes a copy of the source: it lacks and holds, relative to
                // every other node, exactly what the source does.
                let (source, target) = if a == Some(ConnState::SyncTarget) { (y, x) } else { (x, y) };
                for z in 0..self.cfg.nodes {
                    self.wrote_apart[target][z] = self.wrote_apart[source][z];
                    self.wrote_apart[z][target] = self.wrote_apart[z][source];
                }
                self.wrote_apart[source][target] = false;
                self.wrote_apart[target][source] = false;
                self.log(format!("(truth) node {target} resyncs from node {source}"));
                self.summary.resyncs += 1;
            }
        }
    }
    pub(super) fn violate(&mut self, invariant: &'static str, detail: String) {
        if self.violation.is_none() {
            self.log(format!("VIOLATION of invariant {invariant}: {detail}"));
            self.violation = Some((invariant, detail));
        }
    }
    /// Invariant 2, checked at the moment it matters: a primary writes locally only tracks
    /// that every connected peer's record holds, or, apart, that its persisted metadata does.
    pub(super) fn check_record_covers(&mut self, id: NodeId, offset: u64, len: u64) {
        let node = self.nodes[id as usize].node.as_ref().expect("alive");
        if node.role() != Role::Primary {
            return;
        }
        let span = self.geometry.span(Extent::new(offset, len)).expect("valid write");
        let mut problems = Vec::new();
        let mut apart = Vec::new();
        let extent = Extent::new(offset, len);
        let host = self.nodes[id as usize].host.iter().find(|(_, e)| **e == Some(extent)).map(|(h, _)| *h);
        let accepted = host.and_then(|h| self.accepted_at.get(&h)).copied().unwrap_or(self.now);
        let sent_to = host.and_then(|h| self.sent_to.get(&h)).cloned().unwrap_or_default();
        let durable = &self.nodes[id as usize].disk.meta.out_of_sync;
        for peer in self.peers_of(id) {
            let replicating =
                matches!(node.conn(peer), Some(ConnState::Connected | ConnState::SyncSource | ConnState::SyncTarget));
            let link = &self.links[&key(id, peer)];
            let peer_inc = if id < peer { link.incs.1 } else { link.incs.0 };
            // A peer that crashed since it recorded anything covers nothing; this node's own
            // record of it does (losing this node too would be a second failure).
            let restarted_since = self.nodes[peer as usize].inc != peer_inc
                || (self.nodes[peer as usize].inc > 0 && self.nodes[peer as usize].down_since > accepted);
            let Some(record) =
                self.nodes[peer as usize].node.as_ref().filter(|_| !restarted_since).and_then(|p| p.record(id))
            else {
                continue;
            };
            // Only this node's DestageDone clears the peer's record of it, so the record
            // counts whether or not the connection still stands.
            let peer_covers = |t: u64| record.is_marked(t);
            let missing: Vec<u64> = span.tracks().filter(|t| !peer_covers(*t) && !durable[*t as usize]).collect();
            if !missing.is_empty() {
                problems.push(format!(
                    "tracks {missing:?} are neither in node {peer}'s record nor in the persisted out_of_sync"
                ));
            }
            // Covered only by out_of_sync is apart, unless the connection to that peer began
            // after the write was accepted: its handshake's union then holds these tracks.
            let reconciled = link.connected && link.connected_since > accepted;
            if !replicating || (!reconciled && span.tracks().any(|t| !peer_covers(t) && durable[t as usize])) {
                // Accepted while apart from the peer: the peer cannot see this write.
                apart.push(peer);
            }
        }
        // The peers this write was replicated to acknowledged receipt before it reached
        // this node's device: they hold it too, and so hold what the absent peers lack. A
        // peer that connected after the write was accepted apart never got it.
        let holders: Vec<NodeId> = std::iter::once(id)
            .chain(self.peers_of(id).into_iter().filter(|p| {
                matches!(node.conn(*p), Some(ConnState::Connected | ConnState::SyncSource | ConnState::SyncTarget))
                    && !apart.contains(p)
                    && sent_to.contains(p)
            }))
            .collect();
        for holder in holders {
            for &absent in &apart {
                if holder != absent && !self.wrote_apart[holder as usize][absent as usize] {
                    self.wrote_apart[holder as usize][absent as usize] = true;
                    self.log(format!("(truth) node {holder} now holds writes node {absent} lacks"));
                }
            }
        }
        if !problems.is_empty() && self.cfg.live_record_check {
            self.violate(
                "2 (record covers divergence)",
                format!("primary {id} writes {len} bytes at {offset} locally, but {}", problems.join("; ")),
            );
        }
    }
    pub(super) fn check_end(&mut self) -> Result<(), (&'static str, String)> {
        let images: Vec<Vec<u64>> = self.nodes.iter().map(|n| n.disk.image()).collect();
        for (i, img) in images.iter().enumerate().skip(1) {
            let diff: Vec<String> = img
                .iter()
                .zip(&images[0])
                .enumerate()
                .filter(|(_, (a, b))| a != b)
                .take(8)
                .map(|(blk, (a, b))| {
                    format!("block {blk} (track {}): node 0 has {b}, node {i} has {a}", blk as u64 * BLOCK / 4096)
                })
                .collect();
            if !diff.is_empty() {
                return Err(("2/3 (resync leaves identical replicas)", diff.join("; ")));
            }
        }
        if self.cfg.faults == FaultClass::Single {
            let lost = self.truth.lost_blocks(&images[0]);
            if !lost.is_empty() {
                let shown: Vec<String> = lost.into_iter().take(6).collect();
                return Err(("1 (no acknowledged write lost)", shown.join("; ")));
            }
        }
        self.summary.host_writes = self.truth.issued;
        self.summary.acknowledged = self.truth.acknowledged;
        Ok(())
    }
}
