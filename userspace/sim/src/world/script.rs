//! Scripted control of the world, for the narrated demo.

use super::*;

/// Scripted control, for the narrated demo: the same world, driven step by step instead of
/// by the random scenario.
impl World {
    /// A host write of `blocks` blocks at `block` on node `id`; returns its value.
    pub(crate) fn script_write(&mut self, id: NodeId, block: u64, blocks: u64) -> u64 {
        let host_id = self.next_host_id;
        self.next_host_id += 1;
        let value = self.next_value;
        self.next_value += 1;
        let extent = Extent::new(block * BLOCK, blocks * BLOCK);
        self.truth.issue(host_id, value, extent);
        self.nodes[id as usize].host.insert(host_id, Some(extent));
        self.accepted_at.insert(host_id, self.now);
        self.feed(
            id,
            Event::HostWrite { id: host_id, offset: extent.offset, data: payload_for(value, blocks), fua: false },
        );
        value
    }

    /// Runs events until `done` holds (checked after each event) or `ticks` pass.
    pub(crate) fn script_run_until(&mut self, ticks: u64, done: impl Fn(&World) -> bool) -> bool {
        let deadline = self.now + ticks;
        while !done(self) {
            if self.now > deadline || !self.next_event() {
                return false;
            }
        }
        true
    }

    pub(crate) fn script_host_pending(&self, id: NodeId) -> usize {
        self.nodes[id as usize].host.len()
    }

    pub(crate) fn script_crash(&mut self, id: NodeId) {
        self.crash(id);
    }

    pub(crate) fn script_boot(&mut self, id: NodeId) {
        self.boot(id);
        self.reconnect_all(id);
    }

    pub(crate) fn script_admin(
        &mut self,
        id: NodeId,
        f: impl FnOnce(&mut Node) -> Result<(), tandem_core::node::AdminError>,
    ) -> Result<(), tandem_core::node::AdminError> {
        let node = self.nodes[id as usize].node.as_mut().expect("node is up");
        let result = f(node);
        self.drain(id);
        result
    }

    pub(crate) fn script_node(&self, id: NodeId) -> Option<&Node> {
        self.nodes[id as usize].node.as_ref()
    }

    pub(crate) fn script_image(&self, id: NodeId) -> Vec<u64> {
        self.nodes[id as usize].disk.image()
    }

    pub(crate) fn script_lost(&self, image: &[u64]) -> Vec<String> {
        self.truth.lost_blocks(image)
    }

    pub(crate) fn script_settled(&self) -> bool {
        self.settled()
    }

    pub(crate) fn script_resync_shipped(&self) -> u64 {
        self.last_resync_shipped
    }

    pub(crate) fn script_messages(&self) -> u64 {
        self.summary.messages
    }

    /// Damages one block of node `id`'s device behind the protocol's back (bit rot, a stray
    /// write): only an online verify can find it.
    pub(crate) fn script_corrupt(&mut self, id: NodeId, block: u64) {
        let disk = &mut self.nodes[id as usize].disk;
        let rotten = !disk.read_block(block);
        disk.stable[block as usize] = rotten;
        disk.cache.remove(&block);
        self.corrupted.push((id, block));
        self.log(format!("(script) block {block} of node {id} rots"));
    }

    /// A violation the live checks found so far.
    pub(crate) fn script_violation(&self) -> Option<String> {
        self.violation.as_ref().map(|(invariant, detail)| format!("invariant {invariant}: {detail}"))
    }
}
