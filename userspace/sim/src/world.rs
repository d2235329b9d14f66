//! The simulated cluster: nodes, their disks, the links between them, the host workload and
//! the operator, all driven from one seeded event queue.

use crate::disk::{payload_for, Disk, HardenSet, BLOCK};
use crate::truth::Truth;
use crate::{FaultClass, SimConfig, Summary};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use tandem_core::node::{Action, Event, IoError, IoId, Meta, Node, NodeConfig, Payload, Refusal, Timer};
use tandem_core::wire::Message;
use tandem_core::{ConnState, DiskState, Extent, Geometry, NodeId, Role};

mod checks;
mod operator;
mod script;

const TRACE_KEEP: usize = 80;

#[derive(Debug)]
enum IoKind {
    Write { offset: u64, payload: Payload, fua: bool },
    Read { offset: u64, len: u64 },
    Harden(HardenSet),
    Meta(Box<Meta>),
}

#[derive(Debug)]
enum Ev {
    Deliver { from: NodeId, to: NodeId, epoch: u64, msg: Box<Message> },
    Io { node: NodeId, inc: u64, io: IoId, kind: IoKind, fail: bool },
    Timer { node: NodeId, inc: u64, timer: Timer },
    PeerLost { node: NodeId, peer: NodeId, inc: u64 },
    Connect { a: NodeId, b: NodeId },
    Writeback { node: NodeId },
    Step,
}

struct SimNode {
    node: Option<Node>,
    disk: Disk,
    /// Bumped at every crash: events of an earlier life are dropped.
    inc: u64,
    writes_in_flight: BTreeMap<IoId, (u64, Payload)>,
    /// A metadata write in flight: on a crash it may or may not have landed.
    meta_in_flight: Option<Meta>,
    down_since: u64,
    /// Host requests in flight: id → extent (None for flushes).
    host: BTreeMap<u64, Option<Extent>>,
}

#[derive(Default)]
struct Link {
    up: bool,
    connected: bool,
    epoch: u64,
    /// Incarnations of both ends when the connection was made.
    incs: (u64, u64),
    last_delivery: [u64; 2],
    /// PeerLost notifications not yet delivered: no new connection before they are.
    lost_pending: u32,
    cut_since: u64,
    /// When the current connection was made: its handshake carries every record as of then.
    connected_since: u64,
}

pub struct World {
    cfg: SimConfig,
    seed: u64,
    rng: SmallRng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: BTreeMap<u64, Ev>,
    nodes: Vec<SimNode>,
    links: BTreeMap<(NodeId, NodeId), Link>,
    geometry: Geometry,
    truth: Truth,
    next_value: u64,
    next_host_id: u64,
    steps_left: usize,
    /// wrote_apart[x][y]: x wrote locally as primary while not replicating to y.
    wrote_apart: Vec<Vec<bool>>,
    /// When each host write was accepted.
    accepted_at: std::collections::HashMap<u64, u64>,
    /// The peers each host write's `Data`/`Discard` was sent to: only they can hold it.
    sent_to: std::collections::HashMap<u64, Vec<NodeId>>,
    faults_active: u32,
    /// Nodes in an orderly shutdown, stopped once their metadata says clean.
    stopping: Vec<NodeId>,
    trace: VecDeque<String>,
    pub summary: Summary,
    /// Tracks the last completed resync shipped (from its `ResyncEnd`).
    last_resync_shipped: u64,
    violation: Option<(&'static str, String)>,
    /// Blocks a script damaged behind the protocol's back: only then may a verify between
    /// connected replicas find differences.
    corrupted: Vec<(NodeId, u64)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// The machine loses power: the device cache is gone.
    PowerLoss,
    /// The daemon is killed: its memory is gone, the kernel's cache is not.
    Kill,
    /// The daemon finished an orderly shutdown.
    Clean,
}

impl Stop {
    fn describe(self) -> &'static str {
        match self {
            Stop::PowerLoss => "CRASHES (power loss)",
            Stop::Kill => "daemon KILLED",
            Stop::Clean => "stops cleanly",
        }
    }
}

fn key(a: NodeId, b: NodeId) -> (NodeId, NodeId) {
    (a.min(b), a.max(b))
}

impl World {
    pub fn new(seed: u64, cfg: SimConfig) -> Self {
        let geometry = Geometry::new(16 * 4096, 512, 4096, 4).expect("sim geometry");
        let initial = Meta::fresh(&geometry, 0x5EED_0000 ^ seed | 1);
        let n = cfg.nodes;
        let mut w = World {
            seed,
            rng: SmallRng::seed_from_u64(seed),
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            nodes: Vec::new(),
            links: BTreeMap::new(),
            truth: Truth::new((geometry.volume_size() / BLOCK) as usize),
            next_value: 1,
            next_host_id: 1,
            steps_left: cfg.steps,
            wrote_apart: vec![vec![false; n]; n],
            accepted_at: std::collections::HashMap::new(),
            sent_to: std::collections::HashMap::new(),
            faults_active: 0,
            stopping: Vec::new(),
            trace: VecDeque::new(),
            summary: Summary::default(),
            last_resync_shipped: 0,
            violation: None,
            corrupted: Vec::new(),
            geometry,
            cfg,
        };
        for i in 0..n {
            w.nodes.push(SimNode {
                node: None,
                disk: Disk::new(geometry, initial.clone()),
                inc: 0,
                writes_in_flight: BTreeMap::new(),
                meta_in_flight: None,
                down_since: 0,
                host: BTreeMap::new(),
            });
            w.boot(i as NodeId);
        }
        for a in 0..n as NodeId {
            for b in a + 1..n as NodeId {
                w.links.insert((a, b), Link { up: true, ..Link::default() });
                w.schedule(100, Ev::Connect { a, b });
            }
        }
        w.nodes[0].node.as_mut().expect("booted").promote(false).expect("fresh node promotes");
        w.drain(0);
        w.schedule(10, Ev::Step);
        w
    }

    fn log(&mut self, line: String) {
        if self.cfg.verbose {
            println!("{:>9} {line}", self.now);
        }
        self.trace.push_back(format!("{:>9} {line}", self.now));
        if self.trace.len() > TRACE_KEEP {
            self.trace.pop_front();
        }
    }

    pub fn trace(&self) -> Vec<String> {
        self.trace.iter().cloned().collect()
    }

    fn schedule(&mut self, delay: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((self.now + delay, self.seq)));
        self.events.insert(self.seq, ev);
    }

    fn peers_of(&self, id: NodeId) -> Vec<NodeId> {
        (0..self.cfg.nodes as NodeId).filter(|p| *p != id).collect()
    }

    fn boot(&mut self, id: NodeId) {
        let n = &mut self.nodes[id as usize];
        let mut cfg = NodeConfig::new(
            id,
            (0..self.cfg.nodes as NodeId).filter(|p| *p != id).collect(),
            self.geometry,
            self.cfg.mode,
        );
        cfg.destage_interval = 3_000;
        cfg.resync_window = 4;
        let mut node =
            Node::new(cfg, n.disk.meta.clone(), self.seed.wrapping_mul(31).wrapping_add(id as u64 * 1000 + n.inc))
                .expect("the simulator builds valid configurations");
        node.plant_bugs(self.cfg.bugs);
        node.start(self.now);
        if node.generations().current == 0 {
            // A blank replica (its disk failed) discards everything it wrote: no merge.
            for peer in 0..self.cfg.nodes {
                self.wrote_apart[id as usize][peer] = false;
            }
        }
        n.node = Some(node);
        self.log(format!("node {id} boots (life {})", self.nodes[id as usize].inc));
        self.drain(id);
        self.schedule(500, Ev::Writeback { node: id });
    }

    /// Feeds one event to a node and carries out what it asks for.
    fn feed(&mut self, id: NodeId, ev: Event) {
        let before: Vec<Option<ConnState>> = self.conn_states(id);
        let Some(node) = self.nodes[id as usize].node.as_mut() else { return };
        node.handle(self.now, ev);
        self.drain(id);
        self.after_conn_change(id, before);
        if self.stopping.contains(&id) && self.nodes[id as usize].node.as_ref().is_some_and(|n| n.is_down()) {
            self.stop(id, Stop::Clean);
        }
    }

    fn conn_states(&self, id: NodeId) -> Vec<Option<ConnState>> {
        let node = self.nodes[id as usize].node.as_ref();
        (0..self.cfg.nodes as NodeId).map(|p| node.and_then(|n| n.conn(p))).collect()
    }

    fn drain(&mut self, id: NodeId) {
        loop {
            let Some(action) = self.nodes[id as usize].node.as_mut().and_then(|n| n.poll()) else { break };
            self.act(id, action);
        }
    }

    fn io_delay(&mut self, lo: u64, hi: u64) -> u64 {
        self.rng.gen_range(lo..hi)
    }

    fn act(&mut self, id: NodeId, action: Action) {
        let inc = self.nodes[id as usize].inc;
        match action {
            Action::WriteLocal { io, offset, payload, fua } => {
                self.check_record_covers(id, offset, payload.len());
                self.nodes[id as usize].writes_in_flight.insert(io, (offset, payload.clone()));
                let fail = self.disk_fault();
                let d = self.io_delay(5, if fua { 400 } else { 150 });
                self.schedule(d, Ev::Io { node: id, inc, io, kind: IoKind::Write { offset, payload, fua }, fail });
            }
            Action::ReadLocal { io, offset, len } => {
                let d = self.io_delay(5, 150);
                self.schedule(d, Ev::Io { node: id, inc, io, kind: IoKind::Read { offset, len }, fail: false });
            }
            Action::Harden { io, scope } => {
                let set = self.nodes[id as usize].disk.harden_set(scope);
                let d = self.io_delay(50, 800);
                self.schedule(d, Ev::Io { node: id, inc, io, kind: IoKind::Harden(set), fail: false });
            }
            Action::PersistMeta { io, meta } => {
                self.nodes[id as usize].meta_in_flight = Some(meta.clone());
                let d = self.io_delay(50, 600);
                self.schedule(d, Ev::Io { node: id, inc, io, kind: IoKind::Meta(Box::new(meta)), fail: false });
            }
            Action::Send { peer, msg } => {
                let extent = match &msg {
                    Message::Data { offset, payload, .. } => Some(Extent::new(*offset, payload.len() as u64)),
                    Message::Discard { offset, len, .. } => Some(Extent::new(*offset, *len)),
                    _ => None,
                };
                // Host writes in flight never overlap: the extent names the write.
                let host = extent.and_then(|e| self.nodes[id as usize].host.iter().find(|(_, x)| **x == Some(e)));
                if let Some((&h, _)) = host {
                    self.sent_to.entry(h).or_default().push(peer);
                }
                self.send(id, peer, msg)
            }
            Action::CompleteHost { id: host_id, result } => {
                self.nodes[id as usize].host.remove(&host_id);
                self.sent_to.remove(&host_id);
                match result {
                    Ok(()) => self.truth.ack(host_id),
                    Err(_) => self.truth.fail(host_id),
                }
            }
            Action::SetTimer { timer, at } => {
                let d = at.saturating_sub(self.now);
                self.schedule(d, Ev::Timer { node: id, inc, timer });
            }
            Action::Disconnect { peer, reason, stand_alone } => {
                self.log(format!("node {id} drops {peer}: {reason} (stand-alone: {stand_alone})"));
                if matches!(reason, Refusal::SplitBrain { .. }) {
                    self.summary.split_brains += 1;
                }
                if let (Refusal::VerifyDiffers { tracks }, true) = (&reason, self.corrupted.is_empty()) {
                    self.violate(
                        "3 (connected replicas are identical)",
                        format!("node {id}'s verify found {tracks} tracks differing from node {peer}'s"),
                    );
                }
                if let Refusal::Protocol(why) = &reason {
                    // The protocol never expects its own messages to be refused.
                    self.violate("protocol", format!("node {id} refused node {peer}: {why}"));
                }
                self.break_link(id, peer, Some(id), 100);
            }
        }
    }

    fn disk_fault(&mut self) -> bool {
        if !self.cfg.disk_faults {
            return false;
        }
        match self.cfg.faults {
            FaultClass::Single => self.rng.gen_bool(0.0005),
            FaultClass::Chaos => self.rng.gen_bool(0.001),
        }
    }

    fn send(&mut self, from: NodeId, to: NodeId, msg: Message) {
        let link = self.links.get_mut(&key(from, to)).expect("link");
        if !link.connected {
            return;
        }
        let dir = usize::from(from > to);
        let delay = self.rng.gen_range(20..800);
        // TCP: in order on one connection, whatever the delay of each segment.
        let at = (self.now + delay).max(link.last_delivery[dir]);
        link.last_delivery[dir] = at;
        let epoch = link.epoch;
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq)));
        self.events.insert(self.seq, Ev::Deliver { from, to, epoch, msg: Box::new(msg) });
    }

    /// Ends the connection between a and b. `told` already knows (it asked for it); the
    /// other ends learn after `detect` (a reset is quick, a silent partition takes the
    /// keepalive timeout).
    fn break_link(&mut self, a: NodeId, b: NodeId, told: Option<NodeId>, detect: u64) {
        let link = self.links.get_mut(&key(a, b)).expect("link");
        if !link.connected {
            return;
        }
        link.connected = false;
        link.epoch += 1;
        for n in [a, b] {
            if Some(n) != told && self.nodes[n as usize].node.is_some() {
                let peer = if n == a { b } else { a };
                let inc = self.nodes[n as usize].inc;
                self.links.get_mut(&key(a, b)).expect("link").lost_pending += 1;
                self.schedule(detect, Ev::PeerLost { node: n, peer, inc });
            }
        }
    }

    fn try_connect(&mut self, a: NodeId, b: NodeId) {
        let alive = self.nodes[a as usize].node.is_some() && self.nodes[b as usize].node.is_some();
        let link = &self.links[&key(a, b)];
        if !alive || !link.up || link.connected || link.lost_pending > 0 {
            return;
        }
        let stand_alone = [(a, b), (b, a)].iter().any(|(x, y)| {
            self.nodes[*x as usize].node.as_ref().and_then(|n| n.conn(*y)) == Some(ConnState::StandAlone)
        });
        if stand_alone {
            return;
        }
        let incs = (self.nodes[a as usize].inc, self.nodes[b as usize].inc);
        let link = self.links.get_mut(&key(a, b)).expect("link");
        link.connected = true;
        link.connected_since = self.now;
        link.epoch += 1;
        link.incs = incs;
        link.last_delivery = [self.now; 2];
        self.log(format!("link {a}-{b} connects"));
        self.feed(a, Event::PeerConnected { peer: b });
        self.feed(b, Event::PeerConnected { peer: a });
    }

    fn crash(&mut self, id: NodeId) {
        self.stop(id, Stop::PowerLoss);
    }

    /// Takes a node down. A power loss loses the device cache; a killed daemon (or one that
    /// finished an orderly shutdown) leaves it, since the cache belongs to the kernel.
    fn stop(&mut self, id: NodeId, how: Stop) {
        if self.nodes[id as usize].node.is_none() {
            return;
        }
        self.log(format!("node {id} {}", how.describe()));
        self.summary.crashes += 1;
        self.stopping.retain(|s| *s != id);
        let n = &mut self.nodes[id as usize];
        n.node = None;
        n.inc += 1;
        n.down_since = self.now;
        let in_flight: Vec<(u64, Payload)> = std::mem::take(&mut n.writes_in_flight).into_values().collect();
        match how {
            Stop::PowerLoss => n.disk.crash(&mut self.rng, &in_flight),
            Stop::Kill | Stop::Clean => {
                for (offset, payload) in &in_flight {
                    if self.rng.gen_bool(0.5) {
                        n.disk.complete_write(*offset, payload, false);
                    }
                }
            }
        }
        if let Some(meta) = n.meta_in_flight.take() {
            if self.rng.gen_bool(0.5) {
                n.disk.meta = meta;
            }
        }
        for host_id in std::mem::take(&mut self.nodes[id as usize].host).into_keys() {
            self.truth.fail(host_id);
        }
        for peer in self.peers_of(id) {
            let detect = if how != Stop::PowerLoss || self.rng.gen_bool(0.5) { 300 } else { 4_000 };
            self.break_link(id, peer, Some(id), detect);
        }
    }

    fn healthy(&self) -> bool {
        self.nodes.iter().enumerate().all(|(i, n)| {
            n.node.as_ref().is_some_and(|node| {
                node.disk() == DiskState::UpToDate
                    && self
                        .peers_of(i as NodeId)
                        .iter()
                        .all(|p| matches!(node.conn(*p), Some(ConnState::Connected | ConnState::Idle)))
            })
        }) && self.links.values().all(|l| l.up && l.connected)
    }

    fn primary(&self) -> Option<NodeId> {
        self.nodes.iter().position(|n| n.node.as_ref().is_some_and(|n| n.role() == Role::Primary)).map(|i| i as NodeId)
    }

    /// One step of the scenario: host I/O, a fault, or an operator's move.
    fn step(&mut self) {
        if self.steps_left == 0 {
            return;
        }
        self.steps_left -= 1;
        let roll = self.rng.gen_range(0..100);
        match roll {
            0..=79 => self.host_io(),
            80..=84 => self.inject_fault(),
            _ => self.operate(),
        }
        let d = self.rng.gen_range(20..300);
        self.schedule(d, Ev::Step);
    }

    fn host_io(&mut self) {
        let Some(p) = self.primary() else { return };
        if self.nodes[p as usize].host.len() >= 4 {
            return;
        }
        let host_id = self.next_host_id;
        self.next_host_id += 1;
        let kind = self.rng.gen_range(0..100);
        if kind < 6 {
            self.nodes[p as usize].host.insert(host_id, None);
            self.log(format!("host FLUSH #{host_id} at {p}"));
            return self.feed(p, Event::HostFlush { id: host_id });
        }
        let blocks_total = self.geometry.volume_size() / BLOCK;
        // Hot spots: most writes land in the first quarter, where tracks get rewritten.
        let span_blocks = if self.rng.gen_bool(0.7) { blocks_total / 4 } else { blocks_total };
        let len = self.rng.gen_range(1..=16u64);
        let start = self.rng.gen_range(0..span_blocks.saturating_sub(len).max(1));
        let extent = Extent::new(start * BLOCK, len * BLOCK);
        let busy =
            self.nodes[p as usize].host.values().flatten().any(|e| e.offset < extent.end() && extent.offset < e.end());
        if busy {
            return; // hosts do not race writes to the same blocks
        }
        self.nodes[p as usize].host.insert(host_id, Some(extent));
        self.accepted_at.insert(host_id, self.now);
        if kind < 12 {
            self.truth.issue(host_id, 0, extent);
            self.log(format!("host DISCARD #{host_id} at {p}: {} blocks at block {start}", len));
            return self
                .feed(p, Event::HostDiscard { id: host_id, offset: extent.offset, len: extent.len, zeroes: kind < 9 });
        }
        let value = self.next_value;
        self.next_value += 1;
        self.truth.issue(host_id, value, extent);
        let fua = kind >= 95;
        self.log(format!(
            "host WRITE #{host_id} at {p}: value {value}, {len} blocks at block {start}{}",
            if fua { " FUA" } else { "" }
        ));
        self.feed(p, Event::HostWrite { id: host_id, offset: extent.offset, data: payload_for(value, len), fua });
    }

    fn reconnect_all(&mut self, id: NodeId) {
        for peer in self.peers_of(id) {
            self.schedule(300, Ev::Connect { a: id.min(peer), b: id.max(peer) });
        }
    }

    fn dispatch(&mut self, ev: Ev) {
        match ev {
            Ev::Deliver { from, to, epoch, msg } => {
                if self.links[&key(from, to)].epoch != epoch {
                    return;
                }
                self.summary.messages += 1;
                match *msg {
                    Message::ResyncEnd { tracks } => self.last_resync_shipped = tracks,
                    Message::VerifyReply { .. } => self.summary.verified_tracks += 1,
                    _ => {}
                }
                self.log(format!("{from} -> {to}: {}", describe(&msg)));
                self.feed(to, Event::Received { peer: from, msg: *msg });
            }
            Ev::Io { node, inc, io, kind, fail } => {
                if self.nodes[node as usize].inc != inc {
                    return;
                }
                // A media error strikes when the I/O completes: in the single-failure class
                // only if nothing else has failed by then.
                let fail =
                    fail && (self.cfg.faults == FaultClass::Chaos || (self.faults_active == 0 && self.healthy()));
                if fail && self.cfg.faults == FaultClass::Single {
                    self.faults_active += 1;
                }
                let n = &mut self.nodes[node as usize];
                let result = if fail {
                    n.writes_in_flight.remove(&io);
                    self.log(format!("node {node}: injected I/O error on io {io}"));
                    Err(IoError("injected media error".into()))
                } else {
                    match kind {
                        IoKind::Write { offset, payload, fua } => {
                            n.writes_in_flight.remove(&io);
                            n.disk.complete_write(offset, &payload, fua);
                            Ok(None)
                        }
                        IoKind::Read { offset, len } => Ok(Some(n.disk.read(offset, len))),
                        IoKind::Harden(set) => {
                            n.disk.complete_harden(&set);
                            Ok(None)
                        }
                        IoKind::Meta(meta) => {
                            n.meta_in_flight = None;
                            n.disk.meta = *meta;
                            Ok(None)
                        }
                    }
                };
                self.feed(node, Event::IoDone { io, result });
            }
            Ev::Timer { node, inc, timer } => {
                if self.nodes[node as usize].inc == inc {
                    self.feed(node, Event::Timer(timer));
                }
            }
            Ev::PeerLost { node, peer, inc } => {
                let link = self.links.get_mut(&key(node, peer)).expect("link");
                link.lost_pending -= 1;
                if self.nodes[node as usize].inc == inc {
                    self.log(format!("node {node} loses peer {peer}"));
                    self.feed(node, Event::PeerLost { peer });
                }
                self.schedule(300, Ev::Connect { a: node.min(peer), b: node.max(peer) });
            }
            Ev::Connect { a, b } => self.try_connect(a, b),
            Ev::Writeback { node } => {
                let n = &mut self.nodes[node as usize];
                if n.node.is_some() {
                    n.disk.writeback_some(&mut self.rng);
                    self.schedule(2_000, Ev::Writeback { node });
                }
            }
            Ev::Step => self.step(),
        }
    }

    /// Runs the scenario, then heals everything and lets the cluster settle.
    pub fn run(&mut self) -> Result<(), (&'static str, String)> {
        while self.steps_left > 0 {
            if !self.next_event() {
                break;
            }
            if let Some(v) = self.violation.take() {
                return Err(v);
            }
        }
        self.settle()?;
        self.check_end()
    }

    fn next_event(&mut self) -> bool {
        let Some(Reverse((at, seq))) = self.queue.pop() else { return false };
        self.now = at;
        let ev = self.events.remove(&seq).expect("scheduled event");
        self.summary.events += 1;
        self.dispatch(ev);
        true
    }

    fn settled(&self) -> bool {
        self.healthy()
            && self.nodes.iter().all(|n| n.node.as_ref().is_some_and(|n| n.is_quiet()) && n.host.is_empty())
            && !self.events.values().any(|e| matches!(e, Ev::Deliver { .. } | Ev::Io { .. } | Ev::PeerLost { .. }))
    }

    fn settle(&mut self) -> Result<(), (&'static str, String)> {
        let deadline = self.now + 2_000_000;
        let mut next_operator = self.now;
        let keys: Vec<(NodeId, NodeId)> = self.links.keys().copied().collect();
        for (a, b) in keys {
            let link = self.links.get_mut(&(a, b)).expect("link");
            if !link.up {
                link.up = true;
                self.schedule(300, Ev::Connect { a, b });
            }
        }
        self.faults_active = 0;
        while !self.settled() {
            if self.now >= next_operator {
                next_operator = self.now + 1_000;
                for id in 0..self.cfg.nodes as NodeId {
                    let n = &self.nodes[id as usize];
                    if n.node.is_none() {
                        self.boot(id);
                        self.reconnect_all(id);
                    } else if n.node.as_ref().is_some_and(|n| n.disk() == DiskState::Failed) {
                        self.crash(id);
                    }
                }
                self.resolve_refusals();
                if self.cfg.nodes > 2 && self.primary().is_none() {
                    // With several peers only a primary resyncs them: the operator names one.
                    self.elect_primary();
                }
                for (a, b) in self.links.keys().copied().collect::<Vec<_>>() {
                    self.schedule(10, Ev::Connect { a, b });
                }
            }
            if self.now > deadline || !self.next_event() {
                let states: Vec<String> = self
                    .nodes
                    .iter()
                    .map(|n| match &n.node {
                        Some(node) => format!("{:?}", node.status()),
                        None => "down".into(),
                    })
                    .collect();
                return Err((
                    "liveness (the cluster settles)",
                    format!("not in sync after healing: {}", states.join(" | ")),
                ));
            }
            if let Some(v) = self.violation.take() {
                return Err(v);
            }
        }
        Ok(())
    }
}

fn describe(msg: &Message) -> String {
    match msg {
        Message::Data { id, offset, payload, fua } => {
            let v = payload.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8"))).unwrap_or(0);
            format!(
                "Data #{id} value {v} at block {} x{}{}",
                offset / BLOCK,
                payload.len() as u64 / BLOCK,
                if *fua { " fua" } else { "" }
            )
        }
        Message::ResyncData { track, .. } => format!("ResyncData track {track}"),
        Message::RecordPage { range, bits } => format!("RecordPage range {range} {:02x?}", &bits[..]),
        Message::State(s) => format!(
            "State {:?} {:?} gen {:#x} (hist {}) crashed {}",
            s.role,
            s.disk,
            s.generations.current,
            s.generations.history.len(),
            s.crashed
        ),
        other => format!("{other:?}"),
    }
}
