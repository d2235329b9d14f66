//! The operator and the faults: what breaks, and what a cluster manager does about it.

use super::*;

impl World {
    pub(super) fn inject_fault(&mut self) {
        if self.cfg.faults == FaultClass::Single && (self.faults_active > 0 || !self.healthy()) {
            return;
        }
        let n = self.cfg.nodes as NodeId;
        if self.rng.gen_bool(0.6) {
            let victim = self.rng.gen_range(0..n);
            if self.nodes[victim as usize].node.is_some() {
                self.faults_active += 1;
                match self.rng.gen_range(0..4) {
                    0 => self.stop(victim, Stop::Kill),
                    1 if self.nodes[victim as usize].node.as_ref().is_some_and(|n| n.role() == Role::Secondary) => {
                        self.begin_shutdown(victim)
                    }
                    _ => self.crash(victim),
                }
            }
        } else {
            let a = self.rng.gen_range(0..n);
            let b = (a + self.rng.gen_range(1..n)) % n;
            let silent = self.rng.gen_bool(0.5);
            let link = self.links.get_mut(&key(a, b)).expect("link");
            if link.up {
                link.up = false;
                link.cut_since = self.now;
                self.faults_active += 1;
                self.log(format!("link {a}-{b} CUT ({})", if silent { "silent" } else { "reset" }));
                self.break_link(a, b, None, if silent { 4_000 } else { 200 });
            }
        }
    }
    /// What an operator or cluster manager would do: restart, heal, fail over, fail back,
    /// resolve refusals.
    pub(super) fn operate(&mut self) {
        let chaos = self.cfg.faults == FaultClass::Chaos;
        for id in 0..self.cfg.nodes as NodeId {
            let n = &self.nodes[id as usize];
            let failed = n.node.as_ref().is_some_and(|n| n.disk() == DiskState::Failed);
            if failed {
                self.log(format!("node {id} detached its failed disk; restarting it"));
                self.crash(id);
            } else if n.node.is_none() && self.now - n.down_since > 2_000 && self.rng.gen_bool(0.5) {
                self.boot(id);
                self.faults_active = self.faults_active.saturating_sub(1);
                self.reconnect_all(id);
            }
        }
        let keys: Vec<(NodeId, NodeId)> = self.links.keys().copied().collect();
        for (a, b) in keys {
            let link = &self.links[&(a, b)];
            if !link.up && self.now - link.cut_since > 2_000 && self.rng.gen_bool(0.5) {
                self.links.get_mut(&(a, b)).expect("link").up = true;
                self.faults_active = self.faults_active.saturating_sub(1);
                self.log(format!("link {a}-{b} heals"));
                self.schedule(300, Ev::Connect { a, b });
            }
        }
        self.failover(chaos);
        self.resolve_refusals();
        if self.rng.gen_bool(0.25) {
            self.start_verify();
        }
        if !chaos && self.healthy() && self.rng.gen_bool(0.1) {
            self.failback();
        }
    }
    /// Promotes a secondary when no primary runs: in the single-failure class only when the
    /// primary is really down (a cluster manager with fencing); in chaos, whenever this node
    /// cannot see a primary, which makes split brains.
    pub(super) fn failover(&mut self, chaos: bool) {
        if self.primary().is_some() && !chaos {
            return;
        }
        let n = self.cfg.nodes as NodeId;
        let candidate = self.rng.gen_range(0..n);
        let Some(node) = self.nodes[candidate as usize].node.as_mut() else { return };
        if node.role() == Role::Primary {
            return;
        }
        let sees_primary = (0..n).any(|p| node.peer_state(p).is_some_and(|s| s.role == Role::Primary));
        if chaos && (sees_primary || !self.rng.gen_bool(0.2)) {
            return;
        }
        let force = chaos && self.rng.gen_bool(0.3);
        if node.promote(force).is_ok() {
            self.log(format!("operator promotes node {candidate}{}", if force { " --force" } else { "" }));
            self.drain(candidate);
        }
    }
    /// Promotes the best live replica: an UpToDate one if any, else (forced) a valid one.
    pub(super) fn elect_primary(&mut self) {
        let any_up_to_date =
            self.nodes.iter().any(|n| n.node.as_ref().is_some_and(|n| n.disk() == DiskState::UpToDate));
        // Forcing a stale replica while a current one lives would throw writes away.
        let attempts: &[bool] = if any_up_to_date { &[false] } else { &[false, true] };
        for &force in attempts {
            for id in 0..self.cfg.nodes as NodeId {
                let Some(node) = self.nodes[id as usize].node.as_mut() else { continue };
                let valid = !matches!(node.disk(), DiskState::Inconsistent | DiskState::Failed);
                if valid && node.promote(force).is_ok() {
                    self.log(format!("operator elects node {id} primary{}", if force { " --force" } else { "" }));
                    self.drain(id);
                    return;
                }
            }
        }
    }
    pub(super) fn failback(&mut self) {
        let Some(p) = self.primary() else { return };
        let other = (p + 1) % self.cfg.nodes as NodeId;
        if self.nodes[p as usize].node.as_mut().expect("alive").demote().is_ok() {
            self.drain(p);
            self.log(format!("operator switches primary {p} -> {other}"));
            if self.nodes[other as usize].node.as_mut().expect("alive").promote(false).is_ok() {
                self.drain(other);
            } else {
                self.nodes[p as usize].node.as_mut().expect("alive").promote(false).expect("was primary");
                self.drain(p);
            }
        }
    }
    /// Stand-alone pairs (a split brain or another refusal): the DRBD way, the operator
    /// picks a victim, discards its data (`invalidate`) and connects again.
    pub(super) fn resolve_refusals(&mut self) {
        let primaries =
            self.nodes.iter().filter(|n| n.node.as_ref().is_some_and(|n| n.role() == Role::Primary)).count();
        let keys: Vec<(NodeId, NodeId)> = self.links.keys().copied().collect();
        for (a, b) in keys {
            let (Some(na), Some(nb)) = (self.nodes[a as usize].node.as_ref(), self.nodes[b as usize].node.as_ref())
            else {
                continue;
            };
            if na.conn(b) != Some(ConnState::StandAlone) && nb.conn(a) != Some(ConnState::StandAlone) {
                continue;
            }
            let good = |n: &Node| n.disk() != DiskState::Failed;
            if !good(na) || !good(nb) {
                continue;
            }
            // Split primaries first: until one of them steps down, a secondary between them
            // rightly refuses the second.
            if primaries > 1 && !(na.role() == Role::Primary && nb.role() == Role::Primary) {
                continue;
            }
            // Keep the primary's data, else the better disk, else a's.
            let victim = match (na.role(), nb.role()) {
                (Role::Primary, Role::Secondary) => b,
                (Role::Secondary, Role::Primary) => a,
                _ if na.disk() == DiskState::Inconsistent && nb.disk() != DiskState::Inconsistent => a,
                _ => b,
            };
            let keeper = if victim == a { b } else { a };
            let v = self.nodes[victim as usize].node.as_mut().expect("alive");
            if v.role() == Role::Primary && v.demote().is_err() {
                continue;
            }
            if v.invalidate().is_err() {
                continue;
            }
            v.reconnect(keeper);
            self.drain(victim);
            let k = self.nodes[keeper as usize].node.as_mut().expect("alive");
            if matches!(k.disk(), DiskState::Inconsistent | DiskState::Outdated | DiskState::Consistent) {
                let _ = k.promote(true);
                let _ = k.demote();
            }
            k.reconnect(victim);
            self.drain(keeper);
            // The victim is blank now: it holds nothing any node lacks.
            for z in 0..self.cfg.nodes {
                self.wrote_apart[victim as usize][z] = false;
            }
            self.wrote_apart[keeper as usize][victim as usize] = false;
            self.log(format!("operator resolves {a}-{b}: node {victim} discards its data"));
            self.schedule(300, Ev::Connect { a, b });
        }
    }
    /// `tandem verify` on the primary (or any node while none is primary), while the host
    /// keeps writing and faults keep coming: connected replicas must compare equal.
    pub(super) fn start_verify(&mut self) {
        let id = self.primary().unwrap_or_else(|| self.rng.gen_range(0..self.cfg.nodes as NodeId));
        let tracks = self.geometry.track_count();
        let first = self.rng.gen_range(0..tracks);
        let count = self.rng.gen_range(1..=tracks - first);
        let Some(node) = self.nodes[id as usize].node.as_mut() else { return };
        if let Ok(peer) = node.verify(None, Some((first, count))) {
            self.log(format!("operator verifies node {id} against node {peer}, tracks {first}..+{count}"));
            self.drain(id);
        }
    }

    /// An operator's `down` of a secondary: the node hardens and persists, then exits.
    pub(super) fn begin_shutdown(&mut self, id: NodeId) {
        let secondary = self.nodes[id as usize].node.as_ref().is_some_and(|n| n.role() == Role::Secondary);
        if !secondary || self.stopping.contains(&id) {
            return;
        }
        self.log(format!("operator shuts node {id} down"));
        self.nodes[id as usize].node.as_mut().expect("alive").shutdown().expect("a secondary shuts down");
        self.stopping.push(id);
        self.drain(id);
    }
}
